"""One JSON sanitizer for every file the package writes (metrics, histories, configs, checkpoints)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["to_json"]


def to_json(obj: Any, *, nonfinite: str = "null", unknown: str = "keep", where: str = "JSON") -> Any:
    """A JSON-safe copy of ``obj``.

    Mappings become dicts with ``str`` keys, tuples and lists become lists, tensors become
    (nested) lists (0-dim: a number), numpy scalars and arrays Python numbers and lists.

    Args:
        obj: the value.
        nonfinite: ``"null"``: NaN / inf become None (strict JSON); ``"keep"``: left as they are
            (``json.dumps`` writes ``NaN``).
        unknown: what happens to values of any other type: ``"keep"`` (left as they are),
            ``"str"`` (their ``str``) or ``"raise"`` (TypeError naming ``where``).
        where: the file or field written, for the error message.

    Raises:
        TypeError: ``unknown="raise"`` and a value is not JSON-able.
        ValueError: an unknown ``nonfinite`` / ``unknown`` option.
    """
    if nonfinite not in ("null", "keep") or unknown not in ("keep", "str", "raise"):
        raise ValueError(f"to_json: nonfinite must be 'null' or 'keep' and unknown 'keep', 'str' or 'raise'; "
                         f"got {nonfinite!r}, {unknown!r}")
    return _convert(obj, nonfinite, unknown, where)


def _convert(x: Any, nonfinite: str, unknown: str, where: str) -> Any:
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if nonfinite == "keep" or math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _convert(v, nonfinite, unknown, where) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_convert(v, nonfinite, unknown, where) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return _convert(x.tolist(), nonfinite, unknown, where)
    if unknown == "raise":
        raise TypeError(f"cannot write {type(x).__name__} ({x!r}) to {where}; expected numbers, strings, lists "
                        "and dicts")
    return str(x) if unknown == "str" else x
