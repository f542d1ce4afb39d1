"""Bootstrap intervals over images, carried inside the streaming accumulators.

Every headline number of :func:`fusionzoo.interpret.run` carries a 95 % interval (STYLE 14:
numbers travel with their uncertainty). The resampling unit is the image. We use the Poisson
bootstrap (Hanley & MacGibbon 2006; Chamandy et al. 2012): replicate ``r`` gives image ``i``
the weight ``w_ri ~ Poisson(1)``, which approximates the multinomial bootstrap for large n and,
unlike it, needs no knowledge of n in advance, so every accumulator keeps ``R`` weighted copies of
its streaming state (counts, sums, moments) and memory stays flat in the number of images.

The weights depend only on ``(seed, global image index)``: a dataset sharded over processes
draws the same weights as one process, so replicate states all-reduce exactly.

Protocol (see :mod:`.accumulators.base`):

- ``run`` draws :func:`poisson_weights` per batch into ``BatchContext.weights`` (``(R, B)``
  float64 on the model's device; None when ``replicates=0``);
- an accumulator that supports intervals keeps ``R`` replicate states, updated with those
  weights, and in ``compute()`` fills ``self.intervals``: a path relative to its section ->
  ``[lo, hi]`` (:func:`percentile_interval` of the replicate values);
- ``run`` prefixes the paths with the section name into ``InterpretResult.intervals``
  (``"contribution.shapley.rgb"``, ``"contribution.decomposition.rgb|depth.per_class.synergy.3"``,
  ``"semantic_variance.rgb.stage2.sv"``...): the path follows the section's JSON keys, list
  positions as integers. :func:`interval` reads one back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_LEVEL", "DEFAULT_REPLICATES", "interval", "interval_paths", "percentile_interval",
           "poisson_weights"]

DEFAULT_REPLICATES = 200  # percentile intervals at 95 % are stable to ~0.01 of their width from ~200 on
DEFAULT_LEVEL = 0.95

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates consecutive image seeds


def poisson_weights(seed: int, image_indices: Sequence[int], replicates: int,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Poisson(1) bootstrap weights ``(replicates, len(image_indices))`` in float64.

    Column ``j`` depends only on ``(seed, image_indices[j])`` (one generator per image), so any
    sharding or batching of the data draws the same weights for the same image.
    """
    cols = []
    for i in image_indices:
        g = torch.Generator().manual_seed((int(seed) * _MIX + int(i)) % (2**63 - 1))
        cols.append(torch.poisson(torch.ones(replicates, dtype=torch.float64), generator=g))
    if not cols:
        return torch.zeros(replicates, 0, dtype=torch.float64, device=device)
    return torch.stack(cols, 1).to(device)


def percentile_interval(replicates: Any, level: float = DEFAULT_LEVEL) -> list[float] | list[list[float]]:
    """The percentile interval of bootstrap replicate values.

    Args:
        replicates: ``(R,)`` or ``(R, ...)`` replicate values (nan where a replicate could not
            define the value, e.g. a class absent from it).
        level: coverage, 0.95 by default.

    Returns:
        ``[lo, hi]`` for ``(R,)``; for ``(R, n)`` a list of ``n`` pairs. An entry is
        ``[nan, nan]`` when fewer than half of the replicates define it (the data cannot
        resolve it).
    """
    x = np.asarray(replicates.detach().cpu().double() if torch.is_tensor(replicates) else replicates,
                   dtype=np.float64)
    alpha = (1.0 - level) / 2.0
    flat = x.reshape(x.shape[0], -1)
    out = []
    for col in flat.T:
        ok = col[np.isfinite(col)]
        if ok.size < max(2, (col.size + 1) // 2):
            out.append([float("nan"), float("nan")])
        else:
            lo, hi = np.quantile(ok, [alpha, 1.0 - alpha])
            out.append([float(lo), float(hi)])
    if x.ndim == 1:
        return out[0]
    return out


def interval(result: Any, path: str) -> tuple[float, float] | None:
    """The ``[lo, hi]`` interval of ``path`` (``"contribution.shapley.rgb"``) in an
    :class:`~fusionzoo.interpret.api.InterpretResult` (or its JSON dict), or None when the run
    has none (no replicates, an older metrics.json, or a value the data cannot resolve)."""
    table = result.get("intervals") if isinstance(result, Mapping) else getattr(result, "intervals", None)
    if not table or path not in table:
        return None
    lo, hi = table[path]
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return None
    return float(lo), float(hi)


def interval_paths(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Prefix a section's relative interval paths: ``{"shapley.rgb": [lo, hi]}`` ->
    ``{"contribution.shapley.rgb": [lo, hi]}``."""
    return {f"{prefix}.{k}": v for k, v in values.items()}
