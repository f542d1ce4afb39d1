"""``folder``: your own data, in any layout, described by a small YAML file in the data root.

``create_dataset("folder", root)`` (and ``train.py --dataset folder --data-root DIR``) reads
``DIR/fusionzoo.yaml`` (or ``DIR/dataset.yaml``)::

    task: segmentation                 # or detection
    classes: [background, chair, table]
    palette: [[0, 0, 0], [255, 0, 0], [0, 255, 0]]   # optional: VOC colours by default
    ignore_index: 255                  # optional: the label value that means "not labelled"
    modalities:                        # the model's streams, in this order
      rgb: images                      # shorthand for {folder: images}
      depth: {folder: depth, pattern: "{id}_depth.png", scale: 1000}   # integer units per metre
    labels: {folder: masks, encoding: index}   # segmentation; detection: boxes: {folder: boxes, format: yolo}
    splits:
      train: splits/train.txt          # a text file of ids ...
      val: val                         # ... or a folder holding that split's modality folders
    normalization:                     # optional, per modality, raw units (see docs/custom_data.md)
      rgb: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}

Relative paths are relative to the YAML's folder; absolute paths are allowed (a YAML beside
read-only data it points at). Every problem is reported before training starts, naming the YAML
key and the file: an unknown key lists the valid ones, a missing folder or split file is named,
a palette must have one colour per class, and files missing for listed ids are listed.
``docs/custom_data.md`` has the conventions (depth units, alignment, HHA, label PNGs) and a
worked example.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._registry import register_dataset
from .base import EXTENSIONS, PreparedDataset, read_ids
from .benchmarks import voc_palette
from .io import IGNORE_INDEX, DataError, check_label_range, read_boxes, read_image, read_label
from .transforms import STATS, ModalityStats

__all__ = [
    "SPEC_NAMES",
    "FolderDataset",
    "FolderSpec",
    "FolderSpecError",
    "ModalitySource",
    "find_spec_file",
    "load_folder_spec",
    "read_yolo_boxes",
    "resolve_folder_entry",
]

#: File names looked up in the data root, in this order (exactly one may exist).
SPEC_NAMES = ("fusionzoo.yaml", "dataset.yaml")
TOP_KEYS = ("name", "task", "classes", "palette", "ignore_index", "reduce_zero_label", "modalities", "labels",
            "boxes", "splits", "normalization")
MODALITY_KEYS = {"rgb": ("folder", "pattern"), "hha": ("folder", "pattern"),
                 "depth": ("folder", "pattern", "scale"), "thermal": ("folder", "pattern", "bits")}
CHANNELS = {"rgb": 3, "hha": 3, "depth": 1, "thermal": 1}
TARGET_KEYS = {"labels": ("folder", "pattern", "encoding", "ignore_color"), "boxes": ("folder", "pattern", "format")}
BOX_FORMATS = ("xyxy", "yolo")
TASKS = ("segmentation", "detection")


class FolderSpecError(DataError):
    """The folder's YAML is invalid or does not match the files; the message names the key and file."""


@dataclass(frozen=True)
class ModalitySource:
    """Where one stream (or the target) of the folder lives.

    Attributes:
        folder: Folder relative to a split's base folder (or absolute).
        pattern: File name with ``{id}`` (``"{id}.png"``); ``None``: ``<id>`` plus the extension
            found in the folder (one of ``base.EXTENSIONS``).
        options: ``scale`` (depth: integer units per metre), ``bits`` (thermal), ``encoding`` and
            ``ignore_color`` (labels), ``format`` (boxes: ``xyxy`` or ``yolo``).
    """

    folder: str
    pattern: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FolderSpec:
    """A validated ``fusionzoo.yaml``: what ``predict``, ``train.py`` and ``interpret`` need to know.

    Attributes:
        path: The YAML file.
        name: Label of the dataset (default: the root folder's name).
        task: ``"segmentation"`` or ``"detection"``.
        classes: ``K`` class names, index order.
        palette: ``K`` RGB colours (for masks, overlays and boxes).
        ignore_index: Label value meaning "not labelled" in the files (read as 255).
        reduce_zero_label: Label 0 is "not labelled" and class ``i`` is stored as ``i + 1``.
        modalities: Stream name -> source, in the model's order.
        target: Label (segmentation) or box (detection) source.
        splits: Split name -> a split file (ids) or a folder (its own modality folders).
        stats: Per-modality normalisation statistics (the YAML's over the fusionzoo defaults).
    """

    path: Path
    name: str
    task: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    reduce_zero_label: bool
    modalities: dict[str, ModalitySource]
    target: ModalitySource
    splits: dict[str, Path]
    stats: dict[str, ModalityStats]

    @property
    def root(self) -> Path:
        """The folder relative paths start from (the YAML's folder)."""
        return self.path.parent

    @property
    def num_classes(self) -> int:
        """``K`` (the ignore value not counted)."""
        return len(self.classes)


def find_spec_file(root: str | Path) -> Path:
    """The YAML describing ``root`` (one of :data:`SPEC_NAMES`).

    Raises:
        FileNotFoundError: ``root`` is no folder, or holds none of the names.
        FolderSpecError: it holds more than one (which one counts would be a guess).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root not found (dataset 'folder' reads <root>/{SPEC_NAMES[0]})")
    found = [root / n for n in SPEC_NAMES if (root / n).is_file()]
    if not found:
        raise FileNotFoundError(
            f"{root}: no {' or '.join(SPEC_NAMES)}; dataset 'folder' needs one describing the layout "
            "(task, classes, modalities, splits: see docs/custom_data.md)"
        )
    if len(found) > 1:
        raise FolderSpecError(f"{root}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0]


def _fail(path: Path, key: str, text: str) -> FolderSpecError:
    return FolderSpecError(f"{path}: {key}: {text}")


def _check_keys(path: Path, where: str, data: Mapping[str, Any], valid: Sequence[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in valid)
    if unknown:
        raise _fail(path, where, f"unknown key(s) {unknown}; valid keys: {list(valid)}")


def _source(path: Path, key: str, value: Any, valid: Sequence[str], default_folder: str) -> ModalitySource:
    """``folder`` shorthand or ``{folder, pattern, ...}`` mapping -> :class:`ModalitySource`."""
    if value is None:
        value = {"folder": default_folder}
    if isinstance(value, str):
        value = {"folder": value}
    if not isinstance(value, Mapping):
        raise _fail(path, key, f"expected a folder name or a mapping with keys {list(valid)}, got {value!r}")
    _check_keys(path, key, value, valid)
    folder = value.get("folder", default_folder)
    if not isinstance(folder, str) or not folder:
        raise _fail(path, f"{key}.folder", f"expected a folder name, got {folder!r}")
    pattern = value.get("pattern")
    if pattern is not None and (not isinstance(pattern, str) or pattern.count("{id}") != 1
                                or any(c in pattern.replace("{id}", "") for c in "/{}")):
        raise _fail(path, f"{key}.pattern", f"expected a file name with '{{id}}' once (e.g. '{{id}}.png'), "
                                            f"got {pattern!r}")
    options = {k: v for k, v in value.items() if k not in ("folder", "pattern")}
    return ModalitySource(folder, pattern, options)


def _stats(path: Path, data: Any, modalities: Sequence[str]) -> dict[str, ModalityStats]:
    stats = dict(STATS["default"])
    if data is None:
        return stats
    if not isinstance(data, Mapping):
        raise _fail(path, "normalization", f"expected a mapping modality -> {{mean, std}}, got {data!r}")
    _check_keys(path, "normalization", data, list(modalities))
    for mod, value in data.items():
        key = f"normalization.{mod}"
        if not isinstance(value, Mapping):
            raise _fail(path, key, f"expected {{mean: [...], std: [...]}}, got {value!r}")
        _check_keys(path, key, value, ("mean", "std"))
        vals = {}
        for part in ("mean", "std"):
            v = value.get(part)
            v = [v] if isinstance(v, (int, float)) else v
            if (not isinstance(v, list) or len(v) != CHANNELS[mod]
                    or not all(isinstance(x, (int, float)) and np.isfinite(x) for x in v)):
                raise _fail(path, f"{key}.{part}", f"expected {CHANNELS[mod]} number(s) ({mod} has "
                                                   f"{CHANNELS[mod]} channel(s)), got {v!r}")
            vals[part] = tuple(float(x) for x in v)
        if min(vals["std"]) <= 0:
            raise _fail(path, f"{key}.std", f"must be > 0, got {list(vals['std'])}")
        stats[mod] = ModalityStats(vals["mean"], vals["std"])
    return stats


def _palette(path: Path, data: Any, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    if data is None:
        return tuple(voc_palette(num_classes + 1)[1:])  # VOC colours without VOC's black background
    if not isinstance(data, list) or not all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(x, int) and 0 <= x <= 255 for x in c) for c in data):
        raise _fail(path, "palette", "expected a list of [R, G, B] triples of ints 0..255, one per class")
    if len(data) != num_classes:
        raise _fail(path, "palette", f"{len(data)} colours for {num_classes} classes; give one colour per class "
                                     "(or leave palette out for the VOC colours)")
    colours = tuple(tuple(c) for c in data)
    if len(set(colours)) != len(colours):
        dup = sorted({c for c in colours if colours.count(c) > 1})
        raise _fail(path, "palette", f"colours {dup} repeat: classes would be indistinguishable in masks")
    return colours  # type: ignore[return-value]


def _splits(path: Path, data: Any) -> dict[str, Path]:
    root = path.parent
    if data is None:  # the prepared layout's convention
        found = sorted((root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
        if not found:
            raise _fail(path, "splits", f"missing, and {root / 'splits'} holds no <split>.txt files; give "
                                        "splits: {train: <ids file or folder>, val: ...}")
        return {p.stem: p for p in found}
    if not isinstance(data, Mapping) or not data:
        raise _fail(path, "splits", f"expected a mapping split name -> ids file or folder, got {data!r}")
    out = {}
    for name, value in data.items():
        if not isinstance(value, str) or not value:
            raise _fail(path, f"splits.{name}", f"expected a path (an ids file or a folder), got {value!r}")
        p = root / value
        if not p.exists():
            raise _fail(path, f"splits.{name}", f"{p} not found (a text file of ids, or a folder holding the split's "
                                                "modality folders)")
        out[str(name)] = p
    return out


def load_folder_spec(root: str | Path) -> FolderSpec:
    """Read and validate the YAML of a ``folder`` data root.

    Args:
        root: The data root (holding ``fusionzoo.yaml`` or ``dataset.yaml``).

    Returns:
        The validated :class:`FolderSpec`.

    Raises:
        FileNotFoundError: No root or no YAML.
        FolderSpecError: Invalid YAML, naming the key and the file.

    Example:
        >>> spec = load_folder_spec("my_data")  # doctest: +SKIP
        >>> spec.classes, spec.palette[0], list(spec.modalities)  # doctest: +SKIP
        (('background', 'chair'), (0, 0, 0), ['rgb', 'depth'])
    """
    path = find_spec_file(root)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise FolderSpecError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, Mapping):
        raise FolderSpecError(f"{path}: expected a mapping with keys {list(TOP_KEYS)}, got {type(data).__name__}")
    _check_keys(path, "top level", data, TOP_KEYS)
    for key in ("task", "classes", "modalities"):
        if key not in data:
            raise _fail(path, key, "missing (required keys: task, classes, modalities)")
    task = data["task"]
    if task not in TASKS:
        raise _fail(path, "task", f"expected one of {list(TASKS)}, got {task!r}")
    classes = data["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise _fail(path, "classes", f"expected a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise _fail(path, "classes", f"names repeat: {sorted({c for c in classes if classes.count(c) > 1})}")
    if len(classes) > IGNORE_INDEX:
        raise _fail(path, "classes", f"{len(classes)} classes; at most {IGNORE_INDEX} fit a uint8 label with "
                                     f"{IGNORE_INDEX} = ignore")
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 255 or (
            ignore < len(classes) and not data.get("reduce_zero_label")):
        raise _fail(path, "ignore_index", f"expected an int in {len(classes)}..255 (a value that is no class index), "
                                          f"got {ignore!r}")
    reduce_zero = data.get("reduce_zero_label", False)
    if not isinstance(reduce_zero, bool):
        raise _fail(path, "reduce_zero_label", f"expected true or false, got {reduce_zero!r}")
    mods = data["modalities"]
    if not isinstance(mods, Mapping) or not mods:
        raise _fail(path, "modalities", f"expected a mapping modality -> folder, e.g. {{rgb: rgb, depth: depth}}, "
                                        f"got {mods!r}")
    _check_keys(path, "modalities", mods, list(MODALITY_KEYS))
    sources = {str(m): _source(path, f"modalities.{m}", v, MODALITY_KEYS[m], str(m)) for m, v in mods.items()}
    _check_modality_options(path, sources)
    target_key, other = ("labels", "boxes") if task == "segmentation" else ("boxes", "labels")
    if other in data:
        raise _fail(path, other, f"is for task {'detection' if other == 'boxes' else 'segmentation'}; this file "
                                 f"says task: {task} (its target is {target_key!r})")
    target = _source(path, target_key, data.get(target_key), TARGET_KEYS[target_key],
                     "label" if target_key == "labels" else "boxes")
    palette = _palette(path, data.get("palette"), len(classes))
    _check_target_options(path, target_key, target, palette)
    return FolderSpec(
        path=path,
        name=str(data.get("name") or path.parent.resolve().name),
        task=task,
        classes=tuple(classes),
        palette=palette,
        ignore_index=ignore,
        reduce_zero_label=reduce_zero,
        modalities=sources,
        target=target,
        splits=_splits(path, data.get("splits")),
        stats=_stats(path, data.get("normalization"), list(sources)),
    )


def _check_modality_options(path: Path, sources: Mapping[str, ModalitySource]) -> None:
    depth = sources.get("depth")
    if depth is not None and "scale" in depth.options:
        s = depth.options["scale"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise _fail(path, "modalities.depth.scale", f"expected integer depth units per metre > 0 (1000 for "
                                                        f"millimetres, 5000 for TUM, 256 for KITTI), got {s!r}")
    thermal = sources.get("thermal")
    if thermal is not None and "bits" in thermal.options:
        b = thermal.options["bits"]
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise _fail(path, "modalities.thermal.bits", f"expected the sensor's bits, an int 1..16, got {b!r}")


def _check_target_options(path: Path, key: str, target: ModalitySource, palette: Sequence[tuple[int, ...]]) -> None:
    if key == "boxes":
        fmt = target.options.get("format", "xyxy")
        if fmt not in BOX_FORMATS:
            raise _fail(path, "boxes.format", f"expected 'xyxy' ('<class> x1 y1 x2 y2' in pixels) or 'yolo' "
                                              f"('<class> cx cy w h' as fractions of the image), got {fmt!r}")
        return
    enc = target.options.get("encoding", "index")
    if enc not in ("index", "color"):
        raise _fail(path, "labels.encoding", f"expected 'index' (one-channel PNG of class indices, palette 'P' or "
                                             f"grayscale 'L') or 'color' (RGB PNG in the palette's colours), got {enc!r}")
    colour = target.options.get("ignore_color")
    if colour is not None:
        if enc != "color":
            raise _fail(path, "labels.ignore_color", "only applies with encoding: color")
        if not (isinstance(colour, list) and len(colour) == 3 and all(isinstance(x, int) and 0 <= x <= 255
                                                                        for x in colour)):
            raise _fail(path, "labels.ignore_color", f"expected [R, G, B] ints 0..255, got {colour!r}")
        if tuple(colour) in palette:
            raise _fail(path, "labels.ignore_color", f"{colour} is also the colour of class "
                                                     f"{palette.index(tuple(colour))} in palette")


def resolve_folder_entry(root: str | Path) -> dict[str, Any]:
    """Registry metadata of the ``folder`` dataset at ``root`` (see ``register_dataset(resolve=...)``)."""
    spec = load_folder_spec(root)
    return {
        "task": spec.task,
        "modalities": tuple(spec.modalities),
        "num_classes": spec.num_classes,
        "splits": tuple(spec.splits),
        "extra": {"spec": spec, "stats": spec.stats, "classes": list(spec.classes),
                  "palette": [list(c) for c in spec.palette]},
    }


def _pattern_regex(pattern: str | None) -> re.Pattern[str]:
    if pattern is None:
        return re.compile(r"(.+)(" + "|".join(re.escape(e) for e in EXTENSIONS) + r")$", re.IGNORECASE)
    before, after = pattern.split("{id}")
    return re.compile(re.escape(before) + "(.+)" + re.escape(after) + "$")


def read_yolo_boxes(path: str | Path, num_classes: int, image_size: tuple[int, int], *,
                    flags: bool = True) -> tuple[np.ndarray, ...]:
    """Read a YOLO label file: ``<class> <cx> <cy> <w> <h>`` per line, fractions of the image.

    Args:
        path: The ``.txt`` file (empty: no objects).
        num_classes: Valid class indices are ``0 .. num_classes - 1``.
        image_size: ``(H, W)`` of the image the fractions refer to.
        flags: Also return ``ignore`` (all False) and ``occlusion`` (all -1, unknown), as
            :func:`~fusionzoo.data.io.read_boxes` does.

    Returns:
        ``boxes`` float32 ``(N, 4)`` xyxy pixels (clipped to the image) and ``labels`` int64
        ``(N,)``; with ``flags`` also ``ignore`` bool ``(N,)`` and ``occlusion`` int64 ``(N,)``.

    Raises:
        DataError: A malformed line, a class out of range, a coordinate outside [0, 1] or a
            non-positive size, naming the file and line.
    """
    path = Path(path)
    height, width = image_size
    boxes, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if len(parts) != 5:
                raise ValueError(f"{len(parts)} fields")
            cls = int(parts[0])
            cx, cy, w, h = (float(p) for p in parts[1:])
        except ValueError as err:
            raise DataError(f"{path}:{lineno}: expected '<class> <cx> <cy> <w> <h>' (YOLO, fractions of the image; "
                            f"boxes.format: yolo) ({err}): {line.strip()!r}") from None
        if not 0 <= cls < num_classes:
            raise DataError(f"{path}:{lineno}: class {cls} out of range 0..{num_classes - 1}")
        if not (all(np.isfinite([cx, cy, w, h])) and 0 <= cx <= 1 and 0 <= cy <= 1 and 0 < w <= 1 and 0 < h <= 1):
            raise DataError(f"{path}:{lineno}: YOLO box {[cx, cy, w, h]} must be fractions of the image in [0, 1] "
                            "with w, h > 0; pixel boxes need boxes.format: xyxy")
        boxes.append([max(cx - w / 2, 0) * width, max(cy - h / 2, 0) * height,
                      min(cx + w / 2, 1) * width, min(cy + h / 2, 1) * height])
        labels.append(cls)
    out = (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64))
    if flags:
        return (*out, np.zeros(len(labels), bool), np.full(len(labels), -1, np.int64))
    return out


@register_dataset(
    "folder",
    task="segmentation+detection",
    modalities=(),
    num_classes=0,
    splits=(),
    paper="your own data: a folder described by fusionzoo.yaml (docs/custom_data.md)",
    resolve=resolve_folder_entry,
)
class FolderDataset(PreparedDataset):
    """Any prepared layout described by ``<root>/fusionzoo.yaml`` (module docstring; docs/custom_data.md).

    Args:
        root: The data root holding the YAML.
        split: A split named in the YAML's ``splits``.
        transforms: As for every dataset (``None``: tensors without normalisation).
        modalities: Subset/order of the YAML's modalities to load (default: all, YAML order).
        nonfinite: Invalid depth/thermal policy (see :class:`~fusionzoo.data.base.PreparedDataset`).
        check_size: Raise when the files of one sample differ in size.

    Raises:
        FileNotFoundError: No root, YAML, folder, or files missing for listed ids (one error
            listing them).
        FolderSpecError: Invalid YAML (naming the key and file), an unknown split, or
            ``modalities`` the YAML does not have.

    Example:
        >>> ds = create_dataset("folder", "my_data", split="train")  # doctest: +SKIP
        >>> ds.classes, ds.palette, ds.modalities  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        modalities: Sequence[str] | None = None,
        nonfinite: str = "invalid",
        check_size: bool = True,
    ) -> None:
        # PreparedDataset.__init__ is not called: it reads the fixed layout; this sets the same
        # attributes from the YAML, so raw(), __getitem__ and the readers are shared.
        self.spec = spec = load_folder_spec(root)
        self.root = spec.root
        self.name = spec.name
        self.classes = list(spec.classes)
        self.palette = list(spec.palette)
        self.task = spec.task
        self.available_modalities = tuple(spec.modalities)
        self.default_modalities = self.available_modalities
        self.modalities = tuple(modalities) if modalities is not None else self.available_modalities
        bad = [m for m in self.modalities if m not in self.available_modalities]
        if bad:
            raise FolderSpecError(f"{spec.path}: modalities: {bad} asked for but not in the YAML (it has "
                                  f"{list(self.available_modalities)})")
        if nonfinite not in ("invalid", "raise"):
            raise ValueError(f"nonfinite must be 'invalid' or 'raise', got {nonfinite!r}")
        self.transforms, self.nonfinite, self.check_size = transforms, nonfinite, check_size
        self.depth_scale = float(spec.modalities["depth"].options.get("scale", 1000.0)) if "depth" in spec.modalities \
            else 1000.0
        self.thermal_bits = spec.modalities["thermal"].options.get("bits") if "thermal" in spec.modalities else None
        if split not in spec.splits:
            raise FolderSpecError(f"{spec.path}: splits: no split {split!r}; it names {list(spec.splits)}")
        self.split = split
        split_path = spec.splits[split]
        self._base = split_path if split_path.is_dir() else spec.root
        self._sources = {**{m: spec.modalities[m] for m in self.modalities}, "target": spec.target}
        listings = {key: self._listing(key, src) for key, src in self._sources.items()}
        first = self.modalities[0]
        self.ids = read_ids(split_path) if split_path.is_file() else self._ids_from_listing(
            listings[first], first)
        self._patterns = {key: src.pattern or self._find_pattern(key, listings[key]) for key, src in
                          self._sources.items()}
        self._check_listed(listings)
        self._label_colours = None
        if spec.task == "segmentation" and spec.target.options.get("encoding") == "color":
            self._label_colours = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(spec.palette)}
            ignore_colour = spec.target.options.get("ignore_color")
            if ignore_colour is not None:
                r, g, b = ignore_colour
                self._label_colours[(r << 16) | (g << 8) | b] = IGNORE_INDEX

    @property
    def ignore_index(self) -> int:  # samples always carry 255 (the value in the files is remapped)
        return IGNORE_INDEX

    def _folder(self, key: str) -> Path:
        return self._base / self._sources[key].folder

    def _listing(self, key: str, src: ModalitySource) -> set[str]:
        folder = self._folder(key)
        if not folder.is_dir():
            where = "labels" if key == "target" and self.spec.task == "segmentation" else \
                "boxes" if key == "target" else f"modalities.{key}"
            raise FileNotFoundError(f"{self.spec.path}: {where}.folder: {folder} not found (split {self.split!r})")
        return set(os.listdir(folder))

    def _ids_from_listing(self, listing: set[str], key: str) -> list[str]:
        # A split folder: its ids are the files of the first modality that match its pattern.
        regex = _pattern_regex(self._sources[key].pattern)
        ids = sorted({m.group(1) for m in map(regex.match, listing) if m})
        if not ids:
            raise FolderSpecError(f"{self.spec.path}: splits.{self.split}: {self._folder(key)} holds no file matching "
                                  f"{self._sources[key].pattern or '<id>' + '|'.join(EXTENSIONS)}")
        return ids

    def _find_pattern(self, key: str, listing: set[str]) -> str:
        if key == "target" and self.spec.task == "detection":
            return "{id}.txt"
        for sid in self.ids:
            for ext in EXTENSIONS:
                if f"{sid}{ext}" in listing:
                    return "{id}" + ext
        raise FileNotFoundError(f"{self._folder(key)}: no file <id>.* (tried {', '.join(EXTENSIONS)}) for any id of "
                                f"split {self.split!r} (first ids {self.ids[:3]}); give a pattern in {self.spec.path}")

    def _check_listed(self, listings: Mapping[str, set[str]]) -> None:
        # Every missing file is reported now, not when its id is drawn mid-epoch.
        missing = []
        for key, pattern in self._patterns.items():
            for sid in self.ids:
                name = pattern.format(id=sid)
                if name not in listings[key] and not ("/" in name and (self._folder(key) / name).is_file()):
                    missing.append(str(self._folder(key) / name))
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
            raise FileNotFoundError(f"{self.spec.path}: {len(missing)} file(s) missing for ids of split "
                                    f"{self.split!r}: {shown}")

    def path(self, folder: str, sample_id: str) -> Path:
        """File of ``sample_id`` for a modality (``"label"`` / ``"boxes"``: the target)."""
        key = "target" if folder in ("label", "boxes", "target") else folder
        return self._folder(key) / self._patterns[key].format(id=sample_id)

    def _read_target(self, sample_id: str, sample: dict, paths: dict, size: tuple[int, int]) -> None:
        path = self.path("target", sample_id)
        if self.spec.task == "detection":
            paths["boxes"] = str(path)
            read = read_yolo_boxes if self.spec.target.options.get("format") == "yolo" else read_boxes
            sample["boxes"], sample["labels"], sample["ignore"], sample["occlusion"] = read(
                path, self.num_classes, size, flags=True)
            return
        paths["mask"] = str(path)
        mask = self._read_mask(path)
        if self.check_size and mask.shape != tuple(size):
            raise DataError(f"{path}: label is {mask.shape} but {paths[self.modalities[0]]} is {tuple(size)}; "
                            "label and images must be the same size")
        sample["mask"] = mask

    def _read_mask(self, path: Path) -> np.ndarray:
        """Label file -> uint8 class indices with 255 = ignore."""
        if self._label_colours is not None:
            return self._colour_mask(path)
        spec = self.spec
        if not spec.reduce_zero_label and spec.ignore_index == IGNORE_INDEX:
            return read_label(path, self.num_classes)
        raw = read_label(path, IGNORE_INDEX + 1)  # shape and decoding checks; values are remapped below
        mask = raw.astype(np.int16)
        if spec.reduce_zero_label:  # mmseg's convention: 0 = not labelled, class i stored as i + 1
            mask = np.where(raw == 0, IGNORE_INDEX, mask - 1)
        mask[raw == spec.ignore_index] = IGNORE_INDEX
        mask = mask.astype(np.uint8)
        check_label_range(mask, self.num_classes, path)
        return mask

    def _colour_mask(self, path: Path) -> np.ndarray:
        arr = read_image(path)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise DataError(f"{path}: labels.encoding is color but the label has shape {tuple(arr.shape)}; "
                            "expected an RGB image in the palette's colours")
        rgb = arr[..., :3].astype(np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        values, inverse = np.unique(code, return_inverse=True)
        unknown = [v for v in values.tolist() if v not in self._label_colours]
        if unknown:
            shown = [[v >> 16, (v >> 8) & 255, v & 255] for v in unknown[:5]]
            raise DataError(f"{path}: colours {shown} are not in {self.spec.path} palette (nor labels.ignore_color); "
                            "every pixel must have a class colour")
        lut = np.array([self._label_colours[v] for v in values.tolist()], np.uint8)
        return lut[inverse.reshape(code.shape)]
