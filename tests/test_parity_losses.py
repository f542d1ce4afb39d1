"""The ESANet and ACNet recipe losses equal their reference code (tools/parity/loss_recipes.py):
ESANet's median-frequency class weights and its multi-scale loss, ACNet's multi-scale loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fusionzoo.data.statistics import class_pixel_counts
from fusionzoo.losses import median_frequency_weights, segmentation_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from loss_recipes import IMAGES, LOGIT_SEED, logit_shapes, seeded_labels
from seeded import read_fixture, seeded_inputs

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "losses"


@pytest.fixture(scope="module")
def case():
    meta, outputs = read_fixture(FIXTURE)
    labels = seeded_labels(meta["label_seed"])  # the references' convention: 0 = void, 1..K
    ours = torch.where(labels == 0, torch.tensor(255), labels - 1)  # fusionzoo's: 255 = ignore, 0..K-1
    return meta, outputs, ours


def test_median_frequency_weights_equal_esanet(case):
    meta, outputs, labels = case
    counts = class_pixel_counts([{"mask": m.numpy()} for m in labels], meta["num_classes"], progress=False)
    assert counts.num_images == IMAGES
    weights = median_frequency_weights(torch.tensor(counts.class_pixels), torch.tensor(counts.image_pixels))
    torch.testing.assert_close(weights, outputs["esanet_class_weights"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["esanet", "acnet"])
def test_multiscale_loss_equals_the_reference(case, method):
    meta, outputs, labels = case
    logits = list(seeded_inputs(logit_shapes(tuple(meta[f"{method}_strides"])), LOGIT_SEED).values())
    loss = segmentation_loss(
        logits[0], labels, side_logits=logits[1:], side_weights=[1.0] * (len(logits) - 1),
        class_weights=outputs["esanet_class_weights"],
        side_resize="nearest" if method == "esanet" else "nearest-exact",
        average="weighted" if method == "esanet" else "pixels",
    )
    assert loss.item() == pytest.approx(meta[f"{method}_loss"], rel=1e-6)
