"""FLIR ADAS aligned subset -> fusionzoo prepared detection layout.

    python datasets/flir_aligned/prepare.py --source <FLIR_aligned> --out data/flir_aligned

The aligned subset (Zhang et al., ICIP 2020) keeps the FLIR ADAS v1 frames whose RGB and thermal
views could be registered, resized to 512x640. Its release holds
``JPEGImages/<frame>_RGB.jpg``, ``JPEGImages/<frame>_PreviewData.jpeg`` (thermal),
``Annotations/<frame>_PreviewData.xml`` (VOC) and the lists ``align_train.txt`` /
``align_validation.txt``. The file patterns are options in case a copy renames them. Classes
other than person / bicycle / car (e.g. dog) are dropped and counted.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from fusionzoo.data.benchmarks import FLIRAligned
from fusionzoo.data.preparing import link_or_copy, read_voc_xml, write_boxes, write_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rgb", default="JPEGImages/{id}_RGB.jpg")
    ap.add_argument("--thermal", default="JPEGImages/{id}_PreviewData.jpeg")
    ap.add_argument("--xml", default="Annotations/{id}_PreviewData.xml")
    ap.add_argument("--train-list", default="align_train.txt")
    ap.add_argument("--test-list", default="align_validation.txt")
    args = ap.parse_args()
    class_map = {name: i for i, name in enumerate(FLIRAligned.classes)}
    dropped: Counter[str] = Counter()
    for split, listname in (("train", args.train_list), ("test", args.test_list)):
        lines = (args.source / listname).read_text().split()
        ids = sorted(
            {
                line.rsplit("/", 1)[-1].split(".")[0].removesuffix("_PreviewData").removesuffix("_RGB")
                for line in lines
            }
        )
        for sid in ids:
            rgb_ext = Path(args.rgb).suffix
            th_ext = Path(args.thermal).suffix
            link_or_copy(args.source / args.rgb.format(id=sid), args.out / "rgb" / f"{sid}{rgb_ext}")
            link_or_copy(args.source / args.thermal.format(id=sid), args.out / "thermal" / f"{sid}{th_ext}")
            boxes, labels, skipped = read_voc_xml(args.source / args.xml.format(id=sid), class_map)
            dropped.update(skipped)
            write_boxes(args.out / "boxes" / f"{sid}.txt", boxes, labels)
        write_split(args.out, split, ids)
    if dropped:
        print(f"dropped objects of other classes: {dict(dropped)}")


if __name__ == "__main__":
    main()
