"""ICAFusion, the published detector (Shen, Chen, Liu, Zuo, Fan, Yang, "ICAFusion: Iterative
cross-attention guided feature fusion for multispectral object detection", Pattern Recognition
145, 109913, 2024; arXiv 2308.07504).

Two YOLOv5 v6.0 backbones (RGB, thermal; :class:`~.yolov5.TwoStreamYOLOv5` with a 6x6 stem
conv, C3 repeats 3-6-9-3 and SPPF last) run independently; after the stride-8, 16 and 32 stages
a dual-modal feature fusion block (DMFF, paper section 3.2, :class:`DMFF`; the authors'
``TransformerFusionBlock``) reads both and produces the neck's P3, P4, P5:

1. spatial feature squeeze (SFS, section 3.2.2): each stream pooled to a fixed grid (20x20,
   16x16, 10x10 at P3, P4, P5) as ``w1 * avgpool + w2 * maxpool`` with learned scalars;
2. cross-modal feature enhancement (CFE, section 3.2.1, :class:`CrossAttention`): the tokens
   plus a learned position embedding; each stream attends to itself with the *other*
   modality's queries (RGB out = softmax(Q_thermal K_rgb^T / sqrt(d)) V_rgb and vice versa),
   then a GELU MLP per stream, every residual weighted by a learned scalar
   (:class:`CrossTransformerBlock`);
3. iterative enhancement (ICFE, section 3.2.3): the same block applied ``loops`` times with
   shared parameters (the released configs: one block, one loop);
4. the enhanced tokens upsampled back (bilinear in eval, nearest in training, as the authors'
   code switches on ``self.training``), added to their streams, concatenated and reduced by a
   1x1 Conv-BN-SiLU to the stream width: the fused map of that level.

The streams themselves are not modified (``fusion_feeds_streams = False``): each backbone's next
stage reads its own unfused output, as in the authors' configs.

Kept from the authors' code to the tensor: each :class:`CrossTransformerBlock` also holds
``ln_input``, ``ln_output``, ``LN1`` and a third MLP ``mlp`` that its forward never uses (11.0 M
of yolov5l's 120.3 M parameters). They stay so that the released checkpoints convert one-to-one
and the parameter count equals theirs, frozen (``requires_grad=False``): they never receive a
gradient in the authors' training either, so an optimizer never moves them.

Parity: ``tests/test_parity_icafusion.py`` against the authors' ``models/yolo_test.py``
``Model`` (float64; fixtures from ``tools/parity/icafusion.py``), loss included (their
``ComputeLoss`` writes objectness targets in IoU order: ``YOLOv5LossConfig(sort_obj_iou=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..._registry import ReleasedWeights, register_weights
from ...models.convert import published_entry, register_converter, rename_keys
from .cft import authors_layer_paths
from .yolov5 import NECK_STAGES, STRIDES, YOLOV5_SIZES, Conv, TwoStreamYOLOv5, YOLOv5LossConfig

__all__ = [
    "DMFF",
    "FUSION_GRIDS",
    "CrossAttention",
    "CrossTransformerBlock",
    "ICAFusion",
    "LearnableCoefficient",
    "LearnableWeights",
    "icafusion_yolov5l",
    "icafusion_yolov5m",
    "icafusion_yolov5n",
    "icafusion_yolov5s",
    "squeeze_pool",
]

REFERENCE_REPO = "https://github.com/chanchanchan97/ICAFusion"
REFERENCE_COMMIT = "e0bd288c477959796e213235e083993727b545c9"
PAPER = ("Shen, Chen, Liu, Zuo, Fan, Yang, 'ICAFusion: Iterative cross-attention guided feature fusion for "
         "multispectral object detection', Pattern Recognition 145, 109913, 2024")
# The pooled token grid of the fusion blocks at P3, P4, P5 (models/transformer/yolov5*_Transfusion_*.yaml).
FUSION_GRIDS: tuple[tuple[int, int], ...] = ((20, 20), (16, 16), (10, 10))
V6_REPEATS = (3, 6, 9, 3)  # yolov5*.yaml v6.0 backbone C3 repeats at depth 1
# (depth_multiple, width_multiple) of the authors' yolov5{n,s,m,l}_Transfusion configs.
SIZES = {"n": (0.33, 0.25), **{k: YOLOV5_SIZES[k] for k in ("s", "m", "l")}}
AUTHORS_LOSS = YOLOv5LossConfig(sort_obj_iou=True)  # their utils/loss.py ComputeLoss (hyp.scratch.yaml gains)


def squeeze_pool(x: torch.Tensor, grid: tuple[int, int], kind: str) -> torch.Tensor:
    """The authors' ``AdaptivePool2d``: ``(B, C, H, W) -> (B, C, gh, gw)`` with stride
    ``H // gh`` and kernel ``H - (gh - 1) * stride`` (per axis), windows overlapping where the
    division leaves a remainder; a map already of the grid's size passes unchanged."""
    h, w = x.shape[-2:]
    gh, gw = grid
    if h == gh and w == gw:
        return x
    sh, sw = h // gh, w // gw
    kernel, stride = (h - (gh - 1) * sh, w - (gw - 1) * sw), (sh, sw)
    return F.avg_pool2d(x, kernel, stride) if kind == "avg" else F.max_pool2d(x, kernel, stride)


class LearnableCoefficient(nn.Module):
    """A learned scalar weight of a residual branch (``bias``, initialised 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.bias


class LearnableWeights(nn.Module):
    """``w1 * x1 + w2 * x2`` with learned scalars (0.5 each): SFS's average / max pooling mix."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor([0.5]))
        self.w2 = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 * self.w1 + x2 * self.w2


class CrossAttention(nn.Module):
    """Dual cross-attention (CFE, section 3.2.1): per modality LayerNorm, query / key / value
    projections; RGB's output attends over RGB's keys and values with the thermal queries, the
    thermal output over thermal keys and values with the RGB queries; ``h`` heads of width
    ``d_model / h``; dropout on the attention maps and the outputs.

    ``(rgb, thermal)`` tokens ``(B, N, d_model)`` -> the two outputs ``(B, N, d_model)``.
    Keys as the authors' (``que_proj_vis``, ``key_proj_ir``, ..., ``LN1`` for RGB, ``LN2`` for thermal).
    """

    def __init__(self, d_model: int, h: int = 8, attn_pdrop: float = 0.1, resid_pdrop: float = 0.1) -> None:
        super().__init__()
        if d_model % h:
            raise ValueError(f"CrossAttention: d_model {d_model} is not divisible by {h} heads")
        self.h, self.d_k = h, d_model // h
        for name in ("que_proj_vis", "key_proj_vis", "val_proj_vis", "que_proj_ir", "key_proj_ir", "val_proj_ir",
                     "out_proj_vis", "out_proj_ir"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.attn_drop = nn.Dropout(attn_pdrop)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.LN1 = nn.LayerNorm(d_model)
        self.LN2 = nn.LayerNorm(d_model)
        for m in self.modules():  # CrossAttention.init_weights
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.001)
                nn.init.zeros_(m.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.d_k).permute(0, 2, 1, 3)  # (B, h, N, d_k)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: nn.Linear) -> torch.Tensor:
        att = self.attn_drop(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k), -1))
        b, _, n, _ = q.shape
        return self.resid_drop(out(torch.matmul(att, v).permute(0, 2, 1, 3).reshape(b, n, self.h * self.d_k)))

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, ir = self.LN1(rgb), self.LN2(ir)
        q_vis, k_vis, v_vis = (self._heads(p(rgb)) for p in (self.que_proj_vis, self.key_proj_vis, self.val_proj_vis))
        q_ir, k_ir, v_ir = (self._heads(p(ir)) for p in (self.que_proj_ir, self.key_proj_ir, self.val_proj_ir))
        return self._attend(q_ir, k_vis, v_vis, self.out_proj_vis), self._attend(q_vis, k_ir, v_ir, self.out_proj_ir)


def _mlp(d_model: int, block_exp: int, resid_pdrop: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, block_exp * d_model), nn.GELU(), nn.Linear(block_exp * d_model, d_model),
                         nn.Dropout(resid_pdrop))


class CrossTransformerBlock(nn.Module):
    """One CFE transformer block applied ``loops`` times with shared weights (ICFE, section 3.2.3).

    Per loop, with ``c1..c8`` learned scalars (:class:`LearnableCoefficient`)::

        o_rgb, o_ir = cross_attention(rgb, ir)
        r = c1 * rgb + c2 * o_rgb;   t = c3 * ir + c4 * o_ir
        rgb = c5 * r + c6 * mlp_vis(LN2(r));   ir = c7 * t + c8 * mlp_ir(LN2(t))

    (``LN2`` serves both streams, as in the authors' code.) ``ln_input``, ``ln_output``, ``LN1``
    and ``mlp`` are the authors' unused tensors, kept frozen (module docstring).
    """

    def __init__(self, d_model: int, h: int = 8, block_exp: int = 4, attn_pdrop: float = 0.1, resid_pdrop: float = 0.1,
                 loops: int = 1) -> None:
        super().__init__()
        if loops < 1:
            raise ValueError(f"CrossTransformerBlock: loops must be >= 1, got {loops}")
        self.loops = loops
        self.ln_input = nn.LayerNorm(d_model)
        self.ln_output = nn.LayerNorm(d_model)
        self.crossatt = CrossAttention(d_model, h, attn_pdrop, resid_pdrop)
        self.mlp_vis = _mlp(d_model, block_exp, resid_pdrop)
        self.mlp_ir = _mlp(d_model, block_exp, resid_pdrop)
        self.mlp = _mlp(d_model, block_exp, resid_pdrop)
        self.LN1 = nn.LayerNorm(d_model)
        self.LN2 = nn.LayerNorm(d_model)
        for i in range(1, 9):
            setattr(self, f"coefficient{i}", LearnableCoefficient())
        for unused in (self.ln_input, self.ln_output, self.LN1, self.mlp):
            unused.requires_grad_(False)

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = [None] + [getattr(self, f"coefficient{i}") for i in range(1, 9)]
        for _ in range(self.loops):
            o_rgb, o_ir = self.crossatt(rgb, ir)
            r = c[1](rgb) + c[2](o_rgb)
            t = c[3](ir) + c[4](o_ir)
            rgb = c[5](r) + c[6](self.mlp_vis(self.LN2(r)))
            ir = c[7](t) + c[8](self.mlp_ir(self.LN2(t)))
        return rgb, ir


class DMFF(nn.Module):
    """Dual-modal feature fusion of one level (the authors' ``TransformerFusionBlock``).

    ``block(rgb, ir)`` ``(B, C, H, W)`` each -> the enhanced streams ``stream + up(CFE(stream))``
    (taps ``{m}.{stage}.fused``); :meth:`merge` concatenates them and applies ``conv1x1_out``
    (Conv-BN-SiLU to ``C``): the level's fused map.

    Args:
        d_model: channels ``C``.
        grid: the pooled token grid ``(gh, gw)``; the feature map must be at least that large.
        stride: the level's stride (named in the error for too small an input).
        h, block_exp: heads (8) and MLP expansion (4).
        n_layer: :class:`CrossTransformerBlock` s in sequence (1); loops: iterations of each (1).
        attn_pdrop, resid_pdrop: dropout (0.1).
    """

    def __init__(self, d_model: int, grid: tuple[int, int], stride: int, h: int = 8, block_exp: int = 4, n_layer: int = 1,
                 loops: int = 1, attn_pdrop: float = 0.1, resid_pdrop: float = 0.1) -> None:
        super().__init__()
        self.grid, self.stride = (int(grid[0]), int(grid[1])), stride
        n = self.grid[0] * self.grid[1]
        self.pos_emb_vis = nn.Parameter(torch.zeros(1, n, d_model))
        self.pos_emb_ir = nn.Parameter(torch.zeros(1, n, d_model))
        self.vis_coefficient = LearnableWeights()
        self.ir_coefficient = LearnableWeights()
        self.crosstransformer = nn.ModuleList(
            CrossTransformerBlock(d_model, h, block_exp, attn_pdrop, resid_pdrop, loops) for _ in range(n_layer))
        self.conv1x1_out = Conv(2 * d_model, d_model, 1, 1, 0)

    def _tokens(self, x: torch.Tensor, mix: LearnableWeights, pos: torch.Tensor) -> torch.Tensor:
        pooled = mix(squeeze_pool(x, self.grid, "avg"), squeeze_pool(x, self.grid, "max"))  # SFS
        return pooled.flatten(2).transpose(1, 2) + pos  # (B, gh * gw, C)

    def _back(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        b, c, h, w = like.shape
        x = tokens.view(b, self.grid[0], self.grid[1], c).permute(0, 3, 1, 2)
        mode = "nearest" if self.training else "bilinear"  # the authors switch on self.training
        return F.interpolate(x, size=(h, w), mode=mode) + like

    def forward(self, rgb: torch.Tensor, ir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = rgb.shape[-2:]
        if h < self.grid[0] or w < self.grid[1]:
            raise ValueError(
                f"ICAFusion's fusion block at stride {self.stride} pools to {self.grid[0]}x{self.grid[1]} tokens and needs "
                f"a feature map at least that large, i.e. inputs of at least {self.grid[0] * self.stride}x"
                f"{self.grid[1] * self.stride} pixels (got a {h}x{w} map); resize the input, or build with smaller "
                "fusion_grids (a network other than the authors')")
        t_rgb = self._tokens(rgb, self.vis_coefficient, self.pos_emb_vis)
        t_ir = self._tokens(ir, self.ir_coefficient, self.pos_emb_ir)
        for block in self.crosstransformer:
            t_rgb, t_ir = block(t_rgb, t_ir)
        return self._back(t_rgb, rgb), self._back(t_ir, ir)

    def merge(self, rgb: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
        """The enhanced streams -> the level's fused map ``(B, C, H, W)``."""
        return self.conv1x1_out(torch.cat((rgb, ir), 1))


class ICAFusion(TwoStreamYOLOv5):
    """Two-stream YOLOv5 v6.0 with a DMFF block per level producing P3, P4, P5.

    Args: as :class:`~.yolov5.TwoStreamYOLOv5` (``replicate_x`` among them; the backbone fixed to v6.0, fusion at
    ``stage2..4``), plus:
        fusion_grids: pooled token grid per level (the authors' 20x20, 16x16, 10x10, so inputs
            must be at least 320x320).
        heads, block_exp, n_layer, loops, attn_pdrop, resid_pdrop: :class:`DMFF`'s.
        loss: default ``YOLOv5LossConfig(sort_obj_iou=True)``, the authors' ``ComputeLoss``.

    Taps: ``{m}.stage1..4`` (each backbone's own stages, never mixed), ``{m}.stage{2,3,4}.fused``
    (a stream plus its upsampled cross-attention enhancement), ``fused.stage2..4`` (the DMFF
    outputs P3-P5), ``fpn.p3..p5``, ``head.p3..p5`` (raw head outputs, kind ``logits``).
    """

    fusion_feeds_streams = False

    def __init__(self, *, fusion_grids: Sequence[Sequence[int]] = FUSION_GRIDS, heads: int = 8, block_exp: int = 4,
                 n_layer: int = 1, loops: int = 1, attn_pdrop: float = 0.1, resid_pdrop: float = 0.1,
                 loss: YOLOv5LossConfig = AUTHORS_LOSS, **kwargs: Any) -> None:
        if len(fusion_grids) != len(NECK_STAGES) or any(len(g) != 2 or min(g) < 1 for g in fusion_grids):
            raise ValueError(f"fusion_grids: one (rows, columns) per level P3, P4, P5, each >= 1; got {fusion_grids}")
        self.fusion_grids = tuple((int(g[0]), int(g[1])) for g in fusion_grids)
        self.dmff_kwargs = {"h": heads, "block_exp": block_exp, "n_layer": n_layer, "loops": loops,
                            "attn_pdrop": attn_pdrop, "resid_pdrop": resid_pdrop}
        super().__init__(fusion_stages=NECK_STAGES, stem="conv", spp="sppf", repeats=V6_REPEATS, spp_last=True,
                         loss=loss, **kwargs)

    @property
    def min_input_size(self) -> tuple[int, int]:
        """The smallest input ``(H, W)`` the fusion grids accept (the authors': 320 x 320)."""
        return (max(g[0] * s for g, s in zip(self.fusion_grids, STRIDES)),
                max(g[1] * s for g, s in zip(self.fusion_grids, STRIDES)))

    def build_fusion(self, stage: str, channels: int) -> nn.Module:
        level = NECK_STAGES.index(stage)
        return DMFF(channels, self.fusion_grids[level], STRIDES[level], **self.dmff_kwargs)

    def merge(self, stage: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fusions[stage].merge(a, b)

    def initialize_weights(self) -> None:
        """The authors' initialisation: torch defaults, the blocks' own; no Detect bias prior
        (``models/yolo_test.py`` comments ``_initialize_biases`` out)."""


# -- entries, weights, converter ------------------------------------------------------------------
DEFAULT_CLASSES = 3  # nc of their default config, yolov5*_Transfusion_FLIR.yaml (KAIST, LLVIP: 1)


def _build(size: str, pretrained: bool = False, num_classes: int = DEFAULT_CLASSES, **kwargs: Any) -> ICAFusion:
    depth, width = SIZES[size]
    return ICAFusion(num_classes=num_classes, depth_multiple=depth, width_multiple=width, **kwargs)


ACCEPTS = ("num_classes", "modalities", "in_chans", "anchors", "conf_thres", "iou_thres", "multi_label", "max_det",
           "loss", "replicate_x", "fusion_grids", "heads", "block_exp", "n_layer", "loops", "attn_pdrop", "resid_pdrop", "pretrained")


def _entry(size: str) -> Any:
    name = f"icafusion_yolov5{size}"
    depth, width = SIZES[size]
    return published_entry(
        name, partial(_build, size),
        doc=(f"ICAFusion on YOLOv5{size} (depth {depth}, width {width}), the authors' network "
             f"(models/transformer/yolov5{size}_Transfusion_{{FLIR,kaist}}.yaml); paper: {PAPER}.\n\n{ICAFusion.__doc__}"),
        task="detection", fusion="middle", method="icafusion", encoder=f"yolov5{size}", paper=PAPER,
        modalities=("rgb", "thermal"), max_modalities=2, accepts=ACCEPTS,
        reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
    )


icafusion_yolov5n = _entry("n")
icafusion_yolov5s = _entry("s")
icafusion_yolov5m = _entry("m")
icafusion_yolov5l = _entry("l")

_UNIT = {"rgb": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}, "thermal": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}}
register_weights(ReleasedWeights(
    name="icafusion_yolov5l", tag="flir_aligned", url="https://pan.baidu.com/s/1fEFOEyzVIxNCMjJjuujJUQ?pwd=a81f",
    filename="best.pt", num_classes=3, modalities=("rgb", "thermal"),
    reported="mAP50 82.8 (FLIR-aligned, person 84.9 / car 89.8 / bicycle 73.8; README 'Results update'; the paper: 79.2)",
    class_names=("person", "car", "bicycle"), normalization=_UNIT,
))
register_weights(ReleasedWeights(
    name="icafusion_yolov5l", tag="kaist", url="https://pan.baidu.com/s/18UXctOSgjp6EUcJXIGbWTQ?pwd=9eku",
    filename="best.pt", num_classes=1, modalities=("rgb", "thermal"),
    reported="KAIST MR-2 in the paper's KAIST table (not transcribed here; the README gives no KAIST number)",
    class_names=("person",), normalization=_UNIT,
))


def authors_paths(modalities: Sequence[str]) -> list[str | None]:
    """Our module path of each layer index of the authors' ``model.{i}``: both backbones (layers
    0-9 and 10-19), the three DMFF blocks (20-22), the head rows and Detect. It is CFT's layout
    without fusion stages, whose three ``Add`` rows (20-22) are ICAFusion's fusion blocks."""
    paths = authors_layer_paths(modalities, ())
    first = paths.index(None)
    paths[first:first + len(NECK_STAGES)] = [f"fusions.{s}" for s in NECK_STAGES]
    return paths


@register_converter("icafusion_yolov5n", "icafusion_yolov5s", "icafusion_yolov5m", "icafusion_yolov5l",
                    classifier_key="nc", with_model=True)
def convert_icafusion(state_dict: Mapping[str, torch.Tensor], model: ICAFusion) -> dict[str, torch.Tensor]:
    """The authors' ``model.{i}.{rest}`` (``ckpt['model'].state_dict()``) -> ours by :func:`authors_paths`;
    the fusion blocks' keys keep the authors' names (``crosstransformer.0.crossatt.que_proj_vis``...).
    Released checkpoints are half precision: tensors are cast to the model's dtype on loading."""
    paths = authors_paths(model.modalities)
    rules = [(rf"model\.{i}\.(.+)", f"{p}.\\1") for i, p in enumerate(paths) if p is not None]
    return rename_keys(state_dict, rules, where="the ICAFusion checkpoint")
