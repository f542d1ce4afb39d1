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
- :func:`proben_fusion`: ProbEn (Chen, Li, Kong, Ramanan, "Multimodal Object Detection via
  Probabilistic Ensembling", ECCV 2022, Sec. 3): NMS-style clusters whose scores are fused by
  Bayes' rule under conditional independence of the modalities given the class
  (``p(y | x_1, x_2) ∝ p(y | x_1) p(y | x_2) / p(y)``), boxes by score-weighted averaging.
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
    boxes = torch.cat([d["boxes"].float() for d in detections])
    scores = torch.cat([d["scores"].float() for d in detections])
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


def proben_fusion(
    detections: Sequence[Mapping[str, torch.Tensor]],
    iou_thresh: float = 0.5,
    prior: float = 0.5,
    max_detections: int = 100,
) -> Detections:
    """ProbEn (Chen et al., ECCV 2022, Sec. 3): probabilistic ensembling of detectors.

    Per class, the highest-scoring remaining box and every remaining box overlapping it with
    IoU above ``iou_thresh`` form a cluster (as in NMS). From each detector only its
    highest-scoring box in the cluster counts: the independence assumption is across detectors
    (modalities), not across one detector's duplicates. The cluster's score is
    :func:`bayes_fuse_scores` of those boxes (one detector alone keeps its score: the absent
    detector is uninformative), its box the score-weighted mean of them (the paper's "s-avg").

    Args:
        detections: ``S`` dicts with ``boxes`` ``(N_s, 4)``, ``scores`` ``(N_s,)`` probabilities,
            ``labels`` ``(N_s,)``.
        iou_thresh: clustering IoU (0.5 in the paper's code).
        prior: class prior ``pi`` of :func:`bayes_fuse_scores`.
        max_detections: keep at most this many, highest scores first.

    Returns:
        One set: ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``, ``labels`` ``(N,)``, sorted by score.
    """
    boxes, scores, labels, source = _union(detections)
    out_boxes, out_scores, out_labels = [], [], []
    for label in labels.unique().tolist():
        idx = (labels == label).nonzero().flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        while idx.numel():
            ious = box_iou(boxes[idx[:1]], boxes[idx])[0]
            in_cluster = ious > iou_thresh
            in_cluster[0] = True
            cluster = idx[in_cluster]  # sorted by score, so the first box of a source is its best
            best: dict[int, int] = {}
            for i in cluster.tolist():
                best.setdefault(int(source[i]), i)
            chosen = torch.tensor(list(best.values()), device=boxes.device)
            s = scores[chosen]
            out_boxes.append((s[:, None] * boxes[chosen]).sum(0) / s.sum().clamp_min(1e-12))
            out_scores.append(float(bayes_fuse_scores(s, prior)))
            out_labels.append(int(label))
            idx = idx[~in_cluster]
    return _finish(out_boxes, out_scores, out_labels, boxes, max_detections)


BOX_FUSIONS = {"nms": nms_fusion, "wbf": weighted_boxes_fusion, "proben": proben_fusion}
