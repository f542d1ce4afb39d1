"""``fusionzoo interpret TARGET`` and ``fusionzoo compare A B ...``: interpretation reports.

A target is a training run folder (``runs/<run>``: its ``best/`` weights, its validation set and
its training history are used), a folder written by ``save_pretrained``, or a registered model
name (built untrained). ``compare`` also takes folders written by ``fusionzoo interpret`` (their
``metrics.json`` is reused, nothing is recomputed).

A run folder is interpreted on its own validation set. ``--dataset``, ``--data-root`` or
``--num-samples`` replace it: a warning line names the flag, and ``settings["data"]`` (shown in the
report's findings) says so. Data the model cannot take (other modalities, another class count)
is refused in one line before any batch runs. ``compare`` refuses runs of different tasks,
class sets or modalities (a single-modality run of a subset is a unimodal reference), groups
seeds of one recipe (mean +- spread) and prints those tables after the comparison's.

Both run under torchrun (``torchrun --nproc-per-node N -m fusionzoo.cli interpret RUN``): every
process interprets its share of the batches, the accumulators are summed over processes
(:func:`fusionzoo.interpret.run` under a process group), and process 0 writes the report.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .._registry import create_model, model_entry
from ..data import create_dataset, dataset_entry
from ..data.transforms import eval_transforms
from ..engine.distributed import cleanup_distributed, init_distributed, is_main_process
from ..hub import from_pretrained
from ..interpret import METRICS, InterpretResult, load_result
from ..interpret import run as interpret_model
from ..interpret.compare import (
    RECIPE_IGNORED,
    STREAM_KEYS,
    IncomparableError,
    check_comparable,
    comparison_extra_tables,
    labels_of,
    markdown_tables,
    recipe_key,
    reference_entries,
    training_config,
)
from ..interpret.findings import seed_verdicts
from ..interpret.report import write_comparison, write_report
from ..interpret.runs import (
    check_model_data,
    find_weights,
    is_pretrained_dir,
    record_run,
    run_config,
    training_history,
    validation_set,
)
from . import UsageError

__all__ = ["run", "run_compare"]


# Flags that replace a run's own validation set with other data.
REPLACING = (("dataset", "--dataset"), ("data_root", "--data-root"), ("num_samples", "--num-samples"))
# Flags that only apply to data built here (a run's own validation set is built as training built it).
BUILD_ONLY = (("image_size", "--image-size"), ("split", "--split"))


def _warn(prog: str, text: str) -> None:
    print(f"fusionzoo {prog}: warning: {text}", file=sys.stderr)


def _dataset_for(args: argparse.Namespace, run_cfg: dict[str, Any] | None, modalities: Sequence[str] | None,
                 data_note: dict[str, Any] | None = None) -> Dataset:
    """The data to interpret on. ``data_note`` (when given) receives ``settings["data"]``: which
    data was used and, when flags replaced a run's validation set, which ones."""
    note = data_note if data_note is not None else {}
    flags = [flag for key, flag in REPLACING if getattr(args, key) is not None]
    if run_cfg is not None and not flags:
        ignored = [flag for key, flag in BUILD_ONLY if getattr(args, key) is not None]
        if ignored:
            _warn(args.command, f"{', '.join(ignored)} ignored: the run's own validation set is used as training "
                                "built it (give --num-samples or --dataset to interpret other data)")
        note.update({"source": "the run's validation set", "ignored_flags": ignored})
        return validation_set(run_cfg)  # the run's own validation set, exactly as training built it
    if run_cfg is not None:
        what = (f"{', '.join(flags)} replaced the run's validation set ({run_cfg.get('dataset')}, "
                f"{run_cfg.get('val_samples')} images at {run_cfg.get('image_size')}) with other data")
        # the warning is printed once the model is known to take the data (_resolve)
        note.update({"flags": flags, "replaced": what + "; scores are not the training's validation scores."})
    name = args.dataset or (run_cfg or {}).get("dataset") or "synthetic_rgbd"
    entry = dataset_entry(name)
    kwargs: dict[str, Any] = {}
    split = args.split or "val"
    if not entry.needs_root:
        kwargs["num_samples"] = args.num_samples or 32
        if args.image_size:
            kwargs["image_size"] = tuple(args.image_size)
        kwargs["seed"] = args.seed
        note.setdefault("source", f"{name} ({split}), generated: {kwargs}")
        return create_dataset(name, split=split, **kwargs)
    root = args.data_root or (run_cfg or {}).get("data_root")
    if root is None:
        where = "docs/custom_data.md" if entry.resolve else f"datasets/{name}/README.md"
        raise UsageError(f"dataset {name!r} needs --data-root (see {where})")
    if not Path(root).is_dir():
        raise UsageError(f"--data-root {root}: no such folder; prepare it with python datasets/{name}/prepare.py")
    try:
        entry = dataset_entry(name, root)  # `folder`: modalities and statistics from its YAML
        mods = tuple(modalities or entry.modalities)
        tf = eval_transforms(mods, size=tuple(args.image_size) if args.image_size else None, stats=entry.stats())
        note.setdefault("source", f"{name} ({split}) at {root}")
        return create_dataset(name, root, split=split, transforms=tf)
    except FileNotFoundError as e:  # a missing YAML, folder or file: the user's data, one line
        raise UsageError(f"--data-root {root} (dataset {name!r}): {e}") from None


@dataclass
class _Target:
    """What one command-line target resolves to."""

    model: nn.Module
    dataset: Dataset
    history: dict[str, Any] | None
    label: str
    run_dir: Path | None = None
    run_cfg: dict[str, Any] | None = None
    data_note: dict[str, Any] = field(default_factory=dict)


def _resolve(target: str, args: argparse.Namespace, device: torch.device) -> _Target:
    """Model, dataset, training history and label of a run folder / pretrained folder / model name."""
    path = Path(target)
    run_cfg, history, run_dir = None, None, None
    note: dict[str, Any] = {}
    found = weights_of(target)
    if found is not None:
        weights, run_dir = found
        if run_dir is not None:
            run_cfg = run_config(run_dir)
            history = training_history(run_dir)
        model = from_pretrained(weights)
        label = model.config.get("name", path.name)
        dataset = _dataset_for(args, run_cfg, model.modalities, note)
        try:
            check_model_data(model, dataset, f"the data ({note.get('source')})")
        except ValueError as e:
            raise UsageError(f"{target}: {e}") from None
        if note.get("replaced"):
            _warn(args.command, note["replaced"].split(";")[0])
    else:
        _check_model_name(target)
        dataset = _dataset_for(args, None, None, note)
        model = create_model(target, num_classes=dataset.num_classes, modalities=tuple(dataset.modalities))
        label = target
    return _Target(model.to(device), dataset, history, label, run_dir, run_cfg, note)


def weights_of(target: str, prefix: str = "") -> tuple[Path, Path | None] | None:
    """``(weights folder, run folder or None)`` of a run folder or a save_pretrained folder (a
    ``best/`` inside a run also gives its run), None when ``target`` is no path (a model name).

    Raises:
        UsageError: ``target`` is a file, or a folder without weights (``prefix`` starts the message).
    """
    path = Path(target)
    if path.is_dir():
        if is_pretrained_dir(path):
            return path, (path.parent if run_config(path.parent) is not None else None)
        try:
            return find_weights(path), path
        except FileNotFoundError as e:
            raise UsageError(f"{prefix}{e}") from None
    if path.exists():
        raise UsageError(f"{prefix}{target} is a file; give a run folder, a save_pretrained folder or a model name")
    return None


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
    """Apply ``--threads``, pick ``--device`` (default: cuda when available) and, under torchrun,
    join the process group (each process takes ``cuda:LOCAL_RANK`` on GPUs, gloo on CPUs)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _, device = init_distributed(args.device or "auto")
    except RuntimeError as e:  # CUDA asked for but absent: the user's flag
        raise UsageError(f"--device: {e}") from None
    return device


def _measure(target: str, args: argparse.Namespace, device: torch.device,
             metrics: Sequence[str] | None = None) -> tuple[InterpretResult, str]:
    """Interpret one target (nothing written): the result, with its training history, the run it
    was measured on (``settings["run"]``) and the data used (``settings["data"]``)."""
    if metrics is None:
        metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(METRICS)
    t = _resolve(target, args, device)
    result = interpret_model(t.model, t.dataset, metrics=metrics, taps=args.taps, batch_size=args.batch_size,
                             max_batches=args.max_batches, rows=args.rows, samples_per_image=args.samples_per_image,
                             policy=args.policy, policies=args.policies, seed=args.seed,
                             replicates=args.replicates, level=args.level, progress=not args.no_progress)
    if t.history is not None:
        result.training = t.history
    record_run(result, t.run_dir, t.run_cfg)
    result.settings["data"] = t.data_note
    return result, t.label


def _reference(spec: str, result: InterpretResult, args: argparse.Namespace,
               device: torch.device) -> list[dict[str, Any]]:
    """``--reference [MODS=]RUN``: the entries of RUN as a retrained reference for ``result``."""
    mods, _, target = spec.rpartition("=")
    p = Path(target)
    if p.is_dir() and (p / "metrics.json").is_file() and not (p / "best").is_dir():
        ref, label = load_result(p), target
    else:
        ref, _ = _measure(target, args, device, metrics=["contribution"])
        label = target
    a, b = recipe_key(result, streams=False), recipe_key(ref, streams=False)
    if a is None or b is None:
        _warn("interpret", f"--reference {spec}: no training config recorded for "
                           f"{'the target' if a is None else target}, so 'same recipe' cannot be checked")
    elif a != b:
        ca, cb = training_config(result) or {}, training_config(ref) or {}
        keys = sorted(k for k in set(ca) | set(cb)
                      if k not in RECIPE_IGNORED and k not in STREAM_KEYS and not k.startswith("_") and ca.get(k) != cb.get(k))
        raise UsageError(f"--reference {spec}: not the same recipe as the target; they differ in "
                         + ", ".join(f"{k} ({ca.get(k)!r} vs {cb.get(k)!r})" for k in keys))
    entries = reference_entries(result, ref, label)
    if mods:
        entries = [e for e in entries if "+".join(e["kept"]) == mods]
    if not entries:
        raise UsageError(f"--reference {spec}: {target} ({'+'.join(ref.modalities)}) is no reference for "
                         f"{'+'.join(result.modalities)}{' keeping ' + mods if mods else ''}: give a run trained on "
                         "a subset of its modalities, or one trained with --modality-dropout or --train-missing")
    return entries


def _interpret_one(target: str, args: argparse.Namespace, out: Path, device: torch.device) -> InterpretResult:
    result, label = _measure(target, args, device)
    refs = [e for spec in (getattr(args, "reference", None) or []) for e in _reference(spec, result, args, device)]
    if refs:
        result.settings["references"] = refs
    if is_main_process():  # under torchrun every process holds the same result; one writes it
        files = write_report(result, out)
        print(f"{label}: wrote {files['report']} ({len(files)} files)")
    return result


def run(args: argparse.Namespace) -> int:
    """``fusionzoo interpret``: metrics.json, PNG plots and report.html of one target."""
    try:
        _interpret_one(args.target, args, Path(args.out), _setup(args))
    finally:
        cleanup_distributed()
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """``fusionzoo compare``: interpret (or reuse) every target, then lay them side by side."""
    try:
        return _compare(args, _setup(args))
    finally:
        cleanup_distributed()


def _compare(args: argparse.Namespace, device: torch.device) -> int:
    out = Path(args.out)
    results = []
    for i, target in enumerate(args.targets):
        p = Path(target)
        if p.is_dir() and (p / "metrics.json").is_file() and not (p / "best").is_dir():
            results.append(load_result(p))
            if is_main_process():
                print(f"{target}: reusing {p / 'metrics.json'}")
        else:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (p.name or target))
            results.append(_interpret_one(target, args, out / f"{i:02d}_{safe}", device))
        try:  # refuse at the first run that does not fit, before interpreting the rest
            check_comparable(args.targets[:len(results)], results)
        except IncomparableError as e:
            raise UsageError(f"compare: {e}") from None
    if not is_main_process():
        return 0
    files = write_comparison(results, out)
    print(files["markdown"].read_text())
    labels = labels_of(results)
    extra = markdown_tables([*comparison_extra_tables(labels, results), *seed_verdicts(labels, results)])
    if extra:
        print(extra)
    print(f"wrote {files['report']} and {files['markdown']}")
    return 0
