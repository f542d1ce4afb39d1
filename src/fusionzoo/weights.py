"""Model weights as safetensors: save and load flat tensor dicts, fit them into a model.

Part of the model layer (docs/design.md, "Layers"): :mod:`fusionzoo.hub` (``save_pretrained`` /
``from_pretrained``), ``models/convert.py`` (authors' checkpoints) and the training engine's
checkpoints (:mod:`fusionzoo.engine.checkpoint`, which adds optimizer, scheduler and RNG state)
all read and write weights through these functions. Nothing here unpickles: safetensors holds
tensors only. Files are written atomically (:func:`fusionzoo.files.atomic_write_bytes`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes
from torch import nn

from .files import atomic_write_bytes

__all__ = [
    "CheckpointError",
    "load_model_weights",
    "load_tensors",
    "read_json_object",
    "save_tensors",
    "unwrap_model",
]


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, corrupt, truncated or does not fit the model."""


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write a flat ``name -> tensor`` dict as safetensors.

    Tensors are moved to CPU and made contiguous; tensors sharing storage (tied weights) are
    cloned, because safetensors refuses aliased buffers.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_tensors: value of {k!r} is {type(v).__name__}, expected a tensor")
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        elif t.numel():
            seen.add(ptr)
        out[k] = t
    data = st_save_bytes(out, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors (never unpickles anything).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or its sha256 differs from
            ``expected_sha256``; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    data = path.read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: sha256 {digest[:12]}... differs from the "
                f"manifest's {expected_sha256[:12]}... (truncated or modified after saving)"
            )
    try:
        return st_load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({len(data)} bytes): {e}. "
            "Delete it or resume from another checkpoint."
        ) from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in a checkpoint's metadata file (``config.json``, ``state.json``).

    Raises:
        CheckpointError: the file is missing, not valid JSON (e.g. truncated), or not an object;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (not valid JSON: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _limit(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def load_model_weights(
    model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *, strict: bool = True
) -> None:
    """Copy weights from a safetensors file (or a loaded dict) into ``model``.

    Raises:
        CheckpointError: unreadable file, or (strict) keys that are missing, unexpected, or of
            another shape; the message lists them (e.g. a checkpoint of another model, or of
            another class count, which changes the classifier's shape).
    """
    where = str(source) if isinstance(source, (str, Path)) else "the given state dict"
    tensors = load_tensors(source) if isinstance(source, (str, Path)) else dict(source)
    model = unwrap_model(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(
        f"{k} (checkpoint {tuple(tensors[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(tensors)
        if tuple(own[k].shape) != tuple(tensors[k].shape)
    )
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_limit(mismatched)}")
        if missing and strict:
            parts.append(f"{len(missing)} key(s) missing from the checkpoint: {_limit(missing)}")
        if unexpected and strict:
            parts.append(f"{len(unexpected)} unexpected key(s) in the checkpoint: {_limit(unexpected)}")
        raise CheckpointError(
            f"weights in {where} do not fit {type(model).__name__} "
            f"(a checkpoint of another model, modality set or class count?): " + "; ".join(parts)
        )
    with torch.no_grad():
        for k, v in tensors.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
