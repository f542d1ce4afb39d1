"""Compare fusionzoo.engine.optim with timm's optimizer and scheduler factories (CPU, seconds).

Prints, per schedule setting, how many per-step learning rates differ from timm's
PolyLRScheduler / CosineLRScheduler and by how much, the optimizer param groups both build,
whether an optimizer state saved with ours loads into timm's, and timm's behaviour when the
warm-up is the whole run. The numbers are quoted in the docstring of fusionzoo/engine/optim.py.

    python tools/compare_timm_optim.py
"""

from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from torch import nn

from fusionzoo.engine.optim import build_optimizer, build_scheduler

SETTINGS = [  # kind, total steps, warm-up steps, warm-up factor, poly power, min lr, lr
    ("poly", 100, 10, 0.1, 0.9, 0.0, 2e-3),
    ("poly", 1000, 0, 0.1, 0.9, 1e-5, 6e-5),
    ("cosine", 100, 10, 0.1, 0.9, 1e-4, 2e-3),
    ("poly", 1500, 150, 1e-6, 1.0, 0.0, 6e-5),
]


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.LayerNorm(4))


def ours(kind: str, total: int, warm: int, wf: float, power: float, min_lr: float, lr: float) -> list[float]:
    opt = build_optimizer(tiny(), lr=lr, weight_decay=0.01)
    sched = build_scheduler(opt, kind=kind, total_steps=total, warmup_steps=warm, warmup_factor=wf, power=power,
                            min_lr=min_lr, base_lr=lr)
    out = []
    for _ in range(total + 3):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def timms(kind: str, total: int, warm: int, wf: float, power: float, min_lr: float, lr: float) -> list[float]:
    opt = create_optimizer_v2(tiny(), "adamw", lr=lr, weight_decay=0.01)
    cls, extra = (PolyLRScheduler, {"power": power}) if kind == "poly" else (CosineLRScheduler, {})
    sched = cls(opt, t_initial=total - warm, lr_min=min_lr, warmup_t=warm, warmup_lr_init=lr * wf,
                warmup_prefix=True, t_in_epochs=False, **extra)
    out = []
    for step in range(total + 3):
        sched.step_update(step)
        out.append(opt.param_groups[0]["lr"])
    return out


def main() -> None:
    for setting in SETTINGS:
        a, b = ours(*setting), timms(*setting)
        unequal = sum(x != y for x, y in zip(a, b))
        worst = max(abs(x - y) for x, y in zip(a, b))
        rel = max(abs(x - y) / abs(x) for x, y in zip(a, b) if x)
        print(f"{setting}: {len(a)} steps, {unequal} differ, max abs {worst:.2e}, max rel {rel:.2e}")
    model = tiny()
    mine = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    theirs = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.01)
    for name, opt in (("ours", mine), ("timm", theirs)):
        print(f"{name} groups (tensors, weight decay):", [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups])
    print("timm 'sgd' nesterov:", create_optimizer_v2(model, "sgd", lr=1e-3).param_groups[0]["nesterov"])
    try:
        theirs.load_state_dict(mine.state_dict())
        print("our optimizer state loads into timm's")
    except ValueError as err:
        print("our optimizer state into timm's:", err)
    try:
        PolyLRScheduler(theirs, t_initial=0, warmup_t=10, warmup_prefix=True, t_in_epochs=False)
        print("warm-up = whole run (t_initial=0): accepted")
    except AssertionError:
        print("warm-up = whole run (t_initial=0): timm asserts t_initial > 0")


if __name__ == "__main__":
    main()
