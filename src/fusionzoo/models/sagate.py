"""SA-Gate (Chen, Lin, Wang, Zeng, Cheng, Yuan, "Bi-directional Cross-Modality Feature Propagation
with Separation-and-Aggregation Gate for RGB-D Semantic Segmentation", ECCV 2020, section 3.2).

After every stage the separation-and-aggregation gate re-calibrates each stream with the other
(feature separation part), aggregates them by per-pixel softmax gates, and propagates
``(x + merged) / 2`` back into both encoders (``fusionzoo.fusion.SAGateFusion``). The paper's
DeepLabV3+ decoder is replaced by a fusionzoo decoder.
"""

from __future__ import annotations

from .base import register_family
from .middle import MiddleFusionModel

register_family(
    method="sagate",
    model_cls=MiddleFusionModel,
    fusion="middle",
    paper="Chen et al., 'Bi-directional Cross-Modality Feature Propagation with Separation-and-Aggregation Gate', ECCV 2020",
    fixed={"fusion_op": "sagate", "fuse_stem": False, "feedback": True},
    max_modalities=2,
)
