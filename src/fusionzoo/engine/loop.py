"""Training and evaluation loops for fusion models of any task.

The model contract (see ``fusionzoo.models``): ``model(inputs, missing=())`` with ``inputs`` a
dict ``modality -> (B, C_m, H, W)`` float tensor; what it returns, the targets and the loss are
the business of its :class:`~fusionzoo.tasks.Task` (``fusionzoo.tasks.get_task(model)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._json import to_json as _finite  # JSON has no NaN: absent classes are written as null
from ..tasks import Task, get_task
from ..weights import unwrap_model
from .distributed import all_reduce_mean, all_reduce_step, dist_info

__all__ = [
    "Callback",
    "CallbackList",
    "EpochState",
    "MetricsLogger",
    "NonFiniteLossError",
    "StopOnSignal",
    "TrainStepOptions",
    "TrainingInterrupted",
    "autocast_context",
    "evaluate",
    "make_grad_scaler",
    "sample_missing",
    "set_bn_eval",
    "split_batch",
    "train_one_epoch",
]


# ----------------------------------------------------------------------------------------------
# callbacks


class Callback:
    """Hooks for training-time measurements; override what you need.

    ``model`` is always the plain model (unwrapped from DDP / ``torch.compile``), so callbacks
    can use ``model.modality_parameters(m)`` and taps. Gradients seen in
    :meth:`on_after_backward` are already unscaled (fp16) and not yet clipped.
    """

    def on_train_start(self, model: nn.Module) -> None:
        """Called once before the first step (also after a resume)."""

    def on_batch_start(self, batch: Mapping[str, Any]) -> None:
        """Optional: called with each training batch (CPU tensors) before the forward pass."""

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Called after every backward pass, before clipping and the optimizer step.

        Args:
            step: the global optimizer step about to be taken (0-based).
            epoch: the current epoch (0-based).
        """

    def on_step_end(self, model: nn.Module, step: int, epoch: int) -> None:
        """Optional: called after the optimizer step (the weights are updated) with the same
        ``step`` and ``epoch`` as :meth:`on_after_backward`."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        """Called after each epoch (after evaluation when it ran) with that epoch's log record."""

    def records(self) -> list[dict[str, Any]]:
        """Optional: records made since the last call, appended to ``metrics.jsonl`` by the
        training loop (after every step) and by ``train.py`` (after :meth:`on_epoch_end`). Each
        has a ``kind`` and a ``scope``: ``"step"`` records carry the ``step`` count after their
        update (as ``kind: train`` records do), ``"epoch"`` records their ``epoch``; a resume
        drops those after its checkpoint by that key."""
        return []

    def on_train_end(self, model: nn.Module) -> None:
        """Optional: called once after the last epoch (release hooks here)."""

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Optional: parameters the callback trains beside the model's (e.g. the unimodal heads
        of :class:`fusionzoo.interpret.kgs.KGSCallback`), made on ``model``'s device on the first
        call and the same objects on every later call. The optimizer must hold them:
        ``train.py`` builds it with ``build_optimizer(..., extra=callbacks.parameters(model))``
        before any resume, so their optimizer state and schedule are checkpointed like the
        model's; :func:`train_one_epoch` refuses to train when the optimizer lacks them. Their
        values travel in :meth:`state_dict`."""
        return []

    def extra_loss(self, model: nn.Module, targets: Any, missing: Sequence[str]) -> torch.Tensor | None:
        """Optional: a scalar added to the task's training loss of this step, before the
        non-finite check and the backward pass (inside the step's autocast). Called once per
        step right after the training forward, so tap hooks armed in :meth:`on_batch_start`
        have seen that forward with its autograd graph. ``missing``: the modalities withheld on
        this step (modality dropout, ``train_missing``). None: nothing to add."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state stored in checkpoints (and in the run's callbacks.json)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output on resume (optional)."""


class CallbackList(Callback):
    """Fans every hook out to several callbacks; states are keyed by position and class name."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            for name in ("on_train_start", "on_after_backward", "on_epoch_end", "state_dict"):
                if not callable(getattr(cb, name, None)):
                    raise TypeError(f"callback {type(cb).__name__} lacks the method {name}()")

    def _key(self, i: int, cb: Callback) -> str:
        return f"{i}:{type(cb).__name__}"

    def on_train_start(self, model: nn.Module) -> None:
        for cb in self.callbacks:
            cb.on_train_start(model)

    def on_batch_start(self, batch: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            if callable(getattr(cb, "on_batch_start", None)):  # optional hook
                cb.on_batch_start(batch)

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        for cb in self.callbacks:
            cb.on_after_backward(model, step, epoch)

    def on_step_end(self, model: nn.Module, step: int, epoch: int) -> None:
        for cb in self.callbacks:
            if callable(getattr(cb, "on_step_end", None)):  # optional hook
                cb.on_step_end(model, step, epoch)

    def on_train_end(self, model: nn.Module) -> None:
        for cb in self.callbacks:
            if callable(getattr(cb, "on_train_end", None)):  # optional hook
                cb.on_train_end(model)

    def records(self) -> list[dict[str, Any]]:
        return [r for cb in self.callbacks if callable(getattr(cb, "records", None)) for r in cb.records()]

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for cb in self.callbacks if callable(getattr(cb, "parameters", None)) for p in cb.parameters(model)]

    def extra_loss(self, model: nn.Module, targets: Any, missing: Sequence[str]) -> torch.Tensor | None:
        terms = [cb.extra_loss(model, targets, missing) for cb in self.callbacks
                 if callable(getattr(cb, "extra_loss", None))]  # optional hook
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def check(self, model: nn.Module) -> None:
        """Each callback's optional ``check(model)``: raises ``ValueError`` naming the callback
        when it cannot run on ``model`` (called before training starts)."""
        for cb in self.callbacks:
            if callable(getattr(cb, "check", None)):
                cb.check(model)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, logs)

    def state_dict(self) -> dict[str, Any]:
        return {self._key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for i, cb in enumerate(self.callbacks):
            key = self._key(i, cb)
            if key in state and callable(getattr(cb, "load_state_dict", None)):
                cb.load_state_dict(state[key])


# ----------------------------------------------------------------------------------------------
# precision


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in (``bf16``, ``fp16``) on CUDA (bf16 also on CPU); else a no-op."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be off, bf16 or fp16, got {amp!r}")
    if device.type != "cuda" and amp == "fp16":
        return contextlib.nullcontext()  # fp16 autocast on CPU is slow and unsupported for many ops
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA (fp16 underflows without loss scaling); ``None`` otherwise."""
    if amp == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    if amp == "fp16":
        warnings.warn("amp='fp16' needs CUDA; training in float32 on this device", stacklevel=2)
    return None


# ----------------------------------------------------------------------------------------------
# batches


def split_batch(
    batch: Mapping[str, Any],
    modalities: Sequence[str],
    device: torch.device,
    channels_last: bool = False,
) -> dict[str, torch.Tensor]:
    """Model inputs ``{m: (B, C_m, H, W)}`` on ``device`` (the targets: ``Task.targets(batch)``).

    Raises:
        KeyError: a modality the model needs is not in the batch (names what the batch has).
    """
    missing = [m for m in modalities if m not in batch]
    if missing:
        have = sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor))
        raise KeyError(f"batch lacks modality {missing} needed by the model; the batch has {have}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {m: batch[m].to(device, non_blocking=True).contiguous(memory_format=fmt) for m in modalities}


def sample_missing(
    modalities: Sequence[str], candidates: Sequence[str] | None, p: float, step: int, seed: int
) -> tuple[str, ...]:
    """Modality dropout: with probability ``p`` one candidate modality is dropped for this batch.

    Drawn from a generator seeded by ``(seed, step)`` rather than the global RNG, so it is the same
    on every rank (DDP needs one decision per global batch) and after a resume.

    Returns:
        ``()`` or a 1-tuple naming the dropped modality.
    """
    if p <= 0 or len(modalities) < 2:
        return ()
    pool = list(modalities[1:]) if candidates is None else list(candidates)
    if not pool:
        return ()
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if float(torch.rand((), generator=g)) >= p:
        return ()
    return (pool[int(torch.randint(len(pool), (), generator=g))],)


def set_bn_eval(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode (frozen running statistics; affine parameters still train)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------------------------
# logging


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl``; mirrors scalars to TensorBoard.

    Only rank 0 writes (``enabled=False`` elsewhere). TensorBoard is used when
    ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is installed).
    """

    def __init__(self, run_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.path = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tb = None
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:  # append + flush: a killed run keeps every finished line
            f.write(json.dumps(_finite(record)) + "\n")
            f.flush()
        if self.tb is not None:
            step = int(record.get("step", 0))
            prefix = record.get("kind", "log")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------
# training


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf training loss, raised before backward and the optimizer step.

    The weights, optimizer state and BatchNorm running statistics are left as they were after
    the previous step (the statistics that this batch's forward pass updated are restored), so
    the model in memory and any checkpoint written afterwards are clean.
    """


def _norm_statistics(model: nn.Module) -> list[torch.Tensor]:
    """BatchNorm running statistics that a train-mode forward pass updates in place."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)  # one fused call per step instead of ~3 per BatchNorm layer


def _non_finite_message(loss_value: float, batch: Mapping[str, Any], inputs: Mapping[str, torch.Tensor],
                        state: EpochState, rank: int, world_size: int) -> str:
    """Which samples of the batch carry NaN/inf in which modality, for the error message."""
    meta = batch.get("meta")
    n = int(next(iter(inputs.values())).shape[0])
    ids = [m.get("id", i) if isinstance(m, Mapping) else i for i, m in enumerate(meta)] if meta else list(range(n))
    bad: dict[Any, list[str]] = {}
    for mod, x in inputs.items():
        finite = torch.isfinite(x.detach()).flatten(1).all(1).cpu().tolist()
        for sid, ok in zip(ids, finite):
            if not ok:
                bad.setdefault(sid, []).append(mod)
    where = f" on rank {rank} of {world_size}" if world_size > 1 else ""
    culprit = (
        "non-finite values in the inputs of " + ", ".join(f"{sid!r} ({'+'.join(m)})" for sid, m in bad.items())
        + ": repair or drop these samples"
        if bad else
        "the inputs are finite: lower lr, enable grad_clip, or use amp=bf16 instead of fp16"
    )
    return (
        f"non-finite training loss {loss_value} at epoch {state.epoch}, step {state.global_step}{where}, "
        f"batch of sample ids {ids}; {culprit}. Stopped before the optimizer step: weights, optimizer state "
        f"and BatchNorm statistics are those after step {state.global_step}"
    )


def _check_callback_parameters(cb: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` when a callback's own parameters (:meth:`Callback.parameters`) are not
    in ``optimizer``: they would get gradients and never change."""
    if not callable(getattr(cb, "parameters", None)):
        return
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for c in getattr(cb, "callbacks", [cb]):
        stray = [p for p in (c.parameters(model) if callable(getattr(c, "parameters", None)) else []) if id(p) not in held]
        if stray:
            raise ValueError(f"callback {type(c).__name__} trains {len(stray)} parameter tensor(s) of its own that the "
                             "optimizer does not hold; build the optimizer with them: "
                             "build_optimizer(model, ..., extra=callbacks.parameters(model)) (train.py does)")


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing its checkpoint; ``exit_status`` = 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum  # the shell's convention for "killed by signal N"


class StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step.

    Use as a context manager around the training loop and pass the instance as
    ``train_one_epoch(stop_requested=...)``. A second signal gets the previous handler at once
    (Ctrl-C twice: KeyboardInterrupt, no checkpoint). Outside the main thread signals cannot be
    caught; then this does nothing.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing checkpoints/last "
              "(send it again to stop at once, without a checkpoint)", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:  # noqa: PYI034  (typing.Self needs Python 3.11; we support 3.10)
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


class EpochState:
    """Position inside an epoch, saved in checkpoints so a resume continues with the next batch."""

    def __init__(self, epoch: int = 0, batches_done: int = 0, global_step: int = 0,
                 loss_sum: float = 0.0, images: int = 0) -> None:
        self.epoch = epoch
        self.batches_done = batches_done
        self.global_step = global_step
        self.loss_sum = loss_sum
        self.images = images

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochState:
        return cls(**{k: d[k] for k in ("epoch", "batches_done", "global_step", "loss_sum", "images")})


@dataclasses.dataclass(frozen=True)
class TrainStepOptions:
    """How :func:`train_one_epoch` takes each step: precision, memory format, clipping,
    BatchNorm, modality dropout, logging. The defaults train in float32 with nothing withheld;
    ``train.py`` fills every field from the run's ``TrainConfig`` (same names, except
    ``dropout_candidates`` = ``modality_dropout_candidates`` and ``always_missing`` = ``train_missing``).

    Attributes:
        amp: ``off``, ``bf16`` or ``fp16`` (:func:`autocast_context`; fp16 with a GradScaler).
        channels_last: inputs (and the model, set by the caller) in channels-last memory format.
        grad_clip: max global gradient norm (None: no clipping; the norm is then not logged).
        freeze_bn: BatchNorm layers stay in eval mode (running statistics frozen).
        modality_dropout: probability per batch of passing ``missing=(m,)`` for one modality
            (:func:`sample_missing`, seeded by ``(seed, global step)``).
        dropout_candidates: the modalities dropout may drop (None: every one but the first).
        always_missing: modalities withheld on every batch (``train_missing``).
        seed: of the modality-dropout draws.
        log_interval: a ``kind: train`` record every this many optimizer steps.
        progress: a tqdm bar (rank 0).
    """

    amp: str = "off"
    channels_last: bool = False
    grad_clip: float | None = None
    freeze_bn: bool = False
    modality_dropout: float = 0.0
    dropout_candidates: Sequence[str] | None = None
    always_missing: Sequence[str] = ()
    seed: int = 0
    log_interval: int = 10
    progress: bool = False


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    modalities: Sequence[str],
    device: torch.device,
    state: EpochState,
    num_batches: int,
    task: Task | str | None = None,
    options: TrainStepOptions = TrainStepOptions(),
    scaler: torch.amp.GradScaler | None = None,
    callbacks: Callback | None = None,
    logger: MetricsLogger | None = None,
    after_step: Callable[[EpochState], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (which already skips the batches ``state`` says are done).

    Args:
        model: the (possibly DDP / compiled) model in any mode; set to train mode here.
        loader: yields batches ``{modality: (B, C, H, W), <the task's targets>, ...}``.
        state: epoch position; updated in place after every step (a checkpoint saved from
            ``after_step`` therefore resumes at the next batch).
        num_batches: total batches of this epoch (for the progress bar and the step cap).
        task: the :class:`~fusionzoo.tasks.Task` (or its name; default ``get_task(model)``) whose
            ``targets`` and ``training_loss`` make each step's loss (segmentation: cross-entropy
            on ``batch["mask"]``; detection: the detector's own loss dict, summed).
        options: precision, clipping, BatchNorm, modality dropout and logging of each step.
        scaler: the fp16 GradScaler (:func:`make_grad_scaler`), or None.
        callbacks: ``on_batch_start`` / ``extra_loss`` / ``on_after_backward`` / ``on_step_end``
            hooks; their ``records()`` go to ``logger`` after every step. Their own
            ``parameters(model)`` must be in ``optimizer`` (else ``ValueError``).
        logger: receives a ``kind: train`` record every ``options.log_interval`` steps.
        after_step: called after every optimizer step with the updated ``state`` (checkpoints).
        stop_requested: polled once per step (e.g. a SIGINT flag); when any rank says so, the
            epoch ends after this step's ``after_step`` and the result has ``interrupted``.

    Returns:
        ``{"loss": mean training loss over the epoch (all ranks), "img_per_s": throughput,
        "interrupted": 1.0 if stop_requested ended the epoch early else 0.0}``. Logged per-step
        losses are means over all ranks (one small all-reduce per step under DDP).

    Raises:
        NonFiniteLossError: a NaN/inf loss on any rank, before backward; names the batch's
            sample ids and the modalities with non-finite inputs.
    """
    info = dist_info()
    plain = unwrap_model(model)
    task = get_task(task if task is not None else plain)
    model.train()
    if options.freeze_bn:
        set_bn_eval(model)
    cb = callbacks or Callback()
    _check_callback_parameters(cb, plain, optimizer)
    bar = tqdm(total=num_batches, initial=state.batches_done, disable=not (options.progress and info.is_main),
               desc=f"epoch {state.epoch}", dynamic_ncols=True, leave=False)
    t_epoch = time.perf_counter()
    images_this_call = 0
    interrupted = False
    norm_stats = _norm_statistics(plain)  # snapshot before each forward, restored on a NaN loss
    norm_backup = [b.clone() for b in norm_stats]
    for batch in loader:
        if state.batches_done >= num_batches:
            break
        t0 = time.perf_counter()
        inputs = split_batch(batch, modalities, device, options.channels_last)
        targets = task.targets(batch, device)
        cb.on_batch_start(batch)
        _copy_all(norm_backup, norm_stats)
        missing = tuple(options.always_missing)
        pool = [m for m in (options.dropout_candidates or modalities[1:]) if m not in missing]
        if len(modalities) - len(missing) >= 2:  # dropout must leave a modality to train on
            missing += sample_missing(modalities, pool, options.modality_dropout, state.global_step, options.seed)
        with autocast_context(device, options.amp):
            loss = task.training_loss(model, inputs, targets, missing)
            extra = cb.extra_loss(plain, targets, missing) if callable(getattr(cb, "extra_loss", None)) else None
            if extra is not None:  # a callback's loss terms (Callback.extra_loss), e.g. KGS guidance
                loss = loss + extra
        # One host sync per step: the loss averaged over ranks, and whether any rank must stop.
        loss_value, stop = all_reduce_step(loss, bool(stop_requested and stop_requested()), device)
        if not math.isfinite(loss_value):
            _copy_all(norm_stats, norm_backup)  # this batch's forward already moved the BN statistics
            raise NonFiniteLossError(_non_finite_message(float(loss.detach()), batch, inputs, state,
                                                         info.rank, info.world_size))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # callbacks and clipping see true gradient magnitudes
        else:
            loss.backward()
        cb.on_after_backward(plain, state.global_step, state.epoch)
        grad_norm = None
        if options.grad_clip is not None:
            # foreach: one multi-tensor norm instead of one per parameter (bit-identical result).
            grad_norm = float(torch.nn.utils.clip_grad_norm_(plain.parameters(), options.grad_clip, foreach=True))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        cb.on_step_end(plain, state.global_step, state.epoch)
        for rec in cb.records():  # training-time measurements (fusionzoo.interpret.cooperation); drained always
            if logger is not None:
                logger.log(rec)
        batch_images = int(next(iter(inputs.values())).shape[0]) * info.world_size
        state.global_step += 1
        state.batches_done += 1
        state.loss_sum += loss_value * batch_images
        state.images += batch_images
        images_this_call += batch_images
        dt = time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{batch_images / max(dt, 1e-9):.1f}")
        bar.update(1)
        if logger is not None and state.global_step % options.log_interval == 0:
            rec = {"kind": "train", "epoch": state.epoch, "step": state.global_step, "loss": loss_value,
                   "lr": lr, "img_per_s": batch_images / max(dt, 1e-9)}
            if missing:
                rec["missing"] = list(missing)
            if grad_norm is not None:
                rec["grad_norm"] = grad_norm
            logger.log(rec)
        if after_step is not None:
            after_step(state)
        if stop:
            interrupted = True
            break
    bar.close()
    elapsed = time.perf_counter() - t_epoch
    mean_loss = state.loss_sum / max(state.images, 1)
    return {
        "loss": all_reduce_mean(mean_loss, device if info.distributed and device.type == "cuda" else "cpu"),
        "img_per_s": images_this_call / max(elapsed, 1e-9),
        "interrupted": float(interrupted),
    }


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    *,
    modalities: Sequence[str],
    num_classes: int,
    device: torch.device,
    task: Task | str | None = None,
    missing: Sequence[str] = (),
    tta: bool = False,
    tta_scales: Sequence[float] = (0.75, 1.0, 1.25),
    tta_flip: bool = True,
    amp: str = "off",
    channels_last: bool = False,
    class_names: list[str] | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """The task's metrics over ``loader`` (its :class:`~fusionzoo.tasks.Evaluator`), reduced across ranks.

    Args:
        task: a :class:`~fusionzoo.tasks.Task` or its name; default ``get_task(model)``.
        missing: modalities the model must treat as absent (``model(x, missing=...)``), for the
            missing-modality evaluation; the inputs still carry them, the model ignores them.
        tta: multi-scale (``tta_scales``) + flip (``tta_flip``) test-time augmentation
            (segmentation only: other tasks raise ``ValueError``).

    Returns:
        The evaluator's ``compute()`` dict (segmentation: ``miou``, ``pixel_acc``, ``iou``, ...,
        ``loss``, NaN under TTA; detection: ``ap``, ``ap50``, ``ap75``, ``coco``, ``images`` and
        for KAIST ``mr2*``) plus ``missing``.
    """
    task = get_task(task if task is not None else unwrap_model(model))
    if tta and not task.supports_tta:
        raise ValueError(f"tta (multi-scale + flip) is implemented for segmentation only, not {task.name}")
    info = dist_info()
    was_training = model.training
    model.eval()
    options = {"tta": tta, "tta_scales": tuple(tta_scales), "tta_flip": tta_flip} if tta else {}
    evaluator = task.evaluator(num_classes, class_names, **options)
    for batch in tqdm(loader, disable=not (progress and info.is_main), desc=desc, leave=False, dynamic_ncols=True):
        inputs = split_batch(batch, modalities, device, channels_last)
        targets = task.targets(batch, device)
        with autocast_context(device, amp):
            outputs = task.predict(model, inputs, missing, **options)
        evaluator.update(outputs, targets, batch, tuple(next(iter(inputs.values())).shape[-2:]))
    evaluator.all_reduce()
    out = evaluator.compute()
    out["missing"] = list(missing)
    if was_training:
        model.train()
    return out
