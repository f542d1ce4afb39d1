"""OGMGECallback (OGM-GE, Peng et al. CVPR 2022): which weights, which coefficient, what it leaves alone."""

import math

import pytest
import torch

import fusionzoo as fz
from fusionzoo.interpret.callbacks import OGMGECallback, modality_owned_gradients

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(2, 3, 32, 32, generator=g), "depth": torch.randn(2, 1, 32, 32, generator=g),
            "mask": torch.randint(0, 3, (2, 32, 32), generator=g)}


def _backward(model, batch):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model({m: batch[m] for m in model.modalities}), batch["mask"])
    loss.backward()


def test_owned_weights_early_slice_and_branches():
    torch.manual_seed(0)
    early = fz.create_model("early_concat", encoder="resnet10t", num_classes=3)
    (w, sl), = modality_owned_gradients(early, "depth")
    assert w.shape[1] == 4 and sl == slice(3, 4)          # rgb channels 0..2, depth channel 3
    assert modality_owned_gradients(early, "rgb")[0][1] == slice(0, 3)
    late = fz.create_model("late_mean", encoder="resnet10t", num_classes=3)
    owned = modality_owned_gradients(late, "depth")
    assert owned and all(sl is None and p.dim() == 4 for p, sl in owned)
    assert {id(p) for p, _ in owned} <= {id(p) for p in late.modality_parameters("depth")}


def test_modulates_only_the_dominant_modality_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=3).train()
    batch = _batch()
    cb = OGMGECallback(alpha=0.5, ge=False)
    cb.on_train_start(model)
    bn = {n: b.clone() for n, b in model.named_buffers()}
    s = cb.scores(model, batch)                              # real probes
    assert set(s) == {"rgb", "depth"} and all(0 < v < 1 for v in s.values())
    assert all(torch.equal(bn[n], b) for n, b in model.named_buffers())   # probes froze the BN statistics
    _backward(model, batch)
    (w, _), = modality_owned_gradients(model, "rgb")
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cb.scores = lambda model, batch: {"rgb": 0.6, "depth": 0.3}  # rgb dominates: rho = 2
    cb.on_batch_start(batch)
    cb.on_after_backward(model, step=0, epoch=0)
    k = 1 - math.tanh(0.5 * 2.0)
    assert cb.steps[-1]["coefficient"] == pytest.approx({"rgb": k, "depth": 1.0})
    torch.testing.assert_close(w.grad[:, :3], before_w := before[_name(model, w)][:, :3] * k)
    torch.testing.assert_close(w.grad[:, 3:], before[_name(model, w)][:, 3:])   # depth slice untouched
    assert before_w.abs().sum() > 0
    for n, p in model.named_parameters():                   # nothing else changes
        if p is not w and p.grad is not None:
            assert torch.equal(p.grad, before[n]), n


def test_ge_noise_and_history():
    torch.manual_seed(0)
    model = fz.create_model("late_mean", encoder="resnet10t", num_classes=3).train()
    cb = OGMGECallback(alpha=0.1, ge=True, seed=3)
    cb.on_train_start(model)
    batch = _batch(1)
    _backward(model, batch)
    owned = modality_owned_gradients(model, "depth")
    before = [p.grad.clone() for p, _ in owned]
    cb.on_batch_start(batch)
    cb.on_after_backward(model, step=5, epoch=0)
    k = cb.steps[-1]["coefficient"]["depth"]
    changed = [not torch.allclose(p.grad, b * k) for (p, _), b in zip(owned, before)]
    assert any(changed)                                      # GE added noise
    cb.on_epoch_end(0)
    state = cb.state_dict()
    assert state["epochs"][0]["num_steps"] == 1 and set(state["epochs"][0]["ratio"]) == {"rgb", "depth"}
    with pytest.raises(RuntimeError, match="on_batch_start"):
        cb.on_after_backward(model, step=6, epoch=0)


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)
