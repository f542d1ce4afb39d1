"""``fusionzoo.interpret.compare``: several models' interpretations aligned stage by stage
(``stage1..4``) into one :class:`ComparisonResult`, with what makes a comparison hold:

- **comparability** (:func:`check_comparable`): runs of different tasks, class sets or
  modalities are refused, naming both runs and what differs (a run on a subset of the others'
  modalities is allowed: it is a unimodal reference);
- **seeds** (:func:`seed_groups`): results of the same recipe (the same training config apart
  from the seed and the keys that change neither data nor arithmetic, :data:`RECIPE_IGNORED`)
  are grouped, and every headline number is given as mean +- std (min..max, n);
- **differences against the seed spread** (:func:`seed_differences`): two recipes differ on a
  number when their seed ranges do not overlap (the rule, and the permutation p-value it
  corresponds to, are in docs/interpret.md, "Comparing runs");
- **retrained references** (:func:`find_references`, :func:`reference_entries`): a unimodal
  run, a modality-dropout run or a ``train_missing`` run of the same recipe is the reference for
  what a modality adds; :mod:`.findings` tells "learned to use both" from "breaks when one is
  removed";
- **intervals** of the headline numbers per model (``ComparisonResult.intervals``).

Also here, because :mod:`.findings` and this module share them: the contribution section under
each removal policy (:func:`policy_views`) and its interaction / decomposition terms
(:func:`contribution_terms`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .._json import to_json
from .._registry import create_model
from ..engine.builders import RESUME_MUTABLE
from .api import METRICS, InterpretResult, load_result, run
from .contribution import contribution_keys
from .interaction import coalition_terms
from .intervals import interval
from .plan import stage_index
from .runs import interpret_run

__all__ = ["RECIPE_IGNORED", "STREAM_KEYS", "ComparisonResult", "IncomparableError", "PolicyView",
           "check_comparable", "compare", "comparison_extra_tables", "contribution_terms", "display_name",
           "find_references", "headline_numbers", "labels_of", "markdown_tables", "policy_views", "recipe_key",
           "reference_entries", "seed_differences", "seed_groups", "seed_rows", "training_config", "with_references"]

# Training-config keys that do not make a different recipe: the seed (what seed groups vary) and
# keys that change neither the data stream nor the arithmetic (engine.builders.RESUME_MUTABLE),
# the run's name, and whether it ends with a report.
RECIPE_IGNORED = frozenset({"seed", "run_name", "report", *RESUME_MUTABLE})
# Keys that choose the input streams: a run differing only in these (and the seed) is a
# reference run of the same recipe (unimodal, modality dropout, always-missing).
STREAM_KEYS = ("modalities", "train_missing", "modality_dropout", "modality_dropout_candidates", "eval_missing")


class IncomparableError(ValueError):
    """Runs that cannot share one comparison (different task, class set or modalities)."""


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
        intervals: label -> headline number (:func:`headline_numbers`) -> ``[lo, hi]`` 95 %
            bootstrap interval (absent where the result has none).
        groups: seed groups (:func:`seed_groups`): results of one recipe with mean +- spread of
            every headline number.
        differences: per pair of seed groups and number, whether the difference exceeds the
            seed spread (:func:`seed_differences`).
        references: label -> retrained-reference entries (:func:`reference_entries`).
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
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    groups: list[dict[str, Any]] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)
    references: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return to_json(asdict(self))


# --------------------------------------------------------------------------------------------
# the contribution section under each removal policy
# --------------------------------------------------------------------------------------------
@dataclass
class PolicyView:
    """The contribution section under one removal policy, with the prefix of its interval paths."""

    policy: str
    contribution: dict[str, Any]
    prefix: str  # "contribution." or "contribution.policies.<p>."


_META = ("metric", "modalities", "policy")


def policy_views(res: InterpretResult) -> list[PolicyView]:
    """The contribution under every removal policy measured, the run's main policy first.

    ``contribution["policies"]`` (``{policy: {same keys as the section}}``) when present; else
    the section alone, under ``contribution["policy"]``. A policy entry lacking the terms
    (``interaction``, ``decomposition``) gets them from its own coalitions
    (:func:`contribution_terms`), never from the main policy's."""
    c = res.contribution or {}
    if not c.get("coalitions"):
        return []
    main = c.get("policy") or (res.settings or {}).get("policy") or "zero"
    views = [PolicyView(main, {k: v for k, v in c.items() if k != "policies"}, "contribution.")]
    for p, sec in (c.get("policies") or {}).items():
        if p == main or not isinstance(sec, Mapping) or not sec.get("coalitions"):
            continue
        views.append(PolicyView(p, {**{k: c[k] for k in _META if k in c}, **sec, "policy": p},
                                f"contribution.policies.{p}."))
    return views


def contribution_terms(c: Mapping[str, Any]) -> dict[str, Any]:
    """``{"interaction", "decomposition"}`` of a contribution dict: stored, else computed from
    its coalitions (:func:`.interaction.coalition_terms`)."""
    if "decomposition" in c and "interaction" in c:
        return {"interaction": c["interaction"], "decomposition": c["decomposition"]}
    return coalition_terms(c) if c.get("coalitions") else {"interaction": {}, "decomposition": {}}


# --------------------------------------------------------------------------------------------
# labels, comparability
# --------------------------------------------------------------------------------------------
def labels_of(results: Sequence[InterpretResult]) -> list[str]:
    """Model names; a repeated name is told apart by its run folder's name (``esanet_resnet18@seed1``)
    when every result of that name records a distinct one (``settings["run"]["dir"]``), else
    suffixed ``#2``, ``#3`` ..."""
    def run_name(r: InterpretResult) -> str | None:
        d = ((r.settings or {}).get("run") or {}).get("dir")
        return Path(d).name if d else None

    by_model: dict[str, list[str | None]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(run_name(r))
    labels, seen = [], {}
    for r in results:
        seen[r.model] = seen.get(r.model, 0) + 1
        names = by_model[r.model]
        if len(names) > 1 and None not in names and len(set(names)) == len(names):
            labels.append(f"{r.model}@{run_name(r)}")
        else:
            labels.append(r.model if seen[r.model] == 1 else f"{r.model}#{seen[r.model]}")
    return labels


def _task(res: InterpretResult) -> str | None:
    task = (res.settings or {}).get("task")
    if task is None and res.contribution:
        task = {"mIoU": "segmentation", "AP": "detection"}.get(contribution_keys(res.contribution)[0])
    return task


def _classes(a: InterpretResult, b: InterpretResult) -> tuple[Any, Any]:
    """The class sets to compare: names when both results have them, else the class counts."""
    if a.class_names and b.class_names:
        return tuple(a.class_names), tuple(b.class_names)
    return f"{a.num_classes} classes", f"{b.num_classes} classes"


def check_comparable(labels: Sequence[str], results: Sequence[InterpretResult]) -> None:
    """Refuse results that cannot share one comparison.

    They must have the same task, the same class set and the same modalities; a result on a
    strict subset of the others' modalities (e.g. an RGB-only run beside RGB-D runs) is allowed,
    as a unimodal reference.

    Raises:
        IncomparableError: naming both runs and what differs.
    """
    if not results:
        return
    widest = max(range(len(results)), key=lambda i: len(results[i].modalities))
    a, ra = labels[widest], results[widest]
    for b, rb in zip(labels, results):
        if rb is ra:
            continue
        for what, va, vb in (("task", _task(ra), _task(rb)), ("classes", *_classes(ra, rb))):
            if va is not None and vb is not None and va != vb:
                raise IncomparableError(f"cannot compare {a} and {b}: they differ in {what} "
                                        f"({a}: {_show(va)}; {b}: {_show(vb)})")
        ma, mb = list(ra.modalities), list(rb.modalities)
        ok = set(mb) == set(ma) or (len(mb) < len(ma) and set(mb) < set(ma) and len(mb) == 1)
        if not ok:
            raise IncomparableError(f"cannot compare {a} and {b}: they differ in modalities ({a}: {'+'.join(ma)}; "
                                    f"{b}: {'+'.join(mb)}); only a single-modality run of a subset is accepted, "
                                    "as a unimodal reference")


def _show(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, tuple) else str(v)


# --------------------------------------------------------------------------------------------
# recipes and seeds
# --------------------------------------------------------------------------------------------
def training_config(res: InterpretResult) -> dict[str, Any] | None:
    """The training config of the run a result was measured on (``settings["run"]["config"]``,
    recorded by :func:`.runs.interpret_run` and ``fusionzoo interpret RUN``), or None."""
    cfg = ((res.settings or {}).get("run") or {}).get("config")
    return dict(cfg) if isinstance(cfg, Mapping) else None


def recipe_key(res: InterpretResult, streams: bool = True) -> str | None:
    """A string equal for results of the same recipe, None without a training config.

    Same recipe = the same training config apart from :data:`RECIPE_IGNORED` (the seed and
    bookkeeping); with ``streams=False`` the stream choice (:data:`STREAM_KEYS`) is ignored too,
    which matches a run with its unimodal / modality-dropout references."""
    cfg = training_config(res)
    if cfg is None:
        return None
    drop = set(RECIPE_IGNORED) | ({*STREAM_KEYS} if not streams else set())
    kept = {k: v for k, v in cfg.items() if k not in drop and not k.startswith("_")}
    if streams:  # the streams the model really has (a default None resolves to the dataset's)
        kept["modalities"] = sorted(res.modalities)
    return json.dumps(kept, sort_keys=True, default=str)


def headline_numbers(res: InterpretResult) -> dict[str, tuple[float, str, float]]:
    """name -> ``(value, interval path, display scale)`` of a result's headline numbers.

    ``score``, ``shapley.<m>``, ``drop.<m>``, ``interaction.<a|b>``,
    ``decomposition.<a|b>.<term>`` (overall) and ``pid.<a|b>.<term>`` (bits) under the run's
    main removal policy; metric values are fractions shown in points (scale 100)."""
    c = res.contribution or {}
    out: dict[str, tuple[float, str, float]] = {}
    if not c.get("coalitions"):
        return out
    _, vk, _ = contribution_keys(c)
    full = "+".join(res.modalities)
    out["score"] = (_num(res.score()), f"contribution.coalitions.{full}.{vk}", 100.0)
    for key in ("shapley", "drop"):
        for m, v in (c.get(key) or {}).items():
            out[f"{key}.{m}"] = (_num(v), f"contribution.{key}.{m}", 100.0)
    terms = contribution_terms(c)
    for pair, d in terms["interaction"].items():
        out[f"interaction.{pair}"] = (_num(d["value"]), f"contribution.interaction.{pair}.value", 100.0)
    for pair, d in terms["decomposition"].items():
        for t, v in d["overall"].items():
            out[f"decomposition.{pair}.{t}"] = (_num(v), f"contribution.decomposition.{pair}.overall.{t}", 100.0)
    for pair, ent in (((c.get("pid") or {}).get("pairs")) or {}).items():
        o = (ent.get("prediction") or {}).get("overall") or {}
        for t in ("redundancy", "unique_1", "unique_2", "synergy"):
            if t in o:
                out[f"pid.{pair}.{t}"] = (_num(o[t]), f"contribution.pid.pairs.{pair}.prediction.overall.{t}", 1.0)
    return out


def _num(x: Any) -> float:
    return math.nan if x is None else float(x)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    ok = [v for v in values if not math.isnan(v)]
    n = len(ok)
    return {"n": n, "values": list(values),
            "mean": statistics.fmean(ok) if n else math.nan,
            "std": statistics.stdev(ok) if n > 1 else math.nan,  # sample std (n - 1)
            "min": min(ok) if n else math.nan, "max": max(ok) if n else math.nan}


def seed_groups(labels: Sequence[str], results: Sequence[InterpretResult]) -> list[dict[str, Any]]:
    """Results of the same recipe (:func:`recipe_key`), with mean +- spread per headline number.

    Results without a training config are groups of one (their recipe is unknown, so they are
    never pooled with another result). Returns, in first-seen order, ``{"label", "model",
    "members", "seeds", "n", "stats": {number: {"n", "values", "mean", "std", "min", "max"}},
    "scale": {number: display scale}}``."""
    groups: dict[str, dict[str, Any]] = {}
    for i, (lab, r) in enumerate(zip(labels, results)):
        key = recipe_key(r) or f"#{i}"
        g = groups.setdefault(key, {"model": r.model, "members": [], "seeds": [], "_results": []})
        g["members"].append(lab)
        g["seeds"].append((training_config(r) or {}).get("seed"))
        g["_results"].append(r)
    out = []
    names_seen: dict[str, int] = {}
    for g in groups.values():
        rs = g.pop("_results")
        nums = [headline_numbers(r) for r in rs]
        names = list(dict.fromkeys(k for n in nums for k in n))
        names_seen[g["model"]] = names_seen.get(g["model"], 0) + 1
        k = names_seen[g["model"]]
        g["label"] = g["model"] if k == 1 else f"{g['model']} (recipe {k})"
        g["n"] = len(rs)
        g["stats"] = {name: _spread([n[name][0] if name in n else math.nan for n in nums]) for name in names}
        g["scale"] = {name: next(n[name][2] for n in nums if name in n) for name in names}
        out.append(g)
    return out


def seed_differences(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For every two seed groups with n >= 2 each and every number both have: does the
    difference exceed the seed spread?

    Rule: it does when the two groups' seed ranges ``[min, max]`` do not overlap. Under the null
    hypothesis that the recipe does not matter (the n_a + n_b values exchangeable), complete
    separation has probability ``p = 2 / C(n_a + n_b, n_a)`` (an exact permutation test whose
    statistic is "every value of one group above every value of the other"): 0.10 at 3 vs 3,
    0.029 at 4 vs 4, 0.0079 at 5 vs 5; ``p`` is reported beside the verdict."""
    out = []
    for i, ga in enumerate(groups):
        for gb in groups[i + 1:]:
            if ga["n"] < 2 or gb["n"] < 2:
                continue
            p = 2 / math.comb(ga["n"] + gb["n"], ga["n"])
            for name, sa in ga["stats"].items():
                sb = gb["stats"].get(name)
                if sb is None or sa["n"] < 2 or sb["n"] < 2:
                    continue
                apart = sa["min"] > sb["max"] or sb["min"] > sa["max"]
                out.append({"a": ga["label"], "b": gb["label"], "number": name, "diff": sa["mean"] - sb["mean"],
                            "a_range": [sa["min"], sa["max"]], "b_range": [sb["min"], sb["max"]],
                            "exceeds_seed_spread": apart, "p_separation": p,
                            "rule": "seed ranges do not overlap"})
    return out


# --------------------------------------------------------------------------------------------
# retrained references
# --------------------------------------------------------------------------------------------
def _coalition_value(view: PolicyView, members: Sequence[str], order: Sequence[str]) -> tuple[float, str] | None:
    _, vk, _ = contribution_keys(view.contribution)
    key = "+".join(m for m in order if m in members) or "none"
    entry = (view.contribution.get("coalitions") or {}).get(key)
    if entry is None:
        return None
    return _num(entry.get(vk)), f"{view.prefix}coalitions.{key}.{vk}"


def _drops(res: InterpretResult, kept: Sequence[str], removed: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Under every policy of ``res``: how much removing ``removed`` costs it."""
    out = {}
    for v in policy_views(res):
        if len(removed) == 1 and removed[0] in (v.contribution.get("drop") or {}):
            m = removed[0]
            path = f"{v.prefix}drop.{m}"
            out[v.policy] = {"value": _num(v.contribution["drop"][m]), "interval": _iv(res, path)}
        else:  # several removed: v(all) - v(kept), whose interval no accumulator records
            full, part = _coalition_value(v, res.modalities, res.modalities), _coalition_value(v, kept, res.modalities)
            if full and part:
                out[v.policy] = {"value": full[0] - part[0], "interval": None}
    return out


def _iv(res: InterpretResult, path: str) -> list[float] | None:
    ci = interval(res, path)
    return list(ci) if ci is not None else None


def reference_entries(res: InterpretResult, ref: InterpretResult, ref_label: str) -> list[dict[str, Any]]:
    """What ``ref`` (a run of ``res``'s recipe trained on fewer streams, with modality dropout,
    or with a modality always missing) says about the modalities ``res`` would lose.

    Each entry: ``{"label", "kind" ("unimodal" / "modality_dropout" / "train_missing"), "kept",
    "removed", "score" (the reference on ``kept``), "interval", "policy" (of that value),
    "fused" / "fused_interval" (``res`` with every modality), "drops" (policy -> the drop of
    ``res`` when ``removed`` is removed)}``. Empty when ``ref`` is no reference for ``res``.
    """
    mods, rmods = list(res.modalities), list(ref.modalities)
    cfg = training_config(ref) or {}
    base = {"label": ref_label, "fused": res.score(),
            "fused_interval": _iv(res, headline_numbers(res)["score"][1]) if res.score() is not None else None}
    entries = []
    if set(rmods) < set(mods):
        kept = rmods
        full = "+".join(rmods)
        _, vk, _ = contribution_keys(ref.contribution or {})
        cands = [("unimodal", kept, ref.score(), f"contribution.coalitions.{full}.{vk}",
                  (ref.contribution or {}).get("policy"))]
    elif set(rmods) == set(mods) and (cfg.get("modality_dropout") or cfg.get("train_missing")):
        views = {v.policy: v for v in policy_views(ref)}
        view = views.get("missing") or next(iter(views.values()), None)
        if view is None:
            return []
        if cfg.get("train_missing"):
            kind, removable = "train_missing", [list(cfg["train_missing"])]
        else:
            kind = "modality_dropout"
            removable = [[m] for m in (cfg.get("modality_dropout_candidates") or mods[1:])]
        cands = []
        for removed in removable:
            kept = [m for m in mods if m not in removed]
            cv = _coalition_value(view, kept, mods)
            if cv is not None:
                cands.append((kind, kept, cv[0], cv[1], view.policy))
    else:
        return []
    for kind, kept, value, path, policy in cands:
        removed = [m for m in mods if m not in kept]
        entries.append({**base, "kind": kind, "kept": list(kept), "removed": removed, "score": value,
                        "interval": _iv(ref, path), "policy": policy, "drops": _drops(res, kept, removed)})
    return entries


def find_references(labels: Sequence[str], results: Sequence[InterpretResult]) -> dict[str, list[dict[str, Any]]]:
    """label -> :func:`reference_entries` of the other results of its recipe (ignoring streams
    and seed). Only results whose training config is recorded are matched."""
    out: dict[str, list[dict[str, Any]]] = {}
    for lab, r in zip(labels, results):
        key = recipe_key(r, streams=False)
        cfg = training_config(r) or {}
        if key is None or len(r.modalities) < 2 or cfg.get("modality_dropout") or cfg.get("train_missing"):
            continue
        for rlab, q in zip(labels, results):
            if q is not r and recipe_key(q, streams=False) == key:
                entries = reference_entries(r, q, rlab)
                if entries:
                    out.setdefault(lab, []).extend(entries)
    return out


def with_references(labels: Sequence[str], results: Sequence[InterpretResult]) -> list[InterpretResult]:
    """Copies of ``results`` whose ``settings["references"]`` hold :func:`find_references`
    (the inputs are not modified)."""
    found = find_references(labels, results)
    out = []
    for lab, r in zip(labels, results):
        if lab in found:
            refs = [*(r.settings.get("references") or []), *found[lab]]
            r = dataclasses.replace(r, settings={**r.settings, "references": refs})
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows of plain-text cells)


def display_name(name: str) -> str:
    """A headline number's name for a table cell: ``decomposition.rgb|depth.synergy`` ->
    ``synergy rgb-depth`` (a ``|`` would split a markdown cell)."""
    parts = name.split(".")
    kind, rest = parts[0], [p.replace("|", "-") for p in parts[1:]]
    if kind == "decomposition":
        return f"{rest[1]} {rest[0]}"
    if kind == "pid":
        return f"PID {rest[1]} {rest[0]}"
    return " ".join([{"shapley": "Shapley"}.get(kind, kind), *rest])


def _fmt(v: float, scale: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{scale * v:.{1 if scale == 100.0 else 3}f}"


def _with_ci(v: float, ci: Sequence[float] | None, scale: float) -> str:
    text = _fmt(v, scale)
    return f"{text} [{_fmt(ci[0], scale)}, {_fmt(ci[1], scale)}]" if ci is not None and text != "n/a" else text


def seed_rows(groups: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """One row per (group, number): mean +- std (min..max, n)."""
    rows = []
    for g in groups:
        for name, s in g["stats"].items():
            sc = g["scale"][name]
            spread = (f"{_fmt(s['mean'], sc)} +- {_fmt(s['std'], sc)}" if s["n"] > 1 else _fmt(s["mean"], sc))
            rows.append([g["label"], display_name(name), spread, f"{_fmt(s['min'], sc)}..{_fmt(s['max'], sc)}",
                         str(s["n"])])
    return rows


def comparison_extra_tables(labels: Sequence[str], results: Sequence[InterpretResult]) -> list[Table]:
    """Headline numbers with their 95 % intervals (one row per model), seed groups (mean +-
    std, min..max, n; only when a recipe has several seeds) and differences against the seed
    spread: the tables the compare page shows below the findings."""
    per = [headline_numbers(r) for r in results]
    names = list(dict.fromkeys(k for n in per for k in n))
    tables: list[Table] = []
    if names:
        rows = [[lab] + [_with_ci(n[k][0], _iv(r, n[k][1]), n[k][2]) if k in n else "n/a" for k in names]
                for lab, r, n in zip(labels, results, per)]
        tables.append(("Headline numbers with 95% bootstrap intervals over images (metric points; PID in bits)",
                       ["model", *map(display_name, names)], rows))
    groups = seed_groups(labels, results)
    if any(g["n"] > 1 for g in groups):
        tables.append(("Seeds: mean +- std over runs of one recipe (min..max, n)",
                       ["recipe", "number", "mean +- std", "min..max", "n"],
                       seed_rows([g for g in groups if g["n"] > 1])))
        diffs = seed_differences(groups)
        if diffs:
            tables.append(("Do two recipes differ by more than the seed spread? (rule: seed ranges do not overlap)",
                           ["a", "b", "number", "mean a - b", "exceeds seed spread", "p (complete separation)"],
                           [[d["a"], d["b"], display_name(d["number"]), _fmt(d["diff"], next(
                               g["scale"][d["number"]] for g in groups if g["label"] == d["a"])),
                             "yes" if d["exceeds_seed_spread"] else "no", f"{d['p_separation']:.3f}"]
                            for d in diffs]))
    return tables


def markdown_tables(tables: Sequence[Table]) -> str:
    """Tables as GitHub markdown (what ``fusionzoo compare`` prints after the comparison)."""
    parts = []
    for title, header, rows in tables:
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + ("\n" if parts else "")


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------
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

    Raises:
        IncomparableError: results of different tasks, class sets or modalities
            (:func:`check_comparable`).

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
    labels = labels_of(res)
    check_comparable(labels, res)
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
    for lab, r in zip(labels, res):
        cis = {name: _iv(r, path) for name, (_, path, _) in headline_numbers(r).items()}
        out.intervals[lab] = {k: v for k, v in cis.items() if v is not None}
    out.groups = seed_groups(labels, res)
    out.differences = seed_differences(out.groups)
    out.references = find_references(labels, res)
    return out
