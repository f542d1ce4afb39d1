"""sagate_r50 / sagate_r101 equal the SA-Gate reference code (charlesCXK/RGBD_Semantic_Segmentation_PyTorch)
with mapped weights.

The fixture (tools/parity/sagate.py) holds the reference's key/shape list on ResNet-50, the seeds
and its outputs; here the same authors'-format state dict is rebuilt by the shared rule, converted
(the FCN auxiliary head included), and run. ResNet-101 differs only in the number of
blocks of stage 3: it is checked by parameter count and by converting its key list.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from parity_helpers import converted_model
from seeded import assert_parity, authors_state_dict, read_fixture, run_modes

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "sagate"
NAME = "sagate_r50"


def _meta_model(name: str, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):  # no initialisation: every tensor comes from the rule
        return fz.create_model(name, num_classes=num_classes, modalities=("rgb", "hha"))


@pytest.fixture(scope="module")
def case():
    meta, outputs = read_fixture(FIXTURE)
    model = converted_model(NAME, meta, modalities=("rgb", "hha"))
    return meta, outputs, model, run_modes(model, model, meta)


def test_fixture_is_from_the_registered_commit(case):
    meta = case[0]
    for name in ("sagate_r50", "sagate_r101"):
        entry = fz.model_entry(name)
        assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_equal_the_reference(case, mode):
    """float64 on both sides; relative error bounded by ``seeded.tolerance`` of the reference's own
    float32 drift (recorded in the fixture), so the bound holds on any CPU (issue 22)."""
    meta, outputs, _, ours = case
    assert_parity({mode: ours[mode]}, {mode: outputs[mode]}, meta["float32_drift"])


def test_shortcut_projections_are_shared_as_in_the_reference(case):
    model = case[2]
    rgb, hha = model.encoders["rgb"], model.encoders["hha"]
    assert all(b[-1][0].downsample._target[0] is a[-1][0].downsample for a, b in zip(rgb.segments, hha.segments))
    assert not any("hha.segments" in k and "downsample" in k for k in model.state_dict())  # stored once
    assert model.tap_info()["fused.stage4"].reduction == 16  # dilated last stage, output stride 16


@pytest.mark.parametrize("name", ["sagate_r50", "sagate_r101"])
def test_parameter_count_equals_the_reference(name):
    meta, _ = read_fixture(FIXTURE)
    theirs = meta["authors_params_at_40_classes"][name.split("_")[1]]
    model = _meta_model(name, 40)
    assert sum(p.numel() for p in model.parameters()) == theirs["total"]
    assert sum(p.numel() for p in model.auxlayer.parameters()) == theirs["training_only_aux_head"]


def test_r101_converts_the_r50_key_layout_with_23_blocks():
    meta, _ = read_fixture(FIXTURE)
    keys = {k: shape for k, shape, _ in meta["keys"]}
    model = _meta_model("sagate_r101", meta["num_classes"])
    # The reference's ResNet-101 has the keys of its ResNet-50 plus stage-3 blocks 6..22, shaped as block 5.
    authors = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    for k, s in keys.items():
        if k.startswith("backbone.layer3.5."):
            for block in range(6, 23):
                authors[k.replace("layer3.5.", f"layer3.{block}.")] = torch.empty(s, device="meta")
    ours = convert_state_dict("sagate_r101", authors, model)
    dropped = sum(".hha_downsample." in k for k in authors)  # stored once, under the RGB name
    assert len(ours) == len(authors) - dropped


def test_converter_refuses_unequal_shared_projections():
    meta, _ = read_fixture(FIXTURE)
    authors = authors_state_dict(meta)
    key = next(k for k in authors if ".hha_downsample." in k and k.endswith("weight"))
    authors[key] = authors[key] + 1
    with pytest.raises(fz.ConversionError, match="must equal"):
        convert_state_dict(NAME, authors, _meta_model(NAME, meta["num_classes"]))


def test_aux_output_in_training_mode_only(case):
    model = case[2]  # run_modes ended with the train-mode run on the fixture's 64x64 inputs
    assert [tuple(s.shape) for s in model.side_logits] == [(2, case[0]["num_classes"], 4, 4)]  # stride 16
    assert (model.side_strides, model.side_logits_resize) == ((16,), "bilinear")
    model.eval()
    with torch.no_grad():
        model({"rgb": torch.randn(1, 3, 32, 32).double(), "hha": torch.randn(1, 3, 32, 32).double()})  # run_modes left it float64
    assert model.side_logits == ()
