"""KAIST multispectral pedestrian -> fusionzoo prepared detection layout.

    python datasets/kaist/prepare.py --source <kaist-rgbt> --out data/kaist \
        [--annotations <dir>] [--train-list imageSets/train-all-02.txt] [--test-list imageSets/test-all-20.txt]

Source layout: ``images/setXX/VYYY/{visible,lwir}/IZZZZZ.jpg`` and per-frame annotations
``annotations/setXX/VYYY/IZZZZZ.txt`` in Piotr Dollar's bbGt format (a ``% bbGt`` header line,
then ``label x y w h occ ...`` per object). ``--annotations`` can point to an improved
annotation set with the same structure (e.g. the sanitized training labels or the improved test
labels commonly used since 2018). Only ``person`` is kept; ``people``, ``cyclist`` and
``person?`` are dropped (counted), the usual protocol of the "reasonable" benchmark.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from fusionzoo.data.preparing import link_or_copy, read_voc_xml, write_boxes, write_split


def read_bbgt(path: Path, dropped: Counter) -> tuple[np.ndarray, np.ndarray]:
    boxes = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("%"):
            continue
        parts = line.split()
        if parts[0] != "person":
            dropped[parts[0]] += 1
            continue
        x, y, w, h = (float(v) for v in parts[1:5])
        if w > 0 and h > 0:
            boxes.append([x, y, x + w, y + h])  # bbGt is x, y, width, height
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.zeros(len(boxes), np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--annotations", type=Path, help="annotation root (default: <source>/annotations)")
    ap.add_argument("--train-list", default="imageSets/train-all-02.txt")
    ap.add_argument("--test-list", default="imageSets/test-all-20.txt")
    args = ap.parse_args()
    ann_root = args.annotations or args.source / "annotations"
    dropped: Counter[str] = Counter()
    for split, listname in (("train", args.train_list), ("test", args.test_list)):
        entries = [e.strip() for e in (args.source / listname).read_text().splitlines() if e.strip()]
        ids = []
        for entry in entries:  # "set00/V000/I01216"
            s, v, frame = entry.split("/")
            sid = f"{s}_{v}_{frame}"
            base = args.source / "images" / s / v
            link_or_copy(base / "visible" / f"{frame}.jpg", args.out / "rgb" / f"{sid}.jpg")
            link_or_copy(base / "lwir" / f"{frame}.jpg", args.out / "thermal" / f"{sid}.jpg")
            txt = ann_root / s / v / f"{frame}.txt"
            if txt.is_file():
                boxes, labels = read_bbgt(txt, dropped)
            else:
                boxes, labels, skipped = read_voc_xml(ann_root / s / v / f"{frame}.xml", {"person": 0})
                dropped.update(skipped)
            write_boxes(args.out / "boxes" / f"{sid}.txt", boxes, labels)
            ids.append(sid)
        write_split(args.out, split, ids)
    print(f"dropped non-person objects: {dict(dropped)}")


if __name__ == "__main__":
    main()
