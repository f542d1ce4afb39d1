"""KAIST multispectral pedestrian -> fusionzoo prepared detection layout.

    python datasets/kaist/prepare.py --source <kaist-rgbt> --out data/kaist \
        [--annotations <dir>] [--train-list imageSets/train-all-02.txt] [--test-list imageSets/test-all-20.txt]

Source layout: ``images/setXX/VYYY/{visible,lwir}/IZZZZZ.jpg`` and per-frame annotations
``annotations/setXX/VYYY/IZZZZZ.txt`` in Piotr Dollar's bbGt format (a ``% bbGt`` header line,
then ``label x y w h occ ...`` per object). ``--annotations`` can point to an improved
annotation set with the same structure (e.g. the sanitized training labels or the improved test
labels commonly used since 2018). Images may be ``.jpg`` (the official release) or ``.png``.

Every object is kept, as the KAIST protocol needs (docs/detection.md): ``person`` boxes are
class 0; ``people``, ``cyclist`` and ``person?`` boxes, and boxes whose bbGt ``ign`` field is 1,
are written as ignore regions (``ignore`` = 1); the bbGt occlusion level (0 none, 1 partial,
2 heavy) is kept, and no box is filtered by height here (the "reasonable" subset is applied by
the metric). Box lines: ``0 <x1> <y1> <x2> <y2> <ignore> <occlusion>``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from fusionzoo.data.preparing import link_or_copy, read_voc_xml, write_boxes, write_split

IGNORE_LABELS = ("people", "cyclist", "person?")  # KAIST labels kept as ignore regions
IMAGE_EXTENSIONS = (".jpg", ".png")


def read_bbgt(path: Path, counts: Counter) -> tuple[np.ndarray, ...]:
    """Parse one bbGt file (``label x y w h occ xv yv wv hv ign ang`` per object).

    Returns:
        ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 (0), ``ignore`` int64 (0/1) and
        ``occlusion`` int64 (0/1/2; -1 when the line stops before the field).
    """
    boxes, ignore, occlusion = [], [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("%"):
            continue
        parts = line.split()
        if parts[0] != "person" and parts[0] not in IGNORE_LABELS:
            raise SystemExit(f"{path}:{lineno}: unknown KAIST label {parts[0]!r}; expected person or {IGNORE_LABELS}")
        counts[parts[0]] += 1
        try:
            x, y, w, h = (float(v) for v in parts[1:5])
            occ = int(float(parts[5])) if len(parts) > 5 else -1
            ign = int(float(parts[10])) if len(parts) > 10 else 0
        except (ValueError, IndexError) as err:
            raise SystemExit(f"{path}:{lineno}: expected 'label x y w h occ ...' (bbGt): {line!r}") from err
        if w > 0 and h > 0:
            boxes.append([x, y, x + w, y + h])  # bbGt is x, y, width, height
            ignore.append(int(parts[0] != "person" or ign == 1))
            occlusion.append(occ)
    n = len(boxes)
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.zeros(n, np.int64), np.asarray(ignore, np.int64),
            np.asarray(occlusion, np.int64))


def read_xml(path: Path, counts: Counter) -> tuple[np.ndarray, ...]:
    """VOC-style annotation: ``person`` boxes, and the other KAIST labels as ignore regions."""
    boxes, _, skipped = read_voc_xml(path, {"person": 0})
    regions, _, unknown = read_voc_xml(path, dict.fromkeys(IGNORE_LABELS, 0))
    counts["person"] += len(boxes)
    counts.update(name for name in skipped if name in IGNORE_LABELS)
    unknown = [name for name in unknown if name != "person" and not name.endswith("(degenerate)")]
    if unknown:
        raise SystemExit(f"{path}: unknown KAIST labels {unknown}; expected person or {IGNORE_LABELS}")
    n, m = len(boxes), len(regions)
    return (np.concatenate([boxes, regions]), np.zeros(n + m, np.int64),
            np.concatenate([np.zeros(n, np.int64), np.ones(m, np.int64)]), np.full(n + m, -1, np.int64))


def find_image(folder: Path, frame: str) -> Path:
    """``folder/<frame>.jpg`` or ``.png``."""
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{frame}{ext}").is_file():
            return folder / f"{frame}{ext}"
    raise SystemExit(f"{folder / frame}.*: no image (tried {', '.join(IMAGE_EXTENSIONS)}); is --source the KAIST root?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--annotations", type=Path, help="annotation root (default: <source>/annotations)")
    ap.add_argument("--train-list", default="imageSets/train-all-02.txt")
    ap.add_argument("--test-list", default="imageSets/test-all-20.txt")
    args = ap.parse_args()
    ann_root = args.annotations or args.source / "annotations"
    counts: Counter[str] = Counter()
    for split, listname in (("train", args.train_list), ("test", args.test_list)):
        entries = [e.strip() for e in (args.source / listname).read_text().splitlines() if e.strip()]
        ids = []
        for entry in entries:  # "set00/V000/I01216"
            s, v, frame = entry.split("/")
            sid = f"{s}_{v}_{frame}"
            base = args.source / "images" / s / v
            for folder, out in (("visible", "rgb"), ("lwir", "thermal")):
                image = find_image(base / folder, frame)
                link_or_copy(image, args.out / out / f"{sid}{image.suffix}")
            txt = ann_root / s / v / f"{frame}.txt"
            if txt.is_file():
                boxes, labels, ignore, occlusion = read_bbgt(txt, counts)
            else:
                boxes, labels, ignore, occlusion = read_xml(ann_root / s / v / f"{frame}.xml", counts)
            write_boxes(args.out / "boxes" / f"{sid}.txt", boxes, labels, ignore, occlusion)
            ids.append(sid)
        write_split(args.out, split, ids)
    print(f"objects: {dict(counts)} (all but person written as ignore regions)")


if __name__ == "__main__":
    main()
