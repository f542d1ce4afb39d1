"""Linear centered kernel alignment (CKA) between two sets of features of the same examples.

Three estimators, all for the linear kernel ``K = X X^T``:

1. **Exact, in memory** (:func:`linear_cka`, :func:`cka_from_gram`): Kornblith, Norouzi, Lee,
   Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019. The *biased*
   value is ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``;
   the *debiased* value replaces each HSIC by the unbiased estimator of Song, Smola, Gretton,
   Bedo, Borgwardt, "Feature Selection via Dependence Maximization", JMLR 2012 (eq. 5), as in
   Nguyen, Raghu, Kornblith, "Do Wide and Deep Networks Learn the Same Things?", ICLR 2021.
   Biased CKA is strongly inflated when the feature dimension is not small against the number
   of examples (independent 512 x 64 Gaussians give about 0.11); the debiased one is about 0.
   Both are computed as cosines of *centred* Gram matrices (U-centring of Szekely & Rizzo for
   the debiased one, as Kornblith et al.'s reference does), never from the raw sums of Song et
   al.'s eq. 5, which cancel catastrophically when the features share a large offset.
2. **Exact, streaming** (:class:`StreamingCKA`): the same two numbers over a whole dataset in
   one pass, from moment accumulators whose size is ``O(d^2)`` and independent of ``n``. Kept
   per block of rows, they also give the exact CKA of any reweighting of the blocks
   (:meth:`StreamingCKA.replicates`: bootstrap replicates without a ``d x d`` matrix per replicate).
3. **Minibatch** (:class:`MinibatchCKA`): Nguyen et al. 2021, section 3.1: average the unbiased
   HSIC over minibatches, then normalize. It matches the full-dataset debiased CKA only
   statistically (the minibatch HSIC is unbiased for the population HSIC, so the ratio is
   consistent but not exact).

Spatial features ``(B, C, h, w)`` become example rows by :func:`reduce_spatial`: global
average pooling (one row per image, ``mode="pool"``) or a fixed, seeded set of pixel positions
(``mode="sample"``, ``k`` rows per image, the same *relative* positions for every image and
every tap, so taps of different resolutions stay aligned row by row). For detectors,
:func:`object_rows` gives one row per ground-truth object: the tap's features average-pooled
over the object's box (``torchvision.ops.roi_align``, one bin), the same boxes for every tap,
so the rows describe the same objects in every tap.

Derivation of the streaming debiased estimator. With ``K~`` = ``K`` with a zeroed diagonal,
Song et al.'s unbiased HSIC is::

    HSIC_u(K, L) = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1 ] / (n(n-3))

For linear kernels every term is a function of per-sample sums (rows ``x_i``, ``y_i``):

- ``tr(K~ L~) = ||X^T Y||_F^2 - sum_i |x_i|^2 |y_i|^2``
- ``1^T K~ 1 = |sum_i x_i|^2 - sum_i |x_i|^2`` (likewise for ``L``)
- ``1^T K~ L~ 1 = sum_i (x_i . s_x - |x_i|^2)(y_i . s_y - |y_i|^2)
  = s_x^T (X^T Y) s_y - s_x . (sum_i |y_i|^2 x_i) - s_y . (sum_i |x_i|^2 y_i) + sum_i |x_i|^2 |y_i|^2``

with ``s_x = sum_i x_i``. So the accumulators are ``n``, ``sum x``, ``X^T X`` (p x p),
``sum |x|^2 x``, ``sum |x|^4`` per tap and ``X^T Y`` (p x q), ``sum |y|^2 x``, ``sum |x|^2 y``,
``sum |x|^2 |y|^2`` per pair. ``HSIC_u`` is unchanged when a constant vector is added to every
row (the U-centring removes rank-one row / column offsets), so each tap is shifted by a fixed
reference (the mean of its first batch) before accumulating: the raw, uncentred sums would
otherwise cancel catastrophically for features with a large mean. The biased value uses the
centred cross-covariance ``X^T Y - s_x s_y^T / n``, which is shift invariant as well.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torchvision.ops import roi_align

__all__ = [
    "MinibatchCKA",
    "StreamingCKA",
    "center_gram",
    "cka_from_gram",
    "gram_linear",
    "hsic_biased",
    "hsic_unbiased",
    "linear_cka",
    "object_rows",
    "reduce_spatial",
]


# --------------------------------------------------------------------------------------------
# Spatial reduction
# --------------------------------------------------------------------------------------------
def sample_positions(num_samples: int, seed: int = 0) -> torch.Tensor:
    """Fixed pixel positions in relative coordinates, shared by every tap and every image.

    Args:
        num_samples: how many positions ``k``.
        seed: the positions are a pure function of ``(num_samples, seed)``.

    Returns:
        ``(k, 2)`` float64 tensor of (row, col) in ``[0, 1)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(num_samples, 2, generator=g, dtype=torch.float64)


@functools.lru_cache(maxsize=256)
def _sample_cells(h: int, w: int, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells ``(rows, cols)``, ``(k,)`` each, of :func:`sample_positions` on an ``h x w`` map
    (cached: every tap of every batch asks again, and the generator is most of the cost)."""
    pos = sample_positions(num_samples, seed)
    return (pos[:, 0] * h).long().clamp_(max=h - 1), (pos[:, 1] * w).long().clamp_(max=w - 1)


def reduce_spatial(
    features: torch.Tensor, mode: str = "pool", num_samples: int = 16, seed: int = 0
) -> torch.Tensor:
    """Turn a tap output into example rows for CKA.

    Args:
        features: ``(B, C, h, w)`` feature map, or ``(B, C)`` vectors (returned unchanged).
        mode: ``"pool"``: global average pool, one row per image, ``(B, C)``. ``"sample"``: the
            features at ``num_samples`` fixed relative positions (:func:`sample_positions`),
            nearest cell, ``(B * k, C)`` ordered image-major. Because positions are relative,
            taps of different resolutions give rows that describe the same image region.
        num_samples: ``k`` for ``mode="sample"``.
        seed: seed of the positions for ``mode="sample"``.

    Returns:
        ``(n, C)`` tensor with the dtype and device of ``features``.
    """
    if features.dim() == 2:
        return features
    if features.dim() != 4:
        raise ValueError(
            f"reduce_spatial expects (B, C, h, w) or (B, C) features, got shape {tuple(features.shape)}"
        )
    b, c, h, w = features.shape
    if mode == "pool":
        return features.mean(dim=(2, 3))
    if mode == "sample":
        rows, cols = _sample_cells(h, w, num_samples, seed)
        picked = features[:, :, rows.to(features.device), cols.to(features.device)]  # (B, C, k)
        return picked.permute(0, 2, 1).reshape(b * num_samples, c)
    raise ValueError(f"reduce_spatial mode must be 'pool' or 'sample', got {mode!r}")


def object_rows(features: torch.Tensor, boxes: Sequence[torch.Tensor], reduction: int) -> torch.Tensor:
    """One example row per object: a tap's features pooled over each ground-truth box.

    ``torchvision.ops.roi_align`` with one output bin, ``spatial_scale = 1 / reduction``,
    ``aligned=True`` (box corners in continuous pixel coordinates, as xyxy boxes are) and an
    adaptive sampling grid (``ceil`` of the box size in feature cells per side) averages the
    bilinearly interpolated features inside the box: roughly the mean feature of the box region,
    at any stride. A box smaller than a cell still gets a row (the interpolated feature at its
    centre). Taps without a spatial map (``(B, C)``, or ``reduction == 0``) give each object its
    image's (pooled) vector.

    Args:
        features: ``(B, C, h, w)`` tap output (``(B, C)`` vectors also accepted).
        boxes: per image ``(N_i, 4)`` xyxy boxes in input pixels (``N_i = 0`` allowed).
        reduction: the tap's input-to-feature stride (``TapInfo.reduction``).

    Returns:
        ``(sum_i N_i, C)`` rows, image-major and in box order within an image, with the dtype
        and device of ``features``.

    Example:
        >>> f = torch.arange(16.0).view(1, 1, 4, 4)                 # stride 2 over an 8x8 image
        >>> object_rows(f, [torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 2)  # mean of the top-left 2x2 cells
        tensor([[2.5000]])
    """
    if features.dim() not in (2, 4):
        raise ValueError(f"object_rows expects (B, C, h, w) or (B, C) features, got shape {tuple(features.shape)}")
    b = features.shape[0]
    if len(boxes) != b:
        raise ValueError(f"object_rows got {len(boxes)} box tensors for a batch of {b}; give one (N_i, 4) per image")
    bx = [torch.as_tensor(x, dtype=torch.float32, device=features.device).reshape(-1, 4) for x in boxes]
    if features.dim() == 2 or reduction <= 0:
        vec = features if features.dim() == 2 else features.mean(dim=(2, 3))
        counts = torch.tensor([x.shape[0] for x in bx], device=features.device)
        return vec.repeat_interleave(counts, dim=0)
    if sum(x.shape[0] for x in bx) == 0:
        return features.new_zeros(0, features.shape[1])
    pooled = roi_align(features, [x.to(features.dtype) for x in bx], output_size=1,
                       spatial_scale=1.0 / reduction, sampling_ratio=-1, aligned=True)  # (N, C, 1, 1)
    return pooled.flatten(1)


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be (n, d) example rows, got shape {tuple(x.shape)}; "
                         "use reduce_spatial() for (B, C, h, w) feature maps")
    return x


# --------------------------------------------------------------------------------------------
# Exact, in memory
# --------------------------------------------------------------------------------------------
def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix.

    Args:
        x: ``(n, d)`` example rows.

    Returns:
        ``(n, n)`` matrix ``x x^T``.
    """
    x = _as_rows(x, "x")
    return x @ x.T


def center_gram(gram: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Centre a symmetric Gram matrix (returns a new tensor).

    Args:
        gram: ``(n, n)`` symmetric matrix.
        unbiased: ``False``: ``H K H`` with ``H = I - 11^T / n``. ``True``: the U-centring of
            Szekely & Rizzo (2014) used by Kornblith et al.'s debiased CKA, for which
            ``<U(K), U(L)> = n (n - 3) HSIC_u(K, L)`` (Song et al. 2012).

    Returns:
        ``(n, n)`` centred matrix.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (n, n), got shape {tuple(gram.shape)}")
    n = gram.shape[0]
    g = gram.clone()
    if unbiased:
        if n < 4:
            raise ValueError(f"unbiased centring needs n >= 4 examples, got {n}")
        g.fill_diagonal_(0)
        means = g.sum(0) / (n - 2)
        means = means - means.sum() / (2 * (n - 1))
        g = g - means[:, None] - means[None, :]
        g.fill_diagonal_(0)
        return g
    means = g.mean(0)
    return g - means[:, None] - means[None, :] + means.mean()


def hsic_biased(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """Biased HSIC of Gretton et al. (2005): ``tr(K H L H) / (n - 1)^2``.

    Args:
        gram_x: ``(n, n)`` kernel matrix.
        gram_y: ``(n, n)`` kernel matrix.

    Returns:
        0-dim tensor.
    """
    n = gram_x.shape[0]
    return (center_gram(gram_x) * center_gram(gram_y)).sum() / (n - 1) ** 2


def hsic_unbiased(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator of Song et al. (JMLR 2012, eq. 5).

    Args:
        gram_x: ``(n, n)`` kernel matrix, ``n >= 4``.
        gram_y: ``(n, n)`` kernel matrix.

    Returns:
        0-dim tensor ``[tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
    """
    if gram_x.shape != gram_y.shape or gram_x.dim() != 2 or gram_x.shape[0] != gram_x.shape[1]:
        raise ValueError(f"Gram matrices must be square and equal in shape, got "
                         f"{tuple(gram_x.shape)} and {tuple(gram_y.shape)}")
    n = gram_x.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs n >= 4 examples, got {n}")
    # Through the U-centring, <U(K), U(L)> = n (n - 3) HSIC_u (as Kornblith et al.'s reference
    # computes it), not the three raw sums of eq. 5: with a feature offset c every entry of K
    # carries ~|c|^2, the raw sums are ~n^2 |c|^4 and cancel catastrophically (CKA error 1.5e-2
    # at c = 1e3, nan at 1e4), while the centring removes the offset before any product
    # (error ~eps |c|^2; `python bench/interpret.py --only cka_offset`).
    uk = center_gram(gram_x, unbiased=True)
    ul = uk if gram_y is gram_x else center_gram(gram_y, unbiased=True)
    return (uk * ul).sum() / (n * (n - 3))


def cka_from_gram(gram_x: torch.Tensor, gram_y: torch.Tensor, debiased: bool = True) -> float:
    """CKA from two Gram matrices of the same ``n`` examples (exact; O(n^2) memory).

    Each Gram is centred first (U-centring, or ``H K H`` for the biased value) and CKA is the
    cosine of the centred matrices, as in Kornblith et al.'s reference code. A shared feature
    offset ``c`` then costs only the rounding of the Gram entries themselves (``~eps |c|^2``):
    absolute error 9e-12 at ``c = 1e3`` and 9e-10 at ``1e4`` against feature-space CKA, where
    the raw sums of the unbiased HSIC gave 1.5e-2 and nan (``python bench/interpret.py --only
    cka_offset``). Given the features, :func:`linear_cka` avoids even that.

    Args:
        gram_x: ``(n, n)`` kernel matrix of the first representation.
        gram_y: ``(n, n)`` kernel matrix of the second.
        debiased: use the unbiased HSIC (default) instead of the biased one.

    Returns:
        The CKA value (``nan`` when a debiased self-similarity is not positive, which happens
        only for degenerate or tiny inputs).
    """
    if gram_x.shape != gram_y.shape or gram_x.dim() != 2 or gram_x.shape[0] != gram_x.shape[1]:
        raise ValueError(f"Gram matrices must be square and equal in shape, got "
                         f"{tuple(gram_x.shape)} and {tuple(gram_y.shape)}")
    # Centre each Gram once (U-centring for the debiased value, H K H for the biased one) and
    # take inner products of the centred matrices: the common factors 1 / (n (n - 3)) and
    # 1 / (n - 1)^2 cancel in the ratio, and centring first keeps a large feature offset from
    # cancelling catastrophically (see hsic_unbiased).
    kc = center_gram(gram_x, unbiased=debiased)
    lc = center_gram(gram_y, unbiased=debiased)
    return _ratio(float((kc * lc).sum()), float((kc * kc).sum()), float((lc * lc).sum()))


def _ratio(xy: float, xx: float, yy: float) -> float:
    if not (xx > 0 and yy > 0):
        return math.nan
    return xy / math.sqrt(xx * yy)


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Exact linear CKA between two representations of the same examples, in feature space.

    Equal to ``cka_from_gram(x x^T, y y^T, debiased)`` but costs ``O(n d^2)`` instead of
    ``O(n^2 d)``. Computed in float64.

    Args:
        x: ``(n, p)`` rows = examples.
        y: ``(n, q)`` rows = the same examples.
        debiased: unbiased HSIC (default) or the biased estimator of Kornblith et al. 2019.

    Returns:
        The CKA value.

    Example:
        >>> x = torch.randn(512, 64, dtype=torch.float64)
        >>> round(linear_cka(x, 3 * x), 6)
        1.0
    """
    x, y = _as_rows(x, "x").double(), _as_rows(y, "y").double()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same examples: got {x.shape[0]} and {y.shape[0]} rows")
    acc = StreamingCKA(pairs=[("x", "y")])
    acc.update({"x": x, "y": y})
    return acc.cka("x", "y", debiased=debiased)


# --------------------------------------------------------------------------------------------
# Exact, streaming
# --------------------------------------------------------------------------------------------
class _SelfMoments:
    """Per-tap sums over shifted rows ``z = x - shift``, one set per block (leading dim ``G``)."""

    def __init__(self, shift: torch.Tensor, blocks: int) -> None:
        p = shift.numel()
        kw = {"dtype": torch.float64, "device": shift.device}
        self.shift = shift
        self.n = torch.zeros(blocks, **kw)        # rows
        self.s = torch.zeros(blocks, p, **kw)     # sum z
        self.g = torch.zeros(blocks, p, p, **kw)  # sum z z^T
        self.r = torch.zeros(blocks, p, **kw)     # sum |z|^2 z
        self.f = torch.zeros(blocks, **kw)        # sum |z|^4


class _CrossMoments:
    def __init__(self, p: int, q: int, blocks: int, device: torch.device) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.m = torch.zeros(blocks, p, q, **kw)  # sum z_x z_y^T
        self.u = torch.zeros(blocks, p, **kw)     # sum |z_y|^2 z_x
        self.v = torch.zeros(blocks, q, **kw)     # sum |z_x|^2 z_y
        self.w = torch.zeros(blocks, **kw)        # sum |z_x|^2 |z_y|^2


def _total(x: torch.Tensor) -> torch.Tensor:
    """Sum over the block dimension (a view when there is one block)."""
    return x[0] if x.shape[0] == 1 else x.sum(0)


def grow_blocks(x: torch.Tensor, cap: int) -> torch.Tensor:
    """``x`` with its block dimension zero-padded to ``cap``."""
    return torch.cat([x, x.new_zeros(cap - x.shape[0], *x.shape[1:])]) if cap > x.shape[0] else x


class StreamingCKA:
    """Exact full-dataset linear CKA (biased and debiased) between many taps, in one pass.

    Memory is ``O(G (sum_t d_t^2 + sum_pairs d_a d_b))`` float64 numbers, independent of the
    number of examples; the result equals :func:`linear_cka` on the concatenated data up to
    float64 rounding (see the module docstring for the derivation).

    With ``blocks = G > 1`` every moment is kept per block of rows (the caller says which block
    each row belongs to), and :meth:`replicates` gives the exact CKA of any reweighting of the
    blocks: block ``g`` counted ``W_rg`` times (bootstrap replicates,
    :mod:`fusionzoo.interpret.accumulators.blocks`).

    Args:
        pairs: the (a, b) tap pairs to compare; ``None`` = every unordered pair of the taps seen
            in the first :meth:`update`.
        blocks: ``G``, the blocks the moments are kept for (1: totals only).

    Example:
        >>> acc = StreamingCKA()
        >>> for batch in batches:                      # dict tap -> (n_b, d_tap) rows
        ...     acc.update(batch)
        >>> acc.cka("rgb.stage1", "depth.stage1")      # debiased by default
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] | None = None, blocks: int = 1) -> None:
        if int(blocks) < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self._pairs: list[tuple[str, str]] | None = [tuple(p) for p in pairs] if pairs is not None else None
        self.blocks = int(blocks)
        # blocks allocated so far: grown (doubling) as images reach new blocks, so a run over
        # fewer images than blocks never holds G copies of its moments
        self._cap = 1
        self._self: dict[str, _SelfMoments] = {}
        self._cross: dict[tuple[str, str], _CrossMoments] = {}
        self._cache: dict[tuple[str, str, bool], float] = {}  # HSIC values, cleared by update()
        self._rep_cache: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}  # replicate terms, same
        self._rep_weights: torch.Tensor | None = None  # the weights the replicate terms are for
        self._preset: dict[str, torch.Tensor] = {}  # shifts fixed from outside (another process's)

    @property
    def names(self) -> list[str]:
        """Taps seen so far, in first-seen order."""
        return list(self._self)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self._pairs or [])

    @property
    def num_examples(self) -> int:
        return int(next(iter(self._self.values())).n.sum()) if self._self else 0

    def _grow(self, cap: int) -> None:
        self._cap = cap
        for st in [*self._self.values(), *self._cross.values()]:
            for k, v in vars(st).items():
                if k != "shift":
                    setattr(st, k, grow_blocks(v, cap))

    def shifts(self) -> dict[str, torch.Tensor]:
        """Each tap's shift (the mean row of the first batch it saw)."""
        return {k: st.shift for k, st in self._self.items()}

    def preset_shifts(self, shifts: Mapping[str, torch.Tensor]) -> None:
        """Shift these taps by the given rows instead of their first batch's mean (before they are
        first seen): processes that share a dataset shift by the same rows, so their moments add
        up to one process's (:meth:`state`)."""
        self._preset.update({k: v.detach().to(torch.float64) for k, v in shifts.items()})

    def state(self) -> list[torch.Tensor]:
        """Every moment, all ``G`` blocks allocated: sums over rows that a sharded dataset adds
        up across processes (with the same shifts, :meth:`preset_shifts`). Clears the caches."""
        self._grow(self.blocks)
        self._cache.clear()
        self._rep_cache.clear()
        return [v for st in [*self._self.values(), *self._cross.values()] for k, v in vars(st).items() if k != "shift"]

    def update(self, features: Mapping[str, torch.Tensor], blocks: torch.Tensor | None = None) -> None:
        """Add one batch of example rows.

        Args:
            features: tap name -> ``(n_b, d_tap)`` rows of the same ``n_b`` examples in the same
                order (use :func:`reduce_spatial` on feature maps first).
            blocks: ``(n_b,)`` block of each row, in ``[0, G)``; None: block 0.
        """
        rows = {k: _as_rows(v, f"features[{k!r}]").detach() for k, v in features.items()}
        if not rows:
            raise ValueError("StreamingCKA.update got no features")
        self._cache.clear()
        self._rep_cache.clear()
        ns = {k: v.shape[0] for k, v in rows.items()}
        if len(set(ns.values())) != 1:
            raise ValueError(f"every tap must give the same number of rows in a batch, got {ns}")
        if self._pairs is None:
            names = list(rows)
            self._pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        needed = {t for p in self._pairs for t in p}
        missing = needed - set(rows)
        if missing:
            raise KeyError(f"StreamingCKA.update is missing taps {sorted(missing)}; got {sorted(rows)}")
        n_rows = next(iter(ns.values()))
        if blocks is None:
            groups = [(0, slice(None))]
        else:
            blocks = torch.as_tensor(blocks).reshape(-1).cpu()
            if blocks.numel() != n_rows or (n_rows and (int(blocks.min()) < 0 or int(blocks.max()) >= self.blocks)):
                raise ValueError(f"blocks must give each of the {n_rows} rows a block in [0, {self.blocks}), got "
                                 f"shape {tuple(blocks.shape)}")
            groups = [(int(g), (blocks == g).nonzero().flatten()) for g in blocks.unique().tolist()]
            if n_rows and int(blocks.max()) >= self._cap:
                self._grow(min(self.blocks, max(int(blocks.max()) + 1, 2 * self._cap)))
        z: dict[str, torch.Tensor] = {}
        sq: dict[str, torch.Tensor] = {}
        for name in sorted(needed, key=list(rows).index):
            x = rows[name].to(torch.float64)
            st = self._self.get(name)
            if st is None:
                # Shift by the first batch mean: HSIC (biased and unbiased) is invariant to it and
                # it keeps the uncentred sums from cancelling catastrophically.
                shift = self._preset[name].to(x) if name in self._preset else x.mean(0)
                st = self._self[name] = _SelfMoments(shift, self._cap)
            elif x.shape[1] != st.shift.numel():
                raise ValueError(f"tap {name!r} changed width: {x.shape[1]} vs {st.shift.numel()} before")
            zz = x - st.shift.to(x.device)
            z[name], sq[name] = zz, (zz * zz).sum(1)
        for g, idx in groups:
            for name in z:
                st, zz, n2 = self._self[name], z[name][idx], sq[name][idx]
                st.n[g] += zz.shape[0]
                st.s[g] += zz.sum(0)
                st.g[g].addmm_(zz.T, zz)  # in place: no d x d temporary per batch
                st.r[g] += n2 @ zz
                st.f[g] += (n2 * n2).sum()
            for a, b in self._pairs:
                cr = self._cross.get((a, b))
                if cr is None:
                    cr = self._cross[(a, b)] = _CrossMoments(z[a].shape[1], z[b].shape[1], self._cap, z[a].device)
                za, zb, qa, qb = z[a][idx], z[b][idx], sq[a][idx], sq[b][idx]
                cr.m[g].addmm_(za.T, zb)
                cr.u[g] += qb @ za
                cr.v[g] += qa @ zb
                cr.w[g] += (qa * qb).sum()

    # -- HSIC terms ----------------------------------------------------------------------------
    def _block_terms(self, a: str, b: str):
        """Per block ``(n, s_a, s_b, M, u, v, w, trace_a, trace_b)`` (leading dim ``G``) for the
        pair (a, b) or the self pair (a, a)."""
        if a not in self._self or b not in self._self:
            raise KeyError(f"no data for taps {a!r}/{b!r}; seen {self.names}")
        sa, sb = self._self[a], self._self[b]
        if a == b:
            m, u, v, w = sa.g, sa.r, sa.r, sa.f
        elif (a, b) in self._cross:
            cr = self._cross[(a, b)]
            m, u, v, w = cr.m, cr.u, cr.v, cr.w
        elif (b, a) in self._cross:
            cr = self._cross[(b, a)]
            m, u, v, w = cr.m.transpose(1, 2), cr.v, cr.u, cr.w
        else:
            raise KeyError(f"pair ({a!r}, {b!r}) was not accumulated; pairs: {self._pairs}")
        tr_a = torch.diagonal(sa.g, dim1=1, dim2=2).sum(-1)
        tr_b = tr_a if a == b else torch.diagonal(sb.g, dim1=1, dim2=2).sum(-1)
        return sa.n, sa.s, sb.s, m, u, v, w, tr_a, tr_b

    def hsic(self, a: str, b: str, debiased: bool = True) -> float:
        """Linear HSIC between taps ``a`` and ``b`` over all examples seen.

        Returns:
            The unbiased estimate (Song et al. 2012) or the biased ``||C_ab||_F^2 / (n-1)^2``.
        """
        key = (a, b, debiased)
        if key not in self._cache:
            self._cache[key] = self._hsic(a, b, debiased)
        return self._cache[key]

    def _hsic(self, a: str, b: str, debiased: bool) -> float:
        n, s_a, s_b, m, u, v, w, tr_a, tr_b = (_total(t) for t in self._block_terms(a, b))
        n = float(n)
        if not debiased:
            c = m - torch.outer(s_a, s_b) / n
            return float((c * c).sum()) / (n - 1) ** 2
        if n < 4:
            raise ValueError(f"debiased HSIC needs n >= 4 examples, got {n:.0f}")
        trace_kl = (m * m).sum() - w
        k1 = s_a @ s_a - tr_a
        l1 = s_b @ s_b - tr_b
        kl1 = s_a @ m @ s_b - s_a @ u - s_b @ v + w
        val = (trace_kl + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))
        return float(val)

    def replicate_hsic(self, a: str, b: str, weights: torch.Tensor, debiased: bool = True) -> torch.Tensor:
        """HSIC of reweighted data: replicate ``r`` counts every row of block ``g`` ``weights[r, g]``
        times (a weight-``k`` block is its rows duplicated ``k`` times, exactly).

        Every term of the HSIC is linear in the weights except ``||M||_F^2`` (quadratic) and
        ``s_a^T M s_b`` (cubic), with ``M = sum_g W_g M_g``, ``s = sum_g W_g s_g``. They come from the
        ``G x G`` Gram of the block moments, ``Q_gh = <M_g, M_h>_F``, and the ``G x G x G`` tensor
        ``T_hgk = s_a,g^T M_h s_b,k``: ``||M||^2 = W^T Q W`` and ``s_a^T M s_b = sum W_h W_g W_k T_hgk``.
        Cost ``O(G^2 p q)`` once per pair and weights (cached until the next :meth:`update`) plus
        ``O(R G^3)``; no replicate ever holds a ``p x q`` matrix.

        Args:
            a, b: an accumulated pair, or ``a == b`` (self-similarity).
            weights: ``(R, G)`` non-negative block weights.
            debiased: the unbiased HSIC (default) or the biased one.

        Returns:
            ``(R,)`` float64 HSIC values (nan where a replicate has fewer than 4 rows for the
            debiased value, or fewer than 2 for the biased one).
        """
        n, mm, sms, saa, sbb, tr_a, tr_b, sau, sbv, w = self._replicate_terms(a, b, weights)
        if not debiased:
            val = (mm - 2.0 * sms / n + saa * sbb / (n * n)) / (n - 1) ** 2
            return torch.where(n >= 2, val, torch.full_like(val, math.nan))
        k1, l1 = saa - tr_a, sbb - tr_b
        kl1 = sms - sau - sbv + w
        val = ((mm - w) + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))
        return torch.where(n >= 4, val, torch.full_like(val, math.nan))

    def _replicate_terms(self, a: str, b: str, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(n, ||M||^2, s_a^T M s_b, |s_a|^2, |s_b|^2, tr_a, tr_b, s_a.u, s_b.v, w)`` per replicate."""
        if self._rep_weights is not weights:
            self._rep_cache.clear()
            self._rep_weights = weights
        key = (a, b) if (a, b) in self._cross or a == b else (b, a)
        if key not in self._rep_cache:
            n_g, s_a, s_b, m, u, v, w_g, tr_a, tr_b = self._block_terms(*key)
            wt = torch.as_tensor(weights, dtype=torch.float64).to(m.device)
            if wt.dim() != 2 or wt.shape[1] != self.blocks:
                raise ValueError(f"weights must be (R, {self.blocks}) block weights, got shape {tuple(wt.shape)}")
            g = m.shape[0]  # blocks allocated; the others are empty
            wt = wt[:, :g]
            flat = m.reshape(g, -1)
            q = flat @ flat.T                                          # (G, G) <M_g, M_h>
            mm = ((wt @ q) * wt).sum(1)                                # ||M_r||_F^2
            t = torch.matmul(s_a, m) @ s_b.T                           # (G_h, G_g, G_k)
            sms = ((torch.einsum("hgk,rk->rhg", t, wt) * wt[:, None, :]).sum(2) * wt).sum(1)  # s_a^T M s_b
            sa, sb = wt @ s_a, wt @ s_b
            self._rep_cache[key] = (wt @ n_g, mm, sms, (sa * sa).sum(1), (sb * sb).sum(1), wt @ tr_a, wt @ tr_b,
                                    (sa * (wt @ u)).sum(1), (sb * (wt @ v)).sum(1), wt @ w_g)
        n, mm, sms, saa, sbb, tr_a, tr_b, sau, sbv, w = self._rep_cache[key]
        if key != (a, b):  # the reversed pair: the roles of a and b swap, ||M|| and s_a^T M s_b do not change
            saa, sbb, tr_a, tr_b, sau, sbv = sbb, saa, tr_b, tr_a, sbv, sau
        return n, mm, sms, saa, sbb, tr_a, tr_b, sau, sbv, w

    def replicates(self, weights: torch.Tensor, debiased: bool = True,
                   pairs: Sequence[tuple[str, str]] | None = None) -> dict[tuple[str, str], torch.Tensor]:
        """CKA of every pair (or of ``pairs``) under each block reweighting (:meth:`replicate_hsic`).

        Returns:
            pair -> ``(R,)`` float64 CKA values (nan where a self-similarity is not positive).
        """
        selfs: dict[str, torch.Tensor] = {}
        out = {}
        for a, b in (self.pairs if pairs is None else pairs):
            for t in (a, b):
                if t not in selfs:
                    selfs[t] = self.replicate_hsic(t, t, weights, debiased)
            xy, xx, yy = self.replicate_hsic(a, b, weights, debiased), selfs[a], selfs[b]
            ok = (xx > 0) & (yy > 0)
            out[(a, b)] = torch.where(ok, xy / (xx * yy).clamp(min=1e-300).sqrt(), torch.full_like(xy, math.nan)).cpu()
        return out

    def cka(self, a: str, b: str, debiased: bool = True) -> float:
        """Linear CKA between taps ``a`` and ``b`` over all examples seen (exact)."""
        return _ratio(self.hsic(a, b, debiased), self.hsic(a, a, debiased), self.hsic(b, b, debiased))

    def results(self, debiased: bool = True) -> dict[tuple[str, str], float]:
        """CKA of every accumulated pair."""
        return {p: self.cka(*p, debiased=debiased) for p in self.pairs}

    def matrix(self, names: Sequence[str] | None = None, debiased: bool = True) -> torch.Tensor:
        """Symmetric CKA matrix over ``names`` (default: all taps); ``nan`` where no pair was
        accumulated, 1 on the diagonal.

        Returns:
            ``(T, T)`` float64 tensor.
        """
        names = list(names) if names is not None else self.names
        out = torch.full((len(names), len(names)), math.nan, dtype=torch.float64)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if i == j:
                    out[i, j] = 1.0
                elif (a, b) in self._cross or (b, a) in self._cross:
                    out[i, j] = self.cka(a, b, debiased)
        return out


# --------------------------------------------------------------------------------------------
# Minibatch (Nguyen, Raghu, Kornblith 2021)
# --------------------------------------------------------------------------------------------
class MinibatchCKA:
    """Minibatch CKA of Nguyen et al. (ICLR 2021, sec. 3.1).

    For minibatches ``i = 1..k``: ``CKA = mean_i HSIC_u(K_i, L_i) /
    sqrt(mean_i HSIC_u(K_i, K_i) mean_i HSIC_u(L_i, L_i))``. Memory is three scalars per pair
    plus one ``(n_b, n_b)`` Gram per tap and batch. Each batch needs at least 4 rows. Rows are
    centred on their batch mean before the Gram (``HSIC_u`` is invariant to it), so a large
    shared feature offset does not degrade the estimate.

    Args:
        pairs: tap pairs to compare; ``None`` = every unordered pair of the first batch's taps.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] | None = None) -> None:
        self._pairs: list[tuple[str, str]] | None = [tuple(p) for p in pairs] if pairs is not None else None
        self._xy: dict[tuple[str, str], float] = {}
        self._self: dict[str, float] = {}
        self.num_batches = 0

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self._pairs or [])

    def update(self, features: Mapping[str, torch.Tensor]) -> None:
        """Add one minibatch: tap name -> ``(n_b, d_tap)`` rows, ``n_b >= 4``."""
        rows = {k: _as_rows(v, f"features[{k!r}]").detach().to(torch.float64) for k, v in features.items()}
        if self._pairs is None:
            names = list(rows)
            self._pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        needed = {t for p in self._pairs for t in p}
        if needed - set(rows):
            raise KeyError(f"MinibatchCKA.update is missing taps {sorted(needed - set(rows))}")
        # HSIC_u is invariant to adding a constant vector to every row, so centre each tap's rows on
        # the batch mean before the Gram: the Gram entries then carry no |offset|^2 term whose
        # float64 rounding (~eps |offset|^2) would survive the U-centring.
        grams = {t: gram_linear(rows[t] - rows[t].mean(0)) for t in needed}
        for t in needed:
            self._self[t] = self._self.get(t, 0.0) + float(hsic_unbiased(grams[t], grams[t]))
        for a, b in self._pairs:
            self._xy[(a, b)] = self._xy.get((a, b), 0.0) + float(hsic_unbiased(grams[a], grams[b]))
        self.num_batches += 1

    def cka(self, a: str, b: str) -> float:
        """The minibatch CKA estimate for an accumulated pair."""
        key = (a, b) if (a, b) in self._xy else (b, a)
        if key not in self._xy:
            raise KeyError(f"pair ({a!r}, {b!r}) was not accumulated; pairs: {self._pairs}")
        # The 1/k factors cancel in the ratio.
        return _ratio(self._xy[key], self._self[a], self._self[b])

    def results(self) -> dict[tuple[str, str], float]:
        return {p: self.cka(*p) for p in self.pairs}
