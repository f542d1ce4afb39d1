"""Modality contribution: removal, exact Shapley values and the perceptual score.

- **Removal** (:func:`remove_modalities`): a modality is taken away at inference by one of
  ``REMOVAL_POLICIES``: ``"zero"`` (the tensor is zeros; inputs are normalized per modality,
  so zero is the dataset mean of a normalized input), ``"mean"`` (each channel set to a given
  dataset mean, :class:`StreamingModalityStats`), ``"noise"`` (Gaussian noise with the dataset's
  per-channel mean and std, or N(0, 1) for normalized inputs when no statistics are given) and
  ``"missing"`` (the model's own ``model(inputs, missing=...)`` path, e.g. late fusion dropping
  that modality's prediction).
- **Shapley values** (:func:`shapley_values`): exact, over all ``2^M`` coalitions (Shapley 1953;
  ``phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! (v(S + m) - v(S))``); the value
  function is any callable ``frozenset -> number or vector``, so per-class values come for free.
- **Perceptual score** (Gat, Schwartz, Schwing, "Perceptual Score: What Data Modalities Does
  Your Model Perceive?", NeurIPS 2021): the metric drop when one modality is permuted across
  the examples of a batch (a derangement, so no example keeps its own), which breaks its
  relation to the label while keeping its marginal distribution; reported raw and divided by
  the unpermuted metric.

The task metric for segmentation is mIoU from one confusion matrix over the whole dataset
(:class:`fusionzoo.tasks.ConfusionMatrix`, the training evaluator's); per-class values
are the class IoUs in the same convention, used identically for every coalition: a class counts
when it occurs in the ground truth or the prediction (a prediction-only class has IoU 0), a
class in neither is nan. So for every coalition the nan-mean of the per-class IoUs is its mIoU,
and where the counted classes are the same in every coalition (e.g. every class occurs in the
ground truth) the per-class Shapley values average to the Shapley value of mIoU (linearity). A
class counted in some coalitions only (predicted with some modalities, in neither ground truth
nor prediction with others) has a nan per-class Shapley value: its IoU is undefined there. For
detectors (``model.task == "detection"``) it is COCO box AP (IoU 0.50:0.95, pycocotools) with
per-class AP. Both are the task's own evaluator (:meth:`fusionzoo.tasks.Task.evaluator`, the
one training reports with), one per coalition: :class:`ContributionAccumulator` knows no task.
AP is not a sum over images, so the detection evaluator keeps every pass's detections (boxes,
scores, labels on the CPU) and runs pycocotools once per coalition at the end: with ``M``
modalities that is ``2^M + M + 1`` detection sets per image (7 for RGB-T), at most
``detections_per_img`` boxes each, small next to the images. :attr:`ContributionResult.metric`
says which metric it is (:data:`TASK_RESULTS`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tasks import ConfusionMatrix, Evaluator, Task, get_task

__all__ = [
    "METRIC_KEYS",
    "REMOVAL_POLICIES",
    "TASK_RESULTS",
    "ContributionAccumulator",
    "ContributionResult",
    "StreamingModalityStats",
    "contribution_keys",
    "derangement",
    "modality_contribution",
    "perceptual_score",
    "remove_modalities",
    "shapley_values",
    "split_batch",
    "task_for",
]

REMOVAL_POLICIES = ("zero", "mean", "noise", "missing")
# task metric -> (key of its dataset value, key of its per-class list) in a coalition entry
METRIC_KEYS = {"mIoU": ("miou", "iou"), "AP": ("ap", "ap_per_class")}
# task name -> (the metric as results name it, further evaluator values a coalition entry keeps
# beside Task.metric and Task.per_class_key)
TASK_RESULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "segmentation": ("mIoU", ()),
    "detection": ("AP", ("ap50", "ap75", "ap50_per_class")),
}


def contribution_keys(contribution: Mapping[str, Any]) -> tuple[str, str, str]:
    """``(metric, value key, per-class key)`` of a :class:`ContributionResult` dict.

    Results written before the ``metric`` field existed are segmentation results (mIoU).

    Example:
        >>> contribution_keys({"metric": "AP"})
        ('AP', 'ap', 'ap_per_class')
    """
    metric = contribution.get("metric") or "mIoU"
    if metric not in METRIC_KEYS:
        raise ValueError(f"unknown contribution metric {metric!r}; known: {sorted(METRIC_KEYS)}")
    return (metric, *METRIC_KEYS[metric])


class StreamingModalityStats:
    """Streaming per-channel mean and std of each modality (for the ``mean`` / ``noise`` policies).

    Measured over a dataset here; :class:`fusionzoo.data.ModalityStats` is the fixed
    ``(mean, std)`` pair that normalizes inputs.

    Example:
        >>> stats = StreamingModalityStats()
        >>> for batch in loader:
        ...     stats.update({m: batch[m] for m in ("rgb", "depth")})   # (B, C, H, W) each
        >>> stats.mean["depth"]                                          # (C,)
    """

    def __init__(self) -> None:
        self._n: dict[str, int] = {}
        self._s: dict[str, torch.Tensor] = {}
        self._sq: dict[str, torch.Tensor] = {}

    def update(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Add ``(B, C, H, W)`` tensors, one per modality."""
        for m, x in inputs.items():
            if x.dim() != 4:
                raise ValueError(f"StreamingModalityStats expects (B, C, H, W) for {m!r}, got {tuple(x.shape)}")
            x = x.detach().double()
            self._n[m] = self._n.get(m, 0) + x.shape[0] * x.shape[2] * x.shape[3]
            self._s[m] = self._s.get(m, 0) + x.sum((0, 2, 3)).cpu()
            self._sq[m] = self._sq.get(m, 0) + (x * x).sum((0, 2, 3)).cpu()

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return {m: (self._s[m] / self._n[m]).float() for m in self._n}

    @property
    def std(self) -> dict[str, torch.Tensor]:
        out = {}
        for m in self._n:
            mu = self._s[m] / self._n[m]
            out[m] = (self._sq[m] / self._n[m] - mu * mu).clamp(min=0).sqrt().float()
        return out


def remove_modalities(
    inputs: Mapping[str, torch.Tensor],
    removed: Iterable[str],
    policy: str = "zero",
    stats: StreamingModalityStats | None = None,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Take modalities away from a batch.

    Args:
        inputs: modality -> ``(B, C, H, W)``.
        removed: modalities to remove.
        policy: one of ``REMOVAL_POLICIES`` (see the module docstring).
        stats: per-channel statistics, required by ``"mean"``, optional for ``"noise"``.
        generator: RNG for ``"noise"`` (on the inputs' device).

    Returns:
        ``(new_inputs, missing)``: pass them as ``model(new_inputs, missing=missing)``;
        ``missing`` is empty except for the ``"missing"`` policy, which also leaves the keys out.
    """
    removed = tuple(removed)
    unknown = [m for m in removed if m not in inputs]
    if unknown:
        raise ValueError(f"cannot remove {unknown}: inputs have modalities {list(inputs)}")
    if policy not in REMOVAL_POLICIES:
        raise ValueError(f"removal policy must be one of {REMOVAL_POLICIES}, got {policy!r}")
    if policy == "missing":
        return {m: x for m, x in inputs.items() if m not in removed}, removed
    out = dict(inputs)
    for m in removed:
        x = inputs[m]
        if policy == "zero":
            out[m] = torch.zeros_like(x)
        elif policy == "mean":
            if stats is None or m not in stats.mean:
                raise ValueError(f"policy 'mean' needs StreamingModalityStats with modality {m!r}; "
                                 "accumulate them over the dataset first")
            out[m] = stats.mean[m].to(x)[None, :, None, None].expand_as(x).clone()
        else:  # noise
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if stats is not None and m in stats.mean:
                noise = noise * stats.std[m].to(x)[None, :, None, None] + stats.mean[m].to(x)[None, :, None, None]
            out[m] = noise
    return out, ()


def shapley_values(
    players: Sequence[str], value: Callable[[frozenset[str]], Any]
) -> dict[str, Any]:
    """Exact Shapley values of a cooperative game.

    Args:
        players: the ``M`` players (modalities); ``M <= 10`` (``2^M`` value calls, cached).
        value: ``v(S)`` for a frozenset ``S`` of players; a number or an array (e.g. per-class
            IoU), the same shape for every ``S``.

    Returns:
        player -> ``phi`` (float, or ``np.ndarray`` when ``v`` returns vectors). They satisfy
        efficiency: ``sum_m phi_m = v(all) - v(empty)``.

    Example:
        >>> shapley_values(["a", "b"], lambda s: float(len(s) == 2))   # pure synergy
        {'a': 0.5, 'b': 0.5}
    """
    players = list(players)
    if len(set(players)) != len(players):
        raise ValueError(f"players must be distinct, got {players}")
    m = len(players)
    if not 1 <= m <= 10:
        raise ValueError(f"exact Shapley values need 1..10 players, got {m}")
    cache: dict[frozenset, np.ndarray] = {}

    def v(s: frozenset) -> np.ndarray:
        if s not in cache:
            r = value(s)
            cache[s] = np.asarray(r.detach().cpu() if isinstance(r, torch.Tensor) else r, dtype=np.float64)
        return cache[s]

    out: dict[str, Any] = {}
    for p in players:
        others = [q for q in players if q != p]
        phi = 0.0
        for k in range(m):
            weight = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
            for combo in itertools.combinations(others, k):
                s = frozenset(combo)
                phi = phi + weight * (v(s | {p}) - v(s))
        phi = np.asarray(phi, dtype=np.float64)
        out[p] = float(phi) if phi.ndim == 0 else phi
    return out


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (``n >= 2``).

    Built as ``i -> pi[(pi^-1[i] + 1) mod n]``: a single ``n``-cycle, uniformly relabelled.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 elements, got {n}; use a batch size >= 2")
    pi = torch.randperm(n, generator=generator)
    inv = torch.argsort(pi)
    return pi[(inv + 1) % n]


# --------------------------------------------------------------------------------------------
# Model-level evaluation
# --------------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def task_for(model: nn.Module, ignore_index: int = 255) -> Task:
    """``get_task(model)``, with ``ignore_index`` for tasks that have one (segmentation)."""
    task = get_task(model)
    if getattr(task, "ignore_index", ignore_index) != ignore_index:
        task = get_task(model, ignore_index=ignore_index)
    return task


def split_batch(task: Task, batch: Mapping[str, Any], modalities: Sequence[str],
                device: torch.device | str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(inputs on device, task.targets(batch))`` of a collated batch.

    Raises:
        KeyError: a modality or the task's target is missing (names the keys the batch has).
    """
    missing = [m for m in modalities if m not in batch]
    if missing or task.target_key not in batch:
        raise KeyError(f"batch needs keys {list(modalities)} and {task.name}'s target {task.target_key!r}; "
                       f"got {list(batch)}")
    return {m: batch[m].to(device) for m in modalities}, task.targets(batch, device)


def miou_summary(cm: ConfusionMatrix) -> dict[str, Any]:
    """``{"miou", "iou"}`` of a coalition, in the convention of the training evaluator.

    Both come from :meth:`ConfusionMatrix.compute` (mmsegmentation's IoUMetric convention): a
    class counts when it occurs in the ground truth *or* the prediction (union > 0), a
    prediction-only class has IoU 0, and a class in neither is nan and left out. So the
    nan-mean of ``iou`` is exactly ``miou`` for every coalition, and ``miou`` of the full
    coalition is the mIoU the training loop reports on the same data.
    """
    r = cm.compute()
    return {"miou": r["miou"], "iou": [float(v) for v in r["iou"]]}


def _coalition_key(s: Iterable[str], order: Sequence[str]) -> str:
    s = set(s)
    return "+".join(m for m in order if m in s) or "none"


@dataclass
class ContributionResult:
    """Modality contribution of one model on one dataset.

    The same structure for every task; ``metric`` names the task metric and the keys of its
    entries (:data:`METRIC_KEYS`): ``"mIoU"`` (segmentation: ``"miou"`` and per-class ``"iou"``)
    or ``"AP"`` (detection: COCO ``"ap"`` and per-class ``"ap_per_class"``, plus ``"ap50"``,
    ``"ap75"`` and ``"ap50_per_class"``). Below, "metric" is that value.

    Attributes:
        policy: removal policy used.
        modalities: the players.
        coalitions: ``"rgb+depth"`` / ``"rgb"`` / ``"none"`` -> the metric and its per-class
            values with only those modalities kept.
        drop: modality -> metric(all) - metric(all but that modality) (leave-one-out).
        shapley: modality -> Shapley value of the metric (sums to metric(all) - metric(none)).
        shapley_per_class: modality -> per-class Shapley values (segmentation: nan for a class
            absent from both ground truth and prediction in some coalition; see the module
            docstring for the convention; detection: nan for classes without ground truth).
        perceptual: modality -> {"<value key>_permuted", "drop", "normalized", "per_class_drop"},
            when computed.
        class_names: names for the per-class lists, when known.
        metric: ``"mIoU"`` or ``"AP"``.
    """

    policy: str
    modalities: list[str]
    coalitions: dict[str, dict[str, Any]]
    drop: dict[str, float]
    shapley: dict[str, float]
    shapley_per_class: dict[str, list[float]]
    perceptual: dict[str, dict[str, Any]] = field(default_factory=dict)
    class_names: list[str] | None = None
    metric: str = "mIoU"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ContributionAccumulator:
    """Streams the per-coalition and permuted scores behind :class:`ContributionResult`.

    Per batch, iterate :meth:`coalitions` (``2^M`` inputs: every subset of kept modalities)
    and :meth:`permutations` (``M`` inputs: one modality deranged across the batch), run the
    model on each, and :meth:`add` the outputs. Used by :func:`modality_contribution` and by
    :func:`fusionzoo.interpret.run` (which also captures taps on some of these passes).

    The task metric is the task's own evaluator (:meth:`fusionzoo.tasks.Task.evaluator`, one per
    coalition): a confusion matrix (mIoU and class IoUs) for segmentation, the stored detections
    of every pass and pycocotools (COCO box AP and per-class AP) for detection. A coalition entry
    keeps the evaluator's :attr:`~fusionzoo.tasks.Task.metric` and
    :attr:`~fusionzoo.tasks.Task.per_class_key` values (plus, per :data:`TASK_RESULTS`, the
    task's further values, e.g. AP50).

    Args:
        task: the model's task (:func:`task_for`).
        modalities: the model's modalities (players).
        num_classes: ``K``.
        policy: removal policy for modalities outside a coalition.
        empty_policy: policy for the empty coalition (``None`` = ``policy``; must not be
            ``"missing"``).
        stats: statistics for ``"mean"`` / ``"noise"``.
        perceptual: also accumulate the permuted passes.
        seed: noise and permutation seed.
        device: device of the noise generator (the inputs' device).
    """

    def __init__(self, task: Task, modalities: Sequence[str], num_classes: int, policy: str = "zero",
                 empty_policy: str | None = None, stats: StreamingModalityStats | None = None,
                 perceptual: bool = True, seed: int = 0, device: torch.device | str = "cpu") -> None:
        if policy not in REMOVAL_POLICIES:
            raise ValueError(f"removal policy must be one of {REMOVAL_POLICIES}, got {policy!r}")
        empty_policy = empty_policy or policy
        if empty_policy not in REMOVAL_POLICIES or empty_policy == "missing":
            raise ValueError("the empty coalition needs a policy other than 'missing' (a model needs at least "
                             "one modality); pass empty_policy='zero' (or 'mean' / 'noise')")
        if task.name not in TASK_RESULTS:
            raise ValueError(f"no contribution metric for task {task.name!r}; known: {sorted(TASK_RESULTS)}")
        self.task = task
        self.metric, self._extra_keys = TASK_RESULTS[task.name]
        self.modalities = list(modalities)
        self.num_classes = int(num_classes)
        self.policy, self.empty_policy, self.stats = policy, empty_policy, stats
        self.perceptual = perceptual
        self.subsets = [frozenset(c) for r in range(len(self.modalities) + 1)
                        for c in itertools.combinations(self.modalities, r)]
        self.stores = {s: self.new_store() for s in self.subsets}
        self.perm_stores = {m: self.new_store() for m in self.modalities}
        # the unpermuted reference over exactly the batches that were permuted (a batch of one
        # example cannot be permuted and is skipped by both)
        self.perm_base = self.new_store()
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._perm_gen = torch.Generator().manual_seed(seed + 1)
        # objects with add(subset, output, target) that also see every coalition pass, e.g.
        # :class:`.pid.PredictionJoint` (no forward pass of their own)
        self.observers: list[Any] = []

    # -- the task metric --------------------------------------------------------------------------
    def new_store(self) -> Evaluator:
        """An empty score store of one coalition: the task's evaluator (with per-class values)."""
        return self.task.evaluator(self.num_classes, per_class=True)

    def update_store(self, store: Evaluator, output: Any, target: Any) -> None:
        """Add one pass: ``output`` as :meth:`fusionzoo.tasks.Task.predict` returns it (logits
        ``(B, K, H, W)``, or the detector's per-image dicts), ``target`` as
        :meth:`fusionzoo.tasks.Task.targets` does."""
        store.update(output, target)

    def summarize(self, store: Evaluator) -> dict[str, Any]:
        """The coalition entry of a store: ``{metric key: value, per-class key: [...], ...}``
        (nan everywhere for a store that saw no pass)."""
        keys = (self.task.metric, self.task.per_class_key, *self._extra_keys)
        r = store.compute()
        return {key: [float(v) for v in r[key]] if isinstance(r[key], (list, tuple)) else r[key] for key in keys}

    # -- passes ------------------------------------------------------------------------------------
    @property
    def full(self) -> frozenset:
        return frozenset(self.modalities)

    def coalitions(self, inputs: Mapping[str, torch.Tensor]):
        """Yield ``(subset, inputs, missing)`` for every coalition of one batch (full set first)."""
        # Common random numbers: one replacement per modality and batch, shared by every
        # coalition, so coalition differences are not blurred by fresh noise draws.
        filled = {pol: remove_modalities(inputs, self.modalities, pol, self.stats, self._gen)[0]
                  for pol in dict.fromkeys((self.policy, self.empty_policy)) if pol != "missing"}
        for s in sorted(self.subsets, key=len, reverse=True):
            removed = [m for m in self.modalities if m not in s]
            pol = self.policy if s else self.empty_policy
            if pol == "missing" and removed:
                x, missing = remove_modalities(inputs, removed, pol)
            else:
                x = {m: (inputs[m] if m in s else filled[pol][m]) for m in self.modalities}
                missing = ()
            yield s, x, missing

    def permutations(self, inputs: Mapping[str, torch.Tensor], full_logits: Any, mask: Any):
        """Yield ``(modality, inputs)`` with that modality deranged across the batch; nothing for a
        batch of one. ``full_logits`` (the unpermuted pass's output) and ``mask`` (the batch's
        target) become the reference of this batch."""
        b = next(iter(inputs.values())).shape[0]
        if b < 2:
            return
        self.update_store(self.perm_base, full_logits, mask)
        for m in self.modalities:
            perm = derangement(b, self._perm_gen).to(inputs[m].device)
            x = dict(inputs)
            x[m] = inputs[m][perm]
            yield m, x

    def add(self, subset: frozenset, logits: Any, mask: Any) -> None:
        """Add the output of one coalition's pass (segmentation: logits ``(B, K, H, W)``) and
        the batch's target (segmentation: mask ``(B, H, W)``)."""
        self.update_store(self.stores[subset], logits, mask)
        for obs in self.observers:
            obs.add(subset, logits, mask)

    def add_permuted(self, modality: str, logits: Any, mask: Any) -> None:
        """Add the output of the pass with ``modality`` permuted."""
        self.update_store(self.perm_stores[modality], logits, mask)

    def result(self, class_names: list[str] | None = None) -> ContributionResult:
        mods, full = self.modalities, self.full
        vk, ck = METRIC_KEYS[self.metric]
        table = {s: self.summarize(st) for s, st in self.stores.items()}
        phi = shapley_values(mods, lambda s: table[s][vk])
        phi_c = shapley_values(mods, lambda s: np.asarray(table[s][ck], dtype=np.float64))
        result = ContributionResult(
            policy=self.policy,
            modalities=list(mods),
            coalitions={_coalition_key(s, mods): v for s, v in table.items()},
            drop={m: table[full][vk] - table[full - {m}][vk] for m in mods},
            shapley=phi,
            shapley_per_class={m: [float(v) for v in phi_c[m]] for m in mods},
            class_names=class_names,
            metric=self.metric,
        )
        if self.perceptual:
            base = self.summarize(self.perm_base)
            for m in mods:
                r = self.summarize(self.perm_stores[m])
                d = base[vk] - r[vk]
                result.perceptual[m] = {
                    f"{vk}_permuted": r[vk],
                    "drop": d,
                    "normalized": d / base[vk] if base[vk] > 0 else math.nan,
                    "per_class_drop": [a - b for a, b in zip(base[ck], r[ck])],
                }
        return result


@torch.no_grad()
def modality_contribution(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    policy: str = "zero",
    empty_policy: str | None = None,
    stats: StreamingModalityStats | None = None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    perceptual: bool = True,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> ContributionResult:
    """Evaluate every coalition of modalities in one pass and derive drop, Shapley and
    perceptual scores.

    Per batch this runs ``2^M`` forward passes (plus ``M`` permuted ones when ``perceptual``).
    Segmentation models are scored by mIoU; detectors (``model.task == "detection"``) by COCO
    AP (the task's evaluator, :func:`fusionzoo.tasks.get_task`).

    Args:
        model: a fusionzoo segmentation model or detector (``model.modalities``,
            ``model.num_classes``).
        batches: iterable of collated batches: one ``(B, C_m, H, W)`` tensor per modality and
            ``"mask"`` ``(B, H, W)`` (segmentation) or ``"boxes"`` / ``"labels"`` lists of
            ``(N_i, 4)`` xyxy / ``(N_i,)`` tensors (detection).
        policy: how a modality outside the coalition is removed (``REMOVAL_POLICIES``).
        empty_policy: policy for the empty coalition; ``None`` = ``policy``. Required with
            ``policy="missing"`` (a model cannot run with every modality missing); ``"zero"`` is
            the natural choice there because the models' missing path fills zeros too.
        stats: per-channel statistics for the ``"mean"`` / ``"noise"`` policies.
        num_classes: defaults to ``model.num_classes`` (detection: the AP categories are
            ``0..num_classes-1``).
        ignore_index: label ignored by the metric (segmentation).
        perceptual: also compute the perceptual score (needs batches of >= 2 examples).
        seed: seed of the noise and of the permutations.
        class_names: names of the classes for the report.

    Returns:
        A :class:`ContributionResult` (``metric`` ``"mIoU"`` or ``"AP"``).
    """
    mods = list(model.modalities)
    device = _model_device(model)
    task = task_for(model, ignore_index)
    acc = ContributionAccumulator(task, mods, int(num_classes or model.num_classes), policy, empty_policy, stats,
                                  perceptual, seed, device)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs, target = split_batch(task, batch, mods, device)
            full_output = None
            for s, x, missing in acc.coalitions(inputs):
                output = model(x, missing=missing)
                acc.add(s, output, target)
                if s == acc.full:
                    full_output = output
            if perceptual:
                for m, x in acc.permutations(inputs, full_output, target):
                    acc.add_permuted(m, model(x), target)
    finally:
        model.train(was_training)
    return acc.result(class_names)


@torch.no_grad()
def perceptual_score(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    num_permutations: int = 1,
    seed: int = 0,
    ignore_index: int = 255,
) -> dict[str, dict[str, float]]:
    """Perceptual score of every modality (Gat et al. 2021), averaged over permutations.

    Args:
        model: a fusionzoo segmentation model.
        batches: a re-iterable of collated batches (a list or a DataLoader), batch size >= 2.
        num_permutations: independent derangements per batch; the drops are averaged.
        seed: permutation seed.
        ignore_index: label ignored by the metric.

    Returns:
        modality -> ``{"miou": full mIoU, "miou_permuted", "drop", "normalized"}``.
    """
    mods = list(model.modalities)
    device = _model_device(model)
    k = int(model.num_classes)
    task = task_for(model, ignore_index)
    gen = torch.Generator().manual_seed(seed)
    base = ConfusionMatrix(k, ignore_index)
    perm = {m: [ConfusionMatrix(k, ignore_index) for _ in range(num_permutations)] for m in mods}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs, mask = split_batch(task, batch, mods, device)
            base.update(model(inputs).argmax(1), mask)
            for m in mods:
                for cm in perm[m]:
                    x = dict(inputs)
                    x[m] = inputs[m][derangement(mask.shape[0], gen).to(device)]
                    cm.update(model(x).argmax(1), mask)
    finally:
        model.train(was_training)
    full = base.compute()["miou"]
    out = {}
    for m in mods:
        mp = float(np.mean([cm.compute()["miou"] for cm in perm[m]]))
        out[m] = {"miou": full, "miou_permuted": mp, "drop": full - mp,
                  "normalized": (full - mp) / full if full > 0 else math.nan}
    return out
