"""Interpret a training run folder: its best weights, its validation set, its training history.

A run folder is what ``train.py`` writes: ``config.json`` (the resolved training config),
``best/`` (``save_pretrained`` weights of the best validation epoch), ``callbacks.json`` and
``checkpoints/last/state.json`` (callback states, including :class:`ModalityBalanceCallback`).

>>> from fusionzoo.interpret.runs import interpret_run
>>> result = interpret_run("runs/esanet_resnet18-synthetic_rgbd-...")
>>> from fusionzoo.interpret.report import report_run                # interpret + write the report
>>> files = report_run("runs/esanet_resnet18-synthetic_rgbd-...")    # -> <run>/report/report.html
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.builders import build_datasets
from ..engine.config import config_from_dict
from ..hub import from_pretrained
from .api import METRICS, InterpretResult, run
from .callbacks import ModalityBalanceCallback
from .contribution import task_for
from .cooperation import RECORD_KINDS

__all__ = ["check_model_data", "find_weights", "interpret_run", "is_pretrained_dir", "load_run", "log_records", "record_run",
           "run_config", "training_history", "validation_set"]

WEIGHT_DIRS = ("best", "pretrained", "final")


def is_pretrained_dir(path: str | Path) -> bool:
    """True for a folder written by ``save_pretrained`` (its config.json has format 'fusionzoo')."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == "fusionzoo"
    except (OSError, json.JSONDecodeError):
        return False


def find_weights(run_dir: str | Path) -> Path:
    """The ``save_pretrained`` folder of a run (``best/``, else ``pretrained/`` or ``final/``).

    Raises:
        FileNotFoundError: none of them exists.
    """
    run_dir = Path(run_dir)
    for name in WEIGHT_DIRS:
        if is_pretrained_dir(run_dir / name):
            return run_dir / name
    raise FileNotFoundError(f"{run_dir}: no trained weights found (expected one of {list(WEIGHT_DIRS)} with a "
                            "config.json written by save_pretrained, as train.py writes best/)")


def training_history(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's training-time measurements, or None when it has none.

    - The :class:`ModalityBalanceCallback` state (``callbacks.json``, else the last checkpoint's
      trainer state) at the top level, as before: ``steps``, ``epochs``, ``modalities``, ...;
    - ``"callbacks"``: every other callback state by its ``state_key`` (``ogm_ge``,
      ``grad_direction``, ``learning_speed``, ``epoch_interpret``: settings and per-epoch summaries);
    - ``"records"``: the ``metrics.jsonl`` lines of the cooperation callbacks by kind
      (:data:`~fusionzoo.interpret.cooperation.RECORD_KINDS`: per-step gradient directions and learning
      speeds, per-epoch interpretation), what :mod:`.training_report` plots.

    States are recognised by the key each callback writes into them (``state["state_key"]``), not
    by how the trainer names its entry."""
    run_dir = Path(run_dir)
    states: dict[str, Any] = {}
    for path in (run_dir / "callbacks.json", run_dir / "checkpoints" / "last" / "state.json"):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if path.name == "state.json":
            data = (data.get("trainer") or {}).get("callbacks") or {}
        for value in data.values():
            if isinstance(value, dict) and value.get("state_key"):
                states.setdefault(value["state_key"], value)
        if any(isinstance(v, dict) and "state_key" not in v for v in data.values()):
            warnings.warn(f"{path}: callback states without a 'state_key' (written by an older fusionzoo); "
                          f"no {ModalityBalanceCallback.state_key!r} history is read from it", stacklevel=2)
        if states:
            break  # callbacks.json is the finished run's; the checkpoint only stands in for it
    records = log_records(run_dir, RECORD_KINDS)
    history = dict(states.pop(ModalityBalanceCallback.state_key, {}))
    if states:
        history["callbacks"] = states
    if records:
        history["records"] = records
    return history or None


def log_records(run_dir: str | Path, kinds: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The run's ``metrics.jsonl`` records of the given ``kind`` values, by kind, in order ({} without a log)."""
    records: dict[str, list[dict[str, Any]]] = {}
    log = Path(run_dir) / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(rec, dict) and rec.get("kind") in kinds:
                records.setdefault(rec["kind"], []).append(rec)
    return records


def run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's training config as a dict (None when the folder has none)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file() or is_pretrained_dir(run_dir):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def validation_set(run_cfg: dict[str, Any]):
    """The run's validation set, built exactly as training built it."""
    saved = {k: v for k, v in run_cfg.items() if not k.startswith("_")}
    cfg = config_from_dict(saved, None, where="run config.json")
    _, val = build_datasets(cfg)
    return val


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, Any, dict | None]:
    """``(model, validation set, training history)`` of a run folder.

    Args:
        run_dir: the folder ``train.py`` wrote.
        device: where to put the model (default: CUDA when available).
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg is None:
        raise FileNotFoundError(f"{run_dir}/config.json (the training config written by train.py) is missing")
    model = from_pretrained(find_weights(run_dir))
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), validation_set(cfg), training_history(run_dir)


def check_model_data(model: nn.Module, dataset: Any, where: str = "the data") -> None:
    """Refuse data a model cannot be interpreted on, before any batch runs.

    Raises:
        ValueError: the data lacks one of the model's modalities, or (segmentation) its class
            count differs from the model's; the message names both and what to do.
    """
    name = (getattr(model, "config", None) or {}).get("name", type(model).__name__)
    have = list(getattr(dataset, "modalities", None) or [])
    missing = [m for m in model.modalities if have and m not in have]
    if missing:
        raise ValueError(f"{name} takes {'+'.join(model.modalities)} but {where} provides {'+'.join(have)} "
                         f"(no {', '.join(missing)}); interpret it on data with its modalities")
    data_k = getattr(dataset, "num_classes", None)
    if data_k is not None and task_for(model, 255).name == "segmentation" and int(data_k) != int(model.num_classes):
        raise ValueError(f"{name} predicts {model.num_classes} classes but {where} has {data_k}; interpret it on "
                         "data with its class set (--dataset / --data-root of the data it was trained on)")


def record_run(result: InterpretResult, run_dir: str | Path | None, run_cfg: dict[str, Any] | None) -> None:
    """Record which run a result was measured on (``settings["run"]``: its folder and training
    config), so :mod:`.compare` can group seeds of one recipe and find its references."""
    if run_cfg is not None:
        result.settings["run"] = {"dir": str(run_dir) if run_dir is not None else None,
                                  "config": {k: v for k, v in run_cfg.items() if not k.startswith("_")}}


def interpret_run(run_dir: str | Path, metrics: Sequence[str] = METRICS, device: str | torch.device | None = None,
                  **run_kwargs: Any) -> InterpretResult:
    """:func:`fusionzoo.interpret.run` on a run's best weights and validation set, with the
    run's training history attached (``result.training``) and its training config recorded
    (``result.settings["run"]``, :func:`record_run`)."""
    model, val, history = load_run(run_dir, device)
    check_model_data(model, val, f"{run_dir}'s validation set")
    result = run(model, val, metrics=metrics, **run_kwargs)
    result.training = history
    record_run(result, run_dir, run_config(run_dir))
    return result
