"""Reports: ``metrics.json``, PNG plots and one self-contained ``report.html``.

:func:`write_report` renders one :class:`InterpretResult`; :func:`write_comparison` lays
several side by side. Plots use matplotlib's object API (``Figure``, no pyplot state), so they
work headless and never touch a global backend. Every axis is labelled with its unit (CKA,
semantic variance and shares are unitless in [0, 1]; mIoU / AP and their changes are in
percentage points; gradient norms are L2 norms of the loss gradient). Detectors' contribution
is in COCO AP (``contribution["metric"]``), and the labels say so.

Uncertainty (issue 21): every number with a bootstrap interval in ``result.intervals``
(:func:`.intervals.interval`) is drawn with a black interval bar and written ``value [lo, hi]``
in the tables; a page whose results carry no intervals says so at the top. The contribution is
shown under every removal policy of ``contribution["policies"]``, and semantic variance in both
forms (trace ``sv`` and whitened ``sv_whitened``). Streams keep one colour in every plot
(:func:`.style.stream_color`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from .api import METRICS, InterpretResult, load_result
from .compare import ComparisonResult, compare
from .contribution import contribution_keys
from .findings import comparison_findings_html, cooperation_tables, findings_html, plot_evolution
from .intervals import interval
from .plan import stage_index
from .runs import interpret_run
from .style import stream_color
from .training_report import training_figures

__all__ = ["report_run", "write_comparison", "write_report"]

_color = stream_color  # the one palette (style.py); training_report.py receives it too

Interval = tuple[float, float] | None
# Removal policies in plots: grey fills told apart by hatching, so they never look like a stream.
_POLICY_STYLES = [("#bdbdbd", ""), ("#f0f0f0", "//"), ("#7f7f7f", ""), ("#e0e0e0", "..")]
_IV_NOTE = "black bars: 95 % bootstrap intervals over images"
# Models in a comparison: told apart by line style and marker, since colour belongs to the stream.
_MODEL_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v")]


def _draw_intervals(ax: Any, xs: Sequence[float], ivs: Sequence[Interval], scale: float = 1.0) -> bool:
    """Vertical interval bars with caps at ``xs`` (``None`` entries skipped); True if any was drawn.

    Drawn as lines from ``lo`` to ``hi`` rather than ``errorbar`` offsets: a percentile interval
    need not contain its point estimate, and offsets would have to be clipped."""
    pts = [(x, scale * iv[0], scale * iv[1]) for x, iv in zip(xs, ivs) if iv is not None]
    if not pts:
        return False
    x, lo, hi = (list(v) for v in zip(*pts))
    ax.vlines(x, lo, hi, color="black", lw=1.2, zorder=4)
    ax.scatter(x + x, lo + hi, marker="_", color="black", s=40, linewidths=1.2, zorder=4)
    return True


def _cka_row_index(res: InterpretResult) -> dict[tuple[str, str], int]:
    """(a, b) -> row index in ``res.cka["pairs"]`` (interval paths ``cka.pairs.<i>.cka``), both orders."""
    out: dict[tuple[str, str], int] = {}
    for i, r in enumerate((res.cka or {}).get("pairs", [])):
        out[(r["a"], r["b"])] = out[(r["b"], r["a"])] = i
    return out


def _cka_interval(res: InterpretResult, a: str, b: str, index: Mapping[tuple[str, str], int] | None = None) -> Interval:
    i = (index if index is not None else _cka_row_index(res)).get((a, b))
    return None if i is None else interval(res, f"cka.pairs.{i}.cka")


def _sv_value(v: Mapping[str, Any] | None, key: str) -> Any:
    """``sv`` (trace form; older results: ``semantic_variance``) or ``sv_whitened`` of one tap."""
    if not v:
        return None
    return v.get("sv", v.get("semantic_variance")) if key == "sv" else v.get(key)


_SV_FORMS = (("sv", "trace form S_B / S_T"), ("sv_whitened", "whitened form tr(S_T^-1 S_B) / min(K-1, C)"))


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps long suptitles inside the image
    return path


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _stages(res: InterpretResult) -> list[str]:
    st = {t["stage"] for t in res.taps.values() if stage_index(t["stage"]) is not None}
    return sorted(st, key=stage_index)


def _streams(res: InterpretResult) -> list[str]:
    present = {t["stream"] for t in res.taps.values()}
    return [s for s in [*res.modalities, "fused"] if s in present]


# --------------------------------------------------------------------------------------------
# single-run plots
# --------------------------------------------------------------------------------------------
def _cka_heatmaps(res: InterpretResult, rows: Sequence[Mapping[str, Any]],
                  panels: Sequence[tuple[str, list[str], list[str]]], axis: str, title: str) -> Figure:
    """One symmetric CKA matrix per panel ``(title, tick labels, taps)`` from the CKA ``rows``; each cell
    shows its value and, when the result has one, its interval ``[lo, hi]`` below."""
    index = _cka_row_index(res)
    big = max(len(taps) for _, _, taps in panels)
    cell = 0.95 if res.intervals else 0.6
    # Constrained layout keeps every panel's tick labels clear of its neighbour's cells (a
    # right-column annotation once ran into the next panel's labels: "0.94depth").
    fig = Figure(figsize=(len(panels) * (cell * big + 1.3) + 1.2, cell * big + 1.9), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (name, labels, taps) in zip(axes, panels):
        idx = {t: i for i, t in enumerate(taps)}
        mat = np.eye(len(taps))
        for r in rows:
            if r["a"] in idx and r["b"] in idx:
                mat[idx[r["a"]], idx[r["b"]]] = mat[idx[r["b"]], idx[r["a"]]] = _nan(r["cka"])
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(taps)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(taps)), labels)
        ax.set_title(name)
        ax.set_xlabel(axis)
        for i, ta in enumerate(taps):
            for j, tb in enumerate(taps):
                v = mat[i, j]
                text = "n/a" if math.isnan(v) else f"{v:.2f}"
                iv = _cka_interval(res, ta, tb, index) if i != j else None
                if iv is not None:
                    text += f"\n[{iv[0]:.2f}, {iv[1]:.2f}]"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if (not math.isnan(v) and v < 0.6) else "black")
    axes[0].set_ylabel(axis)
    fig.colorbar(im, ax=list(axes), label="debiased linear CKA (unitless)", shrink=0.85)
    fig.suptitle(title)
    return fig


def _saved(fig: Figure | None, path: Path) -> Path | None:
    """Save a constrained-layout figure (no tight_layout: its colorbars would move)."""
    if fig is None:
        return None
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_cka_stages(res: InterpretResult, path: Path) -> Path | None:
    return _saved(_cka_stages_figure(res), path)


def _plot_cka_within(res: InterpretResult, path: Path) -> Path | None:
    return _saved(_cka_within_figure(res), path)


def _cka_stages_figure(res: InterpretResult) -> Figure | None:
    rows = [r for r in res.cka_pairs() if r["kind"] in ("cross_modal", "modality_fused")]
    if not rows:
        return None
    stages = [s for s in _stages(res) if any(r["stage"] == s for r in rows)]
    panels = []
    for stage in stages:
        streams = [s for s in _streams(res) if f"{s}.{stage}" in res.taps]
        panels.append((stage, [_after_fusion_label(res, f"{s}.{stage}", s) for s in streams],
                       [f"{s}.{stage}" for s in streams]))
    return _cka_heatmaps(res, rows, panels, "stream", f"{res.model}: feature similarity between streams, per stage")


def _cka_within_figure(res: InterpretResult) -> Figure | None:
    rows = res.cka_pairs("within")
    if not rows:
        return None
    streams = [s for s in _streams(res) if any(r["a"].startswith(s + ".") for r in rows)]
    panels = []
    for stream in streams:
        stages = [s for s in _stages(res) if f"{stream}.{s}" in res.taps]
        panels.append((stream, [_after_fusion_label(res, f"{stream}.{s}", s) for s in stages],
                       [f"{stream}.{s}" for s in stages]))
    return _cka_heatmaps(res, rows, panels, "stage", f"{res.model}: how each stream's representation evolves across stages")


def _after_fusion_label(res: InterpretResult, tap: str, label: str) -> str:
    """A tick label marked ``*`` when the tap of a modality stream sits after fusion (its own stream
    already carries another modality), so similarity there is partly built in."""
    t = res.taps.get(tap) or {}
    return f"{label}*" if t.get("after_fusion") and t.get("stream") in res.modalities else label


def _draw_stage_curves(ax: Any, res: InterpretResult, values: Mapping[str, Any], value: Any,
                       iv_path: Any = None) -> bool:
    """One line per stream over the stages: ``value(values[tap])`` per ``{stream}.{stage}`` tap, with
    the interval at ``iv_path(tap)`` when given; streams are offset a little along x so bars do not
    hide each other. True if anything was drawn."""
    stages = _stages(res)
    streams = _streams(res)
    drawn = False
    for i, stream in enumerate(streams):
        xs, ys, ivs = [], [], []
        shift = 0.06 * (i - (len(streams) - 1) / 2) if iv_path and res.intervals else 0.0
        for s in stages:
            tap = f"{stream}.{s}"
            if values.get(tap) is not None:
                xs.append(stage_index(s) + shift)
                ys.append(_nan(value(values[tap])))
                ivs.append(interval(res, iv_path(tap)) if iv_path else None)
        if xs and not all(math.isnan(y) for y in ys):
            ax.plot(xs, ys, marker="o", label=stream, color=_color(stream, i))
            _draw_intervals(ax, xs, ivs)
            drawn = True
    ax.set_xticks([stage_index(s) for s in stages], stages)
    ax.set_xlabel("encoder stage (stride 4, 8, 16, 32)")
    ax.grid(alpha=0.3)
    return drawn


def _stage_curve(res: InterpretResult, values: Mapping[str, Any], key: str | None, ylabel: str, title: str,
                 path: Path, ylim: tuple[float, float] | None = None) -> Path | None:
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    if not _draw_stage_curves(ax, res, values, (lambda v: v.get(key)) if key else (lambda v: v)):
        return None
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend(title="stream")
    ax.set_title(title)
    return _save(fig, path)


def _plot_semantic_variance(res: InterpretResult, path: Path) -> Path | None:
    """Semantic variance per stream and stage in both forms, side by side: the trace form
    ``S_B / S_T`` (dominated by high-variance channels) and the whitened form (every direction of
    feature space weighted alike); they can trend in opposite directions (issue 21)."""
    sv = res.semantic_variance or {}
    forms = [(key, label) for key, label in _SV_FORMS
             if any(_sv_value(v, key) is not None and math.isfinite(_nan(_sv_value(v, key))) for v in sv.values())]
    if not forms:
        return None
    fig = Figure(figsize=(5.6 * len(forms) + 0.6, 3.9))
    axes = fig.subplots(1, len(forms), squeeze=False)[0]
    drawn = False
    for ax, (key, label) in zip(axes, forms):
        drawn |= _draw_stage_curves(ax, res, sv, lambda v, k=key: _sv_value(v, k),
                                    lambda tap, k=key: f"semantic_variance.{tap}.{k}")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"semantic variance, {key} (unitless)")
        ax.set_title(label, fontsize=10)
        if ax.lines:
            ax.legend(title="stream", fontsize=8)
    if not drawn:
        return None
    fig.suptitle(f"{res.model}: semantic variance across stages", fontsize=11)
    return _save(fig, path)


def _class_metric(c: Mapping[str, Any]) -> str:
    """The per-class metric of a contribution: ``IoU`` or ``AP``."""
    return "AP" if contribution_keys(c)[0] == "AP" else "IoU"


def _plot_contribution(res: InterpretResult, path: Path) -> Path | None:
    c = res.contribution
    if not c:
        return None
    mods = c["modalities"]
    groups = [("leave-one-out drop", c["drop"], "contribution.drop.{m}"),
              ("Shapley value", c["shapley"], "contribution.shapley.{m}")]
    if c.get("perceptual"):
        groups.append(("perceptual drop", {m: v["drop"] for m, v in c["perceptual"].items()},
                       "contribution.perceptual.{m}.drop"))
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        xs = np.arange(len(groups)) + (j - (len(mods) - 1) / 2) * width
        ax.bar(xs, [100 * _nan(g[1].get(m)) for g in groups], width, label=m, color=_color(m, j))
        _draw_intervals(ax, list(xs), [interval(res, g[2].format(m=m)) for g in groups], 100)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    metric, key, _ = contribution_keys(c)
    ax.set_ylabel(f"{metric} change (percentage points)")
    full = c["coalitions"].get("+".join(mods), {}).get(key)
    ax.set_title(f"{res.model}: modality contribution (policy '{c['policy']}', {metric} {100 * _nan(full):.1f}%)")
    ax.margins(y=0.15)  # headroom so the legend does not cover bars
    ax.legend(title="modality")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_contribution_policies(res: InterpretResult, path: Path) -> Path | None:
    """Leave-one-out drop and Shapley value of every modality under every removal policy measured
    (``contribution["policies"]``), grouped by modality; one policy alone gives no plot."""
    c = res.contribution or {}
    policies = c.get("policies") or {}
    if len(policies) < 2:
        return None
    mods = c["modalities"]
    metric = contribution_keys(c)[0]
    fig = Figure(figsize=(max(7.0, 2.2 * len(mods) * 2 + 1), 3.9))
    axes = fig.subplots(1, 2)
    width = 0.8 / len(policies)
    for ax, (key, label) in zip(axes, (("drop", "leave-one-out drop"), ("shapley", "Shapley value"))):
        for j, (p, sec) in enumerate(policies.items()):
            fill, hatch = _POLICY_STYLES[j % len(_POLICY_STYLES)]
            xs = np.arange(len(mods)) + (j - (len(policies) - 1) / 2) * width
            ax.bar(xs, [100 * _nan((sec.get(key) or {}).get(m)) for m in mods], width, color=fill, hatch=hatch,
                   edgecolor="black", lw=0.6, label=p)
            _draw_intervals(ax, list(xs), [interval(res, f"contribution.policies.{p}.{key}.{m}") for m in mods], 100)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(mods)), mods)
        ax.set_xlabel("modality removed / valued")
        ax.set_ylabel(f"{metric} change (percentage points)")
        ax.set_title(label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(title="removal policy", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{res.model}: contribution under each removal policy (main: '{c.get('policy')}')", fontsize=11)
    return _save(fig, path)


def _plot_contribution_classes(res: InterpretResult, path: Path) -> Path | None:
    c = res.contribution
    if not c or not c.get("shapley_per_class"):
        return None
    mods = c["modalities"]
    k = len(next(iter(c["shapley_per_class"].values())))
    names = res.class_names or [str(i) for i in range(k)]
    fig = Figure(figsize=(max(6.0, 0.55 * k + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        ys = [100 * _nan(v) for v in c["shapley_per_class"][m]]
        xs = np.arange(k) + (j - (len(mods) - 1) / 2) * width
        ax.bar(xs, ys, width, label=m, color=_color(m, j))
        _draw_intervals(ax, list(xs), [interval(res, f"contribution.shapley_per_class.{m}.{i}") for i in range(k)], 100)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(k), names, rotation=35, ha="right")
    ax.set_xlabel("class (missing bars: class in neither ground truth nor prediction of some coalition)"
                  if _class_metric(c) == "IoU" else "class (missing bars: class absent from the ground truth)")
    ax.set_ylabel(f"Shapley value of class {_class_metric(c)} (points)")
    ax.set_title(f"{res.model}: per-class modality contribution")
    ax.legend(title="modality", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never on them
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _training_rows(hist: Mapping[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The records the training plot draws (per epoch when there are two or more, else per step)
    and whether they are epochs."""
    epochs = hist.get("epochs") or []
    use_epochs = len(epochs) >= 2
    return list(epochs if use_epochs else hist.get("steps") or []), use_epochs


def _has_confidence(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the records carry unimodal-head confidences (models with ``{m}.head`` taps only)."""
    return any(r.get("confidence") for r in rows)


def _training_caption(res: InterpretResult) -> str:
    """Caption of the training plot: names the unimodal confidence panel only when it is drawn."""
    rows, _ = _training_rows(res.training or {})
    if _has_confidence(rows):
        return ("Per-modality encoder gradient norms, their ratio and the confidence of each modality's own "
                "head over training.")
    return ("Per-modality encoder gradient norms and their ratio over training (this model has no unimodal "
            "heads, so no unimodal confidence).")


def _plot_training(res: InterpretResult, path: Path) -> Path | None:
    hist = res.training or {}
    rows, use_epochs = _training_rows(hist)
    if not rows:
        return None
    def finite(key: str) -> bool:
        return any(v is not None and math.isfinite(v) for r in rows for v in (r.get(key) or {}).values())

    if not finite("grad_norm") and not finite("confidence"):
        return None  # e.g. early fusion: no modality owns parameters and there are no modality heads
    xs = [r["epoch" if use_epochs else "step"] for r in rows]
    xlabel = "epoch" if use_epochs else "training step"
    mods = hist.get("modalities") or res.modalities
    has_conf = _has_confidence(rows)
    fig = Figure(figsize=(11 if has_conf else 6, 3.8))
    axes = fig.subplots(1, 3 if has_conf else 2, squeeze=False)[0]
    for i, m in enumerate(mods):
        axes[0].plot(xs, [_nan((r.get("grad_norm") or {}).get(m)) for r in rows], marker=".", label=m, color=_color(m, i))
    axes[0].set_yscale("log")
    axes[0].set_xlabel(xlabel)
    axes[0].set_ylabel("encoder gradient L2 norm (log)")
    axes[0].set_title("per-modality gradient norm")
    axes[0].legend(title="modality")
    ratio_keys = sorted({k for r in rows for k in (r.get("grad_ratio") or {})})
    for key in ratio_keys:
        axes[1].plot(xs, [_nan((r.get("grad_ratio") or {}).get(key)) for r in rows], marker=".", label=key)
    axes[1].axhline(1, color="black", lw=0.8, ls="--")
    axes[1].set_xlabel(xlabel)
    axes[1].set_ylabel("gradient-norm ratio (unitless)")
    axes[1].set_title("gradient ratio (1 = balanced)")
    if ratio_keys:
        axes[1].legend()
    if has_conf:
        ax = axes[2]
        for i, m in enumerate(hist.get("heads") or mods):
            ax.plot(xs, [_nan((r.get("confidence") or {}).get(m)) for r in rows], marker=".", label=m, color=_color(m, i))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("unimodal confidence (probability)")
        ax.set_ylim(0, 1)
        ax.set_title("per-modality head confidence")
        ax.legend(title="head")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs / steps are whole numbers
    fig.suptitle(f"{res.model}: optimization balance during training (OGM-GE signals)")
    return _save(fig, path)


def _plot_gradcam(res: InterpretResult, path: Path) -> Path | None:
    fig = _gradcam_figure(res)
    return None if fig is None else _save(fig, path)


def _gradcam_figure(res: InterpretResult) -> Figure | None:
    """Input images and Grad-CAM overlays; a panel whose map is zero everywhere shows the image
    with "all zero" written on it (a uniform colour would look like a map)."""
    cams = res.artifacts.get("gradcam")
    images = res.artifacts.get("images")
    if not cams or not images:
        return None
    taps = list(cams)
    explained = res.artifacts.get("gradcam_detections") or []  # detectors: per image the explained boxes
    n = min(len(next(iter(cams.values()))), len(next(iter(images.values()))))
    cols = len(res.modalities) + len(taps)
    fig = Figure(figsize=(2.4 * cols, 2.5 * n + 0.4))
    axes = fig.subplots(n, cols, squeeze=False)
    base = images[res.modalities[0]]
    for i in range(n):
        for j, m in enumerate(res.modalities):
            img = images[m][i]
            ax = axes[i, j]
            if img.shape[0] == 3:
                ax.imshow(img.permute(1, 2, 0).numpy())
            else:
                ax.imshow(img[0].numpy(), cmap="gray")
            ax.set_title(f"{m} input" if i == 0 else "")
        classes = res.artifacts.get("gradcam_classes") or []
        if i < len(classes):  # the class this row explains (object_class_region)
            c = classes[i]
            name = res.class_names[c] if res.class_names and c < len(res.class_names) else str(c)
            axes[i, 0].set_ylabel(f"explains: {name}", fontsize=9)
        for j, t in enumerate(taps):
            ax = axes[i, len(res.modalities) + j]
            b = base[i]
            ax.imshow(b.permute(1, 2, 0).numpy() if b.shape[0] == 3 else b[0].numpy(), cmap=None if b.shape[0] == 3 else "gray")
            cam = cams[t][i].numpy()
            if not np.any(cam > 0):  # no positive evidence anywhere: say so instead of a uniform blue
                ax.text(0.5, 0.5, "all zero", transform=ax.transAxes, ha="center", va="center", fontsize=11,
                        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
            else:
                ax.imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i < len(explained):
                for x1, y1, x2, y2 in explained[i]["boxes"].tolist():  # the detection explained
                    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="white", lw=1.5))
            red = (res.taps.get(t) or {}).get("reduction") or 0
            grid = f" ({-(-b.shape[1] // red)}x{-(-b.shape[2] // red)} cells)" if red > 0 else ""
            ax.set_title(f"Grad-CAM {t}{grid}" if i == 0 else "", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    what = ("the top detection (white box)" if explained else
            "one predicted class per image (left)" if res.artifacts.get("gradcam_classes") else "the predicted classes")
    fig.suptitle(f"{res.model}: Grad-CAM of {what} (colour: min-max scaled attribution 0-1 per image, "
                 f"over {res.modalities[0]})", fontsize=10)
    return fig


def _plot_gates(res: InterpretResult, path: Path) -> Path | None:
    maps = res.artifacts.get("gate_maps") or {}
    spatial = {t: d for t, d in maps.items() if next(iter(d.values())).shape[-1] > 1}
    if not res.gates and not spatial:
        return None
    ncols = max(1, sum(len(d) for d in spatial.values()))
    fig = Figure(figsize=(max(7.0, 2.4 * ncols), 3.6 + (2.6 if spatial else 0)))
    if spatial:
        gs = fig.add_gridspec(2, ncols)
        ax_bar = fig.add_subplot(gs[0, :])
    else:
        ax_bar = fig.subplots()
    if res.gates:
        taps = list(res.gates)
        streams = list(dict.fromkeys(s for d in res.gates.values() for s in d))
        width = 0.8 / max(1, len(streams))
        for j, s in enumerate(streams):
            ax_bar.bar(np.arange(len(taps)) + (j - (len(streams) - 1) / 2) * width,
                       [_nan(res.gates[t].get(s)) for t in taps], width, label=s, color=_color(s, j))
        ax_bar.set_xticks(range(len(taps)), taps, rotation=20, ha="right", fontsize=8)
        ax_bar.set_ylabel("mean gate / attention value\n(as emitted by the tap)")
        ax_bar.legend(title="stream", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax_bar.grid(axis="y", alpha=0.3)
        ax_bar.set_title(f"{res.model}: fusion gates and attention, dataset mean")
    col = 0
    for t, d in spatial.items():
        for s, v in d.items():
            ax = fig.add_subplot(gs[1, col])
            im = ax.imshow(v[0].numpy(), cmap="magma")
            ax.set_title(f"{t}\n{s}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, label="value")
            col += 1
    return _save(fig, path)


def _plot_purification(res: InterpretResult, path: Path) -> Path | None:
    """Keep rate of every purification gate per class (bars with their intervals)."""
    gates = {t: g for t, g in ((res.purification or {}).get("gates") or {}).items() if g.get("keep_per_class")}
    if not gates:
        return None
    k = len(next(iter(gates.values()))["keep_per_class"])
    names = list(res.class_names or [])[:k] or [str(i) for i in range(k)]
    fig = Figure(figsize=(max(7.0, 0.5 * k * len(gates)), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(gates)
    for j, (t, g) in enumerate(gates.items()):
        xs = np.arange(k) + (j - (len(gates) - 1) / 2) * width
        ax.bar(xs, [100 * _nan(v) for v in g["keep_per_class"]], width, label=t, color=_color(g["modality"], j),
               alpha=0.45 + 0.55 * (j + 1) / len(gates))
        _draw_intervals(ax, xs, [interval(res, f"purification.gates.{t}.keep_per_class.{i}") for i in range(k)], 100.0)
    ax.set_xticks(range(k), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("kept by the gate (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="gate", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{res.model}: what each purification gate keeps, per class")
    return _save(fig, path)


def _purification_tables(res: InterpretResult) -> list[str]:
    """"What purification removes": keep rates per gate and class, semantic variance before /
    after each gate, contribution with the gates as trained and forced open (models with gate taps)."""
    sec = res.purification or {}
    gates = sec.get("gates") or {}
    if not gates:
        return []
    sv = res.semantic_variance or {}
    out = [("<h2>What purification removes</h2><p>Each purification gate <code>{m}.stageN.gate</code> multiplies its "
           "stream <code>{m}.stageN</code> into <code>{m}.stageN.purified</code>; its keep rate is the gate's mean "
           "over channels and cells (100 % = keeps everything), per class on the label mask at the gate's resolution "
           "(nearest). Semantic variance (trace form) of the stream before and after its gate comes from the "
           "semantic-variance section.</p>")]
    rows = []
    for t, g in gates.items():
        b, a = sv.get(g["stream"]) or {}, sv.get(g["purified"]) or {}
        rows.append([html.escape(t), html.escape(str(g.get("granularity"))),
                     _fmt_iv(g.get("keep"), interval(res, f"purification.gates.{t}.keep"), pct=True),
                     _fmt_iv(b.get("sv"), interval(res, f"semantic_variance.{g['stream']}.sv"), pct=True),
                     _fmt_iv(a.get("sv"), interval(res, f"semantic_variance.{g['purified']}.sv"), pct=True)])
    out.append(_table(["gate", "mask", "kept (%)", "semantic variance before (%)", "after (%)"], rows))
    per_class = {t: g["keep_per_class"] for t, g in gates.items() if g.get("keep_per_class")}
    if per_class:
        k = len(next(iter(per_class.values())))
        names = list(res.class_names or [])[:k] or [str(i) for i in range(k)]
        out.append("<h3>Kept per class (%)</h3>" + _table(
            ["class", *per_class],
            [[html.escape(names[i]), *(_fmt_iv(v[i], interval(res, f"purification.gates.{t}.keep_per_class.{i}"),
                                                pct=True) for t, v in per_class.items())] for i in range(k)]))
    c = sec.get("contribution")
    if c:
        out.append(_purification_contribution(res, c))
    elif res.settings.get("purification"):
        out.append(f"<p>{html.escape(str(res.settings['purification']))}</p>")
    return out


def _purification_contribution(res: InterpretResult, c: Mapping[str, Any]) -> str:
    """The table of the gated and gates-open contribution and their paired difference."""
    metric = c["gated"].get("metric", "mIoU")
    full = "+".join(res.modalities)
    vk = "miou" if metric == "mIoU" else "ap"
    d = c["difference"]
    lines = [(f"{metric} of {full}", f"coalitions.{full}.{vk}", c["gated"]["coalitions"][full][vk],
              c["open"]["coalitions"][full][vk], "full", d["full"])]
    lines += [(f"Shapley {m}", f"shapley.{m}", c["gated"]["shapley"][m], c["open"]["shapley"][m], f"shapley.{m}", v)
              for m, v in d["shapley"].items()]
    lines += [(f"interaction {p.replace('|', '-')}", f"interaction.{p}.value", c["gated"]["interaction"][p]["value"],
               c["open"]["interaction"][p]["value"], f"interaction.{p}", v) for p, v in d["interaction"].items()]
    rows = [[html.escape(label),
             _fmt_iv(g, interval(res, f"purification.contribution.gated.{path}"), pct=True),
             _fmt_iv(o, interval(res, f"purification.contribution.open.{path}"), pct=True),
             _fmt_iv(dv, interval(res, f"purification.contribution.difference.{dpath}"), pct=True)]
            for label, path, g, o, dpath, dv in lines]
    return (f"<h3>Contribution with the gates as trained and with the gates forced open (policy "
            f"{html.escape(str(c.get('policy')))}, points)</h3>"
            + _table(["", "gated", "gates forced open", "gated - open"], rows)
            + "<p>Gates forced open: every purified feature is replaced by its stream's, for the same weights and inputs (keep all); the "
              "difference's interval uses the same bootstrap weights on both sides.</p>")


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _num(v: Any, pct: bool = False) -> str:
    """Plain-text cell: fractions as 0.123, or as percentage points with ``pct``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (int, float)):
        return f"{100 * v:.1f}" if pct else f"{v:.3f}"
    return str(v)


def _fmt(v: Any, pct: bool = False) -> str:
    """HTML cell of :func:`_num`."""
    return html.escape(_num(v, pct))


def _num_iv(v: Any, iv: Interval, pct: bool = False) -> str:
    """Plain-text cell of a value with its interval: ``12.3 [10.1, 14.2]`` (``12.3`` without one)."""
    text = _num(v, pct)
    return text if iv is None or text == "n/a" else f"{text} [{_num(iv[0], pct)}, {_num(iv[1], pct)}]"


def _fmt_iv(v: Any, iv: Interval, pct: bool = False) -> str:
    """HTML cell of :func:`_num_iv`."""
    return html.escape(_num_iv(v, iv, pct))


def _fusion_label(res: InterpretResult) -> str:
    """The fusion family as the registry entry states it (``res.fusion``, recorded from the entry when
    the result was measured); a result of an unregistered model says so instead of guessing."""
    return str(res.fusion) if res.fusion else "unknown: not a registered model"


def _no_interval_reason(res: InterpretResult) -> str:
    replicates = (res.settings.get("intervals") or {}).get("replicates")
    if replicates is None:
        return "its metrics.json carries none (written before intervals existed)"
    if replicates == 0:
        return "the run kept no bootstrap replicates (replicates=0)"
    return f"none of its measures produced one ({replicates} replicates were drawn)"


def _intervals_note(results: Sequence[InterpretResult], labels: Sequence[str] | None = None) -> str:
    """One paragraph: how the intervals were made, or which results carry none and why."""
    without = [lab for lab, r in zip(labels or [r.model for r in results], results) if not r.intervals]
    parts = []
    with_iv = [r for r in results if r.intervals]
    if with_iv:
        s = with_iv[0].settings.get("intervals") or {}
        level = s.get("level", 0.95)
        parts.append(f"Brackets <code>[lo, hi]</code> and black bars in the plots are {100 * level:.0f} % "
                     f"{html.escape(str(s.get('method', 'bootstrap')))} percentile intervals "
                     f"({s.get('replicates', '?')} replicates); a number without one has none in the result.")
    if without:
        reasons = {lab: _no_interval_reason(r) for lab, r in zip(labels or [r.model for r in results], results)
                   if not r.intervals}
        text = "; ".join(f"<code>{html.escape(lab)}</code>: {html.escape(why)}" for lab, why in reasons.items())
        parts.append(f"<b>No intervals</b> for {text}. Its numbers are point estimates without their "
                     "uncertainty: a difference between them may be noise.")
    return f"<p class='intervals'>{' '.join(parts)}</p>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    # class "num": a number and its interval stay on one line; prose tables (findings) still wrap
    return f"<table class='num'><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


# Tables scroll sideways inside the page (display:block + overflow-x) rather than pushing it wider
# than the window: a compare page of six models has a findings column per model.
_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em;display:block;overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.num td{white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1em 0}
img{max-width:100%}figcaption{color:#555;font-size:0.9em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em}
code{background:#f5f5f5;padding:0 3px}"""


def _page(title: str, sections: Sequence[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")


def _summary_tables(res: InterpretResult) -> list[str]:
    out = []
    c = res.contribution
    if c:
        rows = []
        for m in c["modalities"]:
            p = (c.get("perceptual") or {}).get(m, {})
            rows.append([m, _fmt_iv(c["drop"][m], interval(res, f"contribution.drop.{m}"), True),
                         _fmt_iv(c["shapley"][m], interval(res, f"contribution.shapley.{m}"), True),
                         _fmt_iv(p.get("drop"), interval(res, f"contribution.perceptual.{m}.drop"), True),
                         _fmt(p.get("normalized"))])
        metric, key, _ = contribution_keys(c)
        out.append(f"<h3>Modality contribution ({metric} points, removal policy "
                   f"<code>{html.escape(str(c.get('policy')))}</code>)</h3>" + _table(
            ["modality", "drop when removed", "Shapley value", "perceptual drop", "perceptual (normalized)"], rows))
        if metric == "AP":  # COCO AP (IoU .50:.95) and AP50 of every coalition
            co = [[html.escape(k), _fmt_iv(v["ap"], interval(res, f"contribution.coalitions.{k}.ap"), True),
                   _fmt_iv(v.get("ap50"), interval(res, f"contribution.coalitions.{k}.ap50"), True)]
                  for k, v in c["coalitions"].items()]
            out.append(_table(["modalities kept", "AP (%)", "AP50 (%)"], co))
        else:
            co = [[html.escape(k), _fmt_iv(v[key], interval(res, f"contribution.coalitions.{k}.{key}"), True)]
                  for k, v in c["coalitions"].items()]
            out.append(_table(["modalities kept", f"{metric} (%)"], co))
        out += _policy_table(res)
        heads = c.get("unimodal_heads")
        if heads:
            k = len(next(iter(heads.values()))["iou"])
            names = res.class_names or [str(i) for i in range(k)]
            rows = [[f"{html.escape(m)}.head",
                     _fmt_iv(v["miou"], interval(res, f"contribution.unimodal_heads.{m}.miou"), True)]
                    + [_fmt(x, True) for x in v["iou"]] for m, v in heads.items()]
            out.append("<h3>Unimodal heads (each modality's own prediction), IoU %</h3>"
                       + _table(["head", "mIoU", *names], rows))
    stages = _stages(res)
    if res.cka:
        kinds = [("cross_modal", "between modalities"), ("modality_fused", "modality vs fused")]
        index = _cka_row_index(res)
        rows = []
        for kind, label in kinds:
            for r in res.cka_pairs(kind):
                pair = f"{_after_fusion_label(res, r['a'], r['a'])} / {_after_fusion_label(res, r['b'], r['b'])}"
                rows.append([html.escape(pair), label, _fmt_iv(r["cka"], _cka_interval(res, r["a"], r["b"], index)),
                             _fmt(r["cka_biased"])])
        if rows:
            out.append("<h3>Linear CKA per stage</h3>" + _table(["pair", "kind", "debiased", "biased"], rows)
                       + _after_fusion_note(res))
    if res.semantic_variance:
        for key, label in _SV_FORMS:
            if not any(_sv_value(v, key) is not None for v in res.semantic_variance.values()):
                continue
            rows = []
            for stream in _streams(res):
                rows.append([stream] + [_fmt_iv(_sv_value(res.semantic_variance.get(f"{stream}.{s}"), key),
                                                interval(res, f"semantic_variance.{stream}.{s}.{key}")) for s in stages])
            for t in ("decoder.out", "head.logits"):
                if t in res.semantic_variance:
                    rows.append([t, _fmt_iv(_sv_value(res.semantic_variance[t], key),
                                            interval(res, f"semantic_variance.{t}.{key}"))] + [""] * (len(stages) - 1))
            out.append(f"<h3>Semantic variance, {html.escape(label)} (<code>{key}</code>), "
                       f"{html.escape(_sv_grid_note(res))}</h3>" + _table(["stream", *stages], rows))
    if res.reliance:
        rows = [[html.escape(t)] + [_fmt_iv(v.get(m), interval(res, f"reliance.{t}.{m}")) for m in res.modalities]
                for t, v in res.reliance.items()]
        out.append("<h3>Reliance 1 - CKA(tap, tap with the modality removed)</h3>"
                   + _table(["tap", *res.modalities], rows))
    if res.health:
        rows = [[html.escape(t), _fmt(res.health["effective_rank"].get(t)), _fmt(res.health["feature_norm"].get(t))]
                for t in res.health["effective_rank"]]
        out.append("<h3>Representation health</h3>" + _table(["tap", "effective rank", "mean feature norm"], rows))
    return out


def _policy_table(res: InterpretResult) -> list[str]:
    """The contribution under every removal policy measured: score with all modalities, each
    modality's drop and Shapley value, and the pairwise interaction, with intervals."""
    c = res.contribution or {}
    policies = c.get("policies") or {}
    if not policies:
        return []
    mods = c["modalities"]
    metric, key, _ = contribution_keys(c)
    full = "+".join(mods)
    pairs = list(dict.fromkeys(k for sec in policies.values() for k in (sec.get("interaction") or {})))
    empty = res.settings.get("empty_policies") or {}
    rows = []
    for p, sec in policies.items():
        pre = f"contribution.policies.{p}"
        rows.append([html.escape(p) + (" (main)" if p == c.get("policy") else ""),
                     html.escape(str(empty.get(p, "")) or "n/a"),
                     _fmt_iv((sec.get("coalitions") or {}).get(full, {}).get(key),
                             interval(res, f"{pre}.coalitions.{full}.{key}"), True)]
                    + [_fmt_iv((sec.get("drop") or {}).get(m), interval(res, f"{pre}.drop.{m}"), True) for m in mods]
                    + [_fmt_iv((sec.get("shapley") or {}).get(m), interval(res, f"{pre}.shapley.{m}"), True) for m in mods]
                    + [_fmt_iv(((sec.get("interaction") or {}).get(k) or {}).get("value"),
                               interval(res, f"{pre}.interaction.{k}.value"), True) for k in pairs])
    header = ["policy", "empty coalition", f"{metric} all (%)", *[f"drop {m}" for m in mods],
              *[f"Shapley {m}" for m in mods], *[f"interaction {k}" for k in pairs]]
    return [f"<h3>Contribution under each removal policy ({metric} points)</h3>"
            "<p>How a modality is removed changes what its removal measures: zeros, the dataset mean, or the "
            "model's own missing-modality path. A verdict that flips between rows holds only under its policy."
            "</p>" + _table(header, rows)]


def _after_fusion_note(res: InterpretResult) -> str:
    """Explains the ``*`` of modality taps that sit after fusion, when the result has any."""
    if res.taps and not any("after_fusion" in v for v in res.taps.values()):
        return ("<p>The tap metadata of this result has no <code>after_fusion</code> (an older metrics.json): "
                "which modality taps already carry another modality is unknown here.</p>")
    marked = [t for t, v in res.taps.items() if v.get("after_fusion") and v.get("stream") in res.modalities]
    if not marked:
        return ""
    return (f"<p>* after fusion: {html.escape(', '.join(marked))} already carry another modality's input "
            "(the architecture mixes the streams before them), so similarity between streams there is partly "
            "built in, not learned.</p>")


def write_report(result: InterpretResult, out_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, the PNG plots and ``report.html`` for one result.

    Args:
        result: from :func:`fusionzoo.interpret.run` (Grad-CAM / gate maps need its in-memory
            ``artifacts``; a result loaded from JSON renders without them).
        out_dir: created if needed.
        title: page title (default: the model name).

    Returns:
        name -> path of every file written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"metrics": result.save(out / "metrics.json")}
    res = result
    c = res.contribution or {}
    metric = contribution_keys(c)[0] if c else "mIoU"
    detector = res.settings.get("task") == "detection"
    sv_note = (" Labels: ground-truth boxes painted into masks, background a class of its own."
               if res.settings.get("sv_labels") == "boxes" else "")
    iv = f" ({_IV_NOTE})" if res.intervals else " (no intervals in this result)"
    star = (" * marks a modality tap after fusion (its stream already carries another modality)."
            if any(v.get("after_fusion") and v.get("stream") in res.modalities for v in res.taps.values()) else "")
    sv_forms = ("the trace form S_B / S_T (left) and the whitened form tr(S_T^-1 S_B) / min(K-1, C) (right), "
                "which weights every feature direction alike"
                if any(_sv_value(v, "sv_whitened") is not None for v in (res.semantic_variance or {}).values())
                else "the trace form S_B / S_T (this result has no whitened form)")
    plots = [
        ("cka_stages", _plot_cka_stages, ("Debiased linear CKA between streams at each stage (1 = same "
                                           "representation up to rotation and scale, 0 = unrelated)"
                                           + ("; [lo, hi] under a value: its interval." if res.intervals else ".")
                                           + star)),
        ("cka_within", _plot_cka_within, "CKA between the stages of one stream: how the representation evolves." + star),
        ("semantic_variance", _plot_semantic_variance,
         f"Share of feature variance explained by the semantic classes, per stream and stage{iv}: {sv_forms}; "
         f"{_sv_grid_note(res)}." + sv_note),
        ("contribution", _plot_contribution, (f"{metric} change when a modality is removed (policy "
                                               f"'{c.get('policy')}'), its Shapley value and the perceptual-score "
                                               f"drop (modality permuted across the batch){iv}.")),
        ("contribution_policies", _plot_contribution_policies,
         f"Leave-one-out drop and Shapley value under every removal policy measured{iv}."),
        ("contribution_classes", _plot_contribution_classes,
         f"Per-class Shapley values of {_class_metric(c) if c else 'IoU'}{iv}."),
        ("reliance", _plot_reliance, ("Reliance of each stage on each modality: 1 - CKA between the tap "
                                       f"on the full input and with the modality removed{iv}.")),
        ("effective_rank", lambda r, p: _stage_curve(
            r, (r.health or {}).get("effective_rank", {}), None, "effective rank (dimensions)",
            f"{r.model}: effective rank of the features", p),
         "Effective rank (Roy & Vetterli 2007) of each stream's features per stage."),
        ("training", _plot_training, _training_caption(res)),
        ("gradcam", _plot_gradcam, _gradcam_caption(res, detector)),
        ("gates", _plot_gates, "Fusion gates / attention weights per stream."),
        ("purification", _plot_purification, "Share of each purification gate's feature kept, per class" + iv + "."),
    ]
    intro = _intro(res)
    plots.insert(1, ("evolution", lambda r, p: plot_evolution([r.model], [r], p),
                     "Per stage and stream: debiased CKA to the final representation and semantic variance."))
    sections = [findings_html(res), intro]  # the first screen states the findings (findings.py)
    sections += _summary_tables(res)
    sections += _purification_tables(res)  # models with purification gates only
    sections += [f"<h2>{html.escape(t)}</h2>" + _table(h, [[html.escape(c) for c in row] for row in rows])
                 for t, h, rows in cooperation_tables([res.model], [res])]
    figs = []
    for name, fn, caption in plots:
        p = fn(res, out / f"{name}.png")
        if p is not None:
            files[name] = p
            figs.append(_img(p, caption))
    for name, p, caption in training_figures(res.training, res.model, out, _color):  # training_report.py (coop)
        files[name] = p
        figs.append(_img(p, caption))
    sections.append("<h2>Plots</h2>" + "".join(figs))
    page = out / "report.html"
    page.write_text(_page(title or f"fusionzoo interpretation: {res.model}", sections))
    files["report"] = page
    return files


def _intro(res: InterpretResult) -> str:
    """What was measured on what: model, fusion family (the registry's), data, row rule, removal
    policies, and whether the numbers carry intervals."""
    c = res.contribution or {}
    others = [p for p in c.get("policies") or {} if p != c.get("policy")]
    return (f"<p>Model <code>{html.escape(res.model)}</code> (fusion family from its registry entry: "
            f"{html.escape(_fusion_label(res))}), modalities {', '.join(res.modalities)}, {res.num_images} images, "
            f"{res.num_classes} classes. Rows for CKA / effective rank: "
            f"<code>{html.escape(str(res.settings.get('rows')))}</code>; removal policy "
            f"<code>{html.escape(str(res.settings.get('policy')))}</code>"
            + (f" (also measured: {html.escape(', '.join(others))})" if others else "")
            + ". All numbers are in <code>metrics.json</code>.</p>" + _intervals_note([res]))


def _sv_grid_note(res: InterpretResult) -> str:
    """Where semantic variance was measured: the common grid (stride, cells) or each tap's own grid."""
    grids = {tuple(v["grid"]) for v in (res.semantic_variance or {}).values() if v.get("grid")}
    stride = res.settings.get("sv_stride")
    if stride and len(grids) == 1:
        h, w = next(iter(grids))
        return (f"every tap on the common stride-{stride} grid of {h}x{w} cells (coarser taps upsampled "
                "bilinearly, finer ones area-averaged)")
    return "each tap on its own feature grid"


def _gradcam_caption(res: InterpretResult, detector: bool) -> str:
    """Caption of the Grad-CAM figure: what is explained, on which taps and why those."""
    what = ("the highest-scoring detection of each image (white box)" if detector else
            "the second most frequent predicted class of each image (its largest object, usually), on its pixels")
    g = res.settings.get("gradcam") or {}
    where = "the deepest stage of each stream"
    if g.get("taps"):
        h, w = g["input_size"]
        where = (f"{', '.join(g['taps'])}: per stream the deepest stage whose grid has at least "
                 f"{g['min_grid_cells']}x{g['min_grid_cells']} cells at the {h}x{w} input")
    return (f"Grad-CAM on {where}, for {what}. Each map is min-max scaled per image on the tap's grid "
            "(as pytorch-grad-cam), then upsampled; 'all zero' marks a map with no positive evidence.")


def _plot_reliance(res: InterpretResult, path: Path) -> Path | None:
    rel = res.reliance or {}
    stages = _stages(res)
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    drawn = False
    for i, m in enumerate(res.modalities):
        for stream, ls in (("fused", "-"), *((s, ":") for s in res.modalities)):
            xs, ys, ivs = [], [], []
            for s in stages:
                v = rel.get(f"{stream}.{s}")
                if v is not None and (stream == "fused" or stream != m):
                    xs.append(stage_index(s) + 0.05 * (i - (len(res.modalities) - 1) / 2))
                    ys.append(_nan(v.get(m)))
                    ivs.append(interval(res, f"reliance.{stream}.{s}.{m}"))
            if xs and (stream == "fused" or "fused" not in {t.split(".")[0] for t in rel}):
                ax.plot(xs, ys, ls=ls, marker="o", color=_color(m, i), label=f"{stream} taps on {m}")
                _draw_intervals(ax, xs, ivs)
                drawn = True
        if "head.logits" in rel:
            ax.axhline(_nan(rel["head.logits"].get(m)), color=_color(m, i), lw=1, ls="--",
                       label=f"final logits on {m}")
            iv = interval(res, f"reliance.head.logits.{m}")
            if iv is not None:  # the logits' interval as a band across the stages
                ax.axhspan(iv[0], iv[1], color=_color(m, i), alpha=0.12, lw=0)
            drawn = True
    if not drawn:
        return None
    ax.set_xticks([stage_index(s) for s in stages], stages)
    ax.set_xlabel("stage")
    ax.set_ylabel("reliance 1 - CKA (unitless)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"{res.model}: reliance on each modality")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def write_comparison(results: Sequence[InterpretResult | str | Path], out_dir: str | Path,
                     title: str = "fusionzoo comparison") -> dict[str, Path]:
    """Write ``comparison.json``, ``comparison.md``, comparison plots and ``report.html``.

    Args:
        results: results or paths to their ``metrics.json`` / output folders.
        out_dir: created if needed.

    Returns:
        name -> path of every file written.
    """
    res = [r if isinstance(r, InterpretResult) else load_result(r) for r in results]
    cmp = compare(res)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    path = out / "comparison.json"
    path.write_text(json.dumps(cmp.to_json(), indent=1, allow_nan=False) + "\n")
    files["comparison"] = path
    figs = []
    iv = f" ({_IV_NOTE}; none for a model whose result has none)" if any(r.intervals for r in res) else ""
    for name, fn, caption in [
        ("cmp_evolution", lambda c, r, p: plot_evolution(c.models, r, p),
         ("Per stage and stream, side by side: debiased CKA to each model's own final representation (top) "
          "and semantic variance (bottom).")),
        ("cmp_contribution", _cmp_contribution, f"Shapley value of {_cmp_metric(cmp)} per modality, per model{iv}."),
        ("cmp_cka", _cmp_cka, ("Debiased CKA between modalities (left) and between each modality "
                               f"and the fused stream (right) across stages{iv}.")),
        ("cmp_semantic_variance", _cmp_sv, ("Semantic variance per stream across stages, per model: trace form "
                                            f"(top) and, where measured, whitened form (bottom){iv}.")),
        ("cmp_reliance", _cmp_reliance, f"Reliance of the final logits on each modality, per model{iv}."),
    ]:
        p = fn(cmp, res, out / f"{name}.png")
        if p is not None:
            files[name] = p
            figs.append(_img(p, caption))
    tables = comparison_tables(cmp, res)
    sections = [comparison_findings_html(cmp.models, res)]  # findings side by side first (findings.py)
    sections.append(_intervals_note(res, cmp.models))
    sections += [f"<h{2 if i == 0 else 3}>{html.escape(heading)}</h{2 if i == 0 else 3}>"
                 + _table(header, [[html.escape(c) for c in row] for row in rows])
                 for i, (heading, header, rows) in enumerate(tables)]
    sections.append("<h2>Plots</h2>" + "".join(figs))
    path = out / "comparison.md"
    path.write_text(comparison_markdown(cmp, res))
    files["markdown"] = path
    page = out / "report.html"
    page.write_text(_page(title, sections))
    files["report"] = page
    return files


Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows of plain-text cells)


def comparison_tables(cmp: ComparisonResult, results: Sequence[InterpretResult]) -> list[Table]:
    """The comparison as plain-text tables, shared by ``report.html`` and ``comparison.md``.

    Contribution numbers are mIoU / IoU points (percent); CKA, semantic variance and reliance are
    fractions in [0, 1]. A number with a bootstrap interval in its result is written
    ``value [lo, hi]``. Per-class Shapley values are given for every model with a contribution
    pass, so a depth-only class can be read off directly (its depth value should carry its IoU).
    """
    mods = list(dict.fromkeys(m for r in results for m in r.modalities))
    summary = [[lab, _fusion_label(r), _num_iv(cmp.score[lab], _score_interval(r), True)]
               + [_num_iv(cmp.shapley[lab].get(m), interval(r, f"contribution.shapley.{m}"), True) for m in mods]
               + [_num_iv(cmp.drop[lab].get(m), interval(r, f"contribution.drop.{m}"), True) for m in mods]
               + [_num_iv((cmp.reliance[lab].get("head.logits") or {}).get(m), interval(r, f"reliance.head.logits.{m}"))
                  for m in mods]
               for lab, r in zip(cmp.models, results)]
    tables: list[Table] = [("Summary", ["model", "fusion", f"{_cmp_metric(cmp)} (%)",
                                        *[f"Shapley {m}" for m in mods],
                                        *[f"drop {m}" for m in mods], *[f"logit reliance {m}" for m in mods]],
                            summary)]
    policy_rows = [[lab, p] + [_num_iv((sec.get("shapley") or {}).get(m),
                                       interval(r, f"contribution.policies.{p}.shapley.{m}"), True) for m in mods]
                   for lab, r in zip(cmp.models, results)
                   for p, sec in ((r.contribution or {}).get("policies") or {}).items()]
    if policy_rows:
        tables.append((f"Shapley value under each removal policy ({_cmp_metric(cmp)} points)",
                       ["model", "policy", *[f"Shapley {m}" for m in mods]], policy_rows))
    names = next((r.class_names for r in results if r.class_names), None)
    per_class = []
    for lab, r in zip(cmp.models, results):
        for m, values in ((r.contribution or {}).get("shapley_per_class") or {}).items():
            per_class.append([lab, m] + [_num(v, True) for v in values])
    if per_class:
        k = max(len(row) - 2 for row in per_class)
        header = list(names) if names and len(names) == k else [str(i) for i in range(k)]
        per_class_metric = _cmp_metric(cmp, per_class=True)
        tables.append((f"Shapley value of class {per_class_metric} per modality ({per_class_metric} points)",
                       ["model", "modality", *header], per_class))
    tables.append(("Cross-modal CKA per stage (debiased)", ["model", *cmp.stages],
                   [[lab] + [_num_iv(cmp.cka_cross_modal[lab].get(s), _cross_modal_interval(r, s)) for s in cmp.stages]
                    for lab, r in zip(cmp.models, results)]))
    for key, label in _SV_FORMS:
        rows = [[lab, stream] + [_num_iv(_sv_value((r.semantic_variance or {}).get(f"{stream}.{s}"), key),
                                         interval(r, f"semantic_variance.{stream}.{s}.{key}")) for s in cmp.stages]
                for lab, r in zip(cmp.models, results) for stream in _streams(r)
                if any(_sv_value((r.semantic_variance or {}).get(f"{stream}.{s}"), key) is not None for s in cmp.stages)]
        if rows:
            tables.append((f"Semantic variance per stream and stage, {label} ({key})", ["model", "stream", *cmp.stages],
                           rows))
    tables += cooperation_tables(cmp.models, results)
    return tables


def _score_interval(res: InterpretResult) -> Interval:
    """The interval of the task metric with every modality present (the full coalition)."""
    c = res.contribution or {}
    return interval(res, f"contribution.coalitions.{'+'.join(res.modalities)}.{contribution_keys(c)[1]}") if c else None


def _cross_modal_interval(res: InterpretResult, stage: str) -> Interval:
    """The interval of the cross-modal CKA at ``stage`` when there is one modality pair (with more,
    the comparison shows their mean, which has no interval of its own)."""
    rows = [r for r in res.cka_pairs("cross_modal") if r["stage"] == stage]
    return _cka_interval(res, rows[0]["a"], rows[0]["b"]) if len(rows) == 1 else None


def comparison_markdown(cmp: ComparisonResult, results: Sequence[InterpretResult]) -> str:
    """:func:`comparison_tables` as GitHub markdown (what ``fusionzoo compare`` prints)."""
    def numeric(column: list[str]) -> bool:
        try:
            [float(c) for c in column if c != "n/a"]
        except ValueError:
            return False
        return True

    parts = []
    for title, header, rows in comparison_tables(cmp, results):
        align = ["---:" if numeric([r[i] for r in rows]) else "---" for i in range(len(header))]
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _cmp_metric(cmp: ComparisonResult, per_class: bool = False) -> str:
    """The task metric of the compared contributions: ``mIoU`` (segmentation), ``AP`` (detection) or both.

    With ``per_class``, the per-class metric (``IoU`` / ``AP``).
    """
    metrics = sorted({v for v in cmp.metric.values() if v}, key=["mIoU", "AP"].index) or ["mIoU"]
    if per_class:
        metrics = [{"mIoU": "IoU"}.get(m, m) for m in metrics]
    return " / ".join(metrics)


def _cmp_contribution(cmp: ComparisonResult, results: Sequence[InterpretResult], path: Path) -> Path | None:
    mods = list(dict.fromkeys(m for d in cmp.shapley.values() for m in d))
    if not mods:
        return None
    fig = Figure(figsize=(max(6.0, 1.3 * len(cmp.models) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        xs = np.arange(len(cmp.models)) + (j - (len(mods) - 1) / 2) * width
        ax.bar(xs, [100 * _nan(cmp.shapley[lab].get(m)) for lab in cmp.models], width, label=m, color=_color(m, j))
        _draw_intervals(ax, list(xs), [interval(r, f"contribution.shapley.{m}") for r in results], 100)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(cmp.models)), [f"{lab}\n({_fusion_label(r)})" for lab, r in zip(cmp.models, results)],
                  fontsize=8)
    ax.set_ylabel(f"Shapley value of {_cmp_metric(cmp)} (points)")
    ax.set_title("modality contribution by architecture (each run's main removal policy)")
    ax.legend(title="modality", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _cmp_cka(cmp: ComparisonResult, results: Sequence[InterpretResult], path: Path) -> Path | None:
    if not any(cmp.cka_cross_modal.values()) and not any(cmp.cka_modality_fused.values()):
        return None
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    xs_all = [stage_index(s) for s in cmp.stages]
    n = len(cmp.models)
    for i, (lab, r) in enumerate(zip(cmp.models, results)):
        shift = 0.05 * (i - (n - 1) / 2)  # models side by side, so their bars stay apart
        ls, marker = _MODEL_STYLES[i % len(_MODEL_STYLES)]
        d = cmp.cka_cross_modal[lab]
        st = [s for s in cmp.stages if s in d]
        if st:
            xs = [stage_index(s) + shift for s in st]
            ax1.plot(xs, [_nan(d[s]) for s in st], marker=marker, ls=ls, label=lab, color="#333333")
            _draw_intervals(ax1, xs, [_cross_modal_interval(r, s) for s in st])
        mf = cmp.cka_modality_fused[lab]
        mods = list(dict.fromkeys(m for v in mf.values() for m in v))
        for j, m in enumerate(mods):
            st = [s for s in cmp.stages if s in mf and m in mf[s]]
            xs = [stage_index(s) + shift for s in st]
            ax2.plot(xs, [_nan(mf[s].get(m)) for s in st], marker=marker, ls=ls, label=f"{lab}: {m}",
                     color=_color(m, j))
            _draw_intervals(ax2, xs, [_cka_interval(r, f"{m}.{s}", f"fused.{s}") for s in st])
    for ax, t in ((ax1, "between modalities"), (ax2, "modality vs fused stream")):
        ax.set_xticks(xs_all, cmp.stages)
        ax.set_xlabel("stage")
        ax.set_ylabel("debiased linear CKA (unitless)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(t)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _cmp_sv(cmp: ComparisonResult, results: Sequence[InterpretResult], path: Path) -> Path | None:
    """One panel per stream (modalities and fused), one line per model; the trace form on the top
    row and the whitened form below it when any result has it."""
    streams = list(dict.fromkeys(s for r in results for s in _streams(r)))
    forms = [(key, label) for key, label in _SV_FORMS
             if any(_sv_value(v, key) is not None for r in results for v in (r.semantic_variance or {}).values())]
    if not streams or not forms:
        return None
    fig = Figure(figsize=(3.8 * len(streams) + 1, 3.6 * len(forms) + 0.3))
    axes = fig.subplots(len(forms), len(streams), squeeze=False)
    drawn = False
    n = len(results)
    for row, (key, label) in enumerate(forms):
        for ax, stream in zip(axes[row], streams):
            for i, (lab, r) in enumerate(zip(cmp.models, results)):
                sv = r.semantic_variance or {}
                st = [s for s in cmp.stages if _sv_value(sv.get(f"{stream}.{s}"), key) is not None]
                if st:
                    xs = [stage_index(s) + 0.05 * (i - (n - 1) / 2) for s in st]
                    ls, marker = _MODEL_STYLES[i % len(_MODEL_STYLES)]
                    ax.plot(xs, [_nan(_sv_value(sv[f"{stream}.{s}"], key)) for s in st], marker=marker, ls=ls,
                            label=lab, color=_color(stream))
                    _draw_intervals(ax, xs, [interval(r, f"semantic_variance.{stream}.{s}.{key}") for s in st])
                    drawn = True
            ax.set_xticks([stage_index(s) for s in cmp.stages], cmp.stages)
            ax.set_xlabel("stage")
            ax.set_ylim(0, 1)
            ax.set_title(f"{stream} stream, {key}", fontsize=10)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        axes[row][0].set_ylabel(f"semantic variance, {label.split(' ')[0]} form")
    return _save(fig, path) if drawn else None


def _cmp_reliance(cmp: ComparisonResult, results: Sequence[InterpretResult], path: Path) -> Path | None:
    mods = list(dict.fromkeys(m for d in cmp.reliance.values() for m in (d.get("head.logits") or {})))
    if not mods:
        return None
    fig = Figure(figsize=(max(6.0, 1.3 * len(cmp.models) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        xs = np.arange(len(cmp.models)) + (j - (len(mods) - 1) / 2) * width
        ax.bar(xs, [_nan((cmp.reliance[lab].get("head.logits") or {}).get(m)) for lab in cmp.models], width,
               label=m, color=_color(m, j))
        _draw_intervals(ax, list(xs), [interval(r, f"reliance.head.logits.{m}") for r in results])
    ax.set_xticks(range(len(cmp.models)), [f"{lab}\n({_fusion_label(r)})" for lab, r in zip(cmp.models, results)],
                  fontsize=8)
    ax.set_ylabel("reliance of final logits, 1 - CKA (unitless)")
    ax.set_ylim(0, 1.05)
    ax.set_title("how much the prediction changes without each modality")
    ax.legend(title="modality removed", loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def report_run(run_dir: str | Path, out_dir: str | Path | None = None, metrics: Sequence[str] = METRICS,
               device: str | torch.device | None = None, **run_kwargs: Any) -> dict[str, Path]:
    """Interpret a training run folder (:func:`fusionzoo.interpret.runs.interpret_run`) and write
    its report (default ``<run_dir>/report``).

    Returns:
        name -> path of every file written (``"report"`` is the HTML page).
    """
    result = interpret_run(run_dir, metrics, device, **run_kwargs)
    return write_report(result, Path(out_dir) if out_dir is not None else Path(run_dir) / "report")
