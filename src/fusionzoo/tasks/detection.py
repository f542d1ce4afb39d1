"""Object detection as a :class:`~fusionzoo.tasks.base.Task`: box targets, the detector's own
loss dict, and COCO box AP (plus KAIST's log-average miss rate where the data has that protocol).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..detection.kaist import protocol_miss_rates
from ..detection.metrics import coco_ap
from ..weights import unwrap_model
from .base import Evaluator, Task, gate_penalty_term, register_task

__all__ = ["DetectionEvaluator", "DetectionTask", "detection_targets"]

Detections = dict[str, torch.Tensor]
PER_BOX_FLAGS = ("ignore", "occlusion")  # optional per-box fields (KAIST ignore regions, occlusion level)


def detection_targets(batch: Mapping[str, Any], device: torch.device | str = "cpu",
                      num_classes: int | None = None) -> list[Detections]:
    """The ground truth of a collated detection batch, one dict per image.

    Args:
        batch: a collated batch with ``"boxes"`` (per image ``(N_i, 4)`` xyxy pixels) and
            ``"labels"`` (per image ``(N_i,)``), as ``fusionzoo.data.collate`` leaves them (lists),
            optionally ``"ignore"`` / ``"occlusion"`` (per image ``(N_i,)``).
        device: where the tensors go.
        num_classes: when given, labels must lie in ``[0, num_classes)``.

    Returns:
        Per image ``{"boxes": (N_i, 4) float32, "labels": (N_i,) int64}`` plus ``"ignore"``
        ``(N_i,)`` bool and ``"occlusion"`` ``(N_i,)`` when the batch carries them (AP scores
        ignore regions as COCO crowd regions).

    Raises:
        KeyError: the batch has no ``boxes`` or ``labels``.
        ValueError: counts or shapes disagree, or a label is out of range (names the image).
    """
    if "boxes" not in batch or "labels" not in batch:
        raise KeyError(f"detection needs 'boxes' and 'labels' (one tensor per image) in every batch; "
                       f"this batch has {sorted(batch)}")
    boxes, labels = batch["boxes"], batch["labels"]
    if len(boxes) != len(labels):
        raise ValueError(f"batch has {len(boxes)} box tensors and {len(labels)} label tensors; expected one of each per image")
    flags = {k: batch[k] for k in PER_BOX_FLAGS if k in batch}
    for k, v in flags.items():
        if len(v) != len(boxes):
            raise ValueError(f"batch has {len(v)} {k} tensors for {len(boxes)} images; expected one per image")
    out = []
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        b = torch.as_tensor(b).detach().float()
        lab = torch.as_tensor(lab).detach()
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
        target = {"boxes": b.to(device), "labels": lab.to(device)}
        for k, v in flags.items():
            flag = torch.as_tensor(v[i]).detach()
            if flag.shape != lab.shape:
                raise ValueError(f"image {i}: {k} {tuple(flag.shape)} for labels {tuple(lab.shape)}; expected (N,)")
            target[k] = (flag.bool() if k == "ignore" else flag).to(device)
        out.append(target)
    return out


class DetectionEvaluator(Evaluator):
    """COCO box AP (pycocotools, :func:`fusionzoo.detection.metrics.coco_ap`) and, for datasets
    with a miss-rate protocol (KAIST, :mod:`fusionzoo.detection.kaist`), MR^-2 on boxes mapped
    back to the original frame.

    AP is not a sum over images: every pass's detections are kept (CPU) and, under
    torch.distributed, gathered to all ranks by :meth:`all_reduce` before :meth:`compute`.

    Args:
        num_classes: ``K``; AP categories are ``0..K-1``.
        per_class: also report ``ap_per_class`` and ``ap50_per_class`` (lists of ``K``): the
            same evaluation restricted to one category at a time (its predictions and ground
            truth only; nan for a category without ground truth), so their nan-mean is the
            overall AP. Modality contribution scores coalitions per class with them.
    """

    def __init__(self, num_classes: int, per_class: bool = False) -> None:
        self.num_classes = num_classes
        self.per_class = per_class
        self.predictions: list[Detections] = []
        self.targets: list[Detections] = []
        self.metas: list[Mapping[str, Any]] = []
        self.input_sizes: list[tuple[int, int]] = []

    def update(self, outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]],
               batch: Mapping[str, Any] | None = None, input_size: tuple[int, int] | None = None) -> None:
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} detection outputs for {len(targets)} images")
        for o, t in zip(outputs, targets):
            self.predictions.append({"boxes": o["boxes"].detach().float().cpu(), "scores": o["scores"].detach().float().cpu(),
                                     "labels": o["labels"].detach().long().cpu()})
            self.targets.append({k: v.cpu() for k, v in t.items()})
        metas = (batch or {}).get("meta") or [{}] * len(targets)
        self.metas.extend(metas)
        self.input_sizes.extend([tuple(input_size) if input_size is not None else (0, 0)] * len(targets))

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.predictions, self.targets, self.metas, self.input_sizes))
            self.predictions = [p for part in gathered for p in part[0]]
            self.targets = [g for part in gathered for g in part[1]]
            self.metas = [m for part in gathered for m in part[2]]
            self.input_sizes = [z for part in gathered for z in part[3]]

    def compute(self) -> dict[str, Any]:
        """``ap`` (AP at IoU 0.50:0.95), ``ap50``, ``ap75``, ``coco`` (all twelve
        COCO numbers), ``images``; with ``per_class`` also ``ap_per_class`` and ``ap50_per_class``;
        for KAIST also ``mr2``, ``mr2_day`` and ``mr2_night``."""
        res = coco_ap(self.predictions, self.targets, num_classes=self.num_classes)
        out = {"ap": res["AP"], "ap50": res["AP50"], "ap75": res["AP75"], "coco": res,
               "images": len(self.predictions)}
        if self.per_class:
            per = [coco_ap(_only(self.predictions, c), _only(self.targets, c), num_classes=None)
                   for c in range(self.num_classes)]
            out["ap_per_class"] = [r["AP"] for r in per]
            out["ap50_per_class"] = [r["AP50"] for r in per]
        return {**out, **protocol_miss_rates(self.predictions, self.targets, self.metas, self.input_sizes)}


def _only(dets: Sequence[Mapping[str, torch.Tensor]], label: int) -> list[Detections]:
    """The boxes of class ``label`` of every image. COCOeval matches and accumulates per category,
    so AP over these is exactly that category's share of the mean."""
    out = []
    for d in dets:
        keep = d["labels"] == label
        out.append({k: v[keep] for k, v in d.items() if k in ("boxes", "scores", "labels")})
    return out


@register_task
class DetectionTask(Task):
    """Boxes and labels: ``model(inputs, targets)`` returns the detector's loss dict in training
    mode, ``model(inputs)`` per-image ``{"boxes", "scores", "labels"}`` in eval mode.

    Args:
        gate_penalty_weight: weight of the L0 penalty of detectors with purification gates (MIM,
            ``model.gate_penalty()``, added to the summed loss dict); None = the model's default (0.1).
        **options: segmentation's loss settings, refused (a detector computes its own loss).
    """

    name = "detection"
    metric = "ap"
    metric_label = "box AP"
    per_class_key = "ap_per_class"
    target_key = "boxes"
    default_rows = "object"
    supports_tta = False

    def __init__(self, gate_penalty_weight: float | None = None, **options: Any) -> None:
        self.gate_penalty_weight = gate_penalty_weight
        if options:  # loss settings of segmentation (label_smoothing, class_weights, side_weights, ...)
            raise ValueError(f"{', '.join(sorted(options))} apply to segmentation; a detector computes its own "
                             "loss: leave them at their defaults")

    def targets(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> list[Detections]:
        return detection_targets(batch, device)

    def training_loss(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], targets: list[Detections],
                      missing: Sequence[str] = ()) -> torch.Tensor:
        losses = model(inputs, targets, missing=tuple(missing)) if missing else model(inputs, targets)
        loss = sum(v.float() for v in losses.values())
        penalty = gate_penalty_term(unwrap_model(model), self.gate_penalty_weight)  # MIM's L0 term on its gates
        return loss if penalty is None else loss + penalty

    def predict(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], missing: Sequence[str] = (),
                **options: Any) -> list[Detections]:
        if options.get("tta"):
            raise ValueError("tta (multi-scale + flip) is implemented for segmentation only")
        return model(inputs, missing=tuple(missing)) if missing else model(inputs)

    def evaluator(self, num_classes: int, class_names: Sequence[str] | None = None, **options: Any) -> Evaluator:
        """A :class:`DetectionEvaluator`; ``per_class=True`` adds per-category AP."""
        return DetectionEvaluator(num_classes, per_class=bool(options.get("per_class", False)))

    def log_record(self, result: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("ap", "ap50", "ap75", "images", *sorted(k for k in result if k.startswith("mr2")))
        return {f"val_{k}": result[k] for k in keys}
