"""ACNet (Hu, Yang, Fei, Huang, Wang, "ACNet: Attention Based Network to Exploit Complementary
Features for RGBD Semantic Segmentation", ICIP 2019, section 2).

Three branches: an RGB and a depth encoder, and a merged branch with its own copy of the encoder
stages. After the stem and every stage, attention complementary modules (ACM: channel attention)
re-weight each modality and their sum is added to the merged branch:
``m_k = stage_k^merged(m_{k-1}) + ACM_rgb(rgb_k) + ACM_depth(depth_k)``. The modality streams
are not modified (no feedback). With pretrained weights the depth stem averages the RGB
filters and the merged branch starts from the same ImageNet stages, as in the reference code.
ACNet's decoder is replaced by a fusionzoo decoder.
"""

from __future__ import annotations

import torch
from torch import nn

from ..encoders import Encoder
from .base import register_family
from .middle import MiddleFusionModel


class ACNetModel(MiddleFusionModel):
    """Middle fusion with ACNet's merged third branch (``merged``), see the module docstring."""

    def build_extra(self) -> None:
        first = self.encoders[self.modalities[0]]
        merged = Encoder(first.name, in_chans=first.in_chans, pretrained=self.pretrained, with_stem="stem" in self.stage_names)
        # The merged branch starts from the first fused feature, so its first segment (stem, or
        # stage 1 when the encoder has no stride-2 stem) never runs: drop it.
        merged.segments[0] = nn.Identity()
        self.merged = merged

    def merge(self, index: int, fused: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        if previous is None:
            return fused
        return self.merged.forward_stage(index, previous) + fused


register_family(
    method="acnet",
    model_cls=ACNetModel,
    fusion="middle",
    paper="Hu et al., 'ACNet: Attention Based Network to Exploit Complementary Features for RGBD Semantic Segmentation', ICIP 2019",
    fixed={"fusion_op": "acnet", "fuse_stem": True, "feedback": False, "mono_init": "mean"},
    max_modalities=2,
)
