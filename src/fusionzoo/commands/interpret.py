"""``fusionzoo interpret TARGET`` and ``fusionzoo compare A B ...``: interpretation reports.

A target is a training run folder (``runs/<run>``: its ``best/`` weights, its validation set and
its training history are used), a folder written by ``save_pretrained``, or a registered model
name (built untrained). ``compare`` also takes folders written by ``fusionzoo interpret`` (their
``metrics.json`` is reused, nothing is recomputed).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._registry import create_model, model_entry
from ..data import create_dataset, dataset_entry
from ..data.transforms import STATS, eval_transforms
from ..hub import from_pretrained
from ..interpret import METRICS, load_result
from ..interpret import run as interpret_model
from ..interpret.report import write_comparison, write_report
from ..interpret.runs import find_weights, is_pretrained_dir, run_config, training_history, validation_set
from . import UsageError

__all__ = ["run", "run_compare"]


def _dataset_for(args: argparse.Namespace, run_cfg: dict[str, Any] | None, modalities: Sequence[str] | None) -> Dataset:
    if run_cfg is not None and args.dataset is None and args.data_root is None and args.num_samples is None:
        return validation_set(run_cfg)  # the run's own validation set, exactly as training built it
    name = args.dataset or (run_cfg or {}).get("dataset") or "synthetic_rgbd"
    entry = dataset_entry(name)
    kwargs: dict[str, Any] = {}
    split = args.split or "val"
    if not entry.needs_root:
        kwargs["num_samples"] = args.num_samples or 32
        if args.image_size:
            kwargs["image_size"] = tuple(args.image_size)
        kwargs["seed"] = args.seed
        return create_dataset(name, split=split, **kwargs)
    root = args.data_root or (run_cfg or {}).get("data_root")
    if root is None:
        raise UsageError(f"dataset {name!r} needs --data-root (see datasets/{name}/README.md)")
    if not Path(root).is_dir():
        raise UsageError(f"--data-root {root}: no such folder; prepare it with python datasets/{name}/prepare.py")
    mods = tuple(modalities or entry.modalities)
    tf = eval_transforms(mods, size=tuple(args.image_size) if args.image_size else None,
                         stats=name if name in STATS else None)
    return create_dataset(name, root, split=split, transforms=tf)


def _resolve(
    target: str, args: argparse.Namespace, device: torch.device
) -> tuple[nn.Module, Dataset, dict[str, Any] | None, str]:
    """(model, dataset, training history, label) for a run folder / pretrained folder / model name."""
    path = Path(target)
    run_cfg, history = None, None
    if path.is_dir():
        if is_pretrained_dir(path):
            weights = path
            run_dir = path.parent if run_config(path.parent) is not None else None
        else:
            run_dir = path
            try:
                weights = find_weights(path)
            except FileNotFoundError as e:
                raise UsageError(str(e)) from None
        if run_dir is not None:
            run_cfg = run_config(run_dir)
            history = training_history(run_dir)
        model = from_pretrained(weights)
        label = model.config.get("name", path.name)
        dataset = _dataset_for(args, run_cfg, model.modalities)
    elif path.exists():
        raise UsageError(f"{target} is a file; give a run folder, a save_pretrained folder or a model name")
    else:
        _check_model_name(target)
        dataset = _dataset_for(args, None, None)
        model = create_model(target, num_classes=dataset.num_classes, modalities=tuple(dataset.modalities))
        label = target
    return model.to(device), dataset, history, label


def _check_model_name(target: str) -> None:
    """Tell a mistyped path from a mistyped model name (the target names neither a folder nor a model)."""
    try:
        model_entry(target)
        return
    except KeyError as e:
        not_a_model = e.args[0]
    path = Path(target)
    if len(path.parts) > 1 or target.startswith((".", "~")):  # model names have no "/" (NAME_PATTERN)
        parent = path.parent if path.parent.is_dir() else None
        near = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=3) if parent else []
        hint = (f"; {parent} has {', '.join(near)}" if near else
                f"; {parent} exists" if parent else f"; {path.parent} does not exist either")
        raise UsageError(f"{target}: no such folder (a run folder or save_pretrained folder was expected){hint}")
    raise UsageError(f"{target!r} is neither an existing folder nor a registered model: {not_a_model}")


def _setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and pick ``--device`` (default: cuda when available)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interpret_one(target: str, args: argparse.Namespace, out: Path, device: torch.device) -> Any:
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(METRICS)
    model, dataset, history, label = _resolve(target, args, device)
    result = interpret_model(model, dataset, metrics=metrics, taps=args.taps, batch_size=args.batch_size,
                             max_batches=args.max_batches, rows=args.rows, samples_per_image=args.samples_per_image,
                             policy=args.policy, policies=args.policies, seed=args.seed,
                             progress=not args.no_progress)
    if history is not None:
        result.training = history
    files = write_report(result, out)
    print(f"{label}: wrote {files['report']} ({len(files)} files)")
    return result


def run(args: argparse.Namespace) -> int:
    """``fusionzoo interpret``: metrics.json, PNG plots and report.html of one target."""
    _interpret_one(args.target, args, Path(args.out), _setup(args))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """``fusionzoo compare``: interpret (or reuse) every target, then lay them side by side."""
    device = _setup(args)
    out = Path(args.out)
    results = []
    for i, target in enumerate(args.targets):
        p = Path(target)
        if p.is_dir() and (p / "metrics.json").is_file() and not (p / "best").is_dir():
            results.append(load_result(p))
            print(f"{target}: reusing {p / 'metrics.json'}")
        else:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (p.name or target))
            results.append(_interpret_one(target, args, out / f"{i:02d}_{safe}", device))
    files = write_comparison(results, out)
    print(files["markdown"].read_text())
    print(f"wrote {files['report']} and {files['markdown']}")
    return 0
