"""LLVIP -> fusionzoo prepared detection layout.

    python datasets/llvip/prepare.py --source <LLVIP> --out data/llvip

The release holds ``visible/{train,test}/<id>.jpg``, ``infrared/{train,test}/<id>.jpg`` (1024x1280,
registered) and ``Annotations/<id>.xml`` (Pascal VOC, class "person"). Boxes are written as
``<class> x1 y1 x2 y2`` pixel lines; images are hard-linked (or copied) unchanged.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fusionzoo.data.benchmarks import LLVIP
from fusionzoo.data.preparing import link_or_copy, read_voc_xml, write_boxes, write_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the extracted LLVIP folder")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    class_map = {name: i for i, name in enumerate(LLVIP.classes)}
    for split in ("train", "test"):
        names = sorted(p.stem for p in (args.source / "visible" / split).glob("*.jpg"))
        if not names:
            raise SystemExit(f"{args.source / 'visible' / split}: no .jpg files")
        for name in names:
            link_or_copy(args.source / "visible" / split / f"{name}.jpg", args.out / "rgb" / f"{name}.jpg")
            link_or_copy(
                args.source / "infrared" / split / f"{name}.jpg", args.out / "thermal" / f"{name}.jpg"
            )
            boxes, labels, _ = read_voc_xml(args.source / "Annotations" / f"{name}.xml", class_map)
            write_boxes(args.out / "boxes" / f"{name}.txt", boxes, labels)
        write_split(args.out, split, names)


if __name__ == "__main__":
    main()
