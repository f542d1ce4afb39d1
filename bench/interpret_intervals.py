#!/usr/bin/env python
"""What bootstrap intervals and extra removal policies cost ``interpret.run``.

    python bench/interpret_intervals.py                         # late_mean_resnet18 and esanet_resnet18
    python bench/interpret_intervals.py --models esanet_resnet18 --num-samples 32

Every metric on the default synthetic set (96 validation images at 64x80), one torch thread,
with ``replicates`` 0 and 200 (``fusionzoo.interpret.intervals``) and ``policies`` ``()`` (the
main policy alone) and the default (zero, mean, missing where the model has its own path).
Prints CPU seconds (``time.process_time``, robust to a loaded machine) beside wall seconds.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import torch

import fusionzoo as fz
from fusionzoo import interpret


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["late_mean_resnet18", "esanet_resnet18"])
    ap.add_argument("--num-samples", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = fz.data.create_dataset("synthetic_rgbd", split="val", num_samples=args.num_samples, image_size=(64, 80))
    print("| model | policies | replicates | CPU s | wall s | intervals |\n|---|---|---:|---:|---:|---:|")
    for name in args.models:
        torch.manual_seed(0)
        model = fz.create_model(name, num_classes=ds.num_classes)
        for policies in ((), None):
            for reps in (0, 200):
                wall, cpu = time.perf_counter(), time.process_time()
                res = interpret.run(model, ds, replicates=reps, policies=policies)
                print(f"| {name} | {', '.join(res.settings['policies'])} | {reps} | {time.process_time() - cpu:.1f} | "
                      f"{time.perf_counter() - wall:.1f} | {len(res.intervals)} |", flush=True)


if __name__ == "__main__":
    main()
