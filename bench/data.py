"""Data-loading throughput: every registered reader + transform pipeline, and the synthetic world.

    python bench/data.py [--size 480 640] [--samples 48] [--workers 0 2] [--quick]
    python bench/data.py --modality-check 400     # per-class IoU of RGB-only / X-only / fused tiny CNNs

Benchmark readers run on prepared-layout fixtures written to a temporary folder (synthetic
content saved in each dataset's file formats; no download). Each row is samples/s through a
``DataLoader`` (batch 8, ``fusionzoo.data.collate``) over the second epoch with persistent
workers, so worker start-up is excluded. ``raw generator`` = the synthetic generator alone in
one thread (no DataLoader), as wall-clock rate and as samples per CPU-second (the latter is
less sensitive to other processes competing for the cores).
Pipelines: ``none`` = decode + tensors (the default when ``transforms=None``), ``eval`` =
``eval_transforms`` (normalize), ``train`` = ``train_transforms`` (random resize-crop, flip,
rotation, colour jitter, normalize).

Numbers depend on the machine and on what else runs on it; the table header prints the CPU
count and load average so a reader can judge.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader

from fusionzoo.data import (
    collate,
    create_dataset,
    dataset_entry,
    eval_transforms,
    list_datasets,
    train_transforms,
)
from fusionzoo.data.fixtures import write_fixture
from fusionzoo.data.synthetic import SyntheticConfig, SyntheticGenerator


def loader_rate(ds, workers: int, batch: int = 8) -> float:
    """Samples/s of the second epoch (persistent workers: start-up and first touches excluded)."""
    loader = DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate,
        shuffle=False,
        persistent_workers=workers > 0,
    )
    for _ in loader:  # warm-up epoch
        pass
    n, t0 = 0, time.perf_counter()
    for b in loader:
        n += len(b["meta"])
    return n / (time.perf_counter() - t0)


def generator_rate(second: str, size: tuple[int, int], n: int) -> tuple[float, float]:
    """(wall-clock, CPU-time) samples/s of the bare generator in this process, best of 3."""
    gen = SyntheticGenerator(SyntheticConfig(image_size=size, second=second), seed=0)
    gen(0)
    wall = cpu = 0.0
    for _ in range(3):  # best of 3 rounds: the least disturbed by other processes
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            gen(i)
        wall = max(wall, n / (time.perf_counter() - t0))
        cpu = max(cpu, n / (time.process_time() - c0))
    return wall, cpu


def modality_check(second: str, size: tuple[int, int], steps: int, samples: int = 512) -> None:
    """Train the same tiny dilated CNN on RGB only, on the second modality only, and on both, and
    print validation IoU per synthetic class: the documented known answer made visible."""
    torch.manual_seed(0)
    name = f"synthetic_rgb{second[0]}"
    train = create_dataset(name, num_samples=samples, image_size=size)
    val = create_dataset(name, split="val", num_samples=64, image_size=size)
    tb = collate([train[i] for i in range(len(train))])
    vb = collate([val[i] for i in range(len(val))])
    classes = train.classes
    print(f"\n## {name}: per-class validation IoU of a tiny CNN ({steps} steps, {size[0]}x{size[1]})\n")
    print("| input | " + " | ".join(classes) + " | mIoU |")
    print("|---" * (len(classes) + 2) + "|")
    for mods in (("rgb",), (second,), ("rgb", second)):
        layers: list[torch.nn.Module] = []
        cin = sum(tb[m].shape[1] for m in mods)
        for dilation in (1, 2, 4, 8, 1):  # receptive field 33 px: sees an object's edges
            layers += [
                torch.nn.Conv2d(cin, 24, 3, padding=dilation, dilation=dilation),
                torch.nn.BatchNorm2d(24),
                torch.nn.ReLU(),
            ]
            cin = 24
        net = torch.nn.Sequential(*layers, torch.nn.Conv2d(24, len(classes), 1))
        opt = torch.optim.AdamW(net.parameters(), 3e-3)
        x_train = torch.cat([tb[m] for m in mods], 1)
        for _ in range(steps):
            idx = torch.randint(0, samples, (16,))
            loss = torch.nn.functional.cross_entropy(net(x_train[idx]), tb["mask"][idx], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pred = net(torch.cat([vb[m] for m in mods], 1)).argmax(1)
        ious = []
        for k in range(len(classes)):
            inter = ((pred == k) & (vb["mask"] == k)).sum().item()
            union = ((pred == k) | (vb["mask"] == k)).sum().item()
            ious.append(inter / union if union else float("nan"))
        print(
            f"| {'+'.join(mods)} | "
            + " | ".join(f"{v:.2f}" for v in ious)
            + f" | {sum(ious) / len(ious):.2f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    ap.add_argument("--samples", type=int, default=48, help="samples per measured dataset")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--quick", action="store_true", help="fewer datasets and samples (smoke run)")
    ap.add_argument(
        "--modality-check",
        type=int,
        default=0,
        metavar="STEPS",
        help="instead of timing, train a tiny CNN per input set for STEPS steps on 48x64 synthetic "
        "data and print per-class IoU (a few minutes on 2 cores at 400 steps)",
    )
    args = ap.parse_args()
    if args.modality_check:
        torch.set_num_threads(os.cpu_count() or 1)
        for second in ("depth", "thermal"):
            modality_check(second, (48, 64), args.modality_check)
        return
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one core per process: workers scale by processes, not threads
    size = tuple(args.size)
    n = 16 if args.quick else args.samples
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# fusionzoo data benchmark: {size[0]}x{size[1]}, {n} samples/row, batch 8, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}\n"
    )
    print("| dataset | pipeline | workers | samples/s |")
    print("|---|---|---|---|")
    for second in ("depth", "thermal"):
        wall, cpu = generator_rate(second, size, max(n, 50))
        print(f"| synthetic_rgb{second[0]} | raw generator, 1 thread (wall clock) | - | {wall:.0f} |")
        print(
            f"| synthetic_rgb{second[0]} | raw generator, 1 thread (per CPU-second) | - | {cpu:.0f} |",
            flush=True,
        )
    names = list_datasets()
    if args.quick:
        names = ["nyuv2", "mfnet", "llvip", "synthetic_rgbd"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            entry = dataset_entry(name)
            mods = entry.modalities
            stats = name
            pipelines = {
                "none": None,
                "eval": eval_transforms(mods, stats=stats),
                "train": train_transforms(mods, size=size, stats=stats),
            }
            if entry.needs_root:
                root = write_fixture(
                    Path(tmp) / name,
                    name,
                    num_samples=n,
                    image_size=size,
                    splits=("train",),
                    rgb_ext=".jpg" if "detection" in entry.task else ".png",
                )
                make = lambda t, name=name, root=root: create_dataset(
                    name, root=root, split="train", transforms=t
                )
            else:
                pipelines.pop("none")  # synthetic default already normalizes (= eval)
                make = lambda t, name=name: create_dataset(name, num_samples=n, image_size=size, transforms=t)
            for pname, t in pipelines.items():
                ds = make(t)
                for w in args.workers:
                    print(f"| {name} | {pname} | {w} | {loader_rate(ds, w):.0f} |", flush=True)


if __name__ == "__main__":
    main()
