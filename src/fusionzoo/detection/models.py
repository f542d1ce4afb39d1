"""Fusion detectors: early, middle, late and hybrid fusion under torchvision FCOS / RetinaNet heads.

Every detector shares the segmentation zoo's parts: timm encoders (:class:`~fusionzoo.encoders.Encoder`),
stage-fusion operators (``fusionzoo.fusion.FUSION_OPS``), taps and input checks
(:class:`~fusionzoo.models.base.FusionModel`). The box side is :class:`~.heads.BoxDetector`
(FPN P3-P7 + torchvision head); late and hybrid models merge per-detector boxes with a rule of
:mod:`.boxes` (``nms``, ``wbf``, ``proben``).

Call convention (torchvision's): ``model(inputs, targets)`` in training returns a loss dict
(sum its values to train), ``model(inputs)`` in eval returns one dict per image with ``boxes``
``(N, 4)`` xyxy pixels, ``scores`` ``(N,)`` and ``labels`` ``(N,)``.

Names: ``{head}_{fusion}_{encoder}``, e.g. ``fcos_cmx_resnet18``, ``retinanet_late_nms_resnet50``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList

from ..encoders import Encoder
from ..models.base import FusionModel, register_family
from ..models.cmx import CMXModel
from ..models.middle import MiddleFusionModel
from ..models.mim import COMBINES as MIM_COMBINES
from ..models.mim import PAPER as MIM_PAPER
from ..models.mim import PurificationMixin
from .boxes import BOX_FUSIONS, Detections, check_targets
from .heads import HEADS, LEVEL_REDUCTIONS, LEVELS, BoxDetector

SIZE_DIVISIBLE = 32  # detectors' size_divisible: inputs are zero-padded (bottom/right) to a multiple, as torchvision's batch_images
FPN_STAGES = ("stage2", "stage3", "stage4")  # strides 8, 16, 32 feed P3-P5
DETECTION_ENCODERS = ("resnet18", "resnet50")

Output = dict[str, torch.Tensor] | list[Detections]


class DetectorMixin:
    """The detection call convention on top of :class:`FusionModel` (input checks, taps, missing policy).

    Subclasses implement :meth:`detect`. Mixed in before the FusionModel base so that its
    ``forward`` replaces the segmentation one.

    Attributes:
        size_divisible: inputs are zero-padded (bottom / right) to a multiple of this (32) before
            the encoder, as torchvision's ``batch_images``; feature maps and taps cover the padded
            image (:attr:`FusionModel.size_divisible`).
        head_detections: the detections of every box head (one
            :class:`~fusionzoo.detection.heads.BoxDetector`) of the last eval-mode forward, before
            box fusion: ``{head: [per image {"boxes" (N, 4) xyxy input pixels, "scores" (N,),
            "labels" (N,)}]}``, heads in the order they ran. ``"fused"`` is the head on fused
            features (early, middle, hybrid fusion: it is the model output for early and middle
            fusion), a modality name that modality's own head (late and hybrid fusion), listed
            also when that modality is in ``missing`` (the head runs, its boxes only leave the
            fusion). The tensors are those the heads returned, so under autograd their ``scores``
            carry gradients to the taps (Grad-CAM of a late detector). A train-mode forward sets
            ``{}``; the next forward replaces it.
    """

    task = "detection"
    size_divisible = SIZE_DIVISIBLE
    head_detections: dict[str, list[Detections]]

    def forward(  # type: ignore[override]
        self,
        inputs: Mapping[str, torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
        missing: Iterable[str] = (),
    ) -> Output:
        """Detect objects, or compute training losses.

        Args:
            inputs: one tensor per modality ``(B, C_m, H, W)``, same ``B, H, W`` for all, normalized.
            targets: training only (ignored in eval, as torchvision): per image ``boxes`` ``(N, 4)``
                xyxy pixels and ``labels`` ``(N,)`` in ``[0, num_classes)``; ``N = 0`` is allowed.
                Boxes partly outside the image are clipped; degenerate boxes raise.
            missing: modalities absent at inference (filled with zeros; late and hybrid models
                also drop that modality's own boxes from the box fusion).

        Returns:
            Training: a dict of scalar losses. Eval: ``B`` dicts with ``boxes`` ``(N, 4)``,
            ``scores`` ``(N,)``, ``labels`` ``(N,)`` in input pixel coordinates.
        """
        missing = self._check_missing(missing)
        xs, size = self.prepare(inputs, missing)
        ref = xs[self.modalities[0]]
        checked = check_targets(targets, ref.shape[0], size, self.num_classes, ref.device) if self.training else None
        images = ImageList(ref, [size] * ref.shape[0])
        self.head_detections = {}
        return self.detect(xs, images, checked, missing)

    def prepare(self, inputs: Mapping[str, torch.Tensor], missing: tuple[str, ...]
                ) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        """Checked inputs zero-padded (bottom / right) to a multiple of :attr:`size_divisible`,
        and the true ``(H, W)``. Nothing here depends on the batch size's value (an exported
        graph keeps a dynamic batch)."""
        xs = self.check_inputs(inputs, missing)
        ref = xs[self.modalities[0]]
        size = (int(ref.shape[-2]), int(ref.shape[-1]))
        pad_h, pad_w = (-size[0]) % self.size_divisible, (-size[1]) % self.size_divisible
        if pad_h or pad_w:
            xs = {m: F.pad(x, (0, pad_w, 0, pad_h)) for m, x in xs.items()}
        return xs, size

    def box_heads(self, xs: dict[str, torch.Tensor]) -> Iterator[tuple[str, BoxDetector, list[torch.Tensor], str]]:
        """Every box head as ``(name, detector, stride-8/16/32 features, FPN tap prefix)``, lazily
        in the order they run (the caller runs a head before asking for the next, so taps fire in
        their declared order). Names as :attr:`head_detections`: ``"fused"`` or a modality."""
        raise NotImplementedError

    def detect(
        self, xs: dict[str, torch.Tensor], images: ImageList, targets: list[Detections] | None, missing: tuple[str, ...]
    ) -> Output:
        """Losses (training) or detections (eval) of padded, checked inputs; eval mode records
        every head's detections with :meth:`keep_head_detections`. One head: its output. Several
        (late, hybrid): training losses keyed ``{head}.{loss}``; eval boxes merged by
        :meth:`fuse_boxes`, leaving out the own heads of ``missing`` modalities."""
        names, outputs = [], []
        for name, detector, features, prefix in self.box_heads(xs):
            names.append(name)
            outputs.append(self.run_head(detector, features, images, targets, prefix))
        if self.training and len(names) > 1:
            return {f"{n}.{k}": v for n, out in zip(names, outputs) for k, v in out.items()}
        self.keep_head_detections(names, outputs)
        if len(names) == 1:
            return outputs[0]
        return self.fuse_boxes(outputs, [n == "fused" or n not in missing for n in names])

    def raw_head_outputs(self, inputs: Mapping[str, torch.Tensor], missing: Iterable[str] = ()
                         ) -> dict[str, torch.Tensor]:
        """The box heads' raw outputs, before anchor decoding, score threshold, NMS and box fusion
        (what an exported graph ends with; docs/export.md). Inputs as :meth:`forward`.

        Returns:
            Per head ``h`` (names as :attr:`head_detections`), with ``N`` the anchors of P3-P7 of
            the padded input in torchvision's order (level, row, column, anchor):
            ``{h}.cls_logits`` ``(B, N, K)``, ``{h}.bbox_regression`` ``(B, N, 4)`` and, for FCOS,
            ``{h}.bbox_ctrness`` ``(B, N, 1)``; torchvision's ``postprocess_detections`` with the
            head's anchors turns them into the eval output.
        """
        missing = self._check_missing(missing)
        xs, _ = self.prepare(inputs, missing)
        out = {}
        for name, detector, features, prefix in self.box_heads(xs):
            _, head = detector.pyramid_and_head(features, self.taps, prefix, head_tap_prefix(prefix))
            out.update({f"{name}.{key}": value for key, value in head.items()})
        return out

    def keep_head_detections(self, names: Sequence[str], outputs: Sequence[Output]) -> None:
        """Record the eval outputs of the heads ``names`` as :attr:`head_detections` (no-op in training)."""
        if not self.training:
            self.head_detections = dict(zip(names, outputs))

    def declare_levels(self, prefix: str, detector: BoxDetector, after_fusion: bool) -> None:
        """Declare the taps of one box head, in the order they fire: its FPN levels
        ``{prefix}.p3`` .. ``.p7``, then its classification logits per level, ``head.p3`` .. ``.p7``
        for the fused head (``prefix="fpn"``), ``{m}.head.p3`` .. for modality ``m``'s own head.
        ``after_fusion``: whether the head's input features already mix modalities."""
        for level, reduction in zip(LEVELS, LEVEL_REDUCTIONS):
            self.taps.declare(f"{prefix}.{level}", detector.out_channels, reduction, after_fusion=after_fusion)
        head = head_tap_prefix(prefix)
        for level, reduction in zip(LEVELS, LEVEL_REDUCTIONS):
            self.taps.declare(f"{head}.{level}", detector.anchors_per_location * self.num_classes, reduction, "logits",
                              after_fusion=after_fusion)

    def run_head(self, detector: BoxDetector, features: Sequence[torch.Tensor], images: ImageList,
                 targets: list[Detections] | None, prefix: str) -> Output:
        """``detector`` on stride-8/16/32 features, passing the taps :meth:`declare_levels` declared."""
        return detector(features, images, targets, self.taps, prefix, head_tap_prefix(prefix))

    def fuse_boxes(self, per_detector: list[list[Detections]], present: list[bool]) -> list[Detections]:
        """Merge, image by image, the detections of several detectors with ``self.box_fusion``."""
        rule = BOX_FUSIONS[self.box_fusion]
        kwargs: dict[str, Any] = {"max_detections": self.detections_per_img}  # the heads' resolved cap
        if self.fusion_iou is not None:
            kwargs["iou_thresh"] = self.fusion_iou
        used = [d for d, p in zip(per_detector, present) if p]
        return [rule([d[i] for d in used], **kwargs) for i in range(len(used[0]))]


def head_tap_prefix(fpn_prefix: str) -> str:
    """Tap prefix of a box head's classification logits: ``head`` for the fused head (FPN taps
    ``fpn.*``), ``{m}.head`` for modality ``m``'s own head (FPN taps ``{m}.*``)."""
    return "head" if fpn_prefix == "fpn" else f"{fpn_prefix}.head"


def _check_box_fusion(box_fusion: str) -> None:
    if box_fusion not in BOX_FUSIONS:
        raise ValueError(f"unknown box_fusion {box_fusion!r}; choose one of {sorted(BOX_FUSIONS)}")


class EarlyFusionDetector(DetectorMixin, FusionModel):
    """Early fusion: the modalities are concatenated along channels into one timm encoder
    (``sum(C_m)`` input channels), whose stride-8/16/32 stages feed the FPN and box head.

    Args:
        encoder: timm encoder name.
        num_classes: ``K`` object classes (labels ``0..K-1``).
        modalities: input streams, RGB first.
        in_chans: per-modality channel overrides.
        pretrained: timm ImageNet weights for the encoder.
        head: ``"fcos"`` or ``"retinanet"`` (torchvision).
        fpn_channels: FPN / head width (256 as published; a multiple of 32).
        score_thresh, nms_thresh, detections_per_img: post-processing (None: torchvision's default
            for the head: FCOS 0.2, 0.6, 100; RetinaNet 0.05, 0.5, 300).

    Taps: ``fused.stage1..4``, ``fpn.p3..p7``, ``head.p3..p7`` (classification logits, kind ``logits``).
    """

    def __init__(
        self,
        encoder: str,
        *,
        num_classes: int = 3,
        modalities: Sequence[str] = ("rgb", "thermal"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        head: str = "fcos",
        fpn_channels: int = 256,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        self.encoder = Encoder(encoder, in_chans=sum(self.in_chans.values()), pretrained=pretrained)
        for stage, channels, reduction in zip(self.encoder.stage_names, self.encoder.channels, self.encoder.reductions):
            self.taps.declare(f"fused.{stage}", channels, reduction, after_fusion=True)  # one encoder sees all
        self.detector = BoxDetector(head, self.encoder.channels[1:], num_classes, fpn_channels, score_thresh, nms_thresh,
                                    detections_per_img)
        self.declare_levels("fpn", self.detector, after_fusion=True)

    def box_heads(self, xs: dict[str, torch.Tensor]) -> Iterator[tuple[str, BoxDetector, list[torch.Tensor], str]]:
        x = torch.cat([xs[m] for m in self.modalities], dim=1)
        feats = [self.taps(f"fused.{s}", f) for s, f in zip(self.encoder.stage_names, self.encoder(x))]
        yield "fused", self.detector, feats[1:], "fpn"


class MiddleFusionDetector(DetectorMixin, MiddleFusionModel):
    """Middle fusion: one encoder per modality, a stage-fusion operator after the stride-8, 16
    and 32 stages (the FPN inputs; the stride-4 stage stays unfused because P3-P7 never read
    it), one FPN + box head on the fused features. Operators that feed back (``sum``: FuseNet,
    ``cmx``: CMX's rectified streams) replace the streams entering the next stage.

    With ``fusion_op="crossattn"`` this is the CFT pattern (Qingyun, Dapeng, Zhaokui,
    "Cross-Modality Fusion Transformer for Multispectral Object Detection", 2021): cross-modal
    attention between RGB and thermal tokens at the three backbone levels that feed the neck,
    here with fusionzoo's PVT-style spatially reduced cross-attention operator.

    Args: as :class:`EarlyFusionDetector`, plus
        fusion_op: key of ``fusionzoo.fusion.FUSION_OPS``.
        feedback: feed the operator's streams back into the encoders (where it has them).
        fusion_kwargs: extra keyword arguments for every stage's operator; for ``cmx`` the preset
            is picked from the encoder's channels as in :class:`~fusionzoo.models.cmx.CMXModel`.

    Taps: ``{m}.stage1..4``, ``fused.stage2..4`` (+ operator details), ``fpn.p3..p7``, ``head.p3..p7``.
    """

    def __init__(
        self,
        encoder: str,
        *,
        num_classes: int = 3,
        modalities: Sequence[str] = ("rgb", "thermal"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        head: str = "fcos",
        fpn_channels: int = 256,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
        fusion_op: str = "crossattn",
        feedback: bool = True,
        fusion_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # Read by build_head, which MiddleFusionModel.__init__ calls.
        self.head_options = {"head": head, "fpn_channels": fpn_channels, "score_thresh": score_thresh,
                             "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
        self.fusion_op = fusion_op
        super().__init__(encoder, num_classes=num_classes, modalities=modalities, in_chans=in_chans,
                         pretrained=pretrained, fusion_op=fusion_op, fuse_stem=False, feedback=feedback,
                         fusion_kwargs=fusion_kwargs)

    def fuses_stage(self, stage: str) -> bool:
        return stage in FPN_STAGES

    def op_kwargs(self, stage_channels: Sequence[int]) -> dict[str, Any]:
        if self.fusion_op == "cmx":
            return CMXModel.op_kwargs(self, stage_channels)  # the same preset rule as the segmentation CMX
        return self.fusion_kwargs

    def build_head(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        o = self.head_options
        self.detector = BoxDetector(o["head"], self.stage_channels[1:], self.num_classes, o["fpn_channels"],
                                    o["score_thresh"], o["nms_thresh"], o["detections_per_img"])
        self.declare_levels("fpn", self.detector, after_fusion=True)  # on the fused features
        self.detections_per_img = self.detector.detections_per_img

    def box_heads(self, xs: dict[str, torch.Tensor]) -> Iterator[tuple[str, BoxDetector, list[torch.Tensor], str]]:
        fused, _ = self.forward_streams(xs)
        yield "fused", self.detector, fused, "fpn"


class PurificationDetector(PurificationMixin, MiddleFusionDetector):
    """MIM's Unimodal Purification (:mod:`fusionzoo.models.mim`) on the middle-fusion detector: each
    modality's stride-8, 16 and 32 maps pass its hard concrete mask, then are fused (add / mul /
    concat) for the FPN. Keywords and taps (``{m}.stageN.gate``, ``{m}.stageN.purified``) as
    :class:`~fusionzoo.models.mim.PurificationMixin`; the detection task adds the L0 penalty."""


class HybridFusionDetector(MiddleFusionDetector):
    """Hybrid fusion: middle fusion (modality streams kept separate, fused after the stride-8/16/32
    stages) with a fused FPN + head, plus one FPN + head per modality on its own stage features;
    the ``1 + M`` box sets are merged by a box-fusion rule. Training sums every head's losses
    (keys ``fused.*`` and ``{m}.*``), so each modality keeps a detector of its own, in the spirit
    of ProbEn's ensembling of fused and single-modality detectors (Chen et al., ECCV 2022, Sec. 4).

    Args: as :class:`MiddleFusionDetector`, plus
        box_fusion: ``"nms"``, ``"wbf"`` or ``"proben"`` (:mod:`fusionzoo.detection.boxes`).
        fusion_iou: IoU threshold of the box fusion (None: the rule's published default).

    Missing modalities: their own boxes are left out of the box fusion; the fused head stays.

    Taps: ``{m}.stage1..4``, ``fused.stage2..4`` (+ details), ``fpn.p3..p7``, ``head.p3..p7``, and per modality
    ``{m}.p3..p7``, ``{m}.head.p3..p7``.
    """

    def __init__(self, encoder: str, *, box_fusion: str = "wbf", fusion_iou: float | None = None, **kwargs: Any) -> None:
        _check_box_fusion(box_fusion)
        self.box_fusion = box_fusion
        self.fusion_iou = fusion_iou
        super().__init__(encoder, **kwargs)

    def build_head(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        super().build_head(decoder, decoder_channels, dropout)
        o = self.head_options
        self.modality_detectors = nn.ModuleDict()
        for m in self.modalities:
            self.modality_detectors[m] = BoxDetector(o["head"], self.stage_channels[1:], self.num_classes,
                                                     o["fpn_channels"], o["score_thresh"], o["nms_thresh"],
                                                     o["detections_per_img"])
            self.declare_levels(m, self.modality_detectors[m], after_fusion=self.own_stream_mixed(m))

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The modality's encoder and its own FPN + head."""
        yield from super().modality_parameters(modality)
        yield from self.modality_detectors[modality].parameters()

    def box_heads(self, xs: dict[str, torch.Tensor]) -> Iterator[tuple[str, BoxDetector, list[torch.Tensor], str]]:
        fused, own = self.forward_streams(xs)
        yield "fused", self.detector, fused, "fpn"
        for m in self.modalities:
            yield m, self.modality_detectors[m], own[m][1:], m


class LateFusionDetector(DetectorMixin, FusionModel):
    """Late fusion: one complete detector (encoder + FPN + head) per modality; their boxes are
    merged by a box-fusion rule (``nms`` over the union, ``wbf`` or ``proben``; see
    :mod:`fusionzoo.detection.boxes`). Training sums the detectors' losses (keys ``{m}.*``).

    Args: as :class:`EarlyFusionDetector`, plus
        box_fusion: ``"nms"``, ``"wbf"`` or ``"proben"``.
        fusion_iou: IoU threshold of the box fusion (None: the rule's published default).

    Missing modalities: that detector still runs (its taps fire) but its boxes are left out.

    Taps, per modality in order: ``{m}.stage1..4``, ``{m}.p3..p7``, ``{m}.head.p3..p7`` (classification logits).
    """

    def __init__(
        self,
        encoder: str,
        *,
        num_classes: int = 3,
        modalities: Sequence[str] = ("rgb", "thermal"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        head: str = "fcos",
        fpn_channels: int = 256,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
        box_fusion: str = "wbf",
        fusion_iou: float | None = None,
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        _check_box_fusion(box_fusion)
        self.box_fusion = box_fusion
        self.fusion_iou = fusion_iou
        self.encoders = nn.ModuleDict()
        self.detectors = nn.ModuleDict()
        for m in self.modalities:
            enc = Encoder(encoder, in_chans=self.in_chans[m], pretrained=pretrained)
            self.encoders[m] = enc
            for stage, channels, reduction in zip(enc.stage_names, enc.channels, enc.reductions):
                self.taps.declare(f"{m}.{stage}", channels, reduction)  # one detector per modality: before fusion
            self.detectors[m] = BoxDetector(head, enc.channels[1:], num_classes, fpn_channels, score_thresh, nms_thresh,
                                            detections_per_img)
            self.declare_levels(m, self.detectors[m], after_fusion=False)
        self.detections_per_img = self.detectors[self.modalities[0]].detections_per_img

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The modality's encoder and its FPN + head."""
        yield from super().modality_parameters(modality)
        yield from self.detectors[modality].parameters()

    def box_heads(self, xs: dict[str, torch.Tensor]) -> Iterator[tuple[str, BoxDetector, list[torch.Tensor], str]]:
        for m in self.modalities:
            enc = self.encoders[m]
            feats = [self.taps(f"{m}.{s}", f) for s, f in zip(enc.stage_names, enc(xs[m]))]
            yield m, self.detectors[m], feats[1:], m


# -- registration -----------------------------------------------------------------------------
def _register(**kwargs: Any) -> None:
    """:func:`fusionzoo.models.base.register_family` with the detection zoo's task, default
    modalities (RGB + thermal) and encoders."""
    register_family(task="detection", modalities=("rgb", "thermal"), encoders=DETECTION_ENCODERS,
                    generic_methods="fcos_sum, fcos_crossattn, fcos_early, fcos_late_* or fcos_hybrid_wbf", **kwargs)


_HEAD_PAPERS = {
    "fcos": "FCOS (Tian et al., ICCV 2019) head from torchvision",
    "retinanet": "RetinaNet (Lin et al., ICCV 2017) head from torchvision",
}
_WBF = "weighted boxes fusion (Solovyev et al., Image and Vision Computing 2021)"
_PROBEN = "ProbEn (Chen, Shi, Ye, Mertz, Ramanan, Kong, 'Multimodal Object Detection via Probabilistic Ensembling', ECCV 2022)"

for _head in HEADS:
    _hp = _HEAD_PAPERS[_head]
    _register(method=f"{_head}_early", model_cls=EarlyFusionDetector, fusion="early", fixed={"head": _head},
              paper=f"{_hp}; input channel concatenation (Wagner et al., 'Multispectral Pedestrian "
                    "Detection using Deep Fusion Convolutional Neural Networks', ESANN 2016, early fusion)")
    _register(method=f"{_head}_sum", model_cls=MiddleFusionDetector, fusion="middle",
              fixed={"head": _head, "fusion_op": "sum", "feedback": True},
              paper=f"{_hp}; FuseNet element-wise sum fusion (Hazirbas et al., ACCV 2016)")
    _register(method=f"{_head}_cmx", model_cls=MiddleFusionDetector, fusion="middle", max_modalities=2,
              fixed={"head": _head, "fusion_op": "cmx", "feedback": True},
              paper=f"{_hp}; CMX rectification + fusion (Zhang et al., 'CMX: Cross-Modal Fusion for RGB-X "
                    "Semantic Segmentation with Transformers', T-ITS 2023)")
    _register(method=f"{_head}_crossattn", model_cls=MiddleFusionDetector, fusion="middle",
              fixed={"head": _head, "fusion_op": "crossattn", "feedback": False},
              paper=f"{_hp}; cross-modality attention fusion at three backbone levels as in CFT (Qingyun "
                    "et al., 'Cross-Modality Fusion Transformer for Multispectral Object Detection', 2021)")
    for _rule, _rp in (("nms", "NMS over the union of per-modality boxes"), ("wbf", _WBF), ("proben", _PROBEN)):
        _register(method=f"{_head}_late_{_rule}", model_cls=LateFusionDetector, fusion="late",
                  fixed={"head": _head, "box_fusion": _rule},
                  paper=f"{_hp}; one detector per modality, boxes fused by {_rp}")
    _register(method=f"{_head}_hybrid_wbf", model_cls=HybridFusionDetector, fusion="hybrid",
              fixed={"head": _head, "box_fusion": "wbf", "fusion_op": "se_add", "feedback": False},
              paper=f"{_hp}; ESANet SE-add stage fusion (Seichter et al., ICRA 2021) + per-modality "
                    f"detectors, boxes of all heads fused by {_WBF}")
# MIM's purification under FCOS only: a RetinaNet variant differs in nothing MIM touches, and each
# registered resnet18 detector costs the registry-driven tests ~15 s of CPU (suite time, issue 12).
for _combine in MIM_COMBINES:
    _register(method=f"fcos_mim_{_combine}", model_cls=PurificationDetector, fusion="middle",
              fixed={"head": "fcos", "combine": _combine, "fusion_op": "mim", "feedback": False},
              paper=f"{_HEAD_PAPERS['fcos']}; {MIM_PAPER}")
