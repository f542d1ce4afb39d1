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
        """``features[i]`` ``(B, C_i, H/s_i, W/s_i)`` -> embedding ``(B, E, H/4, W/4)``."""
        size = features[0].shape[-2:]
        outs = []
        for feat, linear in zip(features, self.linear):
            b, _, h, w = feat.shape
            x = linear(feat.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outs.append(x)
        # SegFormer concatenates deepest first: [c4, c3, c2, c1].
        return self.fuse(torch.cat(outs[::-1], dim=1))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, E, h, w)`` -> logits ``(B, K, h, w)``."""
        return self.classifier(self.dropout(embedding))
