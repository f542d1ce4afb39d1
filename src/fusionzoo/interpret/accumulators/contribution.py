"""Modality contribution as a run metric: the task metric of every coalition of modalities and
with each modality permuted (:class:`fusionzoo.interpret.contribution.ContributionAccumulator`),
plus the interaction terms, and for per-pixel tasks the PID of the predictions and the mIoU of
unimodal heads; under several removal policies in the same pass, with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...engine.distributed import all_gather_objects, all_reduce_sum_
from ...tasks import ConfusionMatrix, class_map
from ..contribution import (
    REPLICATE_SCORES,
    ContributionAccumulator,
    WeightedConfusion,
    WeightedDetections,
    miou_summary,
    outputs_agree,
    replicate_intervals,
)
from ..interaction import coalition_game, coalition_terms, game_terms
from ..pid import REPLICATE_BUDGET, PredictionJoint
from .base import BatchContext, MetricAccumulator, Needs, Pass, RunSpec

__all__ = ["PIXEL_TASKS", "CoalitionPass", "ContributionMetric", "reduce_coalition_scores"]

# Tasks whose model output is per-pixel class scores (B, K, H, W): for these the contribution
# section also carries the PID of the predictions and the unimodal heads' mIoU.
PIXEL_TASKS = frozenset({"segmentation"})


def reduce_coalition_scores(acc: ContributionAccumulator, stores: Iterable[Any] = (),
                            replicates: Iterable[Any] = ()) -> list[torch.Tensor]:
    """Reduce a :class:`ContributionAccumulator` (plus extra task evaluators ``stores`` and
    replicate scores ``replicates``) over the process group: evaluators reduce themselves and
    detection replicates are gathered here; returned are the tensors still to be summed (weighted
    confusion matrices, PID counts), for one :func:`all_reduce_sum_` by the caller."""
    sums: list[torch.Tensor] = []
    for store in [*acc.stores.values(), *acc.perm_stores.values(), acc.perm_base, *stores]:
        store.all_reduce()  # the task evaluator's own reduction (training's validation uses it too)
    for rep in [*acc.reps.values(), *replicates]:
        if isinstance(rep, WeightedConfusion):
            sums.append(rep.matrix)
        elif isinstance(rep, WeightedDetections):
            parts = all_gather_objects((rep.predictions, rep.targets, rep.weights))
            rep.predictions = [d for part in parts for d in part[0]]
            rep.targets = [t for part in parts for t in part[1]]
            rep.weights = [w for part in parts for w in part[2]]
        else:
            raise NotImplementedError(f"no reduction over processes for replicate scores {type(rep).__name__}")
    for joint in (o for obs in acc.observers.values() for o in obs):
        sums += [*joint.counts.values(), *joint.rep_counts.values()]
    return sums


@dataclass(frozen=True)
class CoalitionPass(Pass):
    """A coalition pass of contribution; ``key`` is ``(removal policy, kept modalities)``
    (:meth:`~fusionzoo.interpret.contribution.ContributionAccumulator.key`)."""

    key: tuple[str, frozenset] = ("", frozenset())


class ContributionMetric(MetricAccumulator):
    """Section: :class:`~fusionzoo.interpret.contribution.ContributionResult` fields, plus
    ``interaction``, ``decomposition`` and ``harsanyi`` (:func:`fusionzoo.interpret.interaction.coalition_terms`),
    and for per-pixel tasks ``pid`` (two or more modalities) and ``unimodal_heads`` (models with
    ``{m}.head`` taps), under the run's main ``policy``; ``policies`` holds the same keys under
    every removal policy measured (the main one included). Skipped when a batch lacks the task's
    target.

    Intervals (``self.intervals``) come from ``R`` Poisson-bootstrap replicates of every pass's
    score (per-image confusion matrices combined with the image weights), from which every
    derived number is recomputed per replicate by the same code as its point value.
    """

    name = "contribution"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        mods = spec.modalities
        self.acc = ContributionAccumulator(spec.task, mods, spec.box_classes, spec.policy, spec.empty_policy,
                                           spec.stats, spec.perceptual, spec.seed, spec.device,
                                           policies=spec.policies, replicates=spec.replicates)
        pixels = spec.task.name in PIXEL_TASKS
        reps = spec.replicates if pixels else 0
        if pixels and len(mods) >= 2:
            # redundancy / uniqueness / synergy of the predictions, fed by the coalition passes
            for p in self.acc.policies:
                self.acc.observers[p].append(PredictionJoint(mods, spec.num_classes, spec.ignore_index, reps))
        # unimodal heads of late / hybrid models ({m}.head taps): their own mIoU per class
        self.heads = {m: f"{m}.head" for m in mods if f"{m}.head" in spec.plan.features} if pixels else {}
        self.head_cms = {m: ConfusionMatrix(spec.num_classes, spec.ignore_index) for m in self.heads}
        self.head_reps = {m: WeightedConfusion(spec.num_classes, spec.ignore_index, reps) for m in self.heads} \
            if reps else {}
        # "missing" chosen by default is kept only where the model has a missing path of its own
        # (checked on the first batch)
        self._probe = spec.policies_auto and "missing" in self.acc.policies and spec.policy != "missing"
        self.has_target = True  # every batch had the task's target
        self.needs = Needs(taps=tuple(self.heads.values()), coalitions=True)

    def update(self, batch: BatchContext) -> None:
        if batch.targets is None:
            self.has_target = False
        if batch.mask is not None:
            for m, t in self.heads.items():
                up = F.interpolate(batch.acts[t].float(), size=batch.mask.shape[-2:], mode="bilinear",
                                   align_corners=False)
                self.head_cms[m].update(class_map(up), batch.mask)
                if self.head_reps:
                    self.head_reps[m].update(up, batch.mask, batch.weights)

    def passes(self, batch: BatchContext) -> Iterator[Pass] | None:
        if self._probe:
            self._probe = False
            why = self._no_missing_path(batch)
            if why:
                self.acc.drop_policy("missing")
                self.settings["policies_dropped"] = {"missing": why}
        if batch.targets is None:
            return None
        return self._passes(batch)

    def _passes(self, batch: BatchContext) -> Iterator[Pass]:
        for key, x, missing in self.acc.coalitions(batch.inputs):
            yield CoalitionPass(key[1], x, tuple(missing), source=self.name,
                                shared=self.spec.policy in self.acc.users[key], key=key)
        if self.spec.perceptual:
            for m, x in self.acc.permutations(batch.inputs, batch.output, batch.targets, batch.weights):
                yield Pass(self.acc.full, x, permuted=m, source=self.name)

    def update_pass(self, batch: BatchContext, p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        if p.source != self.name:
            return
        if p.permuted is not None:
            self.acc.add_permuted(p.permuted, output, batch.targets, batch.weights)
        else:
            self.acc.add(p.key, output, batch.targets, batch.weights)

    def shared(self) -> dict[str, Any]:
        return {"policies_dropped": self.settings.get("policies_dropped")}

    def adopt(self, shared: Mapping[str, Any]) -> None:
        self._probe = False  # decided on the first batch, by the process that ran it
        for policy, why in (shared["policies_dropped"] or {}).items():
            self.acc.drop_policy(policy)
            self.settings.setdefault("policies_dropped", {})[policy] = why

    def skip(self, index: int, first_image: int, size: int) -> None:
        self.acc.skip(size)

    def reduce(self) -> None:
        flag = torch.tensor([float(not self.has_target)], dtype=torch.float64)
        sums = [flag, *reduce_coalition_scores(self.acc, self.head_cms.values(), self.head_reps.values())]
        all_reduce_sum_(sums, "contribution scores")
        self.has_target = float(flag) == 0

    def _no_missing_path(self, batch: BatchContext) -> str | None:
        """Why the model has no ``missing`` path of its own (None: it has one). On two images of
        the first batch, each modality removed by ``model(x, missing=(m,))`` and by zero filling:
        a ``FusionModel`` without its own path fills zeros, so the outputs agree; a model that
        rejects ``missing`` has none."""
        model, x = self.spec.model, {m: t[:2] for m, t in batch.inputs.items()}
        try:
            for m in self.spec.modalities:
                zero = {**x, m: torch.zeros_like(x[m])}
                if not outputs_agree(model({k: v for k, v in x.items() if k != m}, missing=(m,)), model(zero)):
                    return None
        except (TypeError, KeyError, ValueError) as e:
            return f"the model rejects missing=(...): {type(e).__name__}: {e}"
        return ("the model's missing path gives the outputs of zero filling (it fills absent modalities with "
                "zeros), so it is the zero policy")

    def _section(self, policy: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The point values and the intervals of one policy."""
        spec, acc = self.spec, self.acc
        out = acc.result(spec.class_names, policy).to_dict()
        out.update(coalition_terms(out))
        reps = acc.replicate_values(policy)
        if reps is not None:
            reps.update(game_terms(*coalition_game({"metric": acc.metric, "modalities": acc.modalities,
                                                    "coalitions": reps["coalitions"]})))
        joint = next(iter(acc.observers.get(policy, [])), None)
        if joint is not None:
            out["pid"] = joint.result(spec.class_names)
            if reps is not None and policy == spec.policy:
                reps["pid"] = joint.replicate_values()
        if self.head_cms:
            out["unimodal_heads"] = {m: miou_summary(cm) for m, cm in self.head_cms.items()}
            if reps is not None:
                reps["unimodal_heads"] = {m: r.values() for m, r in self.head_reps.items()}
        return out, (replicate_intervals(reps, spec.level) if reps is not None else {})

    def compute(self) -> dict[str, Any] | None:
        if not self.has_target:
            self.skipped = (f"some batches carry no {self.spec.task.target_key}; the {self.acc.metric} of every "
                            "coalition needs the ground truth of every image")
            return None
        main = self.spec.policy
        sections = {}
        for p in self.acc.policies:
            sections[p], iv = self._section(p)
            self.intervals.update({f"policies.{p}.{k}": v for k, v in iv.items()})
            if p == main:
                self.intervals.update(iv)
        self.settings["policies"] = list(self.acc.policies)
        self.settings["empty_policies"] = {p: self.acc.empty[p] for p in self.acc.policies}
        self.settings["contribution_intervals"] = self._interval_note()
        return {**sections[main], "policies": sections}

    def _interval_note(self) -> str:
        """What carries an interval in this section, and what does not and why."""
        spec = self.spec
        if not spec.replicates:
            return "none (replicates=0)"
        if spec.task.name not in REPLICATE_SCORES:
            return f"none: no bootstrap replicates of the {self.acc.metric} of a {spec.task.name} model"
        note = ("coalition scores and per-class scores, drop, Shapley values (overall and per class), perceptual "
                "score, interaction, decomposition and Harsanyi terms under every policy")
        if spec.task.name == "detection":
            note += " (COCO AP with weighted detections and ground truths: detection.metrics.weighted_coco_ap)"
        if self.head_reps:
            note += "; unimodal heads"
        if any(o for obs in self.acc.observers.values() for o in obs):
            if PredictionJoint.replicate_bytes(len(spec.modalities), spec.num_classes, spec.replicates) \
                    <= REPLICATE_BUDGET:
                note += "; PID overall terms under the main policy (per-class PID terms carry none)"
            else:
                note += (f"; PID carries none ({spec.num_classes}^3 replicate counts exceed "
                         f"{REPLICATE_BUDGET // 2**20} MiB)")
        return note
