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

- **Harsanyi dividend** (:func:`harsanyi_dividend`) of three or more modalities: the part of the
  score that only all of them together explain, ``d(N) = sum_{S subset of N} (-1)^(|N| - |S|) v(S)``.

:func:`game_terms` computes all of them from any value function whose values are arrays, so the
same code gives point values and bootstrap replicates (:mod:`.intervals`). The
information-theoretic decomposition of the predictions is in :mod:`.pid`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .contribution import contribution_keys, plain
from .pid import dominant_term

__all__ = ["SCORE_TERMS", "coalition_game", "coalition_terms", "game_terms", "harsanyi_dividend", "interaction_index",
           "score_decomposition"]

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


def harsanyi_dividend(players: Sequence[str], value: Callable[[frozenset[str]], Any]) -> Any:
    """Harsanyi dividend of the grand coalition of ``players`` (Harsanyi, "A simplified bargaining
    model for the n-person cooperative game", Int. Econ. Rev. 1963):
    ``d(N) = sum_{S subset of N} (-1)^(|N| - |S|) v(S)``, the part of ``v(N)`` that no smaller
    coalition explains. For three modalities it is the 3-way interaction
    ``v(abc) - v(ab) - v(ac) - v(bc) + v(a) + v(b) + v(c) - v(none)``, and the pairwise index
    of the 3-player game is ``I_ab = d(ab) + d(abc) / 2``.

    Args:
        players: the players of the coalition (any number >= 1).
        value: ``v(S)``; numbers or equally shaped arrays (per class, or bootstrap replicates).

    Example:
        >>> harsanyi_dividend(["a", "b", "c"], lambda s: float(len(s) == 3))   # only all three
        1.0
        >>> harsanyi_dividend(["a", "b", "c"], lambda s: float(len(s) >= 2))   # any two suffice
        -2.0
    """
    players = list(players)
    n = len(players)
    total = 0.0
    for k in range(n + 1):
        for combo in itertools.combinations(players, k):
            total = total + (-1) ** (n - k) * np.asarray(value(frozenset(combo)), dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    return float(total) if total.ndim == 0 else total


def game_terms(mods: Sequence[str], value: Callable[[frozenset[str], bool], Any]) -> dict[str, Any]:
    """Interaction index, score decomposition and (``M >= 3``) Harsanyi dividends of a game.

    One piece of code for point values and bootstrap replicates: ``value(S, per_class)`` returns
    the coalition's score as an array, ``()`` / ``(K,)`` for a point estimate, ``(R,)`` /
    ``(R, K)`` for ``R`` replicates; every term comes back in the same shape (arrays).

    Returns:
        ``{"interaction": {"a|b": {"value", "per_class"}}, "decomposition": {"a|b": {"a", "b",
        "overall": {term: v}, "per_class": {term: v}}}, "harsanyi": {"a|b|c": {"value",
        "per_class"}}}``; ``harsanyi`` holds the dividend of every coalition of three or more
        modalities (empty for ``M = 2``).
    """
    mods = list(mods)
    out: dict[str, Any] = {"interaction": {}, "decomposition": {}, "harsanyi": {}}
    if len(mods) < 2:
        return out
    overall = interaction_index(mods, lambda s: value(s, False))
    per_class = interaction_index(mods, lambda s: value(s, True))
    for a, b in itertools.combinations(mods, 2):
        out["interaction"][f"{a}|{b}"] = {"value": overall[(a, b)], "per_class": per_class[(a, b)]}
        rename = {"redundancy": "redundancy", "unique_a": f"unique_{a}", "unique_b": f"unique_{b}",
                  "synergy": "synergy"}
        ent: dict[str, Any] = {"a": a, "b": b}
        for per in (False, True):
            terms = score_decomposition(*(value(frozenset(s), per) for s in ((a, b), (a,), (b,), ())))
            ent["per_class" if per else "overall"] = {rename[k]: x for k, x in terms.items()}
        out["decomposition"][f"{a}|{b}"] = ent
    for r in range(3, len(mods) + 1):
        for group in itertools.combinations(mods, r):
            out["harsanyi"]["|".join(group)] = {
                "value": harsanyi_dividend(group, lambda s: value(s, False)),
                "per_class": harsanyi_dividend(group, lambda s: value(s, True))}
    return out


def _coalition(coalitions: Mapping[str, Any], members: Sequence[str], order: Sequence[str]) -> Mapping[str, Any]:
    key = "+".join(m for m in order if m in members) or "none"
    if key not in coalitions:
        raise KeyError(f"contribution has no coalition {key!r}; it has {sorted(coalitions)}")
    return coalitions[key]


def coalition_terms(contribution: Mapping[str, Any]) -> dict[str, Any]:
    """Interaction index, score decomposition and Harsanyi dividends from a contribution dict.

    Args:
        contribution: :meth:`.contribution.ContributionResult.to_dict` output, or the
            ``contribution`` of a saved ``metrics.json`` (nulls read as NaN).

    Returns:
        :func:`game_terms` as floats and lists, in the contribution's metric (fractions: mIoU /
        AP), plus per pair ``dominant``: the largest term of each class (``"none"`` where the
        class is absent); ``unique_a`` / ``unique_b`` are named after the pair's modalities
        (``unique_rgb``...).
    """
    out = plain(game_terms(*coalition_game(contribution)))
    for ent in out["decomposition"].values():
        names = list(ent["per_class"])
        ent["dominant"] = [dominant_term({t: ent["per_class"][t][c] for t in names}, names)
                           for c in range(len(ent["per_class"]["redundancy"]))]
    return out


def coalition_game(contribution: Mapping[str, Any]) -> tuple[list[str], Callable[[frozenset, bool], np.ndarray]]:
    """``(modalities, value)`` of a contribution dict for :func:`game_terms`: ``value(S,
    per_class)`` is coalition ``S``'s score as an array (nulls as NaN). Coalition entries may hold
    numbers and lists (a result) or ``(R,)`` / ``(R, K)`` arrays (bootstrap replicates)."""
    mods = list(contribution["modalities"])
    _, vk, ck = contribution_keys(contribution)
    coal = contribution["coalitions"]

    def value(s: frozenset, per_class: bool) -> np.ndarray:
        x = _coalition(coal, list(s), mods)[ck if per_class else vk]
        if isinstance(x, np.ndarray):
            return x
        return np.array([math.nan if v is None else v for v in x] if per_class else
                        (math.nan if x is None else x), dtype=np.float64)

    return mods, value
