"""Semantic variance of every spatial tap (:class:`fusionzoo.interpret.semantic_variance.SemanticVariance`)
as a run metric, on the batches' masks or on ground-truth boxes painted into masks: the trace form
``sv`` and the whitened form ``sv_whitened`` from one set of streamed statistics, with
block-bootstrap intervals (:mod:`.blocks`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...engine.distributed import all_gather_objects, all_reduce_sum_
from ..semantic_variance import WHITENED_RIDGE, SemanticVariance, box_masks
from . import blocks as _blocks
from .base import BatchContext, MetricAccumulator, Needs, RunSpec
from .blocks import MIN_BLOCKS, BlockBootstrap, checked_interval

__all__ = ["SemanticVarianceMetric"]


class SemanticVarianceMetric(MetricAccumulator):
    """Section: tap -> :class:`~fusionzoo.interpret.semantic_variance.SemanticVarianceResult`
    fields (``sv`` / ``semantic_variance``: trace form; ``sv_whitened``: whitened form).
    Settings: ``sv_labels`` (the label source used: ``"mask"``, ``"boxes"`` or ``"none"``), on
    boxes ``box_background`` (the background class index), ``sv_whitened_ridge`` and
    ``semantic_variance_intervals``. Intervals: ``<tap>.sv``, ``<tap>.within_share``,
    ``<tap>.sv_whitened``, ``<tap>.sv_whitened_plugin``, ``<tap>.class_between_share.<k>``."""

    name = "semantic_variance"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.needs = Needs(taps=tuple(spec.plan.spatial))
        self.source: str | None = None  # decided on the first batch
        self.accs: dict[str, SemanticVariance] = {}

    def _start(self, batch: BatchContext) -> None:
        spec = self.spec
        self._init(spec.sv_labels if spec.sv_labels != "auto" else (
            "mask" if batch.mask is not None else "boxes" if batch.boxes() is not None else "none"))

    def _init(self, source: str) -> None:
        """The accumulators of label source ``source`` (decided on the first batch)."""
        spec = self.spec
        self.source = source
        n = spec.box_classes + 1 if self.source == "boxes" else spec.label_classes
        def state(whitened: bool) -> int:
            return sum(SemanticVariance.state_bytes(n, spec.info[t].channels, whitened) for t in spec.plan.spatial)

        # the whitened forms' C x C moments dominate the block state of wide taps: when the budget
        # cannot hold them in MIN_BLOCKS blocks, keep them as one total (point values) and give
        # the trace form its intervals alone
        whitened_blocks = _blocks.BLOCK_BUDGET // state(True) >= MIN_BLOCKS
        self.boot = BlockBootstrap(spec.replicates, state(whitened_blocks), self.name)
        self.accs = {t: SemanticVariance(n, spec.ignore_index, spec.purity, stride=spec.sv_stride,
                                         blocks=self.boot.blocks, whitened_blocks=whitened_blocks)
                     for t in spec.plan.spatial}
        self.whitened_note = None if whitened_blocks or not spec.replicates else (
            f"sv_whitened intervals withheld: its C x C block moments ({state(True) / 2**20:.0f} MiB a block) "
            f"exceed fusionzoo.interpret.accumulators.blocks.BLOCK_BUDGET / MIN_BLOCKS; raise BLOCK_BUDGET")
        self.settings["sv_labels"] = self.source
        self.settings["sv_whitened_ridge"] = WHITENED_RIDGE
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
        self.boot.observe(batch)
        labels = self._labels(batch)
        if labels is None and self.source != "none" and self.skipped is None:
            self.skipped = (f"batch {batch.index} has no {self.source} (sv_labels={self.spec.sv_labels!r}); "
                            "semantic variance needs it in every batch")
        if labels is not None:
            blocks = self.boot.image_blocks(batch)
            cache: dict[tuple, Any] = {}  # grid labels and stencils, shared by the taps of this batch
            for n, acc in self.accs.items():
                acc.update(batch.acts[n], labels, blocks, first_image=batch.first_image, cache=cache)

    def shared(self) -> dict[str, Any]:
        return {"source": self.source, "shifts": {n: acc.shift for n, acc in self.accs.items()
                                                  if acc.shift is not None}}

    def adopt(self, shared: Mapping[str, Any]) -> None:
        if shared["source"] is not None:
            self._init(shared["source"])
            for n, shift in shared["shifts"].items():
                self.accs[n].preset_shift(shift)

    def reduce(self) -> None:
        if not self.spec.plan.spatial:
            return
        self.skipped = next((s for s in all_gather_objects(self.skipped) if s is not None), None)
        self.boot.reduce()
        all_reduce_sum_([t for acc in self.accs.values() for t in acc.state()], "semantic variance sums")

    def compute(self) -> dict[str, Any] | None:
        if self.source == "none":
            self.skipped = "the batches carry neither masks nor boxes"
        if not self.accs or self.skipped is not None:
            return None
        out = {n: acc.compute().to_dict() for n, acc in self.accs.items()}
        w = self.boot.weights()
        if self.spec.replicates:
            self.settings["semantic_variance_intervals"] = self.boot.settings()
            if self.whitened_note is not None:
                self.settings["semantic_variance_intervals"]["sv_whitened"] = self.whitened_note
        if w is not None:
            level = self.spec.level
            for n, acc in self.accs.items():
                reps = acc.replicates(w)
                for key in ("sv", "within_share", "sv_whitened", "sv_whitened_plugin"):
                    if key in reps:
                        self.intervals[f"{n}.{key}"] = checked_interval(reps[key], out[n][key], level)
                for k, point in enumerate(out[n]["class_between_share"]):
                    self.intervals[f"{n}.class_between_share.{k}"] = checked_interval(
                        reps["class_between_share"][:, k], point, level)
        return out
