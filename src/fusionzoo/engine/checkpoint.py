"""Training checkpoints: the trainer's state around the model weights, for exact resume.

This module owns what only training has: optimizer, scheduler, GradScaler, RNG states and the
trainer's position (epoch, step, callback states). The weights themselves go through the model
layer (:mod:`fusionzoo.weights`: safetensors without pickle, ``load_model_weights``,
``unwrap_model``, ``CheckpointError``) and files through :mod:`fusionzoo.files` (atomic writes,
sha256), so the engine depends on the model layer and never the reverse.

A training checkpoint is a folder::

    <run>/checkpoints/last/
        model.safetensors       weights (``model.state_dict()`` of the unwrapped model)
        optimizer.safetensors   every tensor of ``optimizer.state_dict()["state"]``
        rng.safetensors         torch CPU/CUDA generator states, numpy's MT19937 key
        state.json              everything else: epoch/step, optimizer param groups, scheduler,
                                GradScaler, python RNG, callback states, and a manifest with the
                                size and sha256 of each .safetensors file

Atomicity: the folder is first written as a hidden temporary sibling (every file fsynced), then
swapped in with two renames (``last`` -> ``.last.old``, temp -> ``last``) and the parent folder
fsynced. A kill at any moment leaves either the previous or the new checkpoint complete; the one
window with no ``last`` (between the renames) is covered by :func:`resolve_checkpoint_dir`, which
falls back to ``.last.old``. Single files (configs, JSON) go through
:func:`fusionzoo.files.atomic_write_bytes` (temp file in the same folder, fsync, ``os.replace``,
fsync of the folder).

Permissions: temp files and folders are created private (``mkstemp`` 0600, ``mkdtemp`` 0700) and
given the process umask's permissions before they are renamed into place, so run files are
readable as every other tool's files are (0644 / 0755 under the common umask 022).
A kill mid-write leaves a hidden temp (``.last.*.tmp/``, ``.<file>.*.tmp``);
:func:`remove_temp_leftovers` deletes them when a run starts or resumes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._json import to_json
from ..files import atomic_write_bytes, fsync_dir, sha256_file, umask_mode
from ..weights import (
    CheckpointError,
    load_model_weights,
    load_tensors,
    read_json_object,
    save_tensors,
    unwrap_model,
)

__all__ = [
    "capture_rng_state",
    "load_checkpoint",
    "remove_temp_leftovers",
    "resolve_checkpoint_dir",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# temporaries of killed writes


def remove_temp_leftovers(folder: str | Path) -> list[Path]:
    """Delete the hidden temporaries a killed write leaves under ``folder``; returns them.

    Matches only this module's own names: ``.<name>.<random>.tmp`` files of
    :func:`fusionzoo.files.atomic_write_bytes` and ``.<name>.<random>.tmp/`` folders of :func:`save_checkpoint`.
    Call it while no other process writes into ``folder`` (train.py: rank 0, before training).
    """
    removed: list[Path] = []
    for p in sorted(Path(folder).rglob(".*.tmp")):
        if p.name.count(".") < 3 or any(parent in removed for parent in p.parents):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global generator's state, split into tensors (safetensors) and JSON facts."""
    tensors: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    facts = {
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    return tensors, facts


def restore_rng_state(tensors: Mapping[str, torch.Tensor], facts: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = facts["numpy"]
    np.random.set_state(
        (n["name"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = facts["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


# ----------------------------------------------------------------------------------------------
# optimizer state <-> tensors + JSON


def _split_optimizer_state(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: Mapping[str, torch.Tensor], facts: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, entry in facts["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": facts["param_groups"]}


def _checkpoint_json(obj: Any) -> Any:
    """State dicts of optimizer / LambdaLR / GradScaler with tuples and tensors made JSON-safe."""
    return to_json(obj, nonfinite="keep", unknown="raise", where="checkpoint JSON")


# ----------------------------------------------------------------------------------------------
# training checkpoints


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The complete checkpoint folder at ``path`` (or its ``.old`` twin after a kill mid-swap).

    Raises:
        CheckpointError: neither exists.
    """
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    old = _old_name(path)
    if (old / "state.json").is_file():
        return old
    raise CheckpointError(f"no checkpoint at {path} (expected {path / 'state.json'})")


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete training checkpoint folder atomically (see the module docstring).

    Args:
        path: the checkpoint folder, e.g. ``runs/x/checkpoints/last``; replaced if it exists.
        model: the (possibly DDP/compiled) model; its unwrapped ``state_dict()`` is saved.
        optimizer, scheduler, scaler: saved when given (``state_dict()`` of each).
        state: JSON-able trainer facts (epoch, step, best metric, callback states, ...).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp's 0700 -> what mkdir would have created
        files: dict[str, dict[str, Any]] = {}

        def put(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
            save_tensors(tensors, tmp / name, metadata={"format": "fusionzoo-checkpoint"})
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}

        put("model.safetensors", unwrap_model(model).state_dict())
        facts: dict[str, Any] = {"format_version": FORMAT_VERSION, "trainer": _checkpoint_json(dict(state or {}))}
        if optimizer is not None:
            opt_tensors, opt_facts = _split_optimizer_state(optimizer.state_dict())
            put("optimizer.safetensors", opt_tensors)
            facts["optimizer"] = _checkpoint_json(opt_facts)
        if scheduler is not None:
            facts["scheduler"] = _checkpoint_json(scheduler.state_dict())
        if scaler is not None:
            facts["scaler"] = _checkpoint_json(scaler.state_dict())
        rng_tensors, rng_facts = capture_rng_state()
        put("rng.safetensors", rng_tensors)
        facts["rng"] = rng_facts
        facts["files"] = files
        atomic_write_bytes(tmp / "state.json", json.dumps(facts).encode())
        fsync_dir(tmp)
        old = _old_name(path)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects.

    Every file is checked against the manifest (size and sha256) before anything is loaded, so
    a corrupt checkpoint fails without half-restoring the model.

    Returns:
        The trainer facts passed as ``state`` when saving.

    Raises:
        CheckpointError: a missing/corrupt/truncated file (named), or weights that do not fit.
    """
    path = resolve_checkpoint_dir(path)
    facts = read_json_object(path / "state.json")
    if facts.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / 'state.json'}: format_version {facts.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in facts.get("files", {}).items():
        f = path / name
        if f.is_file() and f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated: {f.stat().st_size} bytes, manifest says {info['bytes']}"
            )
        loaded[name] = load_tensors(f, expected_sha256=info["sha256"])
    if model is not None:
        load_model_weights(model, loaded["model.safetensors"])
    if optimizer is not None:
        if "optimizer" not in facts:
            raise CheckpointError(f"{path} holds no optimizer state")
        sd = _join_optimizer_state(loaded["optimizer.safetensors"], facts["optimizer"])
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"optimizer state in {path} does not fit this optimizer: {e}") from None
    if scheduler is not None and "scheduler" in facts:
        scheduler.load_state_dict(facts["scheduler"])
    if scaler is not None and "scaler" in facts:
        scaler.load_state_dict(facts["scaler"])
    if restore_rng:
        restore_rng_state(loaded["rng.safetensors"], facts["rng"])
    return facts["trainer"]
