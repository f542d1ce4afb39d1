"""The ``fusionzoo`` console script.

::

    fusionzoo list [PATTERN ...] [--fusion middle] [--task segmentation] [--modalities rgb,depth]
    fusionzoo interpret RUN_DIR_OR_MODEL [--dataset synthetic_rgbd] [--data-root DIR] --out DIR
    fusionzoo compare A B C [--dataset ...] --out DIR
    fusionzoo convert PUBLISHED_NAME AUTHORS_CHECKPOINT [--tag nyuv2] [--out DIR]
    fusionzoo mr2 --annotations KAIST_annotation.json --results RESULT.txt|.json
    fusionzoo export RUN_DIR_OR_MODEL --format onnx|torch-export --out FILE [--size H W] [--opset N]

``RUN_DIR_OR_MODEL`` is a training run folder (``runs/<run>``: its ``best/`` weights, its
validation set and its training history are used), a folder written by ``save_pretrained``, or
a registered model name (built untrained: useful to inspect an architecture, and for tests).
``compare`` also accepts folders written by ``fusionzoo interpret`` (their ``metrics.json`` is
reused, nothing is recomputed).

Adding a subcommand (keep ``fusionzoo --help`` free of torch; tests/test_silent_engine.py checks it):

1. This module imports only the standard library and :mod:`fusionzoo.commands` (whose
   ``__init__`` does the same). ``import fusionzoo`` itself is lazy (PEP 562 in
   ``fusionzoo/__init__.py``), so importing this module costs nothing heavy.
2. In :func:`_parser`, add ``sub.add_parser("name", ...)`` with choices written as literals
   (a test checks them against the library's constants, e.g. ``ROW_RULES``), never imported.
3. Write ``src/fusionzoo/commands/<name>.py`` with its imports at the top and a
   ``run(args) -> int``, and add ``"name": ("fusionzoo.commands.<name>", "run")`` to
   :data:`COMMANDS`; :func:`_main` loads the module with ``importlib.import_module`` only when that
   subcommand runs (no import statement inside a function: tests/test_layering.py).
4. A mistake of the user (bad value, missing path, unknown name) raises :class:`UsageError`
   (or a ConfigError / CheckpointError / DataError from the library): :func:`run_command`
   prints one line and returns 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .commands import UsageError

__all__ = ["UsageError", "main", "run_command"]

# Literal copy of fusionzoo.interpret.api.ROW_RULES (importing it would import torch for --help);
# tests/test_silent_engine.py checks that the two agree.
ROW_RULES = ("sample", "pool", "object")


# Library errors that mean "the user's input is wrong", as (module, class): checked through
# sys.modules, so recognising them imports nothing (a class can only be raised once imported).
USER_ERRORS = (
    ("fusionzoo.engine.config", "ConfigError"),
    ("fusionzoo.weights", "CheckpointError"),
    ("fusionzoo.data.io", "DataError"),
    ("fusionzoo.engine.loop", "NonFiniteLossError"),
    ("fusionzoo.encoders", "PretrainedWeightsError"),
    ("fusionzoo.models.convert", "ConversionError"),
)


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, UsageError):
        return True
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return True
    return False


def run_command(fn: Callable[[list[str]], Any], argv: Sequence[str], prog: str) -> int:
    """Run ``fn(argv)`` as a command: user errors become one line on stderr and status 2.

    ``--debug`` anywhere in ``argv`` is removed and lets every exception through with its
    traceback. An exception carrying an int ``exit_status`` (train.py's TrainingInterrupted after
    Ctrl-C: 130) has already said what happened; its status is returned. ``fn``'s int result is
    the status; any other result means 0.
    """
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = fn(argv)
    except Exception as err:
        if debug:
            raise
        if isinstance(getattr(err, "exit_status", None), int):
            return err.exit_status
        if not _is_user_error(err):
            raise
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{prog}: error: {' '.join(text.split())}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _policy_list(text: str) -> list[str]:
    """``--policies zero,mean``: comma-separated removal policies (REMOVAL_POLICIES, as literals)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in ("zero", "mean", "noise", "missing")]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown removal policy {bad[0]!r}; choose from zero, mean, noise, missing")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusionzoo", description="RGB-D / RGB-T fusion model zoo with uniform interpretation.",
                                epilog="--debug: print the full traceback of an error instead of one line.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list registered models")
    ls.add_argument("patterns", nargs="*", help="fnmatch patterns, e.g. 'cmx_*'")
    ls.add_argument("--exclude", action="append", default=None, help="fnmatch pattern to leave out (repeatable)")
    ls.add_argument("--task", default=None, choices=("segmentation", "detection"))
    ls.add_argument("--fusion", action="append", default=None, choices=("early", "middle", "late", "hybrid"),
                    help="fusion family (repeatable)")
    ls.add_argument("--modalities", default=None, help="comma-separated, e.g. rgb,thermal")
    ls.add_argument("--long", action="store_true", help="also print fusion family, encoder and paper")
    ls.add_argument("--published", action="store_true", help="only the authors' networks (published entries)")

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dataset", default=None, help="dataset name (default: the run's, else synthetic_rgbd)")
        sp.add_argument("--data-root", default=None, help="prepared dataset folder (benchmarks)")
        sp.add_argument("--split", default=None, help="split to interpret (default: the run's validation split, else val)")
        sp.add_argument("--num-samples", type=int, default=None,
                        help="synthetic sets: images to generate (default 32); with a run folder it replaces the "
                             "run's validation set (a warning and the report say so)")
        sp.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--max-batches", type=int, default=None)
        sp.add_argument("--metrics", default=None, help="comma-separated subset of the metrics (default: all)")
        sp.add_argument("--taps", default="*", help="fnmatch pattern of the taps to measure")
        sp.add_argument("--rows", choices=ROW_RULES, default=None,
                        help="CKA rows: fixed pixel sample per image, global average pool, or one row per "
                             "ground-truth box (default: object for detectors, sample otherwise)")
        sp.add_argument("--samples-per-image", type=int, default=16)
        sp.add_argument("--policy", choices=("zero", "mean", "noise", "missing"), default="zero",
                        help="main modality removal policy for contribution and reliance (mean: exact dataset means from a pre-pass)")
        sp.add_argument("--policies", type=_policy_list, default=None, metavar="P,P,...",
                        help="removal policies that contribution also measures in the same pass, reported side by "
                             "side (zero, mean, noise, missing; mean uses exact dataset statistics from a pre-pass). "
                             "Default: zero,mean,missing, missing only where the model has its own missing path; "
                             "'' for --policy alone")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        sp.add_argument("--no-progress", action="store_true")

    it = sub.add_parser("interpret", help="interpret one model: metrics.json, PNG plots, report.html")
    it.add_argument("target", help="run folder, save_pretrained folder, or registered model name")
    it.add_argument("--out", required=True, help="output folder")
    it.add_argument("--reference", action="append", default=None, metavar="[MODS=]RUN",
                    help="a run of the same recipe trained without a modality (train.py --modalities rgb), with "
                         "--modality-dropout or with --train-missing: the reference for what a modality adds; the "
                         "findings tell 'learned to use both' from 'breaks when one is removed' (repeatable; MODS, "
                         "e.g. rgb, picks the kept modalities of a dropout run)")
    data_args(it)

    cp = sub.add_parser("compare", help="interpret several models and lay them side by side",
                        description="Interpret (or reuse) several targets and lay them side by side. Runs of one "
                                    "recipe (same training config apart from the seed) are grouped: mean +- std "
                                    "(min..max, n) per headline number, and two recipes differ when their seed "
                                    "ranges do not overlap. A run on a subset of the modalities, or trained with "
                                    "modality dropout, of the same recipe is a retrained reference. Runs of "
                                    "different tasks, class sets or modalities are refused.")
    cp.add_argument("targets", nargs="+", help="run folders, interpret output folders, or model names")
    cp.add_argument("--out", required=True, help="output folder")
    data_args(cp)

    cv = sub.add_parser("convert", help="convert an authors' released checkpoint of a published entry")
    cv.add_argument("name", help="published entry, e.g. cmx_mit_b2 (fusionzoo list --published)")
    cv.add_argument("checkpoint", help="the authors' file as downloaded (.pth / .pt / .safetensors)")
    cv.add_argument("--tag", default=None, help="registered release, e.g. nyuv2 (class names, sha256, cache folder)")
    cv.add_argument("--out", default=None, help="output folder (default: the cache folder that pretrained=TAG reads)")
    cv.add_argument("--num-classes", type=int, default=None, help="without --tag: class count (default: from the classifier)")
    cv.add_argument("--force", action="store_true", help="replace a conversion already in the output folder (refused otherwise)")

    mr = sub.add_parser("mr2", help="KAIST log-average miss rate (all / day / night) of a result file")
    mr.add_argument("--annotations", required=True, help="KAIST COCO-style annotation JSON (e.g. MLPD's KAIST_annotation.json)")
    mr.add_argument("--results", required=True, help=(
        "detections: .txt lines 'image_id, x, y, w, h, score' with image_id 1-based (k = the k-th image by id), or a "
        "COCO results .json [{image_id, category_id, bbox: [x, y, w, h], score}] with image_id = the annotations' "
        "own integer images[].id (0-based in MLPD's file) and category_id 1 (person); boxes in original-frame "
        "pixels. Empty files, unknown categories, non-finite scores, bad boxes and ids off by one are refused"))
    # fusionzoo export (src/fusionzoo/commands/export.py; formats: fusionzoo.models.export.FORMATS)
    ex = sub.add_parser("export", help="export a model to ONNX or torch.export and check it against eager",
                        description="Export a model with its modalities as named inputs (dynamic batch where the "
                                    "model allows it). Segmentation models export whole (logits); detectors up to "
                                    "their box heads' raw outputs (anchor decoding, NMS and box fusion stay outside "
                                    "the graph). The export then runs beside the eager model on fresh inputs (ONNX "
                                    "Runtime for ONNX when installed, else the torch.export program); the largest "
                                    "absolute and relative differences are printed, and exit status 1 means the "
                                    "relative one exceeded --tolerance. See docs/export.md.")
    ex.add_argument("model", help="run folder, save_pretrained folder, or registered model name (built untrained)")
    ex.add_argument("--format", required=True, choices=("onnx", "torch-export"),
                    help="onnx (needs pip install 'fusionzoo[export]') or torch-export (a .pt2 for torch.export.load)")
    ex.add_argument("--out", required=True, help="output file (.onnx or .pt2)")
    ex.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="input height and width of the graph (default: the run's image_size, else 512 512)")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's exporter's)")
    ex.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest accepted max |export - eager| / max |eager| of any output (default 1e-3)")
    ex.add_argument("--json", default=None, metavar="FILE", help="also write the check (per output) as JSON")
    ex.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


# Subcommand -> (module, function), loaded when that subcommand runs (src/fusionzoo/commands/).
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("fusionzoo.commands.listing", "run"),
    "interpret": ("fusionzoo.commands.interpret", "run"),
    "compare": ("fusionzoo.commands.interpret", "run_compare"),
    "convert": ("fusionzoo.commands.convert", "run"),
    "mr2": ("fusionzoo.commands.mr2", "run"),
    "export": ("fusionzoo.commands.export", "run"),
}


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    module, function = COMMANDS[args.command]
    return getattr(importlib.import_module(module), function)(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusionzoo`` console script; returns the exit status.

    User errors print one line and return 2 (``--debug``: the traceback instead).
    """
    return run_command(_main, sys.argv[1:] if argv is None else argv, prog="fusionzoo")


if __name__ == "__main__":
    sys.exit(main())
