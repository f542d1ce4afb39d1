"""Registry-driven tests: every registered segmentation model, on tiny inputs, no network.

Ids are model names, so ``pytest -k cmx`` selects one method.
"""

from __future__ import annotations

import copy

import pytest
import torch
from meta_build import MetaKernelCache, meta_device
from safetensors.torch import load_file, save_file
from torch import nn

import fusionzoo as fz
from fusionzoo.stream_memo import reusing_streams

SIZE = 64
NUM_CLASSES = 3
ALL = fz.list_models(task="segmentation")
FAMILIES = [n for n in ALL if not fz.model_entry(n).encoder_fixed]
VARIANTS = [n for n in ALL if fz.model_entry(n).encoder_fixed]
SMALL_ENCODER = "convnext_atto"  # any timm encoder with strides 4..32 must work in a family entry

# Named variants on these encoders get every test on real tensors. The others (resnet50, pvt_v2_b2,
# the large published backbones) share their method's code with a light variant, so they get shape,
# gradient-reach and tap checks on the meta device (no memory, no arithmetic), plus one real run of
# every test per shared timm encoder (one used by several methods). Published backbones used by one
# method are run for real by their parity tests (tests/test_parity_*.py). Issue 12: the suite stays
# in minutes on 2 cores.
LIGHT_ENCODERS = {"resnet18", "mit_b0", "r18", "r18_nbt1d"}
LIGHT = [n for n in VARIANTS if fz.model_entry(n).encoder in LIGHT_ENCODERS]
HEAVY = [n for n in VARIANTS if n not in LIGHT]
_heavy_by_encoder: dict[str, list[str]] = {}
for _n in HEAVY:
    if not fz.model_entry(_n).published:  # a published backbone belongs to one network: its parity test runs it
        _heavy_by_encoder.setdefault(fz.model_entry(_n).encoder, []).append(_n)
# Early fusion first: one encoder, the cheapest real run.
REAL_HEAVY = sorted(
    min(names, key=lambda n: (not n.startswith("early_"), n)) for names in _heavy_by_encoder.values() if len(names) >= 3
)
FULL = LIGHT + REAL_HEAVY


def make_inputs(
    modalities: tuple[str, ...], batch: int = 2, size: int = SIZE, in_chans: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Seeded inputs; ``in_chans`` (a model's) overrides the default channels (CMX's published
    entries take a 3-channel X stream, as the authors do)."""
    g = torch.Generator().manual_seed(1)
    chans = {**fz.DEFAULT_CHANNELS, **(in_chans or {})}
    return {m: torch.randn(batch, chans[m], size, size, generator=g) for m in modalities}


def build(name: str, modalities: tuple[str, ...] = ("rgb", "depth")) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {} if fz.model_entry(name).encoder_fixed else {"encoder": SMALL_ENCODER}
    return fz.create_model(name, num_classes=NUM_CLASSES, modalities=modalities, **kwargs)


@pytest.fixture(scope="module", params=FULL)
def name(request: pytest.FixtureRequest) -> str:
    """Module-scoped, so pytest runs every test of one model before building the next."""
    return request.param


@pytest.fixture(scope="module")
def built(name: str) -> nn.Module:
    return build(name)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def check_taps_observed(info: dict, acts: dict) -> None:
    """Taps fire in their declared (execution) order with the declared channels and strides."""
    assert list(acts) == list(info), "taps must fire in their declared (execution) order"
    for tap, value in acts.items():
        meta = info[tap]
        assert value.shape[1] == meta.channels, tap
        if meta.reduction == 0:
            assert value.shape[-2:] == (1, 1), tap
        else:
            assert value.shape[-2:] == (SIZE // meta.reduction, SIZE // meta.reduction), tap


def training_loss(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A loss on the logits and on any training-time side outputs (ESANet's pyramid supervision)."""
    return out.square().mean() + sum(side.square().mean() for side in getattr(model, "side_logits", ()))


def test_zoo_size_and_families() -> None:
    assert len(VARIANTS) >= 24
    assert {fz.model_entry(n).fusion for n in VARIANTS} == {"early", "middle", "late", "hybrid"}
    for encoder in ("resnet18", "resnet50", "pvt_v2_b2"):
        assert {fz.model_entry(n).fusion for n in fz.list_models(f"*_{encoder}")} == {"early", "middle", "late", "hybrid"}


def test_every_variant_is_covered() -> None:
    assert set(LIGHT) | set(HEAVY) == set(VARIANTS) and not set(LIGHT) & set(HEAVY)
    assert {fz.model_entry(n).encoder for n in REAL_HEAVY} >= {"resnet50", "pvt_v2_b2"}


@pytest.mark.parametrize("heavy", HEAVY)
def test_heavy_variant_on_meta_device(heavy: str) -> None:
    """Shapes, taps and gradient reach of a heavy variant, built and run on the meta device."""
    with meta_device():
        torch.manual_seed(0)
        model = fz.create_model(heavy, num_classes=NUM_CLASSES).train()
    inputs = {k: v.to("meta") for k, v in make_inputs(model.modalities, in_chans=model.in_chans).items()}
    info = model.tap_info()
    with MetaKernelCache(), fz.capture(model) as acts:  # each distinct op signature's meta kernel runs once
        out = model(inputs)
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    check_taps_observed(info, acts)
    assert info["head.logits"].kind == "logits"
    with MetaKernelCache():
        training_loss(model, out).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"parameters without gradient (a dead branch?): {dead[:10]}"
    assert not any(m._forward_hooks for m in model.modules())
    aux = model.modalities[1]
    with pytest.raises(ValueError, match=aux):
        model({k: v for k, v in inputs.items() if k != aux})
    with pytest.raises(ValueError, match=r"rgb.*\(2, 4, 64, 64\).*\(B, 3, H, W\)"):
        model({**inputs, "rgb": torch.randn(2, 4, SIZE, SIZE, device="meta")})
    with meta_device():  # the config rebuilds the same architecture (the safetensors round trip's premise)
        clone = fz.create_model(**model.config)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_forward_shape_and_finite(built: nn.Module) -> None:
    model = built.eval()
    with torch.no_grad():
        out = model(make_inputs(model.modalities, in_chans=model.in_chans))
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    assert torch.isfinite(out).all()


def test_backward_reaches_every_parameter(built: nn.Module) -> None:
    model = built.train()
    model.zero_grad(set_to_none=True)
    out = model(make_inputs(model.modalities, in_chans=model.in_chans))
    training_loss(model, out).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"parameters without gradient (a dead branch?): {dead[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_taps_declared_equal_observed(name: str, built: nn.Module) -> None:
    model = built.eval()
    info = model.tap_info()
    with torch.no_grad(), fz.capture(model) as acts:
        model(make_inputs(model.modalities, in_chans=model.in_chans))
    check_taps_observed(info, acts)
    streams = {meta.stream for meta in info.values()}
    assert "head" in streams and "fused" in streams or any(m in streams for m in model.modalities)
    assert info["head.logits"].kind == "logits"


def test_capture_is_observational_and_leaves_no_hooks(name: str, built: nn.Module) -> None:
    model = built.eval()
    inputs = make_inputs(model.modalities, in_chans=model.in_chans)
    with torch.no_grad():
        before = model(inputs)
        with fz.capture(model, "*") as acts:
            during = model(inputs)
        after = model(inputs)
    assert acts
    assert torch.equal(before, during) and torch.equal(before, after)
    assert not any(m._forward_hooks for m in model.modules())


def test_bad_inputs_raise_clear_errors(name: str, built: nn.Module) -> None:
    model = built
    good = make_inputs(model.modalities, in_chans=model.in_chans)
    aux = model.modalities[1]
    with pytest.raises(ValueError, match=aux):
        model({k: v for k, v in good.items() if k != aux})
    with pytest.raises(ValueError, match="thermal"):
        model({**good, "thermal": torch.randn(2, 1, SIZE, SIZE)})
    with pytest.raises(ValueError, match=r"rgb.*\(2, 4, 64, 64\).*\(B, 3, H, W\)"):
        model({**good, "rgb": torch.randn(2, 4, SIZE, SIZE)})
    with pytest.raises(ValueError, match=rf"{aux}.*\(2, 1, 32, 32\)"):
        model({**good, aux: torch.randn(2, 1, 32, 32)})


def test_missing_modality_policy(name: str, built: nn.Module) -> None:
    model = built.eval()
    inputs = make_inputs(model.modalities, in_chans=model.in_chans)
    aux = model.modalities[1]
    heads = ["head.logits"] + [f"{m}.head" for m in model.modalities if f"{m}.head" in model.tap_info()]
    with torch.no_grad(), fz.capture(model, *heads) as acts:
        out = model({"rgb": inputs["rgb"]}, missing=(aux,))
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    fusion = fz.model_entry(name).fusion
    with torch.no_grad():
        zero_filled = model({**inputs, aux: torch.zeros_like(inputs[aux])})
    if fusion in ("early", "middle"):
        # Documented policy: the absent stream is zeros (the normalized mean).
        assert torch.equal(out, zero_filled)
    else:
        # Late/hybrid decision fusion also drops the absent modality's own prediction.
        assert not torch.allclose(out, zero_filled)
        if fusion == "late":
            assert torch.allclose(acts["head.logits"], acts["rgb.head"], atol=1e-5)


def test_safetensors_round_trip(built: nn.Module, tmp_path) -> None:
    model = built.eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(123)  # different init, so equality below proves the load
    clone = fz.create_model(**model.config).eval()
    clone.load_state_dict(load_file(str(path)))
    inputs = make_inputs(model.modalities, in_chans=model.in_chans)
    with torch.no_grad():
        assert torch.equal(model(inputs), clone(inputs))


@pytest.mark.parametrize("small", [n for n in VARIANTS if n.endswith("_resnet18")])
def test_rgb_thermal(small: str) -> None:
    name = small
    model = build(name, ("rgb", "thermal")).eval()
    assert model.modalities == ("rgb", "thermal")
    assert any(t.startswith("thermal.") for t in model.tap_info()) or fz.model_entry(name).fusion == "early"
    with torch.no_grad():
        out = model(make_inputs(("rgb", "thermal")))
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)


@pytest.mark.parametrize("small", [n for n in VARIANTS if n.endswith("_resnet18")])
def test_three_modalities_or_clear_error(small: str) -> None:
    name = small
    three = ("rgb", "depth", "thermal")
    entry = fz.model_entry(name)
    if entry.max_modalities == 2:
        with pytest.raises(ValueError, match="exactly 2"):
            fz.create_model(name, num_classes=NUM_CLASSES, modalities=three)
        assert name not in fz.list_models(modalities=three)
        return
    assert name in fz.list_models(modalities=three)
    model = build(name, three).eval()
    with torch.no_grad():
        out = model(make_inputs(three))
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)


def test_capture_gradients_and_patterns() -> None:
    model = build("late_gate_resnet18").train()
    with fz.capture(model, "depth.stage*", "head.gate", grads=True) as acts:
        model(make_inputs(model.modalities, in_chans=model.in_chans)).square().mean().backward()
    assert list(acts) == ["depth.stage1", "depth.stage2", "depth.stage3", "depth.stage4", "head.gate"]
    assert set(acts.grads) == set(acts)
    assert all(acts.grads[k].shape == acts[k].shape for k in acts)
    with pytest.raises(KeyError, match="no tap"), fz.capture(model, "thermal.*"):
        pass
    # Two forward passes inside one capture are refused: each tap must fire exactly once.
    with pytest.raises(RuntimeError, match="fired twice"), torch.no_grad(), fz.capture(model, "head.logits"):
        model(make_inputs(model.modalities, in_chans=model.in_chans))
        model(make_inputs(model.modalities, in_chans=model.in_chans))
    with pytest.raises(RuntimeError, match="did not fire"), fz.capture(model, "head.logits"):
        pass
    assert not any(m._forward_hooks for m in model.modules())


def test_capture_survives_inplace_ops() -> None:
    model = build("early_concat_resnet18").eval()
    with torch.no_grad(), fz.capture(model, "fused.stage1") as acts:
        model(make_inputs(model.modalities, in_chans=model.in_chans))
        first = acts["fused.stage1"].clone()
    with torch.no_grad(), fz.capture(model, "fused.stage1") as again:
        model(make_inputs(model.modalities, in_chans=model.in_chans))
    assert torch.equal(first, again["fused.stage1"])


def test_family_entries_forward_backward(family: str) -> None:
    model = build(family).train()
    assert model.config["encoder"] == SMALL_ENCODER
    out = model(make_inputs(model.modalities, in_chans=model.in_chans))
    assert out.shape == (2, NUM_CLASSES, SIZE, SIZE)
    out.square().mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_family_entry_takes_any_timm_encoder() -> None:
    model = fz.create_model("late_mean", encoder="convnext_atto", num_classes=9)
    assert model.config["encoder"] == "convnext_atto"
    assert model.tap_info()["rgb.stage4"].channels == 320  # read from timm's feature_info
    with pytest.raises(TypeError, match="cmx_resnet50.*fixes encoder"):
        fz.create_model("cmx_resnet50", encoder="convnext_atto")


@pytest.mark.parametrize("gated", ["late_gate_resnet18", "hybrid_gate_resnet18"])
def test_decision_gates_are_weights_and_drop_missing_modalities(gated: str) -> None:
    model = build(gated).eval()
    inputs = make_inputs(model.modalities, in_chans=model.in_chans)
    with torch.no_grad(), fz.capture(model, "head.gate") as full:
        model(inputs)
    with torch.no_grad(), fz.capture(model, "head.gate") as partial:
        model({"rgb": inputs["rgb"]}, missing=("depth",))
    gate, gate_missing = full["head.gate"], partial["head.gate"]
    assert gate.shape[1] == model.tap_info()["head.gate"].channels
    assert torch.allclose(gate.sum(dim=1), torch.ones_like(gate[:, 0]), atol=1e-5) and (gate > 0).all()
    depth_index = gate.shape[1] - 1  # predictions are ordered [fused?] + modalities; depth is last
    assert torch.equal(gate_missing[:, depth_index], torch.zeros_like(gate_missing[:, depth_index]))
    assert torch.allclose(gate_missing.sum(dim=1), torch.ones_like(gate[:, 0]), atol=1e-5)


def test_stream_reuse_equals_plain_forwards(name: str, built: nn.Module) -> None:
    """Interpretation's passes over one batch under ``reusing_streams`` (the full input, the first
    modality permuted, the second one zeroed, then both passes as one concatenated batch) give the
    outputs of plain forwards (float64), and a stream that runs on its own modality alone is not
    run again on an image it has seen: the second modality's encoder sees 3 images, then none,
    then one (the zero image), then none."""
    first, aux = built.modalities[0], built.modalities[1]
    encoders = getattr(built, "encoders", {})
    if not hasattr(built, "stream_memo") or aux not in encoders:
        pytest.skip(f"{name}: no per-modality stream that stream reuse serves (early fusion, or a published network's own forward)")
    model = copy.deepcopy(built).double().eval()
    x = {m: v.double() for m, v in make_inputs(model.modalities, batch=3, size=32, in_chans=model.in_chans).items()}
    permuted = {**x, first: x[first][torch.tensor([2, 0, 1])]}
    removed = {**x, aux: torch.zeros_like(x[aux])}
    passes = [x, permuted, removed, {m: torch.cat([permuted[m], removed[m]]) for m in model.modalities}]
    encoder = model.encoders[aux]
    entry = encoder.segments[0] if encoder.stagewise else encoder
    seen = []
    hook = entry.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            plain = [model(p) for p in passes]
            plain_seen, seen[:] = list(seen), []
            with reusing_streams(model):
                reused = [model(p) for p in passes]
    finally:
        hook.remove()
    for i, (a, b) in enumerate(zip(plain, reused)):
        assert torch.allclose(b, a, rtol=1e-9, atol=1e-9 * float(a.abs().max())), f"pass {i}"
    assert plain_seen == [3, 3, 3, 6]
    assert seen == [3, 1], f"the {aux} encoder ran on {seen} images under reusing_streams"
