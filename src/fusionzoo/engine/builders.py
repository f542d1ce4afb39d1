"""Small builders that turn a :class:`TrainConfig` into datasets, loaders, a model and a run folder.

They keep ``train.py`` a top-to-bottom read; each one is a few lines of policy.
"""

from __future__ import annotations

import importlib
import inspect
import json
import signal
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._registry import create_model, model_entry
from ..data import collate, create_dataset, dataset_entry
from ..data.io import DataError
from ..data.statistics import class_pixel_counts
from ..data.transforms import _stats_for, eval_transforms, train_transforms
from ..losses import median_frequency_weights
from ..tasks import Task, get_task
from ..weights import CheckpointError, unwrap_model
from .checkpoint import remove_temp_leftovers, resolve_checkpoint_dir
from .config import CALLBACKS, ConfigError, TrainConfig, config_from_dict, config_to_dict
from .distributed import DistInfo, EpochSampler, SeededDataset, broadcast_object, dist_info

__all__ = [
    "CALLBACKS",
    "RESUME_EXTENDABLE",
    "RESUME_MUTABLE",
    "build_callbacks",
    "build_datasets",
    "build_eval_loader",
    "build_model",
    "build_task",
    "build_train_loader",
    "check_run_name",
    "check_side_loss",
    "class_weights_for",
    "config_for_resume",
    "find_comparable_runs",
    "make_run_dir",
    "normalization_of",
    "resolve_modalities",
    "resume_run_dir",
]

def build_callbacks(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None, *,
                    context: Mapping[str, Any] | None = None, model: nn.Module | None = None) -> list[Any]:
    """Instantiate the named callbacks (see :data:`CALLBACKS`) and check them against ``model``.

    Args:
        names: callback names (``--callbacks``).
        options: per-name constructor settings (``--callback-options``).
        context: facts of the run a callback may take as a constructor argument of the same name
            when the user did not set it (``total_epochs``, ``val_set``, ``task``, ``seed``).
        model: when given, each callback's optional ``check(model)`` runs now, before training.

    Raises:
        ConfigError: an unknown callback or setting, a bad value, or a callback that cannot run
            on ``model``; the message names the callback.
    """
    options, context = dict(options or {}), dict(context or {})
    out = []
    for name in names:
        if name not in CALLBACKS:
            raise ConfigError(f"unknown callback {name!r}; known: {sorted(CALLBACKS)}")
        module, cls_name = CALLBACKS[name].split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        params = inspect.signature(cls).parameters
        given = dict(options.get(name) or {})
        unknown = sorted(set(given) - set(params))
        if unknown:
            raise ConfigError(f"--callback-options {name}: unknown setting(s) {unknown}; {name} takes {sorted(params)}")
        kwargs = {**{k: v for k, v in context.items() if k in params}, **given}
        try:
            cb = cls(**kwargs)
            if model is not None and callable(getattr(cb, "check", None)):
                cb.check(model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--callbacks {name}: {e}") from None
        out.append(cb)
    return out


# Keys that may differ when resuming: they change neither the data stream nor the arithmetic.
RESUME_MUTABLE = ("resume", "progress", "kill_after_step", "kill_signal", "num_workers", "device", "log_interval",
                  "out_dir", "threads", "checkpoint_interval", "checkpoint_minutes")
# Keys a resume may change on purpose: more (or fewer) epochs re-target the LR schedule (train.py says so).
RESUME_EXTENDABLE = ("epochs",)


def _is_synthetic(name: str) -> bool:
    return not dataset_entry(name).needs_root


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """Training and validation sets of ``cfg.dataset`` with the config's transforms.

    Synthetic sets are generated at ``image_size`` (``train_samples`` / ``val_samples`` each);
    prepared benchmark sets are read from ``data_root`` and resized to ``image_size`` for
    evaluation (``None`` = native size, the published protocols) and cropped to ``crop_size``
    (default ``image_size``) for training.

    Raises:
        ConfigError: an unknown dataset, a benchmark set without ``data_root`` or with a root
            that is missing or incomplete, or training at native size with augmentation off
            (images of different sizes cannot be batched).
    """

    try:
        entry = dataset_entry(cfg.dataset, cfg.data_root)  # `folder`: task, modalities, splits, stats from its YAML
    except KeyError as e:
        raise ConfigError(f"--dataset: {e.args[0]}") from None
    except (FileNotFoundError, DataError) as e:
        raise ConfigError(f"--data-root {cfg.data_root} (dataset {cfg.dataset!r}): {e}") from None
    synthetic = not entry.needs_root
    stats = entry.stats()
    modalities = entry.modalities
    train_size = cfg.crop_size or cfg.image_size
    if cfg.augment:
        if train_size is None:
            raise ConfigError("augment=true needs crop_size or image_size (the training crop size)")
        train_tf = train_transforms(modalities, size=train_size, scale=cfg.aug_scale, crop=cfg.aug_crop,
                                    rotate=cfg.aug_rotate, stats=stats)
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
        if cfg.data_root is None:
            where = "docs/custom_data.md" if entry.resolve else f"datasets/{cfg.dataset}/README.md"
            raise ConfigError(f"dataset {cfg.dataset!r} needs --data-root (the prepared layout; see {where})")
        for key in ("train_split", "val_split"):
            if getattr(cfg, key) not in entry.splits:
                raise ConfigError(
                    f"dataset {cfg.dataset!r} has no split {getattr(cfg, key)!r} (splits: {list(entry.splits)}); "
                    f"pass --{key.replace('_', '-')} <one of them>"
                )
        try:
            train = create_dataset(cfg.dataset, cfg.data_root, split=cfg.train_split, transforms=train_tf, **kwargs)
            val = create_dataset(cfg.dataset, cfg.data_root, split=cfg.val_split, transforms=val_tf, **kwargs)
        except (FileNotFoundError, DataError) as e:  # a user's data problem: one line, not a traceback
            raise ConfigError(f"--data-root {cfg.data_root} (dataset {cfg.dataset!r}): {e}") from None
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


def _worker_ignores_ctrl_c(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches DataLoader workers too; they leave it to the training process.

    Forked workers would inherit train.py's StopOnSignal handler (each printing the stop
    message again); spawned ones get Python's default, a KeyboardInterrupt that ends torch's
    worker loop, so batches beyond the prefetched ones would fail before the checkpoint. The
    workers still end with the loader. (SIGTERM keeps its default: multiprocessing stops
    daemonic workers with it.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(dataset: Dataset, cfg: TrainConfig, info: DistInfo) -> tuple[DataLoader, EpochSampler]:
    """Loader over :class:`SeededDataset` with a resumable :class:`EpochSampler` (drop_last)."""
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
        worker_init_fn=_worker_ignores_ctrl_c if cfg.num_workers else None,
        # A private generator: creating the iterator draws a seed from it instead of from the
        # global RNG, so a resumed run's global RNG stream matches the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler


def build_eval_loader(dataset: Dataset, cfg: TrainConfig, info: DistInfo) -> DataLoader:
    """Ordered loader; each sample lands on exactly one rank (no padding)."""
    sampler = EpochSampler(len(dataset), shuffle=False, rank=info.rank, world_size=info.world_size, even=False)
    return DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_ignores_ctrl_c if cfg.num_workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def build_model(cfg: TrainConfig, modalities: Sequence[str], num_classes: int) -> nn.Module:
    """``fusionzoo.create_model`` with the config's model, modalities, classes and kwargs.

    Raises:
        ConfigError: an unknown model name (with close matches), ``model_kwargs`` the entry point
            does not take (showing the YAML-parsed mapping), or a model that cannot run on these
            modalities (the message suggests the single-stream alternatives).
    """
    try:
        entry = model_entry(cfg.model)
    except KeyError as e:
        raise ConfigError(f"--model: {e.args[0]} (fusionzoo list prints every name)") from None
    kwargs: dict[str, Any] = dict(cfg.model_kwargs)
    for k in ("num_classes", "modalities"):
        if k in kwargs:
            raise ConfigError(f"model_kwargs must not set {k!r}; use the top-level key {k!r}")
    if cfg.pretrained:
        if isinstance(kwargs.get("pretrained"), str):
            raise ConfigError(f"--pretrained (ImageNet encoders) and model_kwargs pretrained={kwargs['pretrained']!r} "
                              "(released weights) exclude each other; give one")
        kwargs["pretrained"] = True
    if len(modalities) == 1 and entry.fusion in ("middle", "hybrid"):
        raise ConfigError(
            f"{cfg.model} is a {entry.fusion}-fusion model and needs two or more modalities, got {list(modalities)}. "
            f"For a single-modality baseline of the same recipe use --modalities rgb with a single-stream model "
            f"(e.g. --model early_concat_{cfg.model.split('_', 1)[-1]}: one encoder + the same decoder), or keep this "
            f"model and withhold the other stream with --train-missing."
        )
    try:
        model = create_model(cfg.model, num_classes=num_classes, modalities=tuple(modalities), **kwargs)
    except TypeError as e:
        if not cfg.model_kwargs or "keyword argument" not in str(e):
            raise
        # model_kwargs is YAML: show what the entry point received, so '{a:1}' vs '{a: 1}' is visible.
        raise ConfigError(f"model_kwargs (YAML, parsed as {dict(cfg.model_kwargs)!r}) does not fit: {e}") from None
    except (ValueError, KeyError, FileNotFoundError) as e:
        tag = kwargs.get("pretrained")
        if not isinstance(tag, str):
            raise
        # A released-weights tag that conflicts with the data, is unknown, or is not converted yet.
        raise ConfigError(f"model_kwargs pretrained={tag!r}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    check_side_loss(cfg, model)
    return model


def check_side_loss(cfg: TrainConfig, model: nn.Module) -> None:
    """``side_loss_weights`` against the model's side outputs.

    A model with deep supervision declares ``side_strides`` (one stride per side output, the
    order of ``model.side_logits`` after a training-mode forward; e.g. ESANet ``(8, 16, 32)``).

    Raises:
        ConfigError: ``side_loss_weights`` set for a model without side outputs, or with a
            different number of weights than the model has side outputs.

    Warns:
        UserWarning: the model has side outputs but ``side_loss_weights`` is null (not trained).
    """
    strides = tuple(getattr(model, "side_strides", ()))
    weights = cfg.side_loss_weights
    if weights is None:
        if strides and getattr(model, "side_loss_weights", None) is None:  # no reference default either
            warnings.warn(f"{cfg.model} has side outputs at strides {list(strides)} (deep supervision) but "
                          "side_loss_weights is null, so they are not trained; set side_loss_weights to one "
                          f"weight per side output (its zoo card has the reference's) to supervise them", stacklevel=2)
        return
    if not strides:
        raise ConfigError(f"side_loss_weights={list(weights)}: {cfg.model} has no side outputs to supervise; "
                          "set side_loss_weights: null")
    if len(weights) != len(strides):
        raise ConfigError(f"side_loss_weights has {len(weights)} weight(s) {list(weights)} but {cfg.model} has "
                          f"{len(strides)} side outputs (strides {list(strides)}); give one weight per side output")


def build_task(cfg: TrainConfig, model: nn.Module, class_weights: torch.Tensor | None = None) -> Task:
    """The model's :class:`~fusionzoo.tasks.Task` with the config's loss settings.

    Settings left at their defaults are not passed, so a task that has no such setting (a
    detector computes its own loss) only refuses what the config actually asks for.

    Raises:
        ConfigError: the task does not take a setting the config gives (names the key),
            ``class_weighting`` for a task without class weights, ``gate_penalty_weight`` /
            ``gate_lr`` for a model without purification gates, or a model whose task the
            dataset has no targets for (a segmentation model on a detection set).
    """
    options: dict[str, Any] = {}
    if cfg.label_smoothing:
        options["label_smoothing"] = cfg.label_smoothing
    if cfg.side_loss_weights is not None:
        options["side_weights"] = cfg.side_loss_weights
    if cfg.loss_average != "weighted":
        options["average"] = cfg.loss_average
    if class_weights is not None:
        options["class_weights"] = class_weights
    for key in ("gate_penalty_weight", "gate_lr"):
        if getattr(cfg, key) is not None and not hasattr(unwrap_model(model), "gate_parameters"):
            raise ConfigError(f"{key}={getattr(cfg, key)} is for models with purification gates (fusionzoo list "
                              f"'*mim*'); {cfg.model} has none: set {key}: null")
    if cfg.gate_penalty_weight is not None:
        options["gate_penalty_weight"] = cfg.gate_penalty_weight
    try:
        task = get_task(model, **options)
    except ValueError as err:
        raise ConfigError(f"{cfg.model}: {err}") from None
    data_task = dataset_entry(cfg.dataset, cfg.data_root).task  # `folder`: its YAML's task
    if task.name not in data_task:
        raise ConfigError(f"{cfg.model} is a {task.name} model but dataset {cfg.dataset!r} provides {data_task} "
                          f"targets; pick a {data_task} model (fusionzoo list --task {data_task})")
    if cfg.class_weighting != "none" and not task.supports_class_weights:
        raise ConfigError(f"class_weighting={cfg.class_weighting!r}: the {task.name} task of {cfg.model} takes no "
                          "class weights (its loss is its own): set class_weighting: none")
    return task


def class_weights_for(cfg: TrainConfig, train_set: Dataset, num_classes: int, run_dir: Path,
                      device: torch.device) -> torch.Tensor | None:
    """Per-class loss weights of ``class_weighting`` (None for ``none``).

    ``median_frequency`` counts the training labels once (rank 0; cached in
    ``<run>/class_pixel_counts.json``, so a resume does not count again) and every rank gets the
    same weights.
    """
    if cfg.class_weighting == "none":
        return None
    counts = broadcast_object(
        class_pixel_counts(train_set, num_classes, ignore_index=getattr(train_set, "ignore_index", 255),
                           cache=run_dir / "class_pixel_counts.json").to_dict()
        if dist_info().is_main else None
    )
    weights = median_frequency_weights(torch.tensor(counts["class_pixels"]), torch.tensor(counts["image_pixels"]))
    return weights.to(device)


def normalization_of(cfg: TrainConfig, modalities: Sequence[str]) -> dict[str, Any] | None:
    """Per-modality input statistics used for this dataset (stored with saved models)."""
    stats = dataset_entry(cfg.dataset, cfg.data_root).stats()
    stats = _stats_for(stats) if stats is None or isinstance(stats, str) else stats
    return {m: {"mean": list(stats[m].mean), "std": list(stats[m].std)} for m in modalities if m in stats}


def check_run_name(cfg: TrainConfig) -> None:
    """Fail early (before data and model are built) when ``--run-name`` names a used run folder.

    Raises:
        ConfigError: ``out_dir/run_name`` already holds a run.
    """
    if cfg.run_name:
        path = Path(cfg.out_dir) / cfg.run_name
        if (path / "checkpoints").exists() or (path / "config.json").exists():
            raise ConfigError(f"run folder {path} is already used; pass --resume {path} or another --run-name")


def make_run_dir(cfg: TrainConfig) -> Path:
    """``out_dir/run_name`` (default ``<model>-<dataset>-<modalities>-<UTC time>``), created.

    train.py calls it once the configuration, data and model are valid, so a failed start
    leaves no empty folder behind.
    """
    if cfg.resume:
        return resume_run_dir(cfg.resume)
    if cfg.run_name:
        check_run_name(cfg)
        path = Path(cfg.out_dir) / cfg.run_name
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
    """The run folder of ``--resume`` (a run folder, or one of its checkpoint folders).

    Raises:
        ConfigError: saying what is missing: the folder, its ``config.json``, or a complete
            checkpoint (a run stopped before its first checkpoint has nothing to resume).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--resume {path}: no such folder; give a run folder (runs/<run>)")
    for candidate in (p, p.parent, p.parent.parent):
        if (candidate / "config.json").is_file() and (candidate / "checkpoints").is_dir():
            try:
                resolve_checkpoint_dir(candidate / "checkpoints" / "last")
            except CheckpointError:
                break
            return candidate
    run = next((c for c in (p, p.parent, p.parent.parent) if (c / "config.json").is_file()), None)
    if run is None:
        raise ConfigError(
            f"--resume {path}: no config.json there or in its parent folders; give the run folder that "
            "train.py created (runs/<run>, holding config.json and checkpoints/)"
        )
    removed = remove_temp_leftovers(run)  # e.g. the .last.*.tmp/ of a kill during the first checkpoint write
    note = f" (removed {len(removed)} incomplete temp(s) of an interrupted write)" if removed else ""
    raise ConfigError(
        f"--resume {path}: {run / 'config.json'} exists but no complete checkpoint{note} "
        f"({run / 'checkpoints' / 'last' / 'state.json'} is missing): the run stopped before its first checkpoint "
        "(written after checkpoint_minutes, at each epoch end, and on Ctrl-C/SIGTERM). Nothing to resume: "
        f"start it again (remove {run} or pass another --run-name)"
    )


def config_for_resume(cfg: TrainConfig, run_dir: Path, given: Collection[str]) -> TrainConfig:
    """The saved config of ``run_dir`` with the keys the command line may change taken from ``cfg``.

    Args:
        cfg: the command line's config.
        run_dir: the run folder being resumed.
        given: the keys the command line (or a ``--config`` recipe) set, whatever their value
            (``parse_command_line(...).given``): ``--epochs 3`` counts even though 3 is the default.

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
    new = config_to_dict(cfg)
    old = config_to_dict(saved)
    may_change = (*RESUME_MUTABLE, *RESUME_EXTENDABLE)
    changed = [k for k in new if k in given and k not in may_change and new[k] != old[k]]
    if changed:
        diffs = ", ".join(f"{k}: run has {old[k]!r}, given {new[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot change {diffs} when resuming {run_dir} (exact resume); only {list(may_change)} may differ"
        )
    merged = {**old, **{k: new[k] for k in may_change if k in given}}
    for k in ("resume", "kill_after_step", "kill_signal"):  # per invocation, never inherited from the run
        merged[k] = new[k]
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
