"""The ``fusionzoo`` console script.

::

    fusionzoo list [PATTERN ...] [--fusion middle] [--task segmentation] [--modalities rgb,depth]
    fusionzoo interpret RUN_DIR_OR_MODEL [--dataset synthetic_rgbd] [--data-root DIR] --out DIR
    fusionzoo compare A B C [--dataset ...] --out DIR
    fusionzoo mr2 --annotations KAIST_annotation.json --results RESULT.txt|.json

``RUN_DIR_OR_MODEL`` is a training run folder (``runs/<run>``: its ``best/`` weights, its
validation set and its training history are used), a folder written by ``save_pretrained``, or
a registered model name (built untrained: useful to inspect an architecture, and for tests).
``compare`` also accepts folders written by ``fusionzoo interpret`` (their ``metrics.json`` is
reused, nothing is recomputed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .interpret.api import ROW_RULES

    p = argparse.ArgumentParser(prog="fusionzoo", description="RGB-D / RGB-T fusion model zoo with uniform interpretation.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list registered models")
    ls.add_argument("patterns", nargs="*", help="fnmatch patterns, e.g. 'cmx_*'")
    ls.add_argument("--exclude", action="append", default=None, help="fnmatch pattern to leave out (repeatable)")
    ls.add_argument("--task", default=None)
    ls.add_argument("--fusion", action="append", default=None, help="early / middle / late / hybrid (repeatable)")
    ls.add_argument("--modalities", default=None, help="comma-separated, e.g. rgb,thermal")
    ls.add_argument("--long", action="store_true", help="also print fusion family, encoder and paper")

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
    names = fz.list_models(args.patterns or None, exclude=args.exclude, task=args.task, fusion=args.fusion,
                           modalities=mods)
    for n in names:
        if args.long:
            e = fz.model_entry(n)
            print(f"{n:32s} {e.fusion:7s} {e.encoder:16s} {e.paper}")
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
        raise SystemExit(f"dataset {name!r} needs --data-root (see datasets/{name}/README.md)")
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
                raise SystemExit(str(e)) from None
        if run_dir is not None:
            run_cfg = run_config(run_dir)
            history = training_history(run_dir)
        model = from_pretrained(weights)
        label = model.config.get("name", path.name)
        dataset = _dataset_for(args, run_cfg, model.modalities)
    elif path.exists():
        raise SystemExit(f"{target} is a file; give a run folder, a save_pretrained folder or a model name")
    else:
        dataset = _dataset_for(args, None, None)
        model = fz.create_model(target, num_classes=dataset.num_classes, modalities=tuple(dataset.modalities))
        label = target
    return model.to(device), dataset, history, label


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


def _cmd_mr2(args: argparse.Namespace) -> int:
    from .detection.kaist import KaistEvalError, evaluate_files

    try:
        res = evaluate_files(args.annotations, args.results)
    except KaistEvalError as err:
        print(f"fusionzoo mr2: error: {err}", file=sys.stderr)
        return 2
    print("MR-2 (KAIST reasonable: height >= 55 px, occlusion none/partial, 5 px border, FPPI 1e-2..1e0)")
    for key in ("all", "day", "night"):
        if key in res:
            print(f"{key:>5}: {100 * res[key]:.2f} %")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fusionzoo`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "list":
        return _cmd_list(args)
    if args.command == "interpret":
        return _cmd_interpret(args)
    if args.command == "compare":
        return _cmd_compare(args)
    if args.command == "mr2":
        return _cmd_mr2(args)
    raise ValueError(f"unknown command {args.command!r}")  # argparse rejects these first


if __name__ == "__main__":
    sys.exit(main())
