"""The ``fusionzoo`` console script.

::

    fusionzoo list [PATTERN ...] [--fusion middle] [--task segmentation] [--modalities rgb,depth]
    fusionzoo interpret RUN_DIR_OR_MODEL [--dataset synthetic_rgbd] [--data-root DIR] --out DIR
    fusionzoo compare A B C [--dataset ...] --out DIR
    fusionzoo convert PUBLISHED_NAME AUTHORS_CHECKPOINT [--tag nyuv2] [--out DIR]
    fusionzoo mr2 --annotations KAIST_annotation.json --results RESULT.txt|.json
    fusionzoo fuse-boxes A.json B.json [...] --rule proben|wbf|nms --out FUSED.json
    fusionzoo predict MODEL --rgb FILE|DIR --depth|--thermal FILE|DIR --out DIR
    fusionzoo push RUN_OR_FOLDER OWNER/NAME [--private] [--out DIR]
    fusionzoo bench MODEL [--size H W] [--batch-size N] [--modes eager,channels_last,compile,bf16] [--out FILE.json]
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
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .commands import UsageError

__all__ = ["UsageError", "main", "run_command"]

# Literal copy of fusionzoo.interpret.api.ROW_RULES (importing it would import torch for --help);
# tests/test_silent_engine.py checks that the two agree.
ROW_RULES = ("sample", "pool", "object")
# Literal copies of fusionzoo.interpret.intervals.DEFAULT_REPLICATES / DEFAULT_LEVEL (same test).
DEFAULT_REPLICATES = 200
DEFAULT_LEVEL = 0.95


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
    except BrokenPipeError:
        # the reader went away (`fusionzoo list | head`): stop quietly, as Unix tools do; point
        # stdout at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
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


def _number(parse: Callable[[str], Any], ok: Callable[[Any], bool], unreadable: str,
            out_of_range: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse(text)``, which must satisfy ``ok``; otherwise a one-line
    error, ``expected <unreadable>`` / ``expected <out_of_range>``, with what was given."""
    def check(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unreadable}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {out_of_range}, got {value}")
        return value
    return check


# --replicates R: a whole number >= 0; --level L: a coverage strictly between 0 and 1
_replicates = _number(int, lambda v: v >= 0, "a whole number of replicates (0 or more)", "0 or more replicates")
_level = _number(float, lambda v: 0.0 < v < 1.0, "a coverage between 0 and 1 (e.g. 0.95)",
                 "a coverage strictly between 0 and 1 (e.g. 0.95)")


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
        sp.add_argument("--data-root", default=None, help="prepared dataset folder (benchmarks), or for --dataset folder the folder holding fusionzoo.yaml (docs/custom_data.md)")
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
        sp.add_argument("--replicates", type=_replicates, default=DEFAULT_REPLICATES, metavar="R",
                        help=f"bootstrap replicates over images behind every interval (default {DEFAULT_REPLICATES}); "
                             "fewer are faster and their interval ends noisier; 0 computes none: the report then says "
                             "so and marks each finding 'point values, no interval'")
        sp.add_argument("--level", type=_level, default=DEFAULT_LEVEL, metavar="L",
                        help=f"coverage of the intervals (default {DEFAULT_LEVEL})")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sp.add_argument("--seed", type=int, default=0, help="seed of the removal noise, permutations, sampled CKA "
                                                            "pixels and bootstrap weights (and of synthetic data)")
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        sp.add_argument("--no-progress", action="store_true")

    it = sub.add_parser("interpret", help="interpret one model: metrics.json, PNG plots, report.html",
                        description="Interpret one model: metrics.json, PNG plots, report.html. Under torchrun "
                                    "(torchrun --nproc-per-node N -m fusionzoo.cli interpret RUN --out DIR; also "
                                    "compare) each process interprets every N-th batch, on cuda:LOCAL_RANK or the "
                                    "CPU (gloo), the results are summed over processes (the numbers of one "
                                    "process) and process 0 writes the report.")
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
    fb = sub.add_parser(
        "fuse-boxes", help="late fusion of several detectors' COCO results files (ProbEn, WBF or NMS)",
        description="Fuse, image by image, the detections of several detectors (COCO results JSON: [{image_id, "
                    "category_id = class + 1, bbox: [x, y, w, h], score}], as fusionzoo predict writes them; optional "
                    "per-record 'probs' (K class probabilities) and 'vars' (box variance)). docs/detection.md.")
    fb.add_argument("results", nargs="+", help="two or more COCO results files, one per detector")
    fb.add_argument("--rule", default="proben", choices=("nms", "wbf", "proben"),
                    help="proben: ProbEn (Chen et al., ECCV 2022), equal to the authors' code; wbf: weighted boxes "
                         "fusion; nms: class-wise NMS over the union (default proben)")
    fb.add_argument("--out", required=True, help="fused COCO results file to write")
    fb.add_argument("--iou", type=float, default=None, help="clustering IoU (default per rule: NMS 0.5, WBF 0.55, ProbEn 0.5)")
    fb.add_argument("--score-fusion", default=None, choices=("proben", "avg", "max"),
                    help="ProbEn's score rule: Bayes' rule (default), mean, or max (the authors' options)")
    fb.add_argument("--box-fusion", default=None, choices=("s-avg", "v-avg", "avg", "argmax"),
                    help="ProbEn's box rule: score-weighted mean (default), inverse-variance weighted (needs 'vars'), "
                         "mean, or the top box")
    fb.add_argument("--max-detections", type=int, default=100, help="keep at most this many per image (default 100)")
    _predict_parser(sub)

    ph = sub.add_parser("push", help="upload a trained model with a model card to the Hugging Face Hub",
                        description="Upload the folder that fusionzoo.from_pretrained reads (config.json + "
                                    "model.safetensors with its sha256) and a model card README.md generated from "
                                    "the run (recipe, scores, interpretability report plots) to a Hub model "
                                    "repository, in one commit. The repository is created when missing.")
    ph.add_argument("source", help="run folder written by train.py (its best/ weights), or a save_pretrained folder")
    ph.add_argument("repo_id", help="Hub repository 'owner/name'; load it back with fusionzoo.from_pretrained(REPO_ID)")
    ph.add_argument("--private", action="store_true", help="create the repository private (an existing one keeps its visibility)")
    ph.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    ph.add_argument("--message", default=None, help="commit message (default: 'Upload MODEL with fusionzoo VERSION')")
    ph.add_argument("--revision", default=None, help="branch to commit to, created when missing (default: main)")
    ph.add_argument("--out", default=None, help="only write the folder that would be uploaded to OUT (look at the card); upload nothing")
    _bench_parser(sub)
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


def _predict_parser(sub: Any) -> None:
    """``fusionzoo predict`` (src/fusionzoo/commands/predict.py; docs/predict.md)."""
    pr = sub.add_parser(
        "predict", help="run a trained model on your own RGB-D / RGB-T files: masks, overlays, boxes, COCO JSON",
        description="Run a trained model on image files. Give one file per modality, or one folder per modality: "
                    "files pair by stem (rgb/0001.jpg with thermal/0001.png); unmatched files are refused. Inputs are "
                    "read as in training (depth: integer PNG in 1/--depth-scale m, or float metres in .npy/.tif; "
                    "thermal scaled to [0, 1]) and normalized with the statistics stored with the model. "
                    "Segmentation writes masks/<stem>.png (palette PNG: pixel value = class id, dataset colours) "
                    "and overlays/<stem>.png; detection writes boxes/<stem>.png, detections.json (COCO results: "
                    "category_id = class + 1, bbox [x, y, w, h] in original pixels) and images.json. predict.json "
                    "records the settings used.")
    pr.add_argument("model", metavar="MODEL",
                    help="training run folder (its best/ weights), save_pretrained folder, Hub id owner/name, or a "
                         "published entry with converted weights name.tag (e.g. esanet_r34_nbt1d.nyuv2)")
    pr.add_argument("--rgb", default=None, metavar="FILE|DIR", help="colour image(s)")
    pr.add_argument("--depth", default=None, metavar="FILE|DIR", help="depth map(s): uint16 PNG in 1/--depth-scale m, "
                    "or float metres (.npy, float TIFF); 0 = invalid")
    pr.add_argument("--thermal", default=None, metavar="FILE|DIR", help="thermal image(s), 8/16-bit or float in [0, 1]")
    pr.add_argument("--hha", default=None, metavar="FILE|DIR", help="HHA image(s), for models that take hha")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--missing", action="append", default=None, metavar="MODALITY",
                    help="run without this modality through the model's own missing-modality path (repeatable)")
    pr.add_argument("--depth-scale", type=float, default=None,
                    help="integer depth units per metre (default: the training dataset's, else 1000 = millimetres; "
                         "5000 for TUM / ICL-NUIM), as ESANet's inference script's --depth_scale")
    pr.add_argument("--thermal-bits", type=int, default=None,
                    help="significant bits of 16-bit thermal files (12 or 14 for radiometric cameras; default: the "
                         "training run's, else the file's own)")
    pr.add_argument("--size-policy", choices=("resize", "pad"), default=None,
                    help="resize: every frame to the training size (--size, default: the run's image_size), outputs "
                         "resized back; pad: native size zero-padded to a multiple of 32, outputs cropped back "
                         "(default: resize when the training size is known, else pad)")
    pr.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="model input size for resize")
    pr.add_argument("--annotations", default=None, metavar="COCO_JSON",
                    help="detection: take image_id from this COCO annotation file (images[].id, matched by "
                         "im_name/file_name, '/' as '_'), e.g. KAIST_annotation.json for fusionzoo mr2")
    pr.add_argument("--draw-threshold", type=float, default=0.3, help="detection: draw boxes with score >= this "
                    "(the JSON keeps every detection)")
    pr.add_argument("--alpha", type=float, default=0.5, help="segmentation: opacity of the overlay colours")
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")


def _bench_parser(sub: Any) -> None:
    """``fusionzoo bench``: modes as literals (fusionzoo.benchmark.MODES; tests/test_bench_cli.py checks)."""
    bn = sub.add_parser(
        "bench", help="latency, throughput, peak memory, parameters and FLOPs of one model",
        description="Time one model on random inputs in several execution modes and print a markdown table: batch-1 "
                    "latency p50/p95 (torch.utils.benchmark blocked_autorange after warm-up; CUDA synchronised), "
                    "images/s at --batch-size, peak memory of one batch forward (CUDA: max_memory_allocated; CPU: "
                    "the process's resident high-water mark), parameters and FLOPs (torch.utils.flop_counter, one "
                    "batch-1 forward, a multiply-add = 2 FLOPs; GMACs, half of it, is what most papers call FLOPs). "
                    "A mode that cannot run here keeps a row saying why.")
    bn.add_argument("model", help="registered model name (built untrained: timing does not depend on weights), run "
                                  "folder, or save_pretrained folder")
    bn.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(480, 640), help="input size (default 480 640)")
    bn.add_argument("--batch-size", type=int, default=8, help="batch of the throughput and peak-memory rows (default 8)")
    bn.add_argument("--modes", default="eager,channels_last,compile,bf16", metavar="M,M,...",
                    help="comma-separated: eager, channels_last (NHWC), compile (torch.compile; its first call's time "
                         "is printed apart), bf16 (autocast; skipped with the reason where the device has no native "
                         "bf16), exported (needs --exported). Default: eager,channels_last,compile,bf16")
    bn.add_argument("--exported", default=None, metavar="FILE.pt2",
                    help="a torch.export file of the same model (fusionzoo export), loaded with torch.export.load and "
                         "timed as the 'exported' mode")
    bn.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    bn.add_argument("--warmup", type=int, default=3, help="untimed calls before each timing (default 3)")
    bn.add_argument("--min-run-time", type=float, default=2.0, metavar="S",
                    help="seconds each timing runs at least (default 2); p50/p95 rest on the timed blocks, counted "
                         "in the 'runs' column")
    bn.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bn.add_argument("--out", default=None, metavar="FILE.json", help="also write the results as JSON")
    bn.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


# Subcommand -> (module, function), loaded when that subcommand runs (src/fusionzoo/commands/).
COMMANDS: dict[str, tuple[str, str]] = {
    "list": ("fusionzoo.commands.listing", "run"),
    "interpret": ("fusionzoo.commands.interpret", "run"),
    "compare": ("fusionzoo.commands.interpret", "run_compare"),
    "convert": ("fusionzoo.commands.convert", "run"),
    "mr2": ("fusionzoo.commands.mr2", "run"),
    "fuse-boxes": ("fusionzoo.commands.fuse_boxes", "run"),
    "predict": ("fusionzoo.commands.predict", "run"),
    "push": ("fusionzoo.commands.push", "run"),
    "bench": ("fusionzoo.commands.bench", "run"),
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
