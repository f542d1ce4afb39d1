"""Tiny prepared-layout datasets written on the fly, for tests and benchmarks (no download).

``write_fixture(root, "nyuv2", num_samples=4)`` writes a folder that the registered reader
accepts as if ``datasets/nyuv2/prepare.py`` had produced it: synthetic scenes saved in the
file formats of the prepared layout (8-bit PNG/JPEG colour, 16-bit millimetre depth PNG,
8-bit thermal, index-PNG labels, box text files). Labels are spread over the dataset's class
range so the range checks are exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ._registry import dataset_entry
from .synthetic import SyntheticConfig, SyntheticGenerator

__all__ = ["write_fixture"]


def write_fixture(
    root: str | Path,
    name: str,
    num_samples: int = 4,
    image_size: tuple[int, int] = (48, 64),
    splits: tuple[str, ...] | None = None,
    seed: int = 0,
    rgb_ext: str = ".png",
) -> Path:
    """Write a tiny prepared layout of dataset ``name`` under ``root``.

    Args:
        root: Output folder (created).
        name: Registered benchmark name (``"nyuv2"``, ``"mfnet"``, ``"llvip"``, ...).
        num_samples: Samples per split.
        image_size: ``(H, W)``.
        splits: Split files to write; default: the entry's splits.
        seed: Content seed.
        rgb_ext: ``".png"`` or ``".jpg"`` for colour/thermal files.

    Returns:
        ``root`` as a Path.
    """
    entry = dataset_entry(name)
    if not entry.needs_root:
        raise ValueError(f"{name!r} is generated; write_fixture is for prepared-layout datasets")
    root = Path(root)
    second = "thermal" if "thermal" in entry.modalities else "depth"
    gen = SyntheticGenerator(SyntheticConfig(image_size=tuple(image_size), second=second), seed)
    folders = list(entry.modalities) + (["boxes"] if "detection" in entry.task else ["label"])
    for folder in ["splits", *folders]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    splits = tuple(splits) if splits is not None else entry.splits
    k = entry.num_classes
    lut = (np.arange(256) * max(1, k // 5)) % k  # spread the 5 synthetic classes over 0..k-1
    for split in splits:
        ids = [f"{split}_{i:04d}" for i in range(num_samples)]
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, sid in enumerate(ids):
            s = gen(i, split)
            Image.fromarray((s["rgb"] * 255).round().astype(np.uint8)).save(root / "rgb" / f"{sid}{rgb_ext}")
            if second == "depth":
                Image.fromarray((s["depth"] * 1000).round().astype(np.uint16)).save(
                    root / "depth" / f"{sid}.png"
                )
            else:
                t8 = (s["thermal"] * 255).round().astype(np.uint8)
                Image.fromarray(t8).save(root / "thermal" / f"{sid}{rgb_ext}")
            if "detection" in entry.task:
                lines = [
                    f"{int(lab) % k} {b[0]:.1f} {b[1]:.1f} {b[2]:.1f} {b[3]:.1f}"
                    for b, lab in zip(s["boxes"], s["labels"])
                ]
                (root / "boxes" / f"{sid}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
            else:
                label = lut[s["mask"]].astype(np.uint8)
                label[:2, :2] = 255  # a few ignore pixels, as real labels have
                Image.fromarray(label).save(root / "label" / f"{sid}.png")
    return root
