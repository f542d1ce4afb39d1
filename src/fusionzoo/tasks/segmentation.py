"""Semantic segmentation as a :class:`~fusionzoo.tasks.base.Task`: cross-entropy on ``batch["mask"]``,
single-scale or multi-scale + flip prediction, and mIoU from one confusion matrix.

Metrics come from one confusion matrix accumulated over a whole dataset.

Accumulating the confusion matrix (rather than averaging per-image IoU) is the protocol of the
benchmarks we report against (NYUDv2/MFNet evaluations in ESANet, CMX, RTFNet): IoU of class k is
``TP_k / (TP_k + FP_k + FN_k)`` over all pixels of the split; classes that never occur in either
prediction or ground truth are left out of the mean (NaN in the per-class list).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..losses import segmentation_loss
from ..weights import unwrap_model
from .base import Evaluator, Task, gate_penalty_term, register_task

__all__ = ["ConfusionMatrix", "SegmentationEvaluator", "SegmentationTask", "class_map", "predict"]


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """``(B, K, H, W)`` logits -> ``(B, H, W)`` class ids, the first maximal class as ``argmax(1)``
    gives. ``max(1).indices``: on a CPU ``argmax(1)`` reduces the strided class dimension one
    element at a time, 7x slower at K = 5 (5.2 against 0.7 ms at 8 x 64 x 80), and the
    interpretation passes take it several times per pass."""
    return logits.max(1).indices


class ConfusionMatrix:
    """Streaming ``K x K`` confusion matrix (rows = ground truth, columns = prediction).

    Args:
        num_classes: ``K``.
        ignore_index: label value excluded from every count (255 in all our datasets).

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(logits.argmax(1), mask)   # (B, H, W) each
        >>> cm.compute()["miou"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # int64: 480x640 images overflow int32 after ~7000 images of one class.
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: predicted class ids ``(B, H, W)`` (or logits ``(B, K, H, W)``, arg-maxed here).
            target: ground-truth ids ``(B, H, W)``; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: shapes differ, or a target/prediction id is outside ``[0, K)`` (other than
                the ignore index).
        """
        if pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} classes, the metric expects {self.num_classes}")
            pred = class_map(pred)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        pred = pred.reshape(-1).to(torch.int64)
        target = target.reshape(-1).to(torch.int64)
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() == 0:
            return
        k = self.num_classes
        if int(target.min()) < 0 or int(target.max()) >= k:
            bad = target[(target < 0) | (target >= k)].unique()[:10].tolist()
            raise ValueError(
                f"target ids {bad} are outside [0, {k}) and are not the ignore index {self.ignore_index}"
            )
        if int(pred.min()) < 0 or int(pred.max()) >= k:
            raise ValueError(f"predicted ids must be in [0, {k}), got range [{int(pred.min())}, {int(pred.max())}]")
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.matrix += counts.cpu()

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks (no-op when torch.distributed is not initialized)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # NCCL needs the tensor on this rank's GPU; gloo reduces on CPU.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = self.matrix.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.matrix = t.cpu()

    def compute(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """Metrics of everything accumulated so far.

        Returns:
            ``miou``, ``pixel_acc``, ``mean_acc`` (floats in [0, 1]; NaN if nothing was counted),
            ``iou`` and ``acc`` (per-class lists, NaN for classes absent from both ground truth and
            prediction / absent from ground truth), ``present`` (classes counted in the means), and
            ``per_class`` (name -> IoU) when ``class_names`` is given.
        """
        m = self.matrix.to(torch.float64)
        tp = m.diag()
        gt = m.sum(1)
        pr = m.sum(0)
        union = gt + pr - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
        total = m.sum()
        out: dict[str, Any] = {
            "miou": _nanmean(iou),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": _nanmean(acc),
            "iou": iou.tolist(),
            "acc": acc.tolist(),
            "present": int((union > 0).sum()),
            "pixels": int(total),
        }
        if class_names is not None:
            if len(class_names) != self.num_classes:
                raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
            out["per_class"] = dict(zip(class_names, out["iou"]))
        return out


def _nanmean(x: torch.Tensor) -> float:
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if keep.any() else math.nan


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    missing: Sequence[str] = (),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities ``(B, K, H, W)``, averaged over scales and horizontal flips.

    Multi-scale + flip test-time augmentation as in the evaluation protocols of ESANet/CMX:
    every modality is resized by the same factor (bilinear; depth/thermal are continuous maps),
    logits are resized back to ``(H, W)`` and softmax probabilities are averaged.
    """
    h, w = next(iter(inputs.values())).shape[-2:]
    kwargs = {"missing": tuple(missing)} if missing else {}
    total = None
    n = 0
    for s in scales:
        if s == 1.0:
            scaled = dict(inputs)
        else:
            size = (max(round(h * s), 1), max(round(w * s), 1))
            scaled = {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in inputs.items()}
        for flipped in ((False, True) if flip else (False,)):
            x = {k: v.flip(-1) for k, v in scaled.items()} if flipped else scaled
            logits = model(x, **kwargs).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            prob = logits.softmax(1)
            total = prob if total is None else total + prob
            n += 1
    return total / n


class SegmentationEvaluator(Evaluator):
    """Confusion-matrix metrics plus the mean cross-entropy of the logits.

    ``update`` takes logits ``(B, K, H, W)`` (loss and metrics) or, under test-time augmentation,
    probabilities (``with_loss=False``: metrics only, ``loss`` is NaN).
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255,
                 with_loss: bool = True) -> None:
        self.matrix = ConfusionMatrix(num_classes, ignore_index)
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = ignore_index
        self.with_loss = with_loss
        self.loss_sum = torch.zeros((), dtype=torch.float64)
        self.loss_pixels = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, batch: Mapping[str, Any] | None = None,
               input_size: tuple[int, int] | None = None) -> None:
        if outputs.shape[-2:] != targets.shape[-2:]:
            raise ValueError(
                f"model returned logits of size {tuple(outputs.shape[-2:])} for a mask of "
                f"{tuple(targets.shape[-2:])}; segmentation models must predict at input size"
            )
        if self.with_loss:
            self.loss_sum += F.cross_entropy(outputs.float(), targets, ignore_index=self.ignore_index,
                                             reduction="sum").double().cpu()
            self.loss_pixels += int((targets != self.ignore_index).sum())
        self.matrix.update(class_map(outputs).cpu(), targets.cpu())

    def all_reduce(self) -> None:
        self.matrix.all_reduce()
        if self.with_loss and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([float(self.loss_sum), float(self.loss_pixels)], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            self.loss_sum, self.loss_pixels = t[0].cpu(), int(t[1])

    def compute(self) -> dict[str, Any]:
        """:meth:`ConfusionMatrix.compute` plus ``loss`` (mean cross-entropy per labelled pixel)."""
        out = self.matrix.compute(self.class_names)
        out["loss"] = float(self.loss_sum) / max(self.loss_pixels, 1) if self.with_loss else math.nan
        return out


@register_task
class SegmentationTask(Task):
    """Per-pixel classification: the model maps inputs to logits ``(B, K, H, W)`` at input size.

    The training loss is :func:`fusionzoo.losses.segmentation_loss`: cross-entropy of the main
    logits plus, for models that expose ``side_logits`` in training mode (ESANet, ACNet, SA-Gate),
    weighted side-output terms (deep supervision), resized by the model's ``side_logits_resize``
    rule.

    Args:
        ignore_index: label value excluded from loss and metrics.
        label_smoothing: of the training cross-entropy.
        class_weights: ``(K,)`` per-class loss weights (e.g. median frequency), or None.
        side_weights: one loss weight per side output (``model.side_strides`` order); None = the
            model's reference default ``model.side_loss_weights`` if it declares one (GeminiFusion),
            else deep supervision off (side outputs get an exact zero gradient).
        average: ``"weighted"`` (each term / summed class weights of its labelled pixels, ESANet,
            SA-Gate) or ``"pixels"`` (/ their count, ACNet).
        gate_penalty_weight: weight of the L0 penalty of models with purification gates (MIM,
            ``model.gate_penalty()``, added to the loss); None = the model's own default (MIM: 0.1).
    """

    name = "segmentation"
    metric = "miou"
    metric_label = "mIoU"
    per_class_key = "iou"
    target_key = "mask"
    default_rows = "sample"
    supports_tta = True

    supports_class_weights = True

    def __init__(self, ignore_index: int = 255, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                 side_weights: Sequence[float] | None = None, average: str = "weighted",
                 gate_penalty_weight: float | None = None) -> None:
        self.ignore_index = ignore_index
        self.gate_penalty_weight = gate_penalty_weight
        self.label_smoothing = label_smoothing
        self.class_weights = class_weights
        self.side_weights = tuple(side_weights) if side_weights is not None else None
        self.average = average

    def targets(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """``batch["mask"]`` ``(B, H, W)`` int64 on ``device``."""
        if "mask" not in batch:
            raise KeyError(f"segmentation needs a 'mask' (B, H, W) in every batch; this batch has {sorted(batch)}")
        return batch["mask"].to(device, non_blocking=True)

    def training_loss(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], targets: torch.Tensor,
                      missing: Sequence[str] = ()) -> torch.Tensor:
        logits = model(inputs, missing=tuple(missing)) if missing else model(inputs)
        plain = unwrap_model(model)
        # Side outputs (deep supervision): the model's side_logits of this training forward.
        # Loss in float32: the softmax over K classes is where half precision loses digits.
        sides = [s.float() for s in getattr(plain, "side_logits", ())]
        # A model whose reference loss always supervises its side outputs declares its default
        # weights (GeminiFusion: the ensemble detaches its inputs, so without them only alpha learns).
        side_weights = self.side_weights if self.side_weights is not None else getattr(plain, "side_loss_weights", None)
        loss = segmentation_loss(logits.float(), targets, side_logits=sides, side_weights=side_weights,
                                 class_weights=self.class_weights, ignore_index=self.ignore_index,
                                 label_smoothing=self.label_smoothing,
                                 side_resize=getattr(plain, "side_logits_resize", "nearest"), average=self.average)
        penalty = gate_penalty_term(plain, self.gate_penalty_weight)  # MIM's L0 term on its gates
        return loss if penalty is None else loss + penalty

    def predict(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], missing: Sequence[str] = (),
                **options: Any) -> torch.Tensor:
        """Logits ``(B, K, H, W)``; with ``tta=True`` the probabilities of :func:`predict` over
        ``tta_scales`` (default 0.75, 1, 1.25) and ``tta_flip`` (default True)."""
        if options.get("tta"):
            return predict(model, inputs, missing=missing, scales=tuple(options.get("tta_scales", (0.75, 1.0, 1.25))),
                           flip=bool(options.get("tta_flip", True)))
        return (model(inputs, missing=tuple(missing)) if missing else model(inputs)).float()

    def evaluator(self, num_classes: int, class_names: Sequence[str] | None = None, **options: Any) -> Evaluator:
        """A :class:`SegmentationEvaluator`; ``tta=True`` turns the loss off (outputs are probabilities)."""
        return SegmentationEvaluator(num_classes, class_names, self.ignore_index, with_loss=not options.get("tta"))

    def log_record(self, result: Mapping[str, Any]) -> dict[str, Any]:
        return {f"val_{k}": result[k] for k in ("miou", "pixel_acc", "mean_acc", "loss", "iou", "pixels")}
