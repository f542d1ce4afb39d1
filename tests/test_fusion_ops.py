"""Tests of the stage-fusion operators in fusionzoo.fusion.

Contract tests run over the whole FUSION_OPS registry; known-answer tests pin each published
module to its reference (parameter shapes written out by hand from the reference code, so a wrong
layer shape fails; closed-form outputs for degenerate weights).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusionzoo.fusion import (
    FUSION_OPS,
    ACNetFusion,
    CMXFusion,
    ConcatFusion,
    CrossAttentionFusion,
    ESANetFusion,
    FusionResult,
    SAGateFusion,
    SEAddFusion,
    StageFusion,
    SumFusion,
)
from fusionzoo.fusion.cmx import CrossAttention

# 40 channels: divisible by CMX's MiT heads (1, 2, 5, 8) and wide enough for SE reduction 16.
C = 40
H, W = 5, 6
TWO_ONLY = {"acnet", "esanet", "sagate", "cmx"}
GENERIC = set(FUSION_OPS) - TWO_ONLY


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # parameter init draws from the global generator


def feats(m: int, c: int = C, h: int = H, w: int = W, b: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """``m`` random ``(b, c, h, w)`` maps with a per-channel offset, so that globally pooled
    statistics differ between samples (pure noise pools to ~0 and can leave the narrow SE
    bottlenecks' ReLUs dead, which would hide gradients)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g) + 2 * torch.randn(b, c, 1, 1, generator=g) for _ in range(m)]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_result(op: StageFusion, res: FusionResult, xs: list[torch.Tensor]) -> None:
    b, c, h, w = xs[0].shape
    assert isinstance(res, FusionResult)
    assert res.fused.shape == (b, c, h, w)
    if op.feeds_back:
        assert res.streams is not None and len(res.streams) == len(xs)
        assert all(s.shape == x.shape for s, x in zip(res.streams, xs))
    else:
        assert res.streams is None
    assert set(res.details) == set(op.detail_channels)
    for key, t in res.details.items():
        assert t.dim() == 4 and t.shape[0] == b, key
        assert t.shape[1] == op.detail_channels[key], key
        assert tuple(t.shape[2:]) in ((h, w), (1, 1)), (key, t.shape)


# ----------------------------------------------------------------------------- contract
def test_registry_names():
    assert set(FUSION_OPS) == {"sum", "concat", "se_add", "crossattn", "acnet", "esanet", "sagate", "cmx", "mim"}
    assert all(issubclass(cls, StageFusion) for cls in FUSION_OPS.values())


@pytest.mark.parametrize("name", sorted(FUSION_OPS))
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shapes_and_declared_details(name, stage):
    op = FUSION_OPS[name](C, 2, stage_index=stage)
    xs = feats(2)
    check_result(op, op(xs), xs)


@pytest.mark.parametrize("name", sorted(FUSION_OPS))
def test_every_parameter_gets_gradient(name):
    # 64 channels and a batch of 4: the reference SE bottlenecks (C // 16 ReLU units) are too
    # narrow at C=40 to rule out an all-dead hidden layer on a couple of samples
    op = FUSION_OPS[name](64, 2, stage_index=1).train()
    xs = [x.requires_grad_() for x in feats(2, c=64, b=4)]
    res = op(xs)
    g = torch.Generator().manual_seed(1)
    # random projections: a plain sum would give zero gradient through BatchNorm outputs
    loss = (res.fused * torch.randn(res.fused.shape, generator=g)).sum()
    for s in res.streams or []:
        loss = loss + (s * torch.randn(s.shape, generator=g)).sum()
    loss.backward()
    for pname, p in op.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"
    for i, x in enumerate(xs):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"{name}: modality {i} is dead"


@pytest.mark.parametrize("name", sorted(TWO_ONLY))
def test_two_modality_methods_reject_three(name):
    with pytest.raises(ValueError, match="exactly 2 modalities"):
        FUSION_OPS[name](C, 3)


@pytest.mark.parametrize("name", sorted(GENERIC))
def test_generic_ops_take_three_modalities(name):
    op = FUSION_OPS[name](C, 3, stage_index=2).train()
    xs = [x.requires_grad_() for x in feats(3)]
    res = op(xs)
    check_result(op, res, xs)
    (res.fused * torch.randn(res.fused.shape)).sum().backward()
    for i, x in enumerate(xs):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"{name}: modality {i} does not reach fused"


@pytest.mark.parametrize("name", sorted(FUSION_OPS))
def test_bad_inputs_raise(name):
    op = FUSION_OPS[name](C, 2)
    with pytest.raises(ValueError, match="channels"):
        op(feats(2, c=C + 8))
    with pytest.raises(ValueError, match="modalities"):
        op(feats(1))
    a, b = feats(2)
    with pytest.raises(ValueError, match="share one shape"):
        op([a, b[:, :, :-1]])
    with pytest.raises(ValueError, match="stage_index"):
        FUSION_OPS[name](C, 2, stage_index=4)


@pytest.mark.parametrize("name", sorted(FUSION_OPS))
def test_does_not_modify_inputs(name):
    op = FUSION_OPS[name](C, 2)
    xs = feats(2)
    before = [x.clone() for x in xs]
    op(xs)
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


# ----------------------------------------------------------------------------- parameter shapes
def cmx_expected_shapes(c: int, r: int) -> dict[str, tuple[int, ...]]:
    """CMX FRM + FFM parameter shapes, from models/net_utils.py of the reference."""
    i = c // r
    return {
        # FRM: ChannelWeights.mlp = Linear(4C, 4C/r), ReLU, Linear(4C/r, 2C), Sigmoid
        "frm.channel_weights.mlp.0.weight": (4 * c // r, 4 * c),
        "frm.channel_weights.mlp.0.bias": (4 * c // r,),
        "frm.channel_weights.mlp.2.weight": (2 * c, 4 * c // r),
        "frm.channel_weights.mlp.2.bias": (2 * c,),
        # FRM: SpatialWeights.mlp = Conv1x1(2C, C/r), ReLU, Conv1x1(C/r, 2), Sigmoid
        "frm.spatial_weights.mlp.0.weight": (i, 2 * c, 1, 1),
        "frm.spatial_weights.mlp.0.bias": (i,),
        "frm.spatial_weights.mlp.2.weight": (2, i, 1, 1),
        "frm.spatial_weights.mlp.2.bias": (2,),
        # FFM: CrossPath
        "ffm.cross.channel_proj1.weight": (2 * i, c),
        "ffm.cross.channel_proj1.bias": (2 * i,),
        "ffm.cross.channel_proj2.weight": (2 * i, c),
        "ffm.cross.channel_proj2.bias": (2 * i,),
        "ffm.cross.cross_attn.kv1.weight": (2 * i, i),  # qkv_bias=False
        "ffm.cross.cross_attn.kv2.weight": (2 * i, i),
        "ffm.cross.end_proj1.weight": (c, 2 * i),
        "ffm.cross.end_proj1.bias": (c,),
        "ffm.cross.end_proj2.weight": (c, 2 * i),
        "ffm.cross.end_proj2.bias": (c,),
        "ffm.cross.norm1.weight": (c,),
        "ffm.cross.norm1.bias": (c,),
        "ffm.cross.norm2.weight": (c,),
        "ffm.cross.norm2.bias": (c,),
        # FFM: ChannelEmbed(2C -> C)
        "ffm.channel_emb.residual.weight": (c, 2 * c, 1, 1),
        "ffm.channel_emb.channel_embed.0.weight": (i, 2 * c, 1, 1),
        "ffm.channel_emb.channel_embed.0.bias": (i,),
        "ffm.channel_emb.channel_embed.1.weight": (i, 1, 3, 3),  # depth-wise
        "ffm.channel_emb.channel_embed.1.bias": (i,),
        "ffm.channel_emb.channel_embed.3.weight": (c, i, 1, 1),
        "ffm.channel_emb.channel_embed.3.bias": (c,),
        "ffm.channel_emb.channel_embed.4.weight": (c,),
        "ffm.channel_emb.channel_embed.4.bias": (c,),
        "ffm.channel_emb.norm.weight": (c,),
        "ffm.channel_emb.norm.bias": (c,),
    }


def sagate_expected_shapes(c: int) -> dict[str, tuple[int, ...]]:
    """SA-Gate shapes (net_util.py): FilterLayer(2C, C, 16) = Linear(2C, C/16), Linear(C/16, C)."""
    h = c // 16
    out = {}
    for fsp in ("fsp_rgb", "fsp_hha"):
        out |= {
            f"{fsp}.filter.fc.0.weight": (h, 2 * c),
            f"{fsp}.filter.fc.0.bias": (h,),
            f"{fsp}.filter.fc.2.weight": (c, h),
            f"{fsp}.filter.fc.2.bias": (c,),
        }
    for gate in ("gate_rgb", "gate_hha"):
        out |= {f"{gate}.weight": (1, 2 * c, 1, 1), f"{gate}.bias": (1,)}
    return out


def esanet_expected_shapes(c: int) -> dict[str, tuple[int, ...]]:
    """ESANet SqueezeAndExcitation.fc = Conv1x1(C, C/16), act, Conv1x1(C/16, C), Sigmoid."""
    h = c // 16
    out = {}
    for se in ("se_rgb", "se_depth"):
        out |= {
            f"{se}.fc.0.weight": (h, c, 1, 1),
            f"{se}.fc.0.bias": (h,),
            f"{se}.fc.2.weight": (c, h, 1, 1),
            f"{se}.fc.2.bias": (c,),
        }
    return out


def acnet_expected_shapes(c: int) -> dict[str, tuple[int, ...]]:
    """ACNet channel_attention = AvgPool, Conv1x1(C, C) with bias, Sigmoid; one per modality."""
    return {
        "atten_rgb.1.weight": (c, c, 1, 1),
        "atten_rgb.1.bias": (c,),
        "atten_depth.1.weight": (c, c, 1, 1),
        "atten_depth.1.bias": (c,),
    }


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: CMXFusion(64, 2, stage_index=1), cmx_expected_shapes(64, 1)),
        (lambda: CMXFusion(128, 2, stage_index=3, preset="resnet"), cmx_expected_shapes(128, 4)),
        (lambda: SAGateFusion(64, 2), sagate_expected_shapes(64)),
        (lambda: ESANetFusion(64, 2), esanet_expected_shapes(64)),
        (lambda: ACNetFusion(64, 2), acnet_expected_shapes(64)),
    ],
    ids=["cmx_mit", "cmx_resnet", "sagate", "esanet", "acnet"],
)
def test_parameter_shapes_match_reference(build, expected):
    op = build()
    got = {k: tuple(v.shape) for k, v in op.named_parameters()}
    assert got == expected
    assert n_params(op) == sum(torch.Size(s).numel() for s in expected.values())


def test_parameter_counts_at_64_by_formula():
    c = 64
    # CMX, MiT preset (r = 1): FRM + FFM written out term by term
    frm = (4 * c * 4 * c + 4 * c) + (4 * c * 2 * c + 2 * c) + (2 * c * c + c) + (c * 2 + 2)
    cross = 2 * (c * 2 * c + 2 * c) + 2 * (c * 2 * c) + 2 * (2 * c * c + c) + 2 * 2 * c
    embed = 2 * c * c + (2 * c * c + c) + (9 * c + c) + (c * c + c) + 2 * c + 2 * c
    assert n_params(CMXFusion(c, 2)) == frm + cross + embed == 178370
    se = c * (c // 16) + c // 16 + (c // 16) * c + c
    assert n_params(ESANetFusion(c, 2)) == 2 * se == 1160
    assert n_params(SEAddFusion(c, 3)) == 3 * se
    assert n_params(ACNetFusion(c, 2)) == 2 * (c * c + c) == 8320
    fsp = 2 * c * (c // 16) + c // 16 + (c // 16) * c + c
    assert n_params(SAGateFusion(c, 2)) == 2 * fsp + 2 * (2 * c + 1) == 1930
    assert n_params(SumFusion(c, 2)) == 0
    assert n_params(ConcatFusion(c, 3)) == 3 * c * c + 2 * c
    # cross-attention at stage 0 (sr 8): per modality q, sr conv, sr norm, kv, proj, norm; merge
    per_mod = (c * c + c) + (c * c * 64 + c) + 2 * c + (2 * c * c + 2 * c) + (c * c + c) + 2 * c
    assert n_params(CrossAttentionFusion(c, 2, stage_index=0)) == 2 * per_mod + (2 * c * c + 2 * c)
    per_mod_sr1 = (c * c + c) + (2 * c * c + 2 * c) + (c * c + c) + 2 * c  # sr 1: no reduction layers
    assert n_params(CrossAttentionFusion(c, 2, stage_index=3)) == 2 * per_mod_sr1 + (2 * c * c + 2 * c)


# ----------------------------------------------------------------------------- CMX
def test_cmx_heads_and_reduction_per_stage():
    assert [CMXFusion(C, 2, stage_index=k).num_heads for k in range(4)] == [1, 2, 5, 8]
    assert {CMXFusion(C, 2, stage_index=k).reduction for k in range(4)} == {1}
    resnet = [CMXFusion(128, 2, stage_index=k, preset="resnet") for k in range(4)]
    assert [op.num_heads for op in resnet] == [4, 8, 16, 32]
    assert {op.reduction for op in resnet} == {4}
    op = CMXFusion(C, 2, stage_index=0, num_heads=4, reduction=2)
    assert (op.num_heads, op.reduction) == (4, 2)


def test_cmx_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="num_heads"):
        CMXFusion(64, 2, stage_index=2)  # 64 is not divisible by the 5 heads of stage 3
    with pytest.raises(ValueError, match="preset"):
        CMXFusion(64, 2, preset="swin")


def test_cmx_frm_with_zero_weights_adds_half_the_other_stream():
    # all-zero MLPs -> channel and spatial weights are sigmoid(0) = 0.5 everywhere, so
    # out1 = x1 + 0.5 * 0.5 * x2 + 0.5 * 0.5 * x2 = x1 + 0.5 * x2 (Eq. 5 with lambda = 0.5)
    op = CMXFusion(C, 2)
    for p in op.frm.parameters():
        nn.init.zeros_(p)
    x1, x2 = feats(2)
    res = op([x1, x2])
    torch.testing.assert_close(res.streams[0], x1 + 0.5 * x2)
    torch.testing.assert_close(res.streams[1], x2 + 0.5 * x1)
    torch.testing.assert_close(res.details["gate"], torch.full((2, 2, H, W), 0.5))
    torch.testing.assert_close(res.details["attn"], torch.full((2, 2 * C, 1, 1), 0.5))


def test_cmx_frm_lambdas_zero_is_identity():
    op = CMXFusion(C, 2, lambda_c=0.0, lambda_s=0.0)
    xs = feats(2)
    res = op(xs)
    torch.testing.assert_close(res.streams[0], xs[0])
    torch.testing.assert_close(res.streams[1], xs[1])


def test_cmx_frm_channel_weights_are_swapped_across_streams():
    # channel weights index 0 scale x1 into stream 2's rectification, index 1 scale x2 into stream 1
    op = CMXFusion(C, 2, lambda_s=0.0)
    with torch.no_grad():
        last = op.frm.channel_weights.mlp[2]
        last.weight.zero_()
        last.bias[:C] = -20.0  # weights for x1 -> ~0
        last.bias[C:] = 20.0  # weights for x2 -> ~1
    x1, x2 = feats(2)
    res = op([x1, x2])
    torch.testing.assert_close(res.streams[0], x1 + 0.5 * x2, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.streams[1], x2, atol=1e-6, rtol=0)


def test_cmx_frm_spatial_weights_are_swapped_across_streams():
    # spatial weight channel 0 scales x1 into stream 2, channel 1 scales x2 into stream 1;
    # the "gate" detail exposes exactly these maps
    op = CMXFusion(C, 2, lambda_c=0.0)
    with torch.no_grad():
        last = op.frm.spatial_weights.mlp[2]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-20.0, 20.0]))
    x1, x2 = feats(2)
    res = op([x1, x2])
    torch.testing.assert_close(res.streams[0], x1 + 0.5 * x2, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.streams[1], x2, atol=1e-6, rtol=0)
    assert (res.details["gate"][:, 0] < 1e-6).all() and (res.details["gate"][:, 1] > 1 - 1e-6).all()


def test_cmx_channel_weights_pool_average_then_max():
    # the MLP input is [avg(x1), avg(x2), max(x1), max(x2)] (4C); route max(x1)[0] alone
    op = CMXFusion(C, 2)
    cw = op.frm.channel_weights
    with torch.no_grad():
        for p in cw.parameters():
            p.zero_()
        cw.mlp[0].weight[0, 2 * C] = 1.0  # hidden unit 0 <- max of x1's channel 0
        cw.mlp[2].weight[:, 0] = 1.0  # every output <- hidden unit 0
    x1, x2 = torch.zeros(1, C, H, W), torch.zeros(1, C, H, W)
    x1[0, 0, 2, 3] = 3.0  # mean 3 / (H * W), max 3
    w = cw(x1, x2)
    assert w.shape == (2, 1, C, 1, 1)
    torch.testing.assert_close(w, torch.full_like(w, torch.sigmoid(torch.tensor(3.0)).item()))


def test_cmx_efficient_attention_matches_formula():
    # Eq. 7-8: per head, ctx = softmax over the key-channel axis of (K^T V) * d^-1/2 and
    # out1 = Q1 ctx2 with Q1 = the tokens themselves; written here with einsum
    att = CrossAttention(12, num_heads=3)
    x1, x2 = torch.randn(2, 7, 12), torch.randn(2, 7, 12)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 7, 3, 4)

    k2, v2 = att.kv2(x2).split(12, dim=-1)
    ctx2 = (torch.einsum("bnhi,bnhj->bhij", heads(k2), heads(v2)) * 4**-0.5).softmax(dim=2)
    expected = torch.einsum("bnhi,bhij->bnhj", heads(x1), ctx2).reshape(2, 7, 12)
    torch.testing.assert_close(att(x1, x2)[0], expected)


def test_cmx_efficient_attention_with_zero_keys_averages_queries():
    # k = v = 0 -> context = softmax over keys of zeros = 1/d, so each output channel equals
    # the mean of the query's channels within its head (Eq. 7-8 with the softmax along dim -2)
    att = CrossAttention(12, num_heads=3)
    nn.init.zeros_(att.kv1.weight)
    nn.init.zeros_(att.kv2.weight)
    x1, x2 = torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    y1, _ = att(x1, x2)
    heads_mean = x1.view(2, 7, 3, 4).mean(-1, keepdim=True).expand(2, 7, 3, 4).reshape(2, 7, 12)
    torch.testing.assert_close(y1, heads_mean)


def test_cmx_attention_exchanges_context():
    # stream 1's output depends on stream 2 only through ctx2 (and vice versa)
    att = CrossAttention(8, num_heads=2)
    x1, x2 = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    y1a, _ = att(x1, x2)
    y1b, _ = att(x1, x2 + torch.randn_like(x2))
    _, y2c = att(x1 + torch.randn_like(x1), x2)
    assert not torch.allclose(y1a, y1b)
    assert not torch.allclose(att(x1, x2)[1], y2c)


# ----------------------------------------------------------------------------- SA-Gate
def test_sagate_gates_sum_to_one_and_streams_follow_formula():
    op = SAGateFusion(C, 2)
    rgb, x = feats(2)
    res = op([rgb, x])
    gate = res.details["gate"]
    torch.testing.assert_close(gate.sum(1), torch.ones(2, H, W))
    assert (gate > 0).all() and (gate < 1).all()
    torch.testing.assert_close(res.fused, rgb * gate[:, :1] + x * gate[:, 1:])
    torch.testing.assert_close(res.streams[0], torch.relu((rgb + res.fused) / 2))
    torch.testing.assert_close(res.streams[1], torch.relu((x + res.fused) / 2))


def test_sagate_saturated_gate_selects_rgb():
    op = SAGateFusion(C, 2)
    with torch.no_grad():
        for conv in (op.gate_rgb, op.gate_hha):
            conv.weight.zero_()
        op.gate_rgb.bias.fill_(30.0)
        op.gate_hha.bias.fill_(-30.0)
    rgb, x = feats(2)
    torch.testing.assert_close(op([rgb, x]).fused, rgb)


def test_sagate_gates_depend_on_both_modalities():
    op = SAGateFusion(C, 2)
    rgb, x = feats(2)
    g1 = op([rgb, x]).details["gate"]
    g2 = op([rgb, x * 3 + 1]).details["gate"]
    assert not torch.allclose(g1, g2)


# ----------------------------------------------------------------------------- ACNet
def test_acnet_weights_in_unit_interval_and_fused_formula():
    op = ACNetFusion(C, 2)
    rgb, d = feats(2)
    res = op([rgb, d])
    a = res.details["attn"]
    assert (a > 0).all() and (a < 1).all()
    torch.testing.assert_close(res.fused, rgb * a[:, :C] + d * a[:, C:])
    assert not torch.allclose(a[:, :C], a[:, C:])  # separate ACMs per modality


def test_acnet_weights_are_global_per_channel():
    # ACM only sees the global average: a spatial permutation of the input keeps the weights
    op = ACNetFusion(C, 2)
    rgb, d = feats(2)
    perm = torch.randperm(H * W)

    def shuffle(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2)[:, :, perm].view_as(t)

    a1 = op([rgb, d]).details["attn"]
    a2 = op([shuffle(rgb), shuffle(d)]).details["attn"]
    torch.testing.assert_close(a1, a2)


# ----------------------------------------------------------------------------- ESANet / SE-add
def test_esanet_feeds_sum_into_rgb_and_keeps_depth():
    op = ESANetFusion(C, 2)
    rgb, d = feats(2)
    res = op([rgb, d])
    assert res.streams[0] is res.fused
    assert res.streams[1] is d
    a = res.details["attn"]
    assert (a > 0).all() and (a < 1).all()
    torch.testing.assert_close(res.fused, rgb * a[:, :C] + d * a[:, C:])


def test_esanet_zero_excitation_halves_the_sum():
    op = ESANetFusion(C, 2)
    for se in (op.se_rgb, op.se_depth):
        nn.init.zeros_(se.fc[2].weight)
        nn.init.zeros_(se.fc[2].bias)
    rgb, d = feats(2)
    torch.testing.assert_close(op([rgb, d]).fused, 0.5 * (rgb + d))


def test_esanet_activation_choices():
    assert isinstance(ESANetFusion(C, 2, activation="swish").se_rgb.fc[1], nn.SiLU)
    assert isinstance(ESANetFusion(C, 2, activation="hswish").se_rgb.fc[1], nn.Hardswish)
    with pytest.raises(ValueError, match="activation"):
        ESANetFusion(C, 2, activation="gelu")
    with pytest.raises(ValueError, match="reduction"):
        ESANetFusion(8, 2)  # 8 // 16 == 0: no bottleneck channel left


def test_se_add_matches_esanet_for_two_streams():
    esa, gen = ESANetFusion(C, 2), SEAddFusion(C, 2)
    gen.se[0].load_state_dict(esa.se_rgb.state_dict())
    gen.se[1].load_state_dict(esa.se_depth.state_dict())
    xs = feats(2)
    a, b = esa(xs), gen(xs)
    torch.testing.assert_close(a.fused, b.fused)
    torch.testing.assert_close(a.details["attn"], b.details["attn"])


# ----------------------------------------------------------------------------- generic
def test_sum_fusion_is_exact_sum_fed_into_first_stream():
    xs = feats(3)
    res = SumFusion(C, 3)(xs)
    torch.testing.assert_close(res.fused, xs[0] + xs[1] + xs[2])
    assert res.streams[0] is res.fused
    assert res.streams[1] is xs[1] and res.streams[2] is xs[2]


def test_concat_fusion_is_conv_over_concatenation():
    op = ConcatFusion(C, 3).eval()
    xs = feats(3)
    expected = torch.relu(op.proj[1](nn.functional.conv2d(torch.cat(xs, 1), op.proj[0].weight)))
    torch.testing.assert_close(op(xs).fused, expected)


def test_crossattn_default_sr_and_heads():
    assert [CrossAttentionFusion(64, 2, stage_index=k).sr_ratio for k in range(4)] == [8, 4, 2, 1]
    assert CrossAttentionFusion(256, 2).num_heads == 8
    assert CrossAttentionFusion(C, 2).num_heads == 1
    assert CrossAttentionFusion(C, 2, num_heads=4, sr_ratio=3).sr_ratio == 3
    with pytest.raises(ValueError, match="num_heads"):
        CrossAttentionFusion(C, 2, num_heads=3)


@pytest.mark.parametrize("m", [2, 3])
def test_crossattn_received_attention_averages_to_one(m):
    # sizes divisible by sr: every reduced token covers sr*sr pixels, and attention over keys
    # sums to one per query, so the map's mean is fixed
    op = CrossAttentionFusion(C, m, stage_index=1)  # sr 4
    res = op(feats(m, h=8, w=12))
    attn = res.details["attn"]
    assert attn.shape == (2, m, 8, 12)
    if m == 2:  # each stream is the only source of the other's keys
        torch.testing.assert_close(attn.mean(dim=(2, 3)), torch.ones(2, m))
    else:  # the sources share each query's mass: the means average to 1 across modalities
        torch.testing.assert_close(attn.mean(dim=(1, 2, 3)), torch.ones(2))
    assert (attn >= 0).all()


def test_crossattn_uniform_queries_give_flat_map():
    op = CrossAttentionFusion(C, 3, stage_index=2)
    for q in op.q:  # zero queries -> every query attends uniformly
        nn.init.zeros_(q.weight)
        nn.init.zeros_(q.bias)
    attn = op(feats(3, h=7, w=5)).details["attn"]  # odd sizes exercise the padding path
    torch.testing.assert_close(attn, torch.ones_like(attn))


def test_crossattn_stream_attends_to_other_modality_only():
    # modality 0's attended stream must change when modality 1 changes (keys/values come
    # from the others) and must not read its own keys: perturb only modality 0's kv layers
    op = CrossAttentionFusion(C, 2, stage_index=3).eval()
    xs = feats(2)
    captured = []
    hook = op.norm[0].register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone()))
    op(xs)
    op([xs[0], xs[1] + 1.0])
    with torch.no_grad():
        op.kv[0].kv.weight.add_(1.0)
    op(xs)
    hook.remove()
    assert not torch.allclose(captured[0], captured[1])
    torch.testing.assert_close(captured[0], captured[2])
