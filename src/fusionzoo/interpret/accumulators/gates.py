"""Fusion gates as a run metric: the mean of every gate / attention tap per stream
(:func:`fusionzoo.interpret.gradcam.split_gate_channels`, streams from the tap metadata)."""

from __future__ import annotations

import torch

from ...engine.distributed import all_reduce_sum_
from ..gradcam import gate_streams, split_gate_channels
from .base import BatchContext, MetricAccumulator, Needs, RunSpec

__all__ = ["GatesMetric"]


class GatesMetric(MetricAccumulator):
    """Section: tap -> stream -> mean value over the dataset. Artifact ``gate_maps``: tap ->
    stream -> the first batch's maps (its first ``gradcam_images`` images)."""

    name = "gates"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.needs = Needs(taps=tuple(spec.plan.gates))
        self.streams = {n: gate_streams(spec.info[n], spec.modalities) for n in spec.plan.gates}
        self.sums: dict[str, dict[str, float]] = {}
        self.count = 0

    def update(self, batch: BatchContext) -> None:
        for n, streams in self.streams.items():
            split = split_gate_channels(batch.acts[n], streams)
            dst = self.sums.setdefault(n, {})
            for s, v in split.items():
                dst[s] = dst.get(s, 0.0) + float(v.double().mean()) * v.shape[0]
            if batch.index == 0:
                self.artifacts.setdefault("gate_maps", {})[n] = {
                    s: v[: self.spec.gradcam_images].cpu() for s, v in split.items()}
        self.count += batch.batch_size

    def reduce(self) -> None:
        keys = [(n, s) for n, streams in self.streams.items() for s in self.sums.get(n, {})]
        t = torch.tensor([float(self.count), *(self.sums[n][s] for n, s in keys)], dtype=torch.float64)
        all_reduce_sum_([t], "gate sums")
        self.count = int(t[0])
        for (n, s), v in zip(keys, t[1:].tolist()):
            self.sums[n][s] = v

    def compute(self) -> dict[str, dict[str, float]] | None:
        if not self.sums:
            return None
        return {n: {s: v / self.count for s, v in d.items()} for n, d in self.sums.items()}
