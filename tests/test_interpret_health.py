"""Effective rank, feature norms, Grad-CAM and gate maps on cases with known answers."""

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fusionzoo.interpret.gradcam import gate_maps, gate_streams, grad_cam, split_gate_channels
from fusionzoo.interpret.health import EffectiveRank, FeatureNorm, effective_rank
from fusionzoo.taps import TapInfo, TapSet


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_effective_rank_known_values():
    assert effective_rank(torch.eye(6), center=False) == pytest.approx(6.0)
    # rank one: one nonzero singular value
    u = torch.randn(50, 1, generator=_g(0))
    assert effective_rank(u @ torch.randn(1, 8, generator=_g(1)), center=False) == pytest.approx(1.0)
    # two equal singular values and one at half: p = (0.4, 0.4, 0.2)
    x = torch.diag(torch.tensor([2.0, 2.0, 1.0]))
    h = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    assert effective_rank(x, center=False) == pytest.approx(math.exp(h))
    assert math.isnan(effective_rank(torch.zeros(4, 3)))


def test_streaming_effective_rank_matches_exact():
    x = torch.randn(3, 12, 5, 5, generator=_g(2)) * torch.linspace(0.1, 3, 12)[None, :, None, None] + 7
    acc = EffectiveRank()
    for i in range(3):
        acc.update(x[i:i + 1])
    assert acc.compute() == pytest.approx(effective_rank(x), rel=1e-9)
    assert 1 < acc.compute() < 12


def test_feature_norm():
    fn = FeatureNorm()
    fn.update(torch.full((2, 4, 3, 3), 0.5))  # |(0.5, 0.5, 0.5, 0.5)| = 1 per pixel
    fn.update(torch.full((1, 4, 3, 3), 1.0))  # 2 per pixel
    assert fn.compute() == pytest.approx((18 * 1 + 9 * 2) / 27)


@pytest.mark.parametrize("shape", [(2, 7, 5, 3), (6, 7)])  # a map, and rows
@pytest.mark.parametrize("group_bytes", [4 << 20, 8 * 15 * 2])  # every channel at once; 2 at a time
def test_feature_norm_is_the_mean_pixel_norm_in_float64(shape, group_bytes, monkeypatch):
    """Squares summed a few channels at a time give the float64 mean of the per-pixel norms."""
    monkeypatch.setattr(sys.modules["fusionzoo.interpret.health"], "NORM_CHUNK_BYTES", group_bytes)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) + 3.0
    rows = x.permute(0, 2, 3, 1).reshape(-1, 7) if x.dim() == 4 else x
    fn = FeatureNorm()
    fn.update(x)
    fn.update(x[:1])
    want = torch.cat([rows, rows[: len(rows) // shape[0]]]).double().norm(dim=1).mean()
    assert fn.compute() == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\) or \(B, C\)"):
        FeatureNorm().update(torch.zeros(2, 3, 4))


class TinyTapped(nn.Module):
    """Logit of class 1 = channel 0 of the RGB feature; depth is tapped but unused."""

    modalities = ("rgb", "depth")
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.taps = TapSet()
        self.taps.declare("rgb.stage1", 3, 1)
        self.taps.declare("depth.stage1", 1, 1)
        self.taps.declare("fused.stage1.gate", 2, 1, "gate")
        self.w = nn.Parameter(torch.ones(()))

    def tap_info(self):
        return self.taps.info()

    def forward(self, inputs, missing=()):
        a = self.taps("rgb.stage1", inputs["rgb"] * self.w)
        self.taps("depth.stage1", inputs["depth"] * self.w)
        self.taps("fused.stage1.gate", torch.cat([torch.ones_like(a[:, :1]), torch.zeros_like(a[:, :1])], 1))
        return torch.cat([torch.zeros_like(a[:, :1]), a[:, :1]], 1)


def test_grad_cam_known_answer():
    model = TinyTapped()
    rgb = torch.randn(2, 3, 8, 8, generator=_g(3))
    x = {"rgb": rgb, "depth": torch.randn(2, 1, 8, 8, generator=_g(4))}
    cams = grad_cam(model, x, ["rgb.stage1", "depth.stage1"], target_class=1,
                    region=torch.ones(2, 8, 8, dtype=torch.bool))
    expected = rgb[:, 0].clamp(min=0)
    expected = expected / expected.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(cams["rgb.stage1"], expected, atol=1e-6)
    assert (cams["depth.stage1"] == 0).all()  # the score does not depend on the depth branch
    assert all(p.grad is None for p in model.parameters())  # no gradient left on the model
    with pytest.raises(ValueError, match="target_class"):
        grad_cam(model, x, "rgb.stage1", target_class=5)


def test_grad_cam_min_max_normalization_as_pytorch_grad_cam():
    # scale_cam_image: (cam - min) / (max - min + 1e-7) per image; here min > 0 so it matters
    model = TinyTapped()
    rgb = torch.rand(2, 3, 8, 8, generator=_g(5)) + 2.0
    x = {"rgb": rgb, "depth": torch.randn(2, 1, 8, 8, generator=_g(6))}
    region = torch.ones(2, 8, 8, dtype=torch.bool)
    cams = grad_cam(model, x, "rgb.stage1", target_class=1, region=region)["rgb.stage1"]
    raw = rgb[:, 0]  # alpha = 1 on channel 0, ReLU(A_0) = A_0 > 0
    lo = raw.flatten(1).amin(1)[:, None, None]
    expected = (raw - lo) / (1e-7 + (raw - lo).flatten(1).amax(1)[:, None, None])
    assert torch.allclose(cams, expected, atol=1e-6)
    assert float(cams.amin()) == 0.0 and float(cams.amax()) == pytest.approx(1.0, abs=1e-5)
    unscaled = grad_cam(model, x, "rgb.stage1", target_class=1, region=region, normalize=False)["rgb.stage1"]
    assert torch.allclose(unscaled, raw)


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails: gradients must never be needed below the tap."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("Grad-CAM differentiated below the tap")


class StemTapped(TinyTapped):
    def forward(self, inputs, missing=()):
        stem = _NoBackward.apply(inputs["rgb"] * self.w)  # an encoder part below the tap
        return super().forward({"rgb": stem, "depth": inputs["depth"]}, missing)


@pytest.mark.parametrize("frozen", [False, True])
def test_grad_cam_differentiates_only_from_the_tap_output(frozen):
    # Captum's pattern: gradients w.r.t. the tap output, inputs never require grad, and nothing
    # below the tap is differentiated (the old input-gradient path ran _NoBackward.backward)
    model = StemTapped()
    if frozen:  # no parameter requires grad: the tap output is made a leaf that does
        model.requires_grad_(False)
    x = {"rgb": torch.randn(1, 3, 8, 8, generator=_g(7)), "depth": torch.randn(1, 1, 8, 8, generator=_g(8))}
    cams = grad_cam(model, x, "rgb.stage1", target_class=1, region=torch.ones(1, 8, 8, dtype=torch.bool))
    expected = x["rgb"][:, 0].clamp(min=0)
    expected = (expected - expected.min()) / (1e-7 + (expected - expected.min()).max())
    assert torch.allclose(cams["rgb.stage1"], expected, atol=1e-6)
    assert not any(v.requires_grad for v in x.values())
    assert all(p.grad is None for p in model.parameters())


def test_default_gradcam_tap_is_chosen_by_grid_size():
    from fusionzoo.interpret.gradcam import default_gradcam_taps

    streams = {s: [f"{s}.stage{k}" for k in range(1, 5)] for s in ("rgb", "fused")}
    red = {f"{s}.stage{k}": 2 ** (k + 1) for s in streams for k in range(1, 5)}
    assert default_gradcam_taps(streams, red, (64, 80)) == ["rgb.stage2", "fused.stage2"]  # 8x10 cells
    assert default_gradcam_taps(streams, red, (480, 640)) == ["rgb.stage4", "fused.stage4"]  # 15x20
    assert default_gradcam_taps(streams, red, (32, 32)) == ["rgb.stage1", "fused.stage1"]  # 8x8
    assert default_gradcam_taps(streams, red, (257, 257)) == ["rgb.stage4", "fused.stage4"]  # ceil: 9x9
    with pytest.warns(UserWarning, match="no stage of stream 'rgb' has a grid of at least 8x8"):
        assert default_gradcam_taps({"rgb": streams["rgb"]}, red, (16, 16)) == ["rgb.stage1"]


def test_report_writes_all_zero_on_an_empty_grad_cam_panel():
    from fusionzoo.interpret.api import InterpretResult
    from fusionzoo.interpret.report import _gradcam_figure

    taps = {"rgb.stage2": {"stream": "rgb", "stage": "stage2", "reduction": 8},
            "depth.stage2": {"stream": "depth", "stage": "stage2", "reduction": 8}}
    live = torch.zeros(1, 16, 24)
    live[0, 4:8, 4:8] = 1.0
    res = InterpretResult("toy", "middle", {}, ["rgb", "depth"], 2, None, 1, taps, {},
                          artifacts={"gradcam": {"rgb.stage2": live, "depth.stage2": torch.zeros(1, 16, 24)},
                                     "images": {"rgb": [torch.rand(3, 16, 24)], "depth": [torch.rand(1, 16, 24)]}})
    fig = _gradcam_figure(res)
    axes = fig.axes
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in axes}
    assert texts["Grad-CAM depth.stage2 (2x3 cells)"] == ["all zero"]
    assert texts["Grad-CAM rgb.stage2 (2x3 cells)"] == []
    assert len(axes[3].images) == 1 and len(axes[2].images) == 2  # no overlay drawn on the empty panel


def test_gate_maps_and_channel_split():
    model = TinyTapped()
    x = {"rgb": torch.randn(1, 3, 4, 4), "depth": torch.randn(1, 1, 4, 4)}
    maps = gate_maps(model, x)
    assert set(maps) == {"fused.stage1.gate"}
    assert (maps["fused.stage1.gate"]["rgb"] == 1).all() and (maps["fused.stage1.gate"]["depth"] == 0).all()
    attn = torch.cat([torch.full((1, 4, 1, 1), 0.2), torch.full((1, 4, 1, 1), 0.8)], 1)
    split = split_gate_channels(attn, ("rgb", "depth"))
    assert split["rgb"].item() == pytest.approx(0.2) and split["depth"].item() == pytest.approx(0.8)
    # the layout comes from the tap's metadata: its declared channel count (M + 1: hybrid decision
    # gates), or a declared stream layout when the tap has one
    gate = TapInfo("head.gate", "head", "gate", 3, 4, "gate")
    assert gate_streams(gate, ("rgb", "depth")) == ["fused", "rgb", "depth"]
    three = split_gate_channels(torch.arange(3.0).view(1, 3, 1, 1), gate_streams(gate, ("rgb", "depth")))
    assert list(three) == ["fused", "rgb", "depth"] and three["depth"].item() == 2.0
    assert gate_streams(TapInfo("x.attn", "fused", "stage1", 5, 0, "attn"), ("rgb", "depth")) == ["all"]
    declared = SimpleNamespace(channels=2, streams=("depth", "rgb"))
    assert gate_streams(declared, ("rgb", "depth")) == ["depth", "rgb"]
    with pytest.raises(ValueError, match="cannot be split"):
        split_gate_channels(torch.zeros(1, 3, 1, 1), ["rgb", "depth"])


def test_object_class_region_picks_the_second_most_frequent_class():
    from fusionzoo.interpret.gradcam import object_class_region

    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, :2, :2] = 2   # 4 pixels
    pred[0, 3, 3] = 1     # 1 pixel
    region, classes = object_class_region(pred)  # image 1 predicts one class only
    assert classes == [2, 0]
    assert torch.equal(region[0], pred[0] == 2) and region[1].all()
