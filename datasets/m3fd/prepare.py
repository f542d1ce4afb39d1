"""M3FD detection -> fusionzoo prepared detection layout.

    python datasets/m3fd/prepare.py --source <M3FD_Detection> --out data/m3fd [--test-fraction 0.2 --seed 0]

The release holds ``Vis/<id>.png``, ``Ir/<id>.png`` (4200 registered pairs, 768x1024) and
``Annotation/<id>.xml`` (VOC; People, Car, Bus, Motorcycle, Lamp, Truck). There is no official
train/test split, so a seeded random split is written and its seed recorded in the split files'
first line (a comment). A split that comes out empty (few images) is not written, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fusionzoo.data.benchmarks import M3FD
from fusionzoo.data.preparing import link_or_copy, read_voc_xml, write_boxes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the extracted M3FD_Detection folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    class_map = {name: i for i, name in enumerate(M3FD.classes)}
    ids = sorted(p.stem for p in (args.source / "Vis").glob("*.png"))
    if not ids:
        raise SystemExit(f"{args.source / 'Vis'}: no .png files")
    for sid in ids:
        link_or_copy(args.source / "Vis" / f"{sid}.png", args.out / "rgb" / f"{sid}.png")
        link_or_copy(args.source / "Ir" / f"{sid}.png", args.out / "thermal" / f"{sid}.png")
        boxes, labels, skipped = read_voc_xml(args.source / "Annotation" / f"{sid}.xml", class_map)
        if skipped:
            raise SystemExit(f"{args.source / 'Annotation' / sid}.xml: unknown classes {skipped}")
        write_boxes(args.out / "boxes" / f"{sid}.txt", boxes, labels)
    order = np.random.default_rng(args.seed).permutation(len(ids))
    n_test = round(args.test_fraction * len(ids))
    splits = {"test": sorted(ids[i] for i in order[:n_test]), "train": sorted(ids[i] for i in order[n_test:])}
    (args.out / "splits").mkdir(parents=True, exist_ok=True)
    for split, lst in splits.items():
        if not lst:
            print(f"warning: split {split!r} is empty ({len(ids)} images, --test-fraction {args.test_fraction}); "
                  f"{args.out / 'splits' / split}.txt not written; give more images or another --test-fraction",
                  file=sys.stderr)
            continue
        header = f"# fusionzoo seeded split: seed={args.seed} test_fraction={args.test_fraction}\n"
        (args.out / "splits" / f"{split}.txt").write_text(header + "\n".join(lst) + "\n")
        print(f"{split}: {len(lst)} ids")


if __name__ == "__main__":
    main()
