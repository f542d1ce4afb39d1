"""fusenet_vgg16 equals the FuseNet PyTorch port (MehmetAygun/fusenet-pytorch) with mapped weights.

The fixture (tools/parity/fusenet.py) holds the port's key/shape list, the seeds and its outputs;
here the same authors'-format state dict is rebuilt by the shared rule, converted, and run.
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

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "fusenet"
NAME = "fusenet_vgg16"


@pytest.fixture(scope="module")
def case():
    meta, outputs = read_fixture(FIXTURE)
    model = converted_model(NAME, meta)
    return meta, outputs, run_modes(model, model, meta)  # train mode after torch.manual_seed(train_seed): same dropout masks


def test_fixture_is_from_the_registered_commit(case):
    meta = case[0]
    entry = fz.model_entry(NAME)
    assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_equal_the_port(case, mode):
    """float64 on both sides; relative error bounded by ``seeded.tolerance`` of the reference's own
    float32 drift (recorded in the fixture), so the bound holds on any CPU (issue 22)."""
    meta, outputs, ours = case
    assert_parity({mode: ours[mode]}, {mode: outputs[mode]}, meta["float32_drift"])


def test_parameter_count_equals_the_port():
    meta, _ = read_fixture(FIXTURE)
    for classes, theirs in meta["authors_params"].items():
        with torch.device("meta"):
            model = fz.create_model(NAME, num_classes=int(classes))
        assert sum(p.numel() for p in model.parameters()) == theirs, classes


def test_converter_names_a_foreign_key():
    meta, _ = read_fixture(FIXTURE)
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=meta["num_classes"])
    authors = {k: torch.empty(shape, device="meta") for k, shape, _ in meta["keys"]}
    authors["CBR6_RGB_DEC.0.weight"] = torch.empty(1, device="meta")
    with pytest.raises(fz.ConversionError, match="CBR6_RGB_DEC.0.weight"):
        convert_state_dict(NAME, authors, model)
