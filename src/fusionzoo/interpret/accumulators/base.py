"""The protocol of :func:`fusionzoo.interpret.run`'s metrics: one accumulator per metric.

``run`` streams a dataset once. Per batch it

1. runs the model on the full input, capturing the union of every accumulator's
   :attr:`Needs.taps`, and calls :meth:`MetricAccumulator.update` with a :class:`BatchContext`;
2. runs the removal passes: the ones the accumulator that declares :attr:`Needs.coalitions`
   plans (:meth:`MetricAccumulator.passes`: modality contribution's ``2^M`` coalitions and
   ``M`` permutations), else, when an accumulator declares :attr:`Needs.removal_taps`, one pass
   per removed modality; passes with exactly one modality removed also capture the
   removal taps; every pass goes to :meth:`MetricAccumulator.update_pass`.

Sharded over processes (``run`` under an initialised process group), each process runs the
batches ``b`` with ``b mod W`` equal to its rank. Before any other process updates, the owner of
the first batch hands what that batch fixed (the shifts of the streamed moments, the choices
made on it) to the others (:meth:`MetricAccumulator.shared` / :meth:`MetricAccumulator.adopt`);
a process calls :meth:`MetricAccumulator.skip` for each batch it does not run (to keep random
streams in step), and after the last batch every process sums its state over processes
(:meth:`MetricAccumulator.reduce`), so that ``compute`` gives what one process gives.

After the last batch :meth:`MetricAccumulator.compute` returns the metric's section of the
:class:`~fusionzoo.interpret.api.InterpretResult` (None: absent). An accumulator keeps its
state bounded (streaming sums, never stored activations) and may set :attr:`skipped` (why the
data could not give the metric), :attr:`settings` (what it chose, recorded in the result's
``settings``), :attr:`artifacts` (in-memory extras for plots), :attr:`timings` and :attr:`intervals` (95 % bootstrap intervals
of its numbers from ``BatchContext.weights``: :mod:`fusionzoo.interpret.intervals`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ...taps import TapInfo
from ...tasks import Task, detection_targets
from ..cka import object_rows, reduce_spatial
from ..contribution import StreamingModalityStats
from ..plan import TapPlan

__all__ = ["BatchContext", "MetricAccumulator", "Needs", "Pass", "RunSpec"]


@dataclass(frozen=True)
class Needs:
    """What an accumulator needs from the passes ``run`` makes.

    Attributes:
        taps: taps captured on the full-input pass (``BatchContext.acts``).
        removal_taps: taps captured on every pass with exactly one modality removed.
        coalitions: the accumulator plans the removal passes itself (:meth:`MetricAccumulator.passes`).
    """

    taps: tuple[str, ...] = ()
    removal_taps: tuple[str, ...] = ()
    coalitions: bool = False


@dataclass
class RunSpec:
    """What every accumulator of one run may read (fixed for the run).

    Attributes:
        model: the model (eval mode during the run).
        task: its :class:`~fusionzoo.tasks.Task`.
        modalities: the model's modalities.
        num_classes: the model's ``K``.
        label_classes: classes of the masks (the dataset's ``K`` when it says, else the model's).
        box_classes: detection labels are ``0..box_classes-1`` (box masks add background
            ``box_classes``).
        class_names: class names, when known.
        plan: the taps measured.
        info: tap name -> :class:`~fusionzoo.taps.TapInfo`.
        device: the model's device.
        rows, samples_per_image, sv_labels, sv_stride, policy, empty_policy, stats, perceptual,
        gradcam_images, ignore_index, purity, seed: the options of :func:`~fusionzoo.interpret.run`.
        replicates: Poisson-bootstrap replicates kept by accumulators that give intervals (0: none).
        level: coverage of the intervals (0.95).
        policies: further removal policies that modality contribution measures beside ``policy``.
        policies_auto: the policies were not chosen by the user: ``"missing"`` is kept only where
            the model's missing path differs from zero filling.
        pass_pixels: input pixels of one batched forward of removal passes (None: a forward each).
    """

    model: nn.Module
    task: Task
    modalities: list[str]
    num_classes: int
    label_classes: int
    box_classes: int
    class_names: list[str] | None
    plan: TapPlan
    info: dict[str, TapInfo]
    device: torch.device
    rows: str
    samples_per_image: int
    sv_labels: str
    sv_stride: int | None
    policy: str
    empty_policy: str | None
    stats: StreamingModalityStats | None
    perceptual: bool
    gradcam_images: int
    ignore_index: int
    purity: float
    seed: int
    replicates: int = 0
    level: float = 0.95
    policies: tuple[str, ...] = ()
    policies_auto: bool = False
    pass_pixels: int | None = None


@dataclass
class BatchContext:
    """One batch and the model's full-input pass over it.

    Attributes:
        spec: the run.
        index: batch index.
        batch: the collated batch.
        inputs: modality -> ``(B, C, H, W)`` on the model's device.
        mask: ``(B, H, W)`` labels on the device, when the batch has them.
        targets: the task's targets (:meth:`~fusionzoo.tasks.Task.targets`), None when the batch
            lacks them.
        acts: the captured taps of the full-input pass.
        output: the model's output on the full input.
        weights: ``(R, B)`` float64 Poisson-bootstrap weights of the batch's images
            (:func:`fusionzoo.interpret.intervals.poisson_weights`, drawn by global image index),
            or None when the run keeps no replicates.
        first_image: global index of the batch's first image.
    """

    spec: RunSpec
    index: int
    batch: Mapping[str, Any]
    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor | None
    targets: Any
    acts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    output: Any = None
    weights: torch.Tensor | None = None
    first_image: int = 0
    _boxes: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    _boxes_read: bool = field(default=False, repr=False)
    _rows: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the inputs."""
        return tuple(next(iter(self.inputs.values())).shape[-2:])

    def boxes(self) -> list[dict[str, torch.Tensor]] | None:
        """Ground-truth boxes per image (:func:`fusionzoo.tasks.detection_targets`, CPU, labels
        checked against ``spec.box_classes``), or None when the batch has no ``boxes`` /
        ``labels``. Read on first use only."""
        if not self._boxes_read:
            self._boxes_read = True
            if "boxes" in self.batch and "labels" in self.batch:
                self._boxes = detection_targets(self.batch, "cpu", num_classes=self.spec.box_classes)
                if len(self._boxes) != self.batch_size:
                    raise ValueError(f"batch {self.index} has {len(self._boxes)} box lists for "
                                     f"{self.batch_size} images")
        return self._boxes

    def _object_boxes(self) -> list[dict[str, torch.Tensor]]:
        boxes = self.boxes()
        if boxes is None:
            raise KeyError(f"rows='object' needs ground-truth boxes, but batch {self.index} has no 'boxes' / "
                           f"'labels' (keys {list(self.batch)}); use rows='sample' or 'pool'")
        return boxes

    def to_rows(self, tap: str, x: torch.Tensor) -> torch.Tensor:
        """Example rows ``(N, C)`` of a tap output under the run's row rule (``spec.rows``)."""
        spec = self.spec
        if spec.rows == "object":
            boxes = [t["boxes"].to(spec.device) for t in self._object_boxes()]
            return object_rows(x, boxes, spec.info[tap].reduction)
        return reduce_spatial(x, spec.rows, spec.samples_per_image, spec.seed)

    def rows(self, tap: str) -> torch.Tensor:
        """:meth:`to_rows` of the full-input pass's ``tap`` (computed once)."""
        if tap not in self._rows:
            self._rows[tap] = self.to_rows(tap, self.acts[tap])
        return self._rows[tap]

    @property
    def has_rows(self) -> bool:
        """False for a batch that gives no example rows (``rows="object"`` and no objects)."""
        return self.spec.rows != "object" or any(t["boxes"].shape[0] for t in self._object_boxes())


@dataclass(frozen=True)
class Pass:
    """One removal pass.

    Attributes:
        kept: the modalities kept.
        inputs: the pass's inputs.
        missing: passed as ``model(inputs, missing=missing)``.
        permuted: the modality deranged across the batch (perceptual score), or None.
        source: the name of the accumulator that planned it (``""``: ``run``'s own
            one-modality-removed passes).
        shared: False for a pass only its planner sees (contribution's passes under a removal
            policy other than the run's ``policy``: reliance must not see them).
    """

    kept: frozenset[str]
    inputs: dict[str, torch.Tensor]
    missing: tuple[str, ...] = ()
    permuted: str | None = None
    source: str = ""
    shared: bool = True


class MetricAccumulator(abc.ABC):
    """One metric of :func:`fusionzoo.interpret.run` (module docstring).

    Subclasses set :attr:`name` (the metric's name in ``METRICS`` and its section of the
    result) and :attr:`needs` in ``__init__``.
    """

    name: ClassVar[str]

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.needs = Needs()
        self.skipped: str | None = None
        self.settings: dict[str, Any] = {}
        self.artifacts: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        # path relative to the section -> [lo, hi] (fusionzoo.interpret.intervals), set by compute()
        self.intervals: dict[str, Any] = {}

    @abc.abstractmethod
    def update(self, batch: BatchContext) -> None:
        """Add one batch's full-input pass."""

    def passes(self, batch: BatchContext) -> Iterable[Pass] | None:
        """The removal passes of one batch (accumulators with ``needs.coalitions``); None: none
        this batch (``run`` then makes its own one-modality-removed passes if needed)."""
        return None

    def update_pass(self, batch: BatchContext, p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        """Add one removal pass: its output and the removal taps it captured (if any)."""

    # -- sharding over processes (module docstring) -------------------------------------------
    def shared(self) -> dict[str, Any]:
        """What the first batch of the dataset fixed (shifts, choices), for the other processes."""
        return {}

    def adopt(self, shared: Mapping[str, Any]) -> None:
        """Take :meth:`shared` of the process that ran the first batch (before any update)."""

    def skip(self, index: int, first_image: int, size: int) -> None:
        """Batch ``index`` (``size`` images from global image ``first_image``) runs in another
        process: keep any random stream drawn per batch in step."""

    def reduce(self) -> None:
        """Sum this process's state over the process group, in place
        (:func:`fusionzoo.engine.distributed.all_reduce_sum_`), before :meth:`compute`."""
        raise NotImplementedError(f"the {self.name} accumulator cannot be sharded over processes yet: it has no "
                                  "reduce(); run it in one process")

    @abc.abstractmethod
    def compute(self) -> Any:
        """The metric's section of the result (JSON-able), or None when it has none."""
