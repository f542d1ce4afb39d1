"""Detection targets, box-level fusion rules and metrics on hand-made cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fusionzoo.detection as det
from fusionzoo.detection.boxes import bayes_fuse_scores, check_targets
from fusionzoo.detection.metrics import coco_ap, log_average_miss_rate, reasonable_ignore


def dets(boxes, scores, labels=None) -> dict[str, torch.Tensor]:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(boxes), dtype=torch.long) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32).reshape(-1), "labels": labels}


def gts(boxes, labels=None, **extra) -> dict[str, torch.Tensor]:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(boxes), dtype=torch.long) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "labels": labels, **{k: torch.tensor(v) for k, v in extra.items()}}


# -- targets ----------------------------------------------------------------------------------
def test_targets_clip_partly_outside_boxes_and_keep_empty_images() -> None:
    out = check_targets([gts([[-5, 10, 70, 20]]), gts([])], batch=2, image_size=(64, 64), num_classes=3)
    assert out[0]["boxes"].tolist() == [[0.0, 10.0, 64.0, 20.0]]
    assert out[1]["boxes"].shape == (0, 4) and out[1]["labels"].dtype == torch.long


def test_targets_errors_name_the_image_and_box() -> None:
    good = gts([[1, 1, 5, 5]])
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[1\] = \[10.0, 10.0, 10.0, 20.0\] is degenerate"):
        check_targets([good, gts([[1, 1, 5, 5], [10, 10, 10, 20]])], 2, (64, 64), 3)
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]\[0\].*outside the 64x64"):
        check_targets([gts([[70, 70, 80, 80]])], 1, (64, 64), 3)
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]\[0\] = 3 is outside \[0, 3\)"):
        check_targets([gts([[1, 1, 5, 5]], [3])], 1, (64, 64), 3)
    with pytest.raises(ValueError, match="got 1 targets for a batch of 2"):
        check_targets([good], 2, (64, 64), 3)
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        check_targets([{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.long)}], 1, (64, 64), 3)
    with pytest.raises(ValueError, match="not finite"):
        check_targets([gts([[1, 1, float("nan"), 5]])], 1, (64, 64), 3)
    with pytest.raises(ValueError, match="needs targets"):
        check_targets(None, 1, (64, 64), 3)


# -- box fusion -------------------------------------------------------------------------------
A = [0.0, 0.0, 10.0, 10.0]
B = [1.0, 1.0, 11.0, 11.0]  # IoU(A, B) = 81 / 119 = 0.68
FAR = [50.0, 50.0, 60.0, 60.0]


def test_nms_fusion_keeps_the_best_of_each_overlapping_group_per_class() -> None:
    out = det.nms_fusion([dets([A, FAR], [0.9, 0.3]), dets([B, B], [0.6, 0.8], [0, 1])])
    assert out["scores"].tolist() == pytest.approx([0.9, 0.8, 0.3])
    assert out["labels"].tolist() == [0, 1, 0]
    assert out["boxes"][0].tolist() == A


def test_weighted_boxes_fusion_hand_case() -> None:
    out = det.weighted_boxes_fusion([dets([A, FAR], [0.9, 0.8]), dets([B], [0.6])])
    # Cluster {A, B}: score-weighted box (0.9 A + 0.6 B) / 1.5, score mean(0.9, 0.6) * min(2, 2) / 2.
    # FAR alone: 0.8 * min(1, 2) / 2.
    assert out["scores"].tolist() == pytest.approx([0.75, 0.4])
    assert out["boxes"][0].tolist() == pytest.approx([0.4, 0.4, 10.4, 10.4])
    assert out["boxes"][1].tolist() == FAR
    weighted = det.weighted_boxes_fusion([dets([A], [0.9]), dets([B], [0.6])], weights=[2.0, 1.0])
    # Scores become 1.8 and 0.6: box (1.8 A + 0.6 B) / 2.4, score mean(1.8, 0.6) * 2 / 3.
    assert weighted["boxes"][0].tolist() == pytest.approx([0.25, 0.25, 10.25, 10.25])
    assert weighted["scores"].tolist() == pytest.approx([0.8])


def test_proben_fuses_scores_by_bayes_rule_one_box_per_detector() -> None:
    # A duplicate from detector 0 (0.7) does not count as independent evidence.
    out = det.proben_fusion([dets([A, A, FAR], [0.9, 0.7, 0.8]), dets([B], [0.6])], one_per_detector=True)
    expected = 0.9 * 0.6 / (0.9 * 0.6 + 0.1 * 0.4)
    assert out["scores"].tolist() == pytest.approx([expected, 0.8])
    assert out["boxes"][0].tolist() == pytest.approx([0.4, 0.4, 10.4, 10.4])
    # Agreeing detectors raise confidence above either alone; a lone detection keeps its score.
    assert expected > 0.9
    assert float(bayes_fuse_scores(torch.tensor([0.25, 0.25]), prior=0.25)) == pytest.approx(0.25)
    assert float(bayes_fuse_scores(torch.tensor([0.5, 0.8]))) == pytest.approx(0.8)


def test_box_fusion_of_empty_sets_and_classes_kept_apart() -> None:
    empty = dets([], [])
    for rule in det.BOX_FUSIONS.values():
        out = rule([empty, empty])
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
        two = rule([dets([A], [0.9], [0]), dets([A], [0.8], [1])])
        assert sorted(two["labels"].tolist()) == [0, 1]
    with pytest.raises(ValueError, match="expected boxes, scores, labels"):
        det.nms_fusion([{"boxes": torch.zeros(0, 4)}])


# -- COCO AP ----------------------------------------------------------------------------------
def test_coco_ap_hand_case() -> None:
    # Two objects; detections: an exact hit (0.9), a false positive (0.8), a hit on the second
    # object with IoU 0.62 (0.7).
    target = [gts([[0, 0, 10, 10], [20, 20, 30, 30]])]
    pred = [dets([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 26.2]], [0.9, 0.8, 0.7])]
    stats = coco_ap(pred, target)
    # IoU <= 0.62 (thresholds 0.50, 0.55, 0.60): precision envelope 1 up to recall 0.5, 2/3 up to
    # recall 1 -> 101-point AP = (51 * 1 + 50 * 2/3) / 101. Stricter: recall stops at 0.5 -> 51 / 101.
    ap_loose, ap_strict = (51 + 50 * 2 / 3) / 101, 51 / 101
    assert stats["AP50"] == pytest.approx(ap_loose, abs=1e-9)
    assert stats["AP75"] == pytest.approx(ap_strict, abs=1e-9)
    assert stats["AP"] == pytest.approx((3 * ap_loose + 7 * ap_strict) / 10, abs=1e-9)
    assert math.isnan(stats["APl"])  # no large object


def test_coco_ap_classes_empty_predictions_and_checks() -> None:
    target = [gts([[0, 0, 10, 10]], [0]), gts([[0, 0, 10, 10]], [1])]
    right = [dets([[0, 0, 10, 10]], [0.9], [0]), dets([[0, 0, 10, 10]], [0.9], [1])]
    wrong_class = [dets([[0, 0, 10, 10]], [0.9], [1]), dets([[0, 0, 10, 10]], [0.9], [0])]
    assert coco_ap(right, target)["AP"] == pytest.approx(1.0)
    assert coco_ap(wrong_class, target)["AP"] == pytest.approx(0.0)
    # A category with no ground truth does not enter the mean.
    assert coco_ap(right, target, num_classes=5)["AP"] == pytest.approx(1.0)
    assert coco_ap([dets([], []), dets([], [])], target)["AP50"] == 0.0
    with pytest.raises(ValueError, match="1 predictions for 2 targets"):
        coco_ap(right[:1], target)


# -- log-average miss rate --------------------------------------------------------------------
PERSON = [0.0, 0.0, 30.0, 60.0]  # 60 px tall: inside the reasonable range (>= 55)
ELSEWHERE = [100.0, 0.0, 130.0, 60.0]


def test_miss_rate_hand_case() -> None:
    targets = [gts([PERSON]) for _ in range(4)]
    preds = [
        dets([PERSON], [0.9]),
        dets([PERSON], [0.8]),
        dets([ELSEWHERE], [0.7]),
        dets([PERSON, ELSEWHERE], [0.6, 0.5]),
    ]
    # Sorted: TP, TP, FP (FPPI 0.25), TP, FP (FPPI 0.5). At the 6 reference FPPIs below 0.25 the
    # recall is 2/4 (miss 0.5); at 0.316, 0.562 and 1 it is 3/4 (miss 0.25).
    mr, fppi, miss = log_average_miss_rate(preds, targets, return_curve=True)
    assert mr == pytest.approx(math.exp((6 * math.log(0.5) + 3 * math.log(0.25)) / 9))
    assert fppi.tolist() == [0, 0, 0.25, 0.25, 0.5] and miss.tolist() == [0.75, 0.5, 0.5, 0.25, 0.25]


def test_miss_rate_ignores_out_of_subset_ground_truth() -> None:
    small = [100.0, 0.0, 120.0, 40.0]  # 40 px tall: an ignore region, not a positive
    targets = [gts([PERSON]), gts([PERSON]), gts([PERSON, small]), gts([PERSON])]
    preds = [
        dets([PERSON], [0.9]),
        dets([PERSON], [0.8]),
        dets([[101.0, 1.0, 119.0, 39.0]], [0.7]),  # on the ignore region: neither TP nor FP
        dets([PERSON, ELSEWHERE], [0.6, 0.5]),
    ]
    # Remaining: TP, TP, TP (FPPI 0), FP (FPPI 0.25): recall 3/4 at every reference point.
    assert log_average_miss_rate(preds, targets) == pytest.approx(0.25)
    # KAIST occlusion levels: heavy (2) is outside the reasonable subset.
    occluded = [gts([PERSON], occlusion=[2]), gts([PERSON], occlusion=[0])]
    assert reasonable_ignore(occluded[0]).tolist() == [True]
    assert log_average_miss_rate([dets([], []), dets([PERSON], [0.9])], occluded) == pytest.approx(1e-10)


def test_miss_rate_limits() -> None:
    targets = [gts([PERSON]), gts([PERSON])]
    assert log_average_miss_rate([dets([], []), dets([], [])], targets) == pytest.approx(1.0)
    assert math.isnan(log_average_miss_rate([dets([], [])], [gts([])]))
    # A false positive above every hit: at FPPI < 0.5 nothing is found yet, then everything.
    preds = [dets([ELSEWHERE, PERSON], [0.95, 0.9]), dets([PERSON], [0.8])]
    refs = np.logspace(-2, 0, 9)
    expected = math.exp(np.mean([math.log(1.0 if r < 0.5 else 1e-10) for r in refs]))
    assert log_average_miss_rate(preds, targets) == pytest.approx(expected)
