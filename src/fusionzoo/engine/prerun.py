"""Checks before a training run starts, and what happens to a run folder whose first step fails.

``train.py`` builds the configuration, data, model and optimizer, then takes one dry training
step (:func:`check_first_step`) and only then creates the run folder. So a model that cannot
train on the configured batch (batch 1 through a BatchNorm that normalises a pooled 1x1 map:
SA-Gate's ASPP image pooling, ESANet's pyramid pooling; a 1-channel input to an entry built for
3) fails with one line, naming the fix, before anything is written. A crash after the folder
exists but before the first optimizer step completes (:func:`discard_unstarted_run`) removes the
folder, which then holds nothing but its ``config.json`` and an empty log; a run with any
completed step, a resumed run, and an interrupted one (Ctrl-C saves a checkpoint to resume) are
never touched.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._registry import accepted_kwargs, list_models
from ..tasks import Task
from .config import ConfigError
from .loop import TrainStepOptions, autocast_context, set_bn_eval, split_batch

__all__ = ["check_first_step", "check_input_channels", "discard_unstarted_run"]

# torch's message when a BatchNorm in training mode sees one value per channel.
_BN_ONE_VALUE = "Expected more than 1 value per channel when training"


def check_first_step(
    model: nn.Module,
    task: Task,
    samples: Sequence[dict[str, Any]],
    collate: Callable[[list[Any]], dict[str, Any]],
    *,
    modalities: Sequence[str],
    device: torch.device,
    options: TrainStepOptions,
    model_name: str,
) -> None:
    """One forward and backward pass in training mode on ``samples`` (the configured batch size
    of training samples), as :func:`~fusionzoo.engine.loop.train_one_epoch` takes a step, with
    nothing left behind: RNG states, BatchNorm statistics (every buffer) and gradients are
    restored, and no optimizer step is taken.

    Args:
        model: the plain model (not DDP-wrapped: the dry step must not communicate).
        task: the run's task (targets and training loss).
        samples: ``batch_size`` training samples (``dataset[i]``).
        collate: the train loader's collate function.
        modalities, device, options: as the run's training step.
        model_name: for the message.

    Raises:
        ConfigError: one line naming the model, the batch and the fix (BatchNorm on one value per
            channel: ``--batch-size`` or ``--freeze-bn``; other errors: the first line of torch's).
    """
    batch = collate(list(samples))
    check_input_channels(model, batch, modalities, model_name)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            if options.freeze_bn:
                set_bn_eval(model)
            inputs = split_batch(batch, modalities, device, options.channels_last)
            targets = task.targets(batch, device)
            with autocast_context(device, options.amp):
                loss = task.training_loss(model, inputs, targets, tuple(options.always_missing))
            loss.backward()
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        shapes = ", ".join(f"{m} {tuple(t.shape)}" for m, t in inputs.items()) if "inputs" in locals() else "?"
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _BN_ONE_VALUE in text:
            raise ConfigError(
                f"{model_name} cannot train on batches of {len(samples)} per process ({shapes}): a BatchNorm "
                "layer sees one value per channel in training mode (a pooled branch normalised over the batch); "
                "use --batch-size 2 or more, or --freeze-bn"
            ) from None
        raise ConfigError(
            f"{model_name}: the pre-run check (one training step on {len(samples)} training samples: {shapes}) "
            f"failed before the run folder was created: {type(err).__name__}: {text}"
        ) from None
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def check_input_channels(model: nn.Module, batch: Mapping[str, Any], modalities: Sequence[str], model_name: str) -> None:
    """The data's channel count per modality against the model's ``in_chans``, with the fix.

    Published CMX / CMNeXt take a 3-channel X input (HHA; or depth / thermal that the authors'
    loader repeats to 3 channels, ``cv2.merge([x, x, x])``): for 1-channel data the fix is
    ``replicate_x``, which repeats it in the model and keeps the authors' network.

    Raises:
        ConfigError: names the modality, both channel counts and the ``--model-kwargs`` to give.
    """
    expected = getattr(model, "in_chans", None)
    if not isinstance(expected, Mapping):
        return
    accepted = accepted_kwargs(model_name) if model_name in list_models() else None
    for m in modalities:
        x = batch.get(m)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or m not in expected or x.shape[1] == expected[m]:
            continue
        got, want = int(x.shape[1]), int(expected[m])
        if got == 1 and want == 3 and accepted is not None and "replicate_x" in accepted:
            raise ConfigError(
                f"{model_name} takes a 3-channel {m!r} input (the published recipe feeds HHA, or depth/thermal "
                f"repeated to 3 channels), the data's {m!r} has 1 channel: add --model-kwargs \"{{replicate_x: true}}\" "
                f"(repeats it to 3 in the model, as the authors' loader does), or \"{{in_chans: {{{m}: 1}}}}\" (a 1-channel "
                f"stem: no longer the authors' network), or train on HHA (--modalities rgb,hha)"
            )
        raise ConfigError(
            f"{model_name} takes {want} channel(s) for {m!r}, the data gives {got}: add --model-kwargs "
            f"\"{{in_chans: {{{m}: {got}}}}}\" or give data with {want} channel(s)"
        )


def discard_unstarted_run(run_dir: Path, *, fresh: bool, steps_done: int, error: BaseException) -> bool:
    """Remove ``run_dir`` after ``error`` ended a fresh run before its first optimizer step.

    Only a fresh run (not ``--resume``) with ``steps_done == 0`` is removed, and never for an
    interruption (an exception with ``exit_status``, e.g. Ctrl-C, which saved a checkpoint that
    ``--resume`` continues). Prints what it removed.

    Returns:
        Whether the folder was removed.
    """
    if not fresh or steps_done > 0 or getattr(error, "exit_status", None) is not None or not run_dir.is_dir():
        return False
    with contextlib.suppress(OSError):
        shutil.rmtree(run_dir)
    removed = not run_dir.exists()
    if removed:
        print(f"removed {run_dir}: the run failed before its first training step, so it held only its config")
    return removed
