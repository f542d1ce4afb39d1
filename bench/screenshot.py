#!/usr/bin/env python
"""Screenshot report pages in headless Chromium, so layout breakage is seen.

    python bench/screenshot.py runs/families/esanet_resnet18/report/report.html runs/families/compare/report.html
    python bench/screenshot.py PAGE.html --out shots/ --size 1280,2400

Needs Debian's ``chromium`` package (``apt-get install -y chromium``) or ``--browser PATH``. Each
page is rendered with ``--headless --no-sandbox --disable-gpu`` (no network: the pages are
self-contained, images embedded) into ``<out>/<parent folder>_<page>.png``; the script prints
the PNG paths and fails (exit 1) when Chromium writes no image. Look at the PNGs: the first
screen must show the findings.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--hide-scrollbars"]


def screenshot(page: Path, png: Path, size: tuple[int, int], browser: str) -> Path:
    """Render ``page`` into ``png`` at ``size`` = (width, height) pixels; returns ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    cmd = [browser, *FLAGS, f"--screenshot={png}", f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {page} (exit {proc.returncode}): {proc.stderr[-800:]}")
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pages", nargs="+", type=Path, help="report.html files")
    p.add_argument("--out", type=Path, default=Path("runs/screenshots"))
    p.add_argument("--size", default="1280,1600", help="window width,height in pixels")
    p.add_argument("--browser", default=None, help="chromium executable (default: chromium on PATH)")
    args = p.parse_args()
    browser = args.browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("screenshot.py: chromium not found; apt-get install -y chromium, or pass --browser", file=sys.stderr)
        sys.exit(2)
    missing = [str(x) for x in args.pages if not x.is_file()]
    if missing:
        print(f"screenshot.py: no such page(s): {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    w, h = (int(v) for v in args.size.split(","))
    for page in args.pages:
        png = screenshot(page, args.out / f"{page.parent.name}_{page.stem}.png", (w, h), browser)
        print(png)


if __name__ == "__main__":
    main()
