"""CKA between tap pairs (:class:`fusionzoo.interpret.cka.StreamingCKA`) as a run metric, with
block-bootstrap intervals (:mod:`.blocks`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ...engine.distributed import all_reduce_sum_
from ..cka import StreamingCKA
from .base import BatchContext, MetricAccumulator, Needs, RunSpec
from .blocks import BlockBootstrap, checked_interval, row_blocks

__all__ = ["CKAMetric", "cka_state_bytes"]


def cka_state_bytes(channels: Mapping[str, int], pairs: Iterable[tuple[str, str]]) -> int:
    """Bytes of one copy of a :class:`StreamingCKA`'s float64 moments: per tap ``d^2 + 2 d + 2``,
    per pair ``p q + p + q + 1``."""
    pairs = list(pairs)
    taps = {t for p in pairs for t in p}
    return 8 * (sum(channels[t] ** 2 + 2 * channels[t] + 2 for t in taps)
                + sum(channels[a] * channels[b] + channels[a] + channels[b] + 1 for a, b in pairs))


class CKAMetric(MetricAccumulator):
    """Debiased and biased linear CKA of every pair of the plan (``cross_modal``,
    ``modality_fused``, ``within``, ``to_final``), over the example rows of the full-input pass.

    Section: ``{"pairs": [{"a", "b", "kind", "stage", "cka", "cka_biased"}], "num_rows"}``
    (``cka`` is nan below 4 rows, where the debiased estimator is undefined). Intervals:
    ``pairs.<i>.cka`` and ``pairs.<i>.cka_biased`` (block bootstrap, :mod:`.blocks`); setting
    ``cka_intervals`` says what they rest on.
    """

    name = "cka"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        pairs = [(a, b) for a, b, _, _ in spec.plan.pairs]
        self.taps = list(dict.fromkeys(t for p in pairs for t in p))
        self.boot = BlockBootstrap(spec.replicates, cka_state_bytes({t: spec.info[t].channels for t in self.taps},
                                                                    dict.fromkeys(pairs)), self.name)
        self.acc = StreamingCKA(pairs=pairs, blocks=self.boot.blocks) if pairs else None
        self.needs = Needs(taps=tuple(self.taps))

    def update(self, batch: BatchContext) -> None:
        self.boot.observe(batch)
        if self.acc is not None and batch.has_rows:
            rows = {n: batch.rows(n) for n in self.taps}
            blocks = row_blocks(batch, self.boot.image_blocks(batch), next(iter(rows.values())).shape[0])
            self.acc.update(rows, blocks if self.acc.blocks > 1 else None)

    def shared(self) -> dict[str, Any]:
        return {"shifts": self.acc.shifts() if self.acc is not None else {}}

    def adopt(self, shared: Mapping[str, Any]) -> None:
        if self.acc is not None:
            self.acc.preset_shifts(shared["shifts"])

    def reduce(self) -> None:
        self.boot.reduce()
        if self.acc is not None:
            all_reduce_sum_(self.acc.state(), "CKA moments")

    def compute(self) -> dict[str, Any] | None:
        acc = self.acc
        if acc is None or acc.num_examples == 0:
            return None
        out = [{"a": a, "b": b, "kind": kind, "stage": stage,
                "cka": acc.cka(a, b, True) if acc.num_examples >= 4 else math.nan,
                "cka_biased": acc.cka(a, b, False)}
               for a, b, kind, stage in self.spec.plan.pairs]
        w = self.boot.weights()
        if self.spec.replicates:
            self.settings["cka_intervals"] = self.boot.settings()
        if w is not None:
            for key, debiased in (("cka", True), ("cka_biased", False)):
                reps = acc.replicates(w, debiased)
                for i, (a, b, _, _) in enumerate(self.spec.plan.pairs):
                    self.intervals[f"pairs.{i}.{key}"] = checked_interval(reps[(a, b)], out[i][key], self.spec.level)
        return {"pairs": out, "num_rows": acc.num_examples}
