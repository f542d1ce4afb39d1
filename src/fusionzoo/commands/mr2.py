"""``fusionzoo mr2``: KAIST log-average miss rate (all / day / night) of a result file.

Image ids: a ``.txt`` result line's id is 1-based (the ``k``-th image of the annotations sorted by
id, as the KAIST benchmark files); a COCO ``.json`` result's ``image_id`` is the annotation file's
own ``images[].id`` (0-based in MLPD's ``KAIST_annotation.json``). A file whose ids look off by
one, or that holds no detection, an unknown ``category_id``, a non-finite score or a bad box, is
refused with one line and exit code 2 (:func:`fusionzoo.detection.kaist.load_results`).
"""

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
