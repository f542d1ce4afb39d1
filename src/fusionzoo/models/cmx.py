"""CMX (Zhang, Liu, Yang, Hu, Stiefelhagen, "CMX: Cross-Modal Fusion for RGB-X Semantic
Segmentation with Transformers", IEEE T-ITS 2023, sections III-B and III-C).

Two encoders; after every stage the cross-modal feature rectification module (FRM) rectifies
each stream with the other's channel and spatial weights and feeds the result back into both
encoders, and the feature fusion module (FFM: cross-attention + channel embedding) produces the
fused feature for the all-MLP decoder (embedding 512, as CMX uses for MiT-B2 and larger). CMX's
MiT backbone is timm's ``pvt_v2_b*``; any timm encoder works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..fusion.cmx import PRESETS
from .base import register_family
from .middle import MiddleFusionModel


class CMXModel(MiddleFusionModel):
    """Middle fusion with CMX's FRM + FFM at every stage (see the module docstring).

    CMX's reference code has two hyper-parameter presets for its fusion modules: ``"mit"``
    (channel reduction 1, heads [1, 2, 5, 8]) for MiT backbones and ``"resnet"`` (reduction 4,
    heads [4, 8, 16, 32]). Unless ``fusion_kwargs`` names one, the first preset whose head
    counts divide this encoder's stage channels is used (decided from ``feature_info``
    channels, never from the encoder's name).
    """

    def op_kwargs(self, stage_channels: Sequence[int]) -> dict[str, Any]:
        if "preset" in self.fusion_kwargs or "num_heads" in self.fusion_kwargs:
            return self.fusion_kwargs
        for preset in ("mit", "resnet"):
            reduction, heads = PRESETS[preset]
            if all(c % reduction == 0 and (c // reduction) % h == 0 for c, h in zip(stage_channels, heads)):
                return {**self.fusion_kwargs, "preset": preset}
        raise ValueError(
            f"no CMX preset fits stage channels {list(stage_channels)}; pass fusion_kwargs={{'num_heads': ..}}"
        )


register_family(
    method="cmx",
    model_cls=CMXModel,
    fusion="middle",
    paper="Zhang et al., 'CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers', T-ITS 2023",
    fixed={"fusion_op": "cmx", "fuse_stem": False, "feedback": True},
    defaults={"decoder": "segformer", "decoder_channels": 512},
    max_modalities=2,
    default_encoder="pvt_v2_b2",
)
