"""``fusionzoo mr2``: KAIST log-average miss rate (all / day / night) of a result file."""

from __future__ import annotations

import argparse

from ..detection.kaist import KaistEvalError, evaluate_files
from . import UsageError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Print MR-2 per subset in percent."""
    try:
        res = evaluate_files(args.annotations, args.results)
    except KaistEvalError as err:
        raise UsageError(f"mr2: {err}") from None
    print("MR-2 (KAIST reasonable: height >= 55 px, occlusion none/partial, 5 px border, FPPI 1e-2..1e0)")
    for key in ("all", "day", "night"):
        if key in res:
            print(f"{key:>5}: {100 * res[key]:.2f} %")
    return 0
