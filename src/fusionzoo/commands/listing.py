"""``fusionzoo list [PATTERN ...]``: registered models, filtered by metadata."""

from __future__ import annotations

import argparse
import sys

from .._registry import list_models, model_entry
from . import UsageError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Print the matching names (``--long``: fusion family, encoder, paper); 1 when none matches."""
    mods = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    try:
        names = list_models(args.patterns or None, exclude=args.exclude, task=args.task, fusion=args.fusion,
                            modalities=mods, published=True if args.published else None)
    except ValueError as e:  # e.g. an unknown modality name
        raise UsageError(f"fusionzoo list: {e}") from None
    for n in names:
        if args.long:
            e = model_entry(n)
            origin = f" [published: {e.reference_repo}@{e.reference_commit[:8]}]" if e.published else ""
            print(f"{n:32s} {e.fusion:7s} {e.encoder:16s} {e.paper}{origin}")
        else:
            print(n)
    if not names:
        print("no model matches", file=sys.stderr)
        return 1
    return 0
