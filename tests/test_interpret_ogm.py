"""OGMGECallback (OGM-GE, Peng et al. CVPR 2022, as the authors' main.py): which weights, which scores,
which coefficient, which epochs, and what it leaves alone (dropout, BatchNorm, --freeze-bn)."""

import math

import pytest
import torch

import fusionzoo as fz
from fusionzoo.engine.builders import build_callbacks
from fusionzoo.engine.config import ConfigError
from fusionzoo.engine.loop import CallbackList, EpochState, TrainStepOptions, train_one_epoch
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
    # the authors modulate the encoder only: not the modality's own decoder and classifier
    assert {id(p) for p, _ in owned} == {id(p) for p in late.encoders["depth"].parameters() if p.dim() == 4}
    branch = {id(p) for p, _ in modality_owned_gradients(late, "depth", "branch")}
    assert {id(p) for p in late.decoders["depth"].parameters() if p.dim() == 4} <= branch


def test_modulates_only_the_dominant_modality_and_keeps_bn_statistics():
    torch.manual_seed(0)
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=3).train()
    batch = _batch()
    cb = OGMGECallback(alpha=0.5, ge=False, total_epochs=2)
    cb.on_train_start(model)
    assert cb.source == "probe" and cb.end_epoch == 0                 # no unimodal heads; first half of 2 epochs
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
    cb = OGMGECallback(alpha=0.1, ge=True, seed=3, end_epoch=5)
    cb.on_train_start(model)
    batch = _batch(1)
    cb.on_batch_start(batch)
    _backward(model, batch)
    owned = modality_owned_gradients(model, "depth")
    before = [p.grad.clone() for p, _ in owned]
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


def test_late_model_scores_come_from_its_own_heads_in_the_training_forward():
    """Late/hybrid models: the authors' construction, each modality's own output of the step's forward."""
    torch.manual_seed(0)
    model = fz.create_model("late_mean", encoder="resnet10t", num_classes=3).train()
    cb = OGMGECallback(alpha=0.5, ge=False, end_epoch=0)
    cb.on_train_start(model)
    assert cb.source == "heads"
    batch = _batch(2)
    heads = {}

    def keep(m):
        def hook(module, args, out):  # returns None: the output is left alone
            heads.setdefault(m, out.detach())
        return hook

    hooks = [model.taps.get(f"{m}.head").register_forward_hook(keep(m)) for m in ("rgb", "depth")]
    cb.on_batch_start(batch)
    _backward(model, batch)
    for h in hooks:
        h.remove()
    cb.scores = lambda *a: pytest.fail("a model with unimodal heads needs no probe")
    decoder_grads = {n: p.grad.clone() for n, p in model.decoders.named_parameters() if p.grad is not None}
    cb.on_after_backward(model, step=0, epoch=0)
    for m in ("rgb", "depth"):
        logits = torch.nn.functional.interpolate(heads[m], size=(32, 32), mode="bilinear", align_corners=False)
        p_true = logits.softmax(1).gather(1, batch["mask"][:, None])[:, 0]
        assert cb.steps[-1]["score"][m] == pytest.approx(float(p_true.mean()), rel=1e-5)
    assert all(torch.equal(p.grad, decoder_grads[n]) for n, p in model.decoders.named_parameters() if p.grad is not None)


def test_probe_is_deterministic_with_dropout_and_keeps_freeze_bn():
    torch.manual_seed(0)
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=3, dropout=0.5).train()
    batch = _batch(4)
    cb = OGMGECallback(total_epochs=1)
    cb.on_train_start(model)
    with torch.no_grad():                                    # dropout is live in training mode ...
        x = {m: batch[m] for m in ("rgb", "depth")}
        assert not torch.equal(model(x), model(x))
    first = cb.scores(model, batch)                          # ... and off in the probes
    assert all(cb.scores(model, batch) == first for _ in range(3))
    assert all(m.training for m in model.modules())          # every module keeps its own flag


def test_freeze_bn_survives_the_callback_in_the_training_loop():
    torch.manual_seed(0)
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = CallbackList([OGMGECallback(total_epochs=1)])
    hooks.on_train_start(model)
    train_one_epoch(model, [_batch(s) for s in range(2)], torch.optim.SGD(model.parameters(), lr=0.01), None,
                    modalities=model.modalities, device=torch.device("cpu"), state=EpochState(), num_batches=2,
                    callbacks=hooks, options=TrainStepOptions(freeze_bn=True))
    assert bns and not any(m.training for m in bns)          # was 0 of 42 frozen after model.train(was_training)
    assert len(hooks.callbacks[0].steps) == 2


def test_default_window_is_the_first_half_of_training():
    assert OGMGECallback(total_epochs=100).end_epoch == 49 and OGMGECallback(total_epochs=3).end_epoch == 1
    with pytest.raises(ValueError, match="total_epochs"):
        OGMGECallback()
    torch.manual_seed(0)
    model = fz.create_model("late_mean", encoder="resnet10t", num_classes=3).train()
    cb = OGMGECallback(total_epochs=2)
    cb.on_train_start(model)
    batch = _batch(5)
    cb.on_batch_start(batch)
    _backward(model, batch)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cb.on_after_backward(model, step=9, epoch=1)             # second half: nothing modulated, nothing recorded
    assert cb.steps == [] and all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize(("name", "kwargs", "why"), [
    ("fcos_early_resnet18", {}, "supports segmentation models only"),
    ("geminifusion_mit_b0", {"num_classes": 3}, "no convolution weights"),
])
def test_unsupported_models_fail_before_training_with_one_line(name, kwargs, why):
    model = fz.create_model(name, **kwargs)
    with pytest.raises(ConfigError, match=why) as err:
        build_callbacks(["ogm_ge"], context={"total_epochs": 2}, model=model)
    assert str(err.value).startswith("--callbacks ogm_ge:") and "\n" not in str(err.value)
