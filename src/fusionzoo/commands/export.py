"""``fusionzoo export MODEL --format onnx|torch-export --out FILE``: export, then check against eager.

MODEL is a training run folder (its ``best/`` weights), a folder written by ``save_pretrained``,
or a registered model name (built untrained, e.g. to try an architecture's exportability).
The export is run on fresh inputs beside the eager model (ONNX Runtime for an ONNX file when it
is installed, else the ``torch.export`` program) and the largest absolute and relative
differences are printed; a relative difference above ``--tolerance`` exits with status 1 and one
line. What the graph holds: :mod:`fusionzoo.models.export` and docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .._registry import create_model, model_entry
from ..hub import from_pretrained
from ..interpret.runs import run_config
from ..models.export import ExportError, check_export, export_model
from . import UsageError
from .interpret import weights_of

__all__ = ["run"]

DEFAULT_SIZE = (512, 512)


def load_target(target: str) -> tuple[nn.Module, tuple[int, int] | None]:
    """The model named by ``target`` and the image size its run trained at (None if unknown).

    Raises:
        UsageError: ``target`` is a file, a folder without weights, or no registered name.
    """
    found = weights_of(target, "export: ")
    if found is not None:
        weights, run_dir = found
        return from_pretrained(weights), _run_size(run_dir) if run_dir is not None else None
    try:
        model_entry(target)
    except KeyError as e:
        raise UsageError(f"export: {target!r} is neither an existing folder nor a registered model: "
                         f"{e.args[0]}") from None
    return create_model(target), None


def _run_size(run_dir: Path) -> tuple[int, int] | None:
    """``image_size`` of a run's training config (what its model was trained and validated at)."""
    cfg = run_config(run_dir)
    size = (cfg or {}).get("image_size")
    return (int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else None


def run(args: argparse.Namespace) -> int:
    """Export, check, print the differences; 1 when they exceed ``--tolerance``."""
    if args.tolerance <= 0:
        raise UsageError(f"export: --tolerance must be positive, got {args.tolerance}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, trained_size = load_target(args.model)
    size = tuple(args.size) if args.size else trained_size or DEFAULT_SIZE
    name = (getattr(model, "config", None) or {}).get("name", args.model)
    try:
        exported = export_model(model, args.out, args.format, size=size, opset=args.opset)
        check = check_export(model, exported, tolerance=args.tolerance)
    except ExportError as e:
        raise UsageError(f"export: {e}") from None
    batch = "dynamic" if exported.dynamic_batch else f"static {check.batch}"
    print(f"wrote {exported.path} ({args.format}; {name}; inputs {', '.join(exported.input_names)} at "
          f"{size[0]}x{size[1]}, batch {batch}; outputs {', '.join(exported.output_names)})")
    print(f"check against eager ({check.runtime}, batch {check.batch}): max abs difference {check.max_abs:.3g}, "
          f"max relative difference {check.max_rel:.3g} (tolerance {check.tolerance:g})")
    if args.json:
        report = {"path": str(exported.path), "format": exported.format, "model": name, "size": list(size),
                  "inputs": exported.input_names, "in_chans": exported.in_chans, "outputs": exported.output_names,
                  "dynamic_batch": exported.dynamic_batch, "runtime": check.runtime, "tolerance": check.tolerance,
                  "max_abs": check.max_abs, "max_rel": check.max_rel,
                  "per_output": {k: {"max_abs": a, "max_rel": r} for k, (a, r) in check.per_output.items()}}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if not check.ok:
        worst = check.worst()
        print(f"fusionzoo export: error: {exported.path} differs from eager: output {worst!r} max relative "
              f"difference {check.per_output[worst][1]:.3g} > tolerance {check.tolerance:g}", file=sys.stderr)
        return 1
    return 0
