"""CMX: feature rectification (FRM) and feature fusion (FFM) modules.

Zhang et al., "CMX: Cross-Modal Fusion for RGB-X Semantic Segmentation with Transformers",
IEEE T-ITS 2023: Sec. III-B (Cross-Modal Feature Rectification Module, Eq. 1-5) and Sec. III-C
(Feature Fusion Module: efficient cross-attention, Eq. 6-9, and the mixed channel embedding,
Eq. 10). Module layout and hyper-parameters follow the reference
(huaaaliu/RGBX_Semantic_Segmentation, ``models/net_utils.py``; uses in
``models/encoders/dual_segformer.py`` and ``dual_resnet.py``), so the reference's ``FRMs.k.*`` and
``FFMs.k.*`` state-dict entries map one to one onto ``frm.*`` and ``ffm.*`` here.

Reference settings per backbone (``preset``):

- ``"mit"`` (SegFormer / MiT, and timm ``pvt_v2``): ``reduction=1``, heads ``[1, 2, 5, 8]``.
- ``"resnet"`` (CMX's dual ResNet): ``reduction=4``, heads ``[4, 8, 16, 32]``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._common import reduced_channels
from .base import FusionResult, StageFusion

PRESETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    # preset -> (reduction, num_heads per stage)
    "mit": (1, (1, 2, 5, 8)),
    "resnet": (4, (4, 8, 16, 32)),
}


def _init_cmx_weights(m: nn.Module) -> None:
    """CMX's ``_init_weights``: trunc-normal linears, fan-out normal convs, unit/zero norms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- FRM (Sec. III-B)
class ChannelWeights(nn.Module):
    """Channel-wise rectification weights (Eq. 1-2).

    Global average and max pooling of ``[x1, x2]`` give a ``4C`` vector; an MLP
    ``4C -> 4C // r -> 2C`` with a sigmoid gives one ``C``-vector per modality.
    """

    def __init__(self, dim: int, reduction: int = 1) -> None:
        super().__init__()
        self.dim = dim
        hidden = reduced_channels("CMXFusion", dim * 4, reduction, "ChannelWeights")
        self.mlp = nn.Sequential(
            nn.Linear(dim * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim * 2),
            nn.Sigmoid(),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Weights ``(2, B, C, 1, 1)``: index 0 scales ``x1``, index 1 scales ``x2``."""
        b = x1.shape[0]
        x = torch.cat([x1, x2], dim=1)
        y = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)  # (B, 4C): avg then max
        return self.mlp(y).view(b, 2, self.dim, 1, 1).transpose(0, 1)


class SpatialWeights(nn.Module):
    """Spatial rectification weights (Eq. 3-4): 1x1 convs ``2C -> C // r -> 2`` and a sigmoid."""

    def __init__(self, dim: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = reduced_channels("CMXFusion", dim, reduction, "SpatialWeights")
        self.mlp = nn.Sequential(
            nn.Conv2d(dim * 2, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Weights ``(B, 2, h, w)``: channel 0 scales ``x1``, channel 1 scales ``x2``."""
        return self.mlp(torch.cat([x1, x2], dim=1))


class FeatureRectifyModule(nn.Module):
    """FRM (Eq. 5): each stream adds the other, re-weighted per channel and per pixel.

    ``out1 = x1 + lambda_c * w_c[1] * x2 + lambda_s * w_s[1] * x2`` and symmetrically for ``x2``.

    Args:
        dim: ``C``.
        reduction: MLP bottleneck ratio (1 for MiT, 4 for ResNet in CMX).
        lambda_c: weight of the channel-rectified term (0.5 in CMX).
        lambda_s: weight of the spatially rectified term (0.5 in CMX).
    """

    def __init__(self, dim: int, reduction: int = 1, lambda_c: float = 0.5, lambda_s: float = 0.5) -> None:
        super().__init__()
        self.lambda_c = lambda_c
        self.lambda_s = lambda_s
        self.channel_weights = ChannelWeights(dim, reduction)
        self.spatial_weights = SpatialWeights(dim, reduction)

    def rectify(
        self, x1: torch.Tensor, x2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rectified ``(out1, out2)`` (each ``(B, C, h, w)``) plus the channel weights
        ``(2, B, C, 1, 1)`` and spatial weights ``(B, 2, h, w)`` that produced them."""
        cw = self.channel_weights(x1, x2)
        sw = self.spatial_weights(x1, x2)
        out1 = x1 + self.lambda_c * cw[1] * x2 + self.lambda_s * sw[:, 1:2] * x2
        out2 = x2 + self.lambda_c * cw[0] * x1 + self.lambda_s * sw[:, 0:1] * x1
        return out1, out2, cw, sw

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out1, out2, _, _ = self.rectify(x1, x2)
        return out1, out2


# ----------------------------------------------------------------------------- FFM (Sec. III-C)
class CrossAttention(nn.Module):
    """Efficient cross-attention (Eq. 6-8): a global ``d x d`` context per head, exchanged.

    Keys and values of each stream (no bias) form ``ctx = softmax_over_keys(K^T V * scale)``
    (softmax along dim -2 as in the reference); the *other* stream's context is applied to each
    stream's tokens used directly as queries: ``out1 = x1 @ ctx2``, ``out2 = x2 @ ctx1``.
    Cost is linear in the number of tokens.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"CMX CrossAttention: width {dim} must be divisible by num_heads={num_heads}; "
                "pick num_heads dividing channels // reduction"
            )
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.kv1 = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.kv2 = nn.Linear(dim, dim * 2, bias=qkv_bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def _context(self, kv: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        k, v = kv(x).chunk(2, dim=-1)  # the reference reshapes to (..., 2, heads, d): k first
        k, v = self._heads(k), self._heads(v)
        return ((k.transpose(-2, -1) @ v) * self.scale).softmax(dim=-2)  # (B, heads, d, d)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token tensors ``(B, N, D)`` in, ``(B, N, D)`` out."""
        b, n, c = x1.shape
        ctx1 = self._context(self.kv1, x1)
        ctx2 = self._context(self.kv2, x2)
        y1 = (self._heads(x1) @ ctx2).transpose(1, 2).reshape(b, n, c)
        y2 = (self._heads(x2) @ ctx1).transpose(1, 2).reshape(b, n, c)
        return y1, y2


class CrossPath(nn.Module):
    """Information-exchange stage of the FFM (Eq. 6-9).

    Each stream is projected to ``2 * C // r`` with ReLU and split into a residual half and an
    attention half; the attention halves go through :class:`CrossAttention`; the two halves are
    concatenated, projected back to ``C``, added to the input and LayerNorm-ed.
    """

    def __init__(self, dim: int, reduction: int = 1, num_heads: int = 1) -> None:
        super().__init__()
        inner = reduced_channels("CMXFusion", dim, reduction, "CrossPath")
        self.channel_proj1 = nn.Linear(dim, inner * 2)
        self.channel_proj2 = nn.Linear(dim, inner * 2)
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)
        self.cross_attn = CrossAttention(inner, num_heads=num_heads)
        self.end_proj1 = nn.Linear(inner * 2, dim)
        self.end_proj2 = nn.Linear(inner * 2, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token tensors ``(B, N, C)`` in and out."""
        y1, u1 = self.act1(self.channel_proj1(x1)).chunk(2, dim=-1)
        y2, u2 = self.act2(self.channel_proj2(x2)).chunk(2, dim=-1)
        v1, v2 = self.cross_attn(u1, u2)
        out1 = self.norm1(x1 + self.end_proj1(torch.cat([y1, v1], dim=-1)))
        out2 = self.norm2(x2 + self.end_proj2(torch.cat([y2, v2], dim=-1)))
        return out1, out2


class ChannelEmbed(nn.Module):
    """Fusion stage of the FFM (Eq. 10): ``2C -> C`` mixing with a depth-wise 3x3 conv.

    ``BN(conv1x1(x) + BN(conv1x1(relu(dwconv3x3(conv1x1(x))))))`` on the concatenated streams.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = reduced_channels("CMXFusion", out_channels, reduction, "ChannelEmbed")
        self.residual = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.channel_embed = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=True),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=True),
            nn.BatchNorm2d(out_channels),
        )
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2C, h, w) -> (B, C, h, w)``."""
        return self.norm(self.residual(x) + self.channel_embed(x))


class FeatureFusionModule(nn.Module):
    """FFM: :class:`CrossPath` on token sequences, then :class:`ChannelEmbed` to ``C`` channels.

    Args:
        dim: ``C``.
        reduction: width reduction inside CrossPath and ChannelEmbed.
        num_heads: heads of the efficient cross-attention (must divide ``C // reduction``).
    """

    def __init__(self, dim: int, reduction: int = 1, num_heads: int = 1) -> None:
        super().__init__()
        self.cross = CrossPath(dim, reduction, num_heads)
        self.channel_emb = ChannelEmbed(dim * 2, dim, reduction)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` twice in, fused ``(B, C, h, w)`` out."""
        b, c, h, w = x1.shape
        t1, t2 = self.cross(x1.flatten(2).transpose(1, 2), x2.flatten(2).transpose(1, 2))
        # Concatenated along channels as (B, 2C, N): the one copy is the concatenation itself, and it
        # lands in NCHW, which ChannelEmbed's 1x1 convs would otherwise each copy a token-layout view to.
        merged = torch.cat([t1.transpose(1, 2), t2.transpose(1, 2)], dim=1).view(b, 2 * c, h, w)
        return self.channel_emb(merged)


class CMXFusion(StageFusion):
    """One CMX stage: FRM rectifies both streams (fed back), FFM fuses them (to the decoder).

    Args:
        channels: ``C`` of both inputs.
        num_modalities: must be 2 (RGB first, then the X modality).
        stage_index: 0..3; selects the reference head count for this stage.
        preset: ``"mit"`` (reduction 1, heads [1, 2, 5, 8]) or ``"resnet"`` (reduction 4,
            heads [4, 8, 16, 32]), the reference settings per backbone family.
        num_heads: override of the preset's head count for this stage.
        reduction: override of the preset's reduction (used by both FRM and FFM, as in CMX).
        lambda_c: FRM channel-term weight (0.5).
        lambda_s: FRM spatial-term weight (0.5).

    Details:
        ``"gate"``: ``(B, 2, h, w)`` FRM spatial weights (channel 0 scales RGB into X's
        rectification, channel 1 scales X into RGB's).
        ``"attn"``: ``(B, 2C, 1, 1)`` FRM channel weights (first C for RGB, last C for X).

    Example:
        >>> op = CMXFusion(64, 2, stage_index=1)
        >>> res = op([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)])
        >>> res.fused.shape, len(res.streams), res.details["gate"].shape
        (torch.Size([2, 64, 8, 8]), 2, torch.Size([2, 2, 8, 8]))
    """

    max_modalities = 2
    feeds_back = True
    global_details = frozenset({"attn"})  # (B, 2C, 1, 1) FRM channel weights

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        *,
        stage_index: int = 0,
        preset: str = "mit",
        num_heads: int | None = None,
        reduction: int | None = None,
        lambda_c: float = 0.5,
        lambda_s: float = 0.5,
    ) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        name = type(self).__name__
        if preset not in PRESETS:
            raise ValueError(f"{name}: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset_reduction, preset_heads = PRESETS[preset]
        self.preset = preset
        self.reduction = preset_reduction if reduction is None else reduction
        self.num_heads = preset_heads[stage_index] if num_heads is None else num_heads
        inner = reduced_channels(name, channels, self.reduction, "FFM")
        if self.num_heads < 1 or inner % self.num_heads:
            raise ValueError(
                f"{name}: channels // reduction = {channels} // {self.reduction} = {inner} is not "
                f"divisible by num_heads={self.num_heads} (stage_index={stage_index}, preset={preset!r}); "
                "pass num_heads= or reduction= explicitly, or use the preset matching the backbone"
            )
        self.frm = FeatureRectifyModule(channels, self.reduction, lambda_c, lambda_s)
        self.ffm = FeatureFusionModule(channels, self.reduction, self.num_heads)
        self.apply(_init_cmx_weights)  # CMX applies this init to FRMs and FFMs alike
        self.detail_channels = {"gate": 2, "attn": 2 * channels}

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """Fuse ``[rgb, x]``, each ``(B, C, h, w)``.

        Returns:
            ``fused`` ``(B, C, h, w)``; ``streams`` the two rectified features ``(B, C, h, w)``;
            ``details`` ``gate`` ``(B, 2, h, w)`` and ``attn`` ``(B, 2C, 1, 1)``.
        """
        self.check_features(features)
        x1, x2 = features
        r1, r2, cw, sw = self.frm.rectify(x1, x2)
        fused = self.ffm(r1, r2)
        attn = torch.cat([cw[0], cw[1]], dim=1)
        return FusionResult(fused=fused, streams=[r1, r2], details={"gate": sw, "attn": attn})


__all__ = [
    "CMXFusion",
    "ChannelEmbed",
    "ChannelWeights",
    "CrossAttention",
    "CrossPath",
    "FeatureFusionModule",
    "FeatureRectifyModule",
    "SpatialWeights",
]
