"""NYUDv2 (labeled subset) -> fusionzoo prepared layout.

    python datasets/nyuv2/prepare.py --out data/nyuv2 [--download] [--hha]
        [--mat nyu_depth_v2_labeled.mat --splits splits.mat --mapping classMapping40.mat]

Reads the official MATLAB v7.3 file with h5py (pip install h5py) and the two small .mat
files with scipy. Writes rgb/, depth/ (uint16 mm, the toolbox's in-painted depth; --raw-depth
writes the raw Kinect depth with holes instead), label/ (40 classes, 0-39, 255 = void),
optionally hha/ (our HHA code, fusionzoo.data.hha), and splits/{train,test}.txt (795 / 654).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fusionzoo.data.benchmarks import NYUv2
from fusionzoo.data.hha import NYU_INTRINSICS, compute_hha
from fusionzoo.data.preparing import download, require, save_depth_mm, save_label, save_rgb, write_split

URLS = {
    "mat": "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat",
    "splits": "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat",
    # 894 -> 40 class mapping of Gupta et al. (CVPR 2013), as redistributed with their code.
    "mapping": "https://github.com/ankurhanda/nyuv2-meta-data/raw/master/classMapping40.mat",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (prepared layout)")
    ap.add_argument("--mat", type=Path, help="nyu_depth_v2_labeled.mat (2.8 GB)")
    ap.add_argument("--splits", type=Path, help="splits.mat (trainNdxs / testNdxs, 1-based)")
    ap.add_argument("--mapping", type=Path, help="classMapping40.mat (mapClass: 894 -> 40)")
    ap.add_argument("--download", action="store_true", help="fetch missing files from the official URLs")
    ap.add_argument("--hha", action="store_true", help="also write hha/ (slow: about 1 s per frame)")
    ap.add_argument("--raw-depth", action="store_true", help="write rawDepths (holes = 0) instead of depths")
    args = ap.parse_args()

    cache = args.out / "_download"
    paths = {}
    for key in ("mat", "splits", "mapping"):
        given = getattr(args, key)
        if given is not None:
            paths[key] = given
        elif args.download:
            paths[key] = download(URLS[key], cache / Path(URLS[key]).name)
        else:
            raise SystemExit(f"--{key} is required (or pass --download to fetch {URLS[key]})")

    h5py = require("h5py", "h5py", "reading the NYUDv2 MATLAB v7.3 file")
    scipy_io = require("scipy.io", "scipy", "reading splits.mat / classMapping40.mat")
    splits = scipy_io.loadmat(paths["splits"])
    mapping = (
        scipy_io.loadmat(paths["mapping"])["mapClass"].reshape(-1).astype(np.int64)
    )  # 894 entries, 1..40
    # 0 (unlabeled) -> 255; class c (1..894) -> mapClass[c-1] - 1 in 0..39
    lut = np.full(max(895, mapping.size + 1), 255, np.uint8)
    lut[1 : mapping.size + 1] = np.where(mapping > 0, mapping - 1, 255)

    with h5py.File(paths["mat"], "r") as f:
        # MATLAB stores column-major: images are (N, 3, W, H), depths/labels (N, W, H).
        images, labels = f["images"], f["labels"]
        depths = f["rawDepths"] if args.raw_depth else f["depths"]
        n = images.shape[0]
        for i in range(n):
            sid = f"{i + 1:04d}"  # 1-based like splits.mat
            rgb = np.asarray(images[i]).transpose(2, 1, 0)
            depth = np.asarray(depths[i]).T
            label = lut[np.asarray(labels[i]).T.astype(np.int64)]
            save_rgb(args.out / "rgb" / f"{sid}.png", rgb)
            save_depth_mm(args.out / "depth" / f"{sid}.png", depth)
            save_label(args.out / "label" / f"{sid}.png", label, NYUv2.palette)
            if args.hha:
                save_rgb(args.out / "hha" / f"{sid}.png", compute_hha(depth, NYU_INTRINSICS))
            if (i + 1) % 100 == 0:
                print(f"{i + 1}/{n}")
    write_split(args.out, "train", (f"{int(k):04d}" for k in splits["trainNdxs"].reshape(-1)))
    write_split(args.out, "test", (f"{int(k):04d}" for k in splits["testNdxs"].reshape(-1)))


if __name__ == "__main__":
    main()
