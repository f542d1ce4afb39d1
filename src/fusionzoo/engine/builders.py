"""Small builders that turn a :class:`TrainConfig` into datasets, loaders, a model and a run folder.

They keep ``train.py`` a top-to-bottom read; each one is a few lines of policy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from .distributed import DistInfo, EpochSampler, SeededDataset

__all__ = [
    "CALLBACKS",
    "build_callbacks",
    "build_datasets",
    "build_eval_loader",
    "build_model",
    "build_train_loader",
    "config_for_resume",
    "find_comparable_runs",
    "make_run_dir",
    "normalization_of",
    "resolve_modalities",
]

# Named training callbacks (``--callbacks a,b``): "module:Class", imported on use.
CALLBACKS = {
    "modality_balance": "fusionzoo.interpret.callbacks:ModalityBalanceCallback",
    "ogm_ge": "fusionzoo.interpret.callbacks:OGMGECallback",  # changes training: OGM-GE, alpha 0.5
}


def build_callbacks(names: Sequence[str]) -> list[Any]:
    """Instantiate the named callbacks (see :data:`CALLBACKS`)."""
    import importlib

    out = []
    for name in names:
        if name not in CALLBACKS:
            raise ConfigError(f"unknown callback {name!r}; known: {sorted(CALLBACKS)}")
        module, cls = CALLBACKS[name].split(":")
        out.append(getattr(importlib.import_module(module), cls)())
    return out


# Keys that may differ when resuming: they change neither the data stream nor the arithmetic.
RESUME_MUTABLE = ("resume", "progress", "kill_after_step", "num_workers", "device", "log_interval", "out_dir",
                  "threads")


def _is_synthetic(name: str) -> bool:
    from ..data import dataset_entry

    return not dataset_entry(name).needs_root


def _stats_name(name: str) -> str | None:
    from ..data.transforms import STATS

    return name if name in STATS else None


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """Training and validation sets of ``cfg.dataset`` with the config's transforms.

    Synthetic sets are generated at ``image_size`` (``train_samples`` / ``val_samples`` each);
    prepared benchmark sets are read from ``data_root`` and resized to ``image_size`` for
    evaluation (``None`` = native size, the published protocols) and cropped to ``crop_size``
    (default ``image_size``) for training.

    Raises:
        ConfigError: a benchmark set without ``data_root``, or training at native size with
            augmentation off (images of different sizes cannot be batched).
    """
    from ..data import create_dataset, dataset_entry
    from ..data.transforms import eval_transforms, train_transforms

    entry = dataset_entry(cfg.dataset)
    synthetic = not entry.needs_root
    stats = _stats_name(cfg.dataset)
    modalities = entry.modalities
    train_size = cfg.crop_size or cfg.image_size
    if cfg.augment:
        if train_size is None:
            raise ConfigError("augment=true needs crop_size or image_size (the training crop size)")
        train_tf = train_transforms(modalities, size=train_size, scale=cfg.aug_scale, rotate=cfg.aug_rotate, stats=stats)
    elif synthetic:
        train_tf = None  # the generator's default: normalized tensors, nothing random
    else:
        train_tf = eval_transforms(modalities, size=train_size, stats=stats)
    val_tf = None if synthetic else eval_transforms(modalities, size=cfg.image_size, stats=stats)
    kwargs = dict(cfg.dataset_kwargs)
    if synthetic:
        common = {"image_size": cfg.image_size} if cfg.image_size is not None else {}
        train = create_dataset(cfg.dataset, split=cfg.train_split, transforms=train_tf,
                               num_samples=cfg.train_samples, **common, **kwargs)
        val = create_dataset(cfg.dataset, split=cfg.val_split, transforms=val_tf,
                             num_samples=cfg.val_samples, **common, **kwargs)
    else:
        for key in ("train_split", "val_split"):
            if getattr(cfg, key) not in entry.splits:
                raise ConfigError(
                    f"dataset {cfg.dataset!r} has no split {getattr(cfg, key)!r} (splits: {list(entry.splits)}); "
                    f"pass --{key.replace('_', '-')} <one of them>"
                )
        if cfg.data_root is None:
            raise ConfigError(
                f"dataset {cfg.dataset!r} needs --data-root (the prepared layout; see datasets/{cfg.dataset}/README.md)"
            )
        train = create_dataset(cfg.dataset, cfg.data_root, split=cfg.train_split, transforms=train_tf, **kwargs)
        val = create_dataset(cfg.dataset, cfg.data_root, split=cfg.val_split, transforms=val_tf, **kwargs)
    return train, val


def resolve_modalities(cfg: TrainConfig, dataset: Dataset) -> tuple[str, ...]:
    """The model's streams: ``cfg.modalities`` (checked against the data) or the dataset's.

    Raises:
        ConfigError: a requested modality the dataset does not provide, or an ``eval_missing`` /
            ``modality_dropout_candidates`` entry the model does not use.
    """
    have = tuple(dataset.modalities)
    mods = tuple(cfg.modalities) if cfg.modalities is not None else have
    absent = [m for m in mods if m not in have]
    if absent:
        raise ConfigError(f"modalities {absent} are not provided by dataset {cfg.dataset!r} (it has {list(have)})")
    for key in ("eval_missing", "modality_dropout_candidates", "train_missing"):
        bad = [m for m in (getattr(cfg, key) or ()) if m not in mods]
        if bad:
            raise ConfigError(f"{key} names {bad}, which the model does not use (modalities {list(mods)})")
    if len(set(cfg.train_missing)) >= len(mods):
        raise ConfigError(f"train_missing={list(cfg.train_missing)} leaves none of {list(mods)} to train on")
    return mods


def build_train_loader(dataset: Dataset, cfg: TrainConfig, info: DistInfo) -> tuple[DataLoader, EpochSampler]:
    """Loader over :class:`SeededDataset` with a resumable :class:`EpochSampler` (drop_last)."""
    from ..data import collate

    sampler = EpochSampler(len(dataset), shuffle=True, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                           drop_last=True, with_epoch=True)
    loader = DataLoader(
        SeededDataset(dataset, cfg.seed),
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,  # equal batch counts on every rank; a ragged last batch would desync DDP
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # A private generator: creating the iterator draws a seed from it instead of from the
        # global RNG, so a resumed run's global RNG stream matches the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler


def build_eval_loader(dataset: Dataset, cfg: TrainConfig, info: DistInfo) -> DataLoader:
    """Ordered loader; each sample lands on exactly one rank (no padding)."""
    from ..data import collate

    sampler = EpochSampler(len(dataset), shuffle=False, rank=info.rank, world_size=info.world_size, even=False)
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_model(cfg: TrainConfig, modalities: Sequence[str], num_classes: int) -> nn.Module:
    """``fusionzoo.create_model`` with the config's model, modalities, classes and kwargs.

    Raises:
        ConfigError: the model cannot run on these modalities; the message suggests the
            single-stream alternatives for a one-modality baseline.
    """
    import fusionzoo as fz

    entry = fz.model_entry(cfg.model)
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    for k in ("num_classes", "modalities"):
        if k in kwargs:
            raise ConfigError(f"model_kwargs must not set {k!r}; use the top-level key {k!r}")
    if cfg.pretrained:
        kwargs["pretrained"] = True
    if len(modalities) == 1 and entry.fusion in ("middle", "hybrid"):
        raise ConfigError(
            f"{cfg.model} is a {entry.fusion}-fusion model and needs two or more modalities, got {list(modalities)}. "
            f"For a single-modality baseline of the same recipe use --modalities rgb with a single-stream model "
            f"(e.g. --model early_concat_{cfg.model.split('_', 1)[-1]}: one encoder + the same decoder), or keep this "
            f"model and withhold the other stream with --train-missing."
        )
    return fz.create_model(cfg.model, num_classes=num_classes, modalities=tuple(modalities), **kwargs)


def normalization_of(cfg: TrainConfig, modalities: Sequence[str]) -> dict[str, Any] | None:
    """Per-modality input statistics used for this dataset (stored with saved models)."""
    from ..data.transforms import _stats_for

    stats = _stats_for(_stats_name(cfg.dataset))
    return {m: {"mean": list(stats[m].mean), "std": list(stats[m].std)} for m in modalities if m in stats}


def make_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name`` (default ``<model>-<dataset>-<modalities>-<UTC time>``), created."""
    if cfg.resume:
        return resume_run_dir(cfg.resume)
    if cfg.run_name:
        path = Path(cfg.out_dir) / cfg.run_name
        if (path / "checkpoints").exists() or (path / "config.json").exists():
            raise ConfigError(f"run folder {path} is already used; pass --resume {path} or another --run-name")
        path.mkdir(parents=True, exist_ok=True)
        return path
    mods = "+".join(cfg.modalities) if cfg.modalities else "all"
    if cfg.train_missing:
        mods += "-no-" + "+".join(cfg.train_missing)
    stem = f"{cfg.model}-{cfg.dataset}-{mods}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):  # two runs started in the same second get distinct folders
        path = Path(cfg.out_dir) / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"could not create a fresh run folder for {stem} in {cfg.out_dir}")


def resume_run_dir(path: str | Path) -> Path:
    """The run folder of ``--resume`` (a run folder, or one of its checkpoint folders)."""
    p = Path(path)
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / "config.json").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    raise ConfigError(f"--resume {path}: no run folder with config.json and checkpoints/ found there")


def config_for_resume(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The saved config of ``run_dir`` with only the harmless keys taken from ``cfg``.

    Raises:
        ConfigError: ``cfg`` changes a key that would make the continuation differ from an
            uninterrupted run (listing the keys and both values).
    """
    path = run_dir / "config.json"
    try:
        saved_data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's resolved config ({e})") from None
    saved_data.pop("_resolved", None)
    saved = config_from_dict(saved_data, where=str(path))  # every rank reads; nothing is written
    defaults = config_to_dict(TrainConfig())
    given = config_to_dict(cfg)
    old = config_to_dict(saved)
    changed = [k for k, v in given.items() if k not in RESUME_MUTABLE and v != defaults[k] and v != old[k]]
    if changed:
        diffs = ", ".join(f"{k}: run has {old[k]!r}, given {given[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot change {diffs} when resuming {run_dir} (exact resume); only {list(RESUME_MUTABLE)} may differ"
        )
    # Harmless keys: what the command line set explicitly (differs from the default), else the run's.
    merged = {**old, **{k: given[k] for k in RESUME_MUTABLE if given[k] != defaults[k]}}
    for k in ("resume", "kill_after_step"):  # per invocation, never inherited from the run
        merged[k] = given[k]
    return TrainConfig(**merged)


# Keys that may differ between runs of "the same recipe" on different streams.
_COMPARE_IGNORED = set(RESUME_MUTABLE) | {
    "modalities", "train_missing", "run_name", "eval_missing", "tta", "tta_scales", "tta_flip",
    "compile", "channels_last", "modality_dropout_candidates",
}


def _streams(data: dict[str, Any]) -> list[str]:
    mods = data.get("_resolved", {}).get("modalities") or data.get("modalities") or []
    return [m for m in mods if m not in (data.get("train_missing") or [])]


def find_comparable_runs(cfg: TrainConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Finished runs in ``cfg.out_dir`` with this run's recipe on other input streams.

    "Same recipe" = every config key equal except the stream choice (``modalities``,
    ``train_missing``) and keys that change neither data nor arithmetic. Used by the summary to
    print, e.g., the RGB-only figure beside the fusion figure when both were run.
    """
    out = []
    here = json.loads((run_dir / "config.json").read_text())
    mine = _streams(here)
    for other in sorted(Path(cfg.out_dir).glob("*/summary.json")):
        folder = other.parent
        if folder.resolve() == run_dir.resolve() or not (folder / "config.json").is_file():
            continue
        try:
            theirs = json.loads((folder / "config.json").read_text())
            summary = json.loads(other.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        same = all(theirs.get(k) == v for k, v in here.items() if k not in _COMPARE_IGNORED and k != "_resolved")
        streams = _streams(theirs)
        value = summary.get("best_value", summary.get("best_val_miou"))
        if same and streams != mine and value is not None:
            out.append({"run_dir": str(folder), "streams": streams, "best_value": value})
    return out
