"""Semantic variance: how much of a tap's feature variance the semantic classes explain.

Definition (ours, exact). For a tap's features ``F`` of shape ``(B, C, h, w)`` and a label mask
``(B, H, W)`` reduced to the ``(h, w)`` grid (:func:`labels_to_grid`: area vote per cell, cells
whose winning class covers less than ``purity`` of the cell dropped, ignore index dropped),
let ``f_i`` in ``R^C`` be the kept feature vectors, ``N`` their number, ``n_k`` and ``mu_k`` the
count and mean of class ``k`` and ``mu`` the global mean. Then::

    S_B = sum_k n_k |mu_k - mu|^2 / N               (between-class scatter, trace form)
    S_W = sum_k sum_{i in k} |f_i - mu_k|^2 / N     (within-class scatter)
    S_T = S_B + S_W = sum_i |f_i - mu|^2 / N        (total variance)
    SV  = S_B / S_T   in [0, 1]                     (semantic variance)

``SV`` is the correlation ratio eta^2 of the features with the class variable (the trace form
of Fisher's between / total scatter): the share of feature variance that semantics explain.
1 = features constant within every class (perfectly organized by class), 0 = class means all
equal the global mean. Reported beside it: the within-class share ``S_W / S_T = 1 - SV`` and the
Fisher ratio ``S_B / S_W`` (between over within, the form the interpretation literature often
quotes), so no direction is ambiguous. Per class, ``SV`` and ``1 - SV`` split exactly into
class shares ``n_k |mu_k - mu|^2 / (N S_T)`` and ``sum_{i in k} |f_i - mu_k|^2 / (N S_T)``; per
channel, the same ratio computed on one channel.

Whitened form (scale invariant). ``SV`` is a trace over channels, so a channel's weight in it is
its variance: one loud channel without class information drowns a quiet channel that separates
the classes perfectly, and rescaling a channel (which the next layer undoes for free) changes
``SV``. The whitened form measures the between-class scatter in the metric of the total one::

    S_T = sum_i (f_i - mu)(f_i - mu)^T / N                 (C x C total scatter)
    S_B = sum_k n_k (mu_k - mu)(mu_k - mu)^T / N            (C x C between-class scatter)
    plug-in:     tr(S_T^-1 S_B) / min(K - 1, C)                         in [0, 1]
    split-half:  tr(S_T^-1 S_B^x) / min(K - 1, C),
                 S_B^x = sum_k n_k (mu_k^A - mu^A)(mu_k^B - mu^B)^T / N   (halves A, B of the images)

``tr(S_T^-1 S_B)`` is Pillai's trace (Pillai, "Some new test criteria in multivariate analysis",
Ann. Math. Statist. 1955), the sum of the squared canonical correlations between the features
and the class indicators; each is in ``[0, 1]`` and there are at most ``min(K - 1, C)`` of them
(``K`` = classes present), hence the normalization. It is the share of the class-separable
directions the features make *linearly* separable, whatever their scale: invariant to any
invertible linear map of the channels (rescaling, rotation, mixing), which a linear probe or the
next linear layer can undo. ``K = 2`` gives the squared correlation of the best linear
discriminant with the class.

The plug-in value has a chance term: with no class structure its expectation is about
``C / (N - 1)`` for ``N`` independent cells, and cells of one image are not independent (a
stage-4 tap upsampled from 2x3 cells to the common grid has at most 6 independent cells per
image). On the default run's 96 images, 512 stage-4 channels against about 576 independent cells
put every stream's plug-in value at 0.27, class structure or not. ``sv_whitened`` is therefore
the **split-half** form: the class-mean deviations of the even images (half A) times those of
the odd images (half B) have the true between-class scatter as expectation and no noise term,
because the two halves' noise is independent (the same idea as the unbiased HSIC of CKA). It
keeps the invariance, is about 0 without class structure (tested), and can be slightly negative.
The plug-in value is reported beside it as ``sv_whitened_plugin``. The halves are image ``i mod 2``
(with blocks: block ``g mod 2``, the same images since ``G`` is even).

Streaming adds one ``C x C`` sum of ``z z^T`` per tap and per-class sums per half to the
per-class sums. Rank-deficient ``S_T`` (dead ReLU channels, duplicated channels, fewer cells than
channels) is handled by a ridge on the *standardized* scale: channels are divided by their
standard deviation (constant channels, variance below ``1e-12`` of their second moment, are
dropped and not counted in ``C``), and :data:`WHITENED_RIDGE` ``= 1e-6`` is added to the diagonal
of the resulting correlation matrix before the Cholesky solve. Standardizing first keeps exact
invariance to rescaling a channel; the ridge ignores directions carrying less than ``1e-6`` of
a standardized channel's variance and moves the value by ``O(1e-6)`` otherwise (a rotation
changes it by about that much: tested to 1e-5).

Relation to the literature. Chen, Zhou, Deng, "Interpretation on Multi-modal Visual Fusion"
(arXiv:2308.10019, 2023; later retitled "Dissecting RGB-D Learning for Improved Multi-modal
Fusion") propose a "semantic variance" measured across modalities and levels to study the
consistency and speciality of RGB-D features. Only the abstract is available to us, so the
formula above is our own precise definition in the spirit of the paper, not a reproduction of
its equations; numbers are not comparable with the paper's.

Detection data (boxes, no masks). :func:`box_masks` paints the ground-truth boxes into a label
mask that the same definition then uses: each box's pixels get its detection label, smaller
boxes are painted over larger ones, and every pixel outside all boxes gets a *background class
of its own*, index ``K`` (one past the ``K`` object classes), rather than the ignore index. Two
reasons: detection label 0 is an ordinary object class, so background cannot be 0; and
ignoring the background would make SV meaningless on the most common detection sets, which
have one object class (LLVIP and KAIST pedestrians): one class gives ``S_B = 0``. Keeping
background asks whether the features separate object classes *and* objects from background,
which is what a detector's features must do; the purity vote drops the mixed cells at box
borders.

Grid (``stride``). By default (:func:`fusionzoo.interpret.run`, ``sv_stride=4``) every tap is
measured on one common grid, the stride-4 grid of the input (``ceil(H/4) x ceil(W/4)``, 16x20
cells at 64x80, 120x160 at 480x640): coarser taps are upsampled bilinearly to it
(``align_corners=False``, as decoders upsample), finer ones (stride-2 stems) area-averaged, and
the labels are reduced to it once by the area vote. Every stage is then scored on the same
labelled cells. On each tap's native grid instead (``stride=None``), the deep stages of a small
input have a handful of cells (a 64x80 input gives 4x5 at stride 16, 2x3 at stride 32), the
purity vote keeps mostly background, and SV falls with depth for that reason alone; a warning
names taps measured on fewer than ``MIN_CELLS`` labelled cells. The grid used is in
:attr:`SemanticVarianceResult.grid`.

Streaming: per class the count, the sum of features and the sum of squares per channel are
accumulated (``O(K * C)`` memory; ``O(C^2)`` more for the whitened form), which gives every
quantity above exactly over any dataset size. A tap coarser than the grid is not upsampled to
accumulate: bilinear upsampling is a linear map ``A`` (rows summing to 1), so each grid sum is
a form in the tap's own cells (``sum_{i in k} z_i z_i^T = f^T A^T D_k A f``, ``D_k`` the kept
cells of class ``k``; ``A^T D_k A`` couples 3 x 3 neighbours), summed at the tap's resolution:
``h0 w0 C^2`` flops an image instead of ``h w C^2`` (equal to float64 rounding, tested). With ``blocks = G`` the class statistics and the
second moment are kept per block of images and :meth:`SemanticVariance.replicates` gives the
exact values of any reweighting of the blocks (bootstrap intervals:
:mod:`fusionzoo.interpret.accumulators.blocks`). Features are shifted by a fixed reference (the first batch's mean) before accumulating;
all quantities are shift invariant and the shift keeps float64 sums from cancelling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .cka import grow_blocks

__all__ = ["MIN_CELLS", "WHITENED_RIDGE", "SemanticVariance", "SemanticVarianceResult", "box_mask", "box_masks",
           "labels_to_grid", "resample_features", "semantic_variance", "whitened_sv"]

MIN_CELLS = 100  # fewer labelled cells than this over a whole dataset: SV is reported with a warning
CHUNK_BYTES = 4 << 20  # float64 rows of one tap's grid cells handled at a time (SemanticVariance.update)
WHITENED_RIDGE = 1e-6  # added to the standardized total scatter (unit diagonal) before the whitened form's solve


def resample_features(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring a feature map onto a ``(h, w)`` grid: unchanged when it is already there,
    area-averaged when it is finer in both dimensions, else bilinearly upsampled
    (``align_corners=False``).

    Args:
        features: ``(B, C, h0, w0)``.
        size: target ``(h, w)``.

    Returns:
        ``(B, C, h, w)`` in the dtype of ``features``.
    """
    h0, w0 = features.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if (h0, w0) == (h, w):
        return features
    if h0 >= h and w0 >= w:
        return F.adaptive_avg_pool2d(features, (h, w))
    return F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False)


def labels_to_grid(
    mask: torch.Tensor,
    size: tuple[int, int],
    num_classes: int,
    ignore_index: int = 255,
    purity: float = 0.5,
) -> torch.Tensor:
    """Reduce a label mask to a feature grid by area vote.

    The ``H x W`` mask is partitioned into ``h x w`` cells (pixel row ``r`` belongs to cell row
    ``floor(r * h / H)``, likewise for columns). A cell takes the class with the most pixels;
    it is set to ``ignore_index`` when that class covers less than ``purity`` of the cell's
    pixels (ignored pixels count in the denominator, so mostly-unlabelled cells are dropped).
    Ties go to the lower class index. When the grid is finer than the mask (``h > H`` or
    ``w > W``), the mask is first upsampled by nearest neighbour.

    Args:
        mask: ``(B, H, W)`` integer labels in ``[0, num_classes)`` or ``ignore_index``.
        size: ``(h, w)`` of the feature grid.
        num_classes: ``K``.
        ignore_index: label of unlabelled pixels.
        purity: minimum share of the winning class in a cell, in ``[0, 1]``.

    Returns:
        ``(B, h, w)`` int64 labels with ``ignore_index`` for dropped cells.
    """
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    if not 0.0 <= purity <= 1.0:
        raise ValueError(f"purity must be in [0, 1], got {purity}")
    mask = mask.long()
    valid = mask != ignore_index
    bad = valid & ((mask < 0) | (mask >= num_classes))
    if bad.any():
        raise ValueError(
            f"mask has labels {sorted(mask[bad].unique().tolist())[:10]} outside [0, {num_classes}) "
            f"that are not the ignore index {ignore_index}"
        )
    b, hh, ww = mask.shape
    h, w = int(size[0]), int(size[1])
    if h > hh or w > ww:
        mask = F.interpolate(mask[:, None].float(), size=(max(h, hh), max(w, ww)), mode="nearest")[:, 0].long()
        b, hh, ww = mask.shape
        valid = mask != ignore_index
    dev = mask.device
    rows = torch.arange(hh, device=dev) * h // hh  # cell row of each pixel row
    cols = torch.arange(ww, device=dev) * w // ww
    cell = (torch.arange(b, device=dev)[:, None, None] * (h * w) + rows[None, :, None] * w + cols[None, None, :])
    lab = torch.where(valid, mask, torch.full_like(mask, num_classes))  # ignore -> bin K
    counts = torch.bincount((cell * (num_classes + 1) + lab).reshape(-1), minlength=b * h * w * (num_classes + 1))
    counts = counts.view(b * h * w, num_classes + 1)
    best_count, best = counts[:, :num_classes].max(1)
    total = counts.sum(1)
    keep = (best_count > 0) & (best_count.double() >= purity * total.double())
    out = torch.where(keep, best, torch.full_like(best, ignore_index))
    return out.view(b, h, w)


def box_mask(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int],
    background: int | None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Paint one image's boxes into a label mask (see the module docstring for why).

    Pixel ``(r, c)`` covers ``[c, c + 1) x [r, r + 1)``; it belongs to a box ``(x1, y1, x2, y2)``
    (xyxy pixels, exclusive right / bottom edge as torchvision) when its centre lies inside:
    ``x1 <= c + 0.5 < x2`` and ``y1 <= r + 0.5 < y2``. An integer box thus covers columns
    ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``. Boxes are painted by decreasing area (the area
    of the box as given, before cutting it to the image; stable: equal areas in list order, the
    later one on top), so where boxes overlap the smaller one (the object in front, usually)
    keeps its label.

    Args:
        boxes: ``(N, 4)`` xyxy pixels (parts outside the image are cut off; ``N = 0`` is fine).
        labels: ``(N,)`` integer class labels.
        size: ``(H, W)`` of the image.
        background: label of pixels outside every box; ``None`` gives them ``ignore_index``.
        ignore_index: label of ignored pixels.

    Returns:
        ``(H, W)`` int64 mask on the device of ``boxes``.

    Example:
        >>> box_mask(torch.tensor([[0., 0., 4., 2.], [1., 0., 3., 1.]]), torch.tensor([0, 2]), (3, 4), 9)
        tensor([[0, 2, 2, 0],
                [0, 0, 0, 0],
                [9, 9, 9, 9]])
    """
    boxes = torch.as_tensor(boxes)
    labels = torch.as_tensor(labels, device=boxes.device)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) xyxy pixels, got shape {tuple(boxes.shape)}")
    if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"labels must be ({boxes.shape[0]},), one per box, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    h, w = int(size[0]), int(size[1])
    fill = ignore_index if background is None else int(background)
    mask = torch.full((h, w), fill, dtype=torch.long, device=boxes.device)
    b = boxes.double()
    area = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    rows = torch.arange(h, device=boxes.device, dtype=torch.float64) + 0.5  # pixel centres
    cols = torch.arange(w, device=boxes.device, dtype=torch.float64) + 0.5
    for i in torch.argsort(area, descending=True, stable=True).tolist():
        x1, y1, x2, y2 = b[i].tolist()
        inside = ((rows >= y1) & (rows < y2))[:, None] & ((cols >= x1) & (cols < x2))[None, :]
        mask[inside] = int(labels[i])
    return mask


def box_masks(
    boxes: list[torch.Tensor],
    labels: list[torch.Tensor],
    size: tuple[int, int],
    background: int | None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """:func:`box_mask` for a batch.

    Args:
        boxes: per image ``(N_i, 4)`` xyxy pixels (a collated detection batch's ``"boxes"``).
        labels: per image ``(N_i,)`` labels.
        size: ``(H, W)`` of the images.
        background: label outside every box (``None``: ``ignore_index``).
        ignore_index: label of ignored pixels.

    Returns:
        ``(B, H, W)`` int64 masks.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"got {len(boxes)} box tensors for {len(labels)} label tensors; give one of each per image")
    if not boxes:
        raise ValueError("box_masks needs at least one image")
    return torch.stack([box_mask(b, lab, size, background, ignore_index) for b, lab in zip(boxes, labels)])


@dataclass
class SemanticVarianceResult:
    """Everything :class:`SemanticVariance` knows after streaming.

    Attributes:
        semantic_variance: ``SV = S_B / S_T``, the trace form (nan when there is no variance or
            no data); ``to_dict`` also writes it as ``sv``, beside ``sv_whitened``.
        within_share: ``S_W / S_T = 1 - SV``.
        fisher_ratio: ``S_B / S_W`` (inf when ``S_W = 0``).
        s_between: ``S_B`` (squared feature units per pixel).
        s_within: ``S_W``.
        s_total: ``S_T``.
        num_pixels: ``N``, kept feature cells.
        class_counts: ``n_k`` per class, length ``K``.
        class_between_share: ``n_k |mu_k - mu|^2 / (N S_T)``; sums to ``SV``.
        class_within_share: ``sum_{i in k} |f_i - mu_k|^2 / (N S_T)``; sums to ``1 - SV``.
        channel_semantic_variance: per channel ``SV_c`` (length ``C``), when tracked.
        grid: ``[h, w]`` of the cells SV was computed on (of the last batch; the common grid
            with ``stride``, the tap's own grid without).
        stride: the common grid's stride (``None``: the tap's own grid).
        sv_whitened: the scale-invariant form ``tr(S_T^-1 S_B^x) / min(K - 1, C)``, between-class
            scatter crossed between two halves of the images, free of the chance term (module
            docstring); nan when not tracked.
        sv_whitened_plugin: ``tr(S_T^-1 S_B) / min(K - 1, C)`` (Pillai's trace over its maximum,
            in ``[0, 1]``), biased upwards by chance when channels are many against the
            independent cells.
    """

    semantic_variance: float
    within_share: float
    fisher_ratio: float
    s_between: float
    s_within: float
    s_total: float
    num_pixels: int
    class_counts: list[int]
    class_between_share: list[float]
    class_within_share: list[float]
    channel_semantic_variance: list[float] | None = field(default=None, repr=False)
    grid: list[int] | None = None
    stride: int | None = None
    sv_whitened: float = math.nan
    sv_whitened_plugin: float = math.nan

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["sv"] = self.semantic_variance  # the trace form under the name the whitened form sits beside
        return out


def _scatter(cnt: torch.Tensor, s: torch.Tensor, sqn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trace-form scatter from per-class statistics, batched over leading dims.

    Args:
        cnt: ``(..., K)`` class counts.
        s: ``(..., K, C)`` per-class sums of the (shifted) features.
        sqn: ``(..., K)`` per-class sums of squared norms.

    Returns:
        ``N (...)``, ``n_k |mu_k - mu|^2 (..., K)`` and ``sum_{i in k} |f_i - mu_k|^2 (..., K)``
        (both 0 for absent classes).
    """
    n = cnt.sum(-1)
    present = cnt > 0
    safe = cnt.clamp(min=1)
    mu = s.sum(-2) / n.clamp(min=1e-300)[..., None]
    between = cnt * ((s / safe[..., None] - mu[..., None, :]) ** 2).sum(-1) * present
    within = (sqn - (s * s).sum(-1) / safe).clamp(min=0) * present
    return n, between, within


def whitened_sv(cnt: torch.Tensor, s: torch.Tensor, second: torch.Tensor,
                ridge: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whitened semantic variance, split-half and plug-in, batched over a leading dim.

    Channels are standardized by their standard deviation (constant channels, variance below
    ``1e-12`` of their second moment, are dropped) and ``ridge`` is added to the diagonal of the
    resulting correlation matrix before the Cholesky solve (module docstring).

    Args:
        cnt: ``(R, 2, K)`` class counts of the two halves of the images.
        s: ``(R, 2, K, C)`` per-class sums of the (shifted) features of each half.
        second: ``(R, C, C)`` sums of ``z z^T`` of the (shifted) features, both halves.
        ridge: added to the correlation matrix's diagonal (default :data:`WHITENED_RIDGE`).

    Returns:
        ``(split, plugin)``, each ``(R,)``: ``tr(S_T^-1 S_B^x) / min(K - 1, C)`` with the
        between-class scatter crossed between the halves (no chance term; can be slightly
        negative) and ``tr(S_T^-1 S_B) / min(K - 1, C)`` (Pillai's trace, in ``[0, 1]``); nan with
        fewer than 2 classes present or no varying channel.
    """
    ridge = WHITENED_RIDGE if ridge is None else ridge
    ctot, stot = cnt.sum(1), s.sum(1)                                         # (R, K), (R, K, C)
    n = ctot.sum(-1).clamp(min=1e-300)
    mu = stot.sum(-2) / n[:, None]
    # S_T = second / n - mu mu^T, in place: this (R, C, C) tensor is the largest of the computation
    st = (second / n[:, None, None]).baddbmm_(mu[:, :, None], mu[:, None, :], alpha=-1.0)
    var = torch.diagonal(st, dim1=1, dim2=2).clone()
    live = var > 1e-12 * (var + mu * mu)  # variance against the channel's second moment (about the shift)
    # A ridge on the standardized scatter, corr + ridge I with corr = D S_T D and D = diag(var)^-1/2,
    # gives tr((corr + ridge I)^-1 D S_B D) = tr((S_T + ridge diag(var))^-1 S_B): the same number
    # without forming corr. A constant channel gets 1 on the diagonal (its class means are equal,
    # so it adds nothing) and is not counted in min(K - 1, C).
    torch.diagonal(st, dim1=1, dim2=2).add_(torch.where(live, ridge * var, torch.ones_like(var)))
    chol, info = torch.linalg.cholesky_ex(st)

    def whitened_deviations(c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``L^-1 (mu_k - mu)`` of counts ``(R, K)`` and sums ``(R, K, C)``: ``(R, C, K)``."""
        m = t.sum(-2) / c.sum(-1).clamp(min=1e-300)[:, None]
        d = (t / c.clamp(min=1)[..., None] - m[:, None, :]) * (c > 0)[..., None] * live[:, None, :]
        return torch.linalg.solve_triangular(chol, d.transpose(1, 2), upper=False)

    y = whitened_deviations(ctot, stot)
    plugin = ((y * y).sum(1) * ctot).sum(-1) / n                              # tr(S_T^-1 S_B)
    ya, yb = whitened_deviations(cnt[:, 0], s[:, 0]), whitened_deviations(cnt[:, 1], s[:, 1])
    both = (cnt[:, 0] > 0) & (cnt[:, 1] > 0)  # a class seen in one half only has no crossed term
    split = ((ya * yb).sum(1) * ctot * both).sum(-1) / n                      # tr(S_T^-1 S_B^x)
    dof = torch.minimum((ctot > 0).sum(-1) - 1, live.sum(-1)).to(plugin.dtype)
    ok = (dof > 0) & (info == 0)
    nan = torch.full_like(plugin, math.nan)
    return (torch.where(ok & (both.sum(-1) >= 2), split / dof.clamp(min=1), nan),
            torch.where(ok, plugin / dof.clamp(min=1), nan))


class _Stencil:
    """Bilinear upsampling (``align_corners=False``) of an ``(h0, w0)`` map to ``(h, w)`` as a
    stencil: grid cell ``(i, j)`` is ``sum_{s, t in {0, 1}} ly[i, s] lx[j, t] f[ry[i, s], rx[j, t]]``
    (the two source rows ``ry`` and columns ``rx`` of the cell and their weights, as in PyTorch's
    ``upsample_bilinear2d``: source coordinate ``(i + 0.5) h0 / h - 0.5``, clamped at 0 and at
    the last row)."""

    def __init__(self, size: tuple[int, int], grid: tuple[int, int], device: torch.device) -> None:
        (h0, w0), (h, w) = size, grid
        self.size, self.device = (h0, w0), device
        ry, ly = self._axis(h0, h, device)  # (h, 2)
        rx, lx = self._axis(w0, w, device)  # (w, 2)
        # terms of the 4 corners: (2, 2, h, w) source cell and weight of each grid cell
        self.cell = (ry.T.view(2, 1, h, 1) * w0 + rx.T.view(1, 2, 1, w)).reshape(4, h * w)
        self.weight = (ly.T.view(2, 1, h, 1) * lx.T.view(1, 2, 1, w)).reshape(4, h * w)
        # pairs of corners (16): the product of their weights, and the offset d = (dy + 1) * 3 +
        # (dx + 1) of the second from the first with the first's cell p, as index d * n_t + p
        dy = ry.T.view(2, 1, h) - ry.T.view(1, 2, h)  # (2, 2, h): second row minus first
        dx = rx.T.view(2, 1, w) - rx.T.view(1, 2, w)
        code = ((dy.view(2, 2, 1, 1, h, 1) * -1 + 1) * 3 + (dx.view(1, 1, 2, 2, 1, w) * -1 + 1))
        # code[s, s', t, t'] = (ry[s'] - ry[s] + 1) * 3 + (rx[t'] - rx[t] + 1)
        first = ry.T.view(2, 1, 1, 1, h, 1) * w0 + rx.T.view(1, 1, 2, 1, 1, w)
        wprod = (ly.T.view(2, 1, 1, 1, h, 1) * ly.T.view(1, 2, 1, 1, h, 1)
                 * lx.T.view(1, 1, 2, 1, 1, w) * lx.T.view(1, 1, 1, 2, 1, w))
        shape = (2, 2, 2, 2, h, w)
        self.pair_index = (code.expand(shape) * (h0 * w0) + first.expand(shape)).reshape(16, h * w)
        self.pair_weight = wprod.expand(shape).reshape(16, h * w)

    @staticmethod
    def _axis(n0: int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Source indices ``(n, 2)`` and weights ``(n, 2)`` of 1-d linear upsampling ``n0 -> n``."""
        src = ((torch.arange(n, device=device, dtype=torch.float64) + 0.5) * (n0 / n) - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n0 - 1)
        i1 = (i0 + 1).clamp(max=n0 - 1)
        l1 = src - i0
        return torch.stack([i0, i1], 1), torch.stack([1 - l1, l1], 1)

    def class_weights(self, labels: torch.Tensor, keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A^T D_k 1`` ``(K, n_t)`` and ``A^T D_k A`` as a 3 x 3 stencil ``(K, 9, n_t)`` (entry
        ``[k, d, p]`` couples cell ``p`` with its neighbour at offset ``d``) for one image's grid
        labels ``(h, w)`` and kept cells ``(h, w)``."""
        n_t = self.size[0] * self.size[1]
        kept = keep.reshape(-1)
        lab = labels.reshape(-1)[kept]
        v = torch.zeros(k * n_t, dtype=torch.float64, device=self.device)
        v.index_add_(0, (lab * n_t + self.cell[:, kept]).reshape(-1), self.weight[:, kept].reshape(-1))
        wk = torch.zeros(k * n_t * 9, dtype=torch.float64, device=self.device)
        wk.index_add_(0, (lab * (n_t * 9) + self.pair_index[:, kept]).reshape(-1),
                      self.pair_weight[:, kept].reshape(-1))
        return v.view(k, n_t), wk.view(k, 9, n_t)

    def neighbours(self, fs: torch.Tensor) -> Iterator[torch.Tensor]:
        """For each offset ``d = (dy + 1) * 3 + (dx + 1)`` in turn: ``fs`` ``(C, n_t)`` at each cell's
        neighbour ``p + (dy, dx)``, ``(C, h0, w0)`` (zero outside the map, where the stencil is 0)."""
        h0, w0 = self.size
        pad = F.pad(fs.view(-1, h0, w0), (1, 1, 1, 1))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yield pad[:, 1 + dy : 1 + dy + h0, 1 + dx : 1 + dx + w0]


class SemanticVariance:
    """Streaming semantic variance of one tap (see the module docstring for the definition).

    Args:
        num_classes: ``K``.
        ignore_index: label dropped from the statistics.
        purity: area-vote threshold of :func:`labels_to_grid`.
        per_channel: also keep what per-channel values need (same ``O(K * C)`` memory; off saves
            nothing asymptotically, only a constant).
        stride: measure on the common grid ``ceil(H / stride) x ceil(W / stride)`` of the mask's
            ``H x W`` (features resampled by :func:`resample_features`; see the module
            docstring); ``None``: on the tap's own grid.
        whitened: also keep the ``C x C`` second moment the whitened form needs.
        blocks: ``G``: keep the class statistics (and second moment) per block of images, for
            :meth:`replicates` (1: totals only).
        whitened_blocks: keep the ``C x C`` second moment per block too (the whitened forms'
            replicates); False keeps one total (their point values only), for wide taps. Even: block ``g`` lies in half ``g mod 2`` of
            the images (split-half whitened form); without blocks image ``i`` is in half ``i mod 2``.

    Example:
        >>> sv = SemanticVariance(num_classes=40)
        >>> for feats, mask in stream:               # (B, C, h, w), (B, H, W)
        ...     sv.update(feats, mask)
        >>> sv.compute().semantic_variance
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, purity: float = 0.5,
                 per_channel: bool = True, stride: int | None = None, whitened: bool = True,
                 blocks: int = 1, whitened_blocks: bool = True) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if stride is not None and int(stride) < 1:
            raise ValueError(f"stride must be a positive integer (or None for the tap's own grid), got {stride}")
        if int(blocks) < 1 or (int(blocks) > 1 and int(blocks) % 2):
            raise ValueError(f"blocks must be 1 or even (a block must lie in one half of the images), got {blocks}")
        self.stride = None if stride is None else int(stride)
        self.grid: tuple[int, int] | None = None
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.purity = float(purity)
        self.per_channel = per_channel
        self.whitened = whitened
        self.blocks = int(blocks)
        self.whitened_blocks = whitened_blocks
        self._cap = 1  # blocks allocated so far, grown (doubling) as images reach new blocks
        self._shift: torch.Tensor | None = None
        self._count: torch.Tensor | None = None    # (G, K)
        self._sum: torch.Tensor | None = None      # (G, K, C) sum of shifted features
        self._sqn: torch.Tensor | None = None      # (G, K) sum of squared norms of shifted features
        self._chan_sq: torch.Tensor | None = None  # (K, C) per-channel sums of squares (per_channel)
        self._second: torch.Tensor | None = None   # (G, C, C) sum of z z^T (whitened)
        self._half_count: torch.Tensor | None = None  # (2, K) class counts of each half of the images
        self._half_sum: torch.Tensor | None = None    # (2, K, C) per-class sums of each half
        self._images = 0  # images seen: without blocks, image i is in half i mod 2
        self._preset: torch.Tensor | None = None  # a shift fixed from outside (another process's)

    @staticmethod
    def state_bytes(num_classes: int, channels: int, whitened: bool = True) -> int:
        """Bytes of one block's float64 state for ``K`` classes and ``C`` channels."""
        return 8 * (num_classes * (channels + 2) + (channels * channels if whitened else 0))

    @property
    def shift(self) -> torch.Tensor | None:
        """The feature shift (mean cell of the first batch), None before any batch."""
        return self._shift

    def preset_shift(self, shift: torch.Tensor) -> None:
        """Shift by ``shift`` instead of the first batch's mean (before the first batch):
        processes that share a dataset shift alike, so their sums add up (:meth:`state`)."""
        self._preset = shift.detach().to(torch.float64)

    def _grow(self, cap: int) -> None:
        self._cap = cap
        self._count, self._sum, self._sqn = (grow_blocks(t, cap) for t in (self._count, self._sum, self._sqn))
        if self._second is not None and self.whitened_blocks:
            self._second = grow_blocks(self._second, cap)

    def state(self) -> list[torch.Tensor]:
        """Every sum, all ``G`` blocks allocated: what a sharded dataset adds up across processes
        (with the same shift, :meth:`preset_shift`). Empty before the first batch."""
        if self._count is None:
            return []
        self._grow(self.blocks)
        return [t for t in (self._count, self._sum, self._sqn, self._chan_sq, self._second, self._half_count,
                            self._half_sum) if t is not None]

    def update(self, features: torch.Tensor, mask: torch.Tensor, blocks: torch.Tensor | None = None,
               first_image: int | None = None, cache: dict[tuple, Any] | None = None) -> None:
        """Add a batch.

        Args:
            features: ``(B, C, h, w)`` tap output (any float dtype and device).
            mask: ``(B, H, W)`` labels of the same images at input resolution (or, without
                ``stride``, already at ``(h, w)``).
            blocks: ``(B,)`` block of each image, in ``[0, G)``; None: block 0.
            first_image: index of the batch's first image in the dataset (a sharded dataset's
                halves follow it); None: the images seen so far.
            cache: a dict shared by the accumulators of one batch's taps (the same ``mask``): the
                grid labels and the upsampling stencils are then computed once per grid and tap
                size instead of once per tap.
        """
        if features.dim() != 4:
            raise ValueError(f"features must be (B, C, h, w), got shape {tuple(features.shape)}")
        if mask.dim() != 3 or mask.shape[0] != features.shape[0]:
            raise ValueError(f"mask must be (B, H, W) with B={features.shape[0]} to match the "
                             f"features, got shape {tuple(mask.shape)}")
        b, c, h, w = features.shape
        if blocks is None:
            blocks = torch.zeros(b, dtype=torch.long)
        blocks = torch.as_tensor(blocks).reshape(-1).long().to(features.device)
        if blocks.numel() != b or (b and (int(blocks.min()) < 0 or int(blocks.max()) >= self.blocks)):
            raise ValueError(f"blocks must give each of the {b} images a block in [0, {self.blocks}), "
                             f"got shape {tuple(blocks.shape)}")
        if self.stride is not None:
            h, w = -(-mask.shape[-2] // self.stride), -(-mask.shape[-1] // self.stride)
        self.grid = (h, w)
        cache = {} if cache is None else cache
        key = ("grid", h, w, self.num_classes, self.ignore_index, self.purity)
        if key not in cache:
            cache[key] = labels_to_grid(mask.to(features.device), (h, w), self.num_classes, self.ignore_index,
                                        self.purity)
        grid = cache[key]
        keep_all = grid != self.ignore_index  # (B, h, w)
        h0, w0 = features.shape[-2:]
        # a tap coarser than the grid (bilinear upsampling, fewer cells): every sum at its own
        # resolution (_add_coarse); else on the grid's kept cells
        coarse = h0 * w0 < h * w and not (h0 >= h and w0 >= w)
        lab = grid[keep_all]
        per_image = keep_all.flatten(1).sum(1)
        blk = blocks.repeat_interleave(per_image)  # block of each kept cell
        # half of each image (split-half whitened form): its block's parity with blocks (image i
        # of a run is in block i mod G, G even, so also i mod 2), else i mod 2 by arrival order
        start = self._images if first_image is None else int(first_image)
        halves = blocks % 2 if self.blocks > 1 else (start + torch.arange(b, device=blocks.device)) % 2
        self._images += b
        half = halves.repeat_interleave(per_image)
        k = self.num_classes
        if coarse:
            key = ("stencil", h0, w0, h, w, self.num_classes, self.ignore_index, self.purity)
            if key not in cache:
                st = _Stencil((h0, w0), (h, w), features.device)
                per_image_weights = [st.class_weights(grid[i], keep_all[i], k) for i in range(b)]
                cache[key] = (st, tuple(torch.stack(t) for t in zip(*per_image_weights)))  # (B, K, n_t), (B, K, 9, n_t)
            stencil, weights = cache[key]
        if self._shift is None:
            kw = {"dtype": torch.float64, "device": features.device}
            n = int(per_image.sum())
            if self._preset is not None:
                self._shift = self._preset.to(**kw)
            elif n and not coarse:  # the kept cells' mean
                self._shift = sum(sum(z.sum(0) for z, _ in self._grid_rows(features[i].detach(), grid[i]))
                                  for i in range(b)) / n
            elif n:  # the kept cells' mean: sum_i 1^T D A f_i / N
                self._shift = sum(weights[0][i].sum(0) @ features[i].detach().to(torch.float64).reshape(c, -1).T
                                  for i in range(b)) / n
            else:
                self._shift = torch.zeros(c, **kw)
            self._count = torch.zeros(self._cap, k, **kw)
            self._sum = torch.zeros(self._cap, k, c, **kw)
            self._sqn = torch.zeros(self._cap, k, **kw)
            self._chan_sq = torch.zeros(k, c, **kw) if self.per_channel else None
            self._second = torch.zeros(self._cap if self.whitened_blocks else 1, c, c, **kw) if self.whitened else None
            self._half_count = torch.zeros(2, k, **kw)
            self._half_sum = torch.zeros(2, k, c, **kw)
        elif c != self._shift.numel():
            raise ValueError(f"features changed channel count: {c} vs {self._shift.numel()} before")
        if b and int(blocks.max()) >= self._cap:
            self._grow(min(self.blocks, max(int(blocks.max()) + 1, 2 * self._cap)))
        if lab.numel() == 0:
            return
        ones = torch.ones_like(lab, dtype=torch.float64)
        self._count.view(-1).index_add_(0, blk * k + lab, ones)
        self._half_count.view(-1).index_add_(0, half * k + lab, ones)
        if coarse:  # images in groups of about CHUNK_BYTES of float64 features
            step = max(1, CHUNK_BYTES // (8 * c * h0 * w0))
            for i in range(0, b, step):
                self._add_coarse(features[i:i + step].detach(), stencil, weights[0][i:i + step],
                                 weights[1][i:i + step], blocks[i:i + step], halves[i:i + step])
            return
        for i in range(b):  # one image, and in it chunks of cells, at a time: no map-sized temporaries
            sums = self._sum.new_zeros(k, c)  # per class: sum of z, sum of z * z by channel
            squares = self._sum.new_zeros(k, c)
            second = self._second[int(blocks[i]) if self.whitened_blocks else 0] if self._second is not None else None
            for z, lab_i in self._grid_rows(features[i].detach(), grid[i]):
                z -= self._shift
                one_hot = F.one_hot(lab_i, k).to(z)  # (n, K): class sums as products, not scatters
                sums.addmm_(one_hot.T, z)
                squares.addmm_(one_hot.T, z * z)
                if second is not None:
                    second.addmm_(z.T, z)
            self._sum[int(blocks[i])] += sums
            self._half_sum[int(halves[i])] += sums
            self._sqn[int(blocks[i])] += squares.sum(1)
            if self._chan_sq is not None:
                self._chan_sq += squares

    def _grid_rows(self, features: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One image's features ``(C, h0, w0)`` at the kept cells of its grid labels ``(h, w)``:
        float64 rows ``(n, C)`` with their labels ``(n,)``, in chunks of ``CHUNK_BYTES`` (map-sized
        float64 temporaries cost more in page faults than in arithmetic at 480x640). A tap on
        the grid is read in place; a finer one (a stride-2 stem) is area-averaged onto it in
        float64, a group of channels at a time."""
        c = features.shape[0]
        grid = tuple(labels.shape)
        if tuple(features.shape[-2:]) == grid:
            flat = features.reshape(c, -1)
        else:
            group = max(1, CHUNK_BYTES // (8 * features[0].numel()))
            flat = torch.cat([resample_features(features[j:j + group].to(torch.float64)[None], grid)[0].reshape(
                min(group, c - j), -1) for j in range(0, c, group)])
        labels = labels.reshape(-1)
        rows = max(1, CHUNK_BYTES // (8 * c))
        for j in range(0, labels.numel(), rows):
            lab = labels[j:j + rows]
            keep = lab != self.ignore_index
            if bool(keep.any()):
                yield flat[:, j:j + rows].T.to(torch.float64)[keep], lab[keep]

    def _add_coarse(self, features: torch.Tensor, stencil: _Stencil, v: torch.Tensor, wk: torch.Tensor,
                    blocks: torch.Tensor, halves: torch.Tensor) -> None:
        """Add a group of ``g`` images of a tap coarser than the grid, every sum at the tap's
        resolution.

        With ``f`` an image's ``(n_t, C)`` features (``n_t = h0 w0`` cells), ``A`` the bilinear
        upsampling to the grid (``h w x n_t``, rows summing to 1, so ``A f - 1 s^T = A (f - 1 s^T)``
        for the shift ``s``) and ``D_k`` the 0/1 diagonal of the grid cells kept with class
        ``k``, the grid sums are ``sum_k = (A^T D_k 1)^T f'`` and ``sum_{i in k} z_i z_i^T =
        f'^T (A^T D_k A) f'`` with ``f' = f - 1 s^T``. ``A^T D_k A`` couples only neighbouring
        tap cells (3 x 3), held as ``wk`` ``(g, K, 9, n_t)``; ``v = A^T D_k 1`` is ``(g, K, n_t)``.
        An image costs ``O(n_t C^2 + 9 K n_t C)`` instead of ``O(h w C^2)``; the group's images
        go through each step together (batched products), ``blocks`` and ``halves`` ``(g,)``."""
        g, c = features.shape[:2]
        fs = features.to(torch.float64).reshape(g, c, -1) - self._shift[:, None]  # f'^T, (g, C, n_t)
        sums = torch.bmm(v, fs.transpose(1, 2))  # (g, K, C)
        # sum_{i in k} z_ic^2 = sum_{d, p} wk[k, d, p] f'[p, c] f'[p + d, c], and
        # (A^T D A) f' = sum_d (sum_k wk[k, d]) f'[. + d]
        chan = fs.new_zeros(g, c, wk.shape[1])  # (g, C, K)
        wf = torch.zeros_like(fs)  # ((A^T D A) f')^T, (g, C, n_t)
        w_all = wk.sum(1)  # (g, 9, n_t)
        for d, nb in enumerate(stencil.neighbours(fs.reshape(g * c, -1))):
            nb = nb.reshape(g, c, -1)
            chan.baddbmm_(fs * nb, wk[:, :, d].transpose(1, 2))
            wf.addcmul_(nb, w_all[:, None, d])
        chan = chan.transpose(1, 2)  # (g, K, C)
        self._sum.index_add_(0, blocks, sums)
        self._half_sum.index_add_(0, halves, sums)
        self._sqn.index_add_(0, blocks, chan.sum(2))
        if self._chan_sq is not None:
            self._chan_sq += chan.sum(0)
        if self._second is None:
            return
        if not self.whitened_blocks or bool((blocks == blocks[0]).all()):  # one C x C product for the group
            self._second[int(blocks[0]) if self.whitened_blocks else 0].addmm_(
                fs.transpose(0, 1).reshape(c, -1), wf.transpose(0, 1).reshape(c, -1).T)
        else:
            for j, blk in enumerate(blocks.tolist()):
                self._second[blk].addmm_(fs[j], wf[j].T)

    def compute(self) -> SemanticVarianceResult:
        """The statistics over everything seen so far."""
        k = self.num_classes
        if self._count is None or float(self._count.sum()) == 0:
            nan = math.nan
            return SemanticVarianceResult(nan, nan, nan, nan, nan, nan, 0, [0] * k, [nan] * k, [nan] * k, None,
                                          list(self.grid) if self.grid else None, self.stride)
        cnt, s, sqn = self._count.sum(0), self._sum.sum(0), self._sqn.sum(0)
        n, between_k, within_k = _scatter(cnt, s, sqn)
        if float(n) < MIN_CELLS:
            where = f"the common stride-{self.stride} grid" if self.stride else "the tap's own grid"
            warnings.warn(f"semantic variance computed on only {int(n)} labelled cells (< {MIN_CELLS}) of "
                          f"{where} {self.grid[0]}x{self.grid[1]}: too few for a stable value; use more or larger "
                          "images, or a smaller stride (fusionzoo.interpret.run(sv_stride=...))", stacklevel=2)
        s_b, s_w = float(between_k.sum() / n), float(within_k.sum() / n)
        s_t = s_b + s_w
        sv = s_b / s_t if s_t > 0 else math.nan
        chan = None
        if self._chan_sq is not None:
            present = cnt > 0
            safe = cnt.clamp(min=1)[:, None]
            mu, mu_k = s.sum(0) / n, s / safe
            b_c = (cnt[:, None] * (mu_k - mu) ** 2 * present[:, None]).sum(0)
            w_c = ((self._chan_sq - s * s / safe) * present[:, None]).clamp(min=0).sum(0)
            t_c = b_c + w_c
            chan = torch.where(t_c > 0, b_c / t_c.clamp(min=1e-300), torch.full_like(t_c, math.nan)).tolist()
        split = plugin = math.nan
        if self._second is not None:
            split, plugin = (float(v[0]) for v in whitened_sv(self._half_count[None], self._half_sum[None],
                                                               self._second.sum(0)[None]))
        denom = float(n) * s_t
        return SemanticVarianceResult(
            semantic_variance=sv,
            within_share=(s_w / s_t) if s_t > 0 else math.nan,
            fisher_ratio=(s_b / s_w) if s_w > 0 else (math.inf if s_b > 0 else math.nan),
            s_between=s_b,
            s_within=s_w,
            s_total=s_t,
            num_pixels=int(n),
            class_counts=[int(v) for v in cnt.tolist()],
            class_between_share=[float(v) / denom if denom > 0 else math.nan for v in between_k.tolist()],
            class_within_share=[float(v) / denom if denom > 0 else math.nan for v in within_k.tolist()],
            channel_semantic_variance=chan,
            grid=list(self.grid) if self.grid else None,
            stride=self.stride,
            sv_whitened=split,
            sv_whitened_plugin=plugin,
        )

    def replicates(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact values on reweighted data: replicate ``r`` counts every cell of block ``g``
        ``weights[r, g]`` times (a block of weight ``k`` is its images duplicated ``k`` times).

        Every statistic is a sum over cells, so the replicate's sums are the weighted sums of the
        blocks'; the whitened form solves one ``C x C`` system per replicate (in chunks that
        keep about 32 MiB of matrices at a time).

        Args:
            weights: ``(R, G)`` non-negative block weights.

        Returns:
            ``{"sv": (R,), "within_share": (R,), "class_between_share": (R, K), "sv_whitened": (R,),
            "sv_whitened_plugin": (R,)}`` (the whitened forms only when tracked per block), float64 on the
            CPU. Each copy of a duplicated block stays in its block's half (half ``g mod 2``).
        """
        wt = torch.as_tensor(weights, dtype=torch.float64)
        if wt.dim() != 2 or wt.shape[1] != self.blocks:
            raise ValueError(f"weights must be (R, {self.blocks}) block weights, got shape {tuple(wt.shape)}")
        if self._count is None:
            nan = torch.full((wt.shape[0],), math.nan, dtype=torch.float64)
            return {"sv": nan, "within_share": nan.clone(),
                    "class_between_share": torch.full((wt.shape[0], self.num_classes), math.nan, dtype=torch.float64)}
        wt = wt.to(self._count.device)[:, : self._cap]  # blocks never allocated are empty
        cnt = wt @ self._count                                  # (R, K)
        s = torch.einsum("rg,gkc->rkc", wt, self._sum)          # (R, K, C)
        _, between, within = _scatter(cnt, s, wt @ self._sqn)
        total = between.sum(-1) + within.sum(-1)
        ok = total > 0
        nan = torch.full_like(total, math.nan)
        out = {"sv": torch.where(ok, between.sum(-1) / total.clamp(min=1e-300), nan),
               "within_share": torch.where(ok, within.sum(-1) / total.clamp(min=1e-300), nan),
               "class_between_share": torch.where(ok[:, None], between / total.clamp(min=1e-300)[:, None],
                                                  nan[:, None].expand_as(between))}
        if self._second is not None and self.whitened_blocks:
            c = self._second.shape[-1]
            chunk = max(1, (1 << 22) // (c * c))
            flat = self._second.reshape(self._cap, -1)
            odd = torch.arange(self._cap, device=wt.device) % 2 == 1  # block g lies in half g mod 2
            hc = torch.stack([cnt - wt[:, odd] @ self._count[odd], wt[:, odd] @ self._count[odd]], 1)
            hs = torch.einsum("rg,gkc->rkc", wt[:, odd], self._sum[odd])
            hs = torch.stack([s - hs, hs], 1)
            parts = [whitened_sv(hc[i:i + chunk], hs[i:i + chunk], (wt[i:i + chunk] @ flat).view(-1, c, c))
                     for i in range(0, wt.shape[0], chunk)]
            out["sv_whitened"] = torch.cat([p[0] for p in parts])
            out["sv_whitened_plugin"] = torch.cat([p[1] for p in parts])
        return {key: v.cpu() for key, v in out.items()}


def semantic_variance(features: torch.Tensor, mask: torch.Tensor, num_classes: int,
                      ignore_index: int = 255, purity: float = 0.5,
                      stride: int | None = None) -> SemanticVarianceResult:
    """One-shot :class:`SemanticVariance` over a single batch.

    Args:
        features: ``(B, C, h, w)``.
        mask: ``(B, H, W)`` labels.
        num_classes: ``K``.
        ignore_index: dropped label.
        purity: area-vote threshold.
        stride: common-grid stride (see :class:`SemanticVariance`); ``None``: the tap's grid.

    Returns:
        The :class:`SemanticVarianceResult`.
    """
    acc = SemanticVariance(num_classes, ignore_index, purity, stride=stride)
    acc.update(features, mask)
    return acc.compute()
