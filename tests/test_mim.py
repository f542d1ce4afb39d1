"""MIM's Unimodal Purification (fusionzoo.fusion.purification, fusionzoo.models.mim): the hard concrete
gate against its closed forms, the family's taps and penalty, the gates' optimiser group, the
tasks' L0 term, and the planted-impurity known answer (docs/mim.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusionzoo as fz
from fusionzoo.data import collate, create_dataset
from fusionzoo.engine.builders import build_task
from fusionzoo.engine.config import ConfigError, TrainConfig, parse_args
from fusionzoo.engine.optim import build_optimizer
from fusionzoo.fusion.purification import HardConcrete, PurificationFusion
from fusionzoo.tasks import get_task

SIZE = 64
MIM = {"beta": 1 / 3, "gamma": -0.2, "zeta": 1.0, "loc_bias": 3.0, "threshold": 0.6}  # MIM's modules/model.py


def inputs(modalities=("rgb", "depth"), batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(batch, fz.DEFAULT_CHANNELS[m], SIZE, SIZE, generator=g) for m in modalities}


def build(name: str = "mim_mul", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return fz.create_model(name, **{"encoder": "resnet18", "num_classes": 3, **kwargs})


# -- part 5: the hard concrete gate against its closed forms ------------------------------------------------
N_MC = 400_000  # Monte-Carlo draws per location: binomial standard error <= 0.5 / sqrt(N) = 0.0008


def saturation_point(hc: HardConcrete, dtype: torch.dtype) -> float:
    """Smallest ``x = (L + log_alpha) / beta`` at which the relaxed gate computes to exactly 1 in
    ``dtype`` (bisection on the gate itself, with ``u = 1/2``, i.e. ``L = 0``): with ``zeta = 1``
    the gate reaches 1 only because ``sigmoid`` rounds to 1 (float32: x = 16.6, float64: 36.7)."""
    lo, hi, half = 0.0, 100.0, torch.tensor(0.5, dtype=dtype)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if hc.relaxed(torch.tensor(mid * hc.beta, dtype=dtype), half) == 1 else (mid, hi)
    return hi


@pytest.mark.parametrize("zeta", [1.0, 1.1])  # MIM's stretch, and Louizos et al.'s (where P(z = 1) > 0)
@pytest.mark.parametrize("logits", [-6.0, -3.0, -2.5, 0.0])  # log_alpha = logits + 3: -3, 0, 0.5, 3
def test_hard_concrete_matches_its_closed_forms(logits: float, zeta: float) -> None:
    """P(z != 0) (the expected L0 penalty), P(z = 0), P(z = 1) and the keep probability P(z > 0.6)
    of MIM's gate (beta 1/3, gamma -0.2, loc_bias 3) from N_MC seeded uniform draws in float64,
    within 5 binomial standard errors of the closed form (and the closed forms equal the formulas
    written out here)."""
    hc = HardConcrete(**{**MIM, "zeta": zeta})
    la = torch.tensor(logits + 3.0, dtype=torch.float64)
    u = torch.rand(N_MC, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    z = hc.relaxed(la, u)
    beta, gamma = 1 / 3, -0.2
    closed = {
        "nonzero": (z > 0, 1 / (1 + math.exp(-(float(la) - beta * math.log(-gamma / zeta))))),
        "zero": (z == 0, 1 - 1 / (1 + math.exp(-(float(la) - beta * math.log(-gamma / zeta))))),
        "one": (z == 1, 1 / (1 + math.exp(-(float(la) - beta * math.log((1 - gamma) / (zeta - 1))))) if zeta > 1 else 0.0),
        "keep": (z > 0.6, 1 / (1 + math.exp(-(float(la) - beta * math.log((0.6 - gamma) / (zeta - 0.6)))))),
    }
    ours_one = hc.exceed_probability(la, 1.0)
    if zeta == 1.0:  # exact arithmetic: never 1; computed: 1 once sigmoid rounds to 1 (see saturation_point)
        assert float(ours_one) == 0.0
        closed["one"] = (z == 1, 1 / (1 + math.exp(-(float(la) - beta * saturation_point(hc, torch.float64)))))
    ours = {"nonzero": hc.nonzero_probability(la), "zero": 1 - hc.nonzero_probability(la),
            "one": torch.tensor(closed["one"][1], dtype=torch.float64) if zeta == 1.0 else ours_one, "keep": hc.keep_probability(la)}
    for key, (event, p) in closed.items():
        assert float(ours[key]) == pytest.approx(p, rel=1e-12, abs=1e-15), key
        se = math.sqrt(max(p * (1 - p), 1e-12) / N_MC)
        assert abs(float(event.double().mean()) - p) <= 5 * se + 1e-12, (key, float(event.double().mean()), p)


def test_penalty_is_mims_formula_and_eval_gate_is_the_likelier_training_value() -> None:
    hc = HardConcrete(**MIM)
    logits = torch.linspace(-8, 4, 49, dtype=torch.float64)
    # MIM: penalty = sigmoid(input + loc_bias - temp * log(-gamma / zeta))
    assert torch.allclose(hc.nonzero_probability(hc.log_alpha(logits)),
                          torch.sigmoid(logits + 3 - (1 / 3) * math.log(0.2)), rtol=1e-12)
    mask, _ = hc.eval()(logits)
    keep = hc.keep_probability(hc.log_alpha(logits))
    assert torch.equal(mask, (keep >= 0.5).double())
    assert set(mask.tolist()) == {0.0, 1.0}  # the range crosses the boundary at logits = log(2) / 3 - 3


def test_training_gate_is_binary_with_a_straight_through_gradient() -> None:
    hc = HardConcrete(**MIM).train()
    torch.manual_seed(0)
    logits = torch.full((200_000,), -2.5, dtype=torch.float64, requires_grad=True)
    mask, _ = hc(logits)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    p = float(hc.keep_probability(torch.tensor(0.5, dtype=torch.float64)))
    assert abs(float(mask.detach().mean()) - p) < 5 * math.sqrt(p * (1 - p) / logits.numel())
    mask.sum().backward()  # straight-through: the gradient of the relaxed gate, not of the step
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_bad_gate_settings_raise() -> None:
    with pytest.raises(ValueError, match="beta"):
        HardConcrete(beta=0)
    with pytest.raises(ValueError, match="zeta"):
        HardConcrete(zeta=0.9)
    with pytest.raises(ValueError, match="threshold"):
        HardConcrete(threshold=1.0)
    with pytest.raises(ValueError, match="combine"):
        PurificationFusion(8, 2, combine="max")
    with pytest.raises(ValueError, match="mask"):
        fz.create_model("mim_add", encoder="resnet18", mask="pixel")


# -- part 1: the family ---------------------------------------------------------------------------------------
def test_family_lists_segmentation_and_detection_entries() -> None:
    names = fz.list_models("mim_*")
    assert {"mim_add", "mim_mul", "mim_concat", "mim_mul_resnet18", "mim_mul_resnet50"} <= set(names)
    assert {fz.model_entry(n).task for n in names} == {"segmentation"}
    detectors = fz.list_models("*_mim_*", task="detection")
    assert {"fcos_mim_add_resnet18", "fcos_mim_mul_resnet18", "fcos_mim_concat_resnet50"} <= set(detectors)
    assert all(fz.model_entry(n).fusion == "middle" and "MIM" in fz.model_entry(n).paper for n in names + detectors)


@pytest.mark.parametrize("mask, channels", [("spatial", 1), ("channel", None)])
def test_gate_taps_are_binary_masks_and_purified_is_the_gated_feature(mask: str, channels: int | None) -> None:
    model = build("mim_add", mask=mask).eval()
    info = model.tap_info()
    with torch.no_grad(), fz.capture(model, "*.stage*") as acts:
        model(inputs())
    for m in model.modalities:
        for s in ("stage1", "stage2", "stage3", "stage4"):
            gate, feat = acts[f"{m}.{s}.gate"], acts[f"{m}.{s}"]
            assert info[f"{m}.{s}.gate"].kind == "gate" and not info[f"{m}.{s}.gate"].after_fusion
            assert gate.shape == (2, channels or feat.shape[1], *feat.shape[-2:])
            assert set(gate.unique().tolist()) <= {0.0, 1.0}
            assert torch.equal(acts[f"{m}.{s}.purified"], feat * gate)
    # add: the fused map is the sum of the purified maps
    assert torch.allclose(acts["fused.stage2"], acts["rgb.stage2.purified"] + acts["depth.stage2.purified"])


def test_gate_penalty_known_value_and_gradient() -> None:
    """With every gate's last conv zero and bias b, P(gate != 0) = sigmoid(b + 3 - log(0.2) / 3)
    everywhere, so the penalty (sum over modalities of the mean over gates) is 2 x that."""
    model = build("mim_mul").train()
    b = -2.0
    for op in model.fusions.values():
        for gate in op.gates:
            torch.nn.init.zeros_(gate.logits[-1].weight)
            torch.nn.init.constant_(gate.logits[-1].bias, b)
    with pytest.raises(RuntimeError, match="run the model first"):
        model.gate_penalty()
    model(inputs())
    penalty = model.gate_penalty()
    expected = 2 / (1 + math.exp(-(b + 3 - math.log(0.2) / 3)))
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    assert all(p.grad is not None for p in model.gate_parameters())
    assert {id(p) for p in model.gate_parameters()} == {id(p) for op in model.fusions.values() for p in op.gates.parameters()}


def test_gates_get_their_own_optimizer_group() -> None:
    model = build("mim_concat")
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01, gate_lr=0.05)
    assert len(opt.param_groups) == 3
    gates = opt.param_groups[2]
    assert gates["lr"] == 0.05 and gates["weight_decay"] == 0.0
    assert {id(p) for p in gates["params"]} == {id(p) for p in model.gate_parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert build_optimizer(model, lr=1e-3, weight_decay=0.01).param_groups[2]["lr"] == 1e-3  # default: lr
    with pytest.raises(ValueError, match="gate_lr.*no gate_parameters"):
        build_optimizer(fz.create_model("fusenet_resnet18", num_classes=3), lr=1e-3, weight_decay=0.0, gate_lr=0.1)


def test_segmentation_task_adds_the_weighted_penalty() -> None:
    model = build("mim_mul").train()
    x, target = inputs(), torch.randint(0, 3, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(2))
    losses = {}
    with torch.no_grad():  # train mode (sampled gates), values only
        for weight in (None, 0.0, 0.5):
            torch.manual_seed(3)  # the same gate draws in every pass
            losses[weight] = get_task(model, gate_penalty_weight=weight).training_loss(model, x, target)
        torch.manual_seed(3)
        logits = model(x)
        penalty = float(model.gate_penalty())
    assert float(losses[0.0]) == pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-5)  # weight 0: plain CE
    assert float(losses[None] - losses[0.0]) == pytest.approx(0.1 * penalty, rel=1e-4)  # MIM's p_w = 0.1
    assert float(losses[0.5] - losses[0.0]) == pytest.approx(0.5 * penalty, rel=1e-4)


def test_detection_task_adds_the_penalty() -> None:
    torch.manual_seed(0)
    model = fz.create_model("fcos_mim_add_resnet18", num_classes=3, fpn_channels=64).train()
    x = inputs(("rgb", "thermal"))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    assert [t for t in model.tap_info() if t.endswith(".gate")] == [
        f"{m}.stage{k}.gate" for k in (2, 3, 4) for m in ("rgb", "thermal")]
    losses = {}
    with torch.no_grad():
        for weight in (0.0, 2.0):
            torch.manual_seed(3)
            losses[weight] = get_task(model, gate_penalty_weight=weight).training_loss(model, x, targets)
    assert float(losses[2.0] - losses[0.0]) == pytest.approx(2.0 * float(model.gate_penalty()), rel=1e-4)
    with pytest.raises(ValueError, match="label_smoothing"):
        get_task(model, label_smoothing=0.1)


def test_train_flags_and_their_refusal_on_models_without_gates() -> None:
    cfg, _ = parse_args(["--model", "mim_mul_resnet18", "--gate-penalty-weight", "0.3", "--gate-lr", "0.01"])
    assert cfg.gate_penalty_weight == 0.3 and cfg.gate_lr == 0.01
    model = fz.create_model("mim_mul_resnet18", num_classes=5)
    assert build_task(cfg, model).gate_penalty_weight == 0.3
    with pytest.raises(ConfigError, match="gate_lr.*purification gates.*fusenet_resnet18"):
        build_task(TrainConfig(model="fusenet_resnet18", gate_lr=0.01), fz.create_model("fusenet_resnet18", num_classes=5))
    with pytest.raises(ConfigError, match="gate_penalty_weight"):
        TrainConfig(gate_penalty_weight=-1.0)


# -- part 4: known answer on the synthetic world --------------------------------------------------------------
def _encoder(in_chans: int) -> torch.nn.Sequential:
    """Three 3x3 convs to stride 4 (32 channels): a light stand-in for a timm encoder's stage 1."""
    layers: list[torch.nn.Module] = []
    for c_in, c_out, stride in ((in_chans, 16, 2), (16, 32, 2), (32, 32, 1)):
        layers += [torch.nn.Conv2d(c_in, c_out, 3, stride, 1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def gate_keep_rates(*, impurity: float, steps: int, size: int = 48, gate_lr: float = 1e-3, lr: float = 1e-2,
                    penalty_weight: float = 0.1, combine: str = "add", seed: int = 0) -> dict[str, list[float]]:
    """Train MIM's purification (PurificationFusion, MIM's gate settings and L0 weight) between two
    small encoders and a 3x3 head on synthetic RGB-D (256 training scenes, ``size`` px, batch 32,
    AdamW; gates in their own group at ``gate_lr``), then return per modality the eval-mode keep
    rate of its gates on the stride-4 cells that are >= 75% one class (val split, 64 scenes),
    per class, plus ``miou``."""
    def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ds = create_dataset("synthetic_rgbd", split=split, num_samples=n, image_size=(size, size), impurity=impurity)
        batch = collate([ds[i] for i in range(n)])
        return batch["rgb"], batch["depth"], batch["mask"]

    train, val = load("train", 256), load("val", 64)
    torch.manual_seed(seed)
    encoders = torch.nn.ModuleList([_encoder(3), _encoder(1)])
    op = PurificationFusion(32, 2, combine=combine, **MIM)
    head = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 5, 1))
    gates = list(op.gates.parameters())
    rest = [p for m in (encoders, head) for p in m.parameters()] + ([op.proj.weight, op.proj.bias] if combine != "add" else [])
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0},
                             {"params": gates, "lr": gate_lr, "weight_decay": 0.0}], lr=lr)

    def run(rgb: torch.Tensor, depth: torch.Tensor):
        parts = op.purify([encoders[0](rgb), encoders[1](depth)])
        logits = head(op.combine([p.feature for p in parts]))
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False), parts

    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train[0]), (32,), generator=g)
        logits, parts = run(train[0][idx], train[1][idx])
        penalty = sum(p.nonzero.mean() for p in parts)  # MIM: sum over modalities of the mean P(gate != 0)
        loss = F.cross_entropy(logits, train[2][idx]) + penalty_weight * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in (encoders, op, head):
        m.eval()
    with torch.no_grad():
        logits, parts = run(val[0], val[1])
    share = [F.avg_pool2d((val[2] == c).float()[:, None], 4)[:, 0] for c in range(5)]  # class share per cell
    out = {name: [float(p.mask[:, 0][s >= 0.75].mean()) for s in share] for name, p in zip(("rgb", "depth"), parts)}
    pred = logits.argmax(1)
    out["miou"] = [float(((pred == c) & (val[2] == c)).sum() / ((pred == c) | (val[2] == c)).sum().clamp(min=1))
                   for c in range(5)]
    return out


@pytest.mark.parametrize("second", ["depth", "thermal"])
def test_planted_impurity_is_false_signal_on_the_rgb_only_class_only(second: str) -> None:
    name = f"synthetic_rgb{second[0]}"
    clean = create_dataset(name, num_samples=6, image_size=(48, 64))
    planted = create_dataset(name, num_samples=6, image_size=(48, 64), impurity=0.6)
    assert clean.config.impurity == 0.0  # the documented world is unchanged (no draw taken when off)
    changed = total = 0
    for i in range(6):
        a, b = clean.raw(i), planted.raw(i)
        assert np.array_equal(a["rgb"], b["rgb"]) and np.array_equal(a["mask"], b["mask"])
        diff = (b[second] - a[second]) * (-1 if second == "depth" else 1)  # nearer / warmer
        where = diff != 0
        assert not where[a["mask"] != 1].any()  # nowhere but on class 1
        if second == "depth":  # 0.6 m nearer on the bands, up to the sensor noise that depends on depth
            assert np.allclose(diff[where], 0.6, atol=0.05)
        changed += int(where.sum())
        total += int((a["mask"] == 1).sum())
    assert 0.3 < changed / total < 0.7  # every other band of the stripes
    with pytest.raises(ValueError, match="impurity"):
        create_dataset(name, num_samples=1, impurity=-1.0)


# The synthetic world's own impurity: the RGB of background and of box_depth_only (class 2) is
# exactly what lies behind (a textured grey plane), while classes 1, 3 and 4 are coloured.
RGB_CARRIES_NOTHING = (0, 2)
RGB_CARRIES_THE_CLASS = (1, 3, 4)


@pytest.mark.slow
def test_known_answer_keep_rates_at_48px() -> None:
    """The confirming run behind docs/mim.md (48 px, 600 steps; ``pytest -m slow -s -k keep_rates``):
    RGB keep rate below 0.2 where RGB carries nothing and above 0.8 on the coloured classes; the
    depth gates' keep rate on the planted impurity (poster cells) is printed, not asserted."""
    rates = gate_keep_rates(impurity=0.6, steps=600)
    print({k: [round(v, 3) for v in vs] for k, vs in rates.items()})
    assert max(rates["rgb"][c] for c in RGB_CARRIES_NOTHING) < 0.2, rates
    assert min(rates["rgb"][c] for c in RGB_CARRIES_THE_CLASS) > 0.8, rates
