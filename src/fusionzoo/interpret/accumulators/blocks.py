"""Bootstrap intervals of the representation metrics (CKA, reliance, semantic variance) over
blocks of images, exact and in bounded memory.

Why blocks. The other metrics keep ``R`` weighted copies of their streaming state
(:mod:`fusionzoo.interpret.intervals`). The representation metrics cannot: their state is
``O(d^2)`` moments per tap and tap pair (28.6 MiB for CKA and 51 MiB for reliance on
``esanet_resnet18``), so ``R = 200`` copies would take 6 and 10 GB. A replicate's CKA needs
``||sum_i w_ri M_i||_F^2`` with ``M_i`` an image's cross moment: quadratic in the weights, so no
set of per-replicate scalars gives it, and keeping fewer weighted copies only changes ``R`` for
``G``. They therefore keep their state once per **block** of images instead:

- image ``i`` (global index, as the Poisson weights) belongs to block ``i mod G``;
- block ``g`` takes the Poisson weights of image ``g`` (``BatchContext.weights`` of that image);
- replicate ``r`` is the data set with every image of block ``g`` duplicated ``W_rg`` times, and
  its value is computed *exactly* from the ``G`` block states (CKA through the ``G x G`` Gram of
  the block moments and a ``G x G x G`` tensor, :meth:`fusionzoo.interpret.cka.StreamingCKA.replicates`;
  semantic variance by weighting its per-block sums).

What the interval resamples. With at most ``G`` images a block is one image and this *is* the
per-image Poisson bootstrap of the other metrics (the same weights). With more images it is a
bootstrap of ``G`` blocks: the blocks are independent and identically distributed when the
images are (each is every ``G``-th image), so it estimates the same sampling distribution,
resting on ``G`` units instead of ``N``. On synthetic draws (60 or 200 images, 60-100 seeds)
the 95 % percentile intervals of CKA and of the trace-form semantic variance covered the
large-sample value in 0.87-0.92 of seeds with ``G = 20`` and in 0.84-0.97 with one block per
image: blocks did not make the (slightly narrow) percentile bootstrap worse. Memory is ``G`` times the metric's state (grown block by block as
images arrive), capped by :data:`BLOCK_BUDGET`; when the cap leaves fewer than
:data:`MIN_BLOCKS` blocks, or the data has fewer than :data:`MIN_BLOCKS` images, the metric gives
no intervals and says so (``settings["<metric>_intervals"]["withheld"]``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ...engine.distributed import all_reduce_sum_
from ..intervals import percentile_interval
from .base import BatchContext

__all__ = ["BIAS_LIMIT", "BLOCKS", "BLOCK_BUDGET", "MIN_BLOCKS", "BlockBootstrap", "checked_interval", "row_blocks"]

BLOCKS = 20  # blocks kept when memory allows (coverage as with one block per image: module docstring)
MIN_BLOCKS = 8  # a bootstrap over fewer units than this cannot resolve an interval: withheld
BLOCK_BUDGET = 1 << 30  # bytes of block state one accumulator may keep (1 GiB)
BIAS_LIMIT = 0.5  # |bootstrap bias| above this many bootstrap standard deviations: interval withheld


def checked_interval(replicates: torch.Tensor, point: float, level: float) -> list[float]:
    """The percentile interval of ``replicates`` (``(R,)``), or ``[nan, nan]`` (the data cannot
    resolve it) when the bootstrap says the estimator moves with the sample itself: its bias
    ``mean(replicates) - point`` exceeds :data:`BIAS_LIMIT` bootstrap standard deviations.

    Why: a percentile interval is centred on the replicates, so a biased estimator's interval
    misses its own value (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, sec. 10.6,
    call a bias below 0.25 standard errors negligible). Seen on the whitened semantic variance of
    deep taps, where the channels are many against the independent cells and a replicate, holding
    about 63 % of the distinct images, changes the estimator's regime, and on trace-form values
    near 0, whose chance term grows when the images repeat.
    """
    lo, hi = percentile_interval(replicates, level)
    ok = replicates[torch.isfinite(replicates)]
    if not (math.isfinite(point) and math.isfinite(lo)) or ok.numel() < 2:
        return [math.nan, math.nan]
    if abs(float(ok.mean()) - point) > BIAS_LIMIT * float(ok.std()):
        return [math.nan, math.nan]
    return [lo, hi]


class BlockBootstrap:
    """The block layout and block weights of one accumulator (module docstring).

    Args:
        replicates: ``R`` (0: no intervals, one block).
        state_bytes: bytes of one copy of the accumulator's state (float64 moments).
        metric: the metric's name, for the message when intervals are withheld.

    Attributes:
        blocks: ``G`` (1 when the run keeps no replicates or the budget withholds them).
        withheld: why the metric gives no intervals although replicates were asked for, or None.
    """

    def __init__(self, replicates: int, state_bytes: int, metric: str) -> None:
        self.replicates = int(replicates)
        self.withheld: str | None = None
        g = min(BLOCKS, BLOCK_BUDGET // max(int(state_bytes), 1)) if self.replicates else 1
        g -= g % 2 if g > 1 else 0  # even: block g then lies in half g mod 2 of the images (split-half SV)
        if self.replicates and g < MIN_BLOCKS:
            self.withheld = (f"{metric} intervals withheld: one copy of its state is {state_bytes / 2**20:.0f} MiB, so "
                             f"fusionzoo.interpret.accumulators.blocks.BLOCK_BUDGET ({BLOCK_BUDGET / 2**20:.0f} MiB) "
                             f"holds {g} blocks, fewer than MIN_BLOCKS = {MIN_BLOCKS}; raise BLOCK_BUDGET")
            warnings.warn(self.withheld, stacklevel=3)
            g = 1
        self.blocks = max(int(g), 1)
        self.state_bytes = int(state_bytes)
        self._weights: torch.Tensor | None = None  # (R, G) float64
        self.images = 0

    @property
    def active(self) -> bool:
        """True when replicate values are to be computed."""
        return self.replicates > 0 and self.withheld is None

    def observe(self, batch: BatchContext) -> None:
        """Count the batch's images and record the weights of those whose global index
        ``g < G`` (block ``g``'s)."""
        self.images += batch.batch_size
        if not self.active or batch.weights is None:
            return
        if self._weights is None:
            self._weights = torch.zeros(batch.weights.shape[0], self.blocks, dtype=torch.float64)
        first, b = batch.first_image, batch.weights.shape[1]
        for j in range(max(0, min(b, self.blocks - first))):
            self._weights[:, first + j] = batch.weights[:, j].detach().to("cpu", torch.float64)

    def reduce(self) -> None:
        """Sum the image count and the block weights over processes (each block's weights come
        from the process that ran its first image)."""
        if self.active and self._weights is None:
            self._weights = torch.zeros(self.replicates, self.blocks, dtype=torch.float64)
        images = torch.tensor([float(self.images)], dtype=torch.float64)
        all_reduce_sum_([images, *([self._weights] if self._weights is not None else [])], "block weights")
        self.images = int(images)

    def image_blocks(self, batch: BatchContext) -> torch.Tensor:
        """``(B,)`` block of each image of the batch."""
        return (batch.first_image + torch.arange(batch.batch_size)) % self.blocks

    def weights(self) -> torch.Tensor | None:
        """``(R, G)`` block weights (blocks no image reached weigh 0: they are empty), or None:
        no replicates, or fewer than :data:`MIN_BLOCKS` non-empty blocks (then :attr:`withheld`
        says so: a bootstrap over so few units cannot resolve an interval)."""
        if not self.active:
            return None
        if min(self.images, self.blocks) < MIN_BLOCKS:
            self.withheld = (f"intervals withheld: {self.images} images give {min(self.images, self.blocks)} blocks, "
                             f"fewer than MIN_BLOCKS = {MIN_BLOCKS}; the data cannot resolve an interval")
            return None
        return self._weights

    def settings(self) -> dict[str, Any]:
        """What the metric's intervals rest on, for ``settings``."""
        if self.withheld is not None:
            return {"withheld": self.withheld}
        return {"unit": "block of images (image i in block i mod G; G blocks, each weighted by the Poisson weight "
                        "of its first image)" if self.blocks > 1 else "none",
                "blocks": self.blocks, "block_state_mib": round(self.blocks * self.state_bytes / 2**20, 1)}


def row_blocks(batch: BatchContext, image_blocks: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``(num_rows,)`` block of each example row of ``batch`` (:meth:`BatchContext.rows` order:
    image-major, ``num_rows / B`` rows per image, or one per ground-truth box with ``rows="object"``)."""
    b = batch.batch_size
    if batch.spec.rows == "object":
        counts = torch.tensor([t["boxes"].shape[0] for t in batch.boxes()])
    else:
        if num_rows % b:
            raise ValueError(f"batch {batch.index}: {num_rows} rows for {b} images; expected the same number per image")
        counts = torch.full((b,), num_rows // b)
    return image_blocks.repeat_interleave(counts)
