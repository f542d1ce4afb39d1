"""Loop pieces: sampler sharding/resume, per-sample seeding, modality dropout, TTA,
callbacks and the train/evaluate functions on a tiny stand-in model."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from fusionzoo.engine.distributed import EpochSampler, SeededDataset
from fusionzoo.engine.loop import (
    Callback,
    CallbackList,
    EpochState,
    TrainStepOptions,
    evaluate,
    sample_missing,
    split_batch,
    train_one_epoch,
)
from fusionzoo.engine.optim import build_optimizer
from fusionzoo.tasks import predict


class Tiny(nn.Module):
    """Stand-in with the fusion-model call signature; records the `missing` it was given."""

    modalities = ("rgb", "depth")

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 8, 3, padding=1)
        self.depth = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Conv2d(8, num_classes, 1)
        self.seen_missing: list[tuple[str, ...]] = []

    def forward(self, inputs, missing=()):
        self.seen_missing.append(tuple(missing))
        x = self.rgb(inputs["rgb"])
        if "depth" not in missing:
            x = x + self.depth(inputs["depth"])
        return self.head(torch.relu(x))


def _batches(n: int, b: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        depth = torch.randn(b, 1, size, size, generator=g)
        rgb = torch.randn(b, 3, size, size, generator=g)
        mask = (depth[:, 0] > 0).long() + (rgb[:, 0] > 1).long()  # learnable from the inputs
        out.append({"rgb": rgb, "depth": depth, "mask": mask})
    return out


# -- sampler and seeding ---------------------------------------------------------------------

def test_ranks_split_each_global_batch():
    n, b, w = 20, 3, 2
    single = EpochSampler(n, seed=5, drop_last=True)
    single.set_epoch(2)
    order = list(single)
    ranks = []
    for r in range(w):
        s = EpochSampler(n, seed=5, rank=r, world_size=w, drop_last=True)
        s.set_epoch(2)
        ranks.append(list(s))
    for step in range(len(ranks[0]) // b):
        union = set().union(*(set(rk[step * b:(step + 1) * b]) for rk in ranks))
        assert union == set(order[step * b * w:(step + 1) * b * w])


def test_skip_resumes_the_same_order():
    s = EpochSampler(10, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, skip=4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(4)
    assert list(s) != full  # a new epoch, a new order


def test_uneven_evaluation_sharding_counts_every_sample_once():
    parts = [list(EpochSampler(7, shuffle=False, rank=r, world_size=3, even=False)) for r in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(7))


class Noisy(torch.utils.data.Dataset):
    """Augmentation drawing from all three global generators."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return (i, random.random(), float(np.random.rand()), float(torch.rand(())))


def test_seeded_dataset_is_a_pure_function_of_epoch_and_index():
    ds = SeededDataset(Noisy(), seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ds[(1, 2)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    random.random()
    np.random.rand()
    assert ds[(1, 2)] == a
    assert ds[(2, 2)] != a and ds[(1, 3)] != a
    s = EpochSampler(4, with_epoch=True)
    s.set_epoch(9)
    assert all(e == 9 for e, _ in s)


# -- modality dropout ------------------------------------------------------------------------

def test_modality_dropout_is_deterministic_per_step():
    mods = ("rgb", "depth", "thermal")
    draws = [sample_missing(mods, None, 0.5, step, seed=3) for step in range(400)]
    assert draws == [sample_missing(mods, None, 0.5, step, seed=3) for step in range(400)]
    dropped = [d for d in draws if d]
    assert 0.4 < len(dropped) / len(draws) < 0.6
    assert {d[0] for d in dropped} == {"depth", "thermal"}  # the first stream (RGB) is kept by default
    assert sample_missing(mods, ("rgb",), 1.0, 0, 0) == ("rgb",)
    assert sample_missing(("rgb",), None, 1.0, 0, 0) == ()
    assert sample_missing(mods, None, 0.0, 0, 0) == ()


# -- train / evaluate ------------------------------------------------------------------------

class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, model):
        self.events.append(("start", type(model).__name__))

    def on_batch_start(self, batch):
        self.events.append(("batch", tuple(batch["mask"].shape)))

    def on_after_backward(self, model, step, epoch):
        grads = [p.grad for p in model.parameters()]
        self.events.append(("backward", step, epoch, all(g is not None for g in grads)))

    def state_dict(self):
        return {"n": len(self.events)}


def test_train_one_epoch_learns_and_calls_callbacks():
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(model, lr=0.05, weight_decay=0.0)
    data = _batches(6)
    rec = Recorder()
    hooks = CallbackList([rec])
    hooks.on_train_start(model)
    state = EpochState()
    first = evaluate(model, data, modalities=("rgb", "depth"), num_classes=3, device=torch.device("cpu"))
    losses = []
    for epoch in range(4):
        state = EpochState(epoch, 0, state.global_step)
        out = train_one_epoch(model, data, opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                              state=state, num_batches=len(data), options=TrainStepOptions(grad_clip=1.0), callbacks=hooks)
        losses.append(out["loss"])
    assert losses[-1] < losses[0]
    assert state.global_step == 24
    backward = [e for e in rec.events if e[0] == "backward"]
    assert [e[1] for e in backward] == list(range(24)) and backward[-1][2] == 3 and all(e[3] for e in backward)
    assert rec.events[0] == ("start", "Tiny") and rec.events[1] == ("batch", (2, 8, 8))
    assert hooks.state_dict() == {"0:Recorder": {"n": len(rec.events)}}
    last = evaluate(model, data, modalities=("rgb", "depth"), num_classes=3, device=torch.device("cpu"))
    assert last["miou"] > first["miou"] and last["loss"] < first["loss"]


class Sided(Tiny):
    """A detached output plus side logits, as GeminiFusion's ensemble (reference-default side weights)."""

    side_strides = (8,)
    side_logits_resize = "bilinear-half-pixel"
    side_loss_weights = (1.0,)

    def forward(self, inputs, missing=()):
        side = super().forward(inputs, missing)
        self.side_logits = (nn.functional.avg_pool2d(side, 2),) if self.training else ()  # at half size
        return side.detach() + 0 * self.head.bias.view(1, -1, 1, 1)


def test_side_logits_are_supervised_when_the_model_declares_it():
    """The loss on the detached output alone reaches no encoder weight; with the model's default
    ``side_loss_weights`` the side logits' cross-entropy (upsampled to the labels) trains them."""
    for declared in ((1.0,), None):
        model = Sided()
        model.side_loss_weights = declared
        before = model.rgb.weight.detach().clone()
        opt = build_optimizer(model, lr=0.05, weight_decay=0.0)
        out = train_one_epoch(model, _batches(1), opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                              state=EpochState(), num_batches=1)
        assert math.isfinite(out["loss"])
        assert torch.equal(model.rgb.weight, before) == (declared is None)


def test_modality_dropout_and_withheld_streams_reach_the_model():
    model = Tiny()
    opt = build_optimizer(model, lr=0.01, weight_decay=0.0)
    state = EpochState()
    train_one_epoch(model, _batches(40), opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                    state=state, num_batches=40, options=TrainStepOptions(modality_dropout=0.5))
    seen = model.seen_missing
    assert set(seen) == {(), ("depth",)} and 8 < seen.count(("depth",)) < 32
    model.seen_missing.clear()
    train_one_epoch(model, _batches(3), opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                    state=EpochState(), num_batches=3,
                    options=TrainStepOptions(always_missing=("depth",), modality_dropout=0.9))
    assert model.seen_missing == [("depth",)] * 3  # never drops the last remaining stream


def test_evaluate_with_missing_modality():
    model = Tiny()
    data = _batches(2)
    res = evaluate(model, data, modalities=("rgb", "depth"), num_classes=3, device=torch.device("cpu"),
                   missing=("depth",))
    assert set(model.seen_missing) == {("depth",)} and res["missing"] == ["depth"]
    assert res["pixels"] == 2 * 2 * 8 * 8


def test_tta_averages_scales_and_flips():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = {"rgb": torch.randn(1, 3, 16, 16), "depth": torch.randn(1, 1, 16, 16)}
    plain = predict(model, x)
    assert torch.allclose(plain, model(x).softmax(1))
    flipped = predict(model, x, flip=True)
    by_hand = 0.5 * (model(x).softmax(1) + model({k: v.flip(-1) for k, v in x.items()}).softmax(1).flip(-1))
    assert torch.allclose(flipped, by_hand, atol=1e-6)
    ms = predict(model, x, scales=(0.5, 1.0), flip=True)
    assert ms.shape == (1, 3, 16, 16) and torch.allclose(ms.sum(1), torch.ones(1, 16, 16), atol=1e-5)
    res = evaluate(model, _batches(1, size=16), modalities=("rgb", "depth"), num_classes=3,
                   device=torch.device("cpu"), tta=True, tta_scales=(0.5, 1.0))
    assert math.isnan(res["loss"]) and 0 <= res["miou"] <= 1


def test_callback_list_checks_interface():
    class Half:
        def on_train_start(self, model):
            pass

    with pytest.raises(TypeError, match="lacks the method on_after_backward"):
        CallbackList([Half()])


def test_non_finite_loss_is_reported():
    model = Tiny()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    opt = build_optimizer(model, lr=0.01, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        train_one_epoch(model, _batches(1), opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                        state=EpochState(), num_batches=1)


def test_interpret_gradient_callback_runs_in_the_loop():
    """The interpretability helper's ModalityBalanceCallback works through our hook calls."""
    import fusionzoo as fz
    from fusionzoo.interpret.callbacks import ModalityBalanceCallback

    torch.manual_seed(0)
    model = fz.create_model("late_mean_resnet18", num_classes=3, modalities=("rgb", "depth"))
    cb = ModalityBalanceCallback()
    hooks = CallbackList([cb])
    hooks.on_train_start(model)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    batches = _batches(2, size=32)
    state = EpochState()
    train_one_epoch(model, batches, opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                    state=state, num_batches=2, callbacks=hooks)
    hooks.on_epoch_end(0, {"loss": 1.0})
    hooks.on_train_end(model)
    hist = hooks.state_dict()["0:ModalityBalanceCallback"]
    assert [row["step"] for row in hist["steps"]] == [0, 1]
    assert all(row["grad_norm"]["depth"] > 0 for row in hist["steps"])


def test_metrics_logger_writes_jsonl_and_mirrors_to_tensorboard(tmp_path, monkeypatch):
    import json
    import sys
    import types

    from fusionzoo.engine.loop import MetricsLogger

    scalars = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLogger(tmp_path)
    log.log({"kind": "epoch", "epoch": 0, "step": 5, "val_miou": 0.5, "val_iou": [float("nan"), 1.0]})
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["val_iou"] == [None, 1.0]  # NaN is not JSON: absent classes become null
    assert scalars == [("epoch/val_miou", 0.5, 5), "closed"]
    silent = MetricsLogger(tmp_path / "other", enabled=False)  # ranks other than 0
    silent.log({"kind": "train", "step": 1})
    assert not (tmp_path / "other").exists()


def test_split_batch_returns_the_model_inputs_only():
    batch = {"rgb": torch.zeros(2, 3, 4, 4), "depth": torch.zeros(2, 1, 4, 4), "mask": torch.zeros(2, 4, 4, dtype=torch.long)}
    inputs = split_batch(batch, ("rgb", "depth"), torch.device("cpu"))
    assert list(inputs) == ["rgb", "depth"]  # targets come from the task (Task.targets)
    with pytest.raises(KeyError, match="thermal"):
        split_batch(batch, ("rgb", "thermal"), torch.device("cpu"))
