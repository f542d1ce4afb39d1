#!/usr/bin/env python
"""Train detectors briefly on the synthetic RGB-T set and print COCO AP / AP50 per model.

    python bench/detection.py                          # one model per fusion family (resnet18, FCOS)
    python bench/detection.py --models retinanet_late_nms_resnet18 --steps 300
    python bench/detection.py --list                   # the detection zoo with parameter counts

Everything is seeded (data, init, batch order); encoders start from scratch (no download), so
the numbers measure how fast each fusion design learns the synthetic task on CPU, not the
quality of a trained model. The synthetic world (fusionzoo.data.synthetic) has classes visible
only in RGB, only in thermal, in either, and only in both, so fusion is needed for all four.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import fusionzoo as fz
from fusionzoo.data import collate, create_dataset
from fusionzoo.detection import coco_ap

DEFAULT_MODELS = ["fcos_early_resnet18", "fcos_cmx_resnet18", "fcos_late_wbf_resnet18", "fcos_hybrid_wbf_resnet18"]


def list_zoo() -> None:
    print(f"| {'model':32s} | {'fusion':6s} | params (M) | taps |")
    print(f"|{'-' * 34}|{'-' * 8}|-----------:|-----:|")
    for name in fz.list_models(task="detection"):
        entry = fz.model_entry(name)
        if not entry.encoder_fixed:
            continue
        model = fz.create_model(name, num_classes=3)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name:32s} | {entry.fusion:6s} | {params:10.2f} | {len(model.tap_info()):4d} |")


def batches(data, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` batches, reshuffling the training set every epoch (seeded)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(data), generator=g).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield collate([data[i] for i in idx])


def evaluate(model, data, batch_size: int, device: torch.device) -> dict[str, float]:
    model.eval()
    predictions, targets = [], []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            out = model({m: batch[m].to(device) for m in data.modalities})
            predictions += [{k: v.cpu() for k, v in d.items()} for d in out]
            targets += [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
    return coco_ap(predictions, targets, num_classes=data.num_classes)


def run(name: str, args: argparse.Namespace) -> dict[str, object]:
    size = (args.image_size, args.image_size)
    train = create_dataset("synthetic_rgbt", split="train", num_samples=args.train_samples, image_size=size, seed=args.seed)
    val = create_dataset("synthetic_rgbt", split="val", num_samples=args.val_samples, image_size=size, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    model = fz.create_model(name, num_classes=train.num_classes, modalities=train.modalities,
                            fpn_channels=args.fpn_channels, score_thresh=0.05).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 10)  # linear warm-up, then cosine decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup)))
    )
    model.train()
    start, first, recent = time.time(), None, []
    for step, batch in enumerate(batches(train, args.batch_size, args.steps, args.seed)):
        targets = [{"boxes": b.to(args.device), "labels": l.to(args.device)} for b, l in zip(batch["boxes"], batch["labels"])]
        loss = sum(model({m: batch[m].to(args.device) for m in train.modalities}, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        first = loss.item() if first is None else first
        recent = (recent + [loss.item()])[-10:]
        if args.verbose and step % 20 == 0:
            print(f"  {name} step {step} loss {loss.item():.3f}", flush=True)
    seconds = time.time() - start
    stats = evaluate(model, val, args.batch_size, args.device)
    return {"model": name, "fusion": fz.model_entry(name).fusion, "params": sum(p.numel() for p in model.parameters()) / 1e6,
            "seconds": seconds, "loss0": first, "loss": sum(recent) / len(recent), **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--train-samples", type=int, default=128)
    parser.add_argument("--val-samples", type=int, default=64)
    parser.add_argument("--fpn-channels", type=int, default=64, help="FPN/head width (256 as published; 64 for CPU)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the detection zoo and exit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.list:
        list_zoo()
        return
    print(f"synthetic_rgbt {args.image_size}x{args.image_size}, {args.train_samples} train / {args.val_samples} val images, "
          f"{args.steps} steps x batch {args.batch_size}, AdamW lr {args.lr} warm-up + cosine, fpn_channels {args.fpn_channels}, "
          f"seed {args.seed}, from scratch, {args.device}")
    print(f"| {'model':30s} | fusion | params (M) | train s | loss start -> end | AP    | AP50  | AP75  |")
    print(f"|{'-' * 32}|--------|-----------:|--------:|------------------:|------:|------:|------:|")
    for name in args.models:
        r = run(name, args)
        print(f"| {r['model']:30s} | {r['fusion']:6s} | {r['params']:10.2f} | {r['seconds']:7.0f} | "
              f"{r['loss0']:7.3f} -> {r['loss']:6.3f} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
