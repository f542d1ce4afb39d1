"""ACNet's Attention Complementary Module (ACM).

Hu et al., "ACNet: Attention Based Network to Exploit Complementary Features for RGBD Semantic
Segmentation", ICIP 2019, Sec. 2.2 and Fig. 2: each modality's feature is re-weighted per channel
by ``sigmoid(conv1x1(avgpool(x)))`` and the two re-weighted features are added into the merged
branch. Layout follows the reference ``channel_attention`` (anheidelonghu/ACNet,
``ACNet_models_V1.py``): ``Sequential(AdaptiveAvgPool2d(1), Conv2d(C, C, 1, bias=True),
Sigmoid())`` per modality, so ``atten_rgb_k.1.*`` maps to ``atten_rgb.1.*``.

This module computes only the ACM sum. ACNet's third (merged) ResNet branch, whose stage output
is added to this sum (``m_k = layer_k_m(m_{k-1}) + ACM_rgb(rgb) + ACM_depth(depth)``), belongs to
the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import FusionResult, StageFusion


def channel_attention(channels: int) -> nn.Sequential:
    """ACNet's ACM weight branch: ``(B, C, h, w) -> (B, C, 1, 1)`` weights in (0, 1)."""
    conv = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
    # ACNet initialises every conv with N(0, sqrt(2 / (k*k*C_out))); the bias keeps torch's default.
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / channels))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), conv, nn.Sigmoid())


class ACNetFusion(StageFusion):
    """ACNet attention complementary module: ``fused = rgb * a_rgb + depth * a_depth``.

    Args:
        channels: ``C`` of both inputs.
        num_modalities: must be 2 (RGB first).
        stage_index: accepted for a uniform constructor; the ACM is the same at every stage
            (ACNet also applies it after the stem).

    Details:
        ``"attn"``: ``(B, 2C, 1, 1)``, the ACM channel weights of RGB (first C) and depth (last C).

    Example:
        >>> op = ACNetFusion(64, 2)
        >>> op([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)]).fused.shape
        torch.Size([2, 64, 8, 8])
    """

    max_modalities = 2
    feeds_back = False  # RGB and depth branches keep their own features; only the merged branch gets ACM
    global_details = frozenset({"attn"})  # (B, 2C, 1, 1) channel weights

    def __init__(self, channels: int, num_modalities: int, *, stage_index: int = 0) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        self.atten_rgb = channel_attention(channels)
        self.atten_depth = channel_attention(channels)
        self.detail_channels = {"attn": 2 * channels}

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """Fuse ``[rgb, depth]``, each ``(B, C, h, w)``.

        Returns:
            ``fused`` ``(B, C, h, w)``, ``streams`` None, ``details["attn"]`` ``(B, 2C, 1, 1)``.
        """
        self.check_features(features)
        rgb, depth = features
        a_rgb = self.atten_rgb(rgb)
        a_depth = self.atten_depth(depth)
        fused = rgb * a_rgb + depth * a_depth
        return FusionResult(fused=fused, details={"attn": torch.cat([a_rgb, a_depth], dim=1)})
