"""acnet_r50 equals the ACNet reference code (anheidelonghu/ACNet) with mapped weights.

The fixture (tools/parity/acnet.py) holds the reference's key/shape list, the seeds and its
outputs; here the same authors'-format state dict is rebuilt by the shared rule, converted
(dropping the reference's four training-only side classifiers), and run.
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
from seeded import read_fixture, run_modes

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "acnet"
NAME = "acnet_r50"


@pytest.fixture(scope="module")
def case():
    meta, outputs = read_fixture(FIXTURE)
    model = converted_model(NAME, meta)
    return meta, outputs, run_modes(model, model, meta)


def test_fixture_is_from_the_registered_commit(case):
    meta = case[0]
    entry = fz.model_entry(NAME)
    assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_equal_the_reference(case, mode):
    _, outputs, ours = case
    diff = (ours[mode] - outputs[mode]).abs().max().item()
    assert diff <= 1e-5, f"{mode}: max abs diff {diff:.3g} to the reference"


def test_parameter_count_equals_the_reference_without_side_classifiers():
    meta, _ = read_fixture(FIXTURE)
    for classes, theirs in meta["authors_params"].items():
        with torch.device("meta"):
            model = fz.create_model(NAME, num_classes=int(classes))
        ours = sum(p.numel() for p in model.parameters())
        assert ours == theirs["total"] - theirs["training_only_side_classifiers"], classes


def test_converter_drops_only_the_side_classifiers():
    meta, _ = read_fixture(FIXTURE)
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=meta["num_classes"])
    authors = {k: torch.empty(shape, device="meta") for k, shape, _ in meta["keys"]}
    assert len(convert_state_dict(NAME, authors, model)) == len(authors) - 8  # out2..out5_conv weight + bias
    authors["out6_conv.weight"] = torch.empty(1, device="meta")
    with pytest.raises(fz.ConversionError, match="out6_conv.weight"):
        convert_state_dict(NAME, authors, model)
