"""``fusionzoo.interpret.run`` and ``compare``: every metric, one pass, any registered model.

:func:`run` streams a dataset once. Per batch it runs the model on the full input while
capturing the selected taps (CKA, semantic variance, health, gates), then on every coalition of
modalities (contribution; the passes with one modality removed also capture taps for
*reliance*, ``1 - CKA(tap on full input, tap with m removed)``), then with each modality
permuted across the batch (perceptual score). Grad-CAM runs on the first batch. Memory is
bounded by accumulators (:mod:`.cka`, :mod:`.semantic_variance`, :mod:`.health`), never by
stored activations. Because it only sees taps, it works unchanged for early, middle, late and
hybrid models: metrics whose taps a model lacks (e.g. cross-modal CKA for early fusion) are
simply absent from its result. Detectors (``model.task == "detection"``) take the same path;
only the task metric (COCO AP, :mod:`.detection`), the Grad-CAM score (top detections), the
semantic-variance labels (box masks when batches have no mask) and the default CKA rows (one
per ground-truth object) differ.

:func:`compare` aligns several results stage by stage (``stage1..4``) into one
:class:`ComparisonResult`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..taps import capture
from .cka import StreamingCKA, object_rows, reduce_spatial
from .contribution import (
    REMOVAL_POLICIES,
    ModalityStats,
    contribution_accumulator,
    contribution_keys,
    remove_modalities,
)
from .detection import DetectionScore, detection_targets
from .gradcam import MIN_GRID_CELLS, default_gradcam_taps, grad_cam, object_class_region, split_gate_channels
from .health import EffectiveRank, FeatureNorm
from .semantic_variance import SemanticVariance, box_masks

__all__ = ["METRICS", "ComparisonResult", "InterpretResult", "compare", "load_result", "run"]

METRICS = ("cka", "semantic_variance", "health", "contribution", "reliance", "gradcam", "gates")
ROW_RULES = ("sample", "pool", "object")
_STAGE_RE = re.compile(r"^stage(\d+)$")


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, tuples -> lists, tensors -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return _clean(x.item())
    return x


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
            and redundancy / uniqueness / synergy of the score, :mod:`.interaction`) and, for
            segmentation, ``pid`` (BROJA decomposition of the predictions in bits, :mod:`.pid`).
        reliance: tap -> modality -> ``1 - CKA(tap, tap with that modality removed)``.
        gates: tap -> stream -> mean value over the dataset.
        training: a training history (:class:`ModalityBalanceCallback` state), when known.
        timings: seconds per phase.
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
    training: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A strict-JSON dict of every number (NaN -> null); ``artifacts`` are left out."""
        return _clean({f.name: getattr(self, f.name) for f in fields(self) if f.name != "artifacts"})

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
def _stage_index(stage: str) -> int | None:
    m = _STAGE_RE.match(stage)
    return int(m.group(1)) if m else None


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("name"), str):
        return cfg["name"]
    return type(model).__name__


def _fusion_of(name: str) -> str | None:
    try:
        from .._registry import model_entry

        return model_entry(name).fusion
    except KeyError:  # not a registered name (a hand-built model): no family to report
        return None


def _as_batches(data: Any, batch_size: int, num_workers: int) -> Iterable[Mapping[str, Any]]:
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        from ..data import collate

        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    if isinstance(data, Mapping):
        return [data]  # a single collated batch
    return data


def _display(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale one image ``(C, H, W)`` to [0, 1] for display; 1 channel stays 1 channel."""
    x = x.detach().float().cpu()
    lo, hi = x.amin(), x.amax()
    return (x - lo) / (hi - lo).clamp(min=1e-12)


@dataclass
class _Plan:
    features: list[str]                     # feature taps measured (CKA rows, SV, health)
    spatial: list[str]                      # taps with a spatial map (SV)
    gates: list[str]
    pairs: list[tuple[str, str, str, str]]  # (a, b, kind, stage)
    stage_taps: dict[str, dict[str, str]]   # stage -> stream -> tap
    reliance_taps: list[str]


def _plan(model: nn.Module, taps: str | Sequence[str]) -> _Plan:
    info = model.tap_info()
    patterns = [taps] if isinstance(taps, str) else list(taps)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in info):
            raise KeyError(f"tap pattern {p!r} matches no tap of {_model_name(model)}; taps: {list(info)}")
    chosen = [n for n in info if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    mods = list(model.modalities)
    features = [n for n in chosen if info[n].kind in ("feature", "logits")]
    spatial = [n for n in features if info[n].reduction > 0]
    gates = [n for n in chosen if info[n].kind in ("gate", "attn")]
    stage_taps: dict[str, dict[str, str]] = {}
    for n in chosen:
        t = info[n]
        is_stage = t.kind == "feature" and _stage_index(t.stage) is not None and n == f"{t.stream}.{t.stage}"
        if is_stage and (t.stream in mods or t.stream == "fused"):
            stage_taps.setdefault(t.stage, {})[t.stream] = n
    stage_taps = dict(sorted(stage_taps.items(), key=lambda kv: _stage_index(kv[0])))
    pairs: list[tuple[str, str, str, str]] = []
    for stage, streams in stage_taps.items():
        present = [m for m in mods if m in streams]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                pairs.append((streams[a], streams[b], "cross_modal", stage))
        if "fused" in streams:
            for a in present:
                pairs.append((streams[a], streams["fused"], "modality_fused", stage))
    for stream in [*mods, "fused"]:
        seq = [(s, st[stream]) for s, st in stage_taps.items() if stream in st]
        for i, (sa, a) in enumerate(seq):
            for sb, b in seq[i + 1:]:
                pairs.append((a, b, "within", f"{sa}-{sb}"))
    # evolution towards the output: every stage tap against the final representation (decoder.out;
    # late fusion has one decoder per modality, so its final representation is head.logits)
    final = next((n for n in ("decoder.out", "head.logits") if n in features), None)
    if final is not None:
        for stage, streams in stage_taps.items():
            for stream in [*mods, "fused"]:
                if stream in streams:
                    pairs.append((streams[stream], final, "to_final", stage))
    reliance = list(features)
    return _Plan(features, spatial, gates, pairs, stage_taps, reliance)


def _gradcam_taps(model: nn.Module, plan: _Plan, size: tuple[int, int]) -> list[str]:
    """Per modality stream and the fused stream, the deepest stage tap whose grid at input
    ``size`` has at least ``MIN_GRID_CELLS`` cells per side (:func:`.gradcam.default_gradcam_taps`)."""
    streams = {stream: [st[stream] for st in plan.stage_taps.values() if stream in st]
               for stream in [*model.modalities, "fused"]}
    reductions = {n: t.reduction for n, t in model.tap_info().items()}
    return default_gradcam_taps({k: v for k, v in streams.items() if v}, reductions, size)


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
    stats: ModalityStats | None = None,
    perceptual: bool = True,
    gradcam_images: int = 2,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    purity: float = 0.5,
    seed: int = 0,
    num_workers: int = 0,
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
        seed: seed of noise, permutations and pixel positions.
        num_workers: DataLoader workers when ``data`` is a dataset.
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
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if policy not in REMOVAL_POLICIES:
        raise ValueError(f"policy must be one of {REMOVAL_POLICIES}, got {policy!r}")
    if rows not in (None, *ROW_RULES):
        raise ValueError(f"rows must be one of {ROW_RULES} (or None for the task's default), got {rows!r}")
    if sv_labels not in ("auto", "mask", "boxes"):
        raise ValueError(f"sv_labels must be 'auto', 'mask' or 'boxes', got {sv_labels!r}")
    if not hasattr(model, "tap_info") or not hasattr(model, "modalities"):
        raise TypeError(f"{type(model).__name__} is not a fusionzoo model (needs tap_info() and modalities)")
    metrics = list(dict.fromkeys(metrics))
    if empty_policy is None and policy == "missing":
        empty_policy = "zero"  # the models' own missing path fills zeros too
    mods = list(model.modalities)
    k = int(model.num_classes)
    task = getattr(model, "task", "segmentation")
    detection = task == "detection"
    if rows is None:
        rows = "object" if detection else "sample"
    # label classes of the masks: the dataset's when it says (a detector's num_classes may count
    # foreground classes only), else the model's
    data_k = getattr(data, "num_classes", None) or getattr(getattr(data, "dataset", None), "num_classes", None)
    mask_k = int(data_k) if data_k is not None else k
    # detection labels 0..box_k-1 (AP categories, box-mask classes); box masks add background box_k
    box_k = max(k, mask_k)
    if class_names is None:
        class_names = getattr(data, "classes", None)
        if class_names is None:
            class_names = getattr(getattr(data, "dataset", None), "classes", None)
    class_names = list(class_names) if class_names is not None else None
    plan = _plan(model, taps)
    info = model.tap_info()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch_boxes: list[torch.Tensor] = []  # the current batch's ground-truth boxes (rows="object")

    def to_rows(name: str, x: torch.Tensor) -> torch.Tensor:
        if rows == "object":
            return object_rows(x, batch_boxes, info[name].reduction)
        return reduce_spatial(x, rows, samples_per_image, seed)

    want = set(metrics)
    skipped: dict[str, str] = {}
    cka = StreamingCKA(pairs=[(a, b) for a, b, _, _ in plan.pairs]) if "cka" in want and plan.pairs else None
    # semantic variance accumulators are made on the first batch, once the label source is known
    svs: dict[str, SemanticVariance] = {}
    sv_source: str | None = None
    eranks = {n: EffectiveRank() for n in plan.features} if "health" in want else {}
    norms = {n: FeatureNorm() for n in plan.features} if "health" in want else {}
    contrib = (contribution_accumulator(task, mods, box_k if detection else k, policy, empty_policy, stats,
                                        ignore_index, perceptual, seed, device)
               if "contribution" in want else None)
    # redundancy / uniqueness / synergy of the predictions (pixels: segmentation only), fed by
    # the coalition passes above
    joint = None
    if contrib is not None and not detection and len(mods) >= 2:
        from .pid import PredictionJoint

        joint = PredictionJoint(mods, k, ignore_index)
        contrib.observers.append(joint)
    # one accumulator per removed modality, so each sees every example exactly once
    rel = ({m: StreamingCKA(pairs=[(f"full::{t}", f"removed::{t}") for t in plan.reliance_taps]) for m in mods}
           if "reliance" in want and plan.reliance_taps else None)
    # unimodal heads of late / hybrid segmentation models ({m}.head taps): their own mIoU per class
    head_taps = ({m: f"{m}.head" for m in mods if f"{m}.head" in plan.features}
                 if "contribution" in want and not detection else {})
    from ..tasks import ConfusionMatrix

    head_cms = {m: ConfusionMatrix(k, ignore_index) for m in head_taps}
    gate_sum: dict[str, dict[str, float]] = {}
    gate_n = 0
    capture_names = list(dict.fromkeys(plan.features + (plan.gates if "gates" in want else [])))
    artifacts: dict[str, Any] = {}
    gradcam_setting: dict[str, Any] | None = None  # the taps Grad-CAM explained and why (settings["gradcam"])
    timings: dict[str, float] = {}
    num_images = 0
    has_target = True  # every batch had the contribution's target (mask, or boxes for detectors)
    batches = _as_batches(data, batch_size, num_workers)
    total = None
    try:
        total = len(batches)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for bi, batch in enumerate(tqdm(batches, total=total, disable=not progress, desc="interpret")):
                if max_batches is not None and bi >= max_batches:
                    break
                missing_keys = [m for m in mods if m not in batch]
                if missing_keys:
                    raise KeyError(f"batch {bi} lacks modalities {missing_keys}; the model takes {mods}, "
                                   f"the batch has {list(batch)}")
                inputs = {m: batch[m].to(device) for m in mods}
                b = next(iter(inputs.values())).shape[0]
                size = tuple(next(iter(inputs.values())).shape[-2:])
                mask = batch.get("mask")
                if mask is not None:
                    mask = mask.to(device)
                # ground-truth boxes: the detectors' targets, and object rows / box masks for any model
                use_boxes = detection or rows == "object" or sv_labels == "boxes" or (
                    sv_labels == "auto" and mask is None)
                targets = (detection_targets(batch, box_k if detection else None)
                           if use_boxes and "boxes" in batch and "labels" in batch else None)
                sv_mask = None
                if targets is not None and len(targets) != b:
                    raise ValueError(f"batch {bi} has {len(targets)} box lists for {b} images")
                if rows == "object":
                    if targets is None:
                        raise KeyError(f"rows='object' needs ground-truth boxes, but batch {bi} has no 'boxes' / "
                                       f"'labels' (keys {list(batch)}); use rows='sample' or 'pool'")
                    batch_boxes[:] = [t["boxes"].to(device) for t in targets]
                ctarget = targets if detection else mask
                if ctarget is None:
                    has_target = False
                num_images += b

                # semantic variance labels: the batch's mask, or its boxes painted into one
                if "semantic_variance" in want and plan.spatial:
                    if sv_source is None:
                        sv_source = sv_labels if sv_labels != "auto" else (
                            "mask" if mask is not None else "boxes" if targets is not None else "none")
                        n_sv = box_k + 1 if sv_source == "boxes" else mask_k
                        svs = {n: SemanticVariance(n_sv, ignore_index, purity, stride=sv_stride) for n in plan.spatial}
                    if sv_source == "mask":
                        sv_mask = mask
                    elif sv_source == "boxes" and targets is not None:
                        sv_mask = box_masks([t["boxes"] for t in targets], [t["labels"] for t in targets], size,
                                            background=box_k, ignore_index=ignore_index).to(device)
                    if sv_mask is None and sv_source != "none":
                        skipped.setdefault("semantic_variance", f"batch {bi} has no {sv_source} (sv_labels="
                                                                f"{sv_labels!r}); semantic variance needs it in every batch")

                with capture(model, *capture_names) as acts:
                    logits = model(inputs)
                full_rows = {n: to_rows(n, acts[n]) for n in plan.features} if (cka or rel or eranks) else {}
                # rows="object": a batch without objects gives no rows (nothing to add)
                have_rows = bool(full_rows) and next(iter(full_rows.values())).shape[0] > 0
                if cka is not None and have_rows:
                    cka.update({n: full_rows[n] for n in _cka_names(cka)})
                if sv_mask is not None:
                    for n, acc in svs.items():
                        acc.update(acts[n], sv_mask)
                if mask is not None:
                    for m, t in head_taps.items():
                        up = torch.nn.functional.interpolate(acts[t].float(), size=mask.shape[-2:], mode="bilinear",
                                                             align_corners=False)
                        head_cms[m].update(up.argmax(1), mask)
                for n, er in eranks.items():
                    if have_rows:
                        er.update(full_rows[n])
                    norms[n].update(acts[n])
                if "gates" in want:
                    for n in plan.gates:
                        split = split_gate_channels(acts[n], mods)
                        dst = gate_sum.setdefault(n, {})
                        for s, v in split.items():
                            dst[s] = dst.get(s, 0.0) + float(v.double().mean()) * v.shape[0]
                        if bi == 0:
                            artifacts.setdefault("gate_maps", {})[n] = {s: v[:gradcam_images].cpu() for s, v in split.items()}
                    gate_n += b
                if bi == 0:
                    artifacts["images"] = {m: [_display(inputs[m][i]) for i in range(min(gradcam_images, inputs[m].shape[0]))]
                                           for m in mods}
                    if mask is not None:
                        artifacts["masks"] = mask[:gradcam_images].cpu()
                    if detection:
                        artifacts["detections"] = [{key: d[key].cpu() for key in ("boxes", "scores", "labels")}
                                                   for d in logits[:gradcam_images]]
                        if targets is not None:
                            artifacts["targets"] = targets[:gradcam_images]
                    else:
                        artifacts["predictions"] = logits[:gradcam_images].argmax(1).cpu()
                del acts

                # removal passes: contribution coalitions; the "all but m" ones also feed reliance
                rel_rows = full_rows if have_rows else None
                if contrib is not None and ctarget is not None:
                    for s, x, miss in contrib.coalitions(inputs):
                        if s == contrib.full:
                            contrib.add(s, logits, ctarget)
                            continue
                        dropped = [m for m in mods if m not in s]
                        if rel is not None and len(dropped) == 1:
                            out = _reliance_pass(model, x, miss, rel[dropped[0]], plan, rel_rows, to_rows)
                            contrib.add(s, out, ctarget)
                        else:
                            contrib.add(s, model(x, missing=miss), ctarget)
                    if perceptual:
                        for m, x in contrib.permutations(inputs, logits, ctarget):
                            contrib.add_permuted(m, model(x), ctarget)
                elif rel is not None:
                    gen = torch.Generator(device=device).manual_seed(seed + bi)
                    for m in mods:
                        x, miss = remove_modalities(inputs, [m], policy, stats, gen)
                        _reliance_pass(model, x, miss, rel[m], plan, rel_rows, to_rows)

                if bi == 0 and "gradcam" in want:
                    tg = time.perf_counter()
                    gtaps = _gradcam_taps(model, plan, size)
                    gradcam_setting = {"taps": gtaps, "input_size": list(size), "min_grid_cells": MIN_GRID_CELLS}
                    if gtaps:
                        with torch.enable_grad():
                            sub = {m: v[:gradcam_images] for m, v in inputs.items()}
                            if detection:
                                score = DetectionScore()
                                artifacts["gradcam"] = grad_cam(model, sub, gtaps, score_fn=score)
                                artifacts["gradcam_detections"] = score.selected
                            else:  # per image its second most frequent predicted class (object_class_region)
                                region, explained = object_class_region(logits[:gradcam_images].argmax(1))
                                artifacts["gradcam"] = grad_cam(model, sub, gtaps, region=region)
                                artifacts["gradcam_classes"] = explained
                    timings["gradcam_s"] = time.perf_counter() - tg
    finally:
        model.train(was_training)
    timings["pass_s"] = time.perf_counter() - t0
    if num_images == 0:
        raise ValueError("the data yielded no batches")
    if contrib is not None and not has_target:
        skipped["contribution"] = (f"some batches carry no {'boxes' if detection else 'mask'}; the "
                                   f"{contrib.metric} of every coalition needs the ground truth of every image")
    if sv_source == "none":
        skipped["semantic_variance"] = "the batches carry neither masks nor boxes"

    result = InterpretResult(
        model=_model_name(model),
        fusion=_fusion_of(_model_name(model)),
        config=dict(getattr(model, "config", {}) or {}),
        modalities=mods,
        num_classes=k,
        class_names=class_names,
        num_images=num_images,
        taps={n: asdict(t) for n, t in info.items()},
        settings={"metrics": metrics, "taps": taps, "rows": rows, "samples_per_image": samples_per_image,
                  "policy": policy, "empty_policy": empty_policy, "purity": purity, "sv_stride": sv_stride, "seed": seed,
                  "ignore_index": ignore_index, "cka_estimator": "exact streaming linear CKA (debiased; biased beside)",
                  "task": task, "sv_labels": sv_source,
                  **({"gradcam": gradcam_setting} if gradcam_setting else {}),
                  **({"box_background": box_k} if sv_source == "boxes" else {}),
                  "skipped": skipped},
        timings=timings,
        artifacts=artifacts,
    )
    t1 = time.perf_counter()
    if cka is not None and cka.num_examples > 0:
        out = []
        for a, b, kind, stage in plan.pairs:
            out.append({"a": a, "b": b, "kind": kind, "stage": stage,
                        "cka": cka.cka(a, b, True) if cka.num_examples >= 4 else math.nan,
                        "cka_biased": cka.cka(a, b, False)})
        result.cka = {"pairs": out, "num_rows": cka.num_examples}
    if svs and "semantic_variance" not in skipped:
        result.semantic_variance = {n: acc.compute().to_dict() for n, acc in svs.items()}
    if eranks:
        fn = {n: norms[n].compute() for n in norms}
        ratio: dict[str, dict[str, float]] = {}
        for stage, streams in plan.stage_taps.items():
            present = [m for m in mods if m in streams]
            for i, a in enumerate(present):
                for b in present[i + 1:]:
                    nb = fn[streams[b]]
                    ratio.setdefault(stage, {})[f"{a}/{b}"] = fn[streams[a]] / nb if nb > 0 else math.nan
        result.health = {"effective_rank": {n: e.compute() for n, e in eranks.items()}, "feature_norm": fn,
                         "norm_ratio": ratio}
    if contrib is not None and has_target:
        result.contribution = contrib.result(class_names).to_dict()
        from .interaction import coalition_terms

        result.contribution.update(coalition_terms(result.contribution))
        if joint is not None:
            result.contribution["pid"] = joint.result(class_names)
        if head_cms:
            from .contribution import _summary

            result.contribution["unimodal_heads"] = {m: _summary(cm) for m, cm in head_cms.items()}
    if rel is not None and all(acc.num_examples >= 4 for acc in rel.values()):
        result.reliance = {t: {m: _reliance_value(rel[m], t) for m in mods} for t in plan.reliance_taps}
    if gate_sum:
        result.gates = {n: {s: v / gate_n for s, v in d.items()} for n, d in gate_sum.items()}
    timings["compute_s"] = time.perf_counter() - t1
    return result


def _cka_names(acc: StreamingCKA) -> list[str]:
    """Taps an accumulator's pairs need."""
    return list(dict.fromkeys(t for p in acc.pairs for t in p))


def _reliance_value(acc: StreamingCKA, tap: str) -> float:
    """``1 - CKA(full, removed)``; 1 when removing the modality leaves the tap constant (all its
    variation came from that modality), where CKA itself is undefined."""
    a, b = f"full::{tap}", f"removed::{tap}"
    h_full, h_removed = acc.hsic(a, a), acc.hsic(b, b)
    if h_full > 0 and h_removed <= 1e-10 * h_full:
        return 1.0
    return 1.0 - acc.cka(a, b)


def _reliance_pass(model, x, miss, acc: StreamingCKA, plan: _Plan, full_rows, to_rows) -> Any:
    """Run the model with one modality removed, capture the reliance taps, update ``acc``
    (unless ``full_rows`` is None: a batch without example rows, e.g. no objects); returns the
    model's output."""
    with capture(model, *plan.reliance_taps) as acts:
        logits = model(x, missing=miss)
    if full_rows is not None:
        upd = {}
        for t in plan.reliance_taps:
            upd[f"full::{t}"] = full_rows[t]
            upd[f"removed::{t}"] = to_rows(t, acts[t])
        acc.update(upd)
    return logits


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
@dataclass
class ComparisonResult:
    """Several :class:`InterpretResult` aligned stage by stage.

    Attributes:
        models: labels (model names, suffixed ``#2`` ... when repeated).
        fusion: label -> fusion family.
        stages: the union of stage names (``stage1``..``stage4``).
        miou: label -> the task metric with all modalities (:meth:`InterpretResult.score`):
            mIoU for segmentation, COCO AP for detection; ``metric`` says which.
        shapley: label -> modality -> Shapley value of that metric.
        drop: label -> modality -> metric drop when that modality is removed.
        perceptual: label -> modality -> normalized perceptual score.
        cka_cross_modal: label -> stage -> mean debiased CKA between modality pairs.
        cka_modality_fused: label -> stage -> modality -> debiased CKA with the fused stream.
        semantic_variance: label -> stream -> stage -> SV.
        effective_rank: label -> stream -> stage -> effective rank.
        reliance: label -> stage (or ``"head.logits"``) -> modality -> reliance of the fused
            stage tap (models with a fused stream) and of the final logits (every model).
        metric: label -> ``"mIoU"`` or ``"AP"`` (None without a contribution pass).
    """

    models: list[str]
    fusion: dict[str, str | None]
    stages: list[str]
    miou: dict[str, float | None]
    shapley: dict[str, dict[str, float]]
    drop: dict[str, dict[str, float]]
    perceptual: dict[str, dict[str, float]]
    cka_cross_modal: dict[str, dict[str, float]]
    cka_modality_fused: dict[str, dict[str, dict[str, float]]]
    semantic_variance: dict[str, dict[str, dict[str, float]]]
    effective_rank: dict[str, dict[str, dict[str, float]]]
    reliance: dict[str, dict[str, dict[str, float]]]
    metric: dict[str, str | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return _clean(asdict(self))


def _per_stream_stage(res: InterpretResult, values: Mapping[str, Any] | None, key: str | None = None):
    out: dict[str, dict[str, float]] = {}
    for tap, v in (values or {}).items():
        t = res.taps.get(tap)
        if t is None or _stage_index(t["stage"]) is None or tap != f"{t['stream']}.{t['stage']}":
            continue
        val = v.get(key) if key else v
        out.setdefault(t["stream"], {})[t["stage"]] = val if val is not None else math.nan
    return out


def _to_result(item: InterpretResult | nn.Module | str | Path, dataset: Any, metrics: Sequence[str],
               run_kwargs: dict[str, Any]) -> InterpretResult:
    if isinstance(item, InterpretResult):
        return item
    if isinstance(item, nn.Module):
        if dataset is None:
            raise ValueError("compare got a model; pass dataset=... to interpret it")
        return run(item, dataset, metrics=metrics, **run_kwargs)
    path = Path(item)
    if path.is_file() or (path / "metrics.json").is_file():
        return load_result(path)
    if path.is_dir():
        from .runs import interpret_run

        return interpret_run(path, metrics, **run_kwargs)
    # a registered model name: built untrained for the dataset (architecture-level comparison)
    if dataset is None:
        raise ValueError(f"compare got the model name {item!r}; pass dataset=... to interpret it")
    from .._registry import create_model

    model = create_model(str(item), num_classes=int(dataset.num_classes), modalities=tuple(dataset.modalities))
    return run(model, dataset, metrics=metrics, **run_kwargs)


def compare(
    results: Sequence[InterpretResult | nn.Module | str | Path],
    dataset: Any = None,
    metrics: Sequence[str] = METRICS,
    **run_kwargs: Any,
) -> ComparisonResult:
    """Align several models' interpretations stage by stage.

    Args:
        results: any mix of :class:`InterpretResult`, ``metrics.json`` files or folders,
            training run folders (interpreted on their validation sets), models, and registered
            model names (built untrained; needs ``dataset``).
        dataset: data for the items that still need :func:`run`.
        metrics: metrics for those runs.
        **run_kwargs: more :func:`run` options for those runs.

    Returns:
        A :class:`ComparisonResult`; a metric a model does not have (e.g. cross-modal CKA of an
        early-fusion model) is absent from that model's entry.

    Example:
        >>> cmp = compare(["early_concat_resnet18", "esanet_resnet18", "late_mean_resnet18"],
        ...               dataset=ds, metrics=["cka", "semantic_variance", "contribution"])
    """
    res = [_to_result(r, dataset, metrics, run_kwargs) for r in results]
    if not res:
        raise ValueError("compare needs at least one result")
    labels, seen = [], {}
    for r in res:
        seen[r.model] = seen.get(r.model, 0) + 1
        labels.append(r.model if seen[r.model] == 1 else f"{r.model}#{seen[r.model]}")
    stages: set[str] = set()
    out = ComparisonResult(labels, {}, [], {}, {}, {}, {}, {}, {}, {}, {}, {})
    for lab, r in zip(labels, res):
        out.fusion[lab] = r.fusion
        out.miou[lab] = r.score()
        c = r.contribution or {}
        out.metric[lab] = contribution_keys(c)[0] if c else None
        out.shapley[lab] = dict(c.get("shapley", {}))
        out.drop[lab] = dict(c.get("drop", {}))
        out.perceptual[lab] = {m: v.get("normalized") for m, v in c.get("perceptual", {}).items()}
        cross: dict[str, list[float]] = {}
        for row in r.cka_pairs("cross_modal"):
            if row["cka"] is not None:
                cross.setdefault(row["stage"], []).append(row["cka"])
        out.cka_cross_modal[lab] = {s: sum(v) / len(v) for s, v in cross.items()}
        mf: dict[str, dict[str, float]] = {}
        for row in r.cka_pairs("modality_fused"):
            mf.setdefault(row["stage"], {})[r.taps[row["a"]]["stream"]] = row["cka"]
        out.cka_modality_fused[lab] = mf
        out.semantic_variance[lab] = _per_stream_stage(r, r.semantic_variance, "semantic_variance")
        out.effective_rank[lab] = _per_stream_stage(r, (r.health or {}).get("effective_rank"))
        # reliance of the fused stream per stage, and of the final logits (every family has them)
        rel: dict[str, dict[str, float]] = {}
        for tap, v in (r.reliance or {}).items():
            t = r.taps.get(tap, {})
            if t.get("stream") == "fused" and tap == f"fused.{t.get('stage')}" and _stage_index(t["stage"]):
                rel[t["stage"]] = dict(v)
            elif tap == "head.logits":
                rel["head.logits"] = dict(v)
        out.reliance[lab] = rel
        for d in (out.cka_cross_modal[lab], mf):
            stages.update(d)
        stages.update(s for s in rel if _stage_index(s))
        for d in out.semantic_variance[lab].values():
            stages.update(d)
    out.stages = sorted(stages, key=lambda s: _stage_index(s) or 0)
    return out
