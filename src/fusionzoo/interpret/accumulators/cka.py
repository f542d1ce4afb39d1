"""CKA between tap pairs (:class:`fusionzoo.interpret.cka.StreamingCKA`) as a run metric."""

from __future__ import annotations

import math
from typing import Any

from ..cka import StreamingCKA
from .base import BatchContext, MetricAccumulator, Needs, RunSpec

__all__ = ["CKAMetric"]


class CKAMetric(MetricAccumulator):
    """Debiased and biased linear CKA of every pair of the plan (``cross_modal``,
    ``modality_fused``, ``within``, ``to_final``), over the example rows of the full-input pass.

    Section: ``{"pairs": [{"a", "b", "kind", "stage", "cka", "cka_biased"}], "num_rows"}``
    (``cka`` is nan below 4 rows, where the debiased estimator is undefined).
    """

    name = "cka"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        pairs = [(a, b) for a, b, _, _ in spec.plan.pairs]
        self.acc = StreamingCKA(pairs=pairs) if pairs else None
        self.taps = list(dict.fromkeys(t for p in pairs for t in p))
        self.needs = Needs(taps=tuple(self.taps))

    def update(self, batch: BatchContext) -> None:
        if self.acc is not None and batch.has_rows:
            self.acc.update({n: batch.rows(n) for n in self.taps})

    def compute(self) -> dict[str, Any] | None:
        acc = self.acc
        if acc is None or acc.num_examples == 0:
            return None
        out = [{"a": a, "b": b, "kind": kind, "stage": stage,
                "cka": acc.cka(a, b, True) if acc.num_examples >= 4 else math.nan,
                "cka_biased": acc.cka(a, b, False)}
               for a, b, kind, stage in self.spec.plan.pairs]
        return {"pairs": out, "num_rows": acc.num_examples}
