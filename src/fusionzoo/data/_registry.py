"""Strict registry of datasets by name.

``register_dataset`` records a factory (a Dataset class or a function) with metadata, so
``list_datasets`` can filter by task or modality without building anything and
``create_dataset`` can give a useful error for a typo or an unknown keyword argument.
Registering a name twice raises: a silent override is how two readers end up disagreeing.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .transforms import STATS

__all__ = ["DatasetEntry", "create_dataset", "dataset_entry", "list_datasets", "register_dataset"]


@dataclass(frozen=True)
class DatasetEntry:
    """Metadata of one registered dataset.

    Attributes:
        name: Registry name (``"nyuv2"``).
        factory: Class or function called by :func:`create_dataset`.
        task: ``"segmentation"`` or ``"detection"`` (synthetic sets provide both).
        modalities: Default modality keys of a sample, e.g. ``("rgb", "depth")``.
        num_classes: Number of classes (ignore index 255 not counted).
        needs_root: Whether a ``root`` folder (the prepared layout) is required.
        splits: Split names the prepared layout provides.
        paper: Citation of the dataset.
        extra: Facts of a resolved entry (``folder``: ``spec``, ``stats``, ``classes``, ``palette``).
        resolve: For datasets whose metadata lives in the data (``folder``): ``root`` -> the fields
            above that the data root decides (see :func:`dataset_entry`).
    """

    name: str
    factory: Callable[..., Any]
    task: str
    modalities: tuple[str, ...]
    num_classes: int
    needs_root: bool = True
    splits: tuple[str, ...] = ("train", "test")
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    resolve: Callable[[Path], Mapping[str, Any]] | None = None

    def stats(self) -> Mapping[str, Any] | str | None:
        """Normalisation statistics of this data: the entry's own (a folder's YAML), else its name
        when :data:`~fusionzoo.data.transforms.STATS` has it, else ``None`` (the defaults)."""
        return self.extra.get("stats") or (self.name if self.name in STATS else None)


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str,
    *,
    task: str,
    modalities: tuple[str, ...],
    num_classes: int,
    needs_root: bool = True,
    splits: tuple[str, ...] = ("train", "test"),
    paper: str = "",
    resolve: Callable[[Path], Mapping[str, Any]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a dataset factory under ``name``.

    Args:
        name: Unique registry name.
        task: ``"segmentation"``, ``"detection"`` or ``"segmentation+detection"``.
        modalities: Default modality keys of a sample.
        num_classes: Number of classes.
        needs_root: False for generated data that needs no folder.
        splits: Split names available.
        paper: Citation.
        resolve: ``root -> {task, modalities, num_classes, splits, extra}`` for a dataset whose
            metadata is read from its data root (``folder``); :func:`dataset_entry` applies it.

    Returns:
        The decorator; it returns the factory unchanged.

    Raises:
        ValueError: If ``name`` is already registered.
    """

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(
                f"dataset {name!r} is already registered (by {_REGISTRY[name].factory!r}); pick another name"
            )
        _REGISTRY[name] = DatasetEntry(
            name=name,
            factory=factory,
            task=task,
            modalities=tuple(modalities),
            num_classes=int(num_classes),
            needs_root=needs_root,
            splits=tuple(splits),
            paper=paper,
            resolve=resolve,
        )
        return factory

    return decorator


def list_datasets(
    pattern: str | None = None, *, task: str | None = None, modality: str | None = None
) -> list[str]:
    """Sorted names of registered datasets.

    Args:
        pattern: fnmatch pattern on the name (``"synthetic_*"``).
        task: Keep entries whose task contains this word (``"detection"``).
        modality: Keep entries that provide this modality (``"thermal"``).

    Returns:
        Sorted list of names.

    Example:
        >>> list_datasets("synthetic_*")
        ['synthetic_rgbd', 'synthetic_rgbt']
    """
    names = []
    for name, entry in _REGISTRY.items():
        if pattern is not None and not fnmatch.fnmatch(name, pattern):
            continue
        if task is not None and task not in entry.task:
            continue
        if modality is not None and modality not in entry.modalities:
            continue
        names.append(name)
    return sorted(names)


def dataset_entry(name: str, root: str | Path | None = None) -> DatasetEntry:
    """Metadata of a registered dataset.

    Args:
        name: Registry name.
        root: The data root; for a dataset described by its data (``folder``: task, modalities,
            classes, splits and statistics from ``<root>/fusionzoo.yaml``) the entry is resolved
            for it. Ignored by the other datasets.

    Raises:
        KeyError: Unknown name; the message lists close matches and all names.
        FileNotFoundError, fusionzoo.data.io.DataError: ``root`` cannot be resolved (``folder``:
            no YAML, or an invalid one; the message names the key and file).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown dataset {name!r}.{hint} Registered: {list_datasets()}")
    entry = _REGISTRY[name]
    if entry.resolve is not None and root is not None:
        return dataclasses.replace(entry, **entry.resolve(Path(root)))
    return entry


def create_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **kwargs: Any,
):
    """Build a registered dataset.

    Args:
        name: Registry name (see :func:`list_datasets`).
        root: Folder holding the prepared layout (see ``datasets/<name>/README.md``); not
            needed for ``synthetic_*``.
        split: Split name (``"train"``, ``"test"``, ...).
        transforms: Callable applied to the raw numpy sample (e.g. a
            :class:`fusionzoo.data.transforms.JointTransform`); ``None`` gives the dataset's
            default (un-normalized tensors for real data, normalized tensors for synthetic).
        **kwargs: Dataset-specific options; unknown ones raise ``TypeError``.

    Returns:
        A ``torch.utils.data.Dataset`` whose items are sample dicts (see ``docs/data.md``).

    Example:
        >>> ds = create_dataset("synthetic_rgbd", num_samples=4, image_size=(64, 80))
        >>> ds[0]["rgb"].shape, ds[0]["depth"].shape, ds[0]["mask"].shape
        (torch.Size([3, 64, 80]), torch.Size([1, 64, 80]), torch.Size([64, 80]))
    """
    entry = dataset_entry(name)
    if entry.needs_root and root is None and entry.resolve is not None:
        raise ValueError(f"dataset {name!r} needs root=<folder holding fusionzoo.yaml> (see docs/custom_data.md)")
    if entry.needs_root and root is None:
        raise ValueError(
            f"dataset {name!r} needs root=<folder with the prepared layout>; create it with "
            f"`python datasets/{name}/prepare.py --help` (layout in datasets/{name}/README.md)"
        )
    params = inspect.signature(entry.factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            valid = sorted(k for k in params if k not in ("self", "root", "split", "transforms"))
            raise TypeError(
                f"create_dataset({name!r}) got unexpected keyword argument(s) {unknown}; valid: {valid}"
            )
    if entry.needs_root:
        return entry.factory(root=root, split=split, transforms=transforms, **kwargs)
    if root is not None:
        raise ValueError(f"dataset {name!r} is generated and takes no root (got root={root!r})")
    return entry.factory(split=split, transforms=transforms, **kwargs)
