"""Reliance as a run metric: ``1 - CKA(tap on the full input, tap with one modality removed)``,
per feature tap and removed modality, over the same example rows, with block-bootstrap
intervals (:mod:`.blocks`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...engine.distributed import all_reduce_sum_
from ..cka import StreamingCKA
from .base import BatchContext, MetricAccumulator, Needs, Pass, RunSpec
from .blocks import BlockBootstrap, checked_interval, row_blocks
from .cka import cka_state_bytes

__all__ = ["RelianceMetric", "reliance_replicates", "reliance_value"]

_CONSTANT = 1e-10  # removal leaves the tap constant when its HSIC falls below this share of the full tap's


def reliance_value(acc: StreamingCKA, tap: str) -> float:
    """``1 - CKA(full, removed)``; 1 when removing the modality leaves the tap constant (all its
    variation came from that modality), where CKA itself is undefined."""
    a, b = f"full::{tap}", f"removed::{tap}"
    h_full, h_removed = acc.hsic(a, a), acc.hsic(b, b)
    if h_full > 0 and h_removed <= _CONSTANT * h_full:
        return 1.0
    return 1.0 - acc.cka(a, b)


def reliance_replicates(acc: StreamingCKA, tap: str, weights: torch.Tensor) -> torch.Tensor:
    """:func:`reliance_value` of every block reweighting (``(R, G)`` weights -> ``(R,)``), exact
    (:meth:`StreamingCKA.replicate_hsic`)."""
    a, b = f"full::{tap}", f"removed::{tap}"
    h_full, h_removed = acc.replicate_hsic(a, a, weights), acc.replicate_hsic(b, b, weights)
    cka = acc.replicates(weights, pairs=[(a, b)])[(a, b)]
    constant = ((h_full > 0) & (h_removed <= _CONSTANT * h_full)).cpu()
    return torch.where(constant, torch.ones_like(cka), 1.0 - cka)


class RelianceMetric(MetricAccumulator):
    """Section: tap -> modality -> reliance (absent below 4 rows per removed modality).
    Intervals: ``<tap>.<modality>``; setting ``reliance_intervals``.

    Fed by the passes with exactly one modality removed: modality contribution's coalitions when
    it runs, else ``run``'s own removal passes (same removal policy). One accumulator per removed
    modality, so each sees every example exactly once.
    """

    name = "reliance"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        taps = list(spec.plan.reliance_taps)
        self.taps = taps
        pairs = [(f"full::{t}", f"removed::{t}") for t in taps]
        channels = {f"{k}::{t}": spec.info[t].channels for t in taps for k in ("full", "removed")}
        self.boot = BlockBootstrap(spec.replicates, len(spec.modalities) * cka_state_bytes(channels, pairs), self.name)
        self.accs = ({m: StreamingCKA(pairs=pairs, blocks=self.boot.blocks) for m in spec.modalities} if taps else {})
        self.needs = Needs(taps=tuple(taps), removal_taps=tuple(taps))

    def update(self, batch: BatchContext) -> None:
        self.boot.observe(batch)  # the rest happens on the removal passes

    def update_pass(self, batch: BatchContext, p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        removed = [m for m in self.spec.modalities if m not in p.kept]
        if not self.accs or p.permuted is not None or len(removed) != 1 or not batch.has_rows:
            return
        upd = {}
        for t in self.taps:
            upd[f"full::{t}"] = batch.rows(t)
            upd[f"removed::{t}"] = batch.to_rows(t, acts[t])
        acc = self.accs[removed[0]]
        blocks = row_blocks(batch, self.boot.image_blocks(batch), next(iter(upd.values())).shape[0])
        acc.update(upd, blocks if acc.blocks > 1 else None)

    def shared(self) -> dict[str, Any]:
        return {m: acc.shifts() for m, acc in self.accs.items()}

    def adopt(self, shared: Mapping[str, Any]) -> None:
        for m, acc in self.accs.items():
            acc.preset_shifts(shared[m])

    def reduce(self) -> None:
        self.boot.reduce()
        all_reduce_sum_([t for acc in self.accs.values() for t in acc.state()], "reliance moments")

    def compute(self) -> dict[str, dict[str, float]] | None:
        if not self.accs or any(acc.num_examples < 4 for acc in self.accs.values()):
            return None
        out = {t: {m: reliance_value(self.accs[m], t) for m in self.spec.modalities} for t in self.taps}
        w = self.boot.weights()
        if self.spec.replicates:
            self.settings["reliance_intervals"] = self.boot.settings()
        if w is not None:
            for t in self.taps:
                for m, acc in self.accs.items():
                    self.intervals[f"{t}.{m}"] = checked_interval(reliance_replicates(acc, t, w), out[t][m],
                                                                  self.spec.level)
        return out
