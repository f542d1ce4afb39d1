"""Interpretation of detectors: AP-based modality contribution, the detection Grad-CAM score
and ground-truth targets of collated detection batches.

Everything else the interpretation suite measures works on taps and needs no detection code;
the detection-specific parts are small and live here (semantic variance on box masks is
:func:`fusionzoo.interpret.semantic_variance.box_masks`, object rows for CKA
:func:`fusionzoo.interpret.cka.object_rows`).

- **Contribution** (:class:`DetectionContributionAccumulator`): the segmentation machinery
  (:class:`~.contribution.ContributionAccumulator`: coalitions, removal policies, common random
  numbers, permutations, exact Shapley values) with COCO box AP as the value of a coalition.
  AP is not a sum over images, so it cannot be streamed like a confusion matrix: the
  accumulator keeps every pass's detections (boxes, scores, labels on the CPU) and runs
  pycocotools (:func:`fusionzoo.detection.metrics.coco_ap`) once per coalition at the end. With
  ``M`` modalities that is ``2^M + M + 1`` detection sets per image (7 for RGB-T), at most
  ``detections_per_img`` boxes each: small next to the images.
- **Grad-CAM score** (:class:`DetectionScore`): the detector's evidence for its own top
  detections, summed over its box heads (see the class docstring for the exact definition).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .contribution import ContributionAccumulator, ModalityStats

__all__ = ["DetectionContributionAccumulator", "DetectionScore", "detection_targets"]

Detections = dict[str, torch.Tensor]


def detection_targets(batch: Mapping[str, Any], num_classes: int | None = None) -> list[Detections]:
    """The ground truth of a collated detection batch, one dict per image, on the CPU.

    Args:
        batch: a collated batch with ``"boxes"`` (per image ``(N_i, 4)`` xyxy pixels) and
            ``"labels"`` (per image ``(N_i,)``), as ``fusionzoo.data.collate`` leaves them (lists).
        num_classes: when given, labels must lie in ``[0, num_classes)``.

    Returns:
        Per image ``{"boxes": (N_i, 4) float32, "labels": (N_i,) int64}``, plus ``"ignore"``
        ``(N_i,)`` bool when the batch carries ignore regions (KAIST's people / cyclist / person?):
        AP then scores them as COCO crowd regions, as the training evaluator does.

    Raises:
        KeyError: the batch has no ``boxes`` or ``labels``.
        ValueError: counts or shapes disagree, or a label is out of range (names the image).
    """
    if "boxes" not in batch or "labels" not in batch:
        raise KeyError(f"a detection batch needs 'boxes' and 'labels' (one tensor per image); got keys {list(batch)}")
    boxes, labels = batch["boxes"], batch["labels"]
    if len(boxes) != len(labels):
        raise ValueError(f"batch has {len(boxes)} box tensors and {len(labels)} label tensors; expected one of each per image")
    ignores = batch.get("ignore")
    if ignores is not None and len(ignores) != len(boxes):
        raise ValueError(f"batch has {len(ignores)} ignore tensors for {len(boxes)} images; expected one per image")
    out = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        b = torch.as_tensor(b).detach().float().cpu()
        lab = torch.as_tensor(lab).detach().cpu()
        if b.numel() == 0:
            b = b.reshape(0, 4)
        if b.dim() != 2 or b.shape[1] != 4 or lab.shape != (b.shape[0],):
            raise ValueError(f"image {i}: boxes {tuple(b.shape)} and labels {tuple(lab.shape)}; expected (N, 4) and (N,)")
        if lab.is_floating_point():
            raise ValueError(f"image {i}: labels have dtype {lab.dtype}; expected integer class indices")
        lab = lab.long()
        if num_classes is not None and lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(f"image {i}: labels {sorted(set(lab.tolist()))} are outside [0, {num_classes}); "
                             "the model's (or dataset's) num_classes must cover every label")
        target = {"boxes": b, "labels": lab}
        if ignores is not None:
            ignore = torch.as_tensor(ignores[i]).detach().cpu().bool()
            if ignore.shape != lab.shape:
                raise ValueError(f"image {i}: ignore flags {tuple(ignore.shape)} for labels {tuple(lab.shape)}; expected (N,)")
            target["ignore"] = ignore
        out.append(target)
    return out


def _to_cpu(d: Mapping[str, torch.Tensor]) -> Detections:
    return {k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")}


def _only(dets: Sequence[Mapping[str, torch.Tensor]], label: int) -> list[Detections]:
    out = []
    for d in dets:
        keep = d["labels"] == label
        out.append({k: v[keep] for k, v in d.items() if k in ("boxes", "scores", "labels")})
    return out


class DetectionContributionAccumulator(ContributionAccumulator):
    """:class:`~.contribution.ContributionAccumulator` with COCO box AP as the task metric.

    A coalition's value is ``coco_ap(detections of that pass, ground truth, num_classes)["AP"]``
    over every image seen (IoU 0.50:0.95, 101-point interpolation, 100 detections per image,
    categories without ground truth left out of the mean). Per-class values are the same
    evaluation restricted to one class (predictions and ground truth of that class only; nan for
    classes without ground truth), so their nan-mean is the overall AP. A coalition entry is
    ``{"ap", "ap50", "ap75", "ap_per_class", "ap50_per_class"}``; Shapley values, drops and the
    perceptual score are taken of ``"ap"`` (per class: ``"ap_per_class"``).

    The detections of every pass are stored (module docstring: they are small) because AP is
    computed over the whole dataset at once.

    Args:
        modalities: the model's modalities (players).
        num_classes: ``K``; AP categories are ``0..K-1``.
        policy, empty_policy, stats, perceptual, seed, device: as the base class.
    """

    metric = "AP"

    def __init__(self, modalities: Sequence[str], num_classes: int, policy: str = "zero",
                 empty_policy: str | None = None, stats: ModalityStats | None = None,
                 perceptual: bool = True, seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(modalities, num_classes, policy, empty_policy, stats, 255, perceptual, seed, device)

    def new_store(self) -> tuple[list[Detections], list[Detections]]:
        """``(predictions, targets)``, one dict per image seen."""
        return [], []

    def update_store(self, store: tuple[list[Detections], list[Detections]], output: Any, target: Any) -> None:
        """Add one pass: ``output`` the detector's eval output (``B`` dicts with ``boxes``,
        ``scores``, ``labels``), ``target`` the batch's :func:`detection_targets`."""
        if not isinstance(output, (list, tuple)) or len(output) != len(target):
            got = f"{len(output)} dicts" if isinstance(output, (list, tuple)) else type(output).__name__
            raise ValueError(f"expected the detector's eval output, one dict per image ({len(target)}), got {got}; "
                             "is the model in eval mode?")
        store[0].extend(_to_cpu(d) for d in output)
        store[1].extend(target)

    def summarize(self, store: tuple[list[Detections], list[Detections]]) -> dict[str, Any]:
        """AP, AP50, AP75 and per-class AP / AP50 of a store (nan everywhere without images)."""
        from ..detection.metrics import coco_ap

        preds, targets = store
        k = self.num_classes
        if not targets:
            return {"ap": math.nan, "ap50": math.nan, "ap75": math.nan, "ap_per_class": [math.nan] * k,
                    "ap50_per_class": [math.nan] * k}
        overall = coco_ap(preds, targets, num_classes=k)
        per, per50 = [], []
        for c in range(k):
            # one category at a time: COCOeval matches and accumulates per category, so this is
            # exactly that category's share of the mean (categories without ground truth: nan)
            r = coco_ap(_only(preds, c), _only(targets, c), num_classes=None)
            per.append(r["AP"])
            per50.append(r["AP50"])
        return {"ap": overall["AP"], "ap50": overall["AP50"], "ap75": overall["AP75"], "ap_per_class": per,
                "ap50_per_class": per50}

    def split_batch(self, batch: Mapping[str, Any], modalities: Sequence[str],
                    device: torch.device) -> tuple[dict[str, torch.Tensor], list[Detections]]:
        """``(inputs on device, detection_targets(batch))``."""
        missing = [m for m in modalities if m not in batch]
        if missing:
            raise KeyError(f"batch needs keys {list(modalities)}, 'boxes' and 'labels'; got {list(batch)}")
        return {m: batch[m].to(device) for m in modalities}, detection_targets(batch, self.num_classes)


class DetectionScore:
    """The scalar a detector's Grad-CAM explains: its evidence for its own top detections.

    Definition. In each image take the ``top_k`` highest-scoring detections of the model's final
    (fused) output, of class ``target_class`` only when given. For each such detection ``d``
    (box ``b``, label ``c``) and each box head ``h`` of the model (every
    :class:`~fusionzoo.detection.heads.BoxDetector` submodule: one for early and middle fusion,
    one per modality for late fusion, the fused one plus one per modality for hybrid fusion),
    take ``h``'s detection of class ``c`` with the highest IoU with ``b``, if that IoU is at least
    ``iou_thresh``; the score is the sum of those heads' detection scores over all selected
    detections and images. With one head this is exactly the sum of the top detections' own
    scores. With several it still has a gradient when the box-fusion rule does not (WBF and
    ProbEn rebuild scores as Python floats), and it credits each modality's detector with its own
    evidence for the object, which is what a per-modality Grad-CAM should show.

    Models without ``BoxDetector`` submodules are scored on their output's own ``scores``.

    Args:
        top_k: detections explained per image.
        target_class: explain detections of this class only (None: any class).
        iou_thresh: a head's box must overlap the detection this much to count.

    Attributes:
        selected: after a call, per image the explained detections ``{"boxes", "scores",
            "labels"}`` (detached, CPU).
    """

    def __init__(self, top_k: int = 1, target_class: int | None = None, iou_thresh: float = 0.5) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= iou_thresh <= 1.0:
            raise ValueError(f"iou_thresh must be in [0, 1], got {iou_thresh}")
        self.top_k, self.target_class, self.iou_thresh = int(top_k), target_class, float(iou_thresh)
        self.selected: list[Detections] = []
        self._heads: list[list[Detections]] | None = None

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[DetectionScore]:
        """Record each box head's detections during the forward pass inside the block."""
        num_classes = getattr(model, "num_classes", None)
        if self.target_class is not None and num_classes is not None and not 0 <= self.target_class < int(num_classes):
            raise ValueError(f"target_class {self.target_class} is outside [0, {num_classes})")
        from ..detection.heads import BoxDetector

        outputs: list[list[Detections]] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, list):  # eval output; training returns a loss dict
                outputs.append(output)

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, BoxDetector)]
        self._heads = outputs if handles else None
        try:
            with warnings.catch_warnings():
                # WBF / ProbEn turn fused scores into floats; harmless here (the heads carry the gradient)
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
                yield self
        finally:
            for h in handles:
                h.remove()

    def __call__(self, output: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """The score of one forward pass's eval output (``B`` detection dicts)."""
        from torchvision.ops import box_iou

        if not isinstance(output, (list, tuple)):
            raise TypeError(f"DetectionScore takes a detector's eval output (a list of dicts), got {type(output).__name__}")
        heads = self._heads if self._heads else [list(output)]
        self._heads = None  # one forward pass per watch
        total: torch.Tensor | None = None
        self.selected = []
        for i, det in enumerate(output):
            scores, labels, boxes = det["scores"].detach(), det["labels"], det["boxes"].detach()
            idx = torch.arange(scores.shape[0], device=scores.device)
            if self.target_class is not None:
                idx = idx[labels == self.target_class]
            idx = idx[torch.argsort(scores[idx], descending=True, stable=True)][: self.top_k]
            self.selected.append({"boxes": boxes[idx].cpu(), "scores": scores[idx].cpu(), "labels": labels[idx].cpu()})
            for j in idx.tolist():
                for head in heads:
                    hd = head[i]
                    same = (hd["labels"] == labels[j]).nonzero().flatten()
                    if same.numel() == 0:
                        continue
                    cand = hd["boxes"][same].detach()
                    # the IoU of a zero-area box is 0/0; the same box is still the same detection
                    iou = torch.nan_to_num(box_iou(boxes[j : j + 1], cand)[0], nan=0.0)
                    iou = torch.where((cand == boxes[j]).all(1), torch.ones_like(iou), iou)
                    best = int(iou.argmax())
                    if float(iou[best]) >= self.iou_thresh:
                        s = hd["scores"][same[best]]
                        total = s if total is None else total + s
        if total is None:  # nothing detected: a constant, no gradient, all-zero maps
            ref = output[0]["scores"] if len(output) else torch.zeros(())
            return ref.new_zeros(())
        return total

