"""Before replacing them: our FPN pyramid and box clipping compute what torchvision.ops computes."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork, clip_boxes_to_image

from fusionzoo.heads.fpn import FPNDecoder


@pytest.mark.parametrize("seed", range(3))
def test_fpn_pyramid_equals_torchvision(seed):
    torch.manual_seed(seed)
    chs = [16, 32, 48, 64]
    ours = FPNDecoder(chs, 3, channels=16).eval()
    tv = FeaturePyramidNetwork(chs, 32).eval()
    for i in range(4):
        tv.inner_blocks[i][0].load_state_dict(ours.lateral[i].state_dict())
        tv.layer_blocks[i][0].load_state_dict(ours.smooth[i].state_dict())
    feats = [torch.randn(2, c, 20 // 2**i + seed, 26 // 2**i + 1) for i, c in enumerate(chs)]
    laterals = [lat(f) for lat, f in zip(ours.lateral, feats)]
    for i in range(3, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
    mine = [s(x) for s, x in zip(ours.smooth, laterals)]
    theirs = list(tv(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())
    for a, b in zip(mine, theirs):
        assert torch.equal(a, b)


def test_clip_equals_torchvision():
    boxes = torch.rand(500, 4, generator=torch.Generator().manual_seed(0)) * 120 - 30
    h, w = 37, 53
    ours = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)
    assert torch.equal(ours, clip_boxes_to_image(boxes, (h, w)))
