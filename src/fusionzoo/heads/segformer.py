"""The SegFormer all-MLP decoder (Xie et al., "SegFormer", NeurIPS 2021, section 3.2), as used by
CMX on MiT backbones (decoder embedding 512 for MiT-B2 and larger, 256 for B0/B1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class SegFormerDecoder(nn.Module):
    """Unify channels per stage with a linear layer, upsample to stride 4, concatenate, fuse with a
    1x1 conv-BN-ReLU, classify with a 1x1 conv.

    Args:
        in_channels: channels of the four stage features (strides 4, 8, 16, 32).
        num_classes: ``K``.
        channels: embedding size ``E`` (SegFormer/CMX: 256 for small, 512 for B2+ backbones).
        dropout: dropout before the classifier (0.1 in SegFormer).
        fuse_bias: give the fuse conv a bias before its BatchNorm (CMX's decoder does).
        bn_eps: eps of the fuse BatchNorm (CMX trains with 1e-3, its ``config.bn_eps``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 256,
        dropout: float = 0.1,
        *,
        fuse_bias: bool = False,
        bn_eps: float = 1e-5,
    ):
        super().__init__()
        self.out_channels = channels
        # Linear layers per stage (same parameter shapes as SegFormer's MLP(input_dim, embed_dim)).
        self.linear = nn.ModuleList([nn.Linear(c, channels) for c in in_channels])
        self.fuse = nn.Sequential(
            nn.Conv2d(channels * len(in_channels), channels, 1, bias=fuse_bias),
            nn.BatchNorm2d(channels, eps=bn_eps),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]`` ``(B, C_i, H/s_i, W/s_i)`` -> embedding ``(B, E, H/4, W/4)``.

        SegFormer's fuse conv ``W`` (``E x nE``, 1x1) acts on ``cat([up(L_n c_n), ..., up(L_1
        c_1)])``; nothing nonlinear lies between a stage's linear ``L_i x + b_i``, the bilinear
        upsampling (linear, and it keeps constants: its weights sum to 1) and that conv, so
        ``W cat(...) = sum_i up(W_i L_i c_i + W_i b_i)``, ``W_i`` being W's columns of stage i.
        This computes ``M_i = W_i L_i`` (``E x C_i``) once per forward and applies it at each
        stage's own resolution: at 256x320 the fuse conv's 5.4 GMAC at stride 4 (forward, twice
        that backward, for MiT-B2 at E = 512) become 0.3 GMAC, and the ``nE``-channel concatenation
        at stride 4 is never built. Same parameters, same function (float64: 3e-15 relative),
        gradients by the chain rule through ``M_i``. Output in NCHW (contiguous) whatever the
        input's memory format: BatchNorm's backward on a channels-last view is several times slower.
        """
        size = features[0].shape[-2:]
        conv = self.fuse[0]
        e, n = self.out_channels, len(self.linear)
        w = conv.weight.reshape(e, n, e)  # (E, stage block, E); blocks deepest first: [c4, c3, c2, c1]
        fused = None
        for i, (feat, linear) in enumerate(zip(features, self.linear)):
            b, _, h, ww = feat.shape
            w_i = w[:, n - 1 - i]
            # (E, C_i) @ (B, C_i, h*w) + (E, 1) -> (B, E, h*w)
            x = torch.baddbmm((w_i @ linear.bias).view(1, e, 1), (w_i @ linear.weight).expand(b, -1, -1), feat.flatten(2))
            x = x.view(b, e, h, ww)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        if conv.bias is not None:
            fused = fused + conv.bias.view(1, e, 1, 1)
        return self.fuse[2](self.fuse[1](fused))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, E, h, w)`` -> logits ``(B, K, h, w)``."""
        return self.classifier(self.dropout(embedding))
