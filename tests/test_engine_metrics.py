"""Confusion-matrix metrics against hand-computed values (their reduction across ranks:
tests/test_engine_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fusionzoo.tasks import ConfusionMatrix, class_map

TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_hand_computed_case():
    # valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is skipped.
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    out = cm.compute(["a", "b", "c"])
    # IoU: 1/(2+2-1), 2/(2+3-2), 0/(1+0-0)
    assert out["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert out["miou"] == pytest.approx(1 / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)
    assert out["acc"] == pytest.approx([0.5, 1.0, 0.0])
    assert out["mean_acc"] == pytest.approx(0.5)
    assert out["per_class"]["b"] == pytest.approx(2 / 3)
    assert out["pixels"] == 5


def test_logits_are_argmaxed_and_batches_accumulate():
    logits = torch.nn.functional.one_hot(PRED.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(logits, TARGET)
    a.update(logits, TARGET)
    b.update(torch.cat([PRED, PRED]), torch.cat([TARGET, TARGET]))
    assert torch.equal(a.matrix, b.matrix)
    assert a.matrix.sum() == 10


def test_absent_class_is_excluded_from_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    out = cm.compute()
    assert math.isnan(out["iou"][3]) and math.isnan(out["acc"][3])
    assert out["miou"] == pytest.approx(1 / 3)  # same as with K=3
    assert out["present"] == 3


def test_predicted_but_absent_class_counts_as_zero_iou():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[1, 1]]), torch.tensor([[0, 0]]))
    out = cm.compute()
    assert out["iou"] == [0.0, 0.0]
    assert math.isnan(out["acc"][1])  # no ground truth of class 1
    assert out["miou"] == 0.0


def test_empty_and_bad_inputs():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0]]), torch.tensor([[255]]))
    assert math.isnan(cm.compute()["miou"])
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0]]), torch.tensor([[3]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        cm.update(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_class_map_is_argmax_with_its_ties():
    """``class_map`` (``max(1).indices``, the fast CPU path) gives ``argmax(1)``'s ids, the first
    maximal class on ties, for few and many classes."""
    g = torch.Generator().manual_seed(0)
    for k in (2, 5, 40):
        logits = torch.randn(3, k, 7, 9, generator=g)
        logits[:, k - 1] = logits[:, 0]  # ties between the first and the last class everywhere
        logits[0, :, 0, 0] = 1.0  # an all-equal pixel: class 0
        assert torch.equal(class_map(logits), logits.argmax(1))
        assert int(class_map(logits)[0, 0, 0]) == 0
