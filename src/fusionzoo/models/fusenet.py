"""FuseNet (Hazirbas, Ma, Domokos, Cremers, "FuseNet: Incorporating Depth into Semantic
Segmentation via Fusion-based CNN Architecture", ACCV 2016, section 3.1).

The depth branch's feature maps are added element-wise into the RGB branch after every block;
the sum continues in the RGB encoder (sparse fusion). FuseNet's VGG-16 encoder and SegNet-style
unpooling decoder are replaced by any timm encoder and a fusionzoo decoder; the fusion itself
(``fusionzoo.fusion.SumFusion``) is the paper's, and so is the depth branch's first layer: with
pretrained weights it is the mean of the RGB filters (``mono_init="mean"``). The published
network (two VGG-16 encoders fused after each of five blocks, SegNet decoder) is ``fusenet_vgg16``
(:mod:`fusionzoo.models.published.fusenet`).
"""

from __future__ import annotations

from .base import register_family
from .middle import MiddleFusionModel

register_family(
    method="fusenet",
    model_cls=MiddleFusionModel,
    fusion="middle",
    paper="Hazirbas et al., 'FuseNet', ACCV 2016",
    fixed={"fusion_op": "sum", "fuse_stem": False, "feedback": True, "mono_init": "mean"},
    max_modalities=2,
)
