"""Semantic variance of every spatial tap (:class:`fusionzoo.interpret.semantic_variance.SemanticVariance`)
as a run metric, on the batches' masks or on ground-truth boxes painted into masks."""

from __future__ import annotations

from typing import Any

import torch

from ..semantic_variance import SemanticVariance, box_masks
from .base import BatchContext, MetricAccumulator, Needs, RunSpec

__all__ = ["SemanticVarianceMetric"]


class SemanticVarianceMetric(MetricAccumulator):
    """Section: tap -> :class:`~fusionzoo.interpret.semantic_variance.SemanticVarianceResult`
    fields. Settings: ``sv_labels`` (the label source used: ``"mask"``, ``"boxes"`` or
    ``"none"``) and, on boxes, ``box_background`` (the background class index)."""

    name = "semantic_variance"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.needs = Needs(taps=tuple(spec.plan.spatial))
        self.source: str | None = None  # decided on the first batch
        self.accs: dict[str, SemanticVariance] = {}

    def _start(self, batch: BatchContext) -> None:
        spec = self.spec
        self.source = spec.sv_labels if spec.sv_labels != "auto" else (
            "mask" if batch.mask is not None else "boxes" if batch.boxes() is not None else "none")
        n = spec.box_classes + 1 if self.source == "boxes" else spec.label_classes
        self.accs = {t: SemanticVariance(n, spec.ignore_index, spec.purity, stride=spec.sv_stride)
                     for t in spec.plan.spatial}
        self.settings["sv_labels"] = self.source
        if self.source == "boxes":
            self.settings["box_background"] = spec.box_classes
        else:
            self.settings.pop("box_background", None)

    def _labels(self, batch: BatchContext) -> torch.Tensor | None:
        if self.source == "mask":
            return batch.mask
        if self.source == "boxes":
            boxes = batch.boxes()
            if boxes is not None:
                return box_masks([t["boxes"] for t in boxes], [t["labels"] for t in boxes], batch.size,
                                 background=self.spec.box_classes,
                                 ignore_index=self.spec.ignore_index).to(self.spec.device)
        return None

    def update(self, batch: BatchContext) -> None:
        if not self.spec.plan.spatial:
            return
        if self.source is None:
            self._start(batch)
        labels = self._labels(batch)
        if labels is None and self.source != "none" and self.skipped is None:
            self.skipped = (f"batch {batch.index} has no {self.source} (sv_labels={self.spec.sv_labels!r}); "
                            "semantic variance needs it in every batch")
        if labels is not None:
            for n, acc in self.accs.items():
                acc.update(batch.acts[n], labels)

    def compute(self) -> dict[str, Any] | None:
        if self.source == "none":
            self.skipped = "the batches carry neither masks nor boxes"
        if not self.accs or self.skipped is not None:
            return None
        return {n: acc.compute().to_dict() for n, acc in self.accs.items()}
