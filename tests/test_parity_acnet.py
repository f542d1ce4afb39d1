"""acnet_r50 equals the ACNet reference code (anheidelonghu/ACNet) with mapped weights.

The fixture (tools/parity/acnet.py) holds the reference's key/shape list, the seeds and its
outputs; here the same authors'-format state dict is rebuilt by the shared rule, converted
(every tensor, the four deep-supervision side classifiers included), and run.
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
from seeded import assert_parity, read_fixture, run_modes

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "acnet"
NAME = "acnet_r50"


@pytest.fixture(scope="module")
def converted():
    meta, outputs = read_fixture(FIXTURE)
    return meta, outputs, converted_model(NAME, meta)


@pytest.fixture(scope="module")
def case(converted):
    meta, outputs, model = converted
    return meta, outputs, run_modes(model, model, meta)


def test_fixture_is_from_the_registered_commit(case):
    meta = case[0]
    entry = fz.model_entry(NAME)
    assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_equal_the_reference(case, mode):
    """float64 on both sides; relative error bounded by ``seeded.tolerance`` of the reference's own
    float32 drift (recorded in the fixture), so the bound holds on any CPU (issue 22)."""
    meta, outputs, ours = case
    assert_parity({mode: ours[mode]}, {mode: outputs[mode]}, meta["float32_drift"])


def test_parameter_count_equals_the_reference():
    meta, _ = read_fixture(FIXTURE)
    for classes, theirs in meta["authors_params"].items():
        with torch.device("meta"):
            model = fz.create_model(NAME, num_classes=int(classes))
        ours = sum(p.numel() for p in model.parameters())
        assert ours == theirs["total"], classes
        side = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder.out"))
        assert side == theirs["training_only_side_classifiers"], classes


def test_converter_keeps_every_tensor():
    meta, _ = read_fixture(FIXTURE)
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=meta["num_classes"])
    authors = {k: torch.empty(shape, device="meta") for k, shape, _ in meta["keys"]}
    assert len(convert_state_dict(NAME, authors, model)) == len(authors)  # out2..out5_conv included
    authors["out6_conv.weight"] = torch.empty(1, device="meta")
    with pytest.raises(fz.ConversionError, match="out6_conv.weight"):
        convert_state_dict(NAME, authors, model)


def test_side_outputs_in_training_mode_only(case, converted):
    model = converted[2]  # run_modes (case) ended with the train-mode run on the fixture's 64x64 inputs
    assert [tuple(s.shape[-2:]) for s in model.side_logits] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert (model.side_strides, model.side_logits_resize) == ((2, 4, 8, 16), "nearest-exact")
    model.eval()
    with torch.no_grad():
        model({"rgb": torch.randn(1, 3, 32, 32).double(), "depth": torch.randn(1, 1, 32, 32).double()})  # run_modes left it float64
    assert model.side_logits == ()
