"""Semantic FPN decoder (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019,
section 3): an FPN (Lin et al., CVPR 2017; torchvision's ``FeaturePyramidNetwork``) then, per
level, 3x3 conv-GN-ReLU + 2x upsampling until stride 4, summed and classified."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

# State-dict keys of the pyramid before it was torchvision's module -> torchvision's names, so
# weights saved then still load: lateral.i = inner_blocks.i.0 (1x1), smooth.i = layer_blocks.i.0 (3x3).
_OLD_PYRAMID_KEYS = ((re.compile(r"lateral\.(\d+)\."), r"fpn.inner_blocks.\1.0."),
                     (re.compile(r"smooth\.(\d+)\."), r"fpn.layer_blocks.\1.0."))


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
        # Lateral 1x1 convs, nearest-neighbour top-down sum, 3x3 output convs; its convs start from
        # torchvision's init (kaiming_uniform a=1, zero bias, as Detectron's FPN).
        self.fpn = FeaturePyramidNetwork(list(in_channels), pyramid)
        self.register_load_state_dict_pre_hook(_rename_old_pyramid_keys)
        # Level i (stride 4 * 2^i) needs max(1, i) conv blocks and i upsamplings to reach stride 4.
        self.semantic = nn.ModuleList(
            nn.ModuleList([_conv_gn_relu(pyramid if j == 0 else channels, channels) for j in range(max(1, i))])
            for i in range(len(in_channels))
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features[i]`` ``(B, C_i, H/s_i, W/s_i)`` -> embedding ``(B, channels, H/4, W/4)``."""
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values()
        size = features[0].shape[-2:]
        out = 0
        for level, (x, blocks) in enumerate(zip(pyramid, self.semantic)):
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


def _rename_old_pyramid_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: rename the pre-torchvision pyramid keys (``_OLD_PYRAMID_KEYS``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _OLD_PYRAMID_KEYS:
            if old.match(rest):
                state_dict[prefix + old.sub(new, rest, count=1)] = state_dict.pop(key)
