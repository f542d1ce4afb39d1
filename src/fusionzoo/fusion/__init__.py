"""Stage-fusion operators: the :class:`StageFusion` contract, published methods, generic ops.

``FUSION_OPS`` maps a short name to its class; every class is built as
``cls(channels, num_modalities, stage_index=k, **method_kwargs)``.
"""

from __future__ import annotations

from .acnet import ACNetFusion
from .base import FusionResult, StageFusion
from .cmx import CMXFusion, FeatureFusionModule, FeatureRectifyModule
from .esanet import ESANetFusion
from .generic import ConcatFusion, CrossAttentionFusion, SEAddFusion, SumFusion
from .purification import HardConcrete, PurificationFusion
from .sagate import SAGateFusion

FUSION_OPS: dict[str, type[StageFusion]] = {
    "sum": SumFusion,
    "concat": ConcatFusion,
    "se_add": SEAddFusion,
    "crossattn": CrossAttentionFusion,
    "acnet": ACNetFusion,
    "esanet": ESANetFusion,
    "sagate": SAGateFusion,
    "cmx": CMXFusion,
    "mim": PurificationFusion,
}

__all__ = [
    "FUSION_OPS",
    "ACNetFusion",
    "CMXFusion",
    "ConcatFusion",
    "CrossAttentionFusion",
    "ESANetFusion",
    "FeatureFusionModule",
    "FeatureRectifyModule",
    "FusionResult",
    "HardConcrete",
    "PurificationFusion",
    "SAGateFusion",
    "SEAddFusion",
    "StageFusion",
    "SumFusion",
]
