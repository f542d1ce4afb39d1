#!/usr/bin/env python
"""Print the segmentation zoo: every registered model with its fusion family, parameter count,
number of taps, and the paper it follows.

    python bench/models.py                       # named variants, NYUDv2 head (40 classes), RGB-D
    python bench/models.py --filter "cmx_*" --num-classes 9 --modalities rgb thermal
    python bench/models.py --markdown            # the table in README.md (methods x encoders)
    python bench/models.py --published           # the authors' networks (docs/published.md)

Parameters do not depend on the input size; the forward check runs one 1x(C)x480x640 batch per
model when --forward is given (slow on CPU).
"""

from __future__ import annotations

import argparse

import torch

import fusionzoo as fz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="*")
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--modalities", nargs="+", default=["rgb", "depth"])
    parser.add_argument("--families", action="store_true", help="include family entries (default encoder)")
    parser.add_argument("--forward", action="store_true", help="also run one 480x640 forward pass per model")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--published", action="store_true", help="list published entries (the authors' networks) instead")
    args = parser.parse_args()

    names = [
        n for n in fz.list_models(args.filter, task="segmentation", modalities=args.modalities, published=args.published)
        if args.families or fz.model_entry(n).encoder_fixed
    ]
    rows = []
    for name in names:
        entry = fz.model_entry(name)
        # Published entries are built on their paper's streams (e.g. RGB + 3-channel HHA).
        streams = {} if entry.published else {"modalities": tuple(args.modalities)}
        model = fz.create_model(name, num_classes=args.num_classes, **streams).eval()
        params = sum(p.numel() for p in model.parameters())
        shape = ""
        if args.forward:
            inputs = {m: torch.randn(1, model.in_chans[m], 480, 640) for m in model.modalities}
            with torch.no_grad():
                shape = "x".join(map(str, model(inputs).shape))
        rows.append((name, entry.fusion, f"{params / 1e6:.2f}", str(len(model.tap_info())), shape, entry.paper))
        del model

    header = ("model", "fusion", "params (M)", "taps", "output" if args.forward else "", "paper")
    if args.markdown:  # one row per method, parameter counts per encoder
        encoders = sorted({fz.model_entry(r[0]).encoder for r in rows})
        print(f"| method | fusion | {' | '.join(encoders)} | paper |")
        print("|---|---|" + "---:|" * len(encoders) + "---|")
        for method in sorted({fz.model_entry(r[0]).method for r in rows}):
            mine = {fz.model_entry(r[0]).encoder: r for r in rows if fz.model_entry(r[0]).method == method}
            any_row = next(iter(mine.values()))
            counts = " | ".join(mine[e][2] if e in mine else "" for e in encoders)
            print(f"| `{method}` | {any_row[1]} | {counts} | {any_row[5]} |")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])


if __name__ == "__main__":
    main()
