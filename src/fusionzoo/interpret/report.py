"""Reports: ``metrics.json``, PNG plots and one self-contained ``report.html``.

:func:`write_report` renders one :class:`InterpretResult`; :func:`write_comparison` lays
several side by side. Plots use matplotlib's object API (``Figure``, no pyplot state), so they
work headless and never touch a global backend. Every axis is labelled with its unit (CKA,
semantic variance and shares are unitless in [0, 1]; mIoU / AP and their changes are in
percentage points; gradient norms are L2 norms of the loss gradient). Detectors' contribution
is in COCO AP (``contribution["metric"]``), and the labels say so.
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
from .plan import stage_index
from .runs import interpret_run
from .training_report import training_figures

__all__ = ["report_run", "write_comparison", "write_report"]

_STREAM_COLORS = {"rgb": "#d62728", "depth": "#1f77b4", "thermal": "#ff7f0e", "hha": "#9467bd",
                  "fused": "#2ca02c", "decoder": "#7f7f7f", "head": "#17becf"}


def _color(stream: str, i: int = 0) -> str:
    return _STREAM_COLORS.get(stream, f"C{i % 10}")


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
def _plot_cka_stages(res: InterpretResult, path: Path) -> Path | None:
    rows = [r for r in res.cka_pairs() if r["kind"] in ("cross_modal", "modality_fused")]
    if not rows:
        return None
    stages = [s for s in _stages(res) if any(r["stage"] == s for r in rows)]
    fig = Figure(figsize=(3.2 * len(stages) + 1, 3.4))
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    im = None
    for ax, stage in zip(axes, stages):
        streams = [s for s in _streams(res) if f"{s}.{stage}" in res.taps]
        mat = np.eye(len(streams))
        idx = {f"{s}.{stage}": i for i, s in enumerate(streams)}
        for r in rows:
            if r["stage"] == stage and r["a"] in idx and r["b"] in idx:
                mat[idx[r["a"]], idx[r["b"]]] = mat[idx[r["b"]], idx[r["a"]]] = _nan(r["cka"])
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(streams)), streams, rotation=30)
        ax.set_yticks(range(len(streams)), streams)
        ax.set_title(f"{stage}")
        for i in range(len(streams)):
            for j in range(len(streams)):
                v = mat[i, j]
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        color="white" if (not math.isnan(v) and v < 0.6) else "black", fontsize=9)
        ax.set_xlabel("stream")
    axes[0].set_ylabel("stream")
    fig.colorbar(im, ax=list(axes), label="debiased linear CKA (unitless)", shrink=0.85)
    fig.suptitle(f"{res.model}: feature similarity between streams, per stage")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_cka_within(res: InterpretResult, path: Path) -> Path | None:
    rows = res.cka_pairs("within")
    if not rows:
        return None
    streams = [s for s in _streams(res) if any(r["a"].startswith(s + ".") for r in rows)]
    fig = Figure(figsize=(3.2 * len(streams) + 1, 3.4))
    axes = fig.subplots(1, len(streams), squeeze=False)[0]
    im = None
    for ax, stream in zip(axes, streams):
        stages = [s for s in _stages(res) if f"{stream}.{s}" in res.taps]
        idx = {f"{stream}.{s}": i for i, s in enumerate(stages)}
        mat = np.eye(len(stages))
        for r in rows:
            if r["a"] in idx and r["b"] in idx:
                mat[idx[r["a"]], idx[r["b"]]] = mat[idx[r["b"]], idx[r["a"]]] = _nan(r["cka"])
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(stages)), stages, rotation=30)
        ax.set_yticks(range(len(stages)), stages)
        ax.set_title(stream)
        ax.set_xlabel("stage")
        for i in range(len(stages)):
            for j in range(len(stages)):
                v = mat[i, j]
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        color="white" if (not math.isnan(v) and v < 0.6) else "black", fontsize=9)
    axes[0].set_ylabel("stage")
    fig.colorbar(im, ax=list(axes), label="debiased linear CKA (unitless)", shrink=0.85)
    fig.suptitle(f"{res.model}: how each stream's representation evolves across stages")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _stage_curve(res: InterpretResult, values: Mapping[str, Any], key: str | None, ylabel: str, title: str,
                 path: Path, ylim: tuple[float, float] | None = None) -> Path | None:
    stages = _stages(res)
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    drawn = False
    for i, stream in enumerate(_streams(res)):
        xs, ys = [], []
        for s in stages:
            v = values.get(f"{stream}.{s}")
            if v is not None:
                v = v.get(key) if key else v
                xs.append(stage_index(s))
                ys.append(_nan(v))
        if xs:
            ax.plot(xs, ys, marker="o", label=stream, color=_color(stream, i))
            drawn = True
    if not drawn:
        return None
    ax.set_xticks([stage_index(s) for s in stages], stages)
    ax.set_xlabel("encoder stage (stride 4, 8, 16, 32)")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(title="stream")
    ax.set_title(title)
    return _save(fig, path)


def _class_metric(c: Mapping[str, Any]) -> str:
    """The per-class metric of a contribution: ``IoU`` or ``AP``."""
    return "AP" if contribution_keys(c)[0] == "AP" else "IoU"


def _plot_contribution(res: InterpretResult, path: Path) -> Path | None:
    c = res.contribution
    if not c:
        return None
    mods = c["modalities"]
    groups = [("leave-one-out drop", c["drop"]), ("Shapley value", c["shapley"])]
    if c.get("perceptual"):
        groups.append(("perceptual drop", {m: v["drop"] for m, v in c["perceptual"].items()}))
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        ys = [100 * _nan(g[1].get(m)) for g in groups]
        ax.bar(np.arange(len(groups)) + (j - (len(mods) - 1) / 2) * width, ys, width, label=m, color=_color(m, j))
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
        ax.bar(np.arange(k) + (j - (len(mods) - 1) / 2) * width, ys, width, label=m, color=_color(m, j))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(k), names, rotation=35, ha="right")
    ax.set_xlabel("class (missing bars: class in neither ground truth nor prediction of some coalition)"
                  if _class_metric(c) == "IoU" else "class (missing bars: class absent from the ground truth)")
    ax.set_ylabel(f"Shapley value of class {_class_metric(c)} (points)")
    ax.set_title(f"{res.model}: per-class modality contribution")
    ax.margins(y=0.15)  # headroom so the legend does not cover bars
    ax.legend(title="modality")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_training(res: InterpretResult, path: Path) -> Path | None:
    hist = res.training or {}
    epochs = hist.get("epochs") or []
    steps = hist.get("steps") or []
    use_epochs = len(epochs) >= 2
    rows = epochs if use_epochs else steps
    if not rows:
        return None
    def finite(key: str) -> bool:
        return any(v is not None and math.isfinite(v) for r in rows for v in (r.get(key) or {}).values())

    if not finite("grad_norm") and not finite("confidence"):
        return None  # e.g. early fusion: no modality owns parameters and there are no modality heads
    xs = [r["epoch" if use_epochs else "step"] for r in rows]
    xlabel = "epoch" if use_epochs else "training step"
    mods = hist.get("modalities") or res.modalities
    has_conf = any(r.get("confidence") for r in rows)
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
        ax_bar.legend(title="stream", fontsize=8)
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


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.4em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
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
            rows.append([m, _fmt(c["drop"][m], True), _fmt(c["shapley"][m], True), _fmt(p.get("drop"), True),
                         _fmt(p.get("normalized"))])
        metric, key, _ = contribution_keys(c)
        out.append(f"<h3>Modality contribution ({metric} points)</h3>" + _table(
            ["modality", "drop when removed", "Shapley value", "perceptual drop", "perceptual (normalized)"], rows))
        if metric == "AP":  # COCO AP (IoU .50:.95) and AP50 of every coalition
            co = [[html.escape(k), _fmt(v["ap"], True), _fmt(v.get("ap50"), True)] for k, v in c["coalitions"].items()]
            out.append(_table(["modalities kept", "AP (%)", "AP50 (%)"], co))
        else:
            co = [[html.escape(k), _fmt(v[key], True)] for k, v in c["coalitions"].items()]
            out.append(_table(["modalities kept", f"{metric} (%)"], co))
        heads = c.get("unimodal_heads")
        if heads:
            k = len(next(iter(heads.values()))["iou"])
            names = res.class_names or [str(i) for i in range(k)]
            rows = [[f"{html.escape(m)}.head", _fmt(v["miou"], True)] + [_fmt(x, True) for x in v["iou"]]
                    for m, v in heads.items()]
            out.append("<h3>Unimodal heads (each modality's own prediction), IoU %</h3>"
                       + _table(["head", "mIoU", *names], rows))
    stages = _stages(res)
    if res.cka:
        kinds = [("cross_modal", "between modalities"), ("modality_fused", "modality vs fused")]
        rows = []
        for kind, label in kinds:
            for r in res.cka_pairs(kind):
                rows.append([f"{html.escape(r['a'])} / {html.escape(r['b'])}", label, _fmt(r["cka"]), _fmt(r["cka_biased"])])
        if rows:
            out.append("<h3>Linear CKA per stage</h3>" + _table(["pair", "kind", "debiased", "biased"], rows))
    if res.semantic_variance:
        rows = []
        for stream in _streams(res):
            rows.append([stream] + [_fmt((res.semantic_variance.get(f"{stream}.{s}") or {}).get("semantic_variance"))
                                    for s in stages])
        for t in ("decoder.out", "head.logits"):
            if t in res.semantic_variance:
                rows.append([t] + [_fmt(res.semantic_variance[t]["semantic_variance"])] + [""] * (len(stages) - 1))
        out.append(f"<h3>Semantic variance S_B / (S_B + S_W), {html.escape(_sv_grid_note(res))}</h3>"
                   + _table(["stream", *stages], rows))
    if res.reliance:
        rows = [[html.escape(t)] + [_fmt(v.get(m)) for m in res.modalities] for t, v in res.reliance.items()]
        out.append("<h3>Reliance 1 - CKA(tap, tap with the modality removed)</h3>"
                   + _table(["tap", *res.modalities], rows))
    if res.health:
        rows = [[html.escape(t), _fmt(res.health["effective_rank"].get(t)), _fmt(res.health["feature_norm"].get(t))]
                for t in res.health["effective_rank"]]
        out.append("<h3>Representation health</h3>" + _table(["tap", "effective rank", "mean feature norm"], rows))
    return out


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
    plots = [
        ("cka_stages", _plot_cka_stages, ("Debiased linear CKA between streams at each stage (1 = same "
                                           "representation up to rotation and scale, 0 = unrelated).")),
        ("cka_within", _plot_cka_within, "CKA between the stages of one stream: how the representation evolves."),
        ("semantic_variance", lambda r, p: _stage_curve(
            r, r.semantic_variance or {}, "semantic_variance", "semantic variance S_B/(S_B+S_W) (unitless)",
            f"{r.model}: semantic variance across stages", p, (0, 1)),
         f"Share of feature variance explained by the semantic classes, per stream and stage, {_sv_grid_note(res)}."
         + sv_note),
        ("contribution", _plot_contribution, (f"{metric} change when a modality is removed, its Shapley value and "
                                               "the perceptual-score drop (modality permuted across the batch).")),
        ("contribution_classes", _plot_contribution_classes,
         f"Per-class Shapley values of {_class_metric(c) if c else 'IoU'}."),
        ("reliance", _plot_reliance, ("Reliance of each stage on each modality: 1 - CKA between the tap "
                                       "on the full input and with the modality removed.")),
        ("effective_rank", lambda r, p: _stage_curve(
            r, (r.health or {}).get("effective_rank", {}), None, "effective rank (dimensions)",
            f"{r.model}: effective rank of the features", p),
         "Effective rank (Roy & Vetterli 2007) of each stream's features per stage."),
        ("training", _plot_training, ("Per-modality encoder gradient norms, their ratio and the unimodal "
                                       "confidence of modality heads over training.")),
        ("gradcam", _plot_gradcam, _gradcam_caption(res, detector)),
        ("gates", _plot_gates, "Fusion gates / attention weights per stream."),
    ]
    intro = (f"<p>Model <code>{html.escape(res.model)}</code> (fusion: {html.escape(str(res.fusion))}), "
                f"modalities {', '.join(res.modalities)}, {res.num_images} images, {res.num_classes} classes. "
                f"Rows for CKA / effective rank: <code>{html.escape(str(res.settings.get('rows')))}</code>; removal "
                f"policy <code>{html.escape(str(res.settings.get('policy')))}</code>. All numbers are in "
                f"<code>metrics.json</code>.</p>")
    plots.insert(1, ("evolution", lambda r, p: plot_evolution([r.model], [r], p),
                     "Per stage and stream: debiased CKA to the final representation and semantic variance."))
    sections = [findings_html(res), intro]  # the first screen states the findings (findings.py)
    sections += _summary_tables(res)
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
            xs, ys = [], []
            for s in stages:
                v = rel.get(f"{stream}.{s}")
                if v is not None and (stream == "fused" or stream != m):
                    xs.append(stage_index(s))
                    ys.append(_nan(v.get(m)))
            if xs and (stream == "fused" or "fused" not in {t.split(".")[0] for t in rel}):
                ax.plot(xs, ys, ls=ls, marker="o", color=_color(m, i), label=f"{stream} taps on {m}")
                drawn = True
        if "head.logits" in rel:
            ax.axhline(_nan(rel["head.logits"].get(m)), color=_color(m, i), lw=1, ls="--",
                       label=f"final logits on {m}")
            drawn = True
    if not drawn:
        return None
    ax.set_xticks([stage_index(s) for s in stages], stages)
    ax.set_xlabel("stage")
    ax.set_ylabel("reliance 1 - CKA (unitless)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{res.model}: reliance on each modality")
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
    for name, fn, caption in [
        ("cmp_evolution", lambda c, p: plot_evolution(c.models, res, p),
         ("Per stage and stream, side by side: debiased CKA to the final representation (top) and semantic "
         "variance (bottom).")),
        ("cmp_contribution", _cmp_contribution, f"Shapley value of {_cmp_metric(cmp)} per modality, per model."),
        ("cmp_cka", _cmp_cka, ("Debiased CKA between modalities (left) and between each modality "
                                 "and the fused stream (right) across stages.")),
        ("cmp_semantic_variance", _cmp_sv, "Semantic variance per stream across stages, per model."),
        ("cmp_reliance", _cmp_reliance, "Reliance of the final logits on each modality, per model."),
    ]:
        p = fn(cmp, out / f"{name}.png")
        if p is not None:
            files[name] = p
            figs.append(_img(p, caption))
    tables = comparison_tables(cmp, res)
    sections = [comparison_findings_html(cmp.models, res)]  # findings side by side first (findings.py)
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
    fractions in [0, 1]. Per-class Shapley values are given for every model with a contribution
    pass, so a depth-only class can be read off directly (its depth value should carry its IoU).
    """
    mods = list(dict.fromkeys(m for r in results for m in r.modalities))
    summary = [[lab, str(cmp.fusion[lab]), _num(cmp.score[lab], True)]
               + [_num(cmp.shapley[lab].get(m), True) for m in mods]
               + [_num(cmp.drop[lab].get(m), True) for m in mods]
               + [_num((cmp.reliance[lab].get("head.logits") or {}).get(m)) for m in mods]
               for lab in cmp.models]
    tables: list[Table] = [("Summary", ["model", "fusion", f"{_cmp_metric(cmp)} (%)",
                                        *[f"Shapley {m}" for m in mods],
                                        *[f"drop {m}" for m in mods], *[f"logit reliance {m}" for m in mods]],
                            summary)]
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
                   [[lab] + [_num(cmp.cka_cross_modal[lab].get(s)) for s in cmp.stages] for lab in cmp.models]))
    tables.append(("Semantic variance per stream and stage", ["model", "stream", *cmp.stages],
                   [[lab, stream] + [_num(d.get(s)) for s in cmp.stages]
                    for lab in cmp.models for stream, d in cmp.semantic_variance[lab].items()]))
    tables += cooperation_tables(cmp.models, results)
    return tables


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


def _cmp_contribution(cmp: ComparisonResult, path: Path) -> Path | None:
    mods = list(dict.fromkeys(m for d in cmp.shapley.values() for m in d))
    if not mods:
        return None
    fig = Figure(figsize=(max(6.0, 1.3 * len(cmp.models) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        ax.bar(np.arange(len(cmp.models)) + (j - (len(mods) - 1) / 2) * width,
               [100 * _nan(cmp.shapley[lab].get(m)) for lab in cmp.models], width, label=m, color=_color(m, j))
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(cmp.models)), [f"{lab}\n({cmp.fusion[lab]})" for lab in cmp.models], fontsize=8)
    ax.set_ylabel(f"Shapley value of {_cmp_metric(cmp)} (points)")
    ax.set_title("modality contribution by architecture")
    ax.margins(y=0.15)  # headroom so the legend does not cover bars
    ax.legend(title="modality")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _cmp_cka(cmp: ComparisonResult, path: Path) -> Path | None:
    if not any(cmp.cka_cross_modal.values()) and not any(cmp.cka_modality_fused.values()):
        return None
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    xs_all = [stage_index(s) for s in cmp.stages]
    for i, lab in enumerate(cmp.models):
        d = cmp.cka_cross_modal[lab]
        if d:
            ax1.plot([stage_index(s) for s in cmp.stages if s in d], [_nan(d[s]) for s in cmp.stages if s in d],
                     marker="o", label=lab, color=f"C{i % 10}")
        mf = cmp.cka_modality_fused[lab]
        mods = list(dict.fromkeys(m for v in mf.values() for m in v))
        for m, ls in zip(mods, ("-", "--", ":")):
            ax2.plot([stage_index(s) for s in cmp.stages if s in mf],
                     [_nan(mf[s].get(m)) for s in cmp.stages if s in mf], marker="o", ls=ls,
                     label=f"{lab}: {m}", color=f"C{i % 10}")
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


def _cmp_sv(cmp: ComparisonResult, path: Path) -> Path | None:
    streams = list(dict.fromkeys(s for d in cmp.semantic_variance.values() for s in d
                                 if s in _STREAM_COLORS and s not in ("decoder", "head")))
    if not streams:
        return None
    fig = Figure(figsize=(3.8 * len(streams) + 1, 3.8))
    axes = fig.subplots(1, len(streams), squeeze=False)[0]
    for ax, stream in zip(axes, streams):
        for i, lab in enumerate(cmp.models):
            d = cmp.semantic_variance[lab].get(stream)
            if d:
                st = [s for s in cmp.stages if s in d]
                ax.plot([stage_index(s) for s in st], [_nan(d[s]) for s in st], marker="o", label=lab, color=f"C{i % 10}")
        ax.set_xticks([stage_index(s) for s in cmp.stages], cmp.stages)
        ax.set_xlabel("stage")
        ax.set_ylim(0, 1)
        ax.set_title(f"{stream} stream")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("semantic variance (unitless)")
    return _save(fig, path)


def _cmp_reliance(cmp: ComparisonResult, path: Path) -> Path | None:
    mods = list(dict.fromkeys(m for d in cmp.reliance.values() for m in (d.get("head.logits") or {})))
    if not mods:
        return None
    fig = Figure(figsize=(max(6.0, 1.3 * len(cmp.models) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(mods)
    for j, m in enumerate(mods):
        ax.bar(np.arange(len(cmp.models)) + (j - (len(mods) - 1) / 2) * width,
               [_nan((cmp.reliance[lab].get("head.logits") or {}).get(m)) for lab in cmp.models], width,
               label=m, color=_color(m, j))
    ax.set_xticks(range(len(cmp.models)), [f"{lab}\n({cmp.fusion[lab]})" for lab in cmp.models], fontsize=8)
    ax.set_ylabel("reliance of final logits, 1 - CKA (unitless)")
    ax.set_ylim(0, 1.05)
    ax.set_title("how much the prediction changes without each modality")
    ax.legend(title="modality removed")
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
