"""Box utilities for the detection zoo: target checks and box-level (late) fusion rules.

Boxes are ``xyxy`` pixels, float ``(N, 4)``; a detection set is a dict with ``boxes`` ``(N, 4)``,
``scores`` ``(N,)`` in [0, 1] and ``labels`` int64 ``(N,)`` (torchvision's convention).

Fusion rules combine the detection sets of several detectors (one per modality, or the fused
detector plus one per modality) of the *same* image:

- :func:`nms_fusion`: class-wise NMS over the union of all sets (keep the highest-scoring box of
  every overlapping group);
- :func:`weighted_boxes_fusion`: WBF (Solovyev, Wang, Gabruseva, "Weighted boxes fusion:
  Ensembling boxes from different object detection models", Image and Vision Computing 2021,
  Sec. 3): boxes are clustered against the running fused box, coordinates are averaged with
  the scores as weights, and a box found by few detectors is down-weighted;
- :func:`proben_fusion`: ProbEn (Chen, Shi, Ye, Mertz, Ramanan, Kong, "Multimodal Object
  Detection via Probabilistic Ensembling", ECCV 2022, Sec. 3): NMS-style clusters whose scores
  are fused by Bayes' rule under conditional independence of the modalities given the class
  (``p(y | x_1, x_2) ∝ p(y | x_1) p(y | x_2) / p(y)``), boxes by score-weighted averaging (or
  the authors' other score / box rules); equal to the authors' code (tools/parity/proben.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

Detections = dict[str, torch.Tensor]


# -- targets ----------------------------------------------------------------------------------
def check_targets(
    targets: Sequence[Mapping[str, torch.Tensor]] | None,
    batch: int,
    image_size: tuple[int, int],
    num_classes: int,
    device: torch.device | None = None,
) -> list[Detections]:
    """Validate training targets and clip boxes to the image.

    Policy (documented in docs/detection.md): boxes partly outside the image are clipped to it
    (geometric augmentations produce them routinely); a box with ``x2 <= x1`` or ``y2 <= y1``,
    before or after clipping (so also a box entirely outside the image), is an error, because
    torchvision's box coders divide by its width and height. Images without boxes are fine
    (``boxes`` of shape ``(0, 4)``): every location is then background.

    Boxes flagged by an optional ``ignore`` ``(N,)`` key are removed (ignore regions are not
    positives; see docs/detection.md).

    Args:
        targets: one dict per image with ``boxes`` float ``(N, 4)`` xyxy pixels and ``labels``
            int ``(N,)`` in ``[0, num_classes)``, optional ``ignore`` bool ``(N,)``.
        batch: ``B`` of the input tensors.
        image_size: ``(H, W)`` of the inputs (before any padding).
        num_classes: ``K``.
        device: where the checked targets go (the model's device).

    Returns:
        New dicts with float32 clipped ``boxes`` ``(N, 4)`` and int64 ``labels`` ``(N,)``.

    Raises:
        ValueError: a wrong count, a missing key, a bad shape, a non-finite coordinate, a label
            out of range or a degenerate box; the message names the image index and the box.
    """
    if targets is None:
        raise ValueError(
            "training mode needs targets: a list with one dict {'boxes': (N, 4) xyxy, 'labels': (N,)} per image; "
            "call model.eval() for inference"
        )
    if isinstance(targets, Mapping) or not isinstance(targets, Sequence):
        raise TypeError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != batch:
        raise ValueError(f"got {len(targets)} targets for a batch of {batch} images; give one dict per image")
    h, w = image_size
    out = []
    for i, t in enumerate(targets):
        if not isinstance(t, Mapping) or "boxes" not in t or "labels" not in t:
            keys = list(t) if isinstance(t, Mapping) else type(t).__name__
            raise ValueError(f"targets[{i}] must be a dict with 'boxes' (N, 4) and 'labels' (N,), got {keys}")
        boxes = torch.as_tensor(t["boxes"], device=device)
        labels = torch.as_tensor(t["labels"], device=device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] has shape {tuple(boxes.shape)}; expected (N, 4) xyxy pixels")
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"targets[{i}]['labels'] has shape {tuple(labels.shape)}; expected ({boxes.shape[0]},), one per box"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"targets[{i}]['labels'] has dtype {labels.dtype}; expected integer class indices")
        boxes = boxes.float()
        if not torch.isfinite(boxes).all():
            j = int((~torch.isfinite(boxes)).any(dim=1).nonzero()[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is not finite")
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            j = int(bad.nonzero()[0])
            raise ValueError(
                f"targets[{i}]['labels'][{j}] = {int(labels[j])} is outside [0, {num_classes}); "
                f"the model was built with num_classes={num_classes}"
            )
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            j = int(degenerate.nonzero()[0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} is degenerate: boxes are (x1, y1, x2, y2) "
                "pixels with x2 > x1 and y2 > y1"
            )
        clipped = clip_boxes_to_image(boxes, (h, w))
        outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        if outside.any():
            j = int(outside.nonzero()[0])
            raise ValueError(
                f"targets[{i}]['boxes'][{j}] = {boxes[j].tolist()} lies outside the {w}x{h} (WxH) image; "
                "boxes partly outside are clipped, boxes entirely outside must be removed"
            )
        labels = labels.long()
        if "ignore" in t:
            # Ignore regions (KAIST people / cyclist / person?, docs/detection.md) are not
            # positives: they leave the training targets here. torchvision's FCOS / RetinaNet
            # losses have no "don't care" region, so their locations train as background.
            ignore = torch.as_tensor(t["ignore"], device=clipped.device).reshape(-1).bool()
            if ignore.shape[0] != boxes.shape[0]:
                raise ValueError(
                    f"targets[{i}]['ignore'] has shape {tuple(ignore.shape)}; expected ({boxes.shape[0]},), one per box"
                )
            clipped, labels = clipped[~ignore], labels[~ignore]
        out.append({"boxes": clipped, "labels": labels})
    return out


# -- box-level fusion -------------------------------------------------------------------------
def _check_sets(detections: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if len(detections) == 0:
        raise ValueError("box fusion needs at least one detection set")
    for i, d in enumerate(detections):
        for key in ("boxes", "scores", "labels"):
            if key not in d:
                raise ValueError(f"detection set {i} has keys {sorted(d)}; expected boxes, scores, labels")
        n = d["boxes"].shape[0]
        if d["boxes"].dim() != 2 or d["boxes"].shape[1] != 4 or d["scores"].shape != (n,) or d["labels"].shape != (n,):
            raise ValueError(
                f"detection set {i}: boxes {tuple(d['boxes'].shape)}, scores {tuple(d['scores'].shape)}, "
                f"labels {tuple(d['labels'].shape)}; expected (N, 4), (N,), (N,)"
            )


def _union(detections: Sequence[Mapping[str, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Concatenate the sets: boxes ``(N, 4)``, scores ``(N,)``, labels ``(N,)``, source index ``(N,)``."""
    _check_sets(detections)
    # float32, or float64 when a set is float64 (parity checks compare in float64)
    dtype = torch.float64 if any(d["boxes"].dtype == torch.float64 for d in detections) else torch.float32
    boxes = torch.cat([d["boxes"].to(dtype) for d in detections])
    scores = torch.cat([d["scores"].to(dtype) for d in detections])
    labels = torch.cat([d["labels"].long() for d in detections])
    source = torch.cat([torch.full((d["boxes"].shape[0],), i, dtype=torch.long) for i, d in enumerate(detections)])
    return boxes, scores, labels, source.to(boxes.device)


def _empty_like(boxes: torch.Tensor) -> Detections:
    return {"boxes": boxes.new_zeros(0, 4), "scores": boxes.new_zeros(0), "labels": torch.zeros(0, dtype=torch.long, device=boxes.device)}


def _finish(boxes: list[torch.Tensor], scores: list[float], labels: list[int], like: torch.Tensor, max_detections: int) -> Detections:
    if not boxes:
        return _empty_like(like)
    out_scores = torch.tensor(scores, dtype=like.dtype, device=like.device)
    order = torch.argsort(out_scores, descending=True, stable=True)[:max_detections]
    return {
        "boxes": torch.stack(boxes)[order],
        "scores": out_scores[order],
        "labels": torch.tensor(labels, dtype=torch.long, device=like.device)[order],
    }


def nms_fusion(
    detections: Sequence[Mapping[str, torch.Tensor]], iou_thresh: float = 0.5, max_detections: int = 100
) -> Detections:
    """Class-wise NMS over the union of several detection sets of one image.

    Args:
        detections: ``S`` dicts with ``boxes`` ``(N_s, 4)``, ``scores`` ``(N_s,)``, ``labels`` ``(N_s,)``.
        iou_thresh: boxes of the same class overlapping a kept box by more than this are dropped.
        max_detections: keep at most this many, highest scores first.

    Returns:
        One set: ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``, ``labels`` ``(N,)``, sorted by score.
    """
    boxes, scores, labels, _ = _union(detections)
    keep = batched_nms(boxes, scores, labels, iou_thresh)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def weighted_boxes_fusion(
    detections: Sequence[Mapping[str, torch.Tensor]],
    iou_thresh: float = 0.55,
    weights: Sequence[float] | None = None,
    skip_thresh: float = 0.0,
    max_detections: int = 100,
) -> Detections:
    """Weighted boxes fusion (Solovyev et al. 2021, Sec. 3) of several detection sets of one image.

    Per class, boxes are visited by decreasing score (score times its detector's weight). A box
    joins the cluster whose current fused box it overlaps most with IoU above ``iou_thresh``, or
    starts a new cluster. A cluster's fused box is the score-weighted mean of its boxes and its
    score the mean of its scores; at the end the score is multiplied by
    ``min(T, S) / sum(weights)`` (``T`` boxes in the cluster, ``S`` detectors), so a box that few
    detectors found loses confidence.

    Args:
        detections: ``S`` dicts with ``boxes`` ``(N_s, 4)``, ``scores`` ``(N_s,)``, ``labels`` ``(N_s,)``.
        iou_thresh: clustering IoU (0.55 in the paper).
        weights: one weight per detector (default all 1).
        skip_thresh: boxes scoring below this are ignored.
        max_detections: keep at most this many, highest scores first.

    Returns:
        One set: ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``, ``labels`` ``(N,)``, sorted by score.
    """
    boxes, scores, labels, source = _union(detections)
    w = torch.ones(len(detections)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (len(detections),) or (w <= 0).any():
        raise ValueError(f"weights must be {len(detections)} positive numbers (one per detection set), got {weights}")
    scores = scores * w.to(scores.device)[source]
    keep = scores >= skip_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    out_boxes, out_scores, out_labels = [], [], []
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        members: list[list[int]] = []
        fused: list[torch.Tensor] = []
        for i in idx.tolist():
            if fused:
                ious = box_iou(boxes[i : i + 1], torch.stack(fused))[0]
                best = int(ious.argmax())
                if ious[best] > iou_thresh:
                    members[best].append(i)
                    s = scores[members[best]]
                    fused[best] = (s[:, None] * boxes[members[best]]).sum(0) / s.sum()
                    continue
            members.append([i])
            fused.append(boxes[i].clone())
        for cluster, box in zip(members, fused):
            s = scores[cluster]
            out_boxes.append(box)
            out_scores.append(float(s.mean()) * min(len(cluster), len(detections)) / float(w.sum()))
            out_labels.append(int(label))
    return _finish(out_boxes, out_scores, out_labels, boxes, max_detections)


def bayes_fuse_scores(scores: torch.Tensor, prior: float = 0.5) -> torch.Tensor:
    """ProbEn's score fusion for ``S`` conditionally independent detectors of one object.

    With ``p_s = p(object | x_s)`` and class prior ``pi``, Bayes' rule gives posterior odds
    ``prod_s odds(p_s) / odds(pi)^(S - 1)`` (ECCV 2022, Eq. 3 for two classes: object and
    background); ``pi = 0.5`` (a uniform prior, the paper's default) gives
    ``prod p_s / (prod p_s + prod (1 - p_s))``.

    Args:
        scores: ``(S,)`` probabilities in [0, 1] (clamped to [1e-6, 1 - 1e-6] for the logs).
        prior: ``pi`` in (0, 1).

    Returns:
        The fused probability, a 0-dim tensor.
    """
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    p = scores.double().clamp(1e-6, 1 - 1e-6)
    logit = (torch.log(p) - torch.log1p(-p)).sum() - (p.numel() - 1) * torch.logit(torch.tensor(prior, dtype=torch.float64))
    return torch.sigmoid(logit).to(scores.dtype)


def bayes_fuse_distributions(probs: torch.Tensor) -> torch.Tensor:
    """ProbEn's multi-class score fusion (ECCV 2022, Sec. 3) with a uniform class prior.

    Each row is one detector's class posterior ``p(y | x_s)`` over ``K`` object classes; the
    background gets the rest, ``1 - sum_k p_k``. Under conditional independence and a uniform
    prior over the ``K + 1`` outcomes, ``p(y | x_1..x_S) ∝ prod_s p(y | x_s)``.

    Args:
        probs: ``(S, K)`` class probabilities (each row summing to at most 1).

    Returns:
        ``(K + 1,)`` fused posterior, background last.
    """
    full = torch.cat([probs, 1 - probs.sum(1, keepdim=True)], 1)  # (S, K + 1)
    return torch.softmax(torch.log(full).sum(0), 0)  # normalised product, computed in log space


PROBEN_SCORE_FUSIONS = ("proben", "avg", "max")
PROBEN_BOX_FUSIONS = ("v-avg", "s-avg", "avg", "argmax")


def _iou_one(box: torch.Tensor, boxes: torch.Tensor, offset: float) -> torch.Tensor:
    """IoU of ``box`` ``(4,)`` with ``boxes`` ``(M, 4)``; ``offset = 1`` is the pixel-inclusive
    convention (width ``x2 - x1 + 1``) of the ProbEn code's NMS, ``0`` torchvision's."""
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt + offset).clamp_min(0).prod(1)
    area = (box[2:] - box[:2] + offset).prod()
    areas = (boxes[:, 2:] - boxes[:, :2] + offset).prod(1)
    return inter / (area + areas - inter)


def _set_key(detections: Sequence[Mapping[str, torch.Tensor]], key: str, columns: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """The union of an optional per-box key, ``(N, K)`` with ``columns`` (``probs``, one ``K`` for
    all sets) else ``(N,)`` (``vars``); it must be in every set or in none."""
    has = [key in d for d in detections]
    if not any(has):
        return None
    if not all(has):
        raise ValueError(f"'{key}' is in detection sets {[i for i, h in enumerate(has) if h]} but not in all "
                         f"{len(detections)}; give it for every set or for none")
    values = [torch.as_tensor(d[key]).to(dtype) for d in detections]
    width = max((v.shape[-1] for v in values if v.dim() == 2 and v.shape[0]), default=0)
    for i, (d, value) in enumerate(zip(detections, values)):
        n = d["boxes"].shape[0]
        expected = (n, width) if columns else (n,)
        if value.shape != expected and not (columns and n == 0 and value.numel() == 0):
            raise ValueError(f"detection set {i}: '{key}' has shape {tuple(value.shape)}; expected {expected}"
                             + (" (one class-probability row per box, K the same in every set)" if columns else ", one per box"))
    return torch.cat([v.reshape(-1, width) if columns else v for v in values])


def proben_fusion(
    detections: Sequence[Mapping[str, torch.Tensor]],
    iou_thresh: float = 0.5,
    score_fusion: str = "proben",
    box_fusion: str = "s-avg",
    prior: float | None = None,
    one_per_detector: bool = False,
    iou_offset: float = 1.0,
    max_detections: int = 100,
) -> Detections:
    """ProbEn (Chen et al., ECCV 2022, Sec. 3): probabilistic ensembling of detectors.

    The defaults reproduce the authors' released late-fusion code on the same detection sets
    (``tools/parity/proben.py``, docs/published.md "ProbEn"): per class, the highest-scoring
    remaining box and every remaining box overlapping it with IoU above ``iou_thresh``
    (pixel-inclusive IoU, ``iou_offset=1``) form a cluster; a cluster of one box keeps it
    unchanged; otherwise its score and box are fused from all its members:

    - ``score_fusion="proben"``: Bayes' rule under conditional independence. With ``probs``
      (class posteriors ``(N, K)``, background ``1 - sum``) :func:`bayes_fuse_distributions`,
      the label becoming the fused argmax; without them the binary form
      :func:`bayes_fuse_scores` of the scores, under ``prior`` (``None`` = uniform, 0.5).
      ``"avg"``: the mean score; ``"max"``: the largest member probability (of any class when
      ``probs`` are given, as the authors' code takes it), the label the top box's.
    - ``box_fusion``: ``"s-avg"`` score-weighted mean, ``"v-avg"`` inverse-variance weighted
      mean (needs ``vars`` ``(N,)``), ``"avg"`` plain mean, ``"argmax"`` the top box.
      ``score_fusion="max"`` with ``box_fusion="argmax"`` is class-wise NMS (torchvision IoU),
      as the authors' code runs it.

    When fewer than two sets hold boxes, the non-empty one is returned as it is (the authors'
    code fuses only when two detectors fired on the image). Where the fused multi-class
    posterior is highest for background, the authors' code emits the box labelled ``K``
    (no object class); here it keeps the most probable object class and its fused probability.

    Args:
        detections: ``S`` dicts with ``boxes`` ``(N_s, 4)``, ``scores`` ``(N_s,)`` probabilities,
            ``labels`` ``(N_s,)``, optionally ``probs`` ``(N_s, K)`` and ``vars`` ``(N_s,)``
            (in every set or in none).
        iou_thresh: clustering IoU (0.5 in the authors' code).
        score_fusion: ``"proben"``, ``"avg"`` or ``"max"``.
        box_fusion: ``"s-avg"``, ``"v-avg"``, ``"avg"`` or ``"argmax"``.
        prior: object prior ``pi`` of the binary form (detections without ``probs``); ``None``
            is the uniform prior of the authors' code.
        one_per_detector: only each detector's best box in a cluster is fused (the
            independence assumption holds across detectors, not across one detector's
            duplicates); the authors' code fuses every member.
        iou_offset: 1 for the authors' pixel-inclusive IoU, 0 for continuous coordinates.
        max_detections: keep at most this many, highest scores first.

    Returns:
        One set: ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``, ``labels`` ``(N,)``, sorted by score.
    """
    if score_fusion not in PROBEN_SCORE_FUSIONS:
        raise ValueError(f"score_fusion={score_fusion!r}; choose one of {PROBEN_SCORE_FUSIONS}")
    if box_fusion not in PROBEN_BOX_FUSIONS:
        raise ValueError(f"box_fusion={box_fusion!r}; choose one of {PROBEN_BOX_FUSIONS}")
    if prior is not None and not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1) or None (uniform), got {prior}")
    boxes, scores, labels, source = _union(detections)
    probs = _set_key(detections, "probs", True, boxes.dtype)
    variances = _set_key(detections, "vars", False, boxes.dtype)
    if probs is not None and prior is not None:
        raise ValueError("prior applies to the binary form (detection sets without 'probs'); with 'probs' "
                         "the fusion assumes the uniform prior of the authors' code: pass prior=None")
    if box_fusion == "v-avg" and variances is None:
        raise ValueError("box_fusion='v-avg' weights boxes by 1 / variance: every detection set needs 'vars' (N,)")
    fired = [d for d in detections if d["boxes"].shape[0]]
    if len(fired) < 2:  # nothing to ensemble: the one detector that fired (or none) as it is
        only = {k: fired[0][k] for k in ("boxes", "scores", "labels")} if fired else _empty_like(boxes)
        order = torch.argsort(only["scores"], descending=True, stable=True)[:max_detections]
        return {"boxes": only["boxes"].to(boxes.dtype)[order], "scores": only["scores"].to(boxes.dtype)[order],
                "labels": only["labels"].long()[order]}
    if score_fusion == "max" and box_fusion == "argmax":
        return nms_fusion(detections, iou_thresh, max_detections)
    out_boxes, out_scores, out_labels = [], [], []
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        while idx.numel():
            in_cluster = _iou_one(boxes[idx[0]], boxes[idx], iou_offset) > iou_thresh
            in_cluster[0] = True
            cluster = idx[in_cluster]  # sorted by score: the top box first
            idx = idx[~in_cluster]
            if one_per_detector:
                best: dict[int, int] = {}
                for i in cluster.tolist():
                    best.setdefault(int(source[i]), i)  # a source's first box is its best
                cluster = torch.tensor(list(best.values()), device=boxes.device)
            top = int(cluster[0])
            if cluster.numel() == 1:
                out_boxes.append(boxes[top])
                out_scores.append(float(scores[top]))
                out_labels.append(int(label))
                continue
            s, fused_label = scores[cluster], int(label)
            if score_fusion == "proben" and probs is not None:
                posterior = bayes_fuse_distributions(probs[cluster])  # (K + 1,), background last
                fused_label = int(posterior.argmax())
                if fused_label == probs.shape[1]:  # background won: keep the best object class
                    fused_label = int(posterior[:-1].argmax())
                fused_score = float(posterior[fused_label])
            elif score_fusion == "proben":
                fused_score = float(bayes_fuse_scores(s, 0.5 if prior is None else prior))
            elif score_fusion == "avg":
                fused_score = float(s.mean())
            else:
                fused_score = float((probs[cluster] if probs is not None else s).max())
            if box_fusion == "argmax":
                box = boxes[top]
            else:
                w = s if box_fusion == "s-avg" else torch.ones_like(s) if box_fusion == "avg" else 1 / variances[cluster]
                box = (w[:, None] * boxes[cluster]).sum(0) / w.sum()
            out_boxes.append(box)
            out_scores.append(fused_score)
            out_labels.append(fused_label)
    return _finish(out_boxes, out_scores, out_labels, boxes, max_detections)


BOX_FUSIONS = {"nms": nms_fusion, "wbf": weighted_boxes_fusion, "proben": proben_fusion}
