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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

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
from fusionzoo.engine.config import ConfigError, parse_command_line, write_config
from fusionzoo.engine.distributed import (
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
    evaluate,
    make_grad_scaler,
    train_one_epoch,
)
from fusionzoo.engine.optim import build_optimizer, build_scheduler, retarget_schedule
from fusionzoo.engine.sync_bn import convert_sync_batchnorm
from fusionzoo.files import atomic_write_bytes
from fusionzoo.hub import save_pretrained
from fusionzoo.tasks import get_task


def main(argv: list[str] | None = None, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Run training as configured by ``argv`` (``sys.argv[1:]`` when None); returns the summary."""
    t_start = time.perf_counter()

    # 1. Configuration: defaults <- YAML recipe <- command line; a resume takes the run's own config
    # (plus the keys given on this command line that may change: see builders.RESUME_MUTABLE).
    cfg, card, given = parse_command_line(argv)
    info, device = init_distributed(cfg.device)
    run_dir = resume_run_dir(cfg.resume) if cfg.resume else None  # a fresh run's folder: once all is valid (5.)
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

    # 2. Data.
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

    # 3. Model.
    model = build_model(cfg, modalities, num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if info.distributed and cfg.sync_bn:  # BN statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else convert_sync_batchnorm(model)
    plain = model  # what gets saved, evaluated and handed to callbacks
    # Targets, loss, prediction and metrics of the model's task; its metric picks best/ (mIoU for
    # segmentation, COCO box AP for detection).
    task = build_task(cfg, plain)
    if cfg.tta and not task.supports_tta:
        raise ConfigError(f"tta (multi-scale + flip) is implemented for segmentation only, not {task.name}")
    metric = task.metric
    if info.distributed:
        # A withheld or dropped modality can leave parameters without gradient (late fusion heads).
        unused = cfg.modality_dropout > 0 or bool(cfg.train_missing)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=unused
        )
    if cfg.compile:
        model = torch.compile(model)

    # 4. Optimizer, schedule, precision.
    optimizer = build_optimizer(plain, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=cfg.betas, momentum=cfg.momentum)
    scheduler = build_scheduler(optimizer, kind=cfg.schedule, total_steps=steps_per_epoch * cfg.epochs,
                                warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                                warmup_factor=cfg.warmup_factor, power=cfg.poly_power, min_lr=cfg.min_lr, base_lr=cfg.lr)
    scaler = make_grad_scaler(device, cfg.amp)
    hooks = CallbackList([*build_callbacks(cfg.callbacks), *(callbacks or [])])

    # 5. Fresh start or exact resume (weights, optimizer, schedule, scaler, RNG, epoch position).
    if run_dir is None:
        run_dir = Path(broadcast_object(str(make_run_dir(cfg)) if info.is_main else None))
    if info.is_main:
        for p in remove_temp_leftovers(run_dir):  # hidden temps of a write that a kill interrupted
            print(f"removed {p} (left by an interrupted write)")
    state, best = EpochState(), {"metric": metric, "value": -1.0, "epoch": None}
    elapsed_before = 0.0  # wall time of earlier invocations (up to their last checkpoint)
    if cfg.resume:
        trainer = load_checkpoint(run_dir / "checkpoints" / "last", model=plain, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler)
        state, best = EpochState.from_dict(trainer["position"]), dict(trainer["best"])
        if "value" not in best:  # checkpoints written before detection support stored {"miou": ...}
            best = {"metric": metric, "value": best.get(metric, -1.0), "epoch": best.get("epoch"), "iou": best.get("iou")}
        hooks.load_state_dict(trainer.get("callbacks", {}))
        elapsed_before = float(trainer.get("elapsed_s", 0.0))
        started = state.epoch + (1 if state.batches_done else 0)  # epochs completed or under way
        if cfg.epochs < started:
            raise ConfigError(f"--epochs {cfg.epochs}: {run_dir} has already trained into epoch {started}; "
                              f"pass --epochs {started} or more")
        if scheduler.lr_lambdas[0].total_steps != steps_per_epoch * cfg.epochs:  # --epochs changed on resume
            lr_before, lr_after = retarget_schedule(scheduler, steps_per_epoch * cfg.epochs)
            saved = json.loads((run_dir / "config.json").read_text())
            if info.is_main:
                print(f"{run_dir}: epochs {saved['epochs']} -> {cfg.epochs}: the {cfg.schedule} schedule now ends at "
                      f"step {steps_per_epoch * cfg.epochs}; lr at step {state.global_step} {lr_before:.3g} -> "
                      f"{lr_after:.3g} (not the same as an uninterrupted {cfg.epochs}-epoch run)")
                atomic_write_bytes(run_dir / "config.json",
                                   (json.dumps({**saved, "epochs": cfg.epochs}, indent=2) + "\n").encode())
        if info.is_main:
            _drop_records_after(run_dir / "metrics.jsonl", state)
            print(f"resumed {run_dir} at epoch {state.epoch}, batch {state.batches_done}, step {state.global_step}")
    elif info.is_main:
        write_config(cfg, run_dir / "config.json", extra={
            "world_size": info.world_size, "modalities": list(modalities), "num_classes": num_classes,
            "steps_per_epoch": steps_per_epoch, "device": str(device), "card": card,
        })
    logger = MetricsLogger(run_dir, enabled=info.is_main)
    # Class weights of the loss (counted once, cached in the run folder).
    task = build_task(cfg, plain, class_weights_for(cfg, train_set, num_classes, run_dir, device))

    last_save = time.perf_counter()
    stop = StopOnSignal()  # Ctrl-C / SIGTERM in the training loop: finish the step, checkpoint, stop

    def save_last(st: EpochState) -> None:
        nonlocal last_save
        last_save = time.perf_counter()
        if info.is_main:
            save_checkpoint(run_dir / "checkpoints" / "last", model=plain, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, state={"position": st.state_dict(), "best": best,
                                                  "callbacks": hooks.state_dict(),
                                                  "elapsed_s": elapsed_before + time.perf_counter() - t_start})

    def after_step(st: EpochState) -> None:
        # By steps (checkpoint_interval) and by time (checkpoint_minutes: a kill in a long first epoch
        # loses at most that much). Rank 0 decides alone: saving involves no collective.
        if ((cfg.checkpoint_interval and st.global_step % cfg.checkpoint_interval == 0)
                or (cfg.checkpoint_minutes and time.perf_counter() - last_save >= 60 * cfg.checkpoint_minutes)):
            save_last(st)
        if cfg.kill_after_step is not None and st.global_step == cfg.kill_after_step:
            os.kill(os.getpid(), getattr(signal, cfg.kill_signal))  # testing aid: a preempted job, a Ctrl-C

    def interrupted(st: EpochState, saved: bool = False) -> TrainingInterrupted:
        if not saved:
            save_last(st)
        name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
        msg = (f"stopped by {name} at epoch {st.epoch}, step {st.global_step}; checkpoint written. "
               f"Continue with: python train.py --resume {run_dir}")
        if info.is_main:
            print(msg, file=sys.stderr, flush=True)
        return TrainingInterrupted(msg, stop.signum or signal.SIGTERM)

    # 6. Training loop, with validation every eval_interval epochs.
    eval_kwargs = {"modalities": modalities, "num_classes": num_classes, "device": device, "task": task, "amp": cfg.amp,
                   "channels_last": cfg.channels_last, "class_names": class_names}
    hooks.on_train_start(plain)
    with stop:
        for epoch in range(state.epoch, cfg.epochs):
            state.epoch = epoch
            sampler.set_epoch(epoch, skip=state.batches_done * cfg.batch_size)
            stats = train_one_epoch(
                model, train_loader, optimizer, scheduler, modalities=modalities, device=device, state=state,
                num_batches=steps_per_epoch, grad_clip=cfg.grad_clip, amp=cfg.amp,
                scaler=scaler, channels_last=cfg.channels_last, freeze_bn=cfg.freeze_bn,
                modality_dropout=cfg.modality_dropout, dropout_candidates=cfg.modality_dropout_candidates,
                always_missing=cfg.train_missing, seed=cfg.seed, callbacks=hooks, logger=logger,
                log_interval=cfg.log_interval, after_step=after_step, progress=cfg.progress, task=task,
                stop_requested=stop,
            )
            if stats["interrupted"]:
                raise interrupted(state)
            logs: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": state.global_step,
                                    "train_loss": stats["loss"], "img_per_s": stats["img_per_s"],
                                    "lr": optimizer.param_groups[0]["lr"], "time_s": elapsed_before + time.perf_counter() - t_start}
            if (epoch + 1) % cfg.eval_interval == 0 or epoch + 1 == cfg.epochs:
                val = evaluate(plain, val_loader, missing=cfg.train_missing, progress=cfg.progress, **eval_kwargs)
                logs.update(task.log_record(val))
                score = val[metric]
                if not math.isnan(score) and score > best["value"]:
                    best = {"metric": metric, "value": score, "epoch": epoch, "iou": val.get("iou")}
                    if info.is_main:
                        save_pretrained(plain, run_dir / "best", class_names=class_names,
                                        normalization=normalization_of(cfg, modalities),
                                        extra={"epoch": epoch, f"val_{metric}": score, "dataset": cfg.dataset})
                if info.is_main:
                    print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats['loss']:.4f}, val {task.metric_label} "
                          f"{score:.4f}, {stats['img_per_s']:.1f} img/s, {logs['time_s']:.0f}s", flush=True)
            hooks.on_epoch_end(epoch, logs)
            logger.log(logs)
            state = EpochState(epoch + 1, 0, state.global_step)
            save_last(state)
            if all_reduce_step(torch.zeros(()), stop(), device)[1]:  # a signal during evaluation
                raise interrupted(state, saved=True)

    hooks.on_train_end(plain)
    if info.is_main and hooks.callbacks:
        atomic_write_bytes(run_dir / "callbacks.json", (json.dumps(hooks.state_dict()) + "\n").encode())

    # 7. Final evaluation of the last weights: missing modalities and test-time augmentation.
    final: dict[str, Any] = {}
    for m in cfg.eval_missing:
        res = evaluate(plain, val_loader, missing=tuple(dict.fromkeys((*cfg.train_missing, m))), **eval_kwargs)
        final[f"missing_{m}"] = {k: res[k] for k in (metric, "pixel_acc", "iou", "ap50") if k in res}
    if cfg.tta:
        res = evaluate(plain, val_loader, missing=cfg.train_missing, tta=True, tta_scales=cfg.tta_scales,
                       tta_flip=cfg.tta_flip, **eval_kwargs)
        final["tta"] = {k: res[k] for k in (metric, "pixel_acc", "iou") if k in res}
    if final:
        logger.log({"kind": "final", "step": state.global_step, **final})
    logger.close()

    summary = {
        "run_dir": str(run_dir), "model": cfg.model, "task": task.name, "dataset": cfg.dataset, "modalities": list(modalities),
        "train_missing": list(cfg.train_missing), "epochs": cfg.epochs, "steps": state.global_step,
        "world_size": info.world_size, "device": str(device), "wall_time_s": elapsed_before + time.perf_counter() - t_start,
        "metric": metric, "best_value": best["value"], f"best_val_{metric}": best["value"],
        "best_epoch": best["epoch"], "best_val_iou": best.get("iou"),
        "class_names": class_names, **final,
    }
    if info.is_main:
        atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        print_summary(summary, find_comparable_runs(cfg, run_dir))

    # 8. Interpretation (fusionzoo.interpret): CKA, semantic variance, modality contribution (mIoU, or
    # COCO AP for detectors), gradient balance, Grad-CAM of the best weights on the validation split.
    if info.is_main and cfg.report:
        from fusionzoo.interpret.report import report_run

        files = report_run(run_dir, device=device)
        print(f"interpretability report: {files['report']}")
    cleanup_distributed()
    return summary


def _drop_records_after(path: Path, state: EpochState) -> None:
    """Forget log lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return

    def kept(rec: dict[str, Any]) -> bool:
        if rec.get("kind") == "epoch":
            return rec["epoch"] < state.epoch
        return rec.get("kind") == "train" and rec["step"] <= state.global_step

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
    from fusionzoo.cli import run_command

    sys.exit(run_command(main, sys.argv[1:], prog="train.py"))
