"""SUN RGB-D -> fusionzoo prepared layout (37 classes, 5285 train / 5050 test).

    python datasets/sunrgbd/prepare.py --source <dir with SUNRGBD/ and SUNRGBDtoolbox/> --out data/sunrgbd
    python datasets/sunrgbd/prepare.py --download --source ~/sunrgbd_raw --out data/sunrgbd

Needs h5py (SUNRGBD2Dseg.mat is MATLAB v7.3) and scipy (SUNRGBDMeta.mat, allsplit.mat).
Depth: the toolbox stores depth PNGs with the 16-bit value rotated right by 3 bits; we undo it
(read3dPoints.m: bitor(bitshift(d, -3), bitshift(d, 16 - 3))) and write plain millimetres.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from fusionzoo.data.benchmarks import SUNRGBD
from fusionzoo.data.preparing import download, require, save_depth_mm, save_label, save_rgb, write_split

URLS = {
    "SUNRGBD.zip": "http://rgbd.cs.princeton.edu/data/SUNRGBD.zip",
    "SUNRGBDtoolbox.zip": "http://rgbd.cs.princeton.edu/data/SUNRGBDtoolbox.zip",
}


def decode_depth(raw: np.ndarray) -> np.ndarray:
    """Toolbox depth PNG (uint16, bits rotated) -> metres."""
    raw = raw.astype(np.uint16)
    mm = (raw >> 3) | (raw << 13)
    return mm.astype(np.float32) / 1000.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="folder holding SUNRGBD/ and SUNRGBDtoolbox/")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--download", action="store_true", help="fetch and unzip the official archives into --source"
    )
    args = ap.parse_args()

    if args.download:
        for name, url in URLS.items():
            z = download(url, args.source / name)
            if not (args.source / name.replace(".zip", "")).is_dir():
                with zipfile.ZipFile(z) as zf:
                    zf.extractall(args.source)
    h5py = require("h5py", "h5py", "reading SUNRGBD2Dseg.mat")
    scipy_io = require("scipy.io", "scipy", "reading SUNRGBDMeta.mat")
    tb = args.source / "SUNRGBDtoolbox"
    meta = scipy_io.loadmat(tb / "Metadata" / "SUNRGBDMeta.mat", squeeze_me=True, struct_as_record=False)[
        "SUNRGBDMeta"
    ]
    train_dirs = {
        str(p).rstrip("/")
        for p in scipy_io.loadmat(tb / "traintestSUNRGBD" / "allsplit.mat", squeeze_me=True)["alltrain"]
    }
    seg = h5py.File(tb / "Metadata" / "SUNRGBD2Dseg.mat", "r")
    seglabel = seg["SUNRGBD2Dseg"]["seglabel"]
    lut = np.full(256, 255, np.uint8)
    lut[1:38] = np.arange(37)  # 0 = void -> 255, 1..37 -> 0..36
    ids = {"train": [], "test": []}
    for i, m in enumerate(meta):
        # rgbpath looks like /n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/NYU0001/image/NYU0001.jpg
        scene = m.rgbpath.split("/SUNRGBD/", 1)[1].rsplit("/image/", 1)[0]
        local = args.source / "SUNRGBD" / scene
        sid = f"{i + 1:05d}"
        rgb = np.asarray(Image.open(local / "image" / m.rgbname).convert("RGB"))
        depth = decode_depth(np.asarray(Image.open(local / "depth_bfx" / m.depthname)))
        label = lut[np.asarray(seg[seglabel[i][0]]).T.astype(np.uint8)]
        save_rgb(args.out / "rgb" / f"{sid}.png", rgb)
        save_depth_mm(args.out / "depth" / f"{sid}.png", depth)
        save_label(args.out / "label" / f"{sid}.png", label, SUNRGBD.palette)
        full = m.rgbpath.rsplit("/image/", 1)[0]
        ids["train" if full in train_dirs else "test"].append(sid)
        if (i + 1) % 500 == 0:
            print(f"{i + 1}/{len(meta)}")
    for split, lst in ids.items():
        write_split(args.out, split, lst)
    if (len(ids["train"]), len(ids["test"])) != (5285, 5050):
        print(
            f"warning: split sizes {len(ids['train'])}/{len(ids['test'])} differ from the official 5285/5050"
        )


if __name__ == "__main__":
    main()
