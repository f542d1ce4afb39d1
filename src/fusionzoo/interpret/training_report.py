"""Plots of how the modalities cooperated during training, for the run's report.

Reads the history that :func:`fusionzoo.interpret.runs.training_history` returns (the
``records`` of :mod:`.cooperation`'s callbacks and the ``ogm_ge`` state) and draws one figure
per measurement that the run recorded:

- ``cooperation_gradients``: cosine and conflict between the modalities' gradients on the
  shared weights, and each one's cosine with the step's update (``grad_direction``);
- ``cooperation_speed``: Wu et al.'s learning speed per modality encoder and the conditional
  learning speed (``learning_speed``);
- ``cooperation_epochs``: task metric, conditional utilisation rate, Shapley values,
  interaction and CKA to the output after every evaluation (``epoch_interpret``);
- ``ogm_ge``: OGM-GE's per-epoch discrepancy ratio and coefficient.

:func:`training_figures` returns ``(name, png path, caption)`` per figure;
``report.write_report`` embeds them under "Plots".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["training_figures"]

Color = Callable[[str, int], str]


# pairs of modalities (cosines, interactions, speed ratios): colours that no stream uses
_PAIR_COLORS = ("#555555", "#8c564b", "#bcbd22")


def _pair_color(i: int) -> str:
    return _PAIR_COLORS[i % len(_PAIR_COLORS)]


def _default_color(stream: str, i: int = 0) -> str:
    return f"C{i % 10}"


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[float]]:
    """``{sub-key: [value per row]}`` of ``row[key]`` mappings (NaN where a row lacks it)."""
    keys = list(dict.fromkeys(k for r in rows for k in (r.get(key) or {})))
    return {k: [_num((r.get(key) or {}).get(k)) for r in rows] for k in keys}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _finish(axes: Sequence[Any], integer_x: bool) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _modality_color(color: Color, modalities: Sequence[str]) -> Callable[[str], str]:
    return lambda m: color(m, modalities.index(m) if m in modalities else 0)


def _gradients_figure(rows: list[Mapping[str, Any]], model: str, color: Callable[[str], str]) -> Figure | None:
    steps = [r["step"] for r in rows]
    cos, ema = _series(rows, "cosine"), _series(rows, "cosine_ema")
    if not any(not math.isnan(v) for vals in cos.values() for v in vals):
        return None
    fig = Figure(figsize=(12, 3.8))
    ax_cos, ax_conf, ax_upd = fig.subplots(1, 3)
    for i, (pair, vals) in enumerate(cos.items()):
        ax_cos.plot(steps, vals, ".", alpha=0.35, color=_pair_color(i))
        ax_cos.plot(steps, ema.get(pair, vals), "-", color=_pair_color(i), label=f"{pair.replace('|', ' vs ')} (EMA)")
    ax_cos.axhline(0, color="black", lw=0.8, ls="--")
    ax_cos.set_ylim(-1.05, 1.05)
    ax_cos.set_ylabel("cosine of the two gradients (unitless)")
    ax_cos.set_title("agreement on the shared weights")
    ax_cos.legend(fontsize=8)
    for i, (pair, vals) in enumerate(_series(rows, "conflict").items()):
        ax_conf.plot(steps, vals, ".-", color=_pair_color(i), label=pair.replace("|", " vs "))
    ax_conf.set_ylim(-0.02, 1.02)
    ax_conf.set_ylabel("fraction of shared tensors with cosine < 0")
    ax_conf.set_title("conflict (PCGrad's case)")
    ax_conf.legend(fontsize=8)
    upd, upd_ema = _series(rows, "cosine_to_update"), _series(rows, "cosine_to_update_ema")
    for m, vals in upd.items():
        ax_upd.plot(steps, vals, ".", alpha=0.35, color=color(m))
        ax_upd.plot(steps, upd_ema.get(m, vals), "-", color=color(m), label=f"{m} only (EMA)")
    ax_upd.axhline(0, color="black", lw=0.8, ls="--")
    ax_upd.set_ylim(-1.05, 1.05)
    ax_upd.set_ylabel("cosine with the step's gradient (unitless)")
    ax_upd.set_title("whose direction the update follows")
    ax_upd.legend(fontsize=8)
    for ax in (ax_cos, ax_conf, ax_upd):
        ax.set_xlabel("optimizer step")
    _finish((ax_cos, ax_conf, ax_upd), True)
    fig.suptitle(f"{model}: gradient directions on the shared (fusion, decoder, head) weights")
    return fig


def _speed_figure(rows: list[Mapping[str, Any]], model: str, color: Callable[[str], str]) -> Figure | None:
    steps = [r["step"] for r in rows]
    mu_u, mu_g = _series(rows, "mu_update"), _series(rows, "mu_grad")
    if not mu_u:
        return None
    fig = Figure(figsize=(10, 3.8))
    ax_mu, ax_cond = fig.subplots(1, 2)
    for m in mu_u:
        ax_mu.plot(steps, mu_u[m], "-", color=color(m), label=f"{m}: updates")
        if m in mu_g:
            ax_mu.plot(steps, mu_g[m], "--", color=color(m), label=f"{m}: gradients")
    ax_mu.set_yscale("log")
    ax_mu.set_ylabel("cumulative sum of |d theta|^2 / |theta|^2 (log)")
    ax_mu.set_title("learning speed of each encoder")
    ax_mu.legend(fontsize=8)
    for i, (pair, vals) in enumerate(_series(rows, "conditional_speed").items()):
        ax_cond.plot(steps, vals, "-", color=_pair_color(i), label=f"log10 mu {pair.replace('|', ' / mu ')} (updates)")
    for i, (pair, vals) in enumerate(_series(rows, "conditional_speed_grad").items()):
        ax_cond.plot(steps, vals, "--", color=_pair_color(i), label=f"log10 mu {pair.replace('|', ' / mu ')} (gradients)")
    ax_cond.axhline(0, color="black", lw=0.8, ls="--")
    ax_cond.set_ylabel("conditional learning speed (log10 ratio)")
    ax_cond.set_title("> 0: the first modality learns faster")
    ax_cond.legend(fontsize=8)
    for ax in (ax_mu, ax_cond):
        ax.set_xlabel("optimizer step")
    _finish((ax_mu, ax_cond), True)
    fig.suptitle(f"{model}: per-modality learning speed (Wu et al., ICML 2022)")
    return fig


def _epochs_figure(rows: list[Mapping[str, Any]], model: str, color: Callable[[str], str]) -> Figure | None:
    epochs = [r["epoch"] for r in rows]
    util = _series(rows, "utilisation")
    cka = _series(rows, "cka_to_output")
    if not util and not cka:
        return None
    fig = Figure(figsize=(12, 3.8))
    ax_u, ax_s, ax_c = fig.subplots(1, 3)
    metric = next((r.get("metric") for r in rows if r.get("metric")), "score")
    policy = next((r.get("policy") for r in rows if r.get("policy")), "?")
    ax_u.plot(epochs, [_num(r.get("value")) for r in rows], "k.-", label=f"{metric}, all modalities")
    for m, vals in util.items():
        ax_u.plot(epochs, vals, ".-", color=color(m), label=f"u({m})")
    ax_u.axhline(0, color="black", lw=0.8, ls="--")
    ax_u.set_ylabel(f"{metric} / utilisation rate (fraction)")
    ax_u.set_title(f"utilisation u(m) = 1 - A(without m) / A(all) [{policy}]", fontsize=9)
    ax_u.legend(fontsize=8)
    for m, vals in _series(rows, "shapley").items():
        lo_hi = [(r.get("intervals") or {}).get(f"contribution.shapley.{m}") for r in rows]
        if all(isinstance(iv, Sequence) and len(iv) == 2 and None not in iv for iv in lo_hi):
            err = [[v - iv[0] for v, iv in zip(vals, lo_hi)], [iv[1] - v for v, iv in zip(vals, lo_hi)]]
            ax_s.errorbar(epochs, vals, yerr=err, fmt=".-", color=color(m), capsize=3, label=f"Shapley {m} (95% CI)")
        else:
            ax_s.plot(epochs, vals, ".-", color=color(m), label=f"Shapley {m}")
    for i, (pair, vals) in enumerate(_series(rows, "interaction").items()):
        ax_s.plot(epochs, vals, "--", color=_pair_color(i), label=f"interaction {pair.replace('|', '-')}")
    ax_s.axhline(0, color="black", lw=0.8, ls="--")
    ax_s.set_ylabel(f"{metric} points (fraction)")
    ax_s.set_title("contribution and interaction")
    ax_s.legend(fontsize=8)
    streams = list(dict.fromkeys(tap.split(".")[0] for tap in cka))
    for tap, vals in cka.items():
        stream = tap.split(".")[0]
        stages = [t for t in cka if t.split(".")[0] == stream]
        alpha = 0.35 + 0.65 * (stages.index(tap) + 1) / len(stages)  # deeper stages darker
        ax_c.plot(epochs, vals, ".-", color=color(stream), alpha=alpha,
                  label=stream if tap == stages[-1] else None)
    target = next((r.get("cka_target") for r in rows if r.get("cka_target")), "output")
    ax_c.set_ylim(-0.05, 1.05)
    ax_c.set_ylabel(f"debiased CKA to {target}")
    ax_c.set_title("each tap's similarity to the output (deeper = darker)", fontsize=9)
    if streams:
        ax_c.legend(fontsize=8, title="stream")
    for ax in (ax_u, ax_s, ax_c):
        ax.set_xlabel("epoch (0-based)")
    _finish((ax_u, ax_s, ax_c), True)
    n = next((r.get("images") for r in rows if r.get("images")), "?")
    fig.suptitle(f"{model}: interpretation after every evaluation ({n} validation images)")
    return fig


def _ogm_figure(state: Mapping[str, Any], model: str, color: Callable[[str], str]) -> Figure | None:
    rows = [r for r in state.get("epochs") or [] if r.get("num_steps")]
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9, 3.6))
    ax_r, ax_k = fig.subplots(1, 2)
    for m, vals in _series(rows, "ratio").items():
        ax_r.plot(epochs, vals, ".-", color=color(m), label=m)
    ax_r.axhline(1, color="black", lw=0.8, ls="--")
    ax_r.set_ylabel("discrepancy ratio rho (unitless)")
    ax_r.set_title(f"scores from {state.get('source') or '?'} (1 = balanced)")
    ax_r.legend(fontsize=8)
    for m, vals in _series(rows, "coefficient").items():
        ax_k.plot(epochs, vals, ".-", color=color(m), label=m)
    ax_k.set_ylim(0, 1.05)
    ax_k.set_ylabel("gradient coefficient k (epoch mean)")
    ax_k.set_title(f"modulated: {state.get('modulate') or 'encoder'}, epochs {state.get('start_epoch')}-"
                   f"{state.get('end_epoch')}", fontsize=9)
    ax_k.legend(fontsize=8)
    for ax in (ax_r, ax_k):
        ax.set_xlabel("epoch (0-based)")
    _finish((ax_r, ax_k), True)
    fig.suptitle(f"{model}: OGM-GE (Peng et al., CVPR 2022)")
    return fig


def training_figures(history: Mapping[str, Any] | None, model: str, out_dir: str | Path,
                     color: Color | None = None) -> list[tuple[str, Path, str]]:
    """Write the cooperation plots of a training history; ``[(name, png path, caption)]``.

    Args:
        history: :func:`fusionzoo.interpret.runs.training_history` output (None: nothing to draw).
        model: the model's name for the titles.
        out_dir: folder of the PNG files.
        color: ``color(stream, index)`` of the report, so modalities keep their colours.
    """
    if not history:
        return []
    color = color or _default_color
    records = history.get("records") or {}
    states = history.get("callbacks") or {}
    modalities = list(history.get("modalities") or next(
        (s.get("modalities") for s in states.values() if s.get("modalities")), []))
    mcolor = _modality_color(color, modalities)
    grad = states.get("grad_direction") or {}
    ogm = states.get("ogm_ge") or {}
    plans = [
        ("cooperation_gradients", _gradients_figure, records.get("grad_direction"), (
            "Gradient directions (grad_direction): g_m is the gradient of the training loss on the shared weights "
            "(parameters no modality owns) with only modality m kept (the others removed through the model's "
            f"missing path), measured every {grad.get('log_every', '?')} steps; dots raw, lines EMA "
            f"(decay {grad.get('ema', '?')}, bias-corrected). Left: cosine between modalities (+1 same direction, "
            "< 0 conflict); middle: fraction of shared tensors whose own cosine is negative; right: cosine of "
            "each g_m with the gradient the step took.")),
        ("cooperation_speed", _speed_figure, records.get("learning_speed"), (
            "Learning speed (Wu et al., ICML 2022): cumulative sum over steps of the squared relative change of "
            "each modality's encoder weights (solid: the optimizer's updates; dashed: the authors' gradient form "
            "|g|^2/|theta|^2). Right: conditional learning speed log10(mu_a / mu_b); > 0 means the first modality "
            "has learned faster, the greedy learner's sign.")),
        ("cooperation_epochs", _epochs_figure, records.get("epoch_interpret"), (
            "Interpretation after every evaluation on a fixed validation subset (epoch_interpret): the task metric "
            "with all modalities, the conditional utilisation rate u(m) = (A(all) - A(all without m)) / A(all) "
            "(Wu et al.), Shapley values and pairwise interaction, and the debiased CKA of every tap to the "
            "model's output. Numbers without an interval are single measurements on the subset.")),
        ("ogm_ge", lambda rows, mdl, c: _ogm_figure(rows, mdl, c), ogm or None, (
            "OGM-GE per epoch: the discrepancy ratio rho of each modality's unimodal score and the mean gradient "
            "coefficient k applied to its encoder (1 = not slowed).")),
    ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, draw, data, caption in plans:
        if not data:
            continue
        fig = draw(data, model, mcolor)
        if fig is not None:
            figures.append((name, _save(fig, out / f"{name}.png"), caption))
    return figures
