"""Segmentation metrics from one confusion matrix accumulated over a whole dataset.

Accumulating the confusion matrix (rather than averaging per-image IoU) is the protocol of the
benchmarks we report against (NYUDv2/MFNet evaluations in ESANet, CMX, RTFNet): IoU of class k is
``TP_k / (TP_k + FP_k + FN_k)`` over all pixels of the split; classes that never occur in either
prediction or ground truth are left out of the mean (NaN in the per-class list).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["ConfusionMatrix"]


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
            pred = pred.argmax(1)
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
        import torch.distributed as dist

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
