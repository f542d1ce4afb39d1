"""Representation health per tap: effective rank and feature norms.

- **Effective rank** (Roy & Vetterli, "The effective rank: a measure of effective
  dimensionality", EUSIPCO 2007): ``erank(X) = exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j``
  the normalized singular values of the (column-centred, by default) example matrix ``X (n, d)``
  and ``H`` the Shannon entropy in nats. It lies in ``[1, rank(X)]``; a collapsed modality branch
  (all features along a few directions) has a low effective rank. Streaming: the singular values
  of the centred ``X`` are the square roots of the eigenvalues of its scatter matrix
  ``Xc^T Xc = sum x x^T - n mu mu^T``, so :class:`EffectiveRank` keeps ``O(d^2)`` numbers.
- **Feature norm**: the mean L2 norm over channels of a tap's feature vectors (one per pixel).
  The ratio of two modalities' norms at the same stage shows whether one branch dominates what
  a sum- or concatenation-based fusion receives.
"""

from __future__ import annotations

import math

import torch

__all__ = ["EffectiveRank", "FeatureNorm", "effective_rank", "pixel_rows"]

NORM_CHUNK_BYTES = 4 << 20  # float64 channels of one image's map squared at a time (FeatureNorm.update)


def pixel_rows(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B * h * w, C)`` rows (one per pixel); ``(B, C)`` unchanged."""
    if features.dim() == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    if features.dim() == 2:
        return features
    raise ValueError(f"expected (B, C, h, w) or (B, C) features, got shape {tuple(features.shape)}")


def _erank_from_singular(s: torch.Tensor) -> float:
    s = s.clamp(min=0)
    total = s.sum()
    if total <= 0:
        return math.nan
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(x: torch.Tensor, center: bool = True) -> float:
    """Effective rank of an example matrix (exact, in memory).

    Args:
        x: ``(n, d)`` rows = examples, or ``(B, C, h, w)`` (every pixel is a row).
        center: subtract the column mean first (the spread of the representation, not its
            offset); ``False`` follows Roy & Vetterli on the raw matrix.

    Returns:
        ``exp(entropy of sigma / sum(sigma))``; nan for an all-zero matrix.

    Example:
        >>> effective_rank(torch.eye(5), center=False)
        5.0...
    """
    x = pixel_rows(torch.as_tensor(x)).double()
    if center:
        x = x - x.mean(0, keepdim=True)
    return _erank_from_singular(torch.linalg.svdvals(x))


class EffectiveRank:
    """Streaming effective rank of one tap over a dataset (``O(C^2)`` memory).

    Args:
        center: as in :func:`effective_rank`.
    """

    def __init__(self, center: bool = True) -> None:
        self.center = center
        self.n = 0
        self._shift: torch.Tensor | None = None
        self._s: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        self._preset: torch.Tensor | None = None  # a shift fixed from outside (another process's)

    @property
    def shift(self) -> torch.Tensor | None:
        """The row shift (the first batch's mean when centring), None before any batch."""
        return self._shift

    def preset_shift(self, shift: torch.Tensor) -> None:
        """Shift by ``shift`` instead of the first batch's mean (before the first batch), so that
        processes sharing a dataset can add up their sums."""
        self._preset = shift.detach().to(torch.float64)

    def update(self, features: torch.Tensor) -> None:
        """Add ``(B, C, h, w)`` features (every pixel a row) or ``(n, C)`` rows."""
        x = pixel_rows(features.detach()).double()
        if self._g is None:
            # shift by the first batch mean when centring: the scatter is shift invariant and the
            # shift keeps sum x x^T from cancelling against n mu mu^T
            self._shift = (self._preset.to(x) if self._preset is not None else x.mean(0) if self.center
                           else torch.zeros(x.shape[1], dtype=torch.float64, device=x.device))
            self._s = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self._g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self._g.shape[0]:
            raise ValueError(f"features changed channel count: {x.shape[1]} vs {self._g.shape[0]} before")
        z = x - self._shift
        self.n += z.shape[0]
        self._s += z.sum(0)
        self._g += z.T @ z

    def state(self) -> list[torch.Tensor]:
        """The sums over rows (``n`` aside), which processes sharing a dataset add up."""
        return [t for t in (self._s, self._g) if t is not None]

    def compute(self) -> float:
        """The effective rank of everything seen so far."""
        if self._g is None or self.n == 0:
            return math.nan
        g = self._g
        if self.center:
            g = g - torch.outer(self._s, self._s) / self.n
        eig = torch.linalg.eigvalsh(g).clamp(min=0)
        return _erank_from_singular(eig.sqrt())


class FeatureNorm:
    """Streaming mean L2 norm (over channels) of a tap's per-pixel feature vectors."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0

    def update(self, features: torch.Tensor) -> None:
        """Add ``(B, C, h, w)`` or ``(n, C)`` features."""
        x = features.detach()
        if x.dim() == 2:
            x = x.T[None, :, :, None]  # (1, C, n, 1): the rows as pixels
        elif x.dim() != 4:
            raise ValueError(f"expected (B, C, h, w) or (B, C) features, got shape {tuple(x.shape)}")
        b, c, h, w = x.shape
        # squared norms summed in float64 over about NORM_CHUNK_BYTES at a time (several images
        # when they are small, a few channels of one when it is large): no float64 copy of the map
        images = max(1, NORM_CHUNK_BYTES // (8 * c * h * w))
        group = c if images > 1 else max(1, NORM_CHUNK_BYTES // (8 * h * w))
        for i in range(0, b, images):
            sq = torch.zeros(min(images, b - i), h, w, dtype=torch.float64, device=x.device)
            for j in range(0, c, group):
                y = x[i:i + images, j:j + group].double()
                sq += (y * y).sum(1)
            self.total += float(sq.sqrt_().sum())
        self.n += b * h * w

    def compute(self) -> float:
        return self.total / self.n if self.n else math.nan
