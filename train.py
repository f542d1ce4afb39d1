#!/usr/bin/env python
"""Train and evaluate a fusionzoo model (segmentation or detection); one script for CPU, GPU and torchrun.

    python train.py                                   # embedded default: ESANet-ResNet18, synthetic RGB-D, CPU
    python train.py --train-missing depth             # the same recipe on RGB alone (depth withheld)
    python train.py --config zoo/cmx_resnet50/nyuv2.yaml --data-root datasets/nyuv2
    torchrun --nproc-per-node 8 train.py --config zoo/cmx_resnet50/nyuv2.yaml --data-root ...
    python train.py --resume runs/<run>               # continue exactly where a run stopped
    python train.py --resume runs/<run> --epochs 6    # extend a finished run (the LR schedule is re-targeted)

Every field of ``fusionzoo.engine.config.TrainConfig`` is a flag (``python train.py --help``).
A run folder holds ``config.json`` (the resolved config), ``metrics.jsonl``, ``checkpoints/last``
(full training state, safetensors + JSON), ``best/`` (``fz.from_pretrained``-loadable weights of
the best validation epoch) and ``summary.json``. The folder is created once the configuration,
data and model are valid. Ctrl-C or SIGTERM finishes the current step, writes ``checkpoints/last``
and exits with 130 / 143. User errors print one line and exit with 2 (``--debug``: traceback).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fusionzoo.cli import run_command
from fusionzoo.engine.builders import (
    build_callbacks,
    build_datasets,
    build_eval_loader,
    build_model,
    build_task,
    build_train_loader,
    check_run_name,
    class_weights_for,
    config_for_resume,
    find_comparable_runs,
    make_run_dir,
    normalization_of,
    resolve_modalities,
    resume_run_dir,
)
from fusionzoo.engine.checkpoint import load_checkpoint, remove_temp_leftovers, save_checkpoint
from fusionzoo.engine.config import ConfigError, TrainConfig, parse_command_line, write_config
from fusionzoo.engine.distributed import (
    DistInfo,
    EpochSampler,
    all_reduce_step,
    auto_threads,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from fusionzoo.engine.loop import (
    Callback,
    CallbackList,
    EpochState,
    MetricsLogger,
    StopOnSignal,
    TrainingInterrupted,
    TrainStepOptions,
    evaluate,
    make_grad_scaler,
    train_one_epoch,
)
from fusionzoo.engine.optim import build_optimizer, build_scheduler, retarget_schedule
from fusionzoo.engine.prerun import check_first_step, discard_unstarted_run
from fusionzoo.engine.sync_bn import convert_sync_batchnorm
from fusionzoo.files import atomic_write_bytes
from fusionzoo.hub import save_pretrained
from fusionzoo.interpret.report import report_run
from fusionzoo.tasks import Task, get_task


def main(argv: list[str] | None = None, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run training as configured by ``argv`` (``sys.argv[1:]`` when None); returns the summary."""
    t_start = time.perf_counter()
    cfg, card, given = parse_command_line(argv)
    info, device = init_distributed(cfg.device)
    cfg, run_dir = setup(cfg, given, info)
    data = load_data(cfg, info)
    model, plain, task = build_model_and_task(cfg, data, info, device)
    # Training-time measurements and remedies (--callbacks, --callback-options), checked against the model before
    # the run folder exists; the optimizer also trains the callbacks' own parameters (KGS's unimodal heads).
    context = {"total_epochs": cfg.epochs, "val_set": data.val_loader.dataset, "task": task, "seed": cfg.seed}
    hooks = CallbackList([*build_callbacks(cfg.callbacks, cfg.callback_options, context=context, model=plain),
                          *(callbacks or [])])
    optimizer, scheduler, scaler = build_optimization(cfg, plain, data, device, extra=hooks.parameters(plain))
    pre_run_check(cfg, data, plain, task, device)
    if run_dir is None:
        run_dir = Path(broadcast_object(str(make_run_dir(cfg)) if info.is_main else None))
    run = Run(cfg, info, device, run_dir, data, model, plain, task, optimizer, scheduler, scaler, hooks, t_start)
    try:
        start_or_resume(run, card)
        train(run)
    except BaseException as err:
        if info.is_main:  # a fresh run that failed before its first step leaves no folder behind
            run.logger.close()
            discard_unstarted_run(run.run_dir, fresh=not cfg.resume, steps_done=run.state.global_step, error=err)
        raise
    final = final_evaluation(run)
    summary = summarize(run, final)
    # The process group goes first: interpret.run under an initialised group shards the data over
    # every process, and only process 0 writes the report.
    cleanup_distributed()
    if info.is_main and cfg.report:
        # Interpretation (fusionzoo.interpret): CKA, semantic variance, modality contribution (mIoU,
        # or COCO AP for detectors), gradient balance, Grad-CAM of the best weights on the val split.
        files = report_run(run.run_dir, device=device)
        print(f"interpretability report: {files['report']}")
    return summary


# 1. Configuration: defaults <- YAML recipe <- command line; a resume takes the run's own config (plus
# the keys given on this command line that may change: see builders.RESUME_MUTABLE).
def setup(cfg: TrainConfig, given: set[str], info: DistInfo) -> tuple[TrainConfig, Path | None]:
    """The run's final config and, for ``--resume``, its folder (a fresh run's folder is made
    once configuration, data and model are valid: :func:`start_or_resume`); threads and seeds."""
    run_dir = resume_run_dir(cfg.resume) if cfg.resume else None
    if run_dir is not None:
        cfg = config_for_resume(cfg, run_dir, given)
    else:
        check_run_name(cfg)
    if cfg.threads is None:  # resolve "the free cores" once; the run's config (and a resume) keeps the number
        cfg = dataclasses.replace(cfg, threads=broadcast_object(auto_threads() if info.is_main else None))
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    return cfg, run_dir


# 2. Data.
class Data(NamedTuple):
    """The run's loaders and what the model is built for. (A NamedTuple, not a dataclass: tests
    load this script with importlib without registering it in sys.modules, which dataclasses need.)"""

    modalities: tuple[str, ...]
    num_classes: int
    class_names: list[str] | None  # None unless the dataset names exactly num_classes classes
    train_loader: DataLoader
    sampler: EpochSampler
    val_loader: DataLoader
    steps_per_epoch: int
    train_set: Dataset  # for statistics of the training labels (class weights)


def load_data(cfg: TrainConfig, info: DistInfo) -> Data:
    """Datasets, modalities, classes and loaders (this rank's share)."""
    train_set, val_set = build_datasets(cfg)
    modalities = resolve_modalities(cfg, train_set)
    num_classes = cfg.num_classes or train_set.num_classes
    if num_classes < train_set.num_classes:
        raise ConfigError(f"num_classes={num_classes} is below the dataset's {train_set.num_classes} classes")
    class_names = list(train_set.classes) if len(train_set.classes) == num_classes else None
    train_loader, sampler = build_train_loader(train_set, cfg, info)
    val_loader = build_eval_loader(val_set, cfg, info)
    steps_per_epoch = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={cfg.batch_size} x {info.world_size} process(es) exceeds the {len(train_set)} "
            "training samples: no full batch per epoch"
        )
    return Data(modalities, num_classes, class_names, train_loader, sampler, val_loader, steps_per_epoch, train_set)


def palette_of(data: Data) -> list[list[int]] | None:
    """The dataset's class colours, saved with the model for ``fusionzoo predict`` (None unless one per class)."""
    palette = getattr(data.train_set, "palette", None)
    return [list(map(int, c)) for c in palette] if palette and len(palette) == data.num_classes else None


# 3. Model.
def build_model_and_task(cfg: TrainConfig, data: Data, info: DistInfo,
                         device: torch.device) -> tuple[nn.Module, nn.Module, Task]:
    """``(model to train (DDP / compiled), the plain model, its task)``. The plain model is what gets
    saved, evaluated and handed to callbacks; the task's targets, loss, prediction and metrics
    serve both tasks (its metric picks best/: mIoU for segmentation, COCO box AP for detection)."""
    model = build_model(cfg, data.modalities, data.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.distributed and cfg.sync_bn:  # BN statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_sync_batchnorm(model)
    plain = model
    task = build_task(cfg, plain)  # the config's loss settings; class weights come with the run folder (5.)
    if cfg.tta and not task.supports_tta:
        raise ConfigError(f"tta (multi-scale + flip) is implemented for segmentation only, not {task.name}")
    if info.distributed:
        # A withheld or dropped modality can leave parameters without gradient (late fusion heads).
        unused = cfg.modality_dropout > 0 or bool(cfg.train_missing)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=unused
        )
    if cfg.compile:
        model = torch.compile(model)
    return model, plain, task


def pre_run_check(cfg: TrainConfig, data: Data, plain: nn.Module, task: Task, device: torch.device) -> None:
    """One dry training step on the first ``batch_size`` training samples before the run folder
    exists (fusionzoo.engine.prerun): a model that cannot train on this batch fails in one line."""
    samples = [data.train_loader.dataset[i] for i in range(cfg.batch_size)]
    check_first_step(plain, task, samples, data.train_loader.collate_fn, modalities=data.modalities, device=device,
                     options=step_options(cfg), model_name=cfg.model)


# 4. Optimizer, schedule, precision.
def build_optimization(
    cfg: TrainConfig, plain: nn.Module, data: Data, device: torch.device, extra: Sequence[nn.Parameter] = ()
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler | None]:
    """Optimizer (of the model's parameters and ``extra``, the callbacks' own), per-step LR schedule
    over the whole run, and the fp16 GradScaler (or None)."""
    steps = data.steps_per_epoch
    optimizer = build_optimizer(plain, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=cfg.betas, momentum=cfg.momentum, gate_lr=cfg.gate_lr, extra=extra)
    scheduler = build_scheduler(optimizer, kind=cfg.schedule, total_steps=steps * cfg.epochs,
                                warmup_steps=round(cfg.warmup_epochs * steps),
                                warmup_factor=cfg.warmup_factor, power=cfg.poly_power, min_lr=cfg.min_lr, base_lr=cfg.lr)
    return optimizer, scheduler, make_grad_scaler(device, cfg.amp)


class Run:
    """What the training steps share: the parts built above, the position (``state``), the best
    validation result (``best``), the run folder and its log, and the checkpoint hooks."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, device: torch.device, run_dir: Path, data: Data,
                 model: nn.Module, plain: nn.Module, task: Task, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, scaler: torch.amp.GradScaler | None,
                 hooks: CallbackList, t_start: float) -> None:
        self.cfg, self.info, self.device, self.run_dir, self.data = cfg, info, device, run_dir, data
        self.model, self.plain, self.task = model, plain, task
        self.optimizer, self.scheduler, self.scaler, self.hooks = optimizer, scheduler, scaler, hooks
        self.t_start = t_start
        self.elapsed_before = 0.0  # wall time of earlier invocations (up to their last checkpoint)
        self.state = EpochState()
        self.best: dict[str, Any] = {"metric": task.metric, "value": -1.0, "epoch": None}
        self.logger = MetricsLogger(None)  # disabled until start_or_resume opens the run's log
        self.last_save = time.perf_counter()  # when checkpoints/last was last written (checkpoint_minutes)
        self.stop = StopOnSignal()  # Ctrl-C / SIGTERM in the training loop: finish the step, checkpoint, stop

    def elapsed(self) -> float:
        """Wall time of the whole run so far, earlier invocations included."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save_last(self, st: EpochState) -> None:
        """Write ``checkpoints/last`` (rank 0): weights, optimizer, schedule, scaler, position, best, callbacks."""
        self.last_save = time.perf_counter()
        if self.info.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / "last", model=self.plain, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler,
                            state={"position": st.state_dict(), "best": self.best, "callbacks": self.hooks.state_dict(),
                                   "elapsed_s": self.elapsed()})

    def after_step(self, st: EpochState) -> None:
        """Checkpoint by steps (checkpoint_interval) and by time (checkpoint_minutes: a kill in a long
        first epoch loses at most that much). Rank 0 decides alone: saving involves no collective."""
        cfg = self.cfg
        if ((cfg.checkpoint_interval and st.global_step % cfg.checkpoint_interval == 0)
                or (cfg.checkpoint_minutes and time.perf_counter() - self.last_save >= 60 * cfg.checkpoint_minutes)):
            self.save_last(st)
        if cfg.kill_after_step is not None and st.global_step == cfg.kill_after_step:
            os.kill(os.getpid(), getattr(signal, cfg.kill_signal))  # testing aid: a preempted job, a Ctrl-C

    def interrupted(self, st: EpochState, saved: bool = False) -> TrainingInterrupted:
        """Checkpoint (unless ``saved``) and the exception that ends the run with 128 + signal."""
        if not saved:
            self.save_last(st)
        signum = self.stop.signum
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        msg = (f"stopped by {name} at epoch {st.epoch}, step {st.global_step}; checkpoint written. "
               f"Continue with: python train.py --resume {self.run_dir}")
        if self.info.is_main:
            print(msg, file=sys.stderr, flush=True)
        return TrainingInterrupted(msg, signum or signal.SIGTERM)

    def evaluate(self, missing: tuple[str, ...], **options: Any) -> dict[str, Any]:
        """The task's metrics of the plain model on the validation loader."""
        cfg, data = self.cfg, self.data
        return evaluate(self.plain, data.val_loader, modalities=data.modalities, num_classes=data.num_classes,
                        device=self.device, task=self.task, amp=cfg.amp, channels_last=cfg.channels_last,
                        class_names=data.class_names, missing=missing, **options)


# 5. Fresh start or exact resume (weights, optimizer, schedule, scaler, RNG, epoch position).
def start_or_resume(run: Run, card: Any) -> None:
    """Write a fresh run's config, or restore ``run`` from the resumed run's ``checkpoints/last``;
    then open the metrics log."""
    cfg, info, data, run_dir = run.cfg, run.info, run.data, run.run_dir
    if info.is_main:
        for p in remove_temp_leftovers(run_dir):  # hidden temps of a write that a kill interrupted
            print(f"removed {p} (left by an interrupted write)")
    if cfg.resume:
        resume(run)
    elif info.is_main:
        write_config(cfg, run_dir / "config.json", extra={
            "world_size": info.world_size, "modalities": list(data.modalities), "num_classes": data.num_classes,
            "steps_per_epoch": data.steps_per_epoch, "device": str(run.device), "card": card,
        })
    run.logger = MetricsLogger(run_dir, enabled=info.is_main)
    run.last_save = time.perf_counter()
    if cfg.class_weighting != "none":  # counted once over the training labels, cached in the run folder
        weights = class_weights_for(cfg, data.train_set, data.num_classes, run_dir, run.device)
        run.task = build_task(cfg, run.plain, weights)


def resume(run: Run) -> None:
    """Load ``checkpoints/last`` into ``run``; ``--epochs`` may extend the run (the schedule is re-targeted)."""
    cfg, info, run_dir, metric = run.cfg, run.info, run.run_dir, run.task.metric
    total_steps = run.data.steps_per_epoch * cfg.epochs
    trainer = load_checkpoint(run_dir / "checkpoints" / "last", model=run.plain, optimizer=run.optimizer,
                              scheduler=run.scheduler, scaler=run.scaler)
    state, best = EpochState.from_dict(trainer["position"]), dict(trainer["best"])
    if "value" not in best:  # checkpoints written before detection support stored {"miou": ...}
        best = {"metric": metric, "value": best.get(metric, -1.0), "epoch": best.get("epoch"), "iou": best.get("iou")}
    run.state, run.best = state, best
    run.hooks.load_state_dict(trainer.get("callbacks", {}))
    run.elapsed_before = float(trainer.get("elapsed_s", 0.0))
    started = state.epoch + (1 if state.batches_done else 0)  # epochs completed or under way
    if cfg.epochs < started:
        raise ConfigError(f"--epochs {cfg.epochs}: {run_dir} has already trained into epoch {started}; "
                          f"pass --epochs {started} or more")
    if run.scheduler.lr_lambdas[0].total_steps != total_steps:  # --epochs changed on resume
        lr_before, lr_after = retarget_schedule(run.scheduler, total_steps)
        saved = json.loads((run_dir / "config.json").read_text())
        if info.is_main:
            print(f"{run_dir}: epochs {saved['epochs']} -> {cfg.epochs}: the {cfg.schedule} schedule now ends at "
                  f"step {total_steps}; lr at step {state.global_step} {lr_before:.3g} -> "
                  f"{lr_after:.3g} (not the same as an uninterrupted {cfg.epochs}-epoch run)")
            atomic_write_bytes(run_dir / "config.json",
                               (json.dumps({**saved, "epochs": cfg.epochs}, indent=2) + "\n").encode())
    if info.is_main:
        _drop_records_after(run_dir / "metrics.jsonl", state)
        print(f"resumed {run_dir} at epoch {state.epoch}, batch {state.batches_done}, step {state.global_step}")


# 6. Training loop, with validation every eval_interval epochs.
def step_options(cfg: TrainConfig) -> TrainStepOptions:
    """The config's settings of each training step."""
    return TrainStepOptions(amp=cfg.amp, channels_last=cfg.channels_last, grad_clip=cfg.grad_clip,
                            freeze_bn=cfg.freeze_bn, modality_dropout=cfg.modality_dropout,
                            dropout_candidates=cfg.modality_dropout_candidates, always_missing=cfg.train_missing,
                            seed=cfg.seed, log_interval=cfg.log_interval, progress=cfg.progress)


def train(run: Run) -> None:
    """Epochs ``run.state.epoch .. cfg.epochs - 1``: train, validate, keep best/, log, checkpoint."""
    cfg, data, task, hooks = run.cfg, run.data, run.task, run.hooks
    options = step_options(cfg)
    hooks.on_train_start(run.plain)
    with run.stop:
        for epoch in range(run.state.epoch, cfg.epochs):
            state = run.state
            state.epoch = epoch
            data.sampler.set_epoch(epoch, skip=state.batches_done * cfg.batch_size)
            stats = train_one_epoch(
                run.model, data.train_loader, run.optimizer, run.scheduler, modalities=data.modalities,
                device=run.device, state=state, num_batches=data.steps_per_epoch, task=task, options=options,
                scaler=run.scaler, callbacks=hooks, logger=run.logger, after_step=run.after_step,
                stop_requested=run.stop,
            )
            if stats["interrupted"]:
                raise run.interrupted(state)
            logs: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": state.global_step,
                                    "train_loss": stats["loss"], "img_per_s": stats["img_per_s"],
                                    "lr": run.optimizer.param_groups[0]["lr"], "time_s": run.elapsed()}
            if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
                logs.update(validate(run, epoch, stats, logs["time_s"]))
            hooks.on_epoch_end(epoch, logs)
            run.logger.log(logs)
            for rec in hooks.records():  # e.g. epoch_interpret's per-epoch interpretation
                run.logger.log(rec)
            run.state = EpochState(epoch + 1, 0, state.global_step)
            run.save_last(run.state)
            if all_reduce_step(torch.zeros(()), run.stop(), run.device)[1]:  # a signal during evaluation
                raise run.interrupted(run.state, saved=True)
    hooks.on_train_end(run.plain)
    if run.info.is_main and hooks.callbacks:
        atomic_write_bytes(run.run_dir / "callbacks.json", (json.dumps(hooks.state_dict()) + "\n").encode())


def validate(run: Run, epoch: int, stats: dict[str, float], time_s: float) -> dict[str, Any]:
    """Evaluate after ``epoch``; a better task metric replaces best/. Returns the ``val_*`` log values."""
    cfg, task, metric = run.cfg, run.task, run.task.metric
    val = run.evaluate(cfg.train_missing, progress=cfg.progress)
    score = val[metric]
    if not math.isnan(score) and score > run.best["value"]:
        run.best = {"metric": metric, "value": score, "epoch": epoch, "iou": val.get("iou")}
        if run.info.is_main:
            save_pretrained(run.plain, run.run_dir / "best", class_names=run.data.class_names,
                            normalization=normalization_of(cfg, run.data.modalities),
                            extra={"epoch": epoch, f"val_{metric}": score, "dataset": cfg.dataset,
                                   "palette": palette_of(run.data)})
    if run.info.is_main:
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['loss']:.4f}, val {task.metric_label} "
              f"{score:.4f}, {stats['img_per_s']:.1f} img/s, {time_s:.0f}s", flush=True)
    return task.log_record(val)


# 7. Final evaluation of the last weights: missing modalities and test-time augmentation.
def final_evaluation(run: Run) -> dict[str, Any]:
    """``missing_<m>`` per ``eval_missing`` modality and ``tta``; logged as a ``kind: final`` record."""
    cfg, metric = run.cfg, run.task.metric
    final: dict[str, Any] = {}
    for m in cfg.eval_missing:
        res = run.evaluate(tuple(dict.fromkeys((*cfg.train_missing, m))))
        final[f"missing_{m}"] = {k: res[k] for k in (metric, "pixel_acc", "iou", "ap50") if k in res}
    if cfg.tta:
        res = run.evaluate(cfg.train_missing, tta=True, tta_scales=cfg.tta_scales, tta_flip=cfg.tta_flip)
        final["tta"] = {k: res[k] for k in (metric, "pixel_acc", "iou") if k in res}
    if final:
        run.logger.log({"kind": "final", "step": run.state.global_step, **final})
    run.logger.close()
    return final


def summarize(run: Run, final: dict[str, Any]) -> dict[str, Any]:
    """The run's ``summary.json`` (written and printed by rank 0, beside comparable runs)."""
    cfg, info, best, metric = run.cfg, run.info, run.best, run.task.metric
    summary = {
        "run_dir": str(run.run_dir), "model": cfg.model, "task": run.task.name, "dataset": cfg.dataset,
        "modalities": list(run.data.modalities), "train_missing": list(cfg.train_missing), "epochs": cfg.epochs,
        "steps": run.state.global_step, "world_size": info.world_size, "device": str(run.device),
        "wall_time_s": run.elapsed(), "metric": metric, "best_value": best["value"], f"best_val_{metric}": best["value"],
        "best_epoch": best["epoch"], "best_val_iou": best.get("iou"), "class_names": run.data.class_names, **final,
    }
    if info.is_main:
        atomic_write_bytes(run.run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        print_summary(summary, find_comparable_runs(cfg, run.run_dir))
    return summary


def _drop_records_after(path: Path, state: EpochState) -> None:
    """Forget log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return

    def kept(rec: dict[str, Any]) -> bool:  # callbacks' records say their scope (engine.loop.Callback.records)
        if rec.get("kind") == "epoch" or rec.get("scope") == "epoch":
            return rec["epoch"] < state.epoch
        return (rec.get("kind") == "train" or rec.get("scope") == "step") and rec["step"] <= state.global_step

    keep = [line for line in path.read_text().splitlines() if line.strip() and kept(json.loads(line))]
    atomic_write_bytes(path, ("\n".join(keep) + "\n").encode() if keep else b"")


def print_summary(summary: dict[str, Any], comparable: list[dict[str, Any]]) -> None:
    """Human-readable end of a run, with comparable runs (same recipe, other streams) beside it."""
    streams = [m for m in summary["modalities"] if m not in summary["train_missing"]]
    label = get_task(summary["task"]).metric_label
    best_epoch = "n/a" if summary["best_epoch"] is None else summary["best_epoch"] + 1
    minutes, seconds = divmod(round(summary["wall_time_s"]), 60)
    lines = [
        "",
        f"== {summary['model']} on {summary['dataset']} [{'+'.join(streams)}] ==",
        (f"{summary['epochs']} epochs, {summary['steps']} steps, {summary['world_size']} process(es) on "
         f"{summary['device']}, wall time {minutes}m{seconds:02d}s"),
        f"best val {label} {summary['best_value']:.4f} (epoch {best_epoch})",
    ]
    if summary.get("class_names") and summary.get("best_val_iou"):
        lines.append("  per class: " + ", ".join(
            f"{n} {v:.3f}" if v is not None and not math.isnan(v) else f"{n} n/a" for n, v in zip(summary["class_names"], summary["best_val_iou"])))
    for key, res in summary.items():
        if key.startswith("missing_"):
            lines.append(f"without {key[8:]} (same weights): {label} {res[summary['metric']]:.4f}")
    if "tta" in summary:
        lines.append(f"multi-scale + flip TTA: {label} {summary['tta'][summary['metric']]:.4f}")
    for other in comparable:
        lines.append(f"same recipe on [{'+'.join(other['streams'])}] ({other['run_dir']}): "
                     f"best val {label} {other['best_value']:.4f}")
    lines.append(f"run folder: {summary['run_dir']}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:], prog="train.py"))
