"""MFNet RGB-T segmentation -> fusionzoo prepared layout.

    python datasets/mfnet/prepare.py --source <ir_seg_dataset> --out data/mfnet

The official release (``ir_seg_dataset``) holds ``images/<id>.png`` as 4-channel PNGs (R, G, B,
thermal), ``labels/<id>.png`` (class index 0..8) and split lists ``train.txt``, ``val.txt``,
``test.txt`` (and in some copies ``test_day.txt`` / ``test_night.txt``). Ids end in ``D`` (day)
or ``N`` (night); the day/night test splits are derived from that suffix when their files are
missing. Colour and thermal are written to separate folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from fusionzoo.data.benchmarks import MFNet
from fusionzoo.data.preparing import save_label, save_rgb, save_thermal, write_split


def read_list(path: Path) -> list[str]:
    return [line.strip().removesuffix(".png") for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the extracted ir_seg_dataset folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    src = args.source
    splits = {
        s: read_list(src / f"{s}.txt") for s in ("train", "val", "test") if (src / f"{s}.txt").is_file()
    }
    if "train" not in splits or "test" not in splits:
        raise SystemExit(f"{src}: expected train.txt and test.txt (the official MFNet split lists)")
    for part, suffix in (("test_day", "D"), ("test_night", "N")):
        f = src / f"{part}.txt"
        splits[part] = read_list(f) if f.is_file() else [i for i in splits["test"] if i.endswith(suffix)]
    all_ids = sorted({i for ids in splits.values() for i in ids})
    for n, sid in enumerate(all_ids):
        four = np.asarray(Image.open(src / "images" / f"{sid}.png"))
        if four.ndim != 3 or four.shape[2] != 4:
            raise SystemExit(
                f"{src / 'images' / sid}.png: expected a 4-channel RGB+thermal PNG, got {four.shape}"
            )
        save_rgb(args.out / "rgb" / f"{sid}.png", four[..., :3])
        save_thermal(args.out / "thermal" / f"{sid}.png", four[..., 3])
        label = np.asarray(Image.open(src / "labels" / f"{sid}.png"))
        if label.max() >= 9:
            raise SystemExit(f"{src / 'labels' / sid}.png: label {label.max()} outside 0..8")
        save_label(args.out / "label" / f"{sid}.png", label.astype(np.uint8), MFNet.palette)
        if (n + 1) % 200 == 0:
            print(f"{n + 1}/{len(all_ids)}")
    for split, ids in splits.items():
        write_split(args.out, split, ids)


if __name__ == "__main__":
    main()
