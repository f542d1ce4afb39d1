"""CMX published entries against the authors' code: golden outputs of their network (computed by
tools/parity/cmx.py from their repository, reduced to MiT-B0 at 64x64), their state dict
converted into ours, and their parameter counts of CMX-B0..B5 at 40 classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.pvt_v2 import PyramidVisionTransformerStage

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published.cmx import MIT_DEPTHS, authors_drop_path_rates
from fusionzoo.models.published.parity import fill_state_dict, max_abs_diff, read_fixture, seeded_inputs

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "cmx"
TOLERANCE = 1e-5  # float32, issue 10
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return read_fixture(FIXTURE)


@pytest.fixture(scope="module")
def converted(fixture: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fz.create_model(fixture["model"], **fixture["config"])
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    ours = convert_state_dict(fixture["model"], authors, model)
    model.load_state_dict(ours, strict=True)
    return model


def test_fixture_names_the_entries_commit(fixture: dict) -> None:
    entry = fz.model_entry(fixture["model"])
    assert entry.published and entry.reference_commit == fixture["reference_commit"]


def test_eval_and_train_outputs_equal_the_authors(fixture: dict, converted: torch.nn.Module) -> None:
    golden = load_file(FIXTURE / "outputs.safetensors")
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    model = converted.eval()
    with torch.no_grad():
        assert max_abs_diff(model(inputs), golden["eval_logits"]) <= TOLERANCE
    model.train()  # BatchNorm on batch statistics; drop path and dropout are off in both
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = model(leaves)
    out.square().mean().backward()
    assert max_abs_diff(out.detach(), golden["train_logits"]) <= TOLERANCE
    for m in ("rgb", "hha"):
        # The loss is a mean over 24k logits, so input gradients are ~1e-3: compare relative to them.
        reference = golden[f"train_grad_{m}"]
        assert max_abs_diff(leaves[m].grad, reference) <= TOLERANCE * float(reference.abs().max())


def test_wrong_checkpoint_names_the_first_key(fixture: dict, converted: torch.nn.Module) -> None:
    authors = fill_state_dict(fixture["authors_state_dict"], 0)
    authors["aux_head.conv_seg.weight"] = torch.zeros(3, 64, 1, 1)  # an UPerNet run's head
    with pytest.raises(fz.ConversionError, match="aux_head.conv_seg.weight"):
        convert_state_dict(fixture["model"], authors, converted)


# Built on the meta device (no memory, no init): 0.1-0.7 s each on an idle CPU.
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_parameter_count_equals_the_authors(fixture: dict, variant: str) -> None:
    name = f"cmx_mit_{variant}"
    with torch.device("meta"):
        model = fz.create_model(name, num_classes=40)
    assert sum(p.numel() for p in model.parameters()) == fixture["authors_param_counts_40_classes"][name]


def test_replicated_x_and_imagenet_mit_init(fixture: dict, converted: torch.nn.Module, tmp_path: Path) -> None:
    """``replicate_x``: a 1-channel X repeated in the model equals the authors' 3 copies; and
    SegFormer's ImageNet MiT file initializes both streams, as the authors' load_dualpath_model."""
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    segformer = {k[len("backbone."):]: v for k, v in authors.items()
                 if k.startswith("backbone.") and not k.startswith(("backbone.extra_", "backbone.FRMs", "backbone.FFMs"))}
    segformer["head.weight"] = torch.zeros(1000, 256)  # SegFormer's ImageNet classifier: dropped
    torch.save(segformer, tmp_path / "mit_b0.pth")
    model = fz.create_model(fixture["model"], **fixture["config"], replicate_x=True,
                            mit_weights=str(tmp_path / "mit_b0.pth")).eval()
    assert model.in_chans == {"rgb": 3, "hha": 1}
    own = model.state_dict()
    mapped = convert_state_dict(fixture["model"], authors, converted)
    for key, value in mapped.items():
        if key.startswith("encoders.rgb."):
            assert torch.equal(own[key], value) and torch.equal(own[key.replace("encoders.rgb.", "encoders.hha.")], value)
    model.load_state_dict(converted.state_dict())  # (its BN statistics moved in the train-mode test)
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    one = inputs["hha"][:, :1]
    with torch.no_grad():
        expected = converted.eval()({"rgb": inputs["rgb"], "hha": one.expand(-1, 3, -1, -1)})
        assert torch.equal(model({"rgb": inputs["rgb"], "hha": one}), expected)


def test_convert_checkpoint_file_then_from_pretrained(fixture: dict, tmp_path: Path) -> None:
    """An authors'-format file (their Engine.save_checkpoint: model, optimizer, epoch, iteration) -> a from_pretrained
    folder whose model gives the authors' eval outputs."""
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    optimizer = {"state": {}, "param_groups": [{"lr": 6e-5, "params": [0]}]}
    torch.save({"model": authors, "optimizer": optimizer, "epoch": 500, "iteration": 50000}, tmp_path / "epoch-last.pth")
    out = fz.convert_checkpoint(fixture["model"], tmp_path / "epoch-last.pth", tmp_path / "converted",
                                modalities=tuple(fixture["config"]["modalities"]))
    model = fz.from_pretrained(out)  # num_classes read from the classifier: 3
    golden = load_file(FIXTURE / "outputs.safetensors")
    with torch.no_grad():
        logits = model(seeded_inputs(fixture["inputs"], fixture["seed_inputs"]))
    assert max_abs_diff(logits, golden["eval_logits"]) <= TOLERANCE


def test_drop_path_schedule_equals_the_authors(fixture: dict) -> None:
    """MiT-B2's per-block stochastic-depth rates, RGB and X streams, as their code sets them."""
    with torch.device("meta"):
        model = fz.create_model("cmx_mit_b2")  # drop path 0.1 by default, as theirs

    def built(stream: str) -> list[list[float]]:
        stages = [m for m in model.encoders[stream].modules() if isinstance(m, PyramidVisionTransformerStage)]
        return [[float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in s.blocks] for s in stages]

    rgb, x = built("rgb"), built("hha")
    assert (rgb, x) == authors_drop_path_rates(MIT_DEPTHS["b2"], 0.1)
    theirs = fixture["authors_drop_path_b2"]
    for ours, reference in ((rgb, theirs["rgb"]), (x, theirs["x"])):
        assert [len(s) for s in ours] == [len(s) for s in reference]
        assert all(abs(a - b) < 1e-7 for s, t in zip(ours, reference) for a, b in zip(s, t))
