"""ESANet's squeeze-and-excitation fusion.

Seichter et al., "Efficient RGB-D Semantic Segmentation for Indoor Scene Analysis", ICRA 2021,
Sec. III-B and Fig. 2 ("Fusion"): after every encoder stage the RGB and depth features are each
re-weighted by a squeeze-and-excitation block and added; the sum replaces the RGB stream (the
depth stream continues unchanged). Module layout follows the reference
``SqueezeAndExciteFusionAdd`` (TUI-NICR/ESANet, ``src/models/rgb_depth_fusion.py``): attributes
``se_rgb.fc.{0,2}`` and ``se_depth.fc.{0,2}`` hold the same tensors, so weights map by name.
"""

from __future__ import annotations

import torch

from ._common import SqueezeExcite
from .base import FusionResult, StageFusion


class ESANetFusion(StageFusion):
    """SE-add fusion of RGB and depth; the sum is fed back as the RGB stream.

    ``fused = SE_rgb(rgb) + SE_depth(depth)``, ``streams = [fused, depth]``.

    Args:
        channels: ``C`` of both inputs.
        num_modalities: must be 2 (RGB first).
        stage_index: accepted for a uniform constructor; the module is the same at every stage
            (ESANet also applies it after the stem, which the caller may build with any index).
        reduction: SE bottleneck ratio, 16 in the reference.
        activation: SE hidden activation, the network's activation in the reference
            (``"relu"`` default, ``"swish"``, ``"hswish"``).

    Details:
        ``"attn"``: ``(B, 2C, 1, 1)``, the SE channel weights of RGB (first C) and depth (last C).

    Example:
        >>> op = ESANetFusion(64, 2)
        >>> res = op([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)])
        >>> res.fused.shape, res.details["attn"].shape
        (torch.Size([2, 64, 8, 8]), torch.Size([2, 128, 1, 1]))
    """

    max_modalities = 2
    feeds_back = True
    feeds_back_into = "first"
    global_details = frozenset({"attn"})  # (B, 2C, 1, 1) SE channel weights

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        *,
        stage_index: int = 0,
        reduction: int = 16,
        activation: str = "relu",
    ) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        self.se_rgb = SqueezeExcite(channels, reduction, activation)
        self.se_depth = SqueezeExcite(channels, reduction, activation)
        self.detail_channels = {"attn": 2 * channels}

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """Fuse ``[rgb, depth]``, each ``(B, C, h, w)``.

        Returns:
            ``fused`` ``(B, C, h, w)``; ``streams`` ``[fused, depth]``; ``details["attn"]``
            ``(B, 2C, 1, 1)``.
        """
        self.check_features(features)
        rgb, depth = features
        w_rgb = self.se_rgb.weights(rgb)
        w_depth = self.se_depth.weights(depth)
        fused = rgb * w_rgb + depth * w_depth
        return FusionResult(
            fused=fused,
            streams=[fused, depth],
            details={"attn": torch.cat([w_rgb, w_depth], dim=1)},
        )
