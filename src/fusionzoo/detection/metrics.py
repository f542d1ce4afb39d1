"""Detection metrics: COCO AP through pycocotools, and the KAIST / Caltech log-average miss rate.

Both take torchvision-style lists, one dict per image: predictions with ``boxes`` ``(N, 4)``
xyxy pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)``; targets with ``boxes`` and ``labels``
(plus optional per-box flags described below).
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _numpy(x: torch.Tensor | np.ndarray | Sequence, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_pairs(predictions: Sequence[Mapping], targets: Sequence[Mapping]) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"got {len(predictions)} predictions for {len(targets)} targets; give one dict per image to each")
    for i, p in enumerate(predictions):
        missing = [k for k in ("boxes", "scores", "labels") if k not in p]
        if missing:
            raise ValueError(f"predictions[{i}] lacks {missing}; expected boxes (N, 4), scores (N,), labels (N,)")
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"targets[{i}] lacks boxes or labels; expected boxes (N, 4) xyxy and labels (N,)")


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = boxes.reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def coco_ap(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    num_classes: int | None = None,
    max_detections: int = 100,
) -> dict[str, float]:
    """COCO box AP with pycocotools' ``COCOeval`` (101-point interpolated precision, IoU 0.50:0.95).

    Ground-truth areas are box areas (``w * h``), so the small / medium / large split is by box
    size. An optional target key ``iscrowd`` ``(N,)`` marks crowd regions (matched but never
    counted, as in COCO); without it, an ``ignore`` key ``(N,)`` plays that role.

    Args:
        predictions: per image ``boxes`` ``(N, 4)`` xyxy, ``scores`` ``(N,)``, ``labels`` ``(N,)``.
        targets: per image ``boxes`` ``(M, 4)`` xyxy, ``labels`` ``(M,)``, optional ``iscrowd``.
        num_classes: the categories to evaluate are ``0..num_classes-1`` (default: every label
            seen in the targets); categories without ground truth do not enter the mean.
        max_detections: COCO's ``maxDets`` for AP (100).

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}``;
        pycocotools reports -1 where nothing can be measured (e.g. no ground truth of a size),
        returned here as NaN.

    Example:
        >>> gt = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "labels": torch.tensor([0])}]
        >>> pred = [{"boxes": torch.tensor([[0., 0., 10., 10.]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}]
        >>> round(coco_ap(pred, gt)["AP50"], 6)
        1.0
    """
    evaluator = _coco_eval(predictions, targets, num_classes, max_detections)
    if evaluator is None:
        return {k: math.nan for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        evaluator.accumulate()
        evaluator.summarize()
    return {k: (float(v) if v >= 0 else math.nan) for k, v in zip(COCO_STATS, evaluator.stats)}


def _coco_eval(predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]],
               num_classes: int | None, max_detections: int) -> COCOeval | None:
    """pycocotools' ``COCOeval`` of :func:`coco_ap` after ``evaluate()`` (per-image matching), or
    None when there is no ground truth. Image ``i`` has COCO id ``i + 1``, category ``c`` id ``c + 1``."""
    _check_pairs(predictions, targets)
    if num_classes is None:
        seen = {int(v) for t in targets for v in _numpy(t["labels"], np.int64)}
        cat_ids = sorted(seen)
    else:
        cat_ids = list(range(num_classes))
    categories = [{"id": c + 1, "name": str(c)} for c in cat_ids]  # COCO ids start at 1
    images = [{"id": i + 1, "height": 0, "width": 0} for i in range(len(targets))]
    gts, dts = [], []
    for i, (p, t) in enumerate(zip(predictions, targets)):
        boxes = _xywh(_numpy(t["boxes"]))
        if "iscrowd" in t:
            crowd = _numpy(t["iscrowd"], np.int64)
        elif "ignore" in t:  # ignore regions (KAIST people / cyclist / person?) score as COCO crowd
            crowd = _numpy(t["ignore"], np.int64)
        else:
            crowd = np.zeros(len(boxes), np.int64)
        for box, label, c in zip(boxes, _numpy(t["labels"], np.int64), crowd):
            gts.append({"id": len(gts) + 1, "image_id": i + 1, "category_id": int(label) + 1, "bbox": box.tolist(),
                        "area": float(box[2] * box[3]), "iscrowd": int(c)})
        boxes = _xywh(_numpy(p["boxes"]))
        for box, score, label in zip(boxes, _numpy(p["scores"]), _numpy(p["labels"], np.int64)):
            dts.append({"id": len(dts) + 1, "image_id": i + 1, "category_id": int(label) + 1, "bbox": box.tolist(),
                        "area": float(box[2] * box[3]), "score": float(score), "iscrowd": 0})
    if not gts:
        return None
    coco_gt, coco_dt = COCO(), COCO()
    coco_gt.dataset = {"images": images, "annotations": gts, "categories": categories}
    # Built directly rather than with loadRes, which cannot take an empty detection list.
    coco_dt.dataset = {"images": images, "annotations": dts, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.catIds = [c["id"] for c in categories]
        evaluator.params.maxDets = [1, 10, max_detections]
        evaluator.evaluate()
    return evaluator


def weighted_coco_ap(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    weights: np.ndarray | torch.Tensor,
    num_classes: int,
    max_detections: int = 100,
) -> dict[str, np.ndarray]:
    """COCO box AP, AP50, AP75 and per-class AP / AP50 of ``R`` weighted copies of a dataset.

    Image ``i`` counts ``weights[r, i]`` times in copy ``r`` (bootstrap replicates,
    :mod:`fusionzoo.interpret.intervals`): pycocotools' per-image matching (``evaluate``) is run
    once, and its ``accumulate`` is redone with each image's detections and non-ignored ground
    truths weighted, vectorised over replicates. All-one weights give :func:`coco_ap`'s numbers
    (the same arithmetic); integer weights give those of the dataset with images repeated, up to
    the order of tied detection scores inside one precision step.

    Args:
        predictions, targets: as :func:`coco_ap`.
        weights: ``(R, N)`` non-negative image weights.
        num_classes: categories ``0..K-1``.
        max_detections: COCO's ``maxDets``.

    Returns:
        ``{"ap", "ap50", "ap75": (R,), "ap_per_class", "ap50_per_class": (R, K)}``; a category
        without (weighted) ground truth in a copy is NaN there and left out of its mean, as
        pycocotools leaves it out.
    """
    w = _numpy(weights)
    if w.ndim != 2 or w.shape[1] != len(targets):
        raise ValueError(f"weights must be (R, {len(targets)}) (replicates x images), got {tuple(w.shape)}")
    r_count, k_count = w.shape[0], int(num_classes)
    evaluator = _coco_eval(predictions, targets, k_count, max_detections)
    n_thr = 10  # IoU 0.50:0.05:0.95
    prec = np.full((r_count, n_thr, k_count), math.nan)  # mean precision over the 101 recall points
    if evaluator is not None:
        p = evaluator.params
        n_img, n_area = len(p.imgIds), len(p.areaRng)
        for k in range(k_count):
            evals = [e for e in evaluator.evalImgs[k * n_area * n_img: k * n_area * n_img + n_img] if e is not None]
            if evals:
                prec[:, :, k] = _weighted_precision(evals, w, max_detections, np.asarray(p.recThrs))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: no ground truth in a copy
        return {"ap": np.nanmean(prec, (1, 2)), "ap50": np.nanmean(prec[:, 0], 1), "ap75": np.nanmean(prec[:, 5], 1),
                "ap_per_class": np.nanmean(prec, 1), "ap50_per_class": prec[:, 0]}


def _weighted_precision(evals: Sequence[Mapping], w: np.ndarray, max_det: int, rec_thrs: np.ndarray) -> np.ndarray:
    """``(R, T)`` mean interpolated precision of one category (area "all") under image weights
    ``w (R, N)``: pycocotools' ``COCOeval.accumulate`` with weighted cumulative counts."""
    img = np.concatenate([np.full(len(e["dtScores"][:max_det]), e["image_id"] - 1) for e in evals]).astype(np.int64)
    scores = np.concatenate([e["dtScores"][:max_det] for e in evals])
    order = np.argsort(-scores, kind="mergesort")  # pycocotools' order
    dtm = np.concatenate([e["dtMatches"][:, :max_det] for e in evals], axis=1)[:, order]
    dt_ig = np.concatenate([e["dtIgnore"][:, :max_det] for e in evals], axis=1)[:, order]
    npig = sum(w[:, e["image_id"] - 1] * np.count_nonzero(np.asarray(e["gtIgnore"]) == 0) for e in evals)  # (R,)
    wd = w[:, img[order]][:, None, :]                                                            # (R, 1, D)
    tp = np.cumsum(np.logical_and(dtm, ~dt_ig.astype(bool))[None] * wd, axis=2)                 # (R, T, D)
    fp = np.cumsum(np.logical_and(~dtm.astype(bool), ~dt_ig.astype(bool))[None] * wd, axis=2)
    out = np.full((w.shape[0], dtm.shape[0]), math.nan)
    for r in np.flatnonzero(npig > 0):
        rc = tp[r] / npig[r]
        pr = tp[r] / (fp[r] + tp[r] + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
        for t in range(dtm.shape[0]):
            idx = np.searchsorted(rc[t], rec_thrs, side="left")
            q = np.zeros(len(rec_thrs))
            ok = idx < len(rc[t])
            q[ok] = pr[t, idx[ok]]
            out[r, t] = q.mean()
    return out


# -- log-average miss rate --------------------------------------------------------------------
def _overlaps(dt: np.ndarray, gt: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """``(D, G)`` overlap of xyxy boxes: IoU, or intersection / detection area for ignore boxes
    (a detection may match any part of an ignore region; Dollar's ``bbGt compOas``)."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    w = np.minimum(dt[:, None, 2], gt[None, :, 2]) - np.maximum(dt[:, None, 0], gt[None, :, 0])
    h = np.minimum(dt[:, None, 3], gt[None, :, 3]) - np.maximum(dt[:, None, 1], gt[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_dt = ((dt[:, 2] - dt[:, 0]) * (dt[:, 3] - dt[:, 1]))[:, None]
    area_gt = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None, :]
    union = np.where(ignore[None, :], area_dt, area_dt + area_gt - inter)
    return np.where(inter > 0, inter / np.maximum(union, 1e-12), 0.0)


def _match_image(dt: np.ndarray, scores: np.ndarray, gt: np.ndarray, ignore: np.ndarray, thresh: float) -> np.ndarray:
    """Per detection: 1 true positive, 0 false positive, -1 matched an ignore region (not counted).

    Dollar's ``bbGt evalRes``: detections by decreasing score, ground truth with ignore boxes
    last; each detection takes the best remaining box with overlap >= ``thresh``, preferring
    regular boxes; a regular box matches once, an ignore box any number of times.
    """
    order = np.argsort(-scores, kind="mergesort")
    gt_order = np.argsort(ignore, kind="mergesort")
    gt, ignore = gt[gt_order], ignore[gt_order]
    oa = _overlaps(dt[order], gt, ignore)
    taken = np.zeros(len(gt), bool)
    result = np.zeros(len(dt))
    for d in range(len(order)):
        best_oa, best_g, best_kind = thresh, -1, 0
        for g in range(len(gt)):
            if taken[g]:
                continue
            if best_kind != 0 and ignore[g]:
                break  # matched already; ignore boxes come last and never beat a match
            if oa[d, g] < best_oa:
                continue
            best_oa, best_g, best_kind = oa[d, g], g, (-1 if ignore[g] else 1)
        if best_kind == 1:
            taken[best_g] = True
        result[order[d]] = best_kind
    return result


def reasonable_ignore(
    target: Mapping[str, torch.Tensor],
    height_range: tuple[float, float] = (55.0, math.inf),
    max_occlusion: int | None = 1,
    min_visibility: float | None = None,
    border: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Ignore flags ``(M,)`` of one image's ground truth for the "reasonable" subset.

    A box is ignored when its height (``y2 - y1``) is outside ``height_range``, its
    ``occlusion`` level (optional target key; KAIST: 0 none, 1 partial, 2 heavy) exceeds
    ``max_occlusion``, its ``visibility`` (optional key, visible fraction as in Caltech) is
    below ``min_visibility``, it is not inside ``border`` (x1, y1, x2, y2; the KAIST Python
    evaluation uses (5, 5, 635, 507)), or the target's own ``ignore`` flag (optional key, e.g.
    KAIST's ``people`` / ``person?`` boxes) is set.
    """
    boxes = _numpy(target["boxes"]).reshape(-1, 4)
    height = boxes[:, 3] - boxes[:, 1]
    ignore = (height < height_range[0]) | (height > height_range[1])
    if "ignore" in target:
        ignore |= _numpy(target["ignore"], bool)
    if max_occlusion is not None and "occlusion" in target:
        ignore |= _numpy(target["occlusion"], np.int64) > max_occlusion
    if min_visibility is not None and "visibility" in target:
        ignore |= _numpy(target["visibility"]) < min_visibility
    if border is not None:
        x1, y1, x2, y2 = border
        ignore |= (boxes[:, 0] < x1) | (boxes[:, 1] < y1) | (boxes[:, 2] > x2) | (boxes[:, 3] > y2)
    return ignore


def log_average_miss_rate(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    label: int | None = None,
    iou_thresh: float = 0.5,
    height_range: tuple[float, float] = (55.0, math.inf),
    max_occlusion: int | None = 1,
    min_visibility: float | None = None,
    border: tuple[float, float, float, float] | None = None,
    fppi_range: tuple[float, float] = (1e-2, 1.0),
    num_points: int = 9,
    return_curve: bool = False,
) -> float | tuple[float, np.ndarray, np.ndarray]:
    """Log-average miss rate MR^-2 (Dollar, Wojek, Schiele, Perona, "Pedestrian Detection: An
    Evaluation of the State of the Art", PAMI 2012, Sec. 3.1), with the KAIST "reasonable"
    setting by default (Hwang et al., CVPR 2015: pedestrians at least 55 px tall, not heavily
    occluded).

    Protocol: ground truth outside the subset becomes an *ignore* region (:func:`reasonable_ignore`);
    per image, detections are matched as in Dollar's ``bbGt evalRes`` (IoU >= 0.5 with a regular
    box, intersection-over-detection-area >= 0.5 with an ignore region; detections on ignore
    regions count neither way). Over all images, detections sorted by score give the miss
    rate ``1 - TP / #regular boxes`` against false positives per image (``FP / #images``). At
    ``num_points`` FPPI values log-spaced over ``fppi_range`` (10^-2 .. 10^0, 9 points) the
    miss rate is read at the last point of the curve with FPPI <= the reference (1 where the
    curve starts above it), and MR^-2 = exp(mean(log(max(1e-10, miss)))).

    Args:
        predictions: per image ``boxes`` ``(N, 4)`` xyxy, ``scores`` ``(N,)``, ``labels`` ``(N,)``.
        targets: per image ``boxes`` ``(M, 4)``, ``labels`` ``(M,)``; optional ``ignore``,
            ``occlusion``, ``visibility`` ``(M,)``.
        label: evaluate this class only (None: every box, e.g. single-class pedestrians).
        iou_thresh: matching threshold (0.5).
        height_range, max_occlusion, min_visibility, border: the subset (:func:`reasonable_ignore`).
        fppi_range, num_points: reference FPPI points.
        return_curve: also return the curve ``(fppi, miss_rate)``, arrays over sorted detections.

    Returns:
        MR^-2 in [0, 1] (lower is better), NaN without any regular ground-truth box; with
        ``return_curve`` a tuple ``(mr, fppi, miss_rate)``.
    """
    _check_pairs(predictions, targets)
    all_scores, all_match = [], []
    num_pos = 0
    for p, t in zip(predictions, targets):
        gt = _numpy(t["boxes"]).reshape(-1, 4)
        ignore = reasonable_ignore(t, height_range, max_occlusion, min_visibility, border)
        dt = _numpy(p["boxes"]).reshape(-1, 4)
        scores = _numpy(p["scores"]).reshape(-1)
        if label is not None:
            keep_gt = _numpy(t["labels"], np.int64) == label
            gt, ignore = gt[keep_gt], ignore[keep_gt]
            keep_dt = _numpy(p["labels"], np.int64) == label
            dt, scores = dt[keep_dt], scores[keep_dt]
        num_pos += int((~ignore).sum())
        match = _match_image(dt, scores, gt, ignore, iou_thresh)
        all_scores.append(scores[match >= 0])
        all_match.append(match[match >= 0])
    refs = np.logspace(math.log10(fppi_range[0]), math.log10(fppi_range[1]), num_points)
    if num_pos == 0:
        result = math.nan
        return (result, np.zeros(0), np.zeros(0)) if return_curve else result
    scores = np.concatenate(all_scores)
    match = np.concatenate(all_match)
    order = np.argsort(-scores, kind="mergesort")  # stable, as Matlab's sort
    tp = np.cumsum(match[order] == 1)
    fp = np.cumsum(match[order] == 0)
    fppi = fp / len(targets)
    recall = tp / num_pos
    at_ref = np.zeros(num_points)
    for i, r in enumerate(refs):
        below = np.nonzero(fppi <= r)[0]
        at_ref[i] = recall[below[-1]] if len(below) else 0.0
    mr = float(np.exp(np.mean(np.log(np.maximum(1e-10, 1.0 - at_ref)))))
    return (mr, fppi, 1.0 - recall) if return_curve else mr
