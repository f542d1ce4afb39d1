"""The ``fusionzoo`` console script.

::

    fusionzoo list [PATTERN ...] [--fusion middle] [--task segmentation] [--modalities rgb,depth]
    fusionzoo interpret RUN_DIR_OR_MODEL [--dataset synthetic_rgbd] [--data-root DIR] --out DIR
    fusionzoo compare A B C [--dataset ...] --out DIR
    fusionzoo convert PUBLISHED_NAME AUTHORS_CHECKPOINT [--tag nyuv2] [--out DIR]
    fusionzoo mr2 --annotations KAIST_annotation.json --results RESULT.txt|.json

``RUN_DIR_OR_MODEL`` is a training run folder (``runs/<run>``: its ``best/`` weights, its
validation set and its training history are used), a folder written by ``save_pretrained``, or
a registered model name (built untrained: useful to inspect an architecture, and for tests).
``compare`` also accepts folders written by ``fusionzoo interpret`` (their ``metrics.json`` is
reused, nothing is recomputed).

Adding a subcommand (keep ``fusionzoo --help`` free of torch; tests/test_silent_engine.py checks it):

1. Module level imports only the standard library. ``import fusionzoo`` itself is lazy (PEP 562
   in ``fusionzoo/__init__.py``), so importing this module costs nothing heavy.
2. In :func:`_parser`, add ``sub.add_parser("name", ...)`` with choices written as literals
   (a test checks them against the library's constants, e.g. ``ROW_RULES``), never imported.
3. Write ``_cmd_<name>(args) -> int`` that imports what it needs *inside* the function, and add
   it to ``COMMANDS``.
4. A mistake of the user (bad value, missing path, unknown name) raises :class:`UsageError`
   (or a ConfigError / CheckpointError / DataError from the library): :func:`run_command`
   prints one line and returns 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["UsageError", "main", "run_command"]

# Literal copy of fusionzoo.interpret.api.ROW_RULES (importing it would import torch for --help);
# tests/test_silent_engine.py checks that the two agree.
ROW_RULES = ("sample", "pool", "object")


class UsageError(Exception):
    """A mistake in a command line or its inputs: reported as one line with exit status 2."""


# Library errors that mean "the user's input is wrong", as (module, class): checked through
# sys.modules, so recognising them imports nothing (a class can only be raised once imported).
USER_ERRORS = (
    ("fusionzoo.engine.config", "ConfigError"),
    ("fusionzoo.engine.checkpoint", "CheckpointError"),
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
        sp.add_argument("--num-samples", type=int, default=None, help="synthetic sets: images to generate (default 32)")
        sp.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None)
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--max-batches", type=int, default=None)
        sp.add_argument("--metrics", default=None, help="comma-separated subset of the metrics (default: all)")
        sp.add_argument("--taps", default="*", help="fnmatch pattern of the taps to measure")
        sp.add_argument("--rows", choices=ROW_RULES, default=None,
                        help="CKA rows: fixed pixel sample per image, global average pool, or one row per "
                             "ground-truth box (default: object for detectors, sample otherwise)")
        sp.add_argument("--samples-per-image", type=int, default=16)
        sp.add_argument("--policy", choices=("zero", "noise", "missing"), default="zero",
                        help="modality removal policy for contribution and reliance")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        sp.add_argument("--no-progress", action="store_true")

    it = sub.add_parser("interpret", help="interpret one model: metrics.json, PNG plots, report.html")
    it.add_argument("target", help="run folder, save_pretrained folder, or registered model name")
    it.add_argument("--out", required=True, help="output folder")
    data_args(it)

    cp = sub.add_parser("compare", help="interpret several models and lay them side by side")
    cp.add_argument("targets", nargs="+", help="run folders, interpret output folders, or model names")
    cp.add_argument("--out", required=True, help="output folder")
    data_args(cp)

    cv = sub.add_parser("convert", help="convert an authors' released checkpoint of a published entry")
    cv.add_argument("name", help="published entry, e.g. cmx_mit_b2 (fusionzoo list --published)")
    cv.add_argument("checkpoint", help="the authors' file as downloaded (.pth / .pt / .safetensors)")
    cv.add_argument("--tag", default=None, help="registered release, e.g. nyuv2 (class names, sha256, cache folder)")
    cv.add_argument("--out", default=None, help="output folder (default: the cache folder that pretrained=TAG reads)")
    cv.add_argument("--num-classes", type=int, default=None, help="without --tag: class count (default: from the classifier)")

    mr = sub.add_parser("mr2", help="KAIST log-average miss rate (all / day / night) of a result file")
    mr.add_argument("--annotations", required=True, help="KAIST COCO-style annotation JSON (e.g. MLPD's KAIST_annotation.json)")
    mr.add_argument("--results", required=True, help="detections: .txt 'image_id, x, y, w, h, score' (1-based) or COCO .json")
    return p


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    import fusionzoo as fz

    mods = [m.strip() for m in args.modalities.split(",")] if args.modalities else None
    try:
        names = fz.list_models(args.patterns or None, exclude=args.exclude, task=args.task, fusion=args.fusion,
                               modalities=mods, published=True if args.published else None)
    except ValueError as e:  # e.g. an unknown modality name
        raise UsageError(f"fusionzoo list: {e}") from None
    for n in names:
        if args.long:
            e = fz.model_entry(n)
            origin = f" [published: {e.reference_repo}@{e.reference_commit[:8]}]" if e.published else ""
            print(f"{n:32s} {e.fusion:7s} {e.encoder:16s} {e.paper}{origin}")
        else:
            print(n)
    if not names:
        print("no model matches", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# resolving a target
# --------------------------------------------------------------------------------------------
def _dataset_for(args: argparse.Namespace, run_cfg: dict[str, Any] | None, modalities: Sequence[str] | None):
    from .data import create_dataset, dataset_entry

    if run_cfg is not None and args.dataset is None and args.data_root is None and args.num_samples is None:
        from .interpret.runs import validation_set

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
    from .data.transforms import STATS, eval_transforms

    mods = tuple(modalities or entry.modalities)
    tf = eval_transforms(mods, size=tuple(args.image_size) if args.image_size else None,
                         stats=name if name in STATS else None)
    return create_dataset(name, root, split=split, transforms=tf)


def _resolve(target: str, args: argparse.Namespace, device):
    """(model, dataset, training history, label) for a run folder / pretrained folder / model name."""
    import fusionzoo as fz

    from .engine.hub import from_pretrained
    from .interpret.runs import find_weights, is_pretrained_dir, run_config, training_history

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
        model = fz.create_model(target, num_classes=dataset.num_classes, modalities=tuple(dataset.modalities))
        label = target
    return model.to(device), dataset, history, label


def _check_model_name(target: str) -> None:
    """Tell a mistyped path from a mistyped model name (the target names neither a folder nor a model)."""
    import difflib

    import fusionzoo as fz

    try:
        fz.model_entry(target)
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


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _interpret_one(target: str, args: argparse.Namespace, out: Path):
    from .interpret import METRICS, run
    from .interpret.report import write_report

    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(METRICS)
    device = _device(args.device)
    model, dataset, history, label = _resolve(target, args, device)
    result = run(model, dataset, metrics=metrics, taps=args.taps, batch_size=args.batch_size,
                 max_batches=args.max_batches, rows=args.rows, samples_per_image=args.samples_per_image,
                 policy=args.policy, seed=args.seed, progress=not args.no_progress)
    if history is not None:
        result.training = history
    files = write_report(result, out)
    print(f"{label}: wrote {files['report']} ({len(files)} files)")
    return result


def _cmd_interpret(args: argparse.Namespace) -> int:
    _interpret_one(args.target, args, Path(args.out))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .interpret import load_result
    from .interpret.report import write_comparison

    out = Path(args.out)
    results = []
    for i, target in enumerate(args.targets):
        p = Path(target)
        if p.is_dir() and (p / "metrics.json").is_file() and not (p / "best").is_dir():
            results.append(load_result(p))
            print(f"{target}: reusing {p / 'metrics.json'}")
        else:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (p.name or target))
            results.append(_interpret_one(target, args, out / f"{i:02d}_{safe}"))
    files = write_comparison(results, out)
    print(files["markdown"].read_text())
    print(f"wrote {files['report']} and {files['markdown']}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.convert import convert_checkpoint

    if args.out is None and args.tag is None:
        raise UsageError("convert: give --tag (a registered release) or --out (an output folder)")
    try:
        out = convert_checkpoint(args.name, args.checkpoint, args.out, tag=args.tag, num_classes=args.num_classes)
    except (FileNotFoundError, KeyError) as e:
        raise UsageError(f"convert: {e.args[0] if isinstance(e, KeyError) else e}") from None
    print(f"wrote {out} (load it with fusionzoo.from_pretrained({str(out)!r}))")
    return 0


def _cmd_mr2(args: argparse.Namespace) -> int:
    from .detection.kaist import KaistEvalError, evaluate_files

    try:
        res = evaluate_files(args.annotations, args.results)
    except KaistEvalError as err:
        raise UsageError(f"mr2: {err}") from None
    print("MR-2 (KAIST reasonable: height >= 55 px, occlusion none/partial, 5 px border, FPPI 1e-2..1e0)")
    for key in ("all", "day", "night"):
        if key in res:
            print(f"{key:>5}: {100 * res[key]:.2f} %")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _cmd_list,
    "interpret": _cmd_interpret,
    "compare": _cmd_compare,
    "convert": _cmd_convert,
    "mr2": _cmd_mr2,
}


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return COMMANDS[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusionzoo`` console script; returns the exit status.

    User errors print one line and return 2 (``--debug``: the traceback instead).
    """
    return run_command(_main, sys.argv[1:] if argv is None else argv, prog="fusionzoo")


if __name__ == "__main__":
    sys.exit(main())
