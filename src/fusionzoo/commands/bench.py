"""``fusionzoo bench``: latency, throughput, peak memory, parameters and FLOPs of one model.

MODEL is a registered name (built untrained: timing does not depend on the weights), a run
folder (its ``best/`` weights) or a ``save_pretrained`` folder. What each number means is in
:mod:`fusionzoo.benchmark`; the table goes to stdout, progress to stderr, ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .._registry import accepted_kwargs, create_model
from ..benchmark import MODES, benchmark
from ..files import atomic_write_bytes
from ..hub import from_pretrained
from . import UsageError
from .interpret import _check_model_name, weights_of

__all__ = ["parse_modes", "run"]


def parse_modes(text: str) -> list[str]:
    """``--modes eager,bf16`` -> ``["eager", "bf16"]``; an unknown or repeated mode is a UsageError."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise UsageError(f"bench: --modes {text!r} names no mode; choose from {', '.join(MODES)}")
    for m in modes:
        if m not in MODES:
            raise UsageError(f"bench: --modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise UsageError(f"bench: --modes {text!r} names a mode twice")
    return modes


def _load(target: str) -> nn.Module:
    """The model of a save_pretrained folder, a run folder, or a registered name (untrained)."""
    found = weights_of(target, "bench: ")
    if found is not None:
        return from_pretrained(found[0])
    _check_model_name(target)
    accepted = accepted_kwargs(target)
    # Timing does not depend on the weights: never download encoder weights for it.
    return create_model(target, pretrained=False) if accepted is None or "pretrained" in accepted else create_model(target)


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"bench: --device {text!r} is not a device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"bench: --device {text}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"bench: --device {text}: only cpu and cuda are measured")
    return device


def run(args: argparse.Namespace) -> int:
    """Measure, print the markdown table, write ``--out`` JSON."""
    modes = parse_modes(args.modes)
    if args.exported is not None:
        if not Path(args.exported).is_file():
            raise UsageError(f"bench: --exported {args.exported}: no such file (a torch.export .pt2 was expected)")
        if "exported" not in modes:
            modes.append("exported")
    elif "exported" in modes:
        raise UsageError("bench: --modes names 'exported' but no --exported FILE.pt2 was given")
    h, w = args.size
    if h < 1 or w < 1:
        raise UsageError(f"bench: --size {h} {w}: height and width must be positive")
    if args.batch_size < 1:
        raise UsageError(f"bench: --batch-size {args.batch_size}: must be at least 1")
    if args.min_run_time <= 0:
        raise UsageError(f"bench: --min-run-time {args.min_run_time}: must be positive seconds")
    if args.warmup < 0:
        raise UsageError(f"bench: --warmup {args.warmup}: must be 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = _load(args.model)

    def progress(text: str) -> None:
        if not args.no_progress:
            print(f"bench: {text}", file=sys.stderr, flush=True)

    res = benchmark(model, name=(getattr(model, "config", None) or {}).get("name") or args.model, size=(h, w),
                    batch_size=args.batch_size, modes=modes, device=device, warmup=args.warmup,
                    min_run_time=args.min_run_time, exported=args.exported, progress=progress)
    print(f"{res.model} at {h}x{w} on {res.device} ({res.machine}), torch {res.torch_version}")
    print(res.markdown())
    print(f"peak memory: {res.memory}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (json.dumps(res.to_dict(), indent=2) + "\n").encode())
    return 0
