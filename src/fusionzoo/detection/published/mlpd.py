"""MLPD, the published detector (Kim, Kim, Kim, Kim, Choi, "MLPD: Multi-Label Pedestrian Detector in
Multispectral Domain", IEEE RA-L 2021), as the authors' code builds, trains and evaluates it.

Network (reference ``src/model.py``, ``SSD300``): an SSD on two VGG-16-BN streams, halfway
(middle) fusion. Each modality has its own VGG-16 blocks 1-4 (conv-BN-ReLU, 2x2 max pooling with
``ceil_mode`` after blocks 1-3, a 3x3 stride-1 pooling after block 4: stride 8). From block 5 on,
the two streams run through the *same* layers (shared weights, BatchNorm statistics taken per
stream call): conv5 (+ 2x2 pooling, stride 16), conv6 (3x3 conv-BN + 1x1), conv7 (1x1 stride 2 +
3x3 conv-BN, stride 32), conv8 (1x1 stride 2 + 3x3, stride 64), conv9 and conv10 (1x1 + 3x3). At
each of the six levels conv4_3, conv6, conv7, conv8, conv9, conv10 the two streams' maps are
concatenated and fused by a 3x3 conv (1024 -> 512, no bias) + BN + ReLU; the conv4_3 level is
L2-normalised over channels and scaled per channel (learned, initialised 20, SSD's ``L2Norm``).
A 3x3 box and a 3x3 class convolution per level predict 6 anchors per cell.

Anchors (``create_prior_boxes``): per cell, one anchor area per level (40^2, 80^2, 160^2, 200^2,
280^2, 360^2 px at the authors' 512x640 input), aspect ratios w/h 1/2 and 1, and scales 1,
2^(1/3), 2^(2/3), in that nesting (area, ratio, scale); centres at cell centres; stored as float32
in (cx, cy, w, h) fractions of the input. The authors fix the feature-map sizes of 512x640; here
they are read from the feature maps, so any input size works and 512x640 gives their 41,760
anchors bit for bit. Box coder: SSD's, variances 0.1 (centre) and 0.2 (size).

Multi-label head (paper section III-B): three sigmoid outputs per anchor, [background, person seen
in RGB, person seen in thermal]. A person in both images is the target [0, 1, 1], in one only
[0, 1, 0] or [0, 0, 1] (from the authors' semi-unpaired augmentation), background [1, 0, 0].
For ``K`` object classes this generalises to ``1 + 2K`` outputs (background, then RGB and
thermal per class); ``K = 1`` is the authors' head.

Loss (``MultiBoxLoss``): SSD matching (each prior takes its best-IoU box; each box claims its
best prior; IoU < 0.5 is background; priors matched to an ignore box are left out), binary
cross-entropy summed over the outputs with hard negative mining (per image the ``3 x positives``
highest-loss negatives), divided by the number of positives, plus the L1 loss (the reference's
``smooth_l1`` attribute is ``nn.L1Loss``) of the encoded boxes averaged over the positives'
coordinates, weight 1.

Post-processing (``detect_objects`` as ``inference.py`` / ``val_epoch`` call it): score = the mean
of the class's RGB and thermal sigmoids; candidates above ``min_score`` 0.1; greedy NMS at IoU
0.425; the 200 best; boxes are not clipped to the image. The authors detect a single class;
for ``K > 1`` NMS runs per class.

Parity: ``tests/test_parity_mlpd.py`` against fixtures of the reference code at
:data:`REFERENCE_COMMIT` (``tools/parity/mlpd.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms

from ..._registry import ReleasedWeights, register_weights
from ...encoders import pretrained_timm_model
from ...models.base import FusionModel
from ...models.convert import ConversionError, published_entry, register_converter, rename_keys
from ..boxes import Detections, check_targets

__all__ = ["MLPD", "mlpd_loss", "mlpd_priors", "mlpd_vgg16"]

REFERENCE_REPO = "https://github.com/sejong-rcv/MLPD-Multi-Label-Pedestrian-Detection"
REFERENCE_COMMIT = "8e583929a97b9f959634efa69174435ad0252a57"
PAPER = (
    "Kim, Kim, Kim, Kim, Choi, 'MLPD: Multi-Label Pedestrian Detector in Multispectral Domain', "
    "IEEE Robotics and Automation Letters 2021"
)

# Per-stream VGG-16 blocks 1-4 (conv widths); block k's output has stride 2^(k-1), block 4's 8.
STREAM_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512))
# The six prediction levels: (name as in the reference, tap stage, stride at the input).
LEVELS: tuple[tuple[str, str, int], ...] = (
    ("conv4_3", "stage4", 8), ("conv6", "stage6", 16), ("conv7", "stage7", 32),
    ("conv8", "stage8", 64), ("conv9", "stage9", 64), ("conv10", "stage10", 64),
)
# Per-stream stages after the per-modality blocks, run by the shared layers: (tap stage, stride).
SHARED_STAGES: tuple[tuple[str, int], ...] = (
    ("stage5", 16), ("stage6", 16), ("stage7", 32), ("stage8", 64), ("stage9", 64), ("stage10", 64),
)
REFERENCE_SIZE = (512, 640)  # (H, W) the authors train and test at; anchor sides are pixels of it
ANCHOR_SIDES = (40.0, 80.0, 160.0, 200.0, 280.0, 360.0)  # sqrt(anchor area) per level, pixels
ASPECT_RATIOS = (1 / 2.0, 1 / 1.0)  # w / h
ANCHOR_SCALES = (1.0, 2 ** (1 / 3.0), 2 ** (2 / 3.0))
ANCHORS_PER_CELL = len(ASPECT_RATIOS) * len(ANCHOR_SCALES)  # 6
VARIANCES = (10.0, 5.0)  # SSD's box coder: centre offsets / (0.1 w), log sizes / 0.2
MATCH_IOU = 0.5  # MultiBoxLoss threshold
NEG_POS_RATIO = 3
L2NORM_INIT = 20.0
# Post-processing of the reference's evaluation (inference.py val_epoch -> detect_objects).
MIN_SCORE, NMS_IOU, TOP_K = 0.1, 0.425, 200
# Visibility codes of a box (the reference's labels 1, 2, 3): a bit per modality.
IN_RGB, IN_AUX = 1, 2
BOTH = IN_RGB | IN_AUX


class ConvBN(nn.Sequential):
    """3x3 conv (bias) -> BatchNorm; the ReLU is applied by the caller (functional, as the reference)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(cout)


class VGGStream(nn.Module):
    """One modality's VGG-16-BN blocks 1-4 (``conv1_1`` .. ``conv4_3``); pooling is the model's."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        cin = in_chans
        for b, widths in enumerate(STREAM_BLOCKS, 1):
            for i, cout in enumerate(widths, 1):
                self.add_module(f"conv{b}_{i}", ConvBN(cin, cout))
                cin = cout

    def block(self, b: int) -> list[ConvBN]:
        return [getattr(self, f"conv{b}_{i}") for i in range(1, len(STREAM_BLOCKS[b - 1]) + 1)]


class SharedLayers(nn.Module):
    """conv5 .. conv10, one set of weights applied to each stream in turn (reference ``VGGBase``)."""

    def __init__(self) -> None:
        super().__init__()
        for i in (1, 2, 3):
            self.add_module(f"conv5_{i}", ConvBN(512, 512))
        self.conv6_1 = ConvBN(512, 512)
        self.conv6_2 = nn.Conv2d(512, 512, kernel_size=1)
        self.conv7_1 = nn.Conv2d(512, 256, kernel_size=1, stride=2)
        self.conv7_2 = ConvBN(256, 512)
        self.conv8_1 = nn.Conv2d(512, 256, kernel_size=1, stride=2)
        self.conv8_2 = nn.Conv2d(256, 512, kernel_size=3, padding=1)
        self.conv9_1 = nn.Conv2d(512, 256, kernel_size=1)
        self.conv9_2 = nn.Conv2d(256, 512, kernel_size=3, padding=1)
        self.conv10_1 = nn.Conv2d(512, 256, kernel_size=1)
        self.conv10_2 = nn.Conv2d(256, 512, kernel_size=3, padding=1)
        for k in (8, 9, 10):  # the reference initialises these Xavier-uniform, bias 0 (the rest: torch defaults)
            for j in (1, 2):
                conv = getattr(self, f"conv{k}_{j}")
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.pool5 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One stream's ``(B, C, h, w)`` through the shared stage ``name`` (``stage5`` .. ``stage10``)."""
        if name == "stage5":
            for i in (1, 2, 3):
                x = F.relu(getattr(self, f"conv5_{i}")(x))
            return self.pool5(x)
        if name == "stage6":
            return F.relu(self.conv6_2(F.relu(self.conv6_1(x))))
        if name == "stage7":
            return F.relu(self.conv7_2(F.relu(self.conv7_1(x))))
        k = int(name.removeprefix("stage"))
        return F.relu(getattr(self, f"conv{k}_2")(F.relu(getattr(self, f"conv{k}_1")(x))))


class FuseLevel(nn.Module):
    """Halfway fusion at one level: concat(RGB, aux) -> 3x3 conv (1024 -> 512, no bias) -> BN -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1024, 512, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(512, momentum=0.01)  # the reference's momentum for these six

    def forward(self, rgb: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(torch.cat([rgb, aux], dim=1))))


def mlpd_priors(sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """MLPD's prior boxes for feature maps of ``sizes`` ``[(h, w)]`` (six levels) on an input of ``image_size``.

    Computed in Python floats and rounded to float32 as the reference stores them (then cast to
    ``dtype``), in its order: level, row, column, area, aspect ratio, scale.

    Returns:
        ``(P, 4)`` priors ``(cx, cy, w, h)`` as fractions of the input, ``P = 6 * sum(h * w)``.
    """
    height, width = image_size
    rows = []
    for (fh, fw), side in zip(sizes, ANCHOR_SIDES, strict=True):
        shapes = []
        for ar in ASPECT_RATIOS:
            h = math.sqrt(side * side / ar)
            w = ar * h
            shapes += [(w * s / width, h * s / height) for s in ANCHOR_SCALES]
        for i in range(fh):
            for j in range(fw):
                cx, cy = (j + 0.5) / fw, (i + 0.5) / fh
                rows += [(cx, cy, aw, ah) for aw, ah in shapes]
    return torch.tensor(rows, dtype=torch.float64).float().to(dtype=dtype, device=device)


def cxcy_to_xy(cxcy: torch.Tensor) -> torch.Tensor:
    return torch.cat([cxcy[:, :2] - cxcy[:, 2:] / 2, cxcy[:, :2] + cxcy[:, 2:] / 2], 1)


def xy_to_cxcy(xy: torch.Tensor) -> torch.Tensor:
    return torch.cat([(xy[:, 2:] + xy[:, :2]) / 2, xy[:, 2:] - xy[:, :2]], 1)


def encode(cxcy: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD's box coder: boxes ``(P, 4)`` cxcywh -> offsets w.r.t. ``priors`` ``(P, 4)``."""
    # (prior size / 10) in float32: the reference divides its float32 prior tensor before promoting.
    scaled = (priors[:, 2:].float() / VARIANCES[0]).to(cxcy.dtype)
    return torch.cat([(cxcy[:, :2] - priors[:, :2]) / scaled,
                      torch.log(cxcy[:, 2:] / priors[:, 2:]) * VARIANCES[1]], 1)


def decode(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`: offsets ``(P, 4)`` -> boxes cxcywh."""
    return torch.cat([offsets[:, :2] * priors[:, 2:] / VARIANCES[0] + priors[:, :2],
                      torch.exp(offsets[:, 2:] / VARIANCES[1]) * priors[:, 2:]], 1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU ``(n1, n2)`` of xyxy boxes, the reference's ``find_jaccard_overlap`` arithmetic."""
    lower = torch.max(a[:, None, :2], b[None, :, :2])
    upper = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (upper - lower).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def multilabel_targets(classes: torch.Tensor, codes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per prior the ``(P, 1 + 2K)`` multi-label target: ``classes`` ``(P,)`` in ``[0, K)``, ``codes``
    ``(P,)`` 0 (background), 1 (RGB), 2 (aux), 3 (both), -1 (ignore: all zeros)."""
    target = torch.zeros(classes.shape[0], 1 + 2 * num_classes, dtype=torch.float64, device=classes.device)
    target[:, 0] = (codes == 0).double()
    rows = torch.arange(classes.shape[0], device=classes.device)
    target[rows, 1 + 2 * classes] = ((codes > 0) & (codes & IN_RGB > 0)).double()
    target[rows, 2 + 2 * classes] = ((codes > 0) & (codes & IN_AUX > 0)).double()
    return target


def mlpd_loss(locs: torch.Tensor, logits: torch.Tensor, priors: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
              num_classes: int) -> dict[str, torch.Tensor]:
    """The reference's ``MultiBoxLoss`` (threshold 0.5, 3 negatives per positive, alpha 1) with
    multi-label targets.

    Args:
        locs: ``(B, P, 4)`` predicted offsets. logits: ``(B, P, 1 + 2K)``. priors: ``(P, 4)`` cxcywh fractions.
        targets: per image ``boxes`` ``(N, 4)`` xyxy *fractions* of the input, ``labels`` ``(N,)`` in
            ``[0, K)``, ``codes`` ``(N,)`` visibility 1 / 2 / 3 or -1 for an ignore box.
        num_classes: ``K``.

    Returns:
        ``{"classification": ..., "bbox_regression": ...}``; their sum is the reference's loss.
    """
    batch, n_priors = locs.shape[:2]
    # Corners in float32, as the reference derives them once from its float32 priors: boxes inside
    # several anchors tie in IoU (0.125 for every 40x40 anchor around a 10x20 box), and which prior
    # an ignore box claims then depends on these roundings.
    priors_xy = cxcy_to_xy(priors.float()).to(locs.dtype)
    true_locs = torch.zeros_like(locs)
    codes_all = torch.zeros(batch, n_priors, dtype=torch.long, device=locs.device)
    classes_all = torch.zeros_like(codes_all)
    for i, t in enumerate(targets):
        boxes, n = t["boxes"].to(locs.dtype), t["boxes"].shape[0]
        if n == 0:  # every prior background (the reference always has its zero-size ignore box here)
            continue
        overlap = jaccard(boxes, priors_xy)  # (N, P)
        best_overlap, best_object = overlap.max(dim=0)
        _, best_prior = overlap.max(dim=1)
        # Every box claims its best prior, which counts as a match whatever its IoU.
        best_object[best_prior] = torch.arange(n, device=locs.device)
        best_overlap[best_prior] = 1.0
        codes = t["codes"][best_object].clone()
        codes[best_overlap < MATCH_IOU] = 0
        codes_all[i] = codes
        classes_all[i] = t["labels"][best_object]
        true_locs[i] = encode(xy_to_cxcy(boxes[best_object]), priors)
    positive = codes_all > 0
    if positive.any():
        loc_loss = F.l1_loss(locs[positive], true_locs[positive])
    else:
        loc_loss = locs.sum() * 0  # no positive in the batch: zero, still in the graph
    n_pos = positive.sum(dim=1)
    target = multilabel_targets(classes_all.reshape(-1), codes_all.reshape(-1), num_classes).to(logits.dtype)
    conf_all = F.binary_cross_entropy_with_logits(logits.reshape(-1, logits.shape[-1]), target, reduction="none").sum(dim=1)
    conf_all = conf_all.masked_fill(codes_all.reshape(-1) < 0, 0).reshape(batch, n_priors)
    conf_pos = conf_all[positive]
    # Hard negatives: per image the NEG_POS_RATIO * positives highest losses among the rest.
    conf_neg = conf_all.masked_fill(positive, 0).sort(dim=1, descending=True).values
    ranks = torch.arange(n_priors, device=locs.device).expand_as(conf_neg)
    conf_hard = conf_neg[ranks < NEG_POS_RATIO * n_pos[:, None]]
    conf_loss = (conf_hard.sum() + conf_pos.sum()) / (1e-10 + n_pos.sum().to(logits.dtype))
    return {"classification": conf_loss, "bbox_regression": loc_loss}


class MLPD(FusionModel):
    """MLPD's two-stream SSD on VGG-16-BN; see the module docstring.

    Args:
        num_classes: ``K`` object classes (1: pedestrians, as published).
        modalities: RGB first, then the auxiliary stream (thermal as published).
        in_chans: per-modality channel overrides (thermal 1, as the reference's ``conv1_1_lwir``).
        pretrained: ImageNet VGG-16-BN (torchvision's, timm ``vgg16_bn.tv_in1k``) in conv1_1 ..
            conv5_3 as the reference's ``load_pretrained_layers``: both streams get conv1-4, the
            auxiliary stream's first conv the weights of the *first* RGB input channel; the
            shared conv5 gets conv5.
        score_thresh: ``min_score`` of the post-processing (0.1, the reference's evaluation).
        nms_thresh: NMS IoU (0.425).
        detections_per_img: ``top_k`` (200).

    Training targets (``model(inputs, targets)``): per image ``boxes`` ``(N, 4)`` xyxy pixels and
    ``labels`` ``(N,)``; optional ``ignore`` ``(N,)`` (kept as "don't care" boxes, as the reference
    does, not removed) and ``visibility`` ``(N,)``: 1 person visible in RGB only, 2 in the
    auxiliary image only, 3 in both (the default, every box of an aligned pair).

    Taps, in execution order: ``{rgb}.stage1..4`` then ``{aux}.stage1..4`` (VGG blocks 1-4,
    strides 1, 2, 4, 8; block 4 after its 3x3 pooling), ``fused.stage4`` (the conv4_3 level
    after L2 normalisation and scaling), per stream ``stage5`` (stride 16), per stream
    ``stage6`` then ``fused.stage6``, and so on for stages 7 (stride 32), 8, 9, 10 (stride 64);
    then ``head.stage4, head.stage6 .. head.stage10`` (class logits, ``6 (1 + 2K)`` channels).
    The streams never receive fused features back: only ``fused.*`` and ``head.*`` are after fusion.
    """

    task = "detection"
    size_divisible = 1  # any size: max pooling uses ceil_mode and the anchors follow the maps

    def __init__(
        self,
        *,
        num_classes: int = 1,
        modalities: Sequence[str] = ("rgb", "thermal"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        score_thresh: float = MIN_SCORE,
        nms_thresh: float = NMS_IOU,
        detections_per_img: int = TOP_K,
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        if len(self.modalities) != 2:
            raise ValueError(f"mlpd_vgg16 is defined for exactly 2 modalities (RGB plus one auxiliary stream), got {self.modalities}")
        if not 0 <= score_thresh <= 1 or not 0 < nms_thresh <= 1 or detections_per_img < 1:
            raise ValueError(f"score_thresh must lie in [0, 1], nms_thresh in (0, 1] and detections_per_img >= 1; got "
                             f"{score_thresh}, {nms_thresh}, {detections_per_img}")
        self.score_thresh, self.nms_thresh, self.detections_per_img = float(score_thresh), float(nms_thresh), int(detections_per_img)
        self.outputs_per_anchor = 1 + 2 * num_classes
        self.l2_scale = nn.Parameter(torch.full((1, 512, 1, 1), L2NORM_INIT))
        self.encoders = nn.ModuleDict({m: VGGStream(self.in_chans[m]) for m in self.modalities})
        self.shared = SharedLayers()
        self.fusions = nn.ModuleDict({name: FuseLevel() for name, _, _ in LEVELS})
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.pool4 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True)
        self.loc_head = nn.ModuleDict()
        self.cls_head = nn.ModuleDict()
        for name, _, _ in LEVELS:
            self.loc_head[name] = nn.Conv2d(512, ANCHORS_PER_CELL * 4, kernel_size=3, padding=1)
            self.cls_head[name] = nn.Conv2d(512, ANCHORS_PER_CELL * self.outputs_per_anchor, kernel_size=3, padding=1)
        for conv in [*self.loc_head.values(), *self.cls_head.values()]:  # the reference's init_conv2d
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        if pretrained:
            self.load_imagenet()
        self.head_detections: dict[str, list[Detections]] = {}
        self._prior_cache: dict[tuple, torch.Tensor] = {}  # not a buffer: it depends on the input size
        self._declare_taps()

    # -- taps --------------------------------------------------------------------------------
    def _declare_taps(self) -> None:
        for m in self.modalities:
            for b, widths in enumerate(STREAM_BLOCKS):
                self.taps.declare(f"{m}.stage{b + 1}", widths[-1], 2**b)
        self.taps.declare("fused.stage4", 512, 8, after_fusion=True)
        for stage, stride in SHARED_STAGES:
            for m in self.modalities:
                self.taps.declare(f"{m}.{stage}", 512, stride)
            if stage != "stage5":
                self.taps.declare(f"fused.{stage}", 512, stride, after_fusion=True)
        for _, stage, stride in LEVELS:
            self.taps.declare(f"head.{stage}", ANCHORS_PER_CELL * self.outputs_per_anchor, stride, "logits",
                              after_fusion=True)

    # -- network -----------------------------------------------------------------------------
    def fused_levels(self, xs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The six fused level maps ``(B, 512, h_l, w_l)`` of checked inputs; taps pass in order."""
        streams = {}
        for m in self.modalities:  # RGB blocks 1-4, then the auxiliary stream's, as the reference
            x, enc = xs[m], self.encoders[m]
            for b in range(1, len(STREAM_BLOCKS) + 1):
                for layer in enc.block(b):
                    x = F.relu(layer(x))
                if b < len(STREAM_BLOCKS):
                    x = self.pool(self.taps(f"{m}.stage{b}", x))  # (B, C_b, H / 2^(b-1), W / 2^(b-1)) before pooling
                else:
                    x = self.taps(f"{m}.stage{b}", self.pool4(x))  # stride 8
            streams[m] = x
        rgb, aux = self.modalities
        f = self.fusions["conv4_3"](streams[rgb], streams[aux])
        f = f / f.pow(2).sum(dim=1, keepdim=True).sqrt() * self.l2_scale  # SSD's L2Norm on conv4_3
        fused = [self.taps("fused.stage4", f)]
        for (stage, _), level in zip(SHARED_STAGES, ("", *(name for name, _, _ in LEVELS[1:])), strict=True):
            for m in self.modalities:  # the shared layers on each stream in turn (BatchNorm statistics per call)
                streams[m] = self.taps(f"{m}.{stage}", self.shared.stage(stage, streams[m]))
            if level:
                fused.append(self.taps(f"fused.{stage}", self.fusions[level](streams[rgb], streams[aux])))
        return fused

    def head(self, fused: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Box offsets ``(B, P, 4)`` and class logits ``(B, P, 1 + 2K)`` of the six levels, in the
        anchors' order (level, row, column, anchor); passes ``head.stageK``."""
        locs, logits = [], []
        for f, (name, stage, _) in zip(fused, LEVELS, strict=True):
            b = f.shape[0]
            locs.append(self.loc_head[name](f).permute(0, 2, 3, 1).reshape(b, -1, 4))
            cls = self.taps(f"head.{stage}", self.cls_head[name](f))
            logits.append(cls.permute(0, 2, 3, 1).reshape(b, -1, self.outputs_per_anchor))
        return torch.cat(locs, dim=1), torch.cat(logits, dim=1)

    def priors(self, sizes: Sequence[tuple[int, int]], image_size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """:func:`mlpd_priors` for these level sizes, cached per sizes, dtype and device."""
        key = (tuple(sizes), tuple(image_size), like.dtype, like.device)
        if key not in self._prior_cache:
            self._prior_cache.clear()  # one input size at a time is the common case
            self._prior_cache[key] = mlpd_priors(sizes, image_size, like.dtype, like.device)
        return self._prior_cache[key]

    def raw(self, xs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(locs (B, P, 4), logits (B, P, 1 + 2K), priors (P, 4))`` of checked inputs."""
        fused = self.fused_levels(xs)
        locs, logits = self.head(fused)
        size = tuple(xs[self.modalities[0]].shape[-2:])
        return locs, logits, self.priors([tuple(f.shape[-2:]) for f in fused], size, locs)

    def forward(  # type: ignore[override]
        self,
        inputs: Mapping[str, torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
        missing: Iterable[str] = (),
    ) -> dict[str, torch.Tensor] | list[Detections]:
        """Detect pedestrians, or compute the training loss (torchvision's convention).

        Args:
            inputs: ``{rgb: (B, 3, H, W), aux: (B, C_aux, H, W)}``, normalized (the authors' KAIST
                statistics for their weights; ``pretrained_cfg["normalization"]``).
            targets: training only; see the class docstring.
            missing: modalities absent at inference (zeros: the dataset mean after normalization).

        Returns:
            Training: ``{"classification", "bbox_regression"}`` (sum: the reference's loss). Eval: ``B``
            dicts with ``boxes`` ``(N, 4)`` xyxy input pixels (not clipped, as the reference),
            ``scores`` ``(N,)`` and ``labels`` ``(N,)``, best first.
        """
        missing = self._check_missing(missing)
        xs = self.check_inputs(inputs, missing)
        ref = xs[self.modalities[0]]
        size = (int(ref.shape[-2]), int(ref.shape[-1]))
        checked = self.loss_targets(targets, ref.shape[0], size, ref.device) if self.training else None
        self.head_detections = {}
        locs, logits, priors = self.raw(xs)
        if checked is not None:
            return mlpd_loss(locs, logits, priors, checked, self.num_classes)
        detections = self.postprocess(locs, logits, priors, size)
        self.head_detections = {"fused": detections}
        return detections

    def raw_head_outputs(self, inputs: Mapping[str, torch.Tensor], missing: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The head's outputs before decoding, thresholding and NMS (what an export ends with):
        ``fused.bbox_regression`` ``(B, P, 4)`` and ``fused.cls_logits`` ``(B, P, 1 + 2K)``, anchors
        as :func:`mlpd_priors` orders them; :meth:`postprocess` turns them into the eval output."""
        xs = self.check_inputs(inputs, self._check_missing(missing))
        locs, logits, _ = self.raw(xs)
        return {"fused.bbox_regression": locs, "fused.cls_logits": logits}

    def postprocess(self, locs: torch.Tensor, logits: torch.Tensor, priors: torch.Tensor,
                    image_size: tuple[int, int]) -> list[Detections]:
        """The reference's ``detect_objects``: per class the mean of its RGB and auxiliary sigmoids,
        candidates above ``score_thresh``, greedy NMS at ``nms_thresh`` (torchvision's ``nms``
        keeps the same boxes: same IoU arithmetic, same strict ``>``), the best ``detections_per_img``."""
        height, width = image_size
        scale = locs.new_tensor([width, height, width, height])
        probs = torch.sigmoid(logits)
        out = []
        for i in range(locs.shape[0]):
            boxes = cxcy_to_xy(decode(locs[i], priors))
            scores = probs[i, :, 1:].reshape(-1, self.num_classes, 2).mean(dim=2)  # (P, K)
            prior, label = (scores > self.score_thresh).nonzero(as_tuple=True)
            kept_scores, kept_boxes = scores[prior, label], boxes[prior]
            keep = batched_nms(kept_boxes, kept_scores, label, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": kept_boxes[keep] * scale, "scores": kept_scores[keep], "labels": label[keep]})
        return out

    def loss_targets(self, targets: Sequence[Mapping[str, torch.Tensor]] | None, batch: int, size: tuple[int, int],
                     device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Checked targets as :func:`mlpd_loss` takes them: boxes clipped (``check_targets``) and
        divided by the input size, ignore boxes kept with visibility code -1.

        Raises:
            ValueError: as ``check_targets``, or an ``ignore`` / ``visibility`` of the wrong shape or
                a visibility other than 1, 2, 3 (the message names the image).
        """
        plain = None if targets is None else [
            {k: v for k, v in t.items() if k != "ignore"} if isinstance(t, Mapping) else t for t in targets]
        checked = check_targets(plain, batch, size, self.num_classes, device)
        height, width = size
        scale = torch.tensor([width, height, width, height], dtype=torch.float64, device=device)
        out = []
        for i, (t, c) in enumerate(zip(targets, checked)):  # type: ignore[arg-type]
            n = c["boxes"].shape[0]
            codes = torch.full((n,), BOTH, dtype=torch.long, device=device)
            if "visibility" in t:
                codes = torch.as_tensor(t["visibility"], device=device).reshape(-1).long()
                if codes.shape[0] != n or not ((codes >= 1) & (codes <= BOTH)).all():
                    raise ValueError(f"targets[{i}]['visibility'] = {codes.tolist()}; expected ({n},) values 1 (RGB only), "
                                     f"2 ({self.modalities[1]} only) or 3 (both)")
            if "ignore" in t:
                ignore = torch.as_tensor(t["ignore"], device=device).reshape(-1).bool()
                if ignore.shape[0] != n:
                    raise ValueError(f"targets[{i}]['ignore'] has shape {tuple(ignore.shape)}; expected ({n},), one per box")
                codes = codes.masked_fill(ignore, -1)
            out.append({"boxes": c["boxes"].double() / scale, "labels": c["labels"], "codes": codes})
        return out

    def load_imagenet(self) -> None:
        """ImageNet VGG-16-BN into conv1_1 .. conv5_3, as the reference's ``load_pretrained_layers``.

        Raises:
            PretrainedWeightsError: the weights are not in the huggingface-hub cache and cannot be fetched.
        """
        vgg = pretrained_timm_model("vgg16_bn.tv_in1k")
        convs = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
        norms = [m for m in vgg.features if isinstance(m, nn.BatchNorm2d)]
        per_stream = sum(len(w) for w in STREAM_BLOCKS)  # 10: conv1_1 .. conv4_3
        targets = [[*(getattr(self.encoders[m], f"conv{b + 1}_{i + 1}") for b, w in enumerate(STREAM_BLOCKS)
                      for i in range(len(w)))] for m in self.modalities]
        shared = [getattr(self.shared, f"conv5_{i}") for i in (1, 2, 3)]
        with torch.no_grad():
            for layers in targets:
                for k, layer in enumerate(layers):
                    _copy_conv_bn(layer, convs[k], norms[k], first=k == 0)
            for k, layer in enumerate(shared):
                _copy_conv_bn(layer, convs[per_stream + k], norms[per_stream + k], first=False)


def _copy_conv_bn(layer: ConvBN, conv: nn.Conv2d, norm: nn.BatchNorm2d, first: bool) -> None:
    """Copy a pretrained conv + BN; a 1-channel first conv takes the weights of input channel 0
    (the reference slices ``[:, 0:1]``, where timm would sum and FuseNet averages)."""
    weight = conv.weight
    cin = layer.conv.weight.shape[1]
    if first and cin != weight.shape[1]:
        if cin != 1:
            raise ValueError(f"ImageNet VGG-16 initialises 1- or 3-channel inputs, not {cin}")
        weight = weight[:, 0:1]
    layer.conv.weight.copy_(weight)
    layer.conv.bias.copy_(conv.bias)
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(layer.bn, key).copy_(getattr(norm, key))


# -- registration, released weights, conversion ------------------------------------------------
ACCEPTS = ("num_classes", "modalities", "in_chans", "pretrained", "score_thresh", "nms_thresh", "detections_per_img")

mlpd_vgg16 = published_entry(
    "mlpd_vgg16", MLPD,
    doc=f"MLPD (two VGG-16-BN streams, halfway fusion, SSD multi-label head): 59,712,764 parameters at "
        f"num_classes=1, as the authors' SSD300 (tests/test_parity_mlpd.py); paper: {PAPER}.\n\n"
        "``pretrained=True`` loads ImageNet VGG-16-BN as the authors initialise; ``pretrained=\"kaist\"`` their "
        "released KAIST weights (converted with ``fusionzoo convert``).\n\n" + (MLPD.__doc__ or ""),
    task="detection", fusion="middle", method="mlpd", encoder="vgg16", paper=PAPER,
    modalities=("rgb", "thermal"), max_modalities=2, accepts=ACCEPTS,
    reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
)


def authors_rules(rgb: str, aux: str) -> list[tuple[str, str]]:
    """The reference's ``SSD300`` keys -> ours (a renaming; no value changes). ``_vis`` is the RGB
    stream, ``_lwir`` the auxiliary one; ``feat_1`` .. ``feat_6`` fuse levels conv4_3 .. conv10."""
    rules = [
        (r"base\.rescale_factors", "l2_scale"),
        (r"base\.conv(\d_\d)_vis\.(weight|bias)", rf"encoders.{rgb}.conv\1.conv.\2"),
        (r"base\.conv(\d_\d)_bn_vis\.(.+)", rf"encoders.{rgb}.conv\1.bn.\2"),
        (r"base\.conv(\d_\d)_lwir\.(weight|bias)", rf"encoders.{aux}.conv\1.conv.\2"),
        (r"base\.conv(\d_\d)_bn_lwir\.(.+)", rf"encoders.{aux}.conv\1.bn.\2"),
        (r"base\.conv(\d+_\d)_bn\.(.+)", r"shared.conv\1.bn.\2"),
        (r"base\.conv(5_\d|6_1|7_2)\.(weight|bias)", r"shared.conv\1.conv.\2"),  # those with a BN (ConvBN)
        (r"base\.conv(\d+_\d)\.(weight|bias)", r"shared.conv\1.\2"),
        (r"pred_convs\.loc_(conv\w+)\.(weight|bias)", r"loc_head.\1.\2"),
        (r"pred_convs\.cl_(conv\w+)\.(weight|bias)", r"cls_head.\1.\2"),
    ]
    for k, (name, _, _) in enumerate(LEVELS, 1):
        rules += [(rf"base\.feat_{k}\.weight", f"fusions.{name}.conv.weight"),
                  (rf"base\.feat_{k}_bn\.(.+)", rf"fusions.{name}.bn.\1")]
    return rules


CLASSIFIER_KEY = "pred_convs.cl_conv4_3.weight"


@register_converter("mlpd_vgg16", classifier_key=CLASSIFIER_KEY, with_model=True)
def convert_mlpd(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's ``SSD300.state_dict()`` -> ours, streams named by ``model.modalities``.

    Raises:
        ConversionError: the checkpoint's class count differs from the model's. Its class convs
            hold ``6 (1 + 2K)`` filters, so the count ``fusionzoo convert`` reads from them without
            ``--tag`` / ``--num-classes`` is not ``K``; the message names the flag to pass.
    """
    classifier = state_dict.get(CLASSIFIER_KEY)
    if classifier is not None and classifier.shape[0] != ANCHORS_PER_CELL * model.outputs_per_anchor:
        per_anchor = classifier.shape[0] // ANCHORS_PER_CELL
        raise ConversionError(
            f"{CLASSIFIER_KEY} has {classifier.shape[0]} filters: {per_anchor} outputs per anchor, i.e. 1 + 2K with "
            f"K = {(per_anchor - 1) // 2} classes, but the model was built with num_classes={model.num_classes}; "
            f"pass --num-classes {(per_anchor - 1) // 2} (num_classes=) or --tag kaist for the released weights"
        )
    return rename_keys(state_dict, authors_rules(*model.modalities))


# The reference README's "Pretrained Model" (Google Drive); train.py's checkpoints pickle the whole
# SSD300 object under 'model', which torch.load(weights_only=True) refuses: save its state dict in
# the authors' environment first (docs/published.md). Inputs as their test transform feeds them:
# ToTensor then these KAIST statistics (src/config.py IMAGE_MEAN / LWIR_MEAN).
register_weights(ReleasedWeights(
    name="mlpd_vgg16", tag="kaist", url="https://drive.google.com/file/d/1smXP4xpSDYC8cL_bbT9-E2aywROLlC2v/view",
    filename="best_checkpoint.pth.tar", num_classes=1, modalities=("rgb", "thermal"), class_names=("person",),
    reported="KAIST reasonable test MR-2 7.58 all / 7.95 day / 6.95 night (reference README and paper)",
    normalization={"rgb": {"mean": (0.3465, 0.3219, 0.2842), "std": (0.2358, 0.2265, 0.2274)},
                   "thermal": {"mean": (0.1598,), "std": (0.0813,)}},
))
