"""Reliance as a run metric: ``1 - CKA(tap on the full input, tap with one modality removed)``,
per feature tap and removed modality, over the same example rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..cka import StreamingCKA
from .base import BatchContext, MetricAccumulator, Needs, Pass, RunSpec

__all__ = ["RelianceMetric", "reliance_value"]


def reliance_value(acc: StreamingCKA, tap: str) -> float:
    """``1 - CKA(full, removed)``; 1 when removing the modality leaves the tap constant (all its
    variation came from that modality), where CKA itself is undefined."""
    a, b = f"full::{tap}", f"removed::{tap}"
    h_full, h_removed = acc.hsic(a, a), acc.hsic(b, b)
    if h_full > 0 and h_removed <= 1e-10 * h_full:
        return 1.0
    return 1.0 - acc.cka(a, b)


class RelianceMetric(MetricAccumulator):
    """Section: tap -> modality -> reliance (absent below 4 rows per removed modality).

    Fed by the passes with exactly one modality removed: modality contribution's coalitions when
    it runs, else ``run``'s own removal passes (same removal policy). One accumulator per removed
    modality, so each sees every example exactly once.
    """

    name = "reliance"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        taps = list(spec.plan.reliance_taps)
        self.taps = taps
        self.accs = ({m: StreamingCKA(pairs=[(f"full::{t}", f"removed::{t}") for t in taps]) for m in spec.modalities}
                     if taps else {})
        self.needs = Needs(taps=tuple(taps), removal_taps=tuple(taps))

    def update(self, batch: BatchContext) -> None:
        pass  # everything happens on the removal passes

    def update_pass(self, batch: BatchContext, p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        removed = [m for m in self.spec.modalities if m not in p.kept]
        if not self.accs or p.permuted is not None or len(removed) != 1 or not batch.has_rows:
            return
        upd = {}
        for t in self.taps:
            upd[f"full::{t}"] = batch.rows(t)
            upd[f"removed::{t}"] = batch.to_rows(t, acts[t])
        self.accs[removed[0]].update(upd)

    def compute(self) -> dict[str, dict[str, float]] | None:
        if not self.accs or any(acc.num_examples < 4 for acc in self.accs.values()):
            return None
        return {t: {m: reliance_value(self.accs[m], t) for m in self.spec.modalities} for t in self.taps}
