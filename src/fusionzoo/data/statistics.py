"""Label statistics of a segmentation dataset: per-class pixel counts for class weighting.

:func:`class_pixel_counts` reads every label of a split once (no augmentation: the labels as
stored, at their native size, as ESANet's ``compute_class_weights`` reads them) and caches the
counts in a JSON file, so a resumed run does not read the split again.
``fusionzoo.losses.median_frequency_weights`` turns the counts into class weights.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import SegmentationDataset
from .io import read_label

__all__ = ["ClassPixelCounts", "class_pixel_counts"]


@dataclass(frozen=True)
class ClassPixelCounts:
    """Per-class pixel statistics of one dataset split.

    Attributes:
        class_pixels: ``(K,)`` pixels labelled with each class.
        image_pixels: ``(K,)`` summed ``H * W`` (ignored pixels included) of the images in which
            each class occurs: the denominator of Eigen & Fergus's class frequency.
        num_images: images counted.
    """

    class_pixels: tuple[int, ...]
    image_pixels: tuple[int, ...]
    num_images: int

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "class_pixels": list(self.class_pixels),
                "image_pixels": list(self.image_pixels)}


def _label(dataset: Any, index: int) -> np.ndarray:
    """The stored label of sample ``index``: only the label file for prepared layouts, else ``raw()``."""
    if isinstance(dataset, SegmentationDataset):
        return read_label(dataset.path("label", dataset.ids[index]), dataset.num_classes)
    if hasattr(dataset, "raw"):
        return np.asarray(dataset.raw(index)["mask"])
    return np.asarray(dataset[index]["mask"])


def _read_cache(path: Path, num_classes: int, num_images: int) -> ClassPixelCounts | None:
    try:
        data = json.loads(path.read_text())
        counts = ClassPixelCounts(tuple(int(v) for v in data["class_pixels"]),
                                  tuple(int(v) for v in data["image_pixels"]), int(data["num_images"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"{path}: unreadable class pixel counts ({type(err).__name__}: {err}); counting again", file=sys.stderr)
        return None
    if len(counts.class_pixels) != num_classes or counts.num_images != num_images:
        print(f"{path}: cached counts are for {len(counts.class_pixels)} classes over {counts.num_images} images, "
              f"this split has {num_classes} classes and {num_images} images; counting again", file=sys.stderr)
        return None
    return counts


def class_pixel_counts(
    dataset: Any,
    num_classes: int,
    *,
    ignore_index: int = 255,
    cache: str | Path | None = None,
    progress: bool = True,
) -> ClassPixelCounts:
    """Count class pixels over every label of ``dataset`` once, cached in ``cache``.

    Args:
        dataset: a segmentation dataset (a prepared :class:`~fusionzoo.data.SegmentationDataset`,
            whose label files alone are read, or any dataset with ``raw(i)["mask"]`` or
            ``[i]["mask"]``).
        num_classes: ``K``; label values ``>= K`` other than ``ignore_index`` are an error.
        ignore_index: the unlabelled value (not a class; its pixels still count in ``H * W``).
        cache: a JSON file: read when it holds counts for ``K`` classes over ``len(dataset)``
            images, else written after counting.
        progress: print a line when counting starts and every ~10% of the split (stderr).

    Returns:
        :class:`ClassPixelCounts`.

    Raises:
        ValueError: a label value outside ``0..K-1`` and ``ignore_index``, naming the sample.
    """
    n = len(dataset)
    cache = Path(cache) if cache is not None else None
    if cache is not None and cache.is_file():
        counts = _read_cache(cache, num_classes, n)
        if counts is not None:
            return counts
    if progress:
        where = f", cached in {cache}" if cache is not None else ""
        print(f"counting class pixels over the {n} training labels (once{where})", file=sys.stderr, flush=True)
    class_pixels = np.zeros(num_classes, dtype=np.int64)
    image_pixels = np.zeros(num_classes, dtype=np.int64)
    t0 = time.perf_counter()
    step = max(1, n // 10)
    for i in range(n):
        label = _label(dataset, i)
        valid = label[label != ignore_index].astype(np.int64)
        if valid.size and (valid.min() < 0 or valid.max() >= num_classes):
            raise ValueError(f"{dataset!r} sample {i}: label values {sorted(set(np.unique(valid).tolist()))} "
                             f"outside 0..{num_classes - 1} and ignore {ignore_index}")
        here = np.bincount(valid, minlength=num_classes)
        class_pixels += here
        image_pixels += (here > 0) * label.size  # H * W of every image the class occurs in
        if progress and ((i + 1) % step == 0 or i + 1 == n):
            print(f"  {i + 1}/{n} labels, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    counts = ClassPixelCounts(tuple(class_pixels.tolist()), tuple(image_pixels.tolist()), n)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps(counts.to_dict()) + "\n")
        tmp.replace(cache)  # atomic: a kill mid-write leaves no half file
    return counts
