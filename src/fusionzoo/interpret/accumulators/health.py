"""Representation health as a run metric: effective rank and feature norm of every feature tap
(:mod:`fusionzoo.interpret.health`), and the feature-norm ratio of modality pairs per stage."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ...engine.distributed import all_reduce_sum_
from ..health import EffectiveRank, FeatureNorm
from .base import BatchContext, MetricAccumulator, Needs, RunSpec

__all__ = ["HealthMetric"]


class HealthMetric(MetricAccumulator):
    """Section: ``{"effective_rank": {tap: v}, "feature_norm": {tap: v}, "norm_ratio": {stage:
    {"a/b": v}}}`` (effective rank over the example rows, norms over every position)."""

    name = "health"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.needs = Needs(taps=tuple(spec.plan.features))
        self.eranks = {n: EffectiveRank() for n in spec.plan.features}
        self.norms = {n: FeatureNorm() for n in spec.plan.features}

    def update(self, batch: BatchContext) -> None:
        for n, er in self.eranks.items():
            if batch.has_rows:
                er.update(batch.rows(n))
            self.norms[n].update(batch.acts[n])

    def shared(self) -> dict[str, Any]:
        return {n: er.shift for n, er in self.eranks.items() if er.shift is not None}

    def adopt(self, shared: Mapping[str, Any]) -> None:
        for n, shift in shared.items():
            self.eranks[n].preset_shift(shift)

    def reduce(self) -> None:
        counts = torch.tensor([[self.eranks[n].n, self.norms[n].n, self.norms[n].total] for n in self.eranks],
                              dtype=torch.float64).reshape(-1, 3)
        all_reduce_sum_([counts, *(t for er in self.eranks.values() for t in er.state())], "health sums")
        for (n, er), (ne, nn, total) in zip(self.eranks.items(), counts.tolist()):
            er.n, self.norms[n].n, self.norms[n].total = int(ne), int(nn), total

    def compute(self) -> dict[str, Any] | None:
        if not self.eranks:
            return None
        fn = {n: acc.compute() for n, acc in self.norms.items()}
        ratio: dict[str, dict[str, float]] = {}
        mods = self.spec.modalities
        for stage, streams in self.spec.plan.stage_taps.items():
            present = [m for m in mods if m in streams]
            for i, a in enumerate(present):
                for b in present[i + 1:]:
                    nb = fn[streams[b]]
                    ratio.setdefault(stage, {})[f"{a}/{b}"] = fn[streams[a]] / nb if nb > 0 else math.nan
        erank = {n: e.compute() for n, e in self.eranks.items()}
        collapsed = sorted(n for n, v in erank.items() if math.isnan(v))
        if collapsed:  # nan in the result (null in JSON) must not pass unexplained
            warnings.warn(f"effective rank is undefined for taps {collapsed}: their features are constant over "
                          "the example rows (a collapsed representation, or too few cells at the input size); "
                          "reported as nan", stacklevel=2)
        return {"effective_rank": erank, "feature_norm": fn, "norm_ratio": ratio}
