"""Decoders in fusionzoo.heads: shapes, every level used, weights saved with older key names load;
SegFormer's decoder computed per stage equals its resize-concatenate-fuse definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusionzoo.fusion._common import DepthwiseConv2d, use_channels_last_depthwise
from fusionzoo.heads import FPNDecoder, SegFormerDecoder

CHS = [8, 16, 24, 32]


def _feats(h: int = 21, w: int = 27) -> list[torch.Tensor]:
    # stage features at strides 4..32 of an (4h, 4w) image, odd sizes on purpose
    return [torch.randn(2, c, -(-h // 2**i), -(-w // 2**i), requires_grad=True) for i, c in enumerate(CHS)]


def test_fpn_decoder_shapes_and_every_level_gets_a_gradient():
    torch.manual_seed(0)
    dec = FPNDecoder(CHS, 5, channels=16)
    feats = _feats()
    emb = dec(feats)
    assert emb.shape == (2, 16, 21, 27) and dec.classify(emb).shape == (2, 5, 21, 27)
    emb.square().sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_fpn_decoder_loads_weights_saved_with_the_old_pyramid_keys():
    # Before the pyramid was torchvision's FeaturePyramidNetwork its convs were lateral.i / smooth.i.
    torch.manual_seed(0)
    dec = FPNDecoder(CHS, 5, channels=16).eval()
    old = {k.replace("fpn.inner_blocks.", "lateral.").replace("fpn.layer_blocks.", "smooth.").replace(".0.", ".", 1)
           if k.startswith("fpn.") else k: v for k, v in dec.state_dict().items()}
    assert any(k.startswith("lateral.") for k in old) and not any(k.startswith("fpn.") for k in old)
    other = FPNDecoder(CHS, 5, channels=16).eval()
    other.load_state_dict(old, strict=True)
    feats = _feats()
    with torch.no_grad():
        assert torch.equal(dec(feats), other(feats))


def _segformer_by_definition(dec: SegFormerDecoder, feats: list[torch.Tensor]) -> torch.Tensor:
    """SegFormer's decoder as written: per-stage linear, resize to stride 4, concatenate deepest
    first, 1x1 conv-BN-ReLU over the whole concatenation."""
    size = feats[0].shape[-2:]
    outs = []
    for f, lin in zip(feats, dec.linear):
        b, _, h, w = f.shape
        x = lin(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        outs.append(x)
    return dec.fuse(torch.cat(outs[::-1], dim=1))


@pytest.mark.parametrize("fuse_bias", [False, True])
def test_segformer_decoder_per_stage_equals_its_definition(fuse_bias: bool) -> None:
    """The forward applies each stage's slice of the fuse conv at the stage's resolution; in
    float64 that equals the concatenate-then-fuse definition to rounding, output and gradients
    (odd sizes: the resize is not a whole-number scale), in train mode (batch statistics) and eval."""
    torch.manual_seed(0)
    dec = SegFormerDecoder(CHS, 5, channels=16, fuse_bias=fuse_bias).double()
    with torch.no_grad():  # BatchNorm away from its identity init, so its parameters matter
        dec.fuse[1].weight.uniform_(0.5, 1.5)
        dec.fuse[1].bias.uniform_(-0.5, 0.5)
        dec.fuse[1].running_mean.uniform_(-0.1, 0.1)
    feats = [f.detach().double().requires_grad_() for f in _feats()]
    # classify() is a separate call: the classifier is not part of forward
    params = [p for n, p in dec.named_parameters() if not n.startswith("classifier.")]
    for train in (True, False):
        dec.train(train)
        state = {k: v.clone() for k, v in dec.state_dict().items()}
        got = dec(feats)
        grads_got = torch.autograd.grad(got.square().sum(), [*feats, *params])
        dec.load_state_dict(state)  # the reference forward updates the running statistics again from the same start
        want = _segformer_by_definition(dec, feats)
        grads_want = torch.autograd.grad(want.square().sum(), [*feats, *params])
        assert got.shape == (2, 16, 21, 27) and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())
        # Relative to the largest gradient: in train mode the biases before BatchNorm have a zero
        # gradient, which both compute as rounding noise.
        scale = max(w.abs().max().item() for w in grads_want)
        for g, w in zip(grads_got, grads_want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10 * scale)


def test_depthwise_conv_on_a_token_layout_equals_conv2d_and_keeps_its_layout() -> None:
    """DepthwiseConv2d on a channels-last view (tokens (B, N, C) seen as (B, C, H, W)) computes
    nn.Conv2d's output and gradients, in channels-last; an NCHW input takes the plain path;
    ``plus_input`` adds the input through the centre tap."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    dw.load_state_dict(conv.state_dict())
    use_channels_last_depthwise(dw)
    assert type(dw) is DepthwiseConv2d and list(dw.state_dict()) == ["weight", "bias"]
    tokens = torch.randn(2, 5 * 7, 8, requires_grad=True)
    x = tokens.transpose(1, 2).view(2, 8, 5, 7)  # channels-last strides, as timm's pvt_v2 MLP
    got, want = dw(x), conv(x.contiguous())
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(want)
    grads = [torch.autograd.grad(out, [tokens, m.weight, m.bias], g) for out, m in ((got, dw), (want, conv))]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    nchw = torch.randn(2, 8, 5, 7)
    assert dw(nchw).is_contiguous() and torch.equal(dw(nchw), conv(nchw))
    # plus_input: conv(x) + x as one convolution (DFormer's positional conv with its residual)
    for inp in (x, nchw):
        torch.testing.assert_close(dw(inp, plus_input=True), conv(inp) + inp, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="odd 'same' kernel"):
        DepthwiseConv2d(8, 8, 2, groups=8)(nchw, plus_input=True)
