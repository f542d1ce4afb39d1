"""Partial information decomposition (PID) of a model's predictions into redundancy, uniqueness and synergy.

Which information about the model's prediction ``Y`` do two modalities give redundantly, which
only one of them, and which only both together? Following Liang et al., "Quantifying &
Modeling Multimodal Interactions: An Information Decomposition Framework", NeurIPS 2023, the
modalities are made discrete and the PID of the discrete joint distribution ``p(x1, x2, y)`` is
estimated with the BROJA definition (Bertschinger, Rauh, Olbrich, Jost, Ay, "Quantifying
Unique Information", Entropy 2014), which is what Liang et al.'s CVX estimator computes:

- ``Q = {q : q(x1, y) = p(x1, y), q(x2, y) = p(x2, y)}`` (the distributions that keep each
  modality's own relation to ``Y``);
- ``q* = argmin_{q in Q} I_q(Y; X1, X2)``; the problem is convex;
- redundancy ``R = I(Y; X1) + I(Y; X2) - I_q*(Y; X1, X2)``, uniqueness
  ``U1 = I(Y; X1) - R``, ``U2 = I(Y; X2) - R``, synergy ``S = I_p(Y; X1, X2) - I_q*(Y; X1, X2)``;
  ``R + U1 + U2 + S = I_p(Y; X1, X2)``; all in bits, all >= 0 at the optimum.

Solver (:func:`broja_pid`): mirror descent on ``q`` (the gradient of ``I_q(Y; X1, X2)`` is
``log q(y | x1, x2) - log p(y)``) with an exact-in-the-limit KL projection onto ``Q`` by
Sinkhorn scaling, which decouples into one matrix scaling per value of ``y``; plain numpy, no
solver dependency (Liang et al. use CVXPY). The discrete sources are the model's own
unimodal predictions: ``X_m`` is the class predicted with only modality ``m`` kept (the
coalition ``{m}`` of :mod:`.contribution`, evaluated anyway by :func:`fusionzoo.interpret.run`),
the analogue of Liang et al.'s clustering of each modality's features into discrete values;
``Y`` is the class the model predicts with every modality (``target="prediction"``) or the
label (``target="label"``), over the labelled pixels. Per class ``k`` the target is the
one-vs-rest indicator ``[Y = k]`` (sources unchanged).

:class:`PredictionJoint` streams the ``K x K x K`` count tensors; docs/interpret.md
("Interactions, redundancy and synergy") says what the decomposition can and cannot tell.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..tasks import class_map

__all__ = ["PID_KEYS", "REPLICATE_BUDGET", "TERMS", "PredictionJoint", "broja_pid", "dominant_term", "mutual_information", "pid_tables"]

TERMS = ("redundancy", "unique_1", "unique_2", "synergy")
PID_KEYS = (*TERMS, "mi", "mi_1", "mi_2")
# memory allowed for the bootstrap replicates of the K^3 counts (K = 40 would need ~200 MB a pair)
REPLICATE_BUDGET = 64 * 2**20
# mirror-descent steps of a replicate solve: converged replicates stop earlier; the few that do not
# (near-degenerate joints) end within ~1e-3 bits or, below -1e-3, as NaN (broja_pid)
REPLICATE_ITER = 100


def mutual_information(pxy: np.ndarray) -> float:
    """``I(X; Y)`` in bits of a 2-d joint distribution ``pxy[x, y]`` (normalized here)."""
    pxy = np.asarray(pxy, dtype=np.float64)
    total = pxy.sum()
    return float(_mi_batch(pxy[None] / total)[0]) if total > 0 else 0.0


def _mi_batch(pxy: np.ndarray) -> np.ndarray:
    """``I(X; Y)`` in bits of ``(N, nx, ny)`` joints, each summing to 1 (or 0: then 0)."""
    def h(p: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axes)

    return np.maximum(h(pxy.sum(2), (1,)) + h(pxy.sum(1), (1,)) - h(pxy, (1, 2)), 0.0)


def broja_pid(p: np.ndarray, max_iter: int = 500, tol: float = 1e-8, sinkhorn_iter: int = 10) -> dict[str, Any]:
    """BROJA partial information decomposition of a discrete joint ``p[x1, x2, y]``.

    Args:
        p: counts or probabilities, shape ``(n1, n2, ny)``, non-negative; or ``(N, n1, n2, ny)``
            for ``N`` joints solved together (vectorised: bootstrap replicates).
        max_iter: mirror-descent steps.
        tol: stop when ``I_q(Y; X1, X2)`` changes by less than this (bits) between steps (for
            every joint of a batch).
        sinkhorn_iter: scaling sweeps per projection. With the defaults the AND gate comes out
            at R = 0.3113, S = 0.5000 bits (exact: 0.3113, 0.5) in about 0.5 s; optima on the
            boundary of ``Q`` are approached slowly, so expect errors of ~1e-4 bits.

    Returns:
        ``{"redundancy", "unique_1", "unique_2", "synergy", "mi", "mi_1", "mi_2"}`` in bits
        (``mi = I(Y; X1, X2)``, ``mi_m = I(Y; X_m)``), floats, or ``(N,)`` arrays for a batch;
        tiny negative values from the iterative solver (> -1e-3 bits) are clipped to 0.

    Raises:
        ArithmeticError: a term below -1e-3 bits (not converged) for a single joint; in a batch
            that joint's terms are NaN instead.

    Example (XOR is pure synergy):
        >>> p = np.zeros((2, 2, 2)); p[0, 0, 0] = p[1, 1, 0] = p[0, 1, 1] = p[1, 0, 1] = 0.25
        >>> round(broja_pid(p)["synergy"], 3)
        1.0
    """
    p = np.asarray(p, dtype=np.float64)
    single = p.ndim == 3
    if p.ndim not in (3, 4) or (p < 0).any():
        raise ValueError(f"broja_pid needs a non-negative (n1, n2, ny) or (N, n1, n2, ny) array, got shape {p.shape}")
    p = p[None] if single else p
    total = p.sum((1, 2, 3), keepdims=True)
    p = p / np.where(total > 0, total, 1.0)   # an all-zero joint stays zero: every term 0
    a, b = p.sum(2), p.sum(1)                 # p(x1, y), p(x2, y): (N, n1, ny), (N, n2, ny)
    py = p.sum((1, 2))
    safe_py = np.where(py > 0, py, 1.0)[:, None, None, :]
    # start at the conditional-independence coupling q(x1, x2, y) = p(x1, y) p(x2, y) / p(y), in Q
    q = a[:, :, None, :] * b[:, None, :, :] / safe_py
    support = q > 0                           # q stays 0 outside the support of this product

    def i_joint(q: np.ndarray) -> np.ndarray:  # I(Y; X1, X2)
        return _mi_batch(q.reshape(q.shape[0], -1, q.shape[3]))

    def ratio(target: np.ndarray, have: np.ndarray) -> np.ndarray:
        return np.where(have > 0, target / np.where(have > 0, have, 1.0), 0.0)

    prev = i_joint(q)
    for _ in range(max_iter):
        qx = q.sum(3, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            grad = np.where(support, np.log(np.where(support, q, 1.0)) - np.log(np.where(qx > 0, qx, 1.0))
                            - np.log(safe_py), 0.0)
        q = q * np.exp(-np.clip(grad, -50, 50))
        for _ in range(sinkhorn_iter):         # KL projection onto Q: per y, match both marginals
            q = q * ratio(a, q.sum(2))[:, :, None, :]
            q = q * ratio(b, q.sum(1))[:, None, :, :]
        cur = i_joint(q)
        if np.all(np.abs(prev - cur) < tol):
            break
        prev = cur
    i_p, i_1, i_2 = i_joint(p), _mi_batch(a), _mi_batch(b)
    i_q = np.minimum(i_joint(q), i_p)          # the minimum over Q is at most I_p (p is in Q)
    out = {"redundancy": i_1 + i_2 - i_q, "unique_1": i_q - i_2, "unique_2": i_q - i_1, "synergy": i_p - i_q}
    bad = np.zeros(p.shape[0], dtype=bool)
    for k, v in out.items():
        if single and v[0] < -1e-3:
            raise ArithmeticError(f"BROJA term {k} = {v[0]:.3g} bits < 0: the solver did not converge; raise max_iter")
        bad |= v < -1e-3
    out = {k: np.maximum(v, 0.0) for k, v in out.items()}
    out.update(mi=i_p, mi_1=i_1, mi_2=i_2)
    if single:
        return {k: float(v[0]) for k, v in out.items()}
    return {k: np.where(bad, math.nan, v) for k, v in out.items()}


def pid_tables(counts: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    """PID of ``Y`` overall and of each one-vs-rest indicator ``[Y = k]``.

    Args:
        counts: ``(K, K, K)`` counts ``[x1, x2, y]``.
        names: class names (default ``"0".."K-1"``).

    Returns:
        ``{"overall": terms, "per_class": {name: terms}}``; terms as :func:`broja_pid`, plus
        ``"dominant"`` (the largest of redundancy, unique_1, unique_2, synergy) and
        ``"pixels"`` (of class ``k`` in the target). Classes absent from the target are left out.
    """
    counts = np.asarray(counts, dtype=np.float64)
    k = counts.shape[2]
    names = list(names) if names is not None else [str(i) for i in range(k)]
    overall = broja_pid(counts)
    overall["dominant"] = dominant_term(overall)
    present = [c for c in range(k) if counts[:, :, c].sum() > 0]
    per_class = {}
    if present:  # one-vs-rest joints of every present class, solved together
        binary = np.stack([np.stack([counts.sum(2) - counts[:, :, c], counts[:, :, c]], axis=2) for c in present])
        solved = broja_pid(binary)
        for i, c in enumerate(present):
            t = {key: float(v[i]) for key, v in solved.items()}
            t["dominant"] = dominant_term(t)
            t["pixels"] = int(counts[:, :, c].sum())
            per_class[names[c]] = t
    return {"overall": overall, "per_class": per_class}


class PredictionJoint:
    """Streams ``counts[x_a, x_b, y]`` for every pair of modalities from coalition passes.

    Feed it every coalition pass of a batch, full set first (the order of
    :meth:`.contribution.ContributionAccumulator.coalitions`): it is an observer of
    :class:`~.contribution.ContributionAccumulator` (``acc.observers.append(joint)``), so it
    needs no forward pass of its own. Segmentation only (pixels are the units).

    Args:
        modalities: the model's modalities (>= 2).
        num_classes: ``K``.
        ignore_index: unlabelled pixels are skipped.
    """

    targets = ("prediction", "label")

    def __init__(self, modalities: Sequence[str], num_classes: int, ignore_index: int = 255,
                 replicates: int = 0) -> None:
        if len(modalities) < 2:
            raise ValueError(f"a decomposition needs >= 2 modalities, got {list(modalities)}")
        self.modalities, self.k, self.ignore_index = list(modalities), int(num_classes), int(ignore_index)
        self.pairs = list(itertools.combinations(self.modalities, 2))
        self.counts = {(a, b, t): torch.zeros(self.k ** 3, dtype=torch.int64) for a, b in self.pairs
                       for t in self.targets}
        # bootstrap replicates of the counts, (R, K^3) float64 each, when they fit REPLICATE_BUDGET
        self.replicates = int(replicates) if self.replicate_bytes(len(modalities), num_classes, replicates) \
            <= REPLICATE_BUDGET else 0
        self.rep_counts = ({key: torch.zeros(self.replicates, self.k ** 3, dtype=torch.float64) for key in self.counts}
                           if self.replicates else {})
        self._cache: dict[frozenset, torch.Tensor] = {}

    @classmethod
    def replicate_bytes(cls, num_modalities: int, num_classes: int, replicates: int) -> int:
        """Memory of the replicate counts: ``R K^3`` float64 per pair and target."""
        pairs = num_modalities * (num_modalities - 1) // 2
        return 8 * replicates * num_classes ** 3 * pairs * len(cls.targets)

    def add(self, subset: frozenset, logits: torch.Tensor, mask: torch.Tensor,
            weights: torch.Tensor | None = None) -> None:
        """One coalition pass: logits ``(B, K, H, W)``, mask ``(B, H, W)`` and, with replicates,
        the batch's image weights ``(R, B)``."""
        if len(subset) == len(self.modalities):
            self._cache = {}  # a new batch starts with its full pass
        if len(subset) not in (1, len(self.modalities)):
            return
        self._cache[frozenset(subset)] = class_map(logits).detach()
        full = frozenset(self.modalities)
        if full in self._cache and all(frozenset([m]) in self._cache for m in self.modalities):
            valid = mask != self.ignore_index
            y = {"prediction": self._cache[full][valid], "label": mask[valid].long()}
            if y["label"].numel() and int(y["label"].max()) >= self.k:
                raise ValueError(f"mask holds label {int(y['label'].max())} >= num_classes {self.k} "
                                 f"(ignore index {self.ignore_index})")
            # image of every valid pixel, for the replicates' per-image counts
            image = torch.arange(mask.shape[0], device=mask.device)[:, None, None].expand_as(mask)[valid]
            k3, b = self.k ** 3, mask.shape[0]
            for a, bm in self.pairs:
                xa, xb = self._cache[frozenset([a])][valid], self._cache[frozenset([bm])][valid]
                for t in self.targets:
                    idx = (xa * self.k + xb) * self.k + y[t]
                    self.counts[(a, bm, t)] += torch.bincount(idx, minlength=k3).cpu()
                    if self.replicates:
                        if weights is None:
                            raise ValueError("PredictionJoint keeps bootstrap replicates: pass the batch's (R, B) "
                                             "image weights")
                        per_image = torch.bincount(image * k3 + idx, minlength=b * k3).reshape(b, k3).double()
                        self.rep_counts[(a, bm, t)] += (weights.to(per_image) @ per_image).cpu()
            self._cache = {}

    def result(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"estimator", "unit", "pairs": {"a|b": {target: pid_tables(...)}}}``."""
        out: dict[str, Any] = {"estimator": "BROJA (Bertschinger et al. 2014), as Liang et al. 2023",
                               "unit": "bits", "sources": "predictions with one modality kept", "pairs": {}}
        for a, b in self.pairs:
            entry = {}
            for t in self.targets:
                c = self.counts[(a, b, t)].reshape(self.k, self.k, self.k).numpy()
                if c.sum() == 0:
                    continue
                entry[t] = pid_tables(c, class_names)
            out["pairs"][f"{a}|{b}"] = entry
        return out

    def replicate_values(self) -> dict[str, Any] | None:
        """Bootstrap replicates of :meth:`result`'s overall terms: ``{"pairs": {"a|b": {target:
        {"overall": {term: (R,)}}}}}`` (None without replicates), every replicate solved in one
        vectorised :func:`broja_pid` batch. Per-class terms carry none: their ``R K`` one-vs-rest
        solves cost about 1 s of CPU per pair and target even on tiny data, more than the rest of
        a small run."""
        if not self.replicates:
            return None
        out: dict[str, Any] = {"pairs": {}}
        for a, b in self.pairs:
            entry = {}
            for t in self.targets:
                if self.counts[(a, b, t)].sum() == 0:
                    continue
                c = self.rep_counts[(a, b, t)].reshape(-1, self.k, self.k, self.k).numpy()
                # all replicates at once (vectorised); 1e-6 bits is far below their spread
                solved = broja_pid(c, max_iter=REPLICATE_ITER, tol=1e-6)
                ok = c.sum((1, 2, 3)) > 0
                entry[t] = {"overall": {key: np.where(ok, solved[key], math.nan) for key in PID_KEYS}}
            out["pairs"][f"{a}|{b}"] = entry
        return out


def dominant_term(terms: Mapping[str, float], names: Sequence[str] = TERMS) -> str:
    """The largest of the given terms (ties: the first in ``names``); NaN terms are skipped."""
    vals = [(terms.get(n), n) for n in names]
    vals = [(v, n) for v, n in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "none"
    return max(vals, key=lambda vn: vn[0])[1]
