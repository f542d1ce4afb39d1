"""Optimizer and learning-rate schedule of ``train.py``.

Kept rather than timm's factories (``timm.optim.create_optimizer_v2``, ``timm.scheduler``),
because these do not behave the same (timm 1.0.31; ``python tools/compare_timm_optim.py``
prints the numbers below):

- ``create_optimizer_v2(model, "adamw", weight_decay=wd)`` puts the same tensors in the same two
  groups (no decay on every tensor with fewer than 2 dims), but in the opposite order
  (no-decay first), so optimizer states saved by earlier runs (indexed by group) would not load
  for ``--resume``; its ``"sgd"`` is Nesterov SGD (ours is plain momentum, timm's ``"momentum"``).
- ``timm.scheduler.PolyLRScheduler`` / ``CosineLRScheduler`` (``warmup_prefix=True``,
  ``t_initial = total - warmup``, ``step_update(step)``) compute the same formulas but not the
  same floats: over 103-1503 steps of four poly/cosine settings 5-454 steps differ, by at most
  4.3e-19 absolute / 1.6e-15 relative (ours multiplies ``base_lr`` by a ratio, timm adds
  ``lr_min + (lr_max - lr_min) * decay``), so a resumed run would not be bit-identical to an
  uninterrupted one started before the change. timm's schedulers also keep no step count
  (the loop passes it to ``step_update``; ``LambdaLR`` counts its own and saves it in
  ``state_dict``), and refuse a run whose warm-up is the whole run (``assert t_initial > 0``;
  ``LRSchedule`` clamps the warm-up to the run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .checkpoint import unwrap_model

__all__ = ["LRSchedule", "build_optimizer", "build_scheduler", "retarget_schedule"]


def build_optimizer(
    model: nn.Module,
    *,
    name: str = "adamw",
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    gate_lr: float | None = None,
    extra: Iterable[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """AdamW (or SGD) with weight decay on weight matrices/kernels only.

    Biases and normalization parameters (every tensor with fewer than 2 dims) get no decay, the
    grouping used by CMX/SegFormer-style recipes (decaying BN scales fights the normalization).
    A model with purification gates (MIM, ``model.gate_parameters()``) gets a third group for them:
    learning rate ``gate_lr`` (None = ``lr``) and no weight decay, as MIM trains its gates with an
    optimiser of their own (Adam, no decay); the schedule scales every group alike. ``extra``:
    parameters trained beside the model's, grouped by the decay rule (training callbacks' own,
    ``engine.loop.Callback.parameters``).

    Raises:
        ValueError: ``gate_lr`` for a model without ``gate_parameters``.
    """
    plain = unwrap_model(model)
    gate_ids = {id(p) for p in plain.gate_parameters()} if hasattr(plain, "gate_parameters") else None
    if gate_lr is not None and gate_ids is None:
        raise ValueError(f"gate_lr={gate_lr} is for models with purification gates (mim_*); "
                         f"{type(plain).__name__} has no gate_parameters()")
    decay, no_decay, gates = [], [], []
    for p in [*plain.parameters(), *extra]:
        if not p.requires_grad:
            continue
        if gate_ids and id(p) in gate_ids:
            gates.append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": lr if gate_lr is None else gate_lr})
    groups = [g for g in groups if g["params"]]
    # Speed (issue 23): AdamW's fused kernel updates every tensor in one pass (ESANet-ResNet18, 23 M
    # parameters, one CPU thread: 25 ms per step against 97 ms for the per-tensor loop; the same
    # update up to float rounding, 1 ulp). SGD's foreach path is bit-identical to its loop.
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


class LRSchedule:
    """Multiplier of the base learning rate at optimizer step ``t`` (a ``LambdaLR`` lambda).

    Linear warm-up from ``warmup_factor`` to 1 over ``warmup_steps``, then ``poly``
    (``(1 - t'/T')**power``, DeepLab/CMX) or ``cosine`` decay to ``min_ratio`` at ``total_steps``,
    or ``constant``. Plain attributes only, so ``LambdaLR.state_dict()`` stores it as JSON.
    """

    def __init__(
        self,
        kind: str,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_factor: float = 0.1,
        power: float = 0.9,
        min_ratio: float = 0.0,
    ) -> None:
        if kind not in ("poly", "cosine", "constant"):
            raise ValueError(f"schedule must be poly, cosine or constant, got {kind!r}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(warmup_steps, total_steps))
        self.warmup_factor = float(warmup_factor)
        self.power = float(power)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        if self.kind == "poly":
            decay = (1.0 - progress) ** self.power
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def retarget_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> tuple[float, float]:
    """Make a restored :class:`LRSchedule` end at ``total_steps`` (``--resume --epochs N``).

    The checkpoint's schedule stores its own ``total_steps``; a run extended to more epochs
    decays over the new length from the current step on (poly/cosine: the learning rate rises
    from where the shorter schedule had taken it).

    Returns:
        The first group's learning rate before and after.
    """
    schedule = scheduler.lr_lambdas[0]
    if not isinstance(schedule, LRSchedule):
        raise TypeError(f"retarget_schedule needs an LRSchedule lambda, got {type(schedule).__name__}")
    before = scheduler.optimizer.param_groups[0]["lr"]
    for lam in scheduler.lr_lambdas:
        lam.total_steps = int(total_steps)
        lam.warmup_steps = min(lam.warmup_steps, lam.total_steps)
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
    return before, lrs[0]


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 0.1,
    power: float = 0.9,
    min_lr: float = 0.0,
    base_lr: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :class:`LRSchedule`, stepped once per optimizer step."""
    schedule = LRSchedule(kind, total_steps, warmup_steps, warmup_factor, power, min_lr / base_lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
