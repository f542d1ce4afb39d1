"""Modality contribution as a run metric: the task metric of every coalition of modalities and
with each modality permuted (:class:`fusionzoo.interpret.contribution.ContributionAccumulator`),
plus the interaction terms, and for per-pixel tasks the PID of the predictions and the mIoU of
unimodal heads."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ...tasks import ConfusionMatrix
from ..contribution import ContributionAccumulator, miou_summary
from ..interaction import coalition_terms
from ..pid import PredictionJoint
from .base import BatchContext, MetricAccumulator, Needs, Pass, RunSpec

__all__ = ["PIXEL_TASKS", "ContributionMetric"]

# Tasks whose model output is per-pixel class scores (B, K, H, W): for these the contribution
# section also carries the PID of the predictions and the unimodal heads' mIoU.
PIXEL_TASKS = frozenset({"segmentation"})


class ContributionMetric(MetricAccumulator):
    """Section: :class:`~fusionzoo.interpret.contribution.ContributionResult` fields, plus
    ``interaction`` and ``decomposition`` (:func:`fusionzoo.interpret.interaction.coalition_terms`),
    and for per-pixel tasks ``pid`` (two or more modalities) and ``unimodal_heads`` (models with
    ``{m}.head`` taps). Skipped when a batch lacks the task's target."""

    name = "contribution"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        mods = spec.modalities
        self.acc = ContributionAccumulator(spec.task, mods, spec.box_classes, spec.policy, spec.empty_policy,
                                           spec.stats, spec.perceptual, spec.seed, spec.device)
        pixels = spec.task.name in PIXEL_TASKS
        self.joint = None
        if pixels and len(mods) >= 2:
            # redundancy / uniqueness / synergy of the predictions, fed by the coalition passes
            self.joint = PredictionJoint(mods, spec.num_classes, spec.ignore_index)
            self.acc.observers.append(self.joint)
        # unimodal heads of late / hybrid models ({m}.head taps): their own mIoU per class
        self.heads = {m: f"{m}.head" for m in mods if f"{m}.head" in spec.plan.features} if pixels else {}
        self.head_cms = {m: ConfusionMatrix(spec.num_classes, spec.ignore_index) for m in self.heads}
        self.has_target = True  # every batch had the task's target
        self.needs = Needs(taps=tuple(self.heads.values()), coalitions=True)

    def update(self, batch: BatchContext) -> None:
        if batch.targets is None:
            self.has_target = False
        if batch.mask is not None:
            for m, t in self.heads.items():
                up = F.interpolate(batch.acts[t].float(), size=batch.mask.shape[-2:], mode="bilinear",
                                   align_corners=False)
                self.head_cms[m].update(up.argmax(1), batch.mask)

    def passes(self, batch: BatchContext) -> Iterator[Pass] | None:
        if batch.targets is None:
            return None
        return self._passes(batch)

    def _passes(self, batch: BatchContext) -> Iterator[Pass]:
        for s, x, missing in self.acc.coalitions(batch.inputs):
            yield Pass(s, x, tuple(missing), source=self.name)
        if self.spec.perceptual:
            for m, x in self.acc.permutations(batch.inputs, batch.output, batch.targets):
                yield Pass(self.acc.full, x, permuted=m, source=self.name)

    def update_pass(self, batch: BatchContext, p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        if p.source != self.name:
            return
        if p.permuted is not None:
            self.acc.add_permuted(p.permuted, output, batch.targets)
        else:
            self.acc.add(p.kept, output, batch.targets)

    def compute(self) -> dict[str, Any] | None:
        if not self.has_target:
            self.skipped = (f"some batches carry no {self.spec.task.target_key}; the {self.acc.metric} of every "
                            "coalition needs the ground truth of every image")
            return None
        out = self.acc.result(self.spec.class_names).to_dict()
        out.update(coalition_terms(out))
        if self.joint is not None:
            out["pid"] = self.joint.result(self.spec.class_names)
        if self.head_cms:
            out["unimodal_heads"] = {m: miou_summary(cm) for m, cm in self.head_cms.items()}
        return out
