"""ModalityBalanceCallback on a real late-fusion model: gradient norms, confidence, JSON history."""

import json
import math

import pytest
import torch

import fusionzoo as fz
from fusionzoo.interpret.callbacks import ModalityBalanceCallback

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def late_model():
    torch.manual_seed(0)
    return fz.create_model("late_mean", encoder="resnet10t", num_classes=3)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
            "mask": torch.randint(0, 3, (2, 32, 32), generator=g)}


def _step(model, cb, batch, step, epoch, missing=()):
    cb.on_batch_start(batch)
    inputs = {m: batch[m] for m in model.modalities if m not in missing}
    loss = torch.nn.functional.cross_entropy(model(inputs, missing=missing), batch["mask"])
    loss.backward()
    cb.on_after_backward(model, step, epoch)
    model.zero_grad(set_to_none=True)


def test_records_gradients_confidence_and_ratios(late_model):
    model = late_model.train()
    cb = ModalityBalanceCallback()
    cb.on_train_start(model)
    assert cb.heads == ["rgb", "depth"]
    _step(model, cb, _batch(0), 0, 0)
    _step(model, cb, _batch(1), 1, 0, missing=("depth",))  # depth prediction dropped -> no gradient
    cb.on_epoch_end(0, {"loss": 1.5, "iou": [0.5, 0.25], "kind": "epoch"})
    cb.on_train_end(model)
    first, second = cb.steps
    assert first["grad_norm"]["rgb"] > 0 and first["grad_norm"]["depth"] > 0
    assert first["grad_ratio"]["rgb/depth"] == pytest.approx(first["grad_norm"]["rgb"] / first["grad_norm"]["depth"])
    assert second["grad_norm"]["depth"] == 0.0 and second["grad_norm"]["rgb"] > 0
    for m in ("rgb", "depth"):
        assert 0.0 < first["confidence"][m] < 1.0
    ep = cb.epochs[0]
    assert ep["num_steps"] == 2 and ep["logs"] == {"loss": 1.5, "iou": [0.5, 0.25], "kind": "epoch"}
    assert ep["grad_norm"]["rgb"] == pytest.approx((first["grad_norm"]["rgb"] + second["grad_norm"]["rgb"]) / 2)
    state = cb.state_dict()
    json.loads(json.dumps(state, allow_nan=False))  # strict JSON
    assert state["steps"][1]["grad_ratio"]["rgb/depth"] is None  # x / 0 -> nan -> null


def test_hooks_removed_and_eval_not_recorded(late_model):
    model = late_model
    cb = ModalityBalanceCallback()
    cb.on_train_start(model)
    model.eval()
    with torch.no_grad():
        model({k: v for k, v in _batch(2).items() if k != "mask"})
    assert cb._conf == {}
    cb.close()
    model.train()
    assert all(not tap._forward_hooks for tap in (model.taps.get("rgb.head"), model.taps.get("depth.head")))


def test_true_class_confidence_differs_from_max_prob(late_model):
    model = late_model.train()
    cb = ModalityBalanceCallback()
    cb.on_train_start(model)
    b = _batch(3)
    _step(model, cb, b, 0, 0)
    cb2 = ModalityBalanceCallback()
    cb2.on_train_start(model)
    cb.close()
    loss = torch.nn.functional.cross_entropy(model({k: b[k] for k in ("rgb", "depth")}), b["mask"])
    loss.backward()
    cb2.on_after_backward(model, 0, 0)  # no on_batch_start: max-probability confidence
    model.zero_grad(set_to_none=True)
    cb2.close()
    # max-probability confidence >= true-class confidence on the same forward
    assert cb2.steps[0]["confidence"]["rgb"] >= cb.steps[0]["confidence"]["rgb"] - 1e-6
    assert cb2.steps[0]["confidence"]["rgb"] >= 1 / 3


def test_early_fusion_has_no_modality_gradients():
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=2).train()
    cb = ModalityBalanceCallback(log_every=2)
    cb.on_train_start(model)
    assert cb.heads == []
    for step in range(3):
        x = {k: v for k, v in _batch(step).items() if k != "mask"}
        model(x).mean().backward()
        cb.on_after_backward(model, step, 0)
    assert [r["step"] for r in cb.steps] == [0, 2]
    assert math.isnan(cb.steps[0]["grad_norm"]["rgb"])


def test_confidence_ignores_other_callbacks_probe_passes(late_model):
    """Probe forwards that other callbacks (grad_direction, ogm_ge) run inside a step are not the step's."""
    model = late_model.train()
    cb = ModalityBalanceCallback()
    cb.on_train_start(model)
    b = _batch(4)
    torch.manual_seed(1)                                     # the same dropout masks in both steps
    _step(model, cb, b, 0, 0)
    with torch.no_grad():                                    # a probe after this callback's on_after_backward
        model({"rgb": b["rgb"] * 0, "depth": b["depth"]})
    torch.manual_seed(1)
    _step(model, cb, b, 1, 0)
    cb.close()
    assert cb.steps[1]["confidence"] == pytest.approx(cb.steps[0]["confidence"], rel=1e-6)  # same batch and weights
