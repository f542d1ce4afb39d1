"""``fusionzoo.interpret.compare``: several models' interpretations aligned stage by stage
(``stage1..4``) into one :class:`ComparisonResult`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._json import to_json
from .._registry import create_model
from .api import METRICS, InterpretResult, load_result, run
from .contribution import contribution_keys
from .plan import stage_index
from .runs import interpret_run

__all__ = ["ComparisonResult", "compare"]


@dataclass
class ComparisonResult:
    """Several :class:`InterpretResult` aligned stage by stage.

    Attributes:
        models: labels (model names, suffixed ``#2`` ... when repeated).
        fusion: label -> fusion family.
        stages: the union of stage names (``stage1``..``stage4``).
        score: label -> the task metric with all modalities (:meth:`InterpretResult.score`):
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
    score: dict[str, float | None]
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
        return to_json(asdict(self))


def _per_stream_stage(res: InterpretResult, values: Mapping[str, Any] | None, key: str | None = None):
    out: dict[str, dict[str, float]] = {}
    for tap, v in (values or {}).items():
        t = res.taps.get(tap)
        if t is None or stage_index(t["stage"]) is None or tap != f"{t['stream']}.{t['stage']}":
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
        return interpret_run(path, metrics, **run_kwargs)
    # a registered model name: built untrained for the dataset (architecture-level comparison)
    if dataset is None:
        raise ValueError(f"compare got the model name {item!r}; pass dataset=... to interpret it")
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
        out.score[lab] = r.score()
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
            if t.get("stream") == "fused" and tap == f"fused.{t.get('stage')}" and stage_index(t["stage"]):
                rel[t["stage"]] = dict(v)
            elif tap == "head.logits":
                rel["head.logits"] = dict(v)
        out.reliance[lab] = rel
        for d in (out.cka_cross_modal[lab], mf):
            stages.update(d)
        stages.update(s for s in rel if stage_index(s))
        for d in out.semantic_variance[lab].values():
            stages.update(d)
    out.stages = sorted(stages, key=lambda s: stage_index(s) or 0)
    return out
