"""CMNeXt published entries against the authors' code: golden outputs of their network (computed by
tools/parity/cmnext.py from their repository, reduced to MiT-B0 at 64x48) for RGB + HHA and RGB +
HHA + event, their state dict converted into ours, and their parameter counts of B0..B5."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.pvt_v2 import PyramidVisionTransformerStage

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published.cmnext import PPXBlock
from fusionzoo.models.published.parity import (
    eval_and_train_outputs,
    fill_state_dict,
    read_fixture,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from seeded import assert_parity, to_float64

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "cmnext"
# Issue 22: the fixture is float64 and ours runs in float64; each output's relative error is bounded
# by seeded.tolerance of how far the authors' own float32 run moved it (fixture "float32_drift").
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return read_fixture(FIXTURE)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "outputs.safetensors")


def converted(fixture: dict, key: str, **kwargs: object) -> torch.nn.Module:
    cfg = fixture["configs"][key]
    torch.manual_seed(0)
    model = fz.create_model(fixture["model"], **cfg["config"], **kwargs)
    authors = fill_state_dict(cfg["authors_state_dict"], fixture["seed_weights"])
    model.load_state_dict(convert_state_dict(fixture["model"], authors, model), strict=True)
    return model


def test_fixture_names_the_entries_commit(fixture: dict) -> None:
    entry = fz.model_entry(fixture["model"])
    assert entry.published and entry.reference_commit == fixture["reference_commit"]


@pytest.mark.parametrize("key", ["rgbd", "rgbde"])  # one auxiliary modality; two (the Self-Query Hub)
def test_eval_and_train_outputs_equal_the_authors(fixture: dict, golden: dict, key: str) -> None:
    """Eval logits, then train mode (BatchNorm on batch statistics; drop path and dropout off in
    both): logits and the gradients of ``mean(logits ** 2)`` w.r.t. every input."""
    model = converted(fixture, key).double()
    ours = eval_and_train_outputs(model, model, to_float64(seeded_inputs(fixture["configs"][key]["inputs"], fixture["seed_inputs"])))
    theirs = {k.removeprefix(f"{key}."): v for k, v in golden.items() if k.startswith(f"{key}.")}
    drift = {k.removeprefix(f"{key}."): v for k, v in fixture["float32_drift"].items() if k.startswith(f"{key}.")}
    assert len(theirs) == 2 + len(fixture["configs"][key]["inputs"])
    assert_parity(ours, theirs, drift)


def test_wrong_checkpoint_names_the_first_key(fixture: dict) -> None:
    cfg = fixture["configs"]["rgbd"]
    authors = fill_state_dict(cfg["authors_state_dict"], 0)
    authors["auxi_head.weight"] = torch.zeros(3, 256, 1, 1)
    with torch.device("meta"):
        model = fz.create_model(fixture["model"], **cfg["config"])
    with pytest.raises(fz.ConversionError, match="auxi_head.weight"):
        convert_state_dict(fixture["model"], authors, model)
    # A two-modality checkpoint into a three-modality model: the hub's scorers are missing.
    with torch.device("meta"):
        three = fz.create_model(fixture["model"], **fixture["configs"]["rgbde"]["config"])
    with pytest.raises(fz.ConversionError, match="needs 'auxiliary.embeds.0.norms.1.weight'"):
        convert_state_dict(fixture["model"], fill_state_dict(cfg["authors_state_dict"], 0), three)


# Built on the meta device (no memory, no init): 0.1-1 s each on an idle CPU.
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_parameter_count_equals_the_authors(fixture: dict, variant: str) -> None:
    name = f"cmnext_mit_{variant}"
    with torch.device("meta"):
        model = fz.create_model(name, num_classes=40)
    assert sum(p.numel() for p in model.parameters()) == fixture["authors_param_counts_rgbd_40_classes"][name]


def test_parameter_count_deliver_rgbdel(fixture: dict) -> None:
    release = fz.released_weights("cmnext_mit_b2", "deliver_rgbdel")
    assert release.modalities == ("rgb", "hha", "event", "lidar") and release.num_classes == 25
    with torch.device("meta"):
        model = fz.create_model("cmnext_mit_b2", num_classes=25, modalities=release.modalities)
    assert sum(p.numel() for p in model.parameters()) == fixture["authors_param_count_b2_rgbdel_25_classes"]


def test_drop_path_schedule_equals_the_authors(fixture: dict) -> None:
    """MiT-B2's per-block stochastic-depth rates, RGB and auxiliary branches, as their code sets them."""
    with torch.device("meta"):
        model = fz.create_model("cmnext_mit_b2")  # drop path 0.1 by default, as theirs
    stages = [m for m in model.encoders["rgb"].modules() if isinstance(m, PyramidVisionTransformerStage)]
    rgb = [[float(getattr(b.drop_path1, "drop_prob", 0.0)) for b in s.blocks] for s in stages]
    aux = [[float(getattr(b.drop_path, "drop_prob", 0.0)) for b in blocks] for blocks in model.auxiliary.blocks]
    assert all(isinstance(b, PPXBlock) for blocks in model.auxiliary.blocks for b in blocks)
    theirs = fixture["authors_drop_path_b2"]
    for ours, reference in ((rgb, theirs["rgb"]), (aux, theirs["auxiliary"])):
        assert [len(s) for s in ours] == [len(s) for s in reference]
        assert all(abs(a - b) < 1e-7 for s, t in zip(ours, reference) for a, b in zip(s, t))


def test_replicated_x_and_imagenet_mit_init(fixture: dict, tmp_path: Path) -> None:
    """``replicate_x``: 1-channel auxiliary inputs repeated in the model equal the authors' three
    copies; SegFormer's ImageNet MiT file initializes the RGB branch only, as their init_pretrained."""
    reference = converted(fixture, "rgbd").eval()
    authors = fill_state_dict(fixture["configs"]["rgbd"]["authors_state_dict"], fixture["seed_weights"])
    segformer = {k[len("backbone."):]: v for k, v in authors.items()
                 if k.startswith("backbone.") and not k.startswith(("backbone.extra_", "backbone.FRMs", "backbone.FFMs"))}
    segformer["head.weight"] = torch.zeros(1000, 256)  # SegFormer's ImageNet classifier: dropped
    torch.save(segformer, tmp_path / "mit_b0.pth")
    model = fz.create_model(fixture["model"], **fixture["configs"]["rgbd"]["config"], replicate_x=True,
                            mit_weights=str(tmp_path / "mit_b0.pth")).eval()
    assert model.in_chans == {"rgb": 3, "hha": 1}
    own = reference.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("encoders.rgb."):
            assert torch.equal(value, own[key]), key
        elif key.startswith("auxiliary.") and key.endswith("weight") and value.dim() > 1:
            assert not torch.equal(value, own[key]), key  # the auxiliary branch keeps its own init
    model.load_state_dict(own)
    inputs = seeded_inputs(fixture["configs"]["rgbd"]["inputs"], fixture["seed_inputs"])
    one = inputs["hha"][:, :1]
    with torch.no_grad():
        expected = reference({"rgb": inputs["rgb"], "hha": one.expand(-1, 3, -1, -1)})
        assert torch.equal(model({"rgb": inputs["rgb"], "hha": one}), expected)


def test_convert_checkpoint_file_then_from_pretrained(fixture: dict, golden: dict, tmp_path: Path) -> None:
    """An authors'-format file (their train_mm.py saves the bare state dict) -> a from_pretrained
    folder whose model gives the authors' eval outputs."""
    cfg = fixture["configs"]["rgbde"]
    torch.save(fill_state_dict(cfg["authors_state_dict"], fixture["seed_weights"]), tmp_path / "cmnext_b0_rgbde.pth")
    out = fz.convert_checkpoint(fixture["model"], tmp_path / "cmnext_b0_rgbde.pth", tmp_path / "converted",
                                modalities=tuple(cfg["config"]["modalities"]))
    model = fz.from_pretrained(out).double()  # num_classes read from the classifier: 3
    with torch.no_grad():
        logits = model(to_float64(seeded_inputs(cfg["inputs"], fixture["seed_inputs"])))
    assert_parity({"eval": logits}, {"eval": golden["rgbde.eval_logits"]}, {"eval": fixture["float32_drift"]["rgbde.eval_logits"]})
