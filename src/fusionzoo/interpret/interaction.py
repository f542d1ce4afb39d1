"""Pairwise modality interaction and the redundancy / uniqueness / synergy split of the task score.

Shapley values split any synergy evenly between the players, so they cannot tell "needs both"
from "either will do" (for two modalities with ``v({rgb}) = v({depth})`` they are always
equal). Two quantities that can, both computed from the coalition table
(:attr:`.contribution.ContributionResult.coalitions`) that the contribution pass evaluates
anyway, so they cost no forward pass:

- **Shapley interaction index** (Grabisch and Roubens, "An axiomatic approach to the concept of
  interaction among players in cooperative games", Int. J. Game Theory 1999) of players ``i, j``
  among ``M``:
  ``I_ij = sum_{S subset of N - {i, j}} |S|! (M - |S| - 2)! / (M - 1)! * (v(S+ij) - v(S+i) - v(S+j) + v(S))``;
  for two modalities ``I = v(all) - v(rgb) - v(depth) + v(none)``. Positive: the pair achieves
  more together than the sum of what each adds alone (synergy outweighs redundancy); negative:
  each alone already achieves much of it (redundancy). Per class and overall, in the task's
  metric (IoU points for segmentation, AP for detection).
- **Score decomposition** of the gain ``v(ab) - v(none)`` of a pair on the redundancy lattice of
  Williams and Beer ("Nonnegative Decomposition of Multivariate Information", 2010), with the
  minimum as redundancy (as Barrett's MMI PID, Phys. Rev. E 2015), applied to the task score
  instead of mutual information: with gains ``g_m = v({m}) - v(none)``,
  ``R = min(g_a, g_b)`` (achieved by either alone), ``U_a = g_a - R``, ``U_b = g_b - R``
  (achieved by one alone beyond that) and ``S = v(ab) - v(none) - max(g_a, g_b)`` (achieved only
  together). ``R + U_a + U_b + S = v(ab) - v(none)``, at most one ``U`` is non-zero, ``U >= 0``;
  ``R < 0`` means a modality alone scores below no modality at all, ``S < 0`` that adding the
  second modality hurts the best one (interference). The Shapley value is
  ``phi_a = U_a + R / 2 + S / 2`` and the interaction index ``I = S - R``: the decomposition is
  what Shapley values average away. For ``M > 2`` each pair is decomposed in the game restricted
  to coalitions within the pair (the other modalities removed).

The information-theoretic decomposition of the predictions is in :mod:`.pid`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .contribution import contribution_keys

__all__ = ["SCORE_TERMS", "coalition_terms", "interaction_index", "score_decomposition"]

SCORE_TERMS = ("redundancy", "unique_a", "unique_b", "synergy")


def interaction_index(players: Sequence[str], value: Callable[[frozenset[str]], Any]) -> dict[tuple[str, str], Any]:
    """Exact pairwise Shapley interaction index of every pair of players.

    Args:
        players: ``M >= 2`` distinct players (modalities), ``M <= 10``.
        value: ``v(S)`` for a frozenset ``S``; a number or an array (per-class values).

    Returns:
        ``(i, j) -> I_ij`` for ``i`` before ``j`` in ``players`` (float or ``np.ndarray``).

    Example:
        >>> interaction_index(["a", "b"], lambda s: float(len(s) == 2))   # pure synergy
        {('a', 'b'): 1.0}
        >>> interaction_index(["a", "b"], lambda s: float(len(s) >= 1))   # either suffices
        {('a', 'b'): -1.0}
    """
    players = list(players)
    m = len(players)
    if len(set(players)) != m or not 2 <= m <= 10:
        raise ValueError(f"the interaction index needs 2..10 distinct players, got {players}")
    cache: dict[frozenset, np.ndarray] = {}

    def v(s: frozenset) -> np.ndarray:
        if s not in cache:
            cache[s] = np.asarray(value(s), dtype=np.float64)
        return cache[s]

    out: dict[tuple[str, str], Any] = {}
    for i, j in itertools.combinations(players, 2):
        others = [p for p in players if p not in (i, j)]
        total = 0.0
        for k in range(len(others) + 1):
            w = math.factorial(k) * math.factorial(m - k - 2) / math.factorial(m - 1)
            for combo in itertools.combinations(others, k):
                s = frozenset(combo)
                total = total + w * (v(s | {i, j}) - v(s | {i}) - v(s | {j}) + v(s))
        total = np.asarray(total, dtype=np.float64)
        out[(i, j)] = float(total) if total.ndim == 0 else total
    return out


def score_decomposition(v_ab: Any, v_a: Any, v_b: Any, v_none: Any) -> dict[str, Any]:
    """Redundancy, uniqueness and synergy of a pair's score gain (module docstring).

    Arguments are numbers or equally shaped arrays (per-class scores; NaN propagates).

    Returns:
        ``{"redundancy", "unique_a", "unique_b", "synergy"}``, floats or arrays.

    Example:
        >>> score_decomposition(0.9, 0.0, 0.0, 0.0)["synergy"]      # needs both
        0.9
        >>> score_decomposition(0.9, 0.9, 0.9, 0.0)["redundancy"]   # either suffices
        0.9
    """
    v_ab, v_a, v_b, v0 = (np.asarray(x, dtype=np.float64) for x in (v_ab, v_a, v_b, v_none))
    g_a, g_b = v_a - v0, v_b - v0
    r = np.minimum(g_a, g_b)
    out = {"redundancy": r, "unique_a": g_a - r, "unique_b": g_b - r, "synergy": v_ab - v0 - np.maximum(g_a, g_b)}
    return {k: (float(x) if x.ndim == 0 else x) for k, x in out.items()}


def _coalition(coalitions: Mapping[str, Any], members: Sequence[str], order: Sequence[str]) -> Mapping[str, Any]:
    key = "+".join(m for m in order if m in members) or "none"
    if key not in coalitions:
        raise KeyError(f"contribution has no coalition {key!r}; it has {sorted(coalitions)}")
    return coalitions[key]


def _nan_list(x: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64)]


def coalition_terms(contribution: Mapping[str, Any]) -> dict[str, Any]:
    """Interaction index and score decomposition of every modality pair, from a contribution dict.

    Args:
        contribution: :meth:`.contribution.ContributionResult.to_dict` output, or the
            ``contribution`` of a saved ``metrics.json`` (nulls read as NaN).

    Returns:
        ``{"interaction": {"a|b": {"value", "per_class"}}, "decomposition": {"a|b": {"a", "b",
        "overall": {term: v}, "per_class": {term: [...]}, "dominant": [term per class]}}}`` in the
        contribution's metric (fractions: mIoU / AP). ``dominant`` is the largest term of each
        class (``"none"`` where the class is absent); ``unique_a`` / ``unique_b`` are named after
        the pair's modalities in the output (``unique_rgb``...).
    """
    mods = list(contribution["modalities"])
    if len(mods) < 2:
        return {"interaction": {}, "decomposition": {}}
    _, vk, ck = contribution_keys(contribution)
    coal = contribution["coalitions"]

    def num(x: Any) -> float:
        return math.nan if x is None else float(x)

    def value(s: frozenset, per_class: bool) -> Any:
        entry = _coalition(coal, list(s), mods)
        return np.array([num(x) for x in entry[ck]]) if per_class else num(entry[vk])

    overall = interaction_index(mods, lambda s: value(s, False))
    per_class = interaction_index(mods, lambda s: value(s, True))
    out: dict[str, Any] = {"interaction": {}, "decomposition": {}}
    for a, b in itertools.combinations(mods, 2):
        pair = f"{a}|{b}"
        out["interaction"][pair] = {"value": overall[(a, b)], "per_class": _nan_list(per_class[(a, b)])}
        rename = {"redundancy": "redundancy", "unique_a": f"unique_{a}", "unique_b": f"unique_{b}",
                  "synergy": "synergy"}
        ent = {}
        for per in (False, True):
            vs = [value(frozenset(s), per) for s in ((a, b), (a,), (b,), ())]
            terms = score_decomposition(*vs)
            ent["per_class" if per else "overall"] = {rename[k]: (_nan_list(x) if per else x) for k, x in terms.items()}
        names = list(ent["per_class"])
        n_cls = len(ent["per_class"]["redundancy"])
        dom = []
        for c in range(n_cls):
            vals = [(ent["per_class"][t][c], t) for t in names]
            vals = [(x, t) for x, t in vals if not math.isnan(x)]
            dom.append(max(vals, key=lambda xt: xt[0])[1] if vals else "none")
        out["decomposition"][pair] = {"a": a, "b": b, **ent, "dominant": dom}
    return out
