"""``fusionzoo.interpret.run``: every metric, one pass, any registered model.

:func:`run` streams a dataset once through a loop over metric accumulators
(:mod:`.accumulators`, one metric a file, each with ``update`` / ``compute`` and a declaration
of the taps and passes it needs). Per batch it runs the model on the full input while
capturing the taps the accumulators need (CKA, semantic variance, health, gates), then the
removal passes: every coalition of modalities (contribution; the passes with one modality
removed also capture taps for *reliance*, ``1 - CKA(tap on full input, tap with m removed)``),
then each modality permuted across the batch (perceptual score). Grad-CAM runs on the first
batch. Memory is bounded by accumulators (:mod:`.cka`, :mod:`.semantic_variance`,
:mod:`.health`), never by stored activations. Because it only sees taps, it works unchanged for
early, middle, late and hybrid models: metrics whose taps a model lacks (e.g. cross-modal CKA
for early fusion) are simply absent from its result. Everything task-specific comes from the
model's :class:`~fusionzoo.tasks.Task` (:func:`fusionzoo.tasks.get_task`): its targets, its
evaluator (the contribution metric: mIoU, or COCO AP for detectors) and its default CKA rows
(one per ground-truth object for detectors); the Grad-CAM score is looked up by task name
(:data:`.accumulators.EXPLAIN`).

:func:`fusionzoo.interpret.compare` (:mod:`.compare`) aligns several results stage by stage.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from .._json import to_json
from .._registry import model_entry
from ..data import collate
from ..engine.distributed import DistInfo, all_reduce_sum_, broadcast_object, dist_info
from ..stream_memo import reusing_streams
from ..taps import capture
from ..tasks import class_map
from .accumulators import ACCUMULATORS, BatchContext, MetricAccumulator, Pass, RunSpec
from .contribution import (
    REMOVAL_POLICIES,
    StreamingModalityStats,
    contribution_keys,
    remove_modalities,
    task_for,
)
from .intervals import DEFAULT_LEVEL, DEFAULT_REPLICATES, interval_paths, poisson_weights
from .plan import model_name, plan_taps

__all__ = ["METRICS", "PASS_PIXELS", "ROW_RULES", "InterpretResult", "load_result", "run"]

# input pixels of one batched forward of removal passes (run's pass_pixels)
PASS_PIXELS = 1 << 22
METRICS = ("cka", "semantic_variance", "health", "contribution", "reliance", "gradcam", "gates", "purification")
ROW_RULES = ("sample", "pool", "object")


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class InterpretResult:
    """Every number :func:`run` measured for one model on one dataset.

    Attributes:
        model: registry name (``model.config["name"]``) or the class name.
        fusion: the registry's fusion family (``early`` / ``middle`` / ``late`` / ``hybrid``), if known.
        config: ``model.config``.
        modalities: the model's modalities.
        num_classes: ``K``.
        class_names: class names, when the dataset has them.
        num_images: images seen.
        taps: tap name -> TapInfo fields, in execution order.
        settings: the options of the run (row rule, removal policy, ...).
        cka: ``{"pairs": [{"a", "b", "kind", "stage", "cka", "cka_biased"}]}``; kinds are
            ``cross_modal`` (two modalities, same stage), ``modality_fused`` (modality vs the
            fused stream, same stage), ``within`` (one stream, two stages) and ``to_final`` (a
            stage tap vs the final representation: ``decoder.out``, or ``head.logits`` for
            models without one, e.g. late fusion).
        semantic_variance: tap -> :class:`SemanticVarianceResult` fields.
        health: ``{"effective_rank": {tap: v}, "feature_norm": {tap: v},
            "norm_ratio": {stage: {"a/b": v}}}``.
        contribution: :class:`ContributionResult` fields (``metric``: ``"mIoU"`` for
            segmentation, ``"AP"`` for detection), plus ``unimodal_heads`` (modality ->
            ``{"miou", "iou"}`` of that modality's own prediction) for segmentation models with
            ``{m}.head`` taps, ``interaction`` and ``decomposition`` (pairwise interaction index
            and redundancy / uniqueness / synergy of the score, :mod:`.interaction`), ``harsanyi``
            (the 3-way interaction when ``M >= 3``), for segmentation ``pid`` (BROJA
            decomposition of the predictions in bits, :mod:`.pid`), all under the run's main
            ``policy``, and ``policies``: removal policy -> the same keys under that policy
            (``settings["policies"]``).
        reliance: tap -> modality -> ``1 - CKA(tap, tap with that modality removed)``.
        gates: tap -> stream -> mean value over the dataset.
        purification: models with purification gates only (``{m}.stageN.gate`` taps): keep rates
            per gate and class, and contribution with the gates as trained and forced open
            (:class:`.accumulators.PurificationMetric`).
        training: a training history (:class:`ModalityBalanceCallback` state), when known.
        timings: seconds per phase.
        intervals: dotted path of a number (``"contribution.shapley.rgb"``) -> its ``[lo, hi]``
            bootstrap interval over images (:mod:`.intervals`; ``settings["intervals"]`` says
            how many replicates at which level); empty when the run kept no replicates.
        artifacts: in-memory extras for plots (Grad-CAM maps and, for segmentation, the class
            each image's map explains in ``gradcam_classes``, first-batch gate maps, display
            images; for detectors also the first images' ``detections``, ``targets`` and the
            ``gradcam_detections`` explained); not written to JSON.
    """

    model: str
    fusion: str | None
    config: dict[str, Any]
    modalities: list[str]
    num_classes: int
    class_names: list[str] | None
    num_images: int
    taps: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    cka: dict[str, Any] | None = None
    semantic_variance: dict[str, dict[str, Any]] | None = None
    health: dict[str, Any] | None = None
    contribution: dict[str, Any] | None = None
    reliance: dict[str, dict[str, float]] | None = None
    gates: dict[str, dict[str, float]] | None = None
    purification: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A strict-JSON dict of every number (NaN -> null); ``artifacts`` are left out."""
        return to_json({f.name: getattr(self, f.name) for f in fields(self) if f.name != "artifacts"})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InterpretResult:
        """Rebuild from :meth:`to_json` output (nulls stay None)."""
        names = {f.name for f in fields(cls)} - {"artifacts"}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"not an InterpretResult JSON: unknown keys {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    # -- convenience views -------------------------------------------------------------------
    def cka_pairs(self, kind: str | None = None) -> list[dict[str, Any]]:
        """CKA rows, optionally of one kind."""
        rows = (self.cka or {}).get("pairs", [])
        return [r for r in rows if kind is None or r["kind"] == kind]

    def score(self) -> float | None:
        """The task metric with every modality present (from the contribution pass): mIoU for
        segmentation, COCO AP for detection (``contribution["metric"]`` says which)."""
        if not self.contribution:
            return None
        _, key, _ = contribution_keys(self.contribution)
        return self.contribution["coalitions"]["+".join(self.modalities)][key]

    def miou(self) -> float | None:
        """mIoU with every modality present (None for detectors: see :meth:`score`)."""
        if not self.contribution or contribution_keys(self.contribution)[0] != "mIoU":
            return None
        return self.score()


def load_result(path: str | Path) -> InterpretResult:
    """Read a ``metrics.json`` written by :meth:`InterpretResult.save` (a file or its directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a metrics.json written by fusionzoo interpret")
    return InterpretResult.from_json(json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def _fusion_of(name: str) -> str | None:
    try:
        return model_entry(name).fusion
    except KeyError:  # not a registered name (a hand-built model): no family to report
        return None


def _as_batches(data: Any, batch_size: int, num_workers: int) -> Iterable[Mapping[str, Any]]:
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    if isinstance(data, Mapping):
        return [data]  # a single collated batch
    return data


def _display(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale one image ``(C, H, W)`` to [0, 1] for display; 1 channel stays 1 channel."""
    x = x.detach().float().cpu()
    lo, hi = x.amin(), x.amax()
    return (x - lo) / (hi - lo).clamp(min=1e-12)


def _segmentation_display(ctx: BatchContext, n: int) -> dict[str, Any]:
    return {"predictions": class_map(ctx.output[:n]).cpu()}


def _detection_display(ctx: BatchContext, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"detections": [{k: d[k].cpu() for k in ("boxes", "scores", "labels")}
                                          for d in ctx.output[:n]]}
    if ctx.boxes() is not None:
        out["targets"] = ctx.boxes()[:n]
    return out


# task name -> the first images' predictions shown in the report (artifacts)
DISPLAY: dict[str, Callable[[BatchContext, int], dict[str, Any]]] = {
    "segmentation": _segmentation_display,
    "detection": _detection_display,
}


def _first_batch_artifacts(ctx: BatchContext) -> dict[str, Any]:
    n = ctx.spec.gradcam_images
    out: dict[str, Any] = {"images": {m: [_display(x[i]) for i in range(min(n, x.shape[0]))]
                                      for m, x in ctx.inputs.items()}}
    if ctx.mask is not None:
        out["masks"] = ctx.mask[:n].cpu()
    display = DISPLAY.get(ctx.spec.task.name)
    if display is not None:
        out.update(display(ctx, n))
    return out


def _union(accs: Sequence[MetricAccumulator], attr: str, order: Iterable[str]) -> list[str]:
    """The taps any accumulator needs under ``needs.<attr>``, in execution order."""
    wanted = {t for a in accs for t in getattr(a.needs, attr)}
    return [t for t in order if t in wanted]


def _own_removal_passes(ctx: BatchContext) -> Iterable[Pass]:
    """One pass per modality removed (``spec.policy``), for reliance when no accumulator plans
    the removal passes (no contribution, or a batch without the task's target)."""
    spec = ctx.spec
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed + ctx.index)
    full = frozenset(spec.modalities)
    for m in spec.modalities:
        x, miss = remove_modalities(ctx.inputs, [m], spec.policy, spec.stats, gen)
        yield Pass(full - {m}, x, tuple(miss))


def _split(output: Any, sizes: Sequence[int]) -> list[Any] | None:
    """One batched forward's output cut back into its passes (along the batch: a tensor
    ``(sum sizes, ...)``, or a list with one entry per image, as detectors return); None for an
    output of another shape."""
    if isinstance(output, torch.Tensor):
        return list(output.split(list(sizes)))
    if isinstance(output, list) and len(output) == sum(sizes):
        ends = list(itertools.accumulate(sizes))
        return [output[e - n:e] for n, e in zip(sizes, ends)]
    return None


def _chunks(passes: Sequence[Pass], pixels: int | None) -> list[list[Pass]]:
    """Consecutive passes that one forward can run together: the same ``missing`` modalities
    and input shapes, at most ``pixels`` input pixels (batch x height x width) in all; always at
    least one pass."""
    out: list[list[Pass]] = []
    size = 0
    for p in passes:
        x = next(iter(p.inputs.values()))
        n = x.shape[0] * x.shape[-2] * x.shape[-1]
        last = out[-1] if out else None
        if (last is not None and pixels and size + n <= pixels and last[0].missing == p.missing
                and all(last[0].inputs[m].shape[1:] == v.shape[1:] for m, v in p.inputs.items())):
            last.append(p)
            size += n
        else:
            out.append([p])
            size = n
    return out


def _same_for_every_image(inputs: Mapping[str, torch.Tensor]) -> bool:
    """True when every image of the batch has the same inputs (``(B, ...)`` tensors, B > 1):
    the empty coalition under the ``zero`` and ``mean`` policies, whose forward is then that of
    one image."""
    xs = list(inputs.values())
    return bool(xs) and xs[0].shape[0] > 1 and all(torch.equal(x, x[:1].expand_as(x)) for x in xs)


def _broadcast(output: Any, size: int) -> Any:
    """One image's forward output made the output of ``size`` identical images (a view along
    the batch for a tensor, the same entry repeated for a detector's per-image list); None for an
    output of another shape."""
    if isinstance(output, torch.Tensor) and output.shape[:1] == (1,):
        return output.expand(size, *output.shape[1:])
    if isinstance(output, list) and len(output) == 1:
        return output * size
    return None


def _run_passes(ctx: BatchContext, accs: Sequence[MetricAccumulator], removal_taps: list[str]) -> None:
    """The removal passes of one batch, each given to every accumulator (in the planned order).

    Passes that differ only in their inputs run as one forward of their concatenated batches
    (``spec.pass_pixels`` input pixels at most; batch-norm layers are in eval mode, so an
    image's output does not depend on the others in its batch), and the full-input pass reuses
    the forward that captured the taps. A pass whose inputs are the same for every image (the
    empty coalition under ``zero`` or ``mean``: every modality filled with one constant) runs the
    forward of one image and broadcasts it, so the ``2^M`` coalitions cost ``2^M - 1`` forwards
    of the batch. Passes with one modality removed capture the removal taps.
    """
    spec = ctx.spec
    model, full = spec.model, frozenset(spec.modalities)
    planner = next((a for a in accs if a.needs.coalitions), None)
    passes = planner.passes(ctx) if planner is not None else None
    if passes is None:
        passes = _own_removal_passes(ctx) if removal_taps else ()

    def captures(p: Pass) -> bool:
        return bool(removal_taps) and p.shared and p.permuted is None and len(full - p.kept) == 1

    def give(p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        for a in (accs if p.shared else [planner]):
            a.update_pass(ctx, p, output, acts)

    todo = deque(passes)  # a generator: its bookkeeping (the permuted passes' reference) runs here
    # pass -> (output, removal taps); the full-input pass is the forward that captured the taps
    ready = {id(p): (ctx.output, ctx.acts) for p in todo if p.kept == full and p.permuted is None}

    def flush() -> None:  # hand out the passes whose forward ran, in the planned order, and let them go
        while todo and id(todo[0]) in ready:
            p = todo.popleft()
            give(p, *ready.pop(id(p)))

    flush()
    for p in [p for p in todo if id(p) not in ready and _same_for_every_image(p.inputs)]:
        size = next(iter(p.inputs.values())).shape[0]
        with _capturing(model, removal_taps, captures(p)) as acts:
            output = _broadcast(model({m: x[:1] for m, x in p.inputs.items()}, missing=p.missing), size)
        if output is not None:  # else an output that is not per image: the pass runs whole below
            ready[id(p)] = (output, {t: v.expand(size, *v.shape[1:]) for t, v in acts.items()})
    flush()
    for chunk in _chunks([p for p in todo if id(p) not in ready], spec.pass_pixels):
        sizes = [next(iter(p.inputs.values())).shape[0] for p in chunk]
        x = chunk[0].inputs if len(chunk) == 1 else {m: torch.cat([p.inputs[m] for p in chunk]) for m in chunk[0].inputs}
        with _capturing(model, removal_taps, any(captures(p) for p in chunk)) as acts:
            output = model(x, missing=chunk[0].missing)
        outs = [output] if len(chunk) == 1 else _split(output, sizes)
        if outs is None:  # an output that cannot be cut by image: one forward per pass instead
            for p in chunk:
                with _capturing(model, removal_taps, captures(p)) as one:
                    ready[id(p)] = (model(p.inputs, missing=p.missing), one)
        else:
            cut = {t: v.split(sizes) for t, v in acts.items()}
            for i, p in enumerate(chunk):
                ready[id(p)] = (outs[i], {t: v[i] for t, v in cut.items()} if captures(p) else {})
        flush()


def _capturing(model: nn.Module, taps: Sequence[str], wanted: bool) -> contextlib.AbstractContextManager:
    """:func:`capture` of ``taps`` when ``wanted``, else an empty dict."""
    return capture(model, *taps) if wanted and taps else contextlib.nullcontext({})


def _batch_size_of(batch: Mapping[str, Any], modalities: Sequence[str]) -> int:
    x = next((batch[m] for m in modalities if m in batch), None)
    if x is None:
        raise KeyError(f"a batch lacks every modality of the model {list(modalities)}; it has {list(batch)}")
    return int(x.shape[0])


def _shard(data: Any, batches: Iterable[Mapping[str, Any]], batch_size: int, num_workers: int,
           max_batches: int | None, modalities: Sequence[str], info: DistInfo
           ) -> Iterator[tuple[int, int, int, Mapping[str, Any] | None]]:
    """``(batch index, global index of its first image, its size, the batch or None)`` for every
    batch of the run: None for a batch that another process runs (batch ``b`` runs in process
    ``b mod W``). A map-style dataset is read only where it runs; other data (a DataLoader, an
    iterable of batches) is read by every process and the others' batches are passed over."""
    rank, world = info.rank, info.world_size
    if world > 1 and isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        n = len(data)  # type: ignore[arg-type]
        count = -(-n // batch_size) if max_batches is None else min(-(-n // batch_size), max_batches)
        own = [list(range(b * batch_size, min(n, (b + 1) * batch_size))) for b in range(rank, count, world)]
        loaded = iter(DataLoader(data, batch_sampler=own, num_workers=num_workers, collate_fn=collate))
        for b in range(count):
            size = min(n, (b + 1) * batch_size) - b * batch_size
            yield b, b * batch_size, size, next(loaded) if b % world == rank else None
        return
    first = 0
    for b, batch in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        size = _batch_size_of(batch, modalities)
        yield b, first, size, batch if b % world == rank else None
        first += size


def _hand_over(accs: Sequence[MetricAccumulator], info: DistInfo) -> None:
    """The first batch's choices (shifts of the streamed moments, the label source, the policies
    kept), from process 0, which ran it, to every other process, before they update."""
    if not info.distributed:
        return
    shared = broadcast_object({a.name: a.shared() for a in accs} if info.is_main else None)
    if not info.is_main:
        for a in accs:
            a.adopt(shared[a.name])


def _stream(spec: RunSpec, accs: Sequence[MetricAccumulator], data: Any, batches: Iterable[Mapping[str, Any]],
            batch_size: int, num_workers: int, max_batches: int | None, progress: bool
            ) -> tuple[int, dict[str, Any]]:
    """The one pass over the data: per batch the full-input forward (capturing the taps the
    accumulators need), their updates, then the removal passes. Under a process group each
    process runs its share of the batches (:func:`_shard`) and the accumulators are summed over
    processes at the end. Returns ``(images seen, the first batch's display artifacts)``."""
    model, mods = spec.model, spec.modalities
    info = dist_info()
    full_taps, removal_taps = _union(accs, "taps", spec.info), _union(accs, "removal_taps", spec.info)
    total = None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    num_images, artifacts, handed = 0, {}, not info.distributed
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for bi, first, size, batch in tqdm(_shard(data, batches, batch_size, num_workers, max_batches, mods, info),
                                               total=total, disable=not progress or not info.is_main,
                                               desc="interpret"):
                if batch is None:
                    for a in accs:
                        a.skip(bi, first, size)
                    continue
                if not handed and not info.is_main:
                    _hand_over(accs, info)
                    handed = True
                missing_keys = [m for m in mods if m not in batch]
                if missing_keys:
                    raise KeyError(f"batch {bi} lacks modalities {missing_keys}; the model takes {mods}, "
                                   f"the batch has {list(batch)}")
                mask = batch.get("mask")
                task = spec.task
                ctx = BatchContext(
                    spec, bi, batch, {m: batch[m].to(spec.device) for m in mods},
                    mask.to(spec.device) if mask is not None else None,
                    task.targets(batch, spec.device) if task.target_key in batch else None)
                ctx.first_image = first
                if spec.replicates:
                    ctx.weights = poisson_weights(spec.seed, range(first, first + ctx.batch_size),
                                                  spec.replicates, spec.device)
                num_images += ctx.batch_size
                # the batch's passes see its images again: streams reuse their outputs (stream_memo)
                with reusing_streams(model):
                    with capture(model, *full_taps) if full_taps else contextlib.nullcontext({}) as acts:
                        ctx.output = model(ctx.inputs)
                    ctx.acts = acts
                    for a in accs:
                        a.update(ctx)
                    if bi == 0:
                        artifacts.update(_first_batch_artifacts(ctx))
                    _run_passes(ctx, accs, removal_taps)
                if not handed:  # process 0, after the first batch
                    _hand_over(accs, info)
                    handed = True
        if not handed:  # a process that ran no batch still answers the hand-over
            _hand_over(accs, info)
    finally:
        model.train(was_training)
    if info.distributed:
        images = torch.tensor([float(num_images)], dtype=torch.float64)
        all_reduce_sum_([images], "image count")
        num_images = int(images)
        for a in accs:
            a.reduce()
    return num_images, artifacts


DEFAULT_POLICIES = ("zero", "mean", "missing")


def _check_options(model: nn.Module, metrics: Sequence[str], policy: str, rows: str | None, replicates: int,
                   level: float, sv_labels: str) -> list[str]:
    """Validate :func:`run`'s options (each error names the option); returns the metrics, deduplicated."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if policy not in REMOVAL_POLICIES:
        raise ValueError(f"policy must be one of {REMOVAL_POLICIES}, got {policy!r}")
    if rows not in (None, *ROW_RULES):
        raise ValueError(f"rows must be one of {ROW_RULES} (or None for the task's default), got {rows!r}")
    if replicates < 0 or not 0.0 < level < 1.0:
        raise ValueError(f"replicates must be >= 0 and level in (0, 1), got replicates={replicates}, level={level}")
    if sv_labels not in ("auto", "mask", "boxes"):
        raise ValueError(f"sv_labels must be 'auto', 'mask' or 'boxes', got {sv_labels!r}")
    if not hasattr(model, "tap_info") or not hasattr(model, "modalities"):
        raise TypeError(f"{type(model).__name__} is not a fusionzoo model (needs tap_info() and modalities)")
    return list(dict.fromkeys(metrics))


def _policies(policy: str, policies: Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """``(the further removal policies, whether they are the default)`` of :func:`run`."""
    if isinstance(policies, str):
        policies = [p.strip() for p in policies.split(",") if p.strip()]
    if policies is None:
        return tuple(p for p in DEFAULT_POLICIES if p != policy), True
    bad = [p for p in policies if p not in REMOVAL_POLICIES]
    if bad:
        raise ValueError(f"policies must be among {REMOVAL_POLICIES}, got {bad}")
    return tuple(p for p in dict.fromkeys(policies) if p != policy), False


def _mean_stats(batches: Iterable[Mapping[str, Any]], model: nn.Module, policy: str, policies: tuple[str, ...],
                auto: bool, stats: StreamingModalityStats | None, max_batches: int | None
                ) -> tuple[StreamingModalityStats | None, str | None, tuple[str, ...]]:
    """``(stats, how they were obtained, policies)``: the ``mean`` policy without given ``stats``
    measures them exactly by a pre-pass that reads the inputs only. Data that can be read once
    only (an iterator) cannot be pre-passed: an explicit ``mean`` raises, the default drops it
    with a warning."""
    if stats is not None:
        return stats, "given", policies
    if "mean" not in (policy, *policies):
        return None, None, policies
    if iter(batches) is batches:
        if auto and policy != "mean":
            warnings.warn("policies: the default 'mean' policy is left out because the data is an iterator that "
                          "can be read only once; pass stats= or a dataset / list of batches", stacklevel=3)
            return None, None, tuple(p for p in policies if p != "mean")
        raise ValueError("the 'mean' removal policy needs dataset statistics: pass stats= (StreamingModalityStats) "
                         "or data that can be read twice (a dataset or a list of batches), not an iterator")
    stats = StreamingModalityStats.measure(batches, list(model.modalities), max_batches)
    return stats, "measured by a pre-pass over the run's images", policies


def _run_spec(model: nn.Module, data: Any, taps: str | Sequence[str], class_names: Sequence[str] | None,
              ignore_index: int, rows: str | None, **options: Any) -> RunSpec:
    """The :class:`RunSpec` of :func:`run`: the model's task, classes, taps and device, plus the
    run's ``options``."""
    task = task_for(model, ignore_index)
    k = int(model.num_classes)
    # label classes of the masks: the dataset's when it says (a detector's num_classes may count
    # foreground classes only), else the model's; box labels 0..box_k-1, box masks add background box_k
    data_k = getattr(data, "num_classes", None) or getattr(getattr(data, "dataset", None), "num_classes", None)
    mask_k = int(data_k) if data_k is not None else k
    if class_names is None:
        class_names = getattr(data, "classes", None)
        if class_names is None:
            class_names = getattr(getattr(data, "dataset", None), "classes", None)
    return RunSpec(
        model=model, task=task, modalities=list(model.modalities), num_classes=k, label_classes=mask_k,
        box_classes=max(k, mask_k), class_names=list(class_names) if class_names is not None else None,
        plan=plan_taps(model, taps), info=model.tap_info(),
        device=next((p.device for p in model.parameters()), torch.device("cpu")), rows=rows or task.default_rows,
        ignore_index=ignore_index, **options)


def run(
    model: nn.Module,
    data: Any,
    metrics: Sequence[str] = METRICS,
    taps: str | Sequence[str] = "*",
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    rows: str | None = None,
    samples_per_image: int = 16,
    sv_labels: str = "auto",
    sv_stride: int | None = 4,
    policy: str = "zero",
    empty_policy: str | None = None,
    stats: StreamingModalityStats | None = None,
    perceptual: bool = True,
    gradcam_images: int = 2,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    purity: float = 0.5,
    seed: int = 0,
    replicates: int = DEFAULT_REPLICATES,
    level: float = DEFAULT_LEVEL,
    policies: Sequence[str] | None = None,
    num_workers: int = 0,
    pass_pixels: int | None = PASS_PIXELS,
    progress: bool = False,
) -> InterpretResult:
    """Measure a model's interpretability metrics over a dataset in one streaming pass.

    Segmentation models and detectors (``model.task == "detection"``) get the same metrics;
    for detectors the task metric is COCO box AP (contribution), Grad-CAM explains the
    highest-scoring detection of each image, semantic variance can use ground-truth boxes in
    place of masks, and CKA / effective rank / reliance rows default to one row per
    ground-truth object (docs/interpret.md, "Detection models").

    Args:
        model: a fusionzoo model (its device is used; it is put in eval mode and restored).
        data: a map-style dataset of sample dicts (batched here with ``fusionzoo.data.collate``),
            a DataLoader, or any iterable of collated batches (``{modality: (B, C, H, W),
            "mask": (B, H, W)}``; detection batches carry ``"boxes"`` / ``"labels"`` lists,
            one ``(N_i, 4)`` xyxy / ``(N_i,)`` tensor per image, with or without a mask).
        metrics: any of ``METRICS``.
        taps: fnmatch pattern(s) selecting the taps measured.
        batch_size: batch size when ``data`` is a dataset (the perceptual score needs >= 2).
        max_batches: stop after this many batches.
        rows: how CKA, effective rank and reliance turn maps into example rows: ``"sample"`` (the
            same ``samples_per_image`` relative pixel positions in every image and tap),
            ``"pool"`` (global average pool, one row per image; see :func:`.cka.reduce_spatial`)
            or ``"object"`` (one row per ground-truth box, the tap pooled over the box with
            ``roi_align``, :func:`.cka.object_rows`; needs batches with ``boxes``). Default:
            ``"object"`` for detectors, ``"sample"`` otherwise. Objects are the natural rows of a
            detector: its output is a function of the features in and around object regions,
            while fixed pixel positions mostly land on background (pedestrians cover a few
            percent of an LLVIP frame), and one row per object stays aligned across taps of
            any stride because every tap is pooled over the same boxes.
        samples_per_image: ``k`` for ``rows="sample"``.
        sv_labels: labels of semantic variance: ``"mask"`` (the batches' masks), ``"boxes"``
            (ground-truth boxes painted into masks with a background class of its own, index
            ``K``: :func:`.semantic_variance.box_masks`) or ``"auto"`` (masks when the first batch
            has one, else boxes when it has those).
        sv_stride: semantic variance of every tap on one common grid, ``ceil(H / sv_stride) x
            ceil(W / sv_stride)`` (default the stride-4 grid: 16x20 cells at 64x80): coarser taps
            upsampled bilinearly, finer ones area-averaged, so every stage is scored on the
            same labelled cells (:class:`.semantic_variance.SemanticVariance`). ``None``: each
            tap's own grid (deep stages of small inputs then have very few cells).
        policy: modality removal policy for contribution and reliance (``REMOVAL_POLICIES``).
        empty_policy: policy of the empty coalition (default ``policy``, or ``"zero"`` when
            ``policy="missing"``).
        stats: dataset statistics for the ``"mean"`` / ``"noise"`` policies.
        perceptual: include the perceptual score in the contribution.
        gradcam_images: images of the first batch explained by Grad-CAM, on each stream's
            deepest stage with a grid of at least 8x8 cells at the batch's input size
            (:func:`.gradcam.default_gradcam_taps`; ``settings["gradcam"]`` records the taps).
        class_names: defaults to ``data.classes`` when present.
        ignore_index: label ignored by semantic variance and mIoU.
        purity: area-vote threshold of semantic variance.
        seed: seed of noise, permutations, pixel positions and bootstrap weights.
        replicates: Poisson-bootstrap replicates over images behind ``result.intervals``
            (:mod:`.intervals`); 0 gives no intervals.
        level: coverage of the intervals.
        policies: removal policies that contribution measures in the same pass besides ``policy``
            (``contribution["policies"][p]``, intervals under ``contribution.policies.<p>.``); the
            top-level contribution section stays ``policy``'s. None: ``DEFAULT_POLICIES``
            (zero, mean and missing), ``"missing"`` kept only where the model's missing path
            differs from zero filling on the first batch (``settings["policies_dropped"]`` says
            when not); ``()``: ``policy`` alone. ``"mean"`` without ``stats`` measures them
            exactly by a pre-pass over the inputs (``settings["stats"]``).
        num_workers: DataLoader workers when ``data`` is a dataset.
        pass_pixels: the removal passes of a batch (coalitions under every policy, permutations)
            run as few forwards of their concatenated inputs, each of at most this many input
            pixels (batch x height x width; default ``PASS_PIXELS`` = 2^22, a batch of 8 at
            480x640 with its 5 to 10 passes in 4 to 8 forwards, every pass of a 64x80 batch in one).
            Outputs equal the one-pass-a-forward ones up to float rounding (batch-norm layers are in
            eval mode). ``None`` or 0: one forward per pass.
        progress: show a progress bar.

    Returns:
        An :class:`InterpretResult`. ``settings["task"]`` is the model's task,
        ``settings["rows"]`` / ``settings["sv_labels"]`` the row rule and label source used and
        ``settings["skipped"]`` metric -> reason for requested metrics the data could not give
        (e.g. contribution without masks or boxes).

    Example:
        >>> ds = fusionzoo.data.create_dataset("synthetic_rgbd", split="val", num_samples=16, image_size=(64, 80))
        >>> model = fusionzoo.create_model("late_mean_resnet18", num_classes=ds.num_classes)
        >>> res = fusionzoo.interpret.run(model, ds, metrics=["cka", "contribution"])
        >>> res.contribution["shapley"]
    """
    metrics = _check_options(model, metrics, policy, rows, replicates, level, sv_labels)
    policies, policies_auto = _policies(policy, policies)
    if empty_policy is None and policy == "missing":
        empty_policy = "zero"  # the models' own missing path fills zeros too
    batches = _as_batches(data, batch_size, num_workers)
    if "contribution" not in metrics:
        policies = ()
    if dist_info().distributed and "noise" in (policy, empty_policy, *policies):
        raise ValueError("the 'noise' removal policy draws its replacements from one random stream over the batches, "
                         "which processes sharing the data cannot keep in step; use policy / policies / empty_policy "
                         "'zero' or 'mean' under a process group, or run in one process")
    stats, stats_note, policies = _mean_stats(batches, model, policy, policies, policies_auto, stats, max_batches)
    spec = _run_spec(model, data, taps, class_names, ignore_index, rows, samples_per_image=samples_per_image,
                     sv_labels=sv_labels, sv_stride=sv_stride, policy=policy, empty_policy=empty_policy, stats=stats,
                     perceptual=perceptual, gradcam_images=gradcam_images, purity=purity, seed=seed,
                     replicates=int(replicates), level=float(level), policies=policies, policies_auto=policies_auto,
                     pass_pixels=pass_pixels)
    accs = [ACCUMULATORS[name](spec) for name in METRICS if name in metrics]
    mods = spec.modalities
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    num_images, artifacts = _stream(spec, accs, data, batches, batch_size, num_workers, max_batches, progress)
    timings["pass_s"] = time.perf_counter() - t0
    if num_images == 0:
        raise ValueError("the data yielded no batches")

    t1 = time.perf_counter()
    sections = {a.name: a.compute() for a in accs}
    settings: dict[str, Any] = {
        "metrics": metrics, "taps": taps, "rows": spec.rows, "samples_per_image": samples_per_image,
        "policy": policy, "empty_policy": empty_policy, "stats": stats_note, "purity": purity, "sv_stride": sv_stride,
        "seed": seed, "ignore_index": ignore_index, "task": spec.task.name, "sv_labels": None,
        "pass_pixels": pass_pixels,
        "cka_estimator": "exact streaming linear CKA (debiased; biased beside)",
        "intervals": {"method": "poisson bootstrap over images", "replicates": spec.replicates, "level": spec.level}}
    intervals: dict[str, Any] = {}
    for a in accs:
        settings.update(a.settings)
        artifacts.update(a.artifacts)
        timings.update(a.timings)
        intervals.update(interval_paths(a.name, a.intervals))
    settings["skipped"] = {a.name: a.skipped for a in accs if a.skipped is not None}
    timings["compute_s"] = time.perf_counter() - t1
    info = dist_info()
    if info.distributed:
        # Grad-CAM and the display images come from the first batch: process 0 ran it
        artifacts, gradcam = broadcast_object((artifacts, settings.get("gradcam")) if info.is_main else None)
        if gradcam is not None:
            settings["gradcam"] = gradcam
        settings["processes"] = info.world_size
    return InterpretResult(
        model=model_name(model),
        fusion=_fusion_of(model_name(model)),
        config=dict(getattr(model, "config", {}) or {}),
        modalities=mods,
        num_classes=spec.num_classes,
        class_names=spec.class_names,
        num_images=num_images,
        taps={n: asdict(t) for n, t in spec.info.items()},
        settings=settings,
        timings=timings,
        intervals=intervals,
        artifacts=artifacts,
        **{name: sections[name] for name in METRICS if sections.get(name) is not None and name != "gradcam"},
    )
