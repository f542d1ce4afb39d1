"""Semantic FPN decoder (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019,
section 3): an FPN (Lin et al., CVPR 2017) then, per level, 3x3 conv-GN-ReLU + 2x upsampling
until stride 4, summed and classified."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _conv_gn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(32, cout), cout), nn.ReLU(inplace=True))


class FPNDecoder(nn.Module):
    """Args:
        in_channels: channels of the four stage features (strides 4, 8, 16, 32).
        num_classes: ``K``.
        channels: semantic-head width (128 in Panoptic FPN); the pyramid itself is 2x wider (256).
        dropout: dropout before the classifier.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128, dropout: float = 0.1):
        super().__init__()
        pyramid = 2 * channels
        self.out_channels = channels
        self.lateral = nn.ModuleList([nn.Conv2d(c, pyramid, 1) for c in in_channels])
        self.smooth = nn.ModuleList([nn.Conv2d(pyramid, pyramid, 3, padding=1) for _ in in_channels])
        # Level i (stride 4 * 2^i) needs max(1, i) conv blocks and i upsamplings to reach stride 4.
        self.semantic = nn.ModuleList(
            nn.ModuleList([_conv_gn_relu(pyramid if j == 0 else channels, channels) for j in range(max(1, i))])
            for i in range(len(in_channels))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]`` ``(B, C_i, H/s_i, W/s_i)`` -> embedding ``(B, channels, H/4, W/4)``."""
        laterals = [lat(f) for lat, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        size = features[0].shape[-2:]
        out = 0
        for level, (smooth, blocks) in enumerate(zip(self.smooth, self.semantic)):
            x = smooth(laterals[level])
            for j, block in enumerate(blocks):
                x = block(x)
                if level > 0:
                    target = size if j == len(blocks) - 1 else None
                    x = F.interpolate(x, size=target, scale_factor=None if target else 2.0, mode="bilinear", align_corners=False)
            out = out + x
        return out

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, E, h, w)`` -> logits ``(B, K, h, w)``."""
        return self.classifier(self.dropout(embedding))
