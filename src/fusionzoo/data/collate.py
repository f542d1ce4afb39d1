"""Batching of sample dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["collate"]

_LIST_KEYS = ("boxes", "labels", "ignore", "occlusion", "meta")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into a batch.

    Modalities ``(C, H, W)`` become ``(B, C, H, W)``, ``mask`` ``(H, W)`` becomes ``(B, H, W)``;
    ``boxes``, ``labels``, the per-box ``ignore`` / ``occlusion`` flags and ``meta`` stay lists
    (their length varies per image).

    Args:
        samples: Tensor samples with the same keys.

    Returns:
        The batch dict.

    Raises:
        ValueError: Empty list, differing keys, or tensors of different shapes (names the key and
            the sample ids; use a transform with a fixed output size).
    """
    if not samples:
        raise ValueError("collate: got an empty list of samples")
    keys = list(samples[0])
    for i, s in enumerate(samples[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"collate: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key in _LIST_KEYS or not isinstance(values[0], torch.Tensor):
            batch[key] = values
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            ids = [s.get("meta", {}).get("id", i) for i, s in enumerate(samples)]
            raise ValueError(
                f"collate: {key!r} has different shapes {sorted(shapes)} in samples {ids}; "
                "use a transform with a fixed output size (e.g. train_transforms(size=...))"
            )
        batch[key] = torch.stack(values)
    return batch
