"""Decoders in fusionzoo.heads: shapes, every level used, weights saved with older key names load."""

from __future__ import annotations

import torch

from fusionzoo.heads import FPNDecoder

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
