"""GeminiFusion on MiT, as published: ``geminifusion_mit_b0`` .. ``geminifusion_mit_b5``.

Jia, Guo, Han, Wu, Zhang, Xu, Chen, "GeminiFusion: Efficient Pixel-wise Multimodal Fusion for
Vision Transformer", ICML 2024 (Sec. 3; NYUDv2 / SUN RGB-D tables). The reference is the authors'
repository (:data:`REFERENCE_REPO` at :data:`REFERENCE_COMMIT`), which builds on TokenFusion's
MiT code; its state dict maps onto these models tensor for tensor (:func:`convert_geminifusion`),
and ``tests/test_parity_geminifusion.py`` checks the outputs against numbers computed by their code.

The network differs from CMX's dual MiT (``cmx_mit_*``), so nothing of that backbone is reused
but the MLP decoder:

- **one** MiT (SegFormer's, Table 6: widths, heads 1, 2, 5, 8, spatial reduction 8, 4, 2, 1,
  MLP ratio 4) runs both modalities with *shared* weights (patch embeddings, attention, MLPs);
  only the LayerNorms are per modality (every block's two, the spatial-reduction norm, the patch
  embeddings' and the stage outputs' norms, all with eps 1e-6);
- inside every block's attention, after the self-attention and before the output projection,
  GeminiFusion's pixel-wise cross-modal attention (Sec. 3.2): for modality ``i`` with query
  token ``x_i`` and the other modality's token ``x_j`` at the same pixel, a relation judger
  ``r = softmax(MLP([x_i, x_j]))`` (over channels), keys ``[x_i + n^k_i, x_i * r]`` and values
  ``[x_i + n^v_i, x_j]`` (learned layer-adaptive noise ``n``, one embedding row per modality),
  ``nn.MultiheadAttention`` with 8 heads over these two keys, and a residual ``x_i + attn``.
  The reference loops over the batch and calls ``nn.MultiheadAttention`` with the pixels as its
  batch; :class:`GeminiCrossAttention` computes the same two-key softmax directly, for the whole
  batch at once;
- stochastic depth linear over all blocks (0.4 for B0-B4, the reference's default ``--dpr``;
  0.35 for B5, as its README trains it);
- SegFormer's MLP decoder with embedding 256, a bias-free fuse conv and BatchNorm eps 1e-5
  (mmcv's ``ConvModule``), **shared** by the modalities: run once per modality (so BatchNorm
  takes each modality's batch statistics separately, as theirs), giving per-modality logits;
- the ensemble ``sum_m softmax(alpha)_m * logits_m.detach()`` (learned ``alpha``, one per
  modality). The reference returns ``[logits_rgb, logits_depth, ensemble]``, trains with the sum
  of the three cross-entropies, and reports the ensemble (``validate`` returns its mIoU).

**Output.** ``model(inputs)`` returns the ensemble, upsampled bilinearly to the input size (the
reference upsamples the same way for its loss; its evaluation resizes with cv2's bicubic). The
per-modality logits are the taps ``rgb.head`` / ``depth.head`` (stride 4) and, in training
mode, ``model.side_logits`` (rgb, depth): the reference's loss is cross-entropy on the output
plus cross-entropy on each side logit, upsampled to the label size, and fusionzoo's trainer adds
the same (its default ``side_loss_weights``). Because the ensemble detaches its inputs, a loss on the output
alone would train only ``alpha``.

**Inputs.** Both streams enter the shared 3-channel patch embedding. The authors' depth is the
gray image tiled to 3 identical channels and divided by 255 (no mean/std), so a 1-channel depth
(fusionzoo's default) is repeated to 3 channels in the model, exactly. ``in_chans={"depth": 3}``
takes a 3-channel X (e.g. HHA) instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.pvt_v2 import MlpWithDepthwiseConv
from torch import nn

from ..._registry import ReleasedWeights, register_weights
from ...fusion._common import use_channels_last_depthwise
from ...heads.segformer import SegFormerDecoder
from ..base import FusionModel
from ..convert import StateDict, published_entry, register_converter
from .cmx import IMAGENET_MEAN, IMAGENET_STD, MIT_DEPTHS, NYUV2_CLASSES, load_mit_file, rename_shifted

REFERENCE_REPO = "https://github.com/JiaDingCN/GeminiFusion"
REFERENCE_COMMIT = "1f102f6451ec7cd4546278ef2022f639f979c60b"
PAPER = (
    "Jia, Guo, Han, Wu, Zhang, Xu, Chen, 'GeminiFusion: Efficient Pixel-wise Multimodal Fusion for "
    "Vision Transformer', ICML 2024"
)

MIT_WIDTHS = {"b0": (32, 64, 160, 256)}  # B1..B5: (64, 128, 320, 512)
MIT_HEADS = (1, 2, 5, 8)
MIT_SR_RATIOS = (8, 4, 2, 1)
MIT_MLP_RATIO = 4
NORM_EPS = 1e-6  # the reference's LayerNormParallel
CROSS_HEADS = 8  # the reference's --n_heads
DECODER_EMBED_DIM = 256  # WeTr.embedding_dim
DROP_PATH_RATES = {"b0": 0.4, "b1": 0.4, "b2": 0.4, "b3": 0.4, "b4": 0.4, "b5": 0.35}  # --dpr (README)


def mit_widths(variant: str) -> tuple[int, int, int, int]:
    """Stage widths of MiT-``variant``."""
    return MIT_WIDTHS.get(variant, (64, 128, 320, 512))


class ModalityNorm(nn.ModuleDict):
    """One LayerNorm per modality over a modality-stacked batch ``(M * B, N, C)`` (modality
    ``k`` in rows ``k * B .. (k + 1) * B``); its keys are the modality names."""

    def __init__(self, modalities: Sequence[str], dim: int, eps: float = NORM_EPS) -> None:
        super().__init__({m: nn.LayerNorm(dim, eps=eps) for m in modalities})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([norm(part) for norm, part in zip(self.values(), x.chunk(len(self)))])


class GeminiCrossAttention(nn.Module):
    """GeminiFusion's pixel-wise cross-modal attention for two modalities (Sec. 3.2).

    Per modality ``i`` (query) and the other ``j``, at every pixel: two keys and two values,
    ``k = [x_i + n^k_i, x_i * r_i]``, ``v = [x_i + n^v_i, x_j]``, ``r_i = softmax(judge([x_i,
    x_j]))``; ``nn.MultiheadAttention`` (``cross[i]``) weights the two per head, and the result
    is added to ``x_i``. Parameters are the reference's (``cross_attn_0_to_1`` is
    ``cross[modality 0]``; ``relation_judger.0`` is ``judge``; ``k_noise`` / ``v_noise`` rows
    are the modalities).

    Args:
        modalities: the two stream names, in the model's order.
        dim: channels ``C``.
        heads: heads of the cross attention (8).
    """

    def __init__(self, modalities: Sequence[str], dim: int, heads: int = CROSS_HEADS) -> None:
        super().__init__()
        if len(modalities) != 2:
            raise ValueError(f"GeminiFusion fuses exactly 2 modalities, got {tuple(modalities)}")
        self.heads = heads
        self.cross = nn.ModuleDict({m: nn.MultiheadAttention(dim, heads, dropout=0.0) for m in modalities})
        self.judge = Mlp(2 * dim, dim, dim)  # the reference's Mlp_2: fc1, GELU, fc2
        self.k_noise = nn.Embedding(2, dim)
        self.v_noise = nn.Embedding(2, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(2B, N, C)`` (modality-stacked self-attention output, before the projection)
        -> (the same plus cross attention, the weight each pixel's query gives the other
        modality's value, averaged over heads, ``(B, 2, N)``)."""
        x0, x1 = x.chunk(2)
        b, n, c = x0.shape
        d = c // self.heads
        # The judger sees [query, other] for both directions in one call: (2B, N, 2C).
        relation = torch.softmax(self.judge(torch.cat([x, torch.cat([x1, x0])], dim=-1)), dim=-1)
        outs, gates = [], []
        for i, (query, other, attn) in enumerate(zip((x0, x1), (x1, x0), self.cross.values())):
            w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
            b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
            r = relation[i * b : (i + 1) * b]
            q = F.linear(query, w_q, b_q).view(b, n, self.heads, d) * d**-0.5
            keys = (F.linear(query + self.k_noise.weight[i], w_k, b_k), F.linear(query * r, w_k, b_k))
            values = (F.linear(query + self.v_noise.weight[i], w_v, b_v), F.linear(other, w_v, b_v))
            scores = torch.stack([(q * k.view(b, n, self.heads, d)).sum(-1) for k in keys], dim=-1)  # (B, N, h, 2)
            weights = scores.softmax(dim=-1)
            mixed = (weights[..., :1] * values[0].view(b, n, self.heads, d)
                     + weights[..., 1:] * values[1].view(b, n, self.heads, d)).reshape(b, n, c)
            outs.append(query + attn.out_proj(mixed))
            gates.append(weights[..., 1].mean(-1))
        return torch.cat(outs), torch.stack(gates, dim=1)


class GeminiAttention(nn.Module):
    """MiT's efficient self-attention (spatial reduction ``sr_ratio``) with weights shared by the
    modalities and a per-modality reduction norm, followed by :class:`GeminiCrossAttention`
    before the output projection. ``fused_attn``: scaled_dot_product_attention (accelerators)
    instead of the explicit softmax (CPU; see ``cmx_mit_*``)."""

    def __init__(self, modalities: Sequence[str], dim: int, heads: int, sr_ratio: int, cross_heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = ModalityNorm(modalities, dim)
        self.gemini = GeminiCrossAttention(modalities, dim, cross_heads)
        self.proj = nn.Linear(dim, dim)
        self.fused_attn = False
        self.gate: torch.Tensor | None = None  # set by forward when keep_gate (the stage's gate tap)
        self.keep_gate = False

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        bm, n, c = x.shape  # bm = modalities x batch
        q = self.q(x).view(bm, n, self.heads, -1).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(bm, c, *size)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(bm, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1) @ v
        out, gate = self.gemini(out.transpose(1, 2).reshape(bm, n, c))
        if self.keep_gate:
            self.gate = gate
        return self.proj(out)


class GeminiBlock(nn.Module):
    """A MiT block over the modality-stacked batch: shared attention and MLP, per-modality norms."""

    def __init__(self, modalities: Sequence[str], dim: int, heads: int, sr_ratio: int, cross_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = ModalityNorm(modalities, dim)
        self.attn = GeminiAttention(modalities, dim, heads, sr_ratio, cross_heads)
        self.norm2 = ModalityNorm(modalities, dim)
        self.mlp = MlpWithDepthwiseConv(dim, dim * MIT_MLP_RATIO)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class GeminiStage(nn.Module):
    """Overlapping patch embedding (shared conv, per-modality norm), blocks, per-modality norm."""

    def __init__(self, modalities: Sequence[str], in_dim: int, dim: int, first: bool, heads: int, sr_ratio: int,
                 cross_heads: int, depth: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        k, s = (7, 4) if first else (3, 2)
        self.proj = nn.Conv2d(in_dim, dim, kernel_size=k, stride=s, padding=k // 2)
        self.proj_norm = ModalityNorm(modalities, dim)
        self.blocks = nn.ModuleList(
            GeminiBlock(modalities, dim, heads, sr_ratio, cross_heads, p) for p in drop_paths[:depth]
        )
        self.norm = ModalityNorm(modalities, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(M * B, C_in, H, W)`` -> ``(M * B, C, H / s, W / s)``."""
        x = self.proj(x)
        size = (x.shape[-2], x.shape[-1])
        x = self.proj_norm(x.flatten(2).transpose(1, 2))
        for block in self.blocks:
            x = block(x, size)
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, *size)


class GeminiFusionMiT(FusionModel):
    """GeminiFusion on a shared MiT backbone with the shared MLP decoder and the ensemble, the
    authors' network (module docstring).

    Args:
        variant: ``"b0"`` .. ``"b5"``.
        num_classes: ``K`` (40 for NYUDv2, 37 for SUN RGB-D).
        modalities: RGB first, then the X modality (``("rgb", "depth")``).
        in_chans: per-stream input channels: 3, or 1 (repeated to 3; depth's default).
        pretrained: ``False`` only (the entry points also take a released tag).
        decoder_channels: MLP-decoder embedding (256).
        dropout: dropout before the classifier (0.1).
        drop_path_rate: stochastic depth (:data:`DROP_PATH_RATES`; 0 for exact train-mode comparisons).
        cross_heads: heads of the cross-modal attention (8, the reference's ``--n_heads``).
        mit_weights: path of SegFormer's ImageNet MiT file (``mit_b3.pth``), loaded as the
            reference's ``WeTr`` does (:func:`load_mit_imagenet`).

    Taps: ``fused.stage1..4.gate`` (per query modality, the head-averaged weight its pixels give
    the other modality's value in the stage's last block; 2 channels), ``{m}.stage1..4`` (each
    stage's normalized output), ``{m}.head`` (per-modality logits), ``head.logits`` (the
    ensemble). ``model.side_logits``: the per-modality logits in training mode, else ``()``;
    its reference default ``side_loss_weights = (1.0, 1.0)`` makes fusionzoo's trainer add their
    cross-entropy (upsampled to the labels, ``side_logits_resize``), as the reference's loss.
    """

    # Deep supervision as the reference's loss (fusionzoo.losses.segmentation_loss via the
    # segmentation task): CE on both per-modality logits, weight 1 each, upsampled to the label.
    side_strides = (4, 4)
    side_logits_resize = "bilinear-half-pixel"
    side_loss_weights = (1.0, 1.0)  # the reference default, used when the config's side_loss_weights is null

    def __init__(
        self,
        variant: str,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        decoder_channels: int = DECODER_EMBED_DIM,
        dropout: float = 0.1,
        drop_path_rate: float | None = None,
        cross_heads: int = CROSS_HEADS,
        mit_weights: str | None = None,
    ) -> None:
        if variant not in MIT_DEPTHS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_DEPTHS)}")
        if pretrained is not False:
            raise ValueError(
                "geminifusion_mit_*: pretrained=True has no timm weights to load (timm's pvt_v2 is not the shared "
                "MiT); pass a released tag (pretrained='nyuv2' or 'sunrgbd' for mit_b3 / mit_b5)"
            )
        modalities = tuple(modalities)
        if modalities[:1] != ("rgb",) or len(modalities) != 2:
            raise ValueError(f"geminifusion_mit_{variant} is defined for exactly 2 modalities, RGB then one X, e.g. ('rgb', 'depth'); got {modalities}")
        super().__init__(modalities, num_classes, in_chans)
        bad = {m: c for m, c in self.in_chans.items() if c not in (1, 3)}
        if bad:
            raise ValueError(f"geminifusion_mit_{variant}: the shared patch embedding takes 3 channels (or 1, repeated); got in_chans {bad}")
        self.variant = variant
        self.drop_path_rate = DROP_PATH_RATES[variant] if drop_path_rate is None else drop_path_rate
        depths, widths = MIT_DEPTHS[variant], mit_widths(variant)
        dpr = torch.linspace(0, self.drop_path_rate, sum(depths), device="cpu").tolist()  # cpu: also under meta
        self.stages = nn.ModuleList()
        cur = 0
        for k, (depth, width) in enumerate(zip(depths, widths)):
            self.stages.append(GeminiStage(
                modalities, 3 if k == 0 else widths[k - 1], width, k == 0, MIT_HEADS[k], MIT_SR_RATIOS[k],
                cross_heads, depth, dpr[cur : cur + depth],
            ))
            self.stages[k].blocks[-1].attn.keep_gate = True
            cur += depth
            # Every stage's blocks cross-attend between the modalities (from stage 1 on): all after fusion.
            self.taps.declare(f"fused.stage{k + 1}.gate", 2, 4 * 2**k, "gate", after_fusion=True)
            for m in modalities:
                self.taps.declare(f"{m}.stage{k + 1}", width, 4 * 2**k, after_fusion=True)
        use_channels_last_depthwise(self.stages)  # the MLPs' depthwise convs on their token layout
        self.decoder = SegFormerDecoder(widths, num_classes, channels=decoder_channels, dropout=dropout)
        for m in modalities:
            self.taps.declare(f"{m}.head", num_classes, 4, "logits", after_fusion=True)  # on mixed stage features
        self.taps.declare("head.logits", num_classes, 4, "logits", after_fusion=True)
        self.alpha = nn.Parameter(torch.ones(len(modalities)))  # ensemble weights (softmax), as WeTr.alpha
        self.side_logits: tuple[torch.Tensor, ...] = ()
        self._fused_attn: bool | None = None
        if mit_weights is not None:
            load_mit_imagenet(self, mit_weights)

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The modality's own LayerNorms (everything else is shared)."""
        if modality not in self.modalities:
            raise ValueError(f"{modality!r} is not one of this model's modalities {self.modalities}")
        for module in self.modules():
            if isinstance(module, ModalityNorm):
                yield from module[modality].parameters()

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        device = next(iter(xs.values())).device
        fused = device.type != "cpu"  # explicit attention on CPU (one-head stage 1), SDPA elsewhere
        if fused != self._fused_attn:
            for module in self.modules():
                if isinstance(module, GeminiAttention):
                    module.fused_attn = fused
            self._fused_attn = fused
        b = next(iter(xs.values())).shape[0]
        # Both modalities as one batch through the shared weights: (2B, 3, H, W).
        x = torch.cat([t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t for t in xs.values()])
        features: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        for k, stage in enumerate(self.stages):
            x = stage(x)
            attn = stage.blocks[-1].attn
            gate, attn.gate = attn.gate, None
            self.taps(f"fused.stage{k + 1}.gate", gate.view(b, 2, *x.shape[-2:]))
            for m, part in zip(self.modalities, x.chunk(2)):
                features[m].append(self.taps(f"{m}.stage{k + 1}", part))
        # The decoder runs once per modality: its BatchNorm takes each modality's statistics.
        logits = [self.taps(f"{m}.head", self.decoder.classify(self.decoder(features[m]))) for m in self.modalities]
        weights = torch.softmax(self.alpha, dim=0)
        ensemble = sum(w * z.detach() for w, z in zip(weights, logits))
        self.side_logits = tuple(logits) if self.training else ()
        return self.taps("head.logits", ensemble)


# ----------------------------------------------------------------------------- authors' keys
# Their WeTr: encoder.patch_embed{1-4}.{proj.module, norm.ln_i}, encoder.block{1-4}.{j}.*,
# encoder.norm{1-4}.ln_i (ModuleParallel wraps a shared module as `.module`; LayerNormParallel
# holds `ln_0`, `ln_1`), decoder.* (SegFormerHead, mmcv ConvModule `linear_fuse.conv/bn`), alpha.
def _geminifusion_rules(modalities: Sequence[str]) -> list[tuple[str, str]]:
    rules: list[tuple[str, str]] = []
    for i, m in enumerate(modalities):
        rules += [
            (rf"encoder\.patch_embed([1-4])\.norm\.ln_{i}\.(weight|bias)", rf"stages.<\1-1>.proj_norm.{m}.\2"),
            (rf"encoder\.norm([1-4])\.ln_{i}\.(weight|bias)", rf"stages.<\1-1>.norm.{m}.\2"),
            (rf"encoder\.block([1-4])\.(\d+)\.(norm1|norm2|attn\.norm)\.ln_{i}\.(weight|bias)", rf"stages.<\1-1>.blocks.\2.\3.{m}.\4"),
            (rf"encoder\.block([1-4])\.(\d+)\.attn\.cross_attn_{i}_to_{1 - i}\.(.+)", rf"stages.<\1-1>.blocks.\2.attn.gemini.cross.{m}.\3"),
        ]
    blk = r"encoder\.block([1-4])\.(\d+)\."
    ours = r"stages.<\1-1>.blocks.\2."
    return rules + [
        (r"encoder\.patch_embed([1-4])\.proj\.module\.(weight|bias)", r"stages.<\1-1>.proj.\2"),
        (blk + r"attn\.(q|kv|proj|sr)\.module\.(weight|bias)", ours + r"attn.\3.\4"),
        (blk + r"attn\.relation_judger\.0\.(fc1|fc2)\.(weight|bias)", ours + r"attn.gemini.judge.\3.\4"),
        (blk + r"attn\.(k_noise|v_noise)\.weight", ours + r"attn.gemini.\3.weight"),
        (blk + r"mlp\.(fc1|fc2)\.module\.(weight|bias)", ours + r"mlp.\3.\4"),
        (blk + r"mlp\.dwconv\.dwconv\.(weight|bias)", ours + r"mlp.dwconv.\3"),
        (r"decoder\.linear_c([1-4])\.proj\.(weight|bias)", r"decoder.linear.<\1-1>.\2"),
        (r"decoder\.linear_fuse\.conv\.weight", r"decoder.fuse.0.weight"),
        (r"decoder\.linear_fuse\.bn\.(.+)", r"decoder.fuse.1.\1"),
        (r"decoder\.linear_pred\.(weight|bias)", r"decoder.classifier.\1"),
        (r"alpha", r"alpha"),
    ]


def convert_geminifusion(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """The authors' ``WeTr`` state dict (their checkpoint's ``segmenter``, ``module.`` prefix
    removed) -> ours. Every tensor maps one to one; nothing is folded. ``ln_0`` / ``cross_attn_0_to_1``
    / ``k_noise`` row 0 belong to the first modality (RGB), as their ``main.py`` feeds ``[rgb, depth]``.

    Raises:
        ConversionError: a key that is not part of the network, named.
    """
    return rename_shifted(state_dict, _geminifusion_rules(model.modalities), "the GeminiFusion checkpoint")


def _mit_rules(modality: str) -> list[tuple[str, str]]:
    """SegFormer's ImageNet MiT keys -> ours, the norms into ``modality``'s LayerNorms."""
    blk, ours = r"block([1-4])\.(\d+)\.", r"stages.<\1-1>.blocks.\2."
    return [
        (r"patch_embed([1-4])\.proj\.(weight|bias)", r"stages.<\1-1>.proj.\2"),
        (r"patch_embed([1-4])\.norm\.(weight|bias)", rf"stages.<\1-1>.proj_norm.{modality}.\2"),
        (r"norm([1-4])\.(weight|bias)", rf"stages.<\1-1>.norm.{modality}.\2"),
        (blk + r"(norm1|norm2|attn\.norm)\.(weight|bias)", ours + rf"\3.{modality}.\4"),
        (blk + r"attn\.(q|kv|proj|sr)\.(weight|bias)", ours + r"attn.\3.\4"),
        (blk + r"mlp\.(fc1|fc2)\.(weight|bias)", ours + r"mlp.\3.\4"),
        (blk + r"mlp\.dwconv\.dwconv\.(weight|bias)", ours + r"mlp.dwconv.\3"),
    ]


def load_mit_imagenet(model: GeminiFusionMiT, path: str) -> GeminiFusionMiT:
    """Initialize the shared backbone from SegFormer's ImageNet MiT file, as the reference's
    ``WeTr`` does (``expand_state_dict``): shared weights take MiT's tensors, every modality's
    LayerNorms the same norm; the GeminiFusion modules (cross attention, relation judger, noise)
    keep their initialization; the classifier ``head.*`` is dropped.

    Raises:
        ConversionError: a key that does not map; ValueError: a backbone tensor missing.
    """
    expected = [k for k in model.state_dict() if k.startswith("stages.") and ".gemini." not in k]
    return load_mit_file(model, path, _mit_rules, expected)


# ----------------------------------------------------------------------------- entry points
ACCEPTS = (
    "num_classes", "modalities", "in_chans", "pretrained", "decoder_channels", "dropout", "drop_path_rate", "cross_heads",
    "mit_weights",
)


def _entry(variant: str) -> Callable[..., nn.Module]:
    return published_entry(
        f"geminifusion_mit_{variant}", functools.partial(GeminiFusionMiT, variant),
        doc=f"GeminiFusion on MiT-{variant.upper()}, the authors' network; paper: {PAPER}.\n\n{GeminiFusionMiT.__doc__}",
        task="segmentation", fusion="middle", method="geminifusion", encoder=f"mit_{variant}", paper=PAPER,
        modalities=("rgb", "depth"), max_modalities=2, accepts=ACCEPTS,
        reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
    )


geminifusion_mit_b0, geminifusion_mit_b1, geminifusion_mit_b2, geminifusion_mit_b3, geminifusion_mit_b4, geminifusion_mit_b5 = (
    _entry(v) for v in ("b0", "b1", "b2", "b3", "b4", "b5")
)

register_converter(*(f"geminifusion_mit_{v}" for v in MIT_DEPTHS), classifier_key="decoder.linear_pred.weight", with_model=True)(convert_geminifusion)

# ----------------------------------------------------------------------------- released weights
# The authors' README (reference commit) links these files (GitHub releases); no sha256 published.
# Their loader: RGB / 255 then ImageNet mean/std; depth (gray, tiled to 3 channels) / 255 only.
_NORM = {"rgb": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, "depth": {"mean": (0.0,), "std": (1.0,)}}
_RELEASES = "https://github.com/JiaDingCN/GeminiFusion/releases/download"
for _variant, _tag, _file, _miou in (
    ("b3", "nyuv2", "NYUDv2_V2/mit-b3.pth.tar", "56.8"),
    ("b5", "nyuv2", "NYUDv2_V2/mit_b5.pth.tar", "57.7"),
    ("b3", "sunrgbd", "SUN_v2/mit-b3.pth.tar", "52.7"),
    ("b5", "sunrgbd", "SUN_v2/mit_b5.pth.tar", "53.3"),
):
    _classes = NYUV2_CLASSES if _tag == "nyuv2" else NYUV2_CLASSES[:37]
    _where = "NYUDv2, 40 classes, 480x640" if _tag == "nyuv2" else "SUN RGB-D, 37 classes, 480x480"
    register_weights(ReleasedWeights(
        name=f"geminifusion_mit_{_variant}", tag=_tag, url=f"{_RELEASES}/{_file}", filename=_file.split("/")[1],
        num_classes=len(_classes), modalities=("rgb", "depth"),
        reported=f"mIoU {_miou} single scale ({_where}; README), the ensemble output",
        class_names=_classes, normalization=_NORM,
    ))
