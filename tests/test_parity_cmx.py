"""CMX published entries against the authors' code: golden outputs of their network (computed by
tools/parity/cmx.py from their repository, reduced to MiT-B0 at 64x64), their state dict
converted into ours, and their parameter counts of CMX-B0..B5 at 40 classes."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.pvt_v2 import PyramidVisionTransformerStage

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published.cmx import MIT_DEPTHS, authors_drop_path_rates
from fusionzoo.models.published.parity import (
    eval_and_train_outputs,
    fill_state_dict,
    read_fixture,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from seeded import assert_parity, to_float64

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "cmx"
# Issue 22: the fixture is float64 and ours runs in float64; each output's relative error is bounded
# by seeded.tolerance of how far the authors' own float32 run moved it (fixture "float32_drift").
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
    """Eval logits, then train mode (BatchNorm on batch statistics; drop path and dropout off in
    both): logits and the gradients of ``mean(logits ** 2)`` w.r.t. both inputs."""
    model = copy.deepcopy(converted).double()
    ours = eval_and_train_outputs(model, model, to_float64(seeded_inputs(fixture["inputs"], fixture["seed_inputs"])))
    assert_parity(ours, load_file(FIXTURE / "outputs.safetensors"), fixture["float32_drift"])


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
    model = fz.from_pretrained(out).double()  # num_classes read from the classifier: 3
    golden = load_file(FIXTURE / "outputs.safetensors")
    with torch.no_grad():
        logits = model(to_float64(seeded_inputs(fixture["inputs"], fixture["seed_inputs"])))
    assert_parity({"eval_logits": logits}, {"eval_logits": golden["eval_logits"]}, fixture["float32_drift"])


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
