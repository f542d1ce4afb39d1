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

:class:`ContributionAccumulator` measures several removal policies in one pass (passes that a
policy does not change are shared) and, for segmentation, keeps Poisson-bootstrap replicates of
every pass's confusion matrix (:class:`WeightedConfusion`), from which :meth:`ContributionAccumulator.derive`
recomputes every derived number per replicate with the code of the point values
(:mod:`.intervals`; detectors' AP has no replicates: :data:`REPLICATE_SCORES`).
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

from ..detection.metrics import weighted_coco_ap
from ..tasks import ConfusionMatrix, Evaluator, Task, class_map, get_task
from .intervals import percentile_interval

__all__ = [
    "METRIC_KEYS",
    "REMOVAL_POLICIES",
    "REPLICATE_SCORES",
    "TASK_RESULTS",
    "ContributionAccumulator",
    "ContributionResult",
    "StreamingModalityStats",
    "WeightedConfusion",
    "WeightedDetections",
    "confusion_iou",
    "contribution_keys",
    "derangement",
    "modality_contribution",
    "outputs_agree",
    "perceptual_score",
    "plain",
    "remove_modalities",
    "replicate_intervals",
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

    @classmethod
    def measure(cls, batches: Iterable[Mapping[str, Any]], modalities: Sequence[str],
                max_batches: int | None = None) -> StreamingModalityStats:
        """Exact statistics of ``modalities`` over collated ``batches`` (the first
        ``max_batches``): one pass that reads the inputs and runs no model."""
        stats = cls()
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            stats.update({m: batch[m] for m in modalities if m in batch})
        return stats

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


def plain(tree: Any) -> Any:
    """Arrays in a nested dict -> floats (0-d) and lists of floats (1-d), for point results."""
    if isinstance(tree, Mapping):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        return float(tree) if tree.ndim == 0 else [float(v) for v in tree.ravel()]
    if isinstance(tree, np.floating):
        return float(tree)
    return tree


def replicate_intervals(tree: Any, level: float, prefix: str = "") -> dict[str, list[float]]:
    """Percentile intervals of every leaf of a nested dict of bootstrap replicates.

    A leaf ``(R,)`` gives one interval at its dotted path, ``(R, K)`` one per column at
    ``path.<k>`` (the JSON paths of :mod:`fusionzoo.interpret.intervals`); other leaves (names,
    strings) are skipped.

    Example:
        >>> replicate_intervals({"shapley": {"rgb": np.arange(100.0)}}, 0.9)
        {'shapley.rgb': [4.95, 94.05]}
    """
    out: dict[str, list[float]] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(replicate_intervals(v, level, f"{prefix}{k}."))
    elif isinstance(tree, np.ndarray) and tree.ndim in (1, 2):
        path = prefix[:-1]
        if tree.ndim == 1:
            out[path] = percentile_interval(tree, level)
        else:
            out.update({f"{path}.{i}": iv for i, iv in enumerate(percentile_interval(tree, level))})
    return out


def confusion_iou(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(miou (...), iou (..., K))`` of confusion matrices ``(..., K, K)`` (rows: ground truth),
    in :class:`~fusionzoo.tasks.ConfusionMatrix`'s convention (:func:`miou_summary`): a class
    counts when its union is > 0, a class in neither ground truth nor prediction is nan."""
    m = matrix.to(torch.float64)
    tp = m.diagonal(dim1=-2, dim2=-1)
    union = m.sum(-1) + m.sum(-2) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1e-300), torch.full_like(tp, math.nan))
    return iou.nanmean(-1), iou


class WeightedConfusion:
    """``R`` bootstrap replicates of a confusion matrix, ``(R, K, K)`` float64.

    Per batch the per-image matrices ``(B, K, K)`` are counted once and combined with the
    replicates' image weights ``(R, B)`` (:func:`fusionzoo.interpret.intervals.poisson_weights`):
    replicate ``r`` is the confusion matrix of a dataset holding image ``i`` ``w_ri`` times.
    Memory ``R K^2``, flat in the number of images.

    Args:
        num_classes: ``K``.
        ignore_index: label excluded from every count.
        replicates: ``R``.
    """

    def __init__(self, num_classes: int, ignore_index: int, replicates: int) -> None:
        self.k, self.ignore_index = int(num_classes), int(ignore_index)
        self.matrix = torch.zeros(replicates, self.k, self.k, dtype=torch.float64)

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> None:
        """Add logits ``(B, K, H, W)`` (or class ids ``(B, H, W)``) against ``target``
        ``(B, H, W)`` with image weights ``(R, B)``."""
        pred = class_map(output) if output.dim() == target.dim() + 1 else output
        if pred.shape != target.shape or weights.shape[1] != target.shape[0]:
            raise ValueError(f"prediction {tuple(pred.shape)}, target {tuple(target.shape)} and weights "
                             f"{tuple(weights.shape)} disagree; expected (B, H, W), (B, H, W) and (R, B)")
        k, b = self.k, target.shape[0]
        image = torch.arange(b, device=target.device)[:, None, None].expand_as(target)
        valid = target != self.ignore_index
        idx = (image[valid] * k + target[valid].long()) * k + pred[valid].long()
        per_image = torch.bincount(idx, minlength=b * k * k).reshape(b, k * k).to(torch.float64)
        self.matrix += (weights.to(per_image) @ per_image).reshape(-1, k, k).cpu()

    def values(self) -> dict[str, np.ndarray]:
        """``{"miou": (R,), "iou": (R, K)}``."""
        miou, iou = confusion_iou(self.matrix)
        return {"miou": miou.numpy(), "iou": iou.numpy()}


class WeightedDetections:
    """``R`` bootstrap replicates of COCO AP: AP is not a sum over images, so the pass's
    detections and targets are kept (as :class:`~fusionzoo.tasks.DetectionEvaluator` keeps them)
    with each image's replicate weights ``(R,)``, and :func:`fusionzoo.detection.metrics.weighted_coco_ap`
    redoes pycocotools' accumulation per replicate at the end. Memory ``R`` floats per image
    beside the detections.

    Args:
        num_classes: ``K`` (AP categories ``0..K-1``).
        ignore_index: unused (the signature of :data:`REPLICATE_SCORES`).
        replicates: ``R``.
    """

    def __init__(self, num_classes: int, ignore_index: int, replicates: int) -> None:
        self.k, self.replicates = int(num_classes), int(replicates)
        self.predictions: list[dict[str, torch.Tensor]] = []
        self.targets: list[dict[str, torch.Tensor]] = []
        self.weights: list[np.ndarray] = []

    def update(self, output: Sequence[Mapping[str, torch.Tensor]], target: Sequence[Mapping[str, torch.Tensor]],
               weights: torch.Tensor) -> None:
        """Add a detector's per-image outputs and targets with image weights ``(R, B)``."""
        if weights.shape != (self.replicates, len(target)) or len(output) != len(target):
            raise ValueError(f"{len(output)} detection outputs, {len(target)} targets and weights "
                             f"{tuple(weights.shape)}: expected one output per image and ({self.replicates}, B)")
        self.predictions += [{k: o[k].detach().float().cpu() for k in ("boxes", "scores", "labels")} for o in output]
        self.targets += [{k: v.cpu() for k, v in t.items()} for t in target]
        self.weights.append(weights.detach().double().cpu().numpy())

    def values(self) -> dict[str, np.ndarray]:
        """``{"ap": (R,), "ap_per_class": (R, K), ...}`` (:func:`~fusionzoo.detection.metrics.weighted_coco_ap`)."""
        w = np.concatenate(self.weights, 1) if self.weights else np.zeros((self.replicates, 0))
        return weighted_coco_ap(self.predictions, self.targets, w, self.k)


# task name -> the bootstrap-replicate score store of a coalition, (num_classes, ignore_index,
# replicates) -> object with update(output, target, weights (R, B)) and values() -> {value key: (R,),
# per-class key: (R, K)}. A task not listed carries no replicates: its contribution has no interval.
REPLICATE_SCORES: dict[str, Callable[[int, int, int], Any]] = {"segmentation": WeightedConfusion,
                                                               "detection": WeightedDetections}


def outputs_agree(a: Any, b: Any) -> bool:
    """Whether two model outputs (tensors, or lists / dicts of them) agree to float rounding."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape):
            return False
        scale = float(a.abs().max().clamp(min=1)) if a.numel() else 1.0
        return torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6 * scale)
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(outputs_agree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(outputs_agree, a, b))
    return a == b


class ContributionAccumulator:
    """Streams the per-coalition and permuted scores behind :class:`ContributionResult`, under one
    or more removal policies at once.

    Per batch, iterate :meth:`coalitions` (every subset of kept modalities under every policy,
    each distinct pass once: the full input is the same under every policy, and the empty
    coalition of the ``missing`` policy is its ``empty_policy`` one) and :meth:`permutations`
    (``M`` inputs: one modality deranged across the batch), run the model on each, and
    :meth:`add` the outputs. Used by :func:`modality_contribution` and by
    :func:`fusionzoo.interpret.run` (which also captures taps on some of these passes).

    The task metric is the task's own evaluator (:meth:`fusionzoo.tasks.Task.evaluator`, one per
    pass): a confusion matrix (mIoU and class IoUs) for segmentation, the stored detections of
    every pass and pycocotools (COCO box AP and per-class AP) for detection. A coalition entry
    keeps the evaluator's :attr:`~fusionzoo.tasks.Task.metric` and
    :attr:`~fusionzoo.tasks.Task.per_class_key` values (plus, per :data:`TASK_RESULTS`, the
    task's further values, e.g. AP50). With ``replicates > 0`` and a task in
    :data:`REPLICATE_SCORES`, every pass also keeps ``R`` Poisson-bootstrap replicate scores
    (:meth:`replicate_values`), from the image weights given to :meth:`add`.

    Args:
        task: the model's task (:func:`task_for`).
        modalities: the model's modalities (players).
        num_classes: ``K``.
        policy: the main removal policy for modalities outside a coalition (:meth:`result`'s default).
        empty_policy: policy for the empty coalition (``None`` = ``policy``; must not be
            ``"missing"``; further ``"missing"`` policies use ``"zero"``).
        stats: statistics for ``"mean"`` / ``"noise"``.
        perceptual: also accumulate the permuted passes.
        seed: noise and permutation seed.
        device: device of the noise generator (the inputs' device).
        policies: further removal policies measured in the same pass.
        replicates: bootstrap replicates ``R`` (0: none).
    """

    def __init__(self, task: Task, modalities: Sequence[str], num_classes: int, policy: str = "zero",
                 empty_policy: str | None = None, stats: StreamingModalityStats | None = None,
                 perceptual: bool = True, seed: int = 0, device: torch.device | str = "cpu",
                 policies: Sequence[str] = (), replicates: int = 0) -> None:
        self.policies = list(dict.fromkeys((policy, *policies)))
        bad = [p for p in self.policies if p not in REMOVAL_POLICIES]
        if bad:
            raise ValueError(f"removal policy must be one of {REMOVAL_POLICIES}, got {bad[0]!r}")
        if (empty_policy or policy) == "missing" or empty_policy not in (None, *REMOVAL_POLICIES):
            raise ValueError("the empty coalition needs a policy other than 'missing' (a model needs at least "
                             "one modality); pass empty_policy='zero' (or 'mean' / 'noise')")
        if task.name not in TASK_RESULTS:
            raise ValueError(f"no contribution metric for task {task.name!r}; known: {sorted(TASK_RESULTS)}")
        self.task = task
        self.metric, self._extra_keys = TASK_RESULTS[task.name]
        self.modalities = list(modalities)
        self.num_classes = int(num_classes)
        self.policy, self.stats, self.perceptual = policy, stats, perceptual
        # policy -> the policy of its empty coalition
        self.empty = {p: empty_policy or (p if p != "missing" else "zero") for p in self.policies}
        self.empty_policy = self.empty[policy]
        self.subsets = [frozenset(c) for r in range(len(self.modalities) + 1)
                        for c in itertools.combinations(self.modalities, r)]
        # a pass is (its removal policy, the kept modalities); "" for the full input
        self.users: dict[tuple[str, frozenset], list[str]] = {}
        for p in self.policies:
            for s in self.subsets:
                self.users.setdefault(self.key(p, s), []).append(p)
        self.replicates = int(replicates) if task.name in REPLICATE_SCORES else 0
        self.stores = {k: self.new_store() for k in self.users}
        self.perm_stores = {m: self.new_store() for m in self.modalities}
        # the unpermuted reference over exactly the batches that were permuted (a batch of one
        # example cannot be permuted and is skipped by both)
        self.perm_base = self.new_store()
        self.reps = ({k: self.new_replicates() for k in (*self.users, *self.modalities, "perm_base")}
                     if self.replicates else {})
        self._gen = torch.Generator(device=device).manual_seed(seed)
        self._perm_gen = torch.Generator().manual_seed(seed + 1)
        # policy -> objects with add(subset, output, target, weights) that also see its coalition
        # passes, e.g. :class:`.pid.PredictionJoint` (no forward pass of their own)
        self.observers: dict[str, list[Any]] = {p: [] for p in self.policies}

    def key(self, policy: str, subset: frozenset) -> tuple[str, frozenset]:
        """The pass that coalition ``subset`` uses under ``policy``."""
        if subset == self.full:
            return "", subset
        return (policy if subset else self.empty[policy]), subset

    # -- the task metric --------------------------------------------------------------------------
    def new_store(self) -> Evaluator:
        """An empty score store of one coalition: the task's evaluator (with per-class values)."""
        return self.task.evaluator(self.num_classes, per_class=True)

    def new_replicates(self) -> Any:
        """An empty replicate store (:data:`REPLICATE_SCORES`)."""
        return REPLICATE_SCORES[self.task.name](self.num_classes, getattr(self.task, "ignore_index", 255),
                                                self.replicates)

    def update_store(self, store: Evaluator, output: Any, target: Any) -> None:
        """Add one pass: ``output`` as :meth:`fusionzoo.tasks.Task.predict` returns it (logits
        ``(B, K, H, W)``, or the detector's per-image dicts), ``target`` as
        :meth:`fusionzoo.tasks.Task.targets` does."""
        store.update(output, target)

    def _update(self, name: Any, store: Evaluator, output: Any, target: Any, weights: torch.Tensor | None) -> None:
        self.update_store(store, output, target)
        if self.reps:
            if weights is None:
                raise ValueError(f"this accumulator keeps {self.replicates} bootstrap replicates: pass the "
                                 "batch's (R, B) image weights (fusionzoo.interpret.intervals.poisson_weights)")
            self.reps[name].update(output, target, weights)

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

    def coalitions(self, inputs: Mapping[str, torch.Tensor], policies: Sequence[str] | None = None):
        """Yield ``(key, inputs, missing)`` for every distinct coalition pass of one batch (the
        full input first); ``key`` is ``(policy, kept modalities)`` (:meth:`key`), to give to
        :meth:`add`. ``policies``: only the passes these policies use (default all)."""
        keys = [k for k in self.users if policies is None or any(p in policies for p in self.users[k])]
        # Common random numbers: one replacement per modality, policy and batch, shared by every
        # coalition, so coalition differences are not blurred by fresh noise draws.
        filled = {pol: remove_modalities(inputs, self.modalities, pol, self.stats, self._gen)[0]
                  for pol in dict.fromkeys(p for p, _ in keys) if pol not in ("", "missing")}
        for pol, s in sorted(keys, key=lambda k: len(k[1]), reverse=True):
            removed = [m for m in self.modalities if m not in s]
            if pol == "missing":
                x, missing = remove_modalities(inputs, removed, pol)
            else:
                x = {m: (inputs[m] if m in s else filled[pol][m]) for m in self.modalities}
                missing = ()
            yield (pol, s), x, missing

    def permutations(self, inputs: Mapping[str, torch.Tensor], full_logits: Any, mask: Any,
                     weights: torch.Tensor | None = None):
        """Yield ``(modality, inputs)`` with that modality deranged across the batch; nothing for a
        batch of one. ``full_logits`` (the unpermuted pass's output) and ``mask`` (the batch's
        target) become the reference of this batch."""
        b = next(iter(inputs.values())).shape[0]
        if b < 2:
            return
        self._update("perm_base", self.perm_base, full_logits, mask, weights)
        for m in self.modalities:
            perm = derangement(b, self._perm_gen).to(inputs[m].device)
            x = dict(inputs)
            x[m] = inputs[m][perm]
            yield m, x

    def skip(self, batch_size: int) -> None:
        """A batch that another process runs (a sharded dataset): draw its derangements, so that
        this process's next batch is permuted as one process would permute it. The ``noise``
        policy's draws depend on the inputs' shapes and are not replayed: it cannot be sharded."""
        if self.perceptual and batch_size >= 2:
            for _ in self.modalities:
                derangement(batch_size, self._perm_gen)

    def add(self, key: tuple[str, frozenset], logits: Any, mask: Any, weights: torch.Tensor | None = None) -> None:
        """Add the output of one coalition pass (``key`` from :meth:`coalitions`; segmentation:
        logits ``(B, K, H, W)``), the batch's target (segmentation: mask ``(B, H, W)``) and,
        with replicates, the batch's image weights ``(R, B)``."""
        self._update(key, self.stores[key], logits, mask, weights)
        for p in self.users[key]:
            for obs in self.observers[p]:
                obs.add(key[1], logits, mask, weights)

    def add_permuted(self, modality: str, logits: Any, mask: Any, weights: torch.Tensor | None = None) -> None:
        """Add the output of the pass with ``modality`` permuted."""
        self._update(modality, self.perm_stores[modality], logits, mask, weights)

    def drop_policy(self, policy: str) -> None:
        """Stop measuring ``policy`` (not the main one) and forget what it accumulated alone."""
        if policy == self.policy:
            raise ValueError(f"cannot drop the main policy {policy!r}")
        self.policies.remove(policy)
        self.observers.pop(policy, None)
        for k in list(self.users):
            self.users[k] = [p for p in self.users[k] if p != policy]
            if not self.users[k]:
                del self.users[k], self.stores[k]
                self.reps.pop(k, None)

    # -- results -----------------------------------------------------------------------------------
    def derive(self, table: Mapping[frozenset, Mapping[str, Any]], perm: Mapping[str, Mapping[str, Any]] | None
               ) -> dict[str, Any]:
        """Drop, Shapley values and perceptual score from coalition scores: one piece of code for
        point values (``table[S][value key]`` a number, per-class a ``(K,)`` list) and bootstrap
        replicates (``(R,)`` and ``(R, K)`` arrays); ``perm`` holds ``"base"`` and each
        modality's permuted scores (None: no perceptual score). Returns arrays."""
        mods, full = self.modalities, self.full
        vk, ck = METRIC_KEYS[self.metric]

        def v(s: frozenset, key: str) -> np.ndarray:
            return np.asarray(table[s][key], dtype=np.float64)

        out: dict[str, Any] = {
            "drop": {m: v(full, vk) - v(full - {m}, vk) for m in mods},
            "shapley": shapley_values(mods, lambda s: v(s, vk)),
            "shapley_per_class": shapley_values(mods, lambda s: v(s, ck)),
        }
        if perm is not None:
            base, base_c = (np.asarray(perm["base"][k], dtype=np.float64) for k in (vk, ck))
            out["perceptual"] = {}
            for m in mods:
                r, r_c = (np.asarray(perm[m][k], dtype=np.float64) for k in (vk, ck))
                with np.errstate(divide="ignore", invalid="ignore"):
                    norm = np.where(base > 0, (base - r) / base, math.nan)
                out["perceptual"][m] = {f"{vk}_permuted": r, "drop": base - r, "normalized": norm,
                                        "per_class_drop": base_c - r_c}
        return out

    def result(self, class_names: list[str] | None = None, policy: str | None = None) -> ContributionResult:
        """The point estimates under ``policy`` (default the main one)."""
        policy = policy or self.policy
        mods = self.modalities
        table = {s: self.summarize(self.stores[self.key(policy, s)]) for s in self.subsets}
        perm = ({"base": self.summarize(self.perm_base), **{m: self.summarize(self.perm_stores[m]) for m in mods}}
                if self.perceptual else None)
        terms = plain(self.derive(table, perm))
        return ContributionResult(
            policy=policy, modalities=list(mods), coalitions={_coalition_key(s, mods): v for s, v in table.items()},
            drop=terms["drop"], shapley=terms["shapley"], shapley_per_class=terms["shapley_per_class"],
            perceptual=terms.get("perceptual", {}), class_names=class_names, metric=self.metric)

    def replicate_values(self, policy: str | None = None) -> dict[str, Any] | None:
        """Bootstrap replicates of :meth:`result`'s numbers under ``policy``: the same nested keys
        (``coalitions``, ``drop``, ``shapley``, ``shapley_per_class``, ``perceptual``), every leaf
        an ``(R,)`` or ``(R, K)`` array; None without replicates."""
        if not self.reps:
            return None
        policy = policy or self.policy
        mods = self.modalities
        table = {s: self.reps[self.key(policy, s)].values() for s in self.subsets}
        perm = ({"base": self.reps["perm_base"].values(), **{m: self.reps[m].values() for m in mods}}
                if self.perceptual else None)
        return {"coalitions": {_coalition_key(s, mods): v for s, v in table.items()}, **self.derive(table, perm)}


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
            for key, x, missing in acc.coalitions(inputs):
                output = model(x, missing=missing)
                acc.add(key, output, target)
                if key[1] == acc.full:
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
            base.update(class_map(model(inputs)), mask)
            for m in mods:
                for cm in perm[m]:
                    x = dict(inputs)
                    x[m] = inputs[m][derangement(mask.shape[0], gen).to(device)]
                    cm.update(class_map(model(x)), mask)
    finally:
        model.train(was_training)
    full = base.compute()["miou"]
    out = {}
    for m in mods:
        mp = float(np.mean([cm.compute()["miou"] for cm in perm[m]]))
        out[m] = {"miou": full, "miou_permuted": mp, "drop": full - mp,
                  "normalized": (full - mp) / full if full > 0 else math.nan}
    return out
