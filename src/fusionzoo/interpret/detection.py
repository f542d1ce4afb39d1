"""The Grad-CAM score of detectors (:class:`DetectionScore`).

Everything else the interpretation suite measures works on taps and the task protocol
(:mod:`fusionzoo.tasks`) and needs no detection code: contribution in COCO AP is the detection
task's evaluator, semantic variance on box masks is
:func:`fusionzoo.interpret.semantic_variance.box_masks`, object rows for CKA
:func:`fusionzoo.interpret.cka.object_rows`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torchvision.ops import box_iou

from ..weights import unwrap_model

# The one place interpret reaches into a model class: the box heads whose detections the score

__all__ = ["DetectionScore"]

Detections = dict[str, torch.Tensor]


class DetectionScore:
    """The scalar a detector's Grad-CAM explains: its evidence for its own top detections.

    Definition. In each image take the ``top_k`` highest-scoring detections of the model's final
    (fused) output, of class ``target_class`` only when given. For each such detection ``d``
    (box ``b``, label ``c``) and each box head ``h`` of the model (``model.head_detections``
    after the forward: one for early and middle fusion, one per modality for late fusion, the
    fused one plus one per modality for hybrid fusion),
    take ``h``'s detection of class ``c`` with the highest IoU with ``b``, if that IoU is at least
    ``iou_thresh``; the score is the sum of those heads' detection scores over all selected
    detections and images. With one head this is exactly the sum of the top detections' own
    scores. With several it still has a gradient when the box-fusion rule does not (WBF and
    ProbEn rebuild scores as Python floats), and it credits each modality's detector with its own
    evidence for the object, which is what a per-modality Grad-CAM should show.

    Models without ``head_detections`` are scored on their output's own ``scores``.

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
        self._model: nn.Module | None = None

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[DetectionScore]:
        """Score forward passes of ``model`` inside the block: each box head's detections are the
        model's ``head_detections`` after its eval forward (the detector contract, see
        ``fusionzoo.detection.models.DetectorMixin``)."""
        num_classes = getattr(model, "num_classes", None)
        if self.target_class is not None and num_classes is not None and not 0 <= self.target_class < int(num_classes):
            raise ValueError(f"target_class {self.target_class} is outside [0, {num_classes})")
        self._model = unwrap_model(model)
        try:
            with warnings.catch_warnings():
                # WBF / ProbEn turn fused scores into floats; harmless here (the heads carry the gradient)
                warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
                yield self
        finally:
            self._model = None

    def __call__(self, output: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """The score of one forward pass's eval output (``B`` detection dicts)."""
        if not isinstance(output, (list, tuple)):
            raise TypeError(f"DetectionScore takes a detector's eval output (a list of dicts), got {type(output).__name__}")
        # Per-head detections of this forward pass (set by every eval forward), else the output alone.
        per_head = getattr(self._model, "head_detections", None) if self._model is not None else None
        heads = list(per_head.values()) if per_head else [list(output)]
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

