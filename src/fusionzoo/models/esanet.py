"""ESANet (Seichter, Koehler, Lewandowski, Wengefeld, Gross, "Efficient RGB-D Semantic
Segmentation for Indoor Scene Analysis", ICRA 2021, section III-A).

Two ResNet encoders; after the stem and after every stage both streams are re-weighted by
squeeze-and-excitation and added (``fusionzoo.fusion.ESANetFusion``); the sum continues in the RGB
encoder. ESANet's context module and its own decoder are replaced by a fusionzoo decoder.
"""

from __future__ import annotations

from .base import register_family
from .middle import MiddleFusionModel

register_family(
    method="esanet",
    model_cls=MiddleFusionModel,
    fusion="middle",
    paper="Seichter et al., 'Efficient RGB-D Semantic Segmentation for Indoor Scene Analysis', ICRA 2021",
    fixed={"fusion_op": "esanet", "fuse_stem": True, "feedback": True},
    max_modalities=2,
)
