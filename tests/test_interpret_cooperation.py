"""Cooperation during optimization (issue 21, item 4): known answers of the gradient-direction and
learning-speed callbacks on tiny models, and the callbacks' path from train.py to metrics.jsonl,
training_history and the report's figures."""

from __future__ import annotations

import json
import math

import pytest
import torch
from process_helpers import train_script
from torch import nn

import fusionzoo as fz
from fusionzoo.engine.builders import build_callbacks
from fusionzoo.engine.config import ConfigError, TrainConfig
from fusionzoo.engine.loop import CallbackList, EpochState, TrainStepOptions, set_bn_eval, train_one_epoch
from fusionzoo.interpret.callbacks import OGMGECallback
from fusionzoo.interpret.cooperation import (
    EpochInterpretCallback,
    GradientDirectionCallback,
    LearningSpeedCallback,
    _utilisation,
    shared_parameters,
)
from fusionzoo.interpret.runs import training_history
from fusionzoo.interpret.training_report import training_figures
from fusionzoo.models.base import FusionModel

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class TinySum(FusionModel):
    """Two 1x1-conv encoders summed, a shared 1x1-conv head (tap ``decoder.out`` on the sum); the base
    class zero-fills missing modalities, as every fusionzoo model does."""

    def __init__(self, width: int = 4, classes: int = 2, head_bias: bool = True) -> None:
        super().__init__(("rgb", "depth"), classes, {"rgb": 1, "depth": 1})
        self.encoders = nn.ModuleDict({m: nn.Conv2d(1, width, 1) for m in self.modalities})
        self.head = nn.Conv2d(width, classes, 1, bias=head_bias)
        self.taps.declare("decoder.out", width, 1)

    def forward_logits(self, xs, missing):
        return self.head(self.taps("decoder.out", sum(self.encoders[m](xs[m]) for m in self.modalities)))


def _world(n: int, seed: int, rgb_signal: float = 1.0, depth_signal: float = 0.2, depth_noise: float = 1.0):
    """Per-image label y in {0, 1}: RGB shows it clearly, depth weakly under noise (32x32 images)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s = (2 * y - 1).float()[:, None, None, None]
    return {"rgb": rgb_signal * s + 0.1 * torch.randn(n, 1, 32, 32, generator=g),
            "depth": depth_signal * s + depth_noise * torch.randn(n, 1, 32, 32, generator=g),
            "mask": y[:, None, None].expand(n, 32, 32).clone()}


class Collect:
    """A MetricsLogger stand-in: the records the training loop writes."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def log(self, record: dict) -> None:
        self.rows.append(record)


def test_cosine_is_one_for_identical_paths_and_minus_one_for_a_constructed_conflict():
    batch = _world(6, 0)
    batch["depth"] = batch["rgb"].clone()                    # the same input through both paths
    model = TinySum().train()
    with torch.no_grad():
        model.encoders["depth"].load_state_dict(model.encoders["rgb"].state_dict())
    cb = GradientDirectionCallback(log_every=1)
    cb.on_train_start(model)
    assert [n for n, _ in cb.shared] == ["head.weight", "head.bias"]
    row = cb.measure(cb.modality_gradients(model, batch), [torch.ones_like(p) for _, p in cb.shared])
    assert row["cosine"]["rgb|depth"] == pytest.approx(1.0, abs=1e-9) and row["conflict"]["rgb|depth"] == 0.0
    # depth = -rgb through a zero head (no bias): both one-modality passes see the same logits, so the
    # head-weight gradients are delta x h^T with h_depth = -h_rgb: exactly opposite
    model = TinySum(head_bias=False).train()
    with torch.no_grad():
        model.encoders["depth"].weight.copy_(-model.encoders["rgb"].weight)
        model.encoders["depth"].bias.copy_(-model.encoders["rgb"].bias)
        model.head.weight.zero_()
    cb = GradientDirectionCallback(log_every=1)
    cb.on_train_start(model)
    row = cb.measure(cb.modality_gradients(model, batch), [p.detach() for _, p in cb.shared])
    assert row["cosine"]["rgb|depth"] == pytest.approx(-1.0, abs=1e-9)
    assert row["conflict"]["rgb|depth"] == 1.0 and row["by_module"]["head"]["rgb|depth"] == pytest.approx(-1.0)
    assert row["norm"]["rgb"] == pytest.approx(row["norm"]["depth"]) and row["norm"]["rgb"] > 0


def test_records_per_logged_step_with_bias_corrected_ema():
    model = TinySum()
    cb = GradientDirectionCallback(log_every=2, ema=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches, log = [_world(4, s) for s in range(5)], Collect()
    cb.on_train_start(model)
    train_one_epoch(model, batches, opt, None, modalities=model.modalities, device=torch.device("cpu"),
                    state=EpochState(), num_batches=5, callbacks=CallbackList([cb]), logger=log)
    rows = [r for r in log.rows if r["kind"] == "grad_direction"]
    assert [r["step"] for r in rows] == [1, 3, 5] and all(r["kind"] == "grad_direction" and r["scope"] == "step"
                                                          for r in rows)
    assert cb.records() == []                                # drained
    c = [r["cosine"]["rgb|depth"] for r in rows]
    assert rows[0]["cosine_ema"]["rgb|depth"] == pytest.approx(c[0])      # bias correction: first EMA = value
    expect = (0.25 * c[0] + 0.5 * c[1]) / (1 - 0.25)                       # (0.5 * 0.5 c0 + 0.5 c1) / (1 - 0.5^2)
    assert rows[1]["cosine_ema"]["rgb|depth"] == pytest.approx(expect)
    assert all(-1 <= r["cosine_to_update"]["rgb"] <= 1 for r in rows)


def _train(model, callbacks=(), steps=40, options: TrainStepOptions | None = None, lr=0.05) -> list[dict]:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches, log, hooks = [_world(16, 100 + s) for s in range(steps)], Collect(), CallbackList(list(callbacks))
    hooks.on_train_start(model)
    train_one_epoch(model, batches, opt, None, modalities=model.modalities, device=torch.device("cpu"),
                    state=EpochState(), num_batches=steps, callbacks=hooks, options=options or TrainStepOptions(),
                    logger=log)
    return log.rows


def _measure(**kwargs) -> tuple[float, dict[str, float]]:
    """Train TinySum from seed 0 (kwargs: extra callbacks, step options); the final conditional learning
    speed rgb|depth and the conditional utilisation rates on 32 held-out images."""
    torch.manual_seed(0)
    model, speed = TinySum(), LearningSpeedCallback()
    rows = _train(model, [speed, *kwargs.pop("extra", ())], **kwargs)
    rec = [r for r in rows if r["kind"] == "learning_speed"][-1]
    assert rec["mu_update"]["rgb"] > 0 and rec["mu_update"]["depth"] > 0
    held_out = _world(32, 999)
    epoch = EpochInterpretCallback(val_set=[{k: v[i] for k, v in held_out.items()} for i in range(32)], images=32,
                                   metrics=("contribution",))
    epoch.on_train_start(model)
    epoch.on_epoch_end(0, None)
    (row,) = epoch.records()
    return rec["conditional_speed"]["rgb|depth"], row["utilisation"]


def test_the_easy_modality_is_learned_first_and_remedies_move_the_measures():
    speed, util = _measure()
    assert speed > 0.3                                        # RGB (the easy modality) learns > 2x faster
    assert util["rgb"] > 0.2 > util["depth"]                  # and the model needs RGB, hardly depth
    ogm_speed, _ = _measure(extra=[OGMGECallback(alpha=2.0, ge=False, end_epoch=0)])
    drop_speed, _ = _measure(options=TrainStepOptions(modality_dropout=0.5, dropout_candidates=("rgb",)))
    assert ogm_speed < speed - 0.1 and drop_speed < speed - 0.1   # both slow RGB's encoder relative to depth's
    # (utilisation does not move here: given RGB, depth is redundant, and depth alone is at its noise limit)


def test_learning_speed_definition_on_one_step():
    model = TinySum()
    cb = LearningSpeedCallback()
    cb.on_train_start(model)
    batch = _world(4, 1)
    loss = torch.nn.functional.cross_entropy(model({m: batch[m] for m in model.modalities}), batch["mask"])
    loss.backward()
    w0 = {m: torch.cat([p.detach().flatten() for p in model.encoders[m].parameters()]).double() for m in model.modalities}
    g = {m: torch.cat([p.grad.flatten() for p in model.encoders[m].parameters()]).double() for m in model.modalities}
    cb.on_after_backward(model, 0, 0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    cb.on_step_end(model, 0, 0)
    (rec,) = cb.records()
    for m in model.modalities:
        assert rec["grad_ratio"][m] == pytest.approx(float(g[m] @ g[m] / (w0[m] @ w0[m])))
        assert rec["update_ratio"][m] == pytest.approx(0.01 * rec["grad_ratio"][m])   # SGD: update = lr * grad
    assert rec["conditional_speed"]["rgb|depth"] == pytest.approx(
        math.log10(rec["mu_update"]["rgb"] / rec["mu_update"]["depth"]))


def test_utilisation_rate_from_coalitions():
    section = {"metric": "mIoU", "coalitions": {"none": {"miou": 0.1}, "rgb": {"miou": 0.6}, "depth": {"miou": 0.2},
                                                "rgb+depth": {"miou": 0.8}}}
    full, u = _utilisation(section, ["rgb", "depth"])
    assert full == 0.8 and u["rgb"] == pytest.approx((0.8 - 0.2) / 0.8) and u["depth"] == pytest.approx(0.25)


def test_shared_parameters_exclude_what_modalities_own():
    model = TinySum()
    owned = {id(p) for m in model.modalities for p in model.modality_parameters(m)}
    assert shared_parameters(model) and not any(id(p) in owned for _, p in shared_parameters(model))


def test_train_py_records_reach_metrics_history_and_report(tmp_path):
    train = train_script()
    train.main(["--model", "hybrid_gate", "--model-kwargs", "{encoder: resnet10t}", "--image-size", "32,32",
                "--train-samples", "4", "--val-samples", "2", "--batch-size", "2", "--epochs", "2", "--threads", "1",
                "--no-progress", "--no-report", "--out-dir", str(tmp_path), "--run-name", "coop",
                "--callbacks", "modality_balance,grad_direction,learning_speed,epoch_interpret,ogm_ge",
                "--callback-options", "{grad_direction: {log_every: 2}, epoch_interpret: {images: 2}}"])
    run = tmp_path / "coop"
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds.count("grad_direction") == 2 and kinds.count("learning_speed") == 4
    assert kinds.count("epoch_interpret") == 2
    ep = next(r for r in recs if r["kind"] == "epoch_interpret")
    val = next(r for r in recs if r["kind"] == "epoch")
    assert ep["value"] == pytest.approx(val["val_miou"])      # same 2 images, same weights
    assert set(ep["utilisation"]) == {"rgb", "depth"} and ep["cka_target"] == "decoder.out"
    hist = training_history(run)
    assert hist["state_key"] == "modality_balance" and set(hist["records"]) == {
        "grad_direction", "learning_speed", "epoch_interpret"}
    ogm = hist["callbacks"]["ogm_ge"]
    assert ogm["source"] == "heads" and ogm["end_epoch"] == 0 and [e["num_steps"] for e in ogm["epochs"]] == [2, 0]
    names = [name for name, _, _ in training_figures(hist, "hybrid", tmp_path / "figs")]
    assert names == ["cooperation_gradients", "cooperation_speed", "cooperation_epochs", "ogm_ge"]
    # a resume from the end of epoch 0 drops the records after it, by each record's scope
    state = EpochState(1, 0, 2)
    train._drop_records_after(run / "metrics.jsonl", state)
    kept = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r.get("step"), r.get("epoch")) for r in kept if r["kind"] != "train"] == [
        ("grad_direction", 1, 0), ("learning_speed", 1, 0), ("learning_speed", 2, 0), ("epoch", 2, 0),
        ("epoch_interpret", 2, 0)]


@pytest.mark.parametrize(("options", "message"), [
    ({"grad_direction": {"log_every": 0}}, "--callbacks grad_direction: grad_direction log_every must be >= 1"),
    ({"grad_direction": {"every": 2}}, "--callback-options grad_direction: unknown setting(s) ['every']"),
    ({"epoch_interpret": {"metrics": ["cka", "shapley"]}}, "--callbacks epoch_interpret: epoch_interpret metrics"),
    ({"epoch_interpret": {"policy": "blank"}}, "--callbacks epoch_interpret: epoch_interpret policy"),
])
def test_bad_callback_settings_name_the_callback(options, message):
    with pytest.raises(ConfigError) as err:
        build_callbacks(["grad_direction", "epoch_interpret"], options, context={"val_set": [0]})
    assert str(err.value).startswith(message)


def test_options_for_an_unselected_callback_are_refused():
    with pytest.raises(ConfigError, match="callback_options.*must configure callbacks that --callbacks selects"):
        TrainConfig(callbacks=("grad_direction",), callback_options={"ogm_ge": {"alpha": 0.3}})


def test_epoch_interpretation_keeps_every_module_flag():
    """interpret.run switches the model to eval; afterwards --freeze-bn's BatchNorms stay frozen."""
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=3).train()
    set_bn_eval(model)
    flags = {n: m.training for n, m in model.named_modules()}
    g = torch.Generator().manual_seed(0)
    val = [{"rgb": torch.randn(3, 32, 32, generator=g), "depth": torch.randn(1, 32, 32, generator=g),
            "mask": torch.randint(0, 3, (32, 32), generator=g)} for _ in range(2)]
    cb = EpochInterpretCallback(val_set=val, images=2, metrics=("contribution",))
    cb.on_train_start(model)
    cb.on_epoch_end(0, {"val_miou": 0.5})
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert cb.records()[0]["images"] == 2
    cb.on_epoch_end(1, {"train_loss": 1.0})                  # no evaluation this epoch: nothing measured
    assert cb.records() == []
