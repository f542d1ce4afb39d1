"""``fusionzoo convert NAME FILE``: an authors' released checkpoint -> a ``from_pretrained`` folder."""

from __future__ import annotations

import argparse

from ..models.convert import convert_checkpoint
from . import UsageError

__all__ = ["run"]


def run(args: argparse.Namespace) -> int:
    """Convert and print where the folder was written."""
    if args.out is None and args.tag is None:
        raise UsageError("convert: give --tag (a registered release) or --out (an output folder)")
    try:
        out = convert_checkpoint(args.name, args.checkpoint, args.out, tag=args.tag, num_classes=args.num_classes,
                                 overwrite=args.force)
    except (FileNotFoundError, KeyError) as e:
        raise UsageError(f"convert: {e.args[0] if isinstance(e, KeyError) else e}") from None
    print(f"wrote {out} (load it with fusionzoo.from_pretrained({str(out)!r}))")
    return 0
