"""Helpers shared by ``datasets/<name>/prepare.py`` (official download -> prepared layout).

The prepare scripts are run by hand, once; the package never calls them. Everything they
write follows the layout documented in :mod:`fusionzoo.data.base`.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import sha256_file

__all__ = [
    "download",
    "link_or_copy",
    "read_voc_xml",
    "require",
    "save_depth_mm",
    "save_label",
    "save_rgb",
    "save_thermal",
    "write_boxes",
    "write_split",
]


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or exit with the install command.

    Args:
        module: Module name (``"h5py"``).
        extra: pip package to install.
        purpose: What needs it (named in the message).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SystemExit(f"{purpose} needs the optional package {extra!r}: pip install {extra}") from err


def download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` (skipped when present) and verify ``sha256`` when given.

    Raises:
        SystemExit: Checksum mismatch (the partial/corrupt file is kept for inspection).
    """
    dest = Path(dest)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        print(f"downloading {url} -> {dest}", file=sys.stderr)
        with urllib.request.urlopen(url) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
        tmp.rename(dest)
    if sha256 is not None:
        got = sha256_file(dest)
        if got != sha256:
            raise SystemExit(f"{dest}: sha256 {got} != expected {sha256}; delete it and download again")
    return dest


def write_split(out: Path, split: str, ids: Iterable[str]) -> None:
    """Write ``<out>/splits/<split>.txt``."""
    ids = list(ids)
    if not ids:
        raise SystemExit(f"split {split!r} is empty; check the source folder")
    (out / "splits").mkdir(parents=True, exist_ok=True)
    (out / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    print(f"{split}: {len(ids)} ids", file=sys.stderr)


def _ensure(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_rgb(path: Path, rgb: np.ndarray) -> None:
    """Save uint8 ``(H, W, 3)`` colour (PNG: lossless)."""
    Image.fromarray(np.asarray(rgb, np.uint8)).save(_ensure(path))


def save_depth_mm(path: Path, metres: np.ndarray) -> None:
    """Save depth in metres as a uint16 millimetre PNG (0 = invalid; NaN/inf/<=0 -> 0;
    > 65.535 m clipped)."""
    d = np.asarray(metres, np.float64)
    d = np.where(np.isfinite(d) & (d > 0), d, 0.0)
    Image.fromarray(np.clip(np.round(d * 1000.0), 0, 65535).astype(np.uint16)).save(_ensure(path))


def save_thermal(path: Path, thermal: np.ndarray) -> None:
    """Save a single-channel thermal image (uint8 or uint16) as PNG."""
    t = np.asarray(thermal)
    if t.ndim == 3:
        t = t[..., 0]
    Image.fromarray(t).save(_ensure(path))


def save_label(path: Path, label: np.ndarray, palette: list[tuple[int, int, int]] | None = None) -> None:
    """Save a uint8 class-index label as PNG (a palette PNG when ``palette`` is given, so it
    also views in colour; indices are unchanged)."""
    img = Image.fromarray(np.asarray(label, np.uint8), mode="L")
    if palette is not None:
        img = img.convert("P")
        flat = [c for rgb in palette for c in rgb]
        img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(_ensure(path))


def write_boxes(
    path: Path,
    boxes: np.ndarray,
    labels: np.ndarray,
    ignore: np.ndarray | None = None,
    occlusion: np.ndarray | None = None,
) -> None:
    """Write ``<class> <x1> <y1> <x2> <y2>`` lines (pixels, xyxy), with ``<ignore> <occlusion>``
    appended when either is given (``fusionzoo.data.io.read_boxes`` reads both forms).

    Args:
        path: ``boxes/<id>.txt``.
        boxes: ``(N, 4)`` xyxy pixels.
        labels: ``(N,)`` class indices.
        ignore: ``(N,)`` 1 for ignore regions (default 0).
        occlusion: ``(N,)`` 0 none, 1 partial, 2 heavy, -1 unknown (default -1).
    """
    n = len(labels)
    flags = ignore is not None or occlusion is not None
    ign = np.zeros(n, np.int64) if ignore is None else np.asarray(ignore, np.int64)
    occ = np.full(n, -1, np.int64) if occlusion is None else np.asarray(occlusion, np.int64)
    lines = [
        f"{int(c)} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}" + (f" {int(i)} {int(o)}" if flags else "")
        for b, c, i, o in zip(np.asarray(boxes).reshape(-1, 4), labels, ign, occ)
    ]
    _ensure(path).write_text("\n".join(lines) + ("\n" if lines else ""))


def read_voc_xml(path: Path, class_map: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Parse a Pascal VOC annotation.

    Args:
        path: ``.xml`` file.
        class_map: Lower-cased object name -> class index; names not in it are skipped.

    Returns:
        ``boxes`` float32 ``(N, 4)`` xyxy as written in the file (the tools that wrote LLVIP,
        M3FD and FLIR-aligned do not agree on 0- vs 1-based corners, and a one-pixel
        convention shift is below annotation noise, so coordinates are not shifted),
        ``labels`` int64 ``(N,)``, and the skipped names.
    """
    root = ET.parse(path).getroot()
    boxes, labels, skipped = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip().lower()
        if name not in class_map:
            skipped.append(name)
            continue
        bb = obj.find("bndbox")
        if bb is None:
            raise SystemExit(f"{path}: object {name!r} has no bndbox")
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 <= x1 or y2 <= y1:
            skipped.append(f"{name}(degenerate)")
            continue
        boxes.append([x1, y1, x2, y2])
        labels.append(class_map[name])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), skipped


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (same file system) or copy it."""
    _ensure(dst)
    if dst.exists():
        dst.unlink()
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
