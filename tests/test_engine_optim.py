"""Optimizer and schedule (fusionzoo.engine.optim): warm-up + poly/cosine values per step, param
groups, a JSON round trip of the schedule state, and the --resume --epochs N retargeting."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fusionzoo.engine.optim import LRSchedule, build_optimizer, build_scheduler, retarget_schedule


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1))


def _lrs(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_poly():
    s = LRSchedule("poly", total_steps=110, warmup_steps=10, warmup_factor=0.1, power=1.0)
    assert s(0) == pytest.approx(0.1)
    assert s(5) == pytest.approx(0.55)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # linear when power = 1
    assert s(110) == pytest.approx(0.0)


def test_cosine_and_floor():
    s = LRSchedule("cosine", total_steps=100, min_ratio=0.2)
    assert s(0) == pytest.approx(1.0)
    assert s(50) == pytest.approx(0.2 + 0.8 * 0.5)
    assert s(100) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule("step", 10)


def test_scheduler_drives_optimizer_lr_and_norms_biases_get_no_decay():
    opt = build_optimizer(_model(), lr=0.1, weight_decay=0.05)
    sched = build_scheduler(opt, kind="poly", total_steps=4, base_lr=0.1, power=1.0)
    assert _lrs(opt, sched, 4) == pytest.approx([0.1, 0.075, 0.05, 0.025])
    # kernels first (decayed), then biases and norms (not): the order saved checkpoints index
    assert [(g["weight_decay"], [p.ndim for p in g["params"]]) for g in opt.param_groups] == [
        (0.05, [4, 4, 4]), (0.0, [1, 1, 1])]
    sgd = build_optimizer(_model(), name="sgd", lr=0.1, weight_decay=0.05, momentum=0.8)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert not sgd.param_groups[0]["nesterov"]


def test_schedule_state_round_trips_through_json_exactly():
    def fresh():
        opt = build_optimizer(_model(), lr=0.01, weight_decay=0.01)
        return opt, build_scheduler(opt, kind="cosine", total_steps=30, warmup_steps=5, min_lr=1e-4, base_lr=0.01)

    opt, sched = fresh()
    straight = _lrs(opt, sched, 30)
    opt, sched = fresh()
    first = _lrs(opt, sched, 12)
    state = json.loads(json.dumps(sched.state_dict()))  # checkpoints keep it in state.json
    opt2, sched2 = fresh()
    sched2.load_state_dict(state)
    for group, lr in zip(opt2.param_groups, sched2.get_last_lr()):
        group["lr"] = lr  # what load_checkpoint restores with the optimizer state
    assert first + _lrs(opt2, sched2, 18) == straight  # bit-identical


def test_retarget_extends_the_decay_from_the_current_step():
    opt = build_optimizer(_model(), lr=0.1, weight_decay=0.0)
    sched = build_scheduler(opt, kind="poly", total_steps=10, base_lr=0.1, power=1.0)
    _lrs(opt, sched, 8)  # 8 of 10 steps: lr 0.02
    before, after = retarget_schedule(sched, 20)
    assert before == pytest.approx(0.02) and after == pytest.approx(0.06)  # (1 - 8/20) * 0.1
    assert opt.param_groups[0]["lr"] == after and sched.get_last_lr()[0] == after
    assert _lrs(opt, sched, 3)[1:] == pytest.approx([0.055, 0.05])


def test_adamw_takes_the_fused_step_and_matches_the_reference_update():
    """Issue 23 (speed): AdamW runs its fused multi-tensor kernel (one pass over all parameters, 4x
    faster than the per-tensor loop on CPU); its update equals the per-tensor loop's up to rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    assert all(g["fused"] for g in opt.param_groups)
    ref_opt = torch.optim.AdamW([{"params": [p for p in reference if p.ndim >= 2], "weight_decay": 0.05},
                                 {"params": [p for p in reference if p.ndim < 2], "weight_decay": 0.0}],
                                lr=1e-2, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in reference]
        for p, q, g in zip(model.parameters(), reference, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6 * q.abs().max().item())
    assert isinstance(build_optimizer(model, name="sgd", lr=0.1, weight_decay=0.0), torch.optim.SGD)
