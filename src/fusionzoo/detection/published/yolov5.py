"""Two-stream YOLOv5 (Ultralytics YOLOv5 v5.0, 2021), the detector that the published RGB-T
methods built on it share: CFT (:mod:`.cft`) and ICAFusion plug their fusion block between two
YOLOv5 backbones; everything else here is YOLOv5 as the authors' repositories vendor it.

Parts, named as YOLOv5's ``models/common.py`` and ``models/yolo.py``:

- :class:`Conv` (conv, BatchNorm with YOLOv5's ``eps=1e-3``, ``momentum=0.03``, SiLU),
  :class:`Bottleneck`, :class:`C3`, :class:`SPP`, :class:`SPPF`, :class:`Focus`;
- :class:`YOLOv5Stream`: one modality's backbone (Focus stem, stages of stride 4/8/16/32);
- :class:`YOLOv5PAN`: the PANet neck of ``yolov5*.yaml`` (top-down then bottom-up over P3-P5);
- :class:`Detect`: the 1x1 output convs, the anchors (``anchors`` in grid units,
  ``anchor_grid`` in pixels) and YOLOv5's box decoding ``xy = (2 sigmoid - 0.5 + grid) * stride``,
  ``wh = (2 sigmoid)^2 * anchor``;
- :func:`non_max_suppression`: ``utils/general.py``'s (per-class offsets of ``max_wh``, multi
  label, ``max_det`` 300, ``max_nms`` 30000);
- :class:`YOLOv5Loss`: ``utils/loss.py`` ``ComputeLoss`` with :func:`build_targets` (anchor
  matching by width/height ratio below ``anchor_t``, two neighbouring cells as extra positives),
  CIoU box loss, objectness with IoU targets, BCE classes, per-level objectness balance;
- :class:`TwoStreamYOLOv5`: the two backbones, a fusion block per fused stage (supplied by the
  method through :meth:`TwoStreamYOLOv5.build_fusion`), the streams merged by addition before the
  neck (the configs' ``Add`` layers), the neck and the head, under fusionzoo's detection call
  convention (:class:`~fusionzoo.detection.models.DetectorMixin`) with taps.

Input convention of the authors' scripts: images scaled to ``[0, 1]`` (``img / 255``), no mean
or standard deviation; the thermal image is read as three channels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.image_list import ImageList

from ...models.base import FusionModel
from ..boxes import Detections
from ..models import DetectorMixin

__all__ = [
    "ANCHORS",
    "C3",
    "SPP",
    "SPPF",
    "STRIDES",
    "YOLOV5_SIZES",
    "Bottleneck",
    "Conv",
    "Detect",
    "Focus",
    "TwoStreamYOLOv5",
    "YOLOv5Loss",
    "YOLOv5LossConfig",
    "YOLOv5PAN",
    "YOLOv5Stream",
    "autopad",
    "bbox_iou",
    "build_targets",
    "make_divisible",
    "non_max_suppression",
    "scale_depth",
    "scale_width",
    "targets_to_yolo",
    "xywh2xyxy",
]

# yolov5*.yaml: three anchors per level in pixels, P3/8, P4/16, P5/32 (autoanchor off).
ANCHORS: tuple[tuple[float, ...], ...] = (
    (10, 13, 16, 30, 33, 23),
    (30, 61, 62, 45, 59, 119),
    (116, 90, 156, 198, 373, 326),
)
STRIDES: tuple[int, ...] = (8, 16, 32)
# (depth_multiple, width_multiple) of yolov5{s,m,l,x}.yaml.
YOLOV5_SIZES: dict[str, tuple[float, float]] = {"s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.00, 1.00), "x": (1.33, 1.25)}
BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # utils/torch_utils.py initialize_weights sets these on every BatchNorm2d
STAGES = ("stage1", "stage2", "stage3", "stage4")  # strides 4, 8, 16, 32
NECK_STAGES = ("stage2", "stage3", "stage4")  # P3, P4, P5 feed the neck
LEVELS = ("p3", "p4", "p5")


# -- building blocks (models/common.py) ----------------------------------------------------------
def autopad(k: int, p: int | None = None) -> int:
    """'Same' padding of an odd kernel ``k`` (``k // 2``) unless ``p`` is given."""
    return k // 2 if p is None else p


def make_divisible(x: float, divisor: int = 8) -> int:
    """The smallest multiple of ``divisor`` that is at least ``x`` (``utils/general.py``)."""
    return math.ceil(x / divisor) * divisor


def scale_width(channels: int, width_multiple: float) -> int:
    """A config's channel count at a width multiple (``parse_model``: ``make_divisible(c * gw, 8)``)."""
    return make_divisible(channels * width_multiple, 8)


def scale_depth(n: int, depth_multiple: float) -> int:
    """A config's repeat count at a depth multiple (``parse_model``: ``max(round(n * gd), 1)`` for ``n > 1``)."""
    return max(round(n * depth_multiple), 1) if n > 1 else n


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU; keys ``conv``, ``bn``."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 Conv to ``c2 * e`` -> 3x3 Conv to ``c2``, plus the input when ``shortcut`` and ``c1 == c2``."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convolutions: ``cv3(cat(m(cv1(x)), cv2(x)))``, ``n`` bottlenecks in ``m``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*[Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP): max pools of kernels ``k`` (stride 1) beside the input."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13)) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP (YOLOv5 v6.0): three chained 5x5 max pools, the same output as SPP(5, 9, 13)."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Focus(nn.Module):
    """Space-to-depth (four pixel phases stacked on channels: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``), then Conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


# -- backbone and neck (yolov5*.yaml) -------------------------------------------------------------
class YOLOv5Stream(nn.Module):
    """One modality's YOLOv5 v5.0 backbone: ``stem`` (Focus 64, k3; stride 2), then ``stage1``
    (Conv 128 s2, C3 x3; stride 4), ``stage2`` (Conv 256 s2, C3 x9; stride 8), ``stage3``
    (Conv 512 s2, C3 x9; stride 16), ``stage4`` (Conv 1024 s2, SPP(5, 9, 13), C3 x3 without
    shortcut; stride 32), channels and repeats at the width / depth multiple.

    Args:
        in_chans: input channels.
        depth_multiple, width_multiple: the config's (``YOLOV5_SIZES``).
        stem: ``"focus"`` (v5.0) or ``"conv"`` (v6.0: Conv 6x6 stride 2, padding 2).
        spp: ``"spp"`` (v5.0) or ``"sppf"`` (v6.0).
        repeats: C3 repeats of ``stage1..4`` at depth 1 (v5.0: 3, 9, 9, 3; v6.0: 3, 6, 9, 3).
        spp_last: v6.0's ``stage4`` (Conv s2, C3 with shortcut, then the SPP) instead of v5.0's
            (Conv s2, SPP, C3 without shortcut).

    Attributes:
        channels: output channels of ``stage1..4``; ``reductions``: their strides.
    """

    def __init__(self, in_chans: int, depth_multiple: float = 1.0, width_multiple: float = 1.0, *,
                 stem: str = "focus", spp: str = "spp", repeats: Sequence[int] = (3, 9, 9, 3),
                 spp_last: bool = False) -> None:
        super().__init__()
        if stem not in ("focus", "conv") or spp not in ("spp", "sppf"):
            raise ValueError(f"stem must be 'focus' or 'conv', spp 'spp' or 'sppf'; got stem={stem!r}, spp={spp!r}")
        w = [scale_width(c, width_multiple) for c in (64, 128, 256, 512, 1024)]
        if len(repeats) != 4:
            raise ValueError(f"repeats gives the C3 repeats of stage1..4: four numbers, got {tuple(repeats)}")
        n = [scale_depth(r, depth_multiple) for r in repeats]
        self.stem = Focus(in_chans, w[0], 3) if stem == "focus" else Conv(in_chans, w[0], 6, 2, 2)
        self.stage1 = nn.Sequential(Conv(w[0], w[1], 3, 2), C3(w[1], w[1], n[0]))
        self.stage2 = nn.Sequential(Conv(w[1], w[2], 3, 2), C3(w[2], w[2], n[1]))
        self.stage3 = nn.Sequential(Conv(w[2], w[3], 3, 2), C3(w[3], w[3], n[2]))
        pool = SPP(w[4], w[4], (5, 9, 13)) if spp == "spp" else SPPF(w[4], w[4], 5)
        if spp_last:
            self.stage4 = nn.Sequential(Conv(w[3], w[4], 3, 2), C3(w[4], w[4], n[3]), pool)
        else:
            self.stage4 = nn.Sequential(Conv(w[3], w[4], 3, 2), pool, C3(w[4], w[4], n[3], shortcut=False))
        self.channels = tuple(w[1:])
        self.reductions = (4, 8, 16, 32)


class YOLOv5PAN(nn.Module):
    """YOLOv5's head graph before Detect (``yolov5*.yaml`` ``head`` rows 10-23), on P3, P4, P5.

    Top-down: ``reduce_p5`` (Conv 1x1 to c4) -> 2x nearest upsampling -> cat P4 -> ``c3_p4``;
    ``reduce_p4`` (Conv 1x1 to c3) -> upsampling -> cat P3 -> ``c3_p3`` (out P3). Bottom-up:
    ``down_p3`` (Conv 3x3 s2) -> cat ``reduce_p4`` -> ``c3_n4`` (out P4); ``down_p4`` -> cat
    ``reduce_p5`` -> ``c3_n5`` (out P5). C3 blocks without shortcut, 3 repeats at depth 1.

    Args:
        channels: channels of P3, P4, P5 (the backbone's ``stage2..4``).
        depth_multiple, width_multiple: the config's.
    """

    def __init__(self, channels: Sequence[int], depth_multiple: float = 1.0, width_multiple: float = 1.0) -> None:
        super().__init__()
        c3, c4, c5 = channels
        w3, w4, w5 = (scale_width(c, width_multiple) for c in (256, 512, 1024))
        n = scale_depth(3, depth_multiple)
        self.reduce_p5 = Conv(c5, w4, 1, 1)
        self.c3_p4 = C3(w4 + c4, w4, n, shortcut=False)
        self.reduce_p4 = Conv(w4, w3, 1, 1)
        self.c3_p3 = C3(w3 + c3, w3, n, shortcut=False)
        self.down_p3 = Conv(w3, w3, 3, 2)
        self.c3_n4 = C3(w3 + w3, w4, n, shortcut=False)
        self.down_p4 = Conv(w4, w4, 3, 2)
        self.c3_n5 = C3(w4 + w4, w5, n, shortcut=False)
        self.out_channels = (w3, w4, w5)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, c_l, H/s, W/s)`` per level -> the three outputs ``(B, out_channels[l], H/s, W/s)``."""
        r5 = self.reduce_p5(p5)
        x = self.c3_p4(torch.cat((F.interpolate(r5, scale_factor=2.0, mode="nearest"), p4), 1))
        r4 = self.reduce_p4(x)
        n3 = self.c3_p3(torch.cat((F.interpolate(r4, scale_factor=2.0, mode="nearest"), p3), 1))
        n4 = self.c3_n4(torch.cat((self.down_p3(n3), r4), 1))
        n5 = self.c3_n5(torch.cat((self.down_p4(n4), r5), 1))
        return n3, n4, n5


# -- head and decoding (models/yolo.py Detect) ------------------------------------------------
class Detect(nn.Module):
    """YOLOv5's output layer: per level a 1x1 conv to ``na * (5 + K)`` channels.

    Buffers as the authors' state dict has them: ``anchors`` ``(nl, na, 2)`` in grid cells
    (pixels / stride, after ``Model.__init__`` divides), ``anchor_grid`` ``(nl, 1, na, 1, 1, 2)``
    in pixels.

    Args:
        num_classes: ``K``.
        in_channels: channels of the three neck outputs.
        anchors: per level ``(w0, h0, w1, h1, ...)`` in pixels.
        strides: of the levels.
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int], anchors: Sequence[Sequence[float]] = ANCHORS,
                 strides: Sequence[int] = STRIDES) -> None:
        super().__init__()
        self.nc, self.no = num_classes, num_classes + 5
        self.nl, self.na = len(anchors), len(anchors[0]) // 2
        if len(in_channels) != self.nl or len(strides) != self.nl:
            raise ValueError(f"Detect: {self.nl} anchor levels but {len(in_channels)} inputs and {len(strides)} strides")
        a = torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2)
        stride = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("anchors", a / stride.view(-1, 1, 1))
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.strides = tuple(int(s) for s in strides)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in in_channels)

    def initialize_biases(self) -> None:
        """``Model._initialize_biases``: objectness prior of 8 objects per 640x640 image,
        class prior 0.6 / (K - 0.99) (Lin et al., RetinaNet, section 3.3)."""
        with torch.no_grad():
            for conv, s in zip(self.m, self.strides):
                b = conv.bias.view(self.na, -1)
                b[:, 4] += math.log(8 / (640 / s) ** 2)
                b[:, 5:] += math.log(0.6 / (self.nc - 0.99))

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Neck outputs -> raw predictions per level ``(B, na, H_l, W_l, 5 + K)`` (the training output)."""
        out = []
        for conv, x in zip(self.m, xs):
            y = conv(x)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw predictions -> ``(B, N, 5 + K)``: box centre, width, height in input pixels,
        objectness and class probabilities (sigmoids); ``N`` in the order level, anchor, row,
        column (the authors' inference output)."""
        z = []
        for i, p in enumerate(raw):
            b, _, h, w, _ = p.shape
            yv, xv = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device), indexing="ij")
            grid = torch.stack((xv, yv), 2).view(1, 1, h, w, 2).to(p.dtype)
            y = p.sigmoid()
            xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * self.strides[i]
            wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i].to(p.dtype)
            z.append(torch.cat((xy, wh, y[..., 4:]), -1).view(b, -1, self.no))
        return torch.cat(z, 1)


def xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` centre, width, height -> corners."""
    half = x[..., 2:4] / 2
    return torch.cat((x[..., 0:2] - half, x[..., 0:2] + half), -1)


def non_max_suppression(prediction: torch.Tensor, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        multi_label: bool = False, agnostic: bool = False, max_det: int = 300,
                        max_nms: int = 30000, max_wh: float = 4096.0) -> list[torch.Tensor]:
    """YOLOv5's NMS (``utils/general.py non_max_suppression``) on :meth:`Detect.decode`'s output.

    Candidates need objectness above ``conf_thres``; the score is objectness x class probability,
    kept above ``conf_thres`` for every class (``multi_label``, as the test script runs it) or
    the best class; per-class NMS via box offsets of ``max_wh``; the ``max_det`` best survive.
    Written without the in-place edits of the original, so scores keep their gradient.

    Returns:
        Per image ``(n, 6)``: ``x1, y1, x2, y2, score, class``.
    """
    nc = prediction.shape[2] - 5
    multi_label = multi_label and nc > 1
    output = []
    for x in prediction:
        x = x[x[:, 4] > conf_thres]
        if not x.shape[0]:
            output.append(x.new_zeros((0, 6)))
            continue
        cls_conf = x[:, 5:] * x[:, 4:5]
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (cls_conf > conf_thres).nonzero(as_tuple=False).T
            det = torch.cat((box[i], cls_conf[i, j, None], j[:, None].to(x.dtype)), 1)
        else:
            conf, j = cls_conf.max(1, keepdim=True)
            det = torch.cat((box, conf, j.to(x.dtype)), 1)[conf.view(-1) > conf_thres]
        if not det.shape[0]:
            output.append(det)
            continue
        if det.shape[0] > max_nms:
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        offsets = det[:, 5:6] * (0 if agnostic else max_wh)
        keep = torchvision.ops.nms(det[:, :4] + offsets, det[:, 4], iou_thres)[:max_det]
        output.append(det[keep])
    return output


# -- loss (utils/loss.py ComputeLoss) -------------------------------------------------------------
def bbox_iou(box1: torch.Tensor, box2: torch.Tensor, ciou: bool = True, eps: float = 1e-7) -> torch.Tensor:
    """IoU (CIoU with ``ciou``; Zheng et al., AAAI 2020) of matched boxes ``(n, 4)`` centre-width-height."""
    b1_x1, b1_x2 = box1[:, 0] - box1[:, 2] / 2, box1[:, 0] + box1[:, 2] / 2
    b1_y1, b1_y2 = box1[:, 1] - box1[:, 3] / 2, box1[:, 1] + box1[:, 3] / 2
    b2_x1, b2_x2 = box2[:, 0] - box2[:, 2] / 2, box2[:, 0] + box2[:, 2] / 2
    b2_y1, b2_y2 = box2[:, 1] - box2[:, 3] / 2, box2[:, 1] + box2[:, 3] / 2
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * \
            (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not ciou:
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
    v = (4 / math.pi ** 2) * torch.pow(torch.atan(w2 / h2) - torch.atan(w1 / h1), 2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


@dataclass(frozen=True)
class YOLOv5LossConfig:
    """``data/hyp.scratch.yaml``'s loss gains, before ``train.py`` scales them (:meth:`scaled`).

    Attributes:
        box, cls, obj: gains; cls_pw, obj_pw: BCE positive weights; anchor_t: anchor-matching
        ratio; fl_gamma: focal loss gamma (0: plain BCE); label_smoothing; gr: IoU weight of
        the objectness target (``model.gr = 1.0``); img_size: the training image size that
        scales ``obj`` (``train.py --img-size``, 640); sort_obj_iou: write the objectness targets
        in increasing IoU, so a cell matched twice keeps its best IoU (later YOLOv5's
        ``ComputeLoss.sort_obj_iou``; ICAFusion sets it) instead of the last match's.
    """

    box: float = 0.05
    cls: float = 0.5
    obj: float = 1.0
    cls_pw: float = 1.0
    obj_pw: float = 1.0
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0
    gr: float = 1.0
    img_size: int = 640
    sort_obj_iou: bool = False

    def scaled(self, nl: int, nc: int) -> YOLOv5LossConfig:
        """``train.py``'s scaling: box by ``3 / nl``, cls by ``nc / 80 * 3 / nl``, obj by
        ``(img_size / 640)^2 * 3 / nl``."""
        return replace(self, box=self.box * 3 / nl, cls=self.cls * nc / 80 * 3 / nl,
                       obj=self.obj * (self.img_size / 640) ** 2 * 3 / nl)


def targets_to_yolo(targets: Sequence[Mapping[str, torch.Tensor]], size: tuple[int, int],
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-image ``boxes`` (xyxy pixels) and ``labels`` -> YOLOv5's target rows ``(n, 6)``:
    image index, class, centre x, centre y, width, height, normalized by ``size = (H, W)``
    (computed in ``dtype``, default the boxes')."""
    h, w = size
    rows = []
    for i, t in enumerate(targets):
        b = t["boxes"] if dtype is None else t["boxes"].to(dtype)
        scale = b.new_tensor([w, h, w, h])
        xywh = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1) / scale
        rows.append(torch.cat((torch.full_like(b[:, :1], i), t["labels"].to(b.dtype)[:, None], xywh), 1))
    return torch.cat(rows, 0) if rows else torch.zeros(0, 6, dtype=dtype)


def build_targets(raw: Sequence[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor, anchor_t: float
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
    """YOLOv5's target assignment (``ComputeLoss.build_targets``).

    A target matches an anchor of a level when ``max(r, 1/r) < anchor_t`` for its width and height
    ratios; each match is a positive in its own cell and in the two neighbouring cells whose
    border the centre is nearest to (offset 0.5).

    Args:
        raw: :meth:`Detect.forward`'s outputs ``(B, na, H_l, W_l, 5 + K)``.
        targets: :func:`targets_to_yolo` rows ``(n, 6)``.
        anchors: :attr:`Detect.anchors` ``(nl, na, 2)`` in grid cells.

    Returns:
        Per level: classes ``(m,)``, boxes ``(m, 4)`` (centre offset in its cell, width, height
        in cells), indices ``(image, anchor, row, column)``, anchors ``(m, 2)``.
    """
    na, nt = anchors.shape[1], targets.shape[0]
    tcls, tbox, indices, anch = [], [], [], []
    gain = torch.ones(7, device=targets.device, dtype=targets.dtype)
    ai = torch.arange(na, device=targets.device, dtype=targets.dtype).view(na, 1).repeat(1, nt)
    targets = torch.cat((targets.repeat(na, 1, 1), ai[:, :, None]), 2)  # (na, nt, 7)
    g = 0.5
    off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=targets.device, dtype=targets.dtype) * g
    for i in range(len(raw)):
        anchors_i = anchors[i].to(targets.dtype)
        gain[2:6] = torch.tensor(raw[i].shape, dtype=targets.dtype)[[3, 2, 3, 2]]
        t = targets * gain
        if nt:
            r = t[:, :, 4:6] / anchors_i[:, None]
            j = torch.max(r, 1.0 / r).max(2)[0] < anchor_t
            t = t[j]
            gxy = t[:, 2:4]
            gxi = gain[[2, 3]] - gxy
            j, k = ((gxy % 1.0 < g) & (gxy > 1.0)).T
            l, m = ((gxi % 1.0 < g) & (gxi > 1.0)).T
            j = torch.stack((torch.ones_like(j), j, k, l, m))
            t = t.repeat((5, 1, 1))[j]
            offsets = (torch.zeros_like(gxy)[None] + off[:, None])[j]
        else:
            t = targets[0]
            offsets = 0
        b, c = t[:, :2].long().T
        gxy = t[:, 2:4]
        gwh = t[:, 4:6]
        gij = (gxy - offsets).long()
        gi, gj = gij.T
        a = t[:, 6].long()
        indices.append((b, a, gj.clamp_(0, int(gain[3]) - 1), gi.clamp_(0, int(gain[2]) - 1)))
        tbox.append(torch.cat((gxy - gij, gwh), 1))
        anch.append(anchors_i[a])
        tcls.append(c)
    return tcls, tbox, indices, anch


class YOLOv5Loss:
    """YOLOv5's training loss (``utils/loss.py ComputeLoss``, ``autobalance`` off).

    ``loss(raw, targets)`` returns ``{"box", "obj", "cls"}`` each multiplied by the batch size,
    so their sum is the authors' ``loss * bs`` that ``train.py`` backpropagates.

    Args:
        num_classes: ``K`` (no class loss for ``K = 1``, as the original).
        anchors: :attr:`Detect.anchors` (grid cells).
        config: the unscaled gains (:class:`YOLOv5LossConfig`; scaled here by :meth:`~YOLOv5LossConfig.scaled`).
    """

    def __init__(self, num_classes: int, anchors: torch.Tensor, config: YOLOv5LossConfig = YOLOv5LossConfig()) -> None:
        self.nc, self.nl = num_classes, anchors.shape[0]
        self.anchors = anchors
        self.hyp = config.scaled(self.nl, num_classes)
        self.balance = {3: [4.0, 1.0, 0.4]}.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02])
        self.cp, self.cn = 1.0 - 0.5 * config.label_smoothing, 0.5 * config.label_smoothing

    def _bce(self, logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor([pos_weight]),
                                                  reduction="none")
        gamma = self.hyp.fl_gamma
        if gamma > 0:  # FocalLoss wrapper of utils/loss.py (alpha 0.25)
            p = torch.sigmoid(logits)
            p_t = target * p + (1 - target) * (1 - p)
            alpha = target * 0.25 + (1 - target) * 0.75
            loss = loss * alpha * (1.0 - p_t) ** gamma
        return loss.mean()

    def __call__(self, raw: Sequence[torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw predictions (:meth:`Detect.forward`) and :func:`targets_to_yolo` rows -> the loss dict."""
        ref = raw[0]
        lcls, lbox, lobj = ref.new_zeros(()), ref.new_zeros(()), ref.new_zeros(())
        tcls, tbox, indices, anchors = build_targets(raw, targets.to(ref.dtype), self.anchors.to(ref.device),
                                                     self.hyp.anchor_t)
        for i, pi in enumerate(raw):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros_like(pi[..., 0])
            n = b.shape[0]
            if n:
                ps = pi[b, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2.0 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[i]
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], ciou=True)
                lbox = lbox + (1.0 - iou).mean()
                score_iou = iou.detach().clamp(0).to(tobj.dtype)
                if self.hyp.sort_obj_iou:
                    order = torch.argsort(score_iou)
                    b, a, gj, gi, score_iou = b[order], a[order], gj[order], gi[order], score_iou[order]
                # index_put_ with accumulate=False: a cell matched twice keeps the last write, as the original
                tobj = tobj.index_put((b, a, gj, gi), (1.0 - self.hyp.gr) + self.hyp.gr * score_iou)
                if self.nc > 1:
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[range(n), tcls[i]] = self.cp
                    lcls = lcls + self._bce(ps[:, 5:], t, self.hyp.cls_pw)
            lobj = lobj + self._bce(pi[..., 4], tobj, self.hyp.obj_pw) * self.balance[i]
        bs = raw[0].shape[0]
        return {"box": lbox * self.hyp.box * bs, "obj": lobj * self.hyp.obj * bs, "cls": lcls * self.hyp.cls * bs}


# -- the two-stream detector -------------------------------------------------------------------
class TwoStreamYOLOv5(DetectorMixin, FusionModel):
    """Two YOLOv5 backbones with a fusion block after chosen stages, merged by addition at P3-P5,
    YOLOv5's neck and head: the detector of CFT's and ICAFusion's configs.

    Data flow (stream ``a`` is the first modality, ``b`` the second)::

        a, b = stem_a(x_a), stem_b(x_b)
        for stage in stage1..stage4:
            a, b = stage_a(a), stage_b(b)                     # taps {m}.{stage}
            if stage in fusion_stages: a, b = fuse(stage, a, b)  # the method's block; taps {m}.{stage}.fused
            if stage in stage2..4: P = merge(stage, a, b)       # a + b (the configs' Add); tap fused.{stage}
        n3, n4, n5 = neck(P3, P4, P5)                          # taps fpn.p3..p5
        raw = head(n3, n4, n5)                                 # taps head.p3..p5 (logits)

    A method subclasses this and implements :meth:`build_fusion` (one module per fused stage,
    called as ``block(a, b) -> (a', b')``); it may override :meth:`fuse` or :meth:`merge` for
    another wiring. With the class attribute ``fusion_feeds_streams = False`` (ICAFusion) the
    fused pair goes only to :meth:`merge`: each backbone's next stage takes its own unfused output.

    Args:
        num_classes: ``K``.
        modalities: two streams, RGB first (the authors' first stream is RGB).
        in_chans: per-modality channels (default 3 for both: the authors read thermal images as
            three channels).
        depth_multiple, width_multiple: the config's (``YOLOV5_SIZES``).
        fusion_stages: the stages followed by a fusion block.
        anchors: per level, pixels.
        conf_thres, iou_thres, multi_label, max_det: NMS at eval (the test script's: 0.001, 0.5,
            multi-label, 300).
        loss: the loss gains (:class:`YOLOv5LossConfig`).
        stem, spp, repeats, spp_last: backbone variant (:class:`YOLOv5Stream`).
        replicate_x: the second stream's input has one channel, repeated to the three its stem
            takes (the authors read the thermal image as three equal channels, ``cv2.imread``), so
            fusionzoo's 1-channel thermal loaders feed the authors' network and its released weights.

    Eval output: boxes clipped to the input, ``scores`` objectness x class probability,
    ``labels``. Training: ``{"box", "obj", "cls"}``, each times the batch size, as the authors'.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        modalities: Sequence[str] = ("rgb", "thermal"),
        in_chans: Mapping[str, int] | None = None,
        depth_multiple: float = 1.0,
        width_multiple: float = 1.0,
        fusion_stages: Sequence[str] = NECK_STAGES,
        anchors: Sequence[Sequence[float]] = ANCHORS,
        conf_thres: float = 0.001,
        iou_thres: float = 0.5,
        multi_label: bool = True,
        max_det: int = 300,
        loss: YOLOv5LossConfig = YOLOv5LossConfig(),
        stem: str = "focus",
        spp: str = "spp",
        repeats: Sequence[int] = (3, 9, 9, 3),
        spp_last: bool = False,
        replicate_x: bool = False,
    ) -> None:
        modalities = tuple(modalities)
        if len(modalities) != 2:
            raise ValueError(f"{type(self).__name__} has exactly two streams (RGB plus one), got modalities={modalities}")
        if replicate_x and in_chans:
            raise ValueError("pass replicate_x=True (a 1-channel second stream repeated to 3) or in_chans, not both")
        chans = {m: 3 for m in modalities}
        chans.update(dict(in_chans or {}))
        super().__init__(modalities, num_classes, chans)
        unknown = [s for s in fusion_stages if s not in STAGES]
        if unknown:
            raise ValueError(f"fusion_stages {tuple(fusion_stages)} names {unknown[0]!r}; choose from {STAGES}")
        if not 0.0 <= conf_thres < 1.0 or not 0.0 < iou_thres <= 1.0 or max_det < 1:
            raise ValueError(f"need 0 <= conf_thres < 1, 0 < iou_thres <= 1, max_det >= 1; got {conf_thres}, {iou_thres}, {max_det}")
        self.fusion_stages = tuple(s for s in STAGES if s in fusion_stages)
        self.conf_thres, self.iou_thres, self.multi_label, self.max_det = conf_thres, iou_thres, multi_label, max_det
        self.detections_per_img = max_det
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            self.encoders[m] = YOLOv5Stream(self.in_chans[m], depth_multiple, width_multiple, stem=stem, spp=spp,
                                          repeats=repeats, spp_last=spp_last)
        stream = self.encoders[self.modalities[0]]
        self.stage_channels = stream.channels
        self.fusions = nn.ModuleDict()
        mixed = False
        for stage, c, r in zip(STAGES, stream.channels, stream.reductions):
            for m in self.modalities:
                self.taps.declare(f"{m}.{stage}", c, r, after_fusion=mixed)
            if stage in self.fusion_stages:
                self.fusions[stage] = self.build_fusion(stage, c)
                mixed = mixed or self.fusion_feeds_streams
                for m in self.modalities:
                    self.taps.declare(f"{m}.{stage}.fused", c, r, after_fusion=True)
            if stage in NECK_STAGES:
                self.taps.declare(f"fused.{stage}", c, r, after_fusion=True)
        self.neck = YOLOv5PAN(stream.channels[1:], depth_multiple, width_multiple)
        for level, c, s in zip(LEVELS, self.neck.out_channels, STRIDES):
            self.taps.declare(f"fpn.{level}", c, s, after_fusion=True)
        self.head = Detect(num_classes, self.neck.out_channels, anchors, STRIDES)
        for level, s in zip(LEVELS, STRIDES):
            self.taps.declare(f"head.{level}", self.head.na * self.head.no, s, "logits", after_fusion=True)
        self.loss_config = loss
        self.replicate_x = replicate_x
        if replicate_x:  # the input check asks for one channel; the stem, built above, takes three
            self.in_chans = {**self.in_chans, self.modalities[1]: 1}
        self.initialize_weights()

    fusion_feeds_streams = True  # the fused pair replaces the streams (CFT's Add2); False: it only feeds merge

    # -- the method's part ---------------------------------------------------------------------
    def build_fusion(self, stage: str, channels: int) -> nn.Module:
        """The fusion block after ``stage`` (``channels`` per stream): ``block(a, b) -> (a', b')``."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_fusion(stage, channels)")

    def fuse(self, stage: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The streams after ``stage``'s fusion block."""
        return self.fusions[stage](a, b)

    def merge(self, stage: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The neck's input at ``stage``: the sum of the streams (the configs' ``Add``)."""
        return a + b

    def initialize_weights(self) -> None:
        """The authors' initialisation: torch defaults, YOLOv5's BatchNorm settings (set in
        :class:`Conv`) and Detect's bias priors; fusion blocks initialise themselves."""
        self.head.initialize_biases()

    # -- forward ----------------------------------------------------------------------------
    def forward_features(self, xs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Checked, padded inputs -> the merged P3, P4, P5 ``(B, C_l, H/s, W/s)`` (passing the stream taps)."""
        ma, mb = self.modalities
        ea, eb = self.encoders[ma], self.encoders[mb]
        xb = xs[mb].expand(-1, 3, -1, -1) if self.replicate_x else xs[mb]  # (B, 1, H, W) -> (B, 3, H, W)
        a, b = ea.stem(xs[ma]), eb.stem(xb)
        merged = []
        for stage in STAGES:
            a = self.taps(f"{ma}.{stage}", getattr(ea, stage)(a))
            b = self.taps(f"{mb}.{stage}", getattr(eb, stage)(b))
            fa, fb = a, b
            if stage in self.fusion_stages:
                fa, fb = self.fuse(stage, a, b)
                fa, fb = self.taps(f"{ma}.{stage}.fused", fa), self.taps(f"{mb}.{stage}.fused", fb)
                if self.fusion_feeds_streams:
                    a, b = fa, fb
            if stage in NECK_STAGES:
                merged.append(self.taps(f"fused.{stage}", self.merge(stage, fa, fb)))
        return merged

    def raw_predictions(self, xs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Checked, padded inputs -> :meth:`Detect.forward`'s per-level raw predictions."""
        necked = self.neck(*self.forward_features(xs))
        feats = [self.taps(f"fpn.{level}", n) for level, n in zip(LEVELS, necked)]
        raw = self.head(feats)
        for level, r in zip(LEVELS, raw):  # (B, na, H, W, no) -> (B, na * no, H, W): the conv's own layout
            b, na, h, w, no = r.shape
            self.taps(f"head.{level}", r.permute(0, 1, 4, 2, 3).reshape(b, na * no, h, w))
        return raw

    def detect_boxes(self, raw: Sequence[torch.Tensor], size: tuple[int, int]) -> list[Detections]:
        """Decoded, NMS-ed detections in input pixels, clipped to ``size = (H, W)``."""
        h, w = size
        out = []
        for det in non_max_suppression(self.head.decode(raw), self.conf_thres, self.iou_thres,
                                       multi_label=self.multi_label, max_det=self.max_det):
            x = det[:, [0, 2]].clamp(0, w)
            y = det[:, [1, 3]].clamp(0, h)
            boxes = torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), 1)
            out.append({"boxes": boxes, "scores": det[:, 4], "labels": det[:, 5].long()})
        return out

    def detect(self, xs: dict[str, torch.Tensor], images: ImageList, targets: list[Detections] | None,  # type: ignore[override]
               missing: tuple[str, ...]) -> dict[str, torch.Tensor] | list[Detections]:
        raw = self.raw_predictions(xs)
        if self.training:
            padded = tuple(xs[self.modalities[0]].shape[-2:])
            rows = targets_to_yolo(targets or [], padded, raw[0].dtype).to(raw[0].device)
            return YOLOv5Loss(self.num_classes, self.head.anchors, self.loss_config)(raw, rows)
        out = self.detect_boxes(raw, images.image_sizes[0])
        self.keep_head_detections(["fused"], [out])
        return out

    def raw_head_outputs(self, inputs: Mapping[str, torch.Tensor], missing: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The head's raw outputs before decoding and NMS: ``fused.p3``, ``fused.p4``,
        ``fused.p5`` ``(B, na, H_l, W_l, 5 + K)`` on the padded input; :meth:`Detect.decode` and
        :func:`non_max_suppression` turn them into the eval output."""
        missing = self._check_missing(missing)
        xs, _ = self.prepare(inputs, missing)
        return {f"fused.{level}": r for level, r in zip(LEVELS, self.raw_predictions(xs))}

    def box_heads(self, xs: dict[str, torch.Tensor]) -> Iterator[Any]:
        raise NotImplementedError("TwoStreamYOLOv5 has one YOLOv5 head; see raw_predictions")
