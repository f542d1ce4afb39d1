"""FPN + torchvision box heads (FCOS, RetinaNet) over fusion features.

torchvision's ``FCOS`` / ``RetinaNet`` classes take one image tensor and run their own backbone
and resizing transform. A fusion detector has several input tensors and its own (fused)
backbone, so :class:`BoxDetector` keeps the torchvision model only for its parts (head,
anchor generator, box coder, matcher, ``compute_loss``, ``postprocess_detections``) and calls
them the way torchvision's own ``forward`` does; losses, anchors, NMS and post-processing are
therefore torchvision's. Its backbone and transform are dropped: inputs are already normalized
per modality (fusionzoo.data) and are never resized, only zero-padded to a multiple of 32 as
torchvision's ``batch_images`` does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

HEADS = ("fcos", "retinanet")
LEVELS = ("p3", "p4", "p5", "p6", "p7")
LEVEL_REDUCTIONS = (8, 16, 32, 64, 128)
# torchvision's published defaults per head (fcos_resnet50_fpn, retinanet_resnet50_fpn).
HEAD_DEFAULTS = {
    "fcos": {"score_thresh": 0.2, "nms_thresh": 0.6, "detections_per_img": 100},
    "retinanet": {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 300},
}


class _OutChannels:
    """Stands in for torchvision's backbone argument, which must only tell ``out_channels``."""

    def __init__(self, channels: int) -> None:
        self.out_channels = channels


class BoxDetector(nn.Module):
    """FPN (P3-P7) over stride-8/16/32 features + a torchvision FCOS or RetinaNet head.

    The FPN is torchvision's ``FeaturePyramidNetwork`` with ``LastLevelP6P7`` computed from P5,
    as in torchvision's ``fcos_resnet50_fpn`` and ``retinanet_resnet50_fpn`` (Lin et al., "Focal
    Loss for Dense Object Detection", ICCV 2017, Sec. 4; Tian et al., "FCOS", ICCV 2019, Sec. 3.2).

    Args:
        head: ``"fcos"`` or ``"retinanet"``.
        in_channels: channels of the stride-8, 16 and 32 features.
        num_classes: ``K``; labels are ``0..K-1`` (torchvision's sigmoid heads have no
            background output: label 0 is an ordinary class).
        fpn_channels: FPN width (256 in both papers); the heads' GroupNorm(32, C) needs a multiple of 32, >= 64.
        score_thresh, nms_thresh, detections_per_img: post-processing; None takes torchvision's
            default for the head (FCOS 0.2, 0.6, 100; RetinaNet 0.05, 0.5, 300).
        topk_candidates: boxes kept per level before NMS.
    """

    def __init__(
        self,
        head: str,
        in_channels: Sequence[int],
        num_classes: int,
        fpn_channels: int = 256,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
        topk_candidates: int = 1000,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown detection head {head!r}; choose one of {HEADS}")
        if len(in_channels) != 3:
            raise ValueError(f"BoxDetector takes the stride-8, 16 and 32 features, got {len(in_channels)} channel counts")
        if fpn_channels < 64 or fpn_channels % 32:
            # GroupNorm(32, C) with one channel per group cannot normalize a 1x1 level (P7 of a small
            # image, batch 1), so at least two channels per group.
            raise ValueError(f"fpn_channels must be a multiple of 32 and at least 64 (the heads use GroupNorm(32, C)), got {fpn_channels}")
        self.head_name = head
        self.fpn = FeaturePyramidNetwork(list(in_channels), fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        given = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
        options = {**HEAD_DEFAULTS[head], **{k: v for k, v in given.items() if v is not None}, "topk_candidates": topk_candidates}
        cls = FCOS if head == "fcos" else RetinaNet
        model = cls(_OutChannels(fpn_channels), num_classes, **options)
        # Only the head and the box machinery are used (module docstring).
        del model.backbone, model.transform
        self.torchvision = model
        self.out_channels = fpn_channels
        self.detections_per_img = options["detections_per_img"]

    def forward(
        self,
        features: Sequence[torch.Tensor],
        images: ImageList,
        targets: list[dict[str, torch.Tensor]] | None,
        tap: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        tap_prefix: str = "fpn",
        head_prefix: str | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Losses (training) or detections (eval).

        Args:
            features: stride-8, 16, 32 features ``(B, C_i, H_pad / s, W_pad / s)``.
            images: ``ImageList`` of the padded input ``(B, *, H_pad, W_pad)`` and the true sizes.
            targets: checked targets (``boxes`` ``(N, 4)`` xyxy, ``labels`` ``(N,)``) when training.
            tap: the model's tap call; FPN levels pass ``{tap_prefix}.p3`` .. ``.p7`` and, with
                ``head_prefix``, each level's classification logits ``(B, A * K, h, w)`` (A anchors
                per location: FCOS 1, RetinaNet 9; channel ``a * K + k``) pass ``{head_prefix}.p3`` .. ``.p7``.

        Returns:
            Training: torchvision's loss dict (FCOS: classification, bbox_regression,
            bbox_ctrness; RetinaNet: classification, bbox_regression). Eval: per image a dict
            with ``boxes`` ``(N, 4)`` xyxy in input pixels, ``scores`` ``(N,)``, ``labels`` ``(N,)``.
        """
        levels, head_outputs = self.pyramid_and_head(features, tap, tap_prefix, head_prefix)
        tv = self.torchvision
        anchors = tv.anchor_generator(images, levels)
        locations = [x.size(2) * x.size(3) for x in levels]
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets")
            if self.head_name == "fcos":
                return tv.compute_loss(targets, head_outputs, anchors, locations)
            return tv.compute_loss(targets, head_outputs, anchors)
        # As torchvision's forward: split the flat anchor dimension per level (RetinaNet has A
        # anchors per location), then decode, threshold, NMS.
        per_location = head_outputs["cls_logits"].size(1) // sum(locations)
        split = [n * per_location for n in locations]
        split_outputs = {k: list(v.split(split, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(split)) for a in anchors]
        return tv.postprocess_detections(split_outputs, split_anchors, images.image_sizes)

    def pyramid_and_head(
        self,
        features: Sequence[torch.Tensor],
        tap: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        tap_prefix: str = "fpn",
        head_prefix: str | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """FPN levels P3-P7 and :meth:`head_outputs` on them (arguments as :meth:`forward`)."""
        pyramid = self.fpn(OrderedDict(zip(LEVELS[:3], features)))
        levels = list(pyramid.values())
        if tap is not None:
            levels = [tap(f"{tap_prefix}.{name}", x) for name, x in zip(LEVELS, levels)]
        return levels, self.head_outputs(levels, tap if head_prefix else None, head_prefix or "")

    @property
    def anchors_per_location(self) -> int:
        """``A``: anchors per feature-map cell (FCOS 1, RetinaNet 9)."""
        return int(self.torchvision.anchor_generator.num_anchors_per_location()[0])

    def head_outputs(self, levels: Sequence[torch.Tensor], tap: Callable[[str, torch.Tensor], torch.Tensor] | None,
                     prefix: str) -> dict[str, torch.Tensor]:
        """torchvision's ``head(levels)``, with the classification logits of each level passing the
        tap ``{prefix}.p3`` .. ``.p7`` as maps ``(B, A * K, h, w)`` before torchvision's flattening
        (the same operations as ``RetinaNetClassificationHead.forward`` / ``FCOSClassificationHead.forward``)."""
        head = self.torchvision.head
        if tap is None:
            return head(levels)
        cls_head = head.classification_head
        k = cls_head.num_classes
        flat = []
        for name, x in zip(LEVELS, levels):
            logits = tap(f"{prefix}.{name}", cls_head.cls_logits(cls_head.conv(x)))
            n, _, h, w = logits.shape
            # (B, A * K, h, w) -> (B, h * w * A, K), torchvision's anchor order
            flat.append(logits.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
        out = {"cls_logits": torch.cat(flat, dim=1)}
        if self.head_name == "fcos":
            out["bbox_regression"], out["bbox_ctrness"] = head.regression_head(levels)
        else:
            out["bbox_regression"] = head.regression_head(levels)
        return out
