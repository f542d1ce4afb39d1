"""Findings in sentences, derived from an :class:`~.api.InterpretResult` with stated thresholds.

What a report states first (docs/interpret.md, "Findings"). Every sentence is computed from the
numbers in ``metrics.json``, and every judgement uses one of the thresholds in
:data:`THRESHOLDS`, which the page prints beside the sentences:

- **carriers**: per class, the largest term of the score decomposition
  (:mod:`.interaction`: redundancy, unique to one modality, synergy) when it is at least
  ``dominant_share`` of the class's gain ``v(all) - v(none)``; classes gaining less than
  ``min_gain`` are not judged;
- **interaction**: classes whose pairwise interaction index is at least ``interaction`` in
  absolute value (positive: "needs both", negative: "either suffices");
- **convergence**: the first stage where the mean cross-modal CKA reaches ``converge_cka``, and
  the first stage where each stream's CKA to the final representation reaches it;
- **under-use**: a modality whose share of the Shapley total is below ``underused_share``;
- **information**: the BROJA decomposition of the predictions (:mod:`.pid`), overall, in bits.

Also here, because the report and the compare page share them: the comparison tables of these
terms (:func:`cooperation_tables`) and the side-by-side evolution plot (:func:`plot_evolution`).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .contribution import contribution_keys
from .interaction import coalition_terms

__all__ = ["KINDS", "THRESHOLDS", "Finding", "comparison_findings_html", "cooperation_tables", "findings",
           "findings_html", "plot_evolution"]

THRESHOLDS: dict[str, float] = {
    "min_gain": 0.05,          # a class must gain >= 5 metric points from its modalities to be judged
    "dominant_share": 0.4,     # the dominant term must be >= 40% of that gain
    "interaction": 0.10,       # |interaction index| >= 10 points
    "converge_cka": 0.5,       # debiased CKA >= 0.5 counts as converged
    "underused_share": 0.30,   # Shapley share below 30% = under-used
}
KINDS = ("carriers", "interaction", "convergence", "underuse", "information")
_TERM_TEXT = {"redundancy": "either modality alone (redundant)", "synergy": "only both together (synergy)"}
_STAGE = re.compile(r"^stage(\d+)$")


@dataclass
class Finding:
    """One sentence with the numbers it rests on."""

    kind: str
    text: str
    numbers: dict[str, Any]


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _terms(res: Any) -> dict[str, Any]:
    c = res.contribution or {}
    if "decomposition" in c and "interaction" in c:
        return {"interaction": c["interaction"], "decomposition": c["decomposition"]}
    return coalition_terms(c) if c.get("coalitions") else {"interaction": {}, "decomposition": {}}


def _class_names(res: Any, n: int) -> list[str]:
    names = res.class_names
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]


def _carriers(res: Any, terms: Mapping[str, Any]) -> list[Finding]:
    c = res.contribution
    metric = "AP" if contribution_keys(c)[0] == "AP" else "IoU"
    out = []
    for pair, d in terms["decomposition"].items():
        pc = d["per_class"]
        names = _class_names(res, len(pc["redundancy"]))
        groups: dict[str, list[str]] = {}
        for i, name in enumerate(names):
            vals = {t: _nan(pc[t][i]) for t in pc}
            gain = sum(v for v in vals.values() if not math.isnan(v))
            if any(math.isnan(v) for v in vals.values()) or gain < THRESHOLDS["min_gain"]:
                continue
            term = max(vals, key=vals.get)
            share = vals[term] / gain
            label = term if share >= THRESHOLDS["dominant_share"] else "mixed"
            groups.setdefault(label, []).append(
                f"{name} ({_pts(vals[term])} of {_pts(gain)} points, {100 * share:.0f}%)")
        for label, items in groups.items():
            listed = ", ".join(items)
            if label.startswith("unique_"):
                text = f"{label[len('unique_'):]} alone carries the {metric} of {listed}."
            elif label == "redundancy":
                text = f"Either modality alone suffices for {listed} (redundancy)."
            elif label == "synergy":
                text = f"Only both modalities together give {listed} (synergy)."
            else:
                text = (f"No term reaches {100 * THRESHOLDS['dominant_share']:.0f}% of the gain for {listed} "
                        "(largest term shown).")
            out.append(Finding("carriers", text, {"pair": pair, "term": label, "classes": items}))
        skipped = [n for i, n in enumerate(names) if not any(n in s for items in groups.values() for s in items)]
        if skipped:
            out.append(Finding("carriers", f"Not judged (gain below {_pts(THRESHOLDS['min_gain'])} points or absent): "
                               f"{', '.join(skipped)}.", {"pair": pair, "classes": skipped}))
    return out


def _interaction(res: Any, terms: Mapping[str, Any]) -> list[Finding]:
    metric = contribution_keys(res.contribution)[0]
    out = []
    t = THRESHOLDS["interaction"]
    for pair, d in terms["interaction"].items():
        a, b = pair.split("|")
        names = _class_names(res, len(d["per_class"]))
        vals = [(n, _nan(v)) for n, v in zip(names, d["per_class"])]
        both = [f"{n} ({100 * v:+.1f})" for n, v in vals if not math.isnan(v) and v >= t]
        either = [f"{n} ({100 * v:+.1f})" for n, v in vals if not math.isnan(v) and v <= -t]
        head = f"Interaction of {a} and {b}: {100 * _nan(d['value']):+.1f} {metric} points overall."
        parts = [head]
        if both:
            parts.append(f"They need each other (index >= +{_pts(t)}) on {', '.join(both)}.")
        if either:
            parts.append(f"Either suffices (index <= -{_pts(t)}) on {', '.join(either)}.")
        if not both and not either:
            parts.append(f"No class reaches |index| >= {_pts(t)} points.")
        out.append(Finding("interaction", " ".join(parts), {"pair": pair, "value": d["value"],
                                                             "needs_both": both, "either": either}))
    return out


def _stage_key(s: str) -> int:
    m = _STAGE.match(s)
    return int(m.group(1)) if m else 0


def _convergence(res: Any) -> list[Finding]:
    t = THRESHOLDS["converge_cka"]
    out = []
    cross: dict[str, list[float]] = {}
    for r in res.cka_pairs("cross_modal"):
        if r["cka"] is not None:
            cross.setdefault(r["stage"], []).append(r["cka"])
    if cross:
        mean = {s: sum(v) / len(v) for s, v in sorted(cross.items(), key=lambda kv: _stage_key(kv[0]))}
        first = next((s for s, v in mean.items() if v >= t), None)
        series = ", ".join(f"{s} {v:.2f}" for s, v in mean.items())
        text = (f"The modality streams converge at {first} (cross-modal CKA {mean[first]:.2f} >= {t}; {series})."
                if first else f"The modality streams stay apart (cross-modal CKA below {t} at every stage: {series}).")
        out.append(Finding("convergence", text, {"cross_modal": mean, "first": first}))
    else:
        out.append(Finding("convergence", "One shared stream from the input on (early fusion): no cross-modal "
                           "CKA to measure.", {}))
    to_final: dict[str, dict[str, float]] = {}
    final = None
    for r in res.cka_pairs("to_final"):
        if r["cka"] is not None:
            to_final.setdefault(res.taps[r["a"]]["stream"], {})[r["stage"]] = r["cka"]
            final = r["b"]
    if to_final:
        parts = []
        for stream, d in to_final.items():
            d = dict(sorted(d.items(), key=lambda kv: _stage_key(kv[0])))
            first = next((s for s, v in d.items() if v >= t), None)
            last_s, last_v = list(d.items())[-1]
            parts.append(f"{stream} from {first} ({d[first]:.2f})" if first
                         else f"{stream} never (at most {max(d.values()):.2f}, {last_s} {last_v:.2f})")
        out.append(Finding("convergence", f"CKA to the final representation ({final}) reaches {t}: "
                           + "; ".join(parts) + ".", {"to_final": to_final, "final": final}))
    return out


def _underuse(res: Any) -> list[Finding]:
    c = res.contribution
    metric = contribution_keys(c)[0]
    sh = {m: _nan(v) for m, v in c.get("shapley", {}).items()}
    total = sum(v for v in sh.values() if not math.isnan(v))
    if total <= 0 or len(sh) < 2:
        return [Finding("underuse", f"Modalities together add {_pts(total)} {metric} points: no share to judge.",
                        {"shapley": sh})]
    shares = {m: v / total for m, v in sh.items()}
    low = [m for m, s in shares.items() if s < THRESHOLDS["underused_share"]]
    desc = ", ".join(f"{m} {_pts(sh[m])} points ({100 * shares[m]:.0f}%)" for m in sh)
    if low:
        text = (f"{', '.join(low)} {'is' if len(low) == 1 else 'are'} under-used: Shapley share below "
                f"{100 * THRESHOLDS['underused_share']:.0f}% ({desc} of {metric}).")
    else:
        text = f"No modality is under-used (every Shapley share >= {100 * THRESHOLDS['underused_share']:.0f}%: {desc})."
    return [Finding("underuse", text, {"shapley": sh, "shares": shares, "underused": low})]


def _information(res: Any) -> list[Finding]:
    pid = (res.contribution or {}).get("pid")
    out = []
    for pair, ent in ((pid or {}).get("pairs") or {}).items():
        o = (ent.get("prediction") or {}).get("overall")
        if not o:
            continue
        a, b = pair.split("|")
        out.append(Finding("information", (
            f"The {a}-only and {b}-only predictions carry {o['mi']:.2f} bits about the full prediction: "
            f"{o['redundancy']:.2f} redundant, {o['unique_1']:.2f} unique to {a}, {o['unique_2']:.2f} unique to {b}, "
            f"{o['synergy']:.2f} synergistic (BROJA PID)."), {"pair": pair, **o}))
    return out


def findings(res: Any) -> list[Finding]:
    """Every finding of one result, in :data:`KINDS` order (kinds without data are left out)."""
    out: list[Finding] = []
    if res.contribution and res.contribution.get("coalitions"):
        terms = _terms(res)
        out += _carriers(res, terms)
        out += _interaction(res, terms)
    out += _convergence(res)
    if res.contribution and res.contribution.get("shapley"):
        out += _underuse(res)
    out += _information(res)
    return sorted(out, key=lambda f: KINDS.index(f.kind))


def _thresholds_html() -> str:
    t = THRESHOLDS
    return ("<p class='thresholds'>Thresholds: a class is judged when its modalities add at least "
            f"{_pts(t['min_gain'])} metric points; its dominant term must be at least "
            f"{100 * t['dominant_share']:.0f}% of that gain; an interaction counts at |index| &ge; "
            f"{_pts(t['interaction'])} points; streams converge at debiased CKA &ge; {t['converge_cka']}; a modality "
            f"is under-used below {100 * t['underused_share']:.0f}% of the Shapley total. Definitions: "
            "docs/interpret.md.</p>")


_STYLE = ("<style>.findings li{margin:0.25em 0}.findings td{text-align:left;vertical-align:top;font-size:0.88em;"
          "min-width:14em}.findings th{text-align:left;vertical-align:top}.thresholds{color:#555;font-size:0.88em}"
          "</style>")

_TITLES = {"carriers": "Which modality carries which classes", "interaction": "Where modalities interact",
           "convergence": "Where the streams converge", "underuse": "What is under-used",
           "information": "Information in the predictions"}


def findings_html(res: Any) -> str:
    """The findings section that opens ``report.html``."""
    items = findings(res)
    parts = [f"{_STYLE}<section class='findings'><h2>Findings</h2>"]
    for kind in KINDS:
        these = [f for f in items if f.kind == kind]
        if these:
            parts.append(f"<h3>{_TITLES[kind]}</h3><ul>"
                         + "".join(f"<li>{html.escape(f.text)}</li>" for f in these) + "</ul>")
    parts.append(_thresholds_html() + "</section>")
    return "".join(parts)


def comparison_findings_html(labels: Sequence[str], results: Sequence[Any]) -> str:
    """The findings of several results side by side: one row per kind, one column per model."""
    per = [findings(r) for r in results]
    head = "".join(f"<th>{html.escape(lab)} ({html.escape(str(r.fusion))})</th>" for lab, r in zip(labels, results))
    rows = []
    for kind in KINDS:
        cells = ["<br>".join(html.escape(f.text) for f in fs if f.kind == kind) or "n/a" for fs in per]
        rows.append(f"<tr><th>{_TITLES[kind]}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"{_STYLE}<section class='findings'><h2>Findings</h2><table class='findings'><thead><tr><th></th>" + head
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + _thresholds_html() + "</section>")


Table = tuple[str, list[str], list[list[str]]]


def _fmt(v: Any, scale: float = 100.0, digits: int = 1) -> str:
    v = _nan(v)
    return "n/a" if math.isnan(v) else f"{scale * v:.{digits}f}"


def cooperation_tables(labels: Sequence[str], results: Sequence[Any]) -> list[Table]:
    """Interaction, score decomposition and PID per class for several results (plain-text cells)."""
    inter_rows, dec_rows, pid_rows = [], [], []
    names: list[str] | None = None
    for lab, r in zip(labels, results):
        if not (r.contribution and r.contribution.get("coalitions")):
            continue
        terms = _terms(r)
        for pair, d in terms["interaction"].items():
            inter_rows.append([lab, pair.replace("|", "-"), _fmt(d["value"])] + [_fmt(v) for v in d["per_class"]])
            names = names or _class_names(r, len(d["per_class"]))
        for pair, d in terms["decomposition"].items():
            pc = d["per_class"]
            for i, dom in enumerate(d["dominant"]):
                dec_rows.append([lab, (names or _class_names(r, len(d["dominant"])))[i]]
                                + [_fmt(pc[t][i]) for t in pc] + [dom])
        for pair, ent in (((r.contribution.get("pid") or {}).get("pairs")) or {}).items():
            a, b = pair.split("|")
            pred = ent.get("prediction") or {}
            for cls, t in [("all classes", pred.get("overall"))] + list((pred.get("per_class") or {}).items()):
                if t:
                    dom = {"unique_1": f"unique_{a}", "unique_2": f"unique_{b}"}.get(t["dominant"], t["dominant"])
                    pid_rows.append([lab, cls] + [_fmt(t[k], 1.0, 3) for k in
                                                  ("redundancy", "unique_1", "unique_2", "synergy", "mi")] + [dom])
    tables: list[Table] = []
    if inter_rows:
        k = max(len(r) - 3 for r in inter_rows)
        header = names if names and len(names) == k else [str(i) for i in range(k)]
        tables.append(("Pairwise interaction index (metric points; + needs both, - either suffices)",
                       ["model", "pair", "overall", *header], inter_rows))
    if dec_rows:
        mods = [m for r in results for m in r.modalities]
        a, b = (mods + ["a", "b"])[:2]
        tables.append(("Score decomposition per class (metric points; R + U + U + S = v(all) - v(none))",
                       ["model", "class", "redundancy", f"unique {a}", f"unique {b}", "synergy", "dominant"], dec_rows))
    if pid_rows:
        a, b = (list(results[0].modalities) + ["a", "b"])[:2]
        tables.append((("BROJA PID of the predictions (bits; sources: one-modality predictions, target: "
                        "full prediction, one-vs-rest per class)"),
                       ["model", "target", "redundancy", f"unique {a}", f"unique {b}", "synergy", "I(Y; X1, X2)",
                        "dominant"], pid_rows))
    return tables


def _evolution_series(res: Any) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], str | None]:
    cka: dict[str, dict[str, float]] = {}
    final = None
    for r in res.cka_pairs("to_final"):
        if r["cka"] is not None:
            cka.setdefault(res.taps[r["a"]]["stream"], {})[r["stage"]] = r["cka"]
            final = r["b"]
    sv: dict[str, dict[str, float]] = {}
    for tap, v in (res.semantic_variance or {}).items():
        t = res.taps.get(tap)
        if t and _STAGE.match(t["stage"]) and tap == f"{t['stream']}.{t['stage']}" and v.get("semantic_variance") is not None:
            sv.setdefault(t["stream"], {})[t["stage"]] = v["semantic_variance"]
    return cka, sv, final


def plot_evolution(labels: Sequence[str], results: Sequence[Any], path: str | Path) -> Path | None:
    """Per stage and stream: CKA to the final representation (top) and semantic variance (bottom),
    one column per model, shared y axes. ``None`` when no result has either."""
    series = [_evolution_series(r) for r in results]
    if not any(c or s for c, s, _ in series):
        return None
    colors = {"rgb": "tab:red", "depth": "tab:blue", "thermal": "tab:orange", "fused": "tab:purple"}
    n = len(results)
    # matplotlib's object API (no pyplot state, no global backend switch), as in report.py.
    fig = Figure(figsize=(max(3.2 * n + 0.8, 6.5), 5.8))
    axes = fig.subplots(2, n, sharey="row", squeeze=False)
    for j, (lab, (cka, sv, final)) in enumerate(zip(labels, series)):
        for i, (data, ylabel) in enumerate(((cka, f"debiased CKA to {final or 'output'}"),
                                            (sv, "semantic variance"))):
            ax = axes[i][j]
            for stream, d in data.items():
                stages = sorted(d, key=_stage_key)
                ax.plot([_stage_key(s) for s in stages], [d[s] for s in stages], "o-", label=stream,
                        color=colors.get(stream))
            ax.set_xticks([1, 2, 3, 4])
            ax.set_xlabel("stage")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(f"{lab}\n({results[j].fusion})", fontsize=9)
            if data:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no taps", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Evolution within each stream: similarity to the output (top),\nclass separability (bottom)",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path
