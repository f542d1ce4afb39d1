"""Readers over the *prepared* folder layout shared by every benchmark.

``datasets/<name>/prepare.py`` turns an official download into this layout::

    <root>/
      splits/<split>.txt        one sample id per line ("#" starts a comment)
      rgb/<id>.png|.jpg         uint8 colour
      depth/<id>.png            uint16 millimetres, 0 = invalid      (RGB-D sets)
      hha/<id>.png              uint8 HHA encoding (optional)        (RGB-D sets)
      thermal/<id>.png|.jpg     8- or 16-bit thermal                 (RGB-T sets)
      label/<id>.png            uint8 class index, 255 = ignore      (segmentation)
      boxes/<id>.txt            "<class> <x1> <y1> <x2> <y2> [<ignore> [<occlusion>]]" pixels  (detection)

A sample is read into numpy (see :mod:`fusionzoo.data.io`), checked (all modalities the same
size, labels in range) and passed through ``transforms`` (default: tensors without
normalization).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import Dataset

from .io import DataError, read_boxes, read_depth, read_label, read_rgb, read_thermal
from .transforms import to_tensor_sample

__all__ = ["DetectionDataset", "PreparedDataset", "SegmentationDataset", "read_ids", "read_split"]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".bmp")


def read_split(root: Path, split: str) -> list[str]:
    """Ids listed in ``<root>/splits/<split>.txt``.

    Raises:
        FileNotFoundError: Missing split file; the message lists the splits that exist.
        DataError: Empty split file or duplicated ids.
    """
    path = root / "splits" / f"{split}.txt"
    if not path.is_file():
        found = sorted(p.stem for p in (root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
        raise FileNotFoundError(
            f"{path}: split file not found (splits present: {found or 'none'}); "
            "run the dataset's prepare.py to create the prepared layout"
        )
    return read_ids(path)


def read_ids(path: Path) -> list[str]:
    """Sample ids of a split file: one per line, ``#`` starts a comment, blank lines skipped.

    Raises:
        DataError: No ids, or duplicated ids.
    """
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    if not ids:
        raise DataError(f"{path}: split file lists no ids")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"{path}: duplicated ids {dup}")
    return ids


class PreparedDataset(Dataset):
    """Common part of the benchmark readers (subclasses set the class attributes).

    Args:
        root: Folder with the prepared layout.
        split: Split name; ``<root>/splits/<split>.txt`` must exist.
        transforms: Callable on the raw numpy sample returning the tensor sample (e.g. a
            :class:`~fusionzoo.data.transforms.JointTransform`); ``None``: tensors without
            normalization.
        modalities: Subset/ordering of :attr:`available_modalities` to load.
        nonfinite: Policy for NaN/inf/negative depth and NaN/inf float thermal: ``"invalid"``
            sets them to 0 and warns once per folder with the count; ``"raise"`` raises.
        check_size: Raise when modality files of one sample differ in size.
        thermal_bits: Significant bits of integer thermal files (12 or 14 for radiometric
            cameras stored in 16-bit PNG/TIFF); ``None``: the file's own bit depth.

    Raises:
        FileNotFoundError: Missing root, split file or folder, or files missing for some ids
            (one error listing them; checked here, not when the sample is first read).
    """

    name: ClassVar[str] = ""
    classes: ClassVar[list[str]] = []
    palette: ClassVar[list[tuple[int, int, int]]] = []
    ignore_index: ClassVar[int] = 255
    default_modalities: ClassVar[tuple[str, ...]] = ("rgb",)
    available_modalities: ClassVar[tuple[str, ...]] = ("rgb",)
    depth_scale: ClassVar[float] = 1000.0  # depth PNG units per metre
    target_folder: ClassVar[str] = "label"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        modalities: Sequence[str] | None = None,
        nonfinite: str = "invalid",
        check_size: bool = True,
        thermal_bits: int | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.root}: dataset root not found; create it with `python datasets/{self.name}/prepare.py`"
            )
        self.split = split
        self.modalities = tuple(modalities) if modalities is not None else self.default_modalities
        bad = [m for m in self.modalities if m not in self.available_modalities]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: modalities {bad} not available; choose from {self.available_modalities}"
            )
        self.transforms = transforms
        if nonfinite not in ("invalid", "raise"):  # checked here, not at the first NaN mid-epoch
            raise ValueError(f"nonfinite must be 'invalid' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.check_size = check_size
        if thermal_bits is not None and not (isinstance(thermal_bits, int) and 1 <= thermal_bits <= 16):
            raise ValueError(f"thermal_bits must be an int in 1..16 or None, got {thermal_bits!r}")
        self.thermal_bits = thermal_bits
        self.ids = read_split(self.root, split)
        self._ext: dict[str, str] = {}
        listings: dict[str, set[str]] = {}
        for folder in (*self.modalities, self.target_folder):
            if not (self.root / folder).is_dir():
                raise FileNotFoundError(
                    f"{self.root / folder}: {self._folder_kind(folder)} {folder!r} missing from the prepared layout "
                    f"of {self.name} (expected {self.root}/{folder}/<id>.*); see datasets/{self.name}/README.md"
                )
            # One directory listing per folder (cheaper than a stat per file, also on network file
            # systems) finds the extension and every missing file before training starts.
            listings[folder] = set(os.listdir(self.root / folder))
            self._ext[folder] = self._find_ext(folder, self.ids[0], listings[folder])
        self._check_files_exist(listings)

    def _folder_kind(self, folder: str) -> str:
        if folder == "label":
            return "label folder (class-index PNGs)"
        if folder == "boxes":
            return "box folder (one <id>.txt per image)"
        return "modality folder"

    @property
    def num_classes(self) -> int:
        """Number of classes (ignore index not counted)."""
        return len(self.classes)

    def _find_ext(self, folder: str, sample_id: str, listing: set[str] | None = None) -> str:
        # The extension is resolved once per folder, not per sample: a prepared layout uses one
        # format per folder. With the folder's listing, the first id that has a file decides, so
        # a missing first file is reported with all the others by _check_files_exist.
        if folder == "boxes":
            return ".txt"
        if listing is not None:
            for sid in self.ids:
                for ext in EXTENSIONS:
                    if f"{sid}{ext}" in listing:
                        return ext
        for ext in EXTENSIONS:
            if (self.root / folder / f"{sample_id}{ext}").is_file():
                return ext
        raise FileNotFoundError(
            f"{self.root / folder / sample_id}.*: no file for id {sample_id!r} in folder {folder!r} "
            f"(tried {', '.join(EXTENSIONS)})"
        )

    def _check_files_exist(self, listings: dict[str, set[str]]) -> None:
        # A missing file must stop the run here, not crash it mid-epoch when its id is drawn.
        missing = []
        for folder, ext in self._ext.items():
            names = [f"{i}{ext}" for i in self.ids]
            absent = set(names).difference(listings[folder])
            # ids with a "/" name files in subfolders, which the listing does not show: stat them.
            missing += [
                f"{folder}/{n}" for n in names if n in absent and not ("/" in n and (self.root / folder / n).is_file())
            ]
        if missing:
            shown = ", ".join(missing[:20]) + (f", ... ({len(missing) - 20} more)" if len(missing) > 20 else "")
            raise FileNotFoundError(
                f"{self.root}: {len(missing)} file(s) missing for ids of split {self.split!r}: {shown}. "
                f"Re-run datasets/{self.name}/prepare.py, or remove those ids from "
                f"{self.root / 'splits' / f'{self.split}.txt'}"
            )

    def path(self, folder: str, sample_id: str) -> Path:
        """File of ``sample_id`` in ``folder``."""
        return self.root / folder / f"{sample_id}{self._ext[folder]}"

    def __len__(self) -> int:
        return len(self.ids)

    def _read_modality(self, key: str, path: Path) -> np.ndarray:
        if key in ("rgb", "hha"):
            return read_rgb(path)
        if key == "depth":
            return read_depth(path, scale=self.depth_scale, nonfinite=self.nonfinite)
        if key == "thermal":
            return read_thermal(path, bits=self.thermal_bits, nonfinite=self.nonfinite)
        raise KeyError(key)

    def raw(self, index: int) -> dict[str, Any]:
        """Read sample ``index`` as numpy arrays (the input of ``transforms``)."""
        sample_id = self.ids[index]
        sample: dict[str, Any] = {}
        paths: dict[str, str] = {}
        for key in self.modalities:
            path = self.path(key, sample_id)
            paths[key] = str(path)
            sample[key] = self._read_modality(key, path)
        first = self.modalities[0]
        size = sample[first].shape[:2]
        if self.check_size:
            for key in self.modalities[1:]:
                if sample[key].shape[:2] != size:
                    raise DataError(
                        f"{paths[key]}: {key} is {sample[key].shape[:2]} but {paths[first]} ({first}) is "
                        f"{size}; modalities of one sample must be pixel-aligned and the same size"
                    )
        self._read_target(sample_id, sample, paths, size)
        sample["meta"] = {
            "id": sample_id,
            "index": index,
            "paths": paths,
            "orig_size": tuple(size),
            "dataset": self.name,
            "split": self.split,
        }
        return sample

    def _read_target(self, sample_id: str, sample: dict, paths: dict, size: tuple[int, int]) -> None:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} {self.split} ({len(self)} samples)")
        sample = self.raw(index % len(self))
        if self.transforms is None:
            return to_tensor_sample(sample, self.modalities)
        return self.transforms(sample)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"modalities={self.modalities})"
        )


class SegmentationDataset(PreparedDataset):
    """Prepared segmentation layout: a ``label/<id>.png`` per sample."""

    target_folder = "label"

    def _read_target(self, sample_id, sample, paths, size):
        path = self.path("label", sample_id)
        paths["mask"] = str(path)
        mask = read_label(path, self.num_classes)
        if self.check_size and mask.shape != tuple(size):
            raise DataError(
                f"{path}: label is {mask.shape} but {paths[self.modalities[0]]} is {tuple(size)}; "
                "label and images must be the same size"
            )
        sample["mask"] = mask


class DetectionDataset(PreparedDataset):
    """Prepared detection layout: a ``boxes/<id>.txt`` per sample (xyxy pixels)."""

    target_folder = "boxes"

    def _read_target(self, sample_id, sample, paths, size):
        path = self.path("boxes", sample_id)
        paths["boxes"] = str(path)
        # ignore (N,) bool and occlusion (N,) int64 (-1 unknown) travel with the boxes (KAIST protocol)
        sample["boxes"], sample["labels"], sample["ignore"], sample["occlusion"] = read_boxes(
            path, self.num_classes, size, flags=True
        )
