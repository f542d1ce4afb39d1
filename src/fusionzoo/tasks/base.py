"""The task protocol: what differs between semantic segmentation and object detection.

The training loop, the evaluation loop, ``train.py`` and ``fusionzoo.interpret`` handle both
tasks through one :class:`Task` object instead of branching on ``model.task``. A task knows

- which part of a collated batch is the target (:meth:`Task.targets`),
- how a training step turns inputs and targets into one scalar loss (:meth:`Task.training_loss`),
- what the model predicts at evaluation time (:meth:`Task.predict`),
- how predictions are scored: an :class:`Evaluator` (``update`` / ``all_reduce`` / ``compute``)
  whose ``compute()`` dict holds the task metric under :attr:`Task.metric` and its per-class
  values under :attr:`Task.per_class_key` (modality contribution scores coalitions with the same
  evaluator), and which of its values an epoch logs (:meth:`Task.log_record`).

Tasks are registered by name (``model.task`` is that name); :func:`get_task` builds one.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Evaluator", "Task", "gate_penalty_term", "get_task", "register_task", "task_names"]


class Evaluator(abc.ABC):
    """A streaming metric over a dataset: ``update`` per batch, ``all_reduce`` once across ranks
    (a no-op without torch.distributed), then ``compute``."""

    @abc.abstractmethod
    def update(self, outputs: Any, targets: Any, batch: Mapping[str, Any] | None = None,
               input_size: tuple[int, int] | None = None) -> None:
        """Add one batch: ``outputs`` as :meth:`Task.predict` returns them, ``targets`` as
        :meth:`Task.targets` returns them; ``batch`` (its ``meta``) and ``input_size`` ``(H, W)``
        for metrics measured in original image coordinates."""

    def all_reduce(self) -> None:
        """Combine the state of every rank (called once, before :meth:`compute`)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, Any]:
        """The metrics of everything added so far."""


class Task(abc.ABC):
    """One learning task; see the module docstring. Options (loss settings) are constructor
    keywords of the subclass."""

    name: ClassVar[str]
    metric: ClassVar[str]  # key of the task metric in Evaluator.compute(), e.g. "miou"
    metric_label: ClassVar[str]  # how people write it, e.g. "mIoU"
    per_class_key: ClassVar[str]  # key of the per-class list in Evaluator.compute()
    target_key: ClassVar[str]  # the batch key that must be present for the targets
    default_rows: ClassVar[str]  # interpret's CKA rows: "sample" or "object"
    supports_tta: ClassVar[bool] = False
    supports_class_weights: ClassVar[bool] = False  # per-class loss weights (``class_weights=``)

    @abc.abstractmethod
    def targets(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Any:
        """The batch's targets on ``device``.

        Raises:
            KeyError: the batch lacks the target keys (names what the batch has).
        """

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], targets: Any,
                      missing: Sequence[str] = ()) -> torch.Tensor:
        """Forward ``model`` (train mode, inside the caller's autocast) and return the scalar loss
        (float32)."""

    @abc.abstractmethod
    def predict(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], missing: Sequence[str] = (),
                **options: Any) -> Any:
        """The model's prediction in eval mode, in the form :meth:`evaluator` consumes."""

    @abc.abstractmethod
    def evaluator(self, num_classes: int, class_names: Sequence[str] | None = None, **options: Any) -> Evaluator:
        """A fresh :class:`Evaluator` of this task's metrics."""

    @abc.abstractmethod
    def log_record(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The values of an evaluation result that an epoch logs, as ``val_<key>``."""


def gate_penalty_term(model: nn.Module, weight: float | None) -> torch.Tensor | None:
    """The gate penalty a training loss adds for a model with purification gates (MIM's L0 term:
    ``weight * model.gate_penalty()`` of the forward pass just run, float32); None for a model
    without gates or a weight of 0.

    Args:
        model: the unwrapped model (``fusionzoo.weights.unwrap_model``).
        weight: the task's setting; None = the model's own ``gate_penalty_weight`` (MIM: 0.1).
    """
    if not hasattr(model, "gate_penalty"):
        return None
    weight = model.gate_penalty_weight if weight is None else weight
    return weight * model.gate_penalty().float() if weight else None


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available to :func:`get_task` under ``cls.name``."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is already registered by {_TASKS[cls.name].__qualname__}")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Names of the registered tasks."""
    return sorted(_TASKS)


def get_task(task: str | nn.Module | Task, **options: Any) -> Task:
    """The :class:`Task` named ``task`` (or ``model.task`` of a model; a Task passes through).

    ``options`` go to the task's constructor (e.g. ``ignore_index``, ``label_smoothing``).

    Raises:
        ValueError: unknown task name (lists the registered ones).
    """
    if isinstance(task, Task):
        return task
    name = task if isinstance(task, str) else getattr(task, "task", "segmentation")
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {task_names()}")
    return _TASKS[name](**options)
