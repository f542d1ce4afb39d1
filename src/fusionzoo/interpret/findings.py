"""Findings in sentences, derived from an :class:`~.api.InterpretResult` with stated thresholds.

What a report states first (docs/interpret.md, "Findings"). Every sentence is computed from the
numbers in ``metrics.json``, and every judgement uses one of the thresholds in
:data:`THRESHOLDS`, which the page prints beside the sentences. A judgement is a statistical
claim (STYLE 14): it is stated only when the number's 95 % bootstrap interval
(:mod:`.intervals`, ``result.intervals``) clears the threshold; otherwise the sentence says the
finding is not resolved with the result's N images and gives the interval. A result without
intervals (``replicates=0`` or a metrics.json written before them) is said to have none, once,
and its judgements are stated on the point values, each marked "point values, no interval".

- **carriers**: per class, the largest term of the score decomposition
  (:mod:`.interaction`: redundancy, unique to one modality, synergy) when its interval's lower
  bound is at least ``dominant_share`` of the class's gain ``v(all) - v(none)``; when every
  term's upper bound is below it, no term dominates; classes gaining less than ``min_gain``
  are not judged;
- **interaction**: classes whose pairwise interaction index clears ``interaction`` in absolute
  value (positive: "needs both", negative: "either suffices");
- **convergence**: the first stage where the mean cross-modal CKA reaches ``converge_cka``, and
  the first stage where each stream's CKA to the final representation reaches it, read only
  from taps upstream of fusion (``taps[name]["after_fusion"]`` False);
- **under-use**: a modality whose Shapley value is below ``underused_share`` of the Shapley total;
- **separability**: the direction of semantic variance from the first to the last stage, in the
  trace form (``sv``) and the whitened form (``sv_whitened``), saying when they disagree;
- **information**: the BROJA decomposition of the predictions (:mod:`.pid`), overall, in bits,
  and one sentence reconciling it with the score decomposition when their dominant terms differ;
- **references**: what a modality adds, against a model retrained without it (a unimodal run or
  a modality-dropout run of the same recipe, ``settings["references"]``, filled by
  :func:`.compare.attach_references`): "learned to use both" against "breaks when one is removed".

Contribution-based findings are evaluated under every removal policy of
``contribution["policies"]``; a sentence names the policies it holds under, and a verdict that
changes with the policy says so ("under zero: ...; under missing: ...").

Also here, because the report and the compare page share them: the comparison tables of these
terms (:func:`cooperation_tables`) and the side-by-side evolution plot (:func:`plot_evolution`).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .compare import PolicyView, Table, comparison_extra_tables, policy_views, seed_groups, with_references
from .compare import contribution_terms as _terms
from .contribution import contribution_keys
from .interaction import coalition_terms
from .intervals import interval
from .style import stream_color

__all__ = ["KINDS", "THRESHOLDS", "Estimate", "Finding", "comparison_findings_html", "cooperation_tables",
           "findings", "findings_html", "plot_evolution", "seed_verdicts"]

THRESHOLDS: dict[str, float] = {
    "min_gain": 0.05,          # a class must gain >= 5 metric points from its modalities to be judged
    "dominant_share": 0.4,     # the dominant term must be >= 40% of that gain
    "interaction": 0.10,       # |interaction index| >= 10 points
    "converge_cka": 0.5,       # debiased CKA >= 0.5 counts as converged
    "underused_share": 0.30,   # Shapley share below 30% = under-used
}
KINDS = ("measurement", "carriers", "interaction", "references", "convergence", "underuse", "separability",
         "information", "purification")
_STAGE = re.compile(r"^stage(\d+)$")
_POINT = " [point values, no interval]"


@dataclass
class Finding:
    """One sentence with the numbers it rests on.

    Attributes:
        kind: one of :data:`KINDS`.
        text: the sentence, with the intervals of its numbers.
        numbers: the values (and intervals) it rests on.
        status: ``"holds"`` (every judgement clears its threshold with its interval),
            ``"unresolved"`` (an interval straddles the threshold: withheld), ``"point"`` (judged
            on point values: the result has no intervals), ``"mixed"`` (parts of each, or a
            verdict that changes with the removal policy) or ``"note"`` (no judgement).
        policies: the removal policies the sentence holds under (contribution findings).
    """

    kind: str
    text: str
    numbers: dict[str, Any]
    status: str = "note"
    policies: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# numbers with their intervals
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A value and its interval.

    ``ci`` is ``(lo, hi)``; ``None`` with ``recorded=False`` when the result holds no interval
    for the number (judged on the point value, marked), ``None`` with ``recorded=True`` when the
    interval is recorded but undefined (``[nan, nan]``: the data cannot resolve the number).
    """

    value: float
    ci: tuple[float, float] | None
    recorded: bool

    def at_least(self, t: float) -> str:
        """``"yes"`` / ``"no"`` / ``"unresolved"``: is the value >= ``t``? Decided by the interval
        when there is one (lower bound >= t: yes; upper bound < t: no), by the point otherwise."""
        if math.isnan(self.value):
            return "unresolved"
        if self.ci is None:
            if self.recorded:
                return "unresolved"
            return "yes" if self.value >= t else "no"
        lo, hi = self.ci
        return "yes" if lo >= t else "no" if hi < t else "unresolved"

    def at_most(self, t: float) -> str:
        """``"yes"`` / ``"no"`` / ``"unresolved"``: is the value <= ``t``?"""
        flipped = Estimate(-self.value, None if self.ci is None else (-self.ci[1], -self.ci[0]), self.recorded)
        return flipped.at_least(-t)

    def text(self, scale: float = 100.0, digits: int = 1, sign: bool = False) -> str:
        """``"80.0 [78.1, 82.0]"`` (``scale`` times the value; the interval omitted without one)."""
        spec = f"{{:{'+' if sign else ''}.{digits}f}}"

        def f(x: float) -> str:
            out = spec.format(x)
            return spec.format(0.0) if float(out) == 0 else out  # no "-0.0" from rounding noise

        if math.isnan(self.value):
            return "n/a"
        out = f(scale * self.value)
        if self.ci is not None:
            out += f" [{f(scale * self.ci[0])}, {f(scale * self.ci[1])}]"
        elif self.recorded:
            out += " [interval undefined]"
        return out


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _has_intervals(res: Any) -> bool:
    return bool(getattr(res, "intervals", None))


def _est(res: Any, path: str, value: Any) -> Estimate:
    table = getattr(res, "intervals", None) or {}
    return Estimate(_nan(value), interval(res, path), path in table)


def _status(verdicts: Sequence[str], res: Any) -> str:
    """The status of a sentence from its parts' ``yes/no/unresolved`` outcomes."""
    if not _has_intervals(res):
        return "point"
    if all(v == "unresolved" for v in verdicts):
        return "unresolved"
    return "mixed" if "unresolved" in verdicts else "holds"


def _mark(res: Any) -> str:
    return "" if _has_intervals(res) else _POINT


def _n(res: Any) -> str:
    return f"{res.num_images} images"


# --------------------------------------------------------------------------------------------
# removal policies
# --------------------------------------------------------------------------------------------
def _policy_list(policies: Sequence[str]) -> str:
    ps = list(policies)
    return ps[0] if len(ps) == 1 else ", ".join(ps[:-1]) + " and " + ps[-1]


def _under(policies: Sequence[str], total: int) -> str:
    """``"under zero"``, or ``"under every policy measured (zero, mean and missing)"``."""
    if len(policies) == total and total > 1:
        return f"under every removal policy measured ({_policy_list(policies)})"
    return f"under {_policy_list(policies)}"


@dataclass
class _Verdict:
    label: str         # what the item is judged to be, under one policy
    detail: str        # its numbers, for the sentence
    outcome: str       # "yes" / "no" / "unresolved" (how firmly the label is established)


def _across(views: Sequence[PolicyView], per_policy: Mapping[str, Mapping[str, _Verdict]]
            ) -> tuple[dict[str, list[tuple[str, _Verdict]]], dict[str, list[tuple[str, _Verdict]]]]:
    """Split items into those with one label under every policy (label -> [(item, verdict under
    the first policy)]) and those whose label changes (item -> [(policy, verdict)])."""
    items: list[str] = []
    for v in per_policy.values():
        items += [i for i in v if i not in items]
    stable: dict[str, list[tuple[str, _Verdict]]] = {}
    varying: dict[str, list[tuple[str, _Verdict]]] = {}
    for item in items:
        seq = [(pv.policy, per_policy[pv.policy][item]) for pv in views if item in per_policy.get(pv.policy, {})]
        labels = {v.label for _, v in seq}
        if len(labels) == 1:
            stable.setdefault(seq[0][1].label, []).append((item, seq[0][1]))
        else:
            varying[item] = seq
    return stable, varying


def _class_names(res: Any, n: int) -> list[str]:
    names = res.class_names
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]


# --------------------------------------------------------------------------------------------
# carriers: the dominant term of the score decomposition
# --------------------------------------------------------------------------------------------
def _term_label(term: str) -> str:
    return term.replace("_", " ")


def _may_reach(rival: Estimate, top: Estimate) -> bool:
    """Whether ``rival`` may be as large as ``top``: its interval's upper end reaches ``top``'s lower
    end (point values when either has no interval)."""
    if rival.ci is None or top.ci is None:
        return rival.value >= top.value
    return rival.ci[1] >= top.ci[0]


def _carrier_verdicts(res: Any, view: PolicyView, pair: str, d: Mapping[str, Any]) -> dict[str, _Verdict]:
    pc = d["per_class"]
    names = _class_names(res, len(pc["redundancy"]))
    out = {}
    for i, name in enumerate(names):
        vals = {t: _nan(pc[t][i]) for t in pc}
        gain = sum(v for v in vals.values() if not math.isnan(v))
        if any(math.isnan(v) for v in vals.values()) or gain < THRESHOLDS["min_gain"]:
            out[name] = _Verdict("not_judged", f"gain {_pts(gain)} points" if not math.isnan(gain) else "absent", "no")
            continue
        ests = {t: _est(res, f"{view.prefix}decomposition.{pair}.per_class.{t}.{i}", vals[t]) for t in vals}
        need = THRESHOLDS["dominant_share"] * gain
        term = max(vals, key=vals.get)
        top = ests[term].at_least(need)
        detail = f"{_term_label(term)} {ests[term].text()} of {_pts(gain)} points, {100 * vals[term] / gain:.0f}%"
        # "X carries the class" also claims X beats the runner-up: a runner-up that may reach the share
        # and whose interval overlaps X's (unique rgb 41.9 [36.1, 48.2] against synergy 41.1 [35.3, 46.9]
        # of 83 points) leaves the dominant term undecided. Overlap of the two marginal intervals is
        # conservative (the replicates of their difference are not kept).
        rivals = [t for t in vals if t != term and ests[t].at_least(need) != "no" and _may_reach(ests[t], ests[term])]
        if top == "yes" and rivals:
            tied = "; ".join(f"{_term_label(t)} {ests[t].text()}" for t in rivals)
            out[name] = _Verdict("unresolved", f"{detail}, but {tied} may also reach {_pts(need)} and overlaps it",
                                 "unresolved")
        elif top == "yes":
            out[name] = _Verdict(term, detail, "yes")
        elif all(e.at_least(need) == "no" for e in ests.values()):
            out[name] = _Verdict("mixed", detail, "yes")
        else:
            out[name] = _Verdict("unresolved", f"{detail}; needs >= {_pts(need)}", "unresolved")
    return out


def _carrier_phrase(label: str, metric: str, listed: str) -> str:
    if label.startswith("unique_"):
        return f"{label[len('unique_'):]} alone carries the {metric} of {listed}"
    if label == "redundancy":
        return f"Either modality alone suffices for {listed}"
    if label == "synergy":
        return f"Only both modalities together give {listed}"
    if label == "mixed":
        return (f"No term reaches {100 * THRESHOLDS['dominant_share']:.0f}% of the gain for {listed} "
                "(largest term shown)")
    raise ValueError(label)


def _short(label: str, detail: str) -> str:
    """A verdict under one policy, for the "depends on the policy" sentences."""
    words = {"redundancy": "either alone suffices", "synergy": "only both together", "mixed": "no dominant term",
             "unresolved": "not resolved", "not_judged": "not judged", "both": "they need each other",
             "either": "either suffices", "neither": "no interaction beyond the threshold",
             "under": "under-used", "not_under": "not under-used"}
    if label.startswith("unique_"):
        text = f"{label[len('unique_'):]} alone"
    else:
        text = words.get(label, label)
    return f"{text} ({detail})"


def _carriers(res: Any, views: Sequence[PolicyView]) -> list[Finding]:
    metric = "AP" if contribution_keys(views[0].contribution)[0] == "AP" else "IoU"
    main = views[0].policy
    pairs: list[str] = []
    per: dict[str, dict[str, dict[str, _Verdict]]] = {}  # pair -> policy -> class -> verdict
    for v in views:
        for pair, d in _terms(v.contribution)["decomposition"].items():
            pairs += [pair] if pair not in pairs else []
            per.setdefault(pair, {})[v.policy] = _carrier_verdicts(res, v, pair, d)
    out = []
    for pair in pairs:
        these = [v for v in views if v.policy in per[pair]]
        names = [v.policy for v in these]
        stable, varying = _across(these, per[pair])
        numbers_from = f" (numbers under {main})" if len(these) > 1 else ""
        for label, items in stable.items():
            listed = ", ".join(f"{n} ({v.detail})" for n, v in items)
            under = _under(names, len(these))
            if label == "not_judged":
                text = (f"Not judged {under} (gain below {_pts(THRESHOLDS['min_gain'])} points or absent): "
                        f"{', '.join(n for n, _ in items)}.")
                out.append(Finding("carriers", text, {"pair": pair, "classes": [n for n, _ in items]}, "note", names))
                continue
            if label == "unresolved":
                text = f"Not resolved with {_n(res)} {under}{numbers_from}: {listed}."
                status = "unresolved"
            else:
                text = f"{_carrier_phrase(label, metric, listed)}, {under}{numbers_from}.{_mark(res)}"
                status = "holds" if _has_intervals(res) else "point"
            out.append(Finding("carriers", text, {"pair": pair, "term": label, "classes": [n for n, _ in items]},
                               status, names))
        for cls, seq in varying.items():
            parts = "; ".join(f"under {p}: {_short(v.label, v.detail)}" for p, v in seq)
            out.append(Finding("carriers", f"{cls}: the verdict depends on the removal policy: {parts}.{_mark(res)}",
                               {"pair": pair, "class": cls, "by_policy": {p: v.label for p, v in seq}},
                               "mixed", [p for p, _ in seq]))
    return out


# --------------------------------------------------------------------------------------------
# interaction index
# --------------------------------------------------------------------------------------------
def _interaction(res: Any, views: Sequence[PolicyView]) -> list[Finding]:
    metric = contribution_keys(views[0].contribution)[0]
    t = THRESHOLDS["interaction"]
    per: dict[str, dict[str, dict[str, _Verdict]]] = {}
    overall: dict[str, list[str]] = {}
    pairs: list[str] = []
    for v in views:
        for pair, d in _terms(v.contribution)["interaction"].items():
            pairs += [pair] if pair not in pairs else []
            o = _est(res, f"{v.prefix}interaction.{pair}.value", d["value"])
            overall.setdefault(pair, []).append(f"{o.text(sign=True)} under {v.policy}")
            verdicts = {}
            for i, (name, val) in enumerate(zip(_class_names(res, len(d["per_class"])), d["per_class"])):
                e = _est(res, f"{v.prefix}interaction.{pair}.per_class.{i}", val)
                if math.isnan(e.value):
                    continue
                up, down = e.at_least(t), e.at_most(-t)
                label = ("both" if up == "yes" else "either" if down == "yes"
                         else "neither" if up == "no" and down == "no" else "unresolved")
                verdicts[name] = _Verdict(label, e.text(sign=True), "unresolved" if label == "unresolved" else "yes")
            per.setdefault(pair, {})[v.policy] = verdicts
    out = []
    for pair in pairs:
        a, b = pair.split("|")
        these = [v for v in views if v.policy in per[pair]]
        names = [v.policy for v in these]
        stable, varying = _across(these, per[pair])
        under = _under(names, len(these))
        parts = [f"Interaction of {a} and {b}, overall: {'; '.join(overall[pair])} ({metric} points)."]
        numbers_from = f" (numbers under {these[0].policy})" if len(these) > 1 else ""
        listed = {k: ", ".join(f"{n} ({v.detail})" for n, v in items) for k, items in stable.items()}
        if "both" in listed:
            parts.append(f"They need each other (index >= +{_pts(t)}) {under}{numbers_from} on {listed['both']}.")
        if "either" in listed:
            parts.append(f"Either suffices (index <= -{_pts(t)}) {under}{numbers_from} on {listed['either']}.")
        if "unresolved" in listed:
            parts.append(f"Not resolved with {_n(res)} {under}: {listed['unresolved']}.")
        if not {"both", "either", "unresolved"} & set(listed) and not varying:
            parts.append(f"No class reaches |index| >= {_pts(t)} points {under}.")
        for cls, seq in varying.items():
            parts.append(f"{cls} depends on the removal policy: "
                         + "; ".join(f"under {p}: {_short(v.label, v.detail)}" for p, v in seq) + ".")
        outcomes = [v.outcome for items in stable.values() for _, v in items if v.label != "neither"]
        status = "mixed" if varying else _status(outcomes or ["yes"], res)
        out.append(Finding("interaction", " ".join(parts) + _mark(res),
                           {"pair": pair, "needs_both": [n for n, _ in stable.get("both", [])],
                            "either": [n for n, _ in stable.get("either", [])],
                            "unresolved": [n for n, _ in stable.get("unresolved", [])],
                            "by_policy": {c: {p: v.label for p, v in seq} for c, seq in varying.items()}},
                           status, names))
    return out


def _three_way(res: Any, views: Sequence[PolicyView]) -> list[Finding]:
    """The 3-way interaction (Harsanyi dividend of all three modalities) under each policy."""
    t = THRESHOLDS["interaction"]
    out = []
    for v in views:
        mods = list(v.contribution.get("modalities") or res.modalities)
        if len(mods) != 3:
            return []
        name = "|".join(mods)
        # the section's own Harsanyi terms (interpret.run), else computed from its coalitions (older results)
        stored = v.contribution.get("harsanyi") or coalition_terms(v.contribution).get("harsanyi", {})
        if name not in stored:
            continue
        overall = _est(res, f"{v.prefix}harsanyi.{name}.value", _nan(stored[name]["value"]))
        per = [_nan(x) for x in stored[name]["per_class"]]
        pos, neg, unresolved = [], [], []
        for i, (cls, x) in enumerate(zip(_class_names(res, len(per)), per)):
            e = _est(res, f"{v.prefix}harsanyi.{name}.per_class.{i}", x)
            if math.isnan(e.value):
                continue
            up, down = e.at_least(t), e.at_most(-t)
            item = f"{cls} ({e.text(sign=True)})"
            if up == "yes":
                pos.append(item)
            elif down == "yes":
                neg.append(item)
            elif "unresolved" in (up, down):
                unresolved.append(item)
        head = (f"Under {v.policy}, the 3-way interaction of {', '.join(mods)} (Harsanyi dividend: what no pair "
                f"accounts for) is {overall.text(sign=True)} points overall.")
        parts = [head]
        if pos:
            parts.append(f"All three are needed together (dividend >= +{_pts(t)}) on {', '.join(pos)}.")
        if neg:
            parts.append(f"The pairs already give it (dividend <= -{_pts(t)}) on {', '.join(neg)}.")
        if unresolved:
            parts.append(f"Not resolved with {_n(res)}: {', '.join(unresolved)}.")
        out.append(Finding("interaction", " ".join(parts) + _mark(res),
                           {"modalities": mods, "policy": v.policy, "value": overall.value, "positive": pos,
                            "negative": neg}, _status(["unresolved"] * bool(unresolved) + ["yes"], res), [v.policy]))
    return out


# --------------------------------------------------------------------------------------------
# convergence: upstream of fusion only
# --------------------------------------------------------------------------------------------
def _stage_key(s: str) -> int:
    m = _STAGE.match(s)
    return int(m.group(1)) if m else 0


def _upstream(res: Any, tap: str) -> bool | None:
    """False/True from ``taps[tap]["after_fusion"]``; None when the result does not say."""
    v = (res.taps.get(tap) or {}).get("after_fusion")
    return None if v is None else not v


def _fusion_text(res: Any) -> str:
    """The fusion family as the registry entry gives it (``res.fusion``), never guessed."""
    if res.fusion:
        return f"{res.model} is registered as {res.fusion} fusion"
    return f"{res.model} is not a registered model (no fusion family recorded)"


def _cka_rows(res: Any, kind: str) -> list[tuple[int, dict[str, Any]]]:
    return [(i, r) for i, r in enumerate((res.cka or {}).get("pairs", [])) if r["kind"] == kind and r["cka"] is not None]


def _mean_est(res: Any, rows: Sequence[tuple[int, dict[str, Any]]]) -> Estimate:
    """Mean CKA of rows; its interval is the mean of their bounds (exact for one row, the
    two-modality case; an approximation for M > 2, where several pairs share a stage)."""
    ests = [_est(res, f"cka.pairs.{i}.cka", r["cka"]) for i, r in rows]
    value = sum(e.value for e in ests) / len(ests)
    if all(e.ci is not None for e in ests):
        return Estimate(value, (sum(e.ci[0] for e in ests) / len(ests), sum(e.ci[1] for e in ests) / len(ests)), True)
    return Estimate(value, None, any(e.recorded for e in ests))


def _first_reached(res: Any, series: Mapping[str, Estimate], t: float, subject: str) -> tuple[str, list[str]]:
    """A clause saying where ``series`` (stage -> estimate, shallow to deep) first reaches ``t``."""
    outcomes = [e.at_least(t) for e in series.values()]
    desc = ", ".join(f"{s} {e.text(1.0, 2)}" for s, e in series.items())
    if "yes" in outcomes:
        k = outcomes.index("yes")
        stage = list(series)[k]
        before = [s for s, o in zip(series, outcomes[:k]) if o == "unresolved"]
        if before:
            clause = (f"{subject} reaches {t} by {stage} ({series[stage].text(1.0, 2)}); whether it already does at "
                      f"{', '.join(before)} is not resolved with {_n(res)} ({desc})")
            return clause, outcomes
        return f"{subject} reaches {t} at {stage} ({desc})", outcomes
    if all(o == "no" for o in outcomes):
        return f"{subject} stays below {t} at every stage ({desc})", outcomes
    return f"whether {subject} reaches {t} is not resolved with {_n(res)} ({desc})", outcomes


def _convergence(res: Any) -> list[Finding]:
    t = THRESHOLDS["converge_cka"]
    out = []
    rows = _cka_rows(res, "cross_modal")
    arch = f"{_fusion_text(res)}."  # the registry's family opens the section (never guessed from the taps)
    up = [(i, r) for i, r in rows if _upstream(res, r["a"]) is not False and _upstream(res, r["b"]) is not False]
    unknown = any(_upstream(res, r[k]) is None for _, r in rows for k in ("a", "b"))
    where = ("whether these taps sit after fusion is not recorded (metrics.json predates tap metadata)" if unknown
             else "taps upstream of fusion only")
    if not rows:
        text = (f"{_fusion_text(res)} and exposes no two modality streams at the same stage, so there is no "
                "cross-modal CKA to measure.")
        if res.fusion == "early":
            text = f"{_fusion_text(res)}: one shared stream from the input on, so there is no cross-modal CKA to measure."
        out.append(Finding("convergence", text, {"fusion": res.fusion}))
    elif not up:
        stages = sorted({r["stage"] for _, r in rows}, key=_stage_key)
        out.append(Finding("convergence", (
            f"{arch} Every cross-modal tap pair ({', '.join(stages)}) sits downstream of a point where the modalities "
            "meet, so convergence cannot be separated from the architecture: not judged."),
            {"downstream_stages": stages}))
    else:
        by_stage: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for i, r in up:
            by_stage.setdefault(r["stage"], []).append((i, r))
        series = {s: _mean_est(res, by_stage[s]) for s in sorted(by_stage, key=_stage_key)}
        clause, outcomes = _first_reached(res, series, t, "the mean cross-modal CKA")
        dropped = sorted({r["stage"] for i, r in rows} - set(by_stage), key=_stage_key)
        tail = (f"; the pairs at {', '.join(dropped)} sit after fusion and are not used" if dropped else "")
        out.append(Finding("convergence", f"{arch} Streams ({where}{tail}): {clause}.{_mark(res)}",
                           {"cross_modal": {s: e.value for s, e in series.items()}},
                           _status(outcomes, res) if "unresolved" in outcomes or not _has_intervals(res) else "holds"))
    to_final: dict[str, dict[str, Estimate]] = {}
    final = None
    skipped: set[str] = set()
    for i, r in _cka_rows(res, "to_final"):
        stream = res.taps[r["a"]]["stream"]
        final = r["b"]
        if _upstream(res, r["a"]) is False:
            skipped.add(stream)
            continue
        to_final.setdefault(stream, {})[r["stage"]] = _est(res, f"cka.pairs.{i}.cka", r["cka"])
    if to_final or skipped:
        parts, outcomes = [], []
        for stream, d in to_final.items():
            clause, o = _first_reached(res, dict(sorted(d.items(), key=lambda kv: _stage_key(kv[0]))), t, stream)
            parts.append(clause)
            outcomes += o
        after = (f" Taps after fusion ({', '.join(sorted(skipped))} streams at some stages) are left out: "
                 "their similarity to the output is built in.") if skipped else ""
        text = (f"CKA to the final representation ({final}), upstream taps: " + "; ".join(parts) + "." if parts
                else f"Every stage tap compared with the final representation ({final}) sits after fusion: not judged.")
        out.append(Finding("convergence", text + after + (_mark(res) if parts else ""),
                           {"to_final": {s: {k: e.value for k, e in d.items()} for s, d in to_final.items()},
                            "final": final, "after_fusion": sorted(skipped)},
                           _status(outcomes, res) if parts else "note"))
    return out


# --------------------------------------------------------------------------------------------
# under-use
# --------------------------------------------------------------------------------------------
def _underuse_verdicts(res: Any, view: PolicyView) -> tuple[dict[str, _Verdict], float]:
    sh = {m: _nan(v) for m, v in view.contribution.get("shapley", {}).items()}
    total = sum(v for v in sh.values() if not math.isnan(v))
    out = {}
    for m, v in sh.items():
        e = _est(res, f"{view.prefix}shapley.{m}", v)
        below = e.at_most(THRESHOLDS["underused_share"] * total)
        share = f"{100 * v / total:.0f}%" if total > 0 else "n/a"
        label = "under" if below == "yes" else "not_under" if below == "no" else "unresolved"
        out[m] = _Verdict(label, f"{e.text()} points, {share}", below if below != "no" else "yes")
    return out, total


def _underuse(res: Any, views: Sequence[PolicyView]) -> list[Finding]:
    metric = contribution_keys(views[0].contribution)[0]
    share = f"{100 * THRESHOLDS['underused_share']:.0f}%"
    per, totals = {}, {}
    for v in views:
        if v.contribution.get("shapley"):
            per[v.policy], totals[v.policy] = _underuse_verdicts(res, v)
    these = [v for v in views if v.policy in per]
    if not these:
        return []
    main = these[0].policy
    if len(per[main]) < 2 or totals[main] <= 0:
        return [Finding("underuse", f"Under {main}, the modalities together add {_pts(totals[main])} {metric} points: "
                        "no share to judge.", {"total": totals[main]}, "note", [main])]
    names = [v.policy for v in these]
    stable, varying = _across(these, per)
    desc = "; ".join(f"{m} {v.detail}" for m, v in per[main].items())
    numbers = f"{desc} of {metric} under {main}"
    low = [m for m, _ in stable.get("under", [])]
    unresolved = [m for m, _ in stable.get("unresolved", [])]
    parts = []
    under = _under(names, len(these))
    if low:
        parts.append(f"{', '.join(low)} {'is' if len(low) == 1 else 'are'} under-used {under}: Shapley value "
                     f"below {share} of the total ({numbers}).")
    if unresolved:
        parts.append(f"Whether {', '.join(unresolved)} {'is' if len(unresolved) == 1 else 'are'} under-used (below "
                     f"{share} of the Shapley total) is not resolved with {_n(res)} {under} ({numbers}).")
    for m, seq in varying.items():
        parts.append(f"Whether {m} is under-used depends on the removal policy: "
                     + "; ".join(f"under {p}: {_short(v.label, v.detail)}" for p, v in seq) + ".")
    if not parts:
        parts.append(f"No modality is under-used {under} (every Shapley share >= {share}: {numbers}).")
    status = "mixed" if varying else _status([v.outcome for items in stable.values() for _, v in items], res)
    return [Finding("underuse", " ".join(parts) + _mark(res),
                    {"shapley": {m: _nan(x) for m, x in these[0].contribution["shapley"].items()},
                     "underused": low, "unresolved": unresolved,
                     "by_policy": {m: {p: v.label for p, v in seq} for m, seq in varying.items()}}, status, names)]


# --------------------------------------------------------------------------------------------
# separability: the semantic-variance trend in both forms
# --------------------------------------------------------------------------------------------
_SV_FORMS = (("sv", "trace form sv = S_B / S_T"), ("sv_whitened", "whitened form sv_whitened"))


def _sv_value(v: Mapping[str, Any], form: str) -> Any:
    return v.get(form, v.get("semantic_variance")) if form == "sv" else v.get(form)


def _direction(res: Any, first: Estimate, last: Estimate) -> str:
    """``rises`` / ``falls`` when the two stages' intervals do not overlap (the point values
    without intervals), else ``unresolved``."""
    if first.ci is not None and last.ci is not None:
        return "rises" if first.ci[1] < last.ci[0] else "falls" if first.ci[0] > last.ci[1] else "unresolved"
    if first.recorded or last.recorded or math.isnan(first.value) or math.isnan(last.value):
        return "unresolved"
    return "rises" if last.value > first.value else "falls" if last.value < first.value else "unresolved"


def _separability(res: Any) -> list[Finding]:
    streams: dict[str, dict[str, str]] = {}
    for tap in res.semantic_variance or {}:
        t = res.taps.get(tap)
        if t and _STAGE.match(t["stage"]) and tap == f"{t['stream']}.{t['stage']}":
            streams.setdefault(t["stream"], {})[t["stage"]] = tap
    out = []
    for stream, stages in streams.items():
        if len(stages) < 2:
            continue
        order = sorted(stages, key=_stage_key)
        s0, s1 = order[0], order[-1]
        parts, dirs = [], {}
        for form, name in _SV_FORMS:
            v0, v1 = (_sv_value(res.semantic_variance[stages[s]], form) for s in (s0, s1))
            if v0 is None or v1 is None:
                continue
            a = _est(res, f"semantic_variance.{stages[s0]}.{form}", v0)
            b = _est(res, f"semantic_variance.{stages[s1]}.{form}", v1)
            d = dirs[form] = _direction(res, a, b)
            verb = d if d != "unresolved" else "has no direction resolved with " + _n(res)
            parts.append(f"{name}: {verb} from {s0} {a.text(1.0, 2)} to {s1} {b.text(1.0, 2)}")
        if not parts:
            continue
        text = f"Semantic variance of the {stream} stream, " + "; ".join(parts) + "."
        if "sv_whitened" not in dirs:
            text += " The whitened form was not measured."
        elif dirs.get("sv") in ("rises", "falls") and dirs["sv_whitened"] in ("rises", "falls") \
                and dirs["sv"] != dirs["sv_whitened"]:
            text += (" The two forms disagree in direction: the trace form weighs high-variance channels, the "
                     "whitened form is invariant to their scale.")
        outcomes = ["unresolved" if d == "unresolved" else "yes" for d in dirs.values()]
        out.append(Finding("separability", text + _mark(res), {"stream": stream, "directions": dirs},
                           _status(outcomes, res)))
    return out


# --------------------------------------------------------------------------------------------
# information: the PID, and its reconciliation with the score decomposition
# --------------------------------------------------------------------------------------------
_PID_TERMS = ("redundancy", "unique_1", "unique_2", "synergy")


def _information(res: Any, views: Sequence[PolicyView]) -> list[Finding]:
    out = []
    for v in views:
        pid = v.contribution.get("pid")
        for pair, ent in ((pid or {}).get("pairs") or {}).items():
            o = (ent.get("prediction") or {}).get("overall")
            if not o:
                continue
            a, b = pair.split("|")
            e = {k: _est(res, f"{v.prefix}pid.pairs.{pair}.prediction.overall.{k}", o.get(k))
                 for k in (*_PID_TERMS, "mi")}
            out.append(Finding("information", (
                f"Under {v.policy}, the {a}-only and {b}-only predictions carry {e['mi'].text(1.0, 2)} bits about the "
                f"full prediction: {e['redundancy'].text(1.0, 2)} redundant, {e['unique_1'].text(1.0, 2)} unique to "
                f"{a}, {e['unique_2'].text(1.0, 2)} unique to {b}, {e['synergy'].text(1.0, 2)} synergistic "
                f"(BROJA PID).{_mark(res)}"), {"pair": pair, "policy": v.policy, **o},
                "point" if not _has_intervals(res) else "note", [v.policy]))
    if views:
        out += _reconcile(res, views[0])
    return out


def _reconcile(res: Any, view: PolicyView) -> list[Finding]:
    """One sentence when the score decomposition and the PID disagree on the dominant term."""
    dec = _terms(view.contribution)["decomposition"]
    pid = ((view.contribution.get("pid") or {}).get("pairs")) or {}
    out = []
    for pair, ent in pid.items():
        d = dec.get(pair)
        pred = ent.get("prediction") or {}
        if not d or not pred.get("overall"):
            continue
        a, b = pair.split("|")
        rename = {"unique_1": f"unique_{a}", "unique_2": f"unique_{b}"}
        o = d["overall"]
        score_dom = max(o, key=lambda k: _nan(o[k]) if not math.isnan(_nan(o[k])) else -math.inf)
        rows = [("all classes", score_dom, rename.get(pred["overall"]["dominant"], pred["overall"]["dominant"]))]
        names = _class_names(res, len(d["dominant"]))
        for i, name in enumerate(names):
            t = (pred.get("per_class") or {}).get(name)
            if t and d["dominant"][i] != "none":
                rows.append((name, d["dominant"][i], rename.get(t["dominant"], t["dominant"])))
        differ = [(n, s, p) for n, s, p in rows if s != p]
        if not differ:
            continue
        listed = ", ".join(f"{n} (score: {_term_label(s)}; PID: {_term_label(p)})" for n, s, p in differ)
        out.append(Finding("information", (
            f"Under {view.policy}, the score decomposition and the PID name different dominant terms for {listed}. "
            "They answer different questions: the score decomposition asks what can be recognised with which "
            "modalities; the PID asks which statistical dependence of the prediction each modality's own prediction "
            "shares, including agreeing on the frequent background. The class findings above follow the score "
            "decomposition."), {"pair": pair, "disagree": [n for n, _, _ in differ]}, "note", [view.policy]))
    return out


# --------------------------------------------------------------------------------------------
# retrained references
# --------------------------------------------------------------------------------------------
def _references(res: Any) -> list[Finding]:
    """``settings["references"]`` entries (:func:`.compare.attach_references`) as sentences."""
    out = []
    for ref in (res.settings or {}).get("references") or []:
        out.append(_reference_finding(res, ref))
    return out


def _ci(x: Any) -> tuple[float, float] | None:
    if not x or x[0] is None or x[1] is None or not all(math.isfinite(float(v)) for v in x):
        return None
    return float(x[0]), float(x[1])


def _reference_finding(res: Any, ref: Mapping[str, Any]) -> Finding:
    kept, removed = "+".join(ref["kept"]), "+".join(ref["removed"])
    have = _has_intervals(res)
    fused = Estimate(_nan(ref["fused"]), _ci(ref.get("fused_interval")), have)
    refv = Estimate(_nan(ref["score"]), _ci(ref.get("interval")), ref.get("interval") is not None)
    under = f" under {ref['policy']}" if ref.get("policy") else ""
    what = {"unimodal": f"a model retrained on {kept} alone",
            "modality_dropout": f"the same recipe trained with modality dropout, evaluated on {kept} alone{under}",
            "train_missing": f"the same recipe trained with {removed} always missing, evaluated on {kept}{under}"
            }.get(ref["kind"], ref["kind"])
    label = f"{what} ({ref['label']})"
    drops = []
    breaks: dict[str, str] = {}
    for p, dv in (ref.get("drops") or {}).items():
        e = Estimate(_nan(dv["value"]), _ci(dv.get("interval")), have)
        breaks[p] = e.at_least(1e-12)
        drops.append(f"{e.text()} under {p}")
    drop_txt = "; ".join(drops) or "not measured"
    if fused.ci is not None and refv.ci is not None:
        adds = "yes" if fused.ci[0] > refv.ci[1] else "worse" if fused.ci[1] < refv.ci[0] else "unresolved"
    else:
        adds = "yes" if fused.value > refv.value else "worse" if fused.value < refv.value else "unresolved"
    broke = [p for p, b in breaks.items() if b == "yes"]
    gap = f"{_pts(fused.value - refv.value)}"
    nums = f"fused {fused.text()}, reference {refv.text()}"
    mark = "" if (fused.ci is not None and refv.ci is not None) else _POINT
    if adds == "yes":
        beyond = ", more than their intervals" if not mark else ""
        text = (f"Learned to use both: the fused model beats {label} by {gap} points{beyond} ({nums}); removing "
                f"{removed} drops it by {drop_txt}.")
    elif adds == "worse":
        text = (f"The fused model does worse than {label} ({nums}): adding {removed} costs {_pts(-fused.value + refv.value)} "
                f"points; removing it drops the fused model by {drop_txt}.")
    elif broke:
        text = (f"Breaks when {removed} is removed under {_policy_list(broke)} (drop {drop_txt}), but {label} does "
                f"as well ({nums}, intervals overlap): the drop measures breakage, not what {removed} adds.")
    else:
        text = (f"What {removed} adds is not resolved with {_n(res)}: {nums} overlap, and removing it drops the "
                f"fused model by {drop_txt}.")
    status = "point" if mark else ("unresolved" if adds == "unresolved" and not broke else "holds")
    return Finding("references", text + mark, {**dict(ref), "adds": adds, "breaks_under": broke}, status,
                   list(breaks))


# --------------------------------------------------------------------------------------------
# what was measured
# --------------------------------------------------------------------------------------------
def _measurement(res: Any, views: Sequence[PolicyView]) -> list[Finding]:
    out = []
    s = res.settings or {}
    data = s.get("data") or {}
    if data.get("replaced"):
        out.append(Finding("measurement", f"Data: {data['replaced']}", dict(data)))
    if not _has_intervals(res):
        reps = (s.get("intervals") or {}).get("replicates")
        why = ("it was run with replicates=0" if reps == 0 else
               "its metrics.json was written before intervals existed" if reps is None else
               f"none of its metrics recorded intervals from the {reps} replicates")
        out.append(Finding("measurement", (
            f"This result carries no bootstrap intervals ({why}): the findings below judge point values against the "
            "thresholds, are marked 'point values, no interval', and are not supported by an uncertainty estimate; "
            "rerun fusionzoo interpret to get them."), {"intervals": False}))
    else:
        lvl = (s.get("intervals") or {}).get("level", 0.95)
        out.append(Finding("measurement", (
            f"Numbers in brackets are {100 * float(lvl):.0f}% bootstrap intervals over the {_n(res)}; a judgement is "
            "stated only when its interval clears the threshold."), {"intervals": True, "level": lvl}))
    if views:
        names = [v.policy for v in views]
        extra = "" if len(names) > 1 else " (the only removal policy measured; other policies can change them)"
        out.append(Finding("measurement", f"Contribution findings are evaluated under {_policy_list(names)}{extra}.",
                           {"policies": names}))
    return out


def _differs(a: Estimate, b: Estimate) -> str:
    """``"yes"`` when the intervals of ``a`` and ``b`` are disjoint, ``"no"`` when they overlap,
    by the point values without intervals."""
    if math.isnan(a.value) or math.isnan(b.value):
        return "unresolved"
    if a.ci is None or b.ci is None:
        return "unresolved" if (a.recorded or b.recorded) else ("yes" if a.value != b.value else "no")
    return "yes" if a.ci[1] < b.ci[0] or b.ci[1] < a.ci[0] else "no"


def _purification(res: Any) -> list[Finding]:
    """Per gate: what it keeps overall and of which classes least / most (the class difference
    stated when their intervals are disjoint); per stream: semantic variance before and after
    its gate; the contribution changes when the gates are forced open (stated when the paired
    difference's interval excludes 0)."""
    sec = getattr(res, "purification", None) or {}
    out: list[Finding] = []
    names = None
    for tap, g in (sec.get("gates") or {}).items():
        keep = _est(res, f"purification.gates.{tap}.keep", g.get("keep"))
        per = g.get("keep_per_class") or []
        names = names or _class_names(res, len(per))
        ests = [(names[k], _est(res, f"purification.gates.{tap}.keep_per_class.{k}", v))
                for k, v in enumerate(per) if v is not None]
        text = f"{tap} keeps {keep.text()}% of {g['stream']}"
        verdicts = [keep.at_least(0.0)]
        if len(ests) >= 2:
            lo_name, lo = min(ests, key=lambda e: e[1].value)
            hi_name, hi = max(ests, key=lambda e: e[1].value)
            v = _differs(lo, hi)
            if lo.value == hi.value and lo.ci is not None and lo.ci == hi.ci and lo.ci[0] == lo.ci[1]:
                text += ", every class alike"   # a degenerate interval: every resample agrees
                verdicts.append("yes")
            else:
                verdicts.append(v if v != "no" else "unresolved")
                text += (f"; least of class {lo_name} ({lo.text()}%), most of {hi_name} ({hi.text()}%)"
                         + ("" if v == "yes" else f": the class difference is not resolved with {_n(res)}"))
        sv = res.semantic_variance or {}
        before, after = sv.get(g["stream"]), sv.get(g["purified"])
        if before and after:
            b = _est(res, f"semantic_variance.{g['stream']}.sv", before.get("sv"))
            a = _est(res, f"semantic_variance.{g['purified']}.sv", after.get("sv"))
            d = _differs(a, b)
            way = ("raises" if a.value > b.value else "lowers") if d == "yes" else "does not resolvably change"
            text += f"; it {way} the semantic variance ({b.text()}% before, {a.text()}% after)"
        out.append(Finding("purification", text + _mark(res) + ".", {"tap": tap, "keep": keep.value},
                           _status(verdicts, res)))
    c = sec.get("contribution")
    if c:
        d = c["difference"]
        parts, verdicts = [], []
        items = [("the full model's " + str(c["gated"].get("metric", "score")), "full", d["full"])]
        items += [(f"{m}'s Shapley value", f"shapley.{m}", v) for m, v in d["shapley"].items()]
        items += [(f"the {p.replace('|', '-')} interaction", f"interaction.{p}", v) for p, v in d["interaction"].items()]
        for label, path, v in items:
            e = _est(res, f"purification.contribution.difference.{path}", v)
            # a change is stated when the paired difference's interval excludes 0; an interval of
            # exactly [0, 0] (every resample agrees: e.g. gates that keep everything) is no change
            none = e.value == 0 and (e.ci is None or e.ci[0] == e.ci[1] == 0) and not (e.ci is None and e.recorded)
            verdict = ("yes" if none else "unresolved" if math.isnan(e.value) or (e.ci is None and e.recorded)
                       or (e.ci is not None and e.ci[0] <= 0 <= e.ci[1]) else "yes")
            verdicts.append(verdict)
            parts.append(f"{label} unchanged" if none else f"{label} {e.text(sign=True)} points"
                         + ("" if verdict != "unresolved" else " (not resolved)"))
        out.append(Finding("purification", (
            f"With the gates as trained rather than forced open (keep all), under {c.get('policy')}: "
            + "; ".join(parts) + _mark(res) + "."), {"difference": d}, _status(verdicts, res), [c.get("policy")]))
    return out


def findings(res: Any) -> list[Finding]:
    """Every finding of one result, in :data:`KINDS` order (kinds without data are left out)."""
    views = policy_views(res) if res.contribution and res.contribution.get("coalitions") else []
    out: list[Finding] = _measurement(res, views)
    if views:
        out += _carriers(res, views)
        out += _interaction(res, views)
        out += _three_way(res, views)
    out += _references(res)
    out += _convergence(res)
    if res.contribution and res.contribution.get("shapley"):
        out += _underuse(res, views)
    out += _separability(res)
    out += _information(res, views)
    out += _purification(res)
    return sorted(out, key=lambda f: KINDS.index(f.kind))


def _thresholds_html() -> str:
    t = THRESHOLDS
    return ("<p class='thresholds'>Thresholds: a class is judged when its modalities add at least "
            f"{_pts(t['min_gain'])} metric points; its dominant term must be at least "
            f"{100 * t['dominant_share']:.0f}% of that gain; an interaction counts at |index| &ge; "
            f"{_pts(t['interaction'])} points; streams converge at debiased CKA &ge; {t['converge_cka']} (taps upstream "
            f"of fusion only); a modality is under-used below {100 * t['underused_share']:.0f}% of the Shapley total. "
            "A judgement is stated when the number's 95% interval clears its threshold, and withheld otherwise. "
            "Definitions: docs/interpret.md.</p>")


_STYLE = ("<style>.findings li{margin:0.25em 0}.findings td{text-align:left;vertical-align:top;font-size:0.88em;"
          "min-width:14em}.findings th{text-align:left;vertical-align:top}.thresholds{color:#555;font-size:0.88em}"
          ".findings .unresolved{color:#666}</style>")

_TITLES = {"measurement": "How these findings were measured", "carriers": "Which modality carries which classes",
           "interaction": "Where modalities interact", "references": "What a modality adds (retrained references)",
           "convergence": "Where the streams converge", "underuse": "What is under-used",
           "separability": "Class separability along each stream", "information": "Information in the predictions",
           "purification": "What purification removes"}


def _li(f: Finding) -> str:
    cls = " class='unresolved'" if f.status == "unresolved" else ""
    return f"<li{cls}>{html.escape(f.text)}</li>"


def findings_html(res: Any) -> str:
    """The findings section that opens ``report.html``."""
    items = findings(res)
    parts = [f"{_STYLE}<section class='findings'><h2>Findings</h2>"]
    for kind in KINDS:
        these = [f for f in items if f.kind == kind]
        if these:
            parts.append(f"<h3>{_TITLES[kind]}</h3><ul>" + "".join(_li(f) for f in these) + "</ul>")
    parts.append(_thresholds_html() + "</section>")
    return "".join(parts)


def seed_verdicts(labels: Sequence[str], results: Sequence[Any]) -> list[Table]:
    """Per recipe with several seeds (:func:`.compare.seed_groups`): each class's carrier verdict
    (interval-aware, under the main removal policy) in every seed, and whether it survives the
    seeds (the same resolved verdict in all of them)."""
    by_label = dict(zip(labels, results))
    rows = []
    for g in seed_groups(labels, results):
        if g["n"] < 2:
            continue
        per_member = []
        for lab in g["members"]:
            r = by_label[lab]
            views = policy_views(r)
            if not views:
                continue
            v = views[0]
            per_member.append({(pair, cls): verdict.label for pair, d in _terms(v.contribution)["decomposition"].items()
                               for cls, verdict in _carrier_verdicts(r, v, pair, d).items()})
        keys = list(dict.fromkeys(k for m in per_member for k in m))
        for pair, cls in keys:
            seq = [m.get((pair, cls), "absent") for m in per_member]
            counts = {lab_: seq.count(lab_) for lab_ in dict.fromkeys(seq)}
            text = ", ".join(f"{_term_label(k)} {c}" for k, c in counts.items())
            first = seq[0]
            survives = len(counts) == 1 and first not in ("unresolved", "not_judged", "absent")
            rows.append([g["label"], pair.replace("|", "-"), cls, f"{text} (of {len(seq)})",
                         _term_label(first) if survives else "no"])
    if not rows:
        return []
    return [("Carrier verdict per seed (dominant term whose interval clears the threshold, main removal policy)",
             ["recipe", "pair", "class", "verdicts over seeds", "survives the seeds"], rows)]


def _html_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<h3>{html.escape(title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def comparison_findings_html(labels: Sequence[str], results: Sequence[Any],
                             extra_tables: Callable[[Sequence[str], Sequence[Any]], Sequence[Table]] | None = None
                             ) -> str:
    """The findings of several results side by side: one row per kind, one column per model.

    ``extra_tables`` (default :func:`.compare.comparison_extra_tables`: headline numbers with
    their intervals, seed groups with mean +- spread, differences against the seed spread) are
    appended as HTML tables."""
    per = [findings(r) for r in with_references(labels, results)]
    head = "".join(f"<th>{html.escape(lab)} ({html.escape(str(r.fusion))})</th>" for lab, r in zip(labels, results))
    rows = []
    for kind in KINDS:
        cells = ["<br>".join(html.escape(f.text) for f in fs if f.kind == kind) or "n/a" for fs in per]
        if len(cells) > 1 and len(set(cells)) == 1:  # the same for every model: said once, across the row
            rows.append(f"<tr><th>{_TITLES[kind]}</th><td colspan='{len(cells)}'>{cells[0]}</td></tr>")
            continue
        rows.append(f"<tr><th>{_TITLES[kind]}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    tables = list(extra_tables(labels, results) if extra_tables is not None
                  else comparison_extra_tables(labels, results)) + seed_verdicts(labels, results)
    return (f"{_STYLE}<section class='findings'><h2>Findings</h2><table class='findings'><thead><tr><th></th>" + head
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + _thresholds_html()
            + "".join(_html_table(*t) for t in tables) + "</section>")




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
        terms = _terms(r.contribution)
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
        if t and _STAGE.match(t["stage"]) and tap == f"{t['stream']}.{t['stage']}" and _sv_value(v, "sv") is not None:
            sv.setdefault(t["stream"], {})[t["stage"]] = _sv_value(v, "sv")
    return cka, sv, final


def plot_evolution(labels: Sequence[str], results: Sequence[Any], path: str | Path) -> Path | None:
    """Per stage and stream: CKA to the final representation (top) and semantic variance (bottom),
    one column per model, shared y axes. ``None`` when no result has either."""
    series = [_evolution_series(r) for r in results]
    if not any(c or s for c, s, _ in series):
        return None
    n = len(results)
    # matplotlib's object API (no pyplot state, no global backend switch), as in report.py.
    fig = Figure(figsize=(max(3.2 * n + 0.8, 6.5), 5.8))
    axes = fig.subplots(2, n, sharey="row", squeeze=False)
    for j, (lab, (cka, sv, final)) in enumerate(zip(labels, series)):
        for i, (data, ylabel) in enumerate(((cka, "debiased CKA to the final representation"),
                                            (sv, "semantic variance"))):
            ax = axes[i][j]
            for stream, d in data.items():
                stages = sorted(d, key=_stage_key)
                ax.plot([_stage_key(s) for s in stages], [d[s] for s in stages], "o-", label=stream,
                        color=stream_color(stream))
            ax.set_xticks([1, 2, 3, 4])
            ax.set_xlabel("stage")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(f"{lab}\n({results[j].fusion}; final: {final or 'none'})", fontsize=9)
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
