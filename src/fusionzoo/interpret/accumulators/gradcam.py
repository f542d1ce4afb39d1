"""Grad-CAM as a run metric: on the first batch, each stream's deepest stage with a grid of at
least ``MIN_GRID_CELLS`` cells per side (:func:`fusionzoo.interpret.gradcam.default_gradcam_taps`),
explaining the task's score (:data:`EXPLAIN`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...tasks import class_map
from ..detection import DetectionScore
from ..gradcam import MIN_GRID_CELLS, default_gradcam_taps, grad_cam, object_class_region
from ..plan import TapPlan
from .base import BatchContext, MetricAccumulator, RunSpec

__all__ = ["EXPLAIN", "GradCamMetric", "gradcam_taps"]


def _explain_segmentation(model: nn.Module, inputs: Mapping[str, torch.Tensor], taps: Sequence[str],
                          output: torch.Tensor) -> dict[str, Any]:
    # per image its second most frequent predicted class (object_class_region)
    region, explained = object_class_region(class_map(output))
    return {"gradcam": grad_cam(model, inputs, taps, region=region), "gradcam_classes": explained}


def _explain_detection(model: nn.Module, inputs: Mapping[str, torch.Tensor], taps: Sequence[str],
                       output: Any) -> dict[str, Any]:
    # the highest-scoring detection of each image, read from every box head
    score = DetectionScore()
    return {"gradcam": grad_cam(model, inputs, taps, score_fn=score), "gradcam_detections": score.selected}


# task name -> what run's Grad-CAM explains: (model, first images' inputs, taps, their output
# on the full input) -> artifacts ("gradcam": tap -> (B, H, W) maps, plus what was explained)
EXPLAIN: dict[str, Callable[[nn.Module, Mapping[str, torch.Tensor], Sequence[str], Any], dict[str, Any]]] = {
    "segmentation": _explain_segmentation,
    "detection": _explain_detection,
}


def gradcam_taps(modalities: Sequence[str], plan: TapPlan, reductions: Mapping[str, int],
                 size: tuple[int, int]) -> list[str]:
    """Per modality stream and the fused stream, the deepest stage tap whose grid at input
    ``size`` has at least ``MIN_GRID_CELLS`` cells per side (:func:`.gradcam.default_gradcam_taps`)."""
    streams = {stream: [st[stream] for st in plan.stage_taps.values() if stream in st]
               for stream in [*modalities, "fused"]}
    return default_gradcam_taps({k: v for k, v in streams.items() if v}, reductions, size)


class GradCamMetric(MetricAccumulator):
    """No section. Artifacts: ``gradcam`` (tap -> maps of the first ``gradcam_images`` images)
    and what was explained (``gradcam_classes`` / ``gradcam_detections``); setting ``gradcam``
    (the taps, the input size and ``min_grid_cells``)."""

    name = "gradcam"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        if spec.task.name not in EXPLAIN:
            raise ValueError(f"Grad-CAM has no score for task {spec.task.name!r}; known: {sorted(EXPLAIN)}")
        self.explain = EXPLAIN[spec.task.name]

    def update(self, batch: BatchContext) -> None:
        if batch.index != 0:
            return
        t0 = time.perf_counter()
        spec = self.spec
        taps = gradcam_taps(spec.modalities, spec.plan, {n: t.reduction for n, t in spec.info.items()}, batch.size)
        self.settings["gradcam"] = {"taps": taps, "input_size": list(batch.size), "min_grid_cells": MIN_GRID_CELLS}
        if taps:
            n = spec.gradcam_images
            with torch.enable_grad():
                sub = {m: v[:n] for m, v in batch.inputs.items()}
                self.artifacts.update(self.explain(spec.model, sub, taps, batch.output[:n]))
        self.timings["gradcam_s"] = time.perf_counter() - t0

    def reduce(self) -> None:
        """Nothing to sum: Grad-CAM explains the first batch, in the process that ran it (``run``
        hands its maps and settings to the others)."""

    def compute(self) -> None:
        return None
