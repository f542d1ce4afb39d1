#!/usr/bin/env python
"""Training and inference throughput (images/s) and peak memory of registered models.

    python bench/train.py                                   # every named segmentation model, 480x640, CPU
    python bench/train.py --models "*_resnet18" --steps 3   # a subset (segmentation and detection)
    python bench/train.py --task detection --size 512,640   # every named detector
    python bench/train.py --device cuda --amp bf16 --batch-size 8 --channels-last

Models: ``--task segmentation`` (the zoo of ``list_models(task="segmentation")``), ``detection``
(``list_models(task="detection")``) or ``all``.
Without ``--task``, ``--models`` patterns are matched against both tasks (so
``--models fcos_cmx_resnet18`` needs no ``--task``; each model's task is ``model_entry(name).task``)
and no patterns means every segmentation model, as before detectors existed. Family entries
(``cmx`` = ``cmx_resnet50``) are skipped unless ``--include-families``.

Each model is measured in a fresh subprocess, so peak memory belongs to that model alone: on
CPU the peak resident set size of the process (``ru_maxrss`` from ``wait4``) minus the RSS the
process had before the model was built; on CUDA ``torch.cuda.max_memory_allocated``. Inference
is measured first (``torch.inference_mode``, eval mode), then training (forward, loss,
backward, AdamW step), each after ``--warmup`` untimed steps. The tasks differ only in the call
and the loss: a segmentation model maps the inputs to logits and trains on cross-entropy against
random labels (``--num-classes`` default 40); a detector (``--num-classes`` default 3) is called
torchvision's way, ``model(inputs)`` in eval returning one dict of boxes/scores/labels per image
(after its own score threshold and NMS) and ``model(inputs, targets)`` in training returning a
loss dict, summed, with 3 random valid xyxy boxes and labels per image (seeded, fixed for all
steps). Inputs are random normal, also seeded. Numbers are medians over ``--steps`` timed steps.
Nothing here is asserted: it prints one table per device and task (and ``--json`` writes the rows).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("segmentation", "detection")
NUM_CLASSES = {"segmentation": 40, "detection": 3}  # default --num-classes per task
BOXES_PER_IMAGE = 3


def _zoo():
    """``fusionzoo`` from this checkout (its import registers segmentation and detection models)."""
    sys.path.insert(0, str(ROOT / "src"))
    import fusionzoo as fz

    return fz


def _random_targets(batch: int, size: tuple[int, int], num_classes: int, device) -> list[dict]:
    """``BOXES_PER_IMAGE`` random valid xyxy pixel boxes (sides 5-50 % of the image) and labels per image."""
    import torch

    g = torch.Generator().manual_seed(0)
    h, w = size
    scale = torch.tensor([w, h], dtype=torch.float32)
    targets = []
    for _ in range(batch):
        wh = (0.05 + 0.45 * torch.rand(BOXES_PER_IMAGE, 2, generator=g)) * scale
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * (scale - wh)
        labels = torch.randint(0, num_classes, (BOXES_PER_IMAGE,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device), "labels": labels.to(device)})
    return targets


def _worker(args: argparse.Namespace) -> None:
    import resource

    import torch

    fz = _zoo()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    entry = fz.model_entry(args.worker)
    mods = tuple(args.modalities.split(",")) if args.modalities else entry.modalities
    torch.manual_seed(0)
    model = fz.create_model(args.worker, num_classes=args.num_classes, modalities=mods).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    h, w = args.size
    chans = {"rgb": 3, "hha": 3, "depth": 1, "thermal": 1}
    x = {m: torch.randn(args.batch_size, chans[m], h, w, device=device).contiguous(memory_format=fmt) for m in mods}
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)

    def timed(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return out

    # The only task-specific part: how the model is called in training and how the loss is formed.
    if entry.task == "detection":
        targets = _random_targets(args.batch_size, (h, w), args.num_classes, device)

        def forward_loss() -> torch.Tensor:
            with autocast():
                losses = model(x, targets)
            return sum(v.float() for v in losses.values())
    else:
        y = torch.randint(0, args.num_classes, (args.batch_size, h, w), device=device)

        def forward_loss() -> torch.Tensor:
            with autocast():
                logits = model(x)
            return torch.nn.functional.cross_entropy(logits.float(), y)

    row = {"model": args.worker, "task": entry.task, "fusion": entry.fusion, "modalities": list(mods),
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6}

    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast():
            model(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(infer, args.warmup)
    t_inf = timed(infer, args.steps)
    row["infer_img_s"] = args.batch_size / statistics.median(t_inf)
    if device.type == "cuda":
        row["infer_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["infer_peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss_kb) / 1024

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = forward_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed(train_step, args.warmup)
    t_train = timed(train_step, args.steps)
    row["train_img_s"] = args.batch_size / statistics.median(t_train)
    if device.type == "cuda":
        row["train_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # ru_maxrss is monotonic, so this is the peak over both phases (training dominates).
        row["train_peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss_kb) / 1024
    print("BENCH_ROW " + json.dumps(row), flush=True)


def _models(patterns: list[str] | None, include_families: bool, task: str | None) -> list[str]:
    """Names to measure: ``task`` None searches both tasks when patterns are given, else segmentation."""
    fz = _zoo()
    if task is None:
        tasks = TASKS if patterns else ("segmentation",)
    else:
        tasks = TASKS if task == "all" else (task,)
    names = [n for t in tasks for n in fz.list_models(task=t)]
    if not include_families:
        names = [n for n in names if fz.model_entry(n).encoder_fixed]  # family entries repeat a variant
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        raise SystemExit(f"no {'/'.join(tasks)} model matches {patterns}; see fusionzoo.list_models()")
    return names


def _num_classes(task: str, args: argparse.Namespace) -> int:
    return args.num_classes if args.num_classes is not None else NUM_CLASSES[task]


def _measure(name: str, task: str, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--device", device, "--size", f"{args.size[0]},{args.size[1]}",
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--num-classes", str(_num_classes(task, args)), "--amp", args.amp]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.modalities:
        cmd += ["--modalities", args.modalities]
    if args.channels_last:
        cmd.append("--channels-last")
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"model": name, "task": task, "error": f"timeout after {args.timeout}s"}
    for line in out.splitlines():
        if line.startswith("BENCH_ROW "):
            return json.loads(line[len("BENCH_ROW "):])
    tail = (err or out).strip().splitlines()[-1:] or ["no output"]
    return {"model": name, "task": task, "error": tail[0][:120]}


def _table(rows: list[dict], task: str, device: str, args: argparse.Namespace) -> str:
    size = f"{args.size[0]}x{args.size[1]}"
    head = (f"{task}, {_num_classes(task, args)} classes, device {device}, input {size}, "
            f"batch {args.batch_size}, amp {args.amp}, median of {args.steps} steps after {args.warmup} warm-up")
    lines = [head, "",
             "| model | fusion | params (M) | train img/s | infer img/s | train peak MB | infer peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['fusion']} | {r['params_m']:.1f} | {r['train_img_s']:.2f} | "
                     f"{r['infer_img_s']:.2f} | {r['train_peak_mb']:.0f} | {r['infer_peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="fnmatch patterns (default: every named variant of --task)")
    p.add_argument("--task", default=None, choices=[*TASKS, "all"],
                   help="default: both tasks when --models is given, else segmentation")
    p.add_argument("--include-families", action="store_true", help="also family entries (cmx = cmx_resnet50)")
    p.add_argument("--size", default="480,640", help="H,W (default 480,640)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per phase")
    p.add_argument("--num-classes", type=int, default=None, help="default: 40 segmentation, 3 detection")
    p.add_argument("--modalities", default=None, help="e.g. rgb,thermal (default: each model's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or 'all' (CPU, then CUDA when available)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="autocast dtype (GPU)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: torch's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        args.size = tuple(int(v) for v in args.size.replace("x", ",").split(","))
        if len(args.size) != 2:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--size must be H,W, got {args.size!r}") from None
    if args.worker:
        _worker(args)
        return
    import torch

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    if not devices:
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    names = _models(args.models, args.include_families, args.task)
    fz = _zoo()
    by_task = {t: [n for n in names if fz.model_entry(n).task == t] for t in TASKS}
    results = {}
    for device in devices:
        rows = []
        for task, task_names in by_task.items():
            if not task_names:
                continue
            task_rows = []
            for name in task_names:
                task_rows.append(_measure(name, task, args, device))
                print(f"  measured {name} on {device}", file=sys.stderr, flush=True)
            print(_table(task_rows, task, device, args), flush=True)
            print()
            rows += task_rows
        results[device] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
