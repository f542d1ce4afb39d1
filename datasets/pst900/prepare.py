"""PST900 RGB-T -> fusionzoo prepared layout.

    python datasets/pst900/prepare.py --source <PST900_RGBT_Dataset> --out data/pst900

The release holds ``train/`` and ``test/`` folders, each with ``rgb/``, ``thermal/``,
``depth/`` and ``labels/`` PNGs sharing a file name (labels: class index 0..4). Ids are
prefixed with the split (``train_<name>``) so the two folders cannot collide. A partial
download (only ``test/``, say) prepares the splits that are present and warns about the others.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fusionzoo.data.benchmarks import PST900
from fusionzoo.data.preparing import link_or_copy, save_label, save_thermal, write_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the extracted PST900_RGBT_Dataset folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    present = [split for split in ("train", "test") if (args.source / split).is_dir()]
    if not present:
        raise SystemExit(f"{args.source}: neither train/ nor test/; is --source the PST900_RGBT_Dataset folder?")
    for split in ("train", "test"):
        if split not in present:
            print(f"warning: {args.source / split} is absent (partial download?); split {split!r} not written",
                  file=sys.stderr)
    for split in present:
        folder = args.source / split
        names = sorted(p.stem for p in (folder / "rgb").glob("*.png"))
        if not names:
            raise SystemExit(f"{folder / 'rgb'}: no PNG files; is --source the PST900_RGBT_Dataset folder?")
        ids = []
        for name in names:
            sid = f"{split}_{name}"
            link_or_copy(folder / "rgb" / f"{name}.png", args.out / "rgb" / f"{sid}.png")
            thermal = np.asarray(Image.open(folder / "thermal" / f"{name}.png"))
            save_thermal(args.out / "thermal" / f"{sid}.png", thermal)
            label = np.asarray(Image.open(folder / "labels" / f"{name}.png"))
            if label.ndim != 2 or label.max() >= 5:
                raise SystemExit(
                    f"{folder / 'labels' / name}.png: expected indices 0..4, got shape "
                    f"{label.shape} max {label.max()}"
                )
            save_label(args.out / "label" / f"{sid}.png", label.astype(np.uint8), PST900.palette)
            ids.append(sid)
        write_split(args.out, split, ids)


if __name__ == "__main__":
    main()
