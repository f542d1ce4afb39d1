"""Generic stage-fusion operators for any number (>= 2) of modalities.

- :class:`SumFusion`: FuseNet's element-wise sum (Hazirbas et al., "FuseNet: Incorporating Depth
  into Semantic Segmentation via Fusion-based CNN Architecture", ACCV 2016, Sec. 3.1): the
  auxiliary features are added into the RGB branch, which continues with the sum.
- :class:`ConcatFusion`: channel concatenation and a 1x1 conv-BN-ReLU back to ``C``.
- :class:`SEAddFusion`: ESANet's SE-add (Seichter et al., ICRA 2021, Sec. III-B) generalised to
  ``M`` streams; the sum is fed back as the first (RGB) stream, as in ESANet.
- :class:`CrossAttentionFusion`: each modality's tokens attend to the other modalities' tokens
  with PVT-style spatial reduction of keys/values (Wang et al., "Pyramid Vision Transformer",
  ICCV 2021, Sec. 3.3), residual + LayerNorm, then a 1x1 conv merges the streams.

Streams are ordered as the model's modalities (RGB first).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import SqueezeExcite
from .base import FusionResult, StageFusion


class SumFusion(StageFusion):
    """FuseNet-style sum: ``fused = sum_m x_m``; the first stream continues with the sum.

    Parameter-free. ``streams = [fused, x_2, ..., x_M]`` (FuseNet adds depth into the RGB
    encoder; the depth encoder runs on its own features).

    Args:
        channels: ``C`` of every input.
        num_modalities: ``M >= 2``.
        stage_index: accepted for a uniform constructor; unused.

    Example:
        >>> op = SumFusion(8, 3)
        >>> op([torch.ones(1, 8, 2, 2)] * 3).fused[0, 0, 0, 0].item()
        3.0
    """

    feeds_back = True
    feeds_back_into = "first"

    def __init__(self, channels: int, num_modalities: int, *, stage_index: int = 0) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """``M`` tensors ``(B, C, h, w)`` -> ``fused`` ``(B, C, h, w)``, ``streams`` ``[fused, *rest]``."""
        self.check_features(features)
        fused = features[0]
        for x in features[1:]:  # pairwise adds: no (M, B, C, h, w) stack in memory
            fused = fused + x
        return FusionResult(fused=fused, streams=[fused, *features[1:]])


class ConcatFusion(StageFusion):
    """Concatenate the ``M`` streams and map ``M*C -> C`` with a 1x1 conv, BN and ReLU.

    Args:
        channels: ``C`` of every input.
        num_modalities: ``M >= 2``.
        stage_index: accepted for a uniform constructor; unused.
    """

    feeds_back = False

    def __init__(self, channels: int, num_modalities: int, *, stage_index: int = 0) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        self.proj = nn.Sequential(
            nn.Conv2d(num_modalities * channels, channels, kernel_size=1, bias=False),  # BN follows
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """``M`` tensors ``(B, C, h, w)`` -> ``fused`` ``(B, C, h, w)``."""
        self.check_features(features)
        return FusionResult(fused=self.proj(torch.cat(list(features), dim=1)))


class SEAddFusion(StageFusion):
    """ESANet's SE-add for ``M`` streams: ``fused = sum_m SE_m(x_m)``, fed back as stream 0.

    Args:
        channels: ``C`` of every input.
        num_modalities: ``M >= 2``.
        stage_index: accepted for a uniform constructor; unused.
        reduction: SE bottleneck ratio (16, as ESANet).
        activation: SE hidden activation (``"relu"``, ``"swish"``, ``"hswish"``).

    Details:
        ``"attn"``: ``(B, M*C, 1, 1)``, the SE channel weights of every stream in order.
    """

    feeds_back = True
    feeds_back_into = "first"
    global_details = frozenset({"attn"})  # (B, M*C, 1, 1) SE channel weights

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        *,
        stage_index: int = 0,
        reduction: int = 16,
        activation: str = "relu",
    ) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        self.se = nn.ModuleList(SqueezeExcite(channels, reduction, activation) for _ in range(num_modalities))
        self.detail_channels = {"attn": num_modalities * channels}

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """``M`` tensors ``(B, C, h, w)`` -> ``fused`` ``(B, C, h, w)``, ``streams`` ``[fused, *rest]``."""
        self.check_features(features)
        weights = [se.weights(x) for se, x in zip(self.se, features)]
        fused = features[0] * weights[0]
        for x, w in zip(features[1:], weights[1:]):
            fused = fused + x * w
        return FusionResult(
            fused=fused,
            streams=[fused, *features[1:]],
            details={"attn": torch.cat(weights, dim=1)},
        )


# PVT's spatial-reduction ratios for strides 4, 8, 16, 32: keys/values stay at 1/32 of the input
# resolution at every stage, so the attention matrix grows only linearly with the image area.
DEFAULT_SR_RATIOS = (8, 4, 2, 1)


def _default_heads(channels: int) -> int:
    """Most heads in (8, 4, 2, 1) that divide ``C`` with a head width of at least 32."""
    for h in (8, 4, 2):
        if channels % h == 0 and channels // h >= 32:
            return h
    return 1


class _KeyValueSource(nn.Module):
    """Keys and values of one modality: PVT spatial reduction (strided conv + LayerNorm) then
    a linear ``C -> 2C``. Input is zero-padded to a multiple of ``sr`` so any size works."""

    def __init__(self, channels: int, sr_ratio: int) -> None:
        super().__init__()
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(channels, channels, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(channels)
        self.kv = nn.Linear(channels, 2 * channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(B, C, h, w)`` -> keys, values ``(B, N', C)`` and the reduced grid ``(h', w')``."""
        if self.sr_ratio > 1:
            r = self.sr_ratio
            pad_h, pad_w = (-x.shape[2]) % r, (-x.shape[3]) % r
            if pad_h or pad_w:
                x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
            x = self.sr(x)
        grid = (x.shape[2], x.shape[3])
        tokens = x.flatten(2).transpose(1, 2)
        if self.sr_ratio > 1:
            tokens = self.norm(tokens)
        k, v = self.kv(tokens).chunk(2, dim=-1)
        return k, v, grid


class CrossAttentionFusion(StageFusion):
    """Multi-head cross-modal attention between ``M`` streams, merged by a 1x1 conv.

    For every modality ``m``: queries from ``x_m``; keys/values from the spatially reduced tokens
    of all other modalities (concatenated); ``y_m = LayerNorm(x_m + proj_m(attention))``. Then
    ``fused = ReLU(BN(conv1x1([y_1, ..., y_M])))``. The streams are not fed back.

    Args:
        channels: ``C`` of every input.
        num_modalities: ``M >= 2``.
        stage_index: 0..3; picks the default ``sr_ratio`` (8, 4, 2, 1, as PVT).
        num_heads: attention heads (default: most of 8/4/2/1 dividing ``C`` with width >= 32).
        sr_ratio: key/value spatial reduction; overrides the per-stage default.

    Details:
        ``"attn"``: ``(B, M, h, w)``, attention *received* by each modality's locations: the
        attention mass that the other modalities' queries (averaged over queries, heads and
        querying modalities) put on the reduced token covering a pixel, scaled so that uniform
        attention gives 1. Above 1: the other streams look here more than average. With two
        modalities each map averages to 1 over the image (sizes divisible by ``sr_ratio``);
        with more, the maps average to 1 across modalities and a map's own mean tells how much
        of the others' attention that modality draws.

    Example:
        >>> op = CrossAttentionFusion(32, 3, stage_index=2)
        >>> res = op([torch.randn(1, 32, 6, 5) for _ in range(3)])
        >>> res.fused.shape, res.details["attn"].shape
        (torch.Size([1, 32, 6, 5]), torch.Size([1, 3, 6, 5]))
    """

    feeds_back = False

    def __init__(
        self,
        channels: int,
        num_modalities: int,
        *,
        stage_index: int = 0,
        num_heads: int | None = None,
        sr_ratio: int | None = None,
    ) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        name = type(self).__name__
        self.num_heads = _default_heads(channels) if num_heads is None else num_heads
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"{name}: channels={channels} must be divisible by num_heads={self.num_heads}")
        self.sr_ratio = DEFAULT_SR_RATIOS[stage_index] if sr_ratio is None else sr_ratio
        if isinstance(self.sr_ratio, bool) or not isinstance(self.sr_ratio, int) or self.sr_ratio < 1:
            raise ValueError(f"{name}: sr_ratio must be a positive int, got {self.sr_ratio!r}")
        self.scale = (channels // self.num_heads) ** -0.5
        m = num_modalities
        self.q = nn.ModuleList(nn.Linear(channels, channels) for _ in range(m))
        self.kv = nn.ModuleList(_KeyValueSource(channels, self.sr_ratio) for _ in range(m))
        self.proj = nn.ModuleList(nn.Linear(channels, channels) for _ in range(m))
        self.norm = nn.ModuleList(nn.LayerNorm(channels) for _ in range(m))
        self.merge = nn.Sequential(
            nn.Conv2d(m * channels, channels, kernel_size=1, bias=False),  # BN follows
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.detail_channels = {"attn": m}

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, H, N, d)

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """``M`` tensors ``(B, C, h, w)`` -> ``fused`` ``(B, C, h, w)``, ``details["attn"]`` ``(B, M, h, w)``."""
        b, c, h, w = self.check_features(features)
        m = self.num_modalities
        tokens = [x.flatten(2).transpose(1, 2) for x in features]  # (B, hw, C)
        sources = [kv(x) for kv, x in zip(self.kv, features)]
        grid = sources[0][2]
        n_kv = grid[0] * grid[1]
        received = [features[0].new_zeros(b, n_kv) for _ in range(m)]
        attended = []
        for i in range(m):
            others = [j for j in range(m) if j != i]
            k = self._split_heads(torch.cat([sources[j][0] for j in others], dim=1))
            v = self._split_heads(torch.cat([sources[j][1] for j in others], dim=1))
            q = self._split_heads(self.q[i](tokens[i]))
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, hw, (M-1) n_kv)
            out = (attn @ v).transpose(1, 2).reshape(b, h * w, c)
            y = self.norm[i](tokens[i] + self.proj[i](out))
            attended.append(y.transpose(1, 2).reshape(b, c, h, w))
            # mean over heads and queries, x total key count: uniform attention -> 1 per key
            mass = attn.mean(dim=(1, 2)) * (len(others) * n_kv)  # (B, (M-1) n_kv)
            for slot, j in enumerate(others):
                received[j] = received[j] + mass[:, slot * n_kv : (slot + 1) * n_kv] / (m - 1)
        fused = self.merge(torch.cat(attended, dim=1))
        attn_map = torch.stack(received, dim=1).reshape(b, m, grid[0], grid[1])
        if self.sr_ratio > 1:  # each reduced token covers an sr x sr block of the (padded) input
            r = self.sr_ratio
            attn_map = attn_map.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)[:, :, :h, :w]
        return FusionResult(fused=fused, details={"attn": attn_map})


__all__ = ["ConcatFusion", "CrossAttentionFusion", "SEAddFusion", "SumFusion"]
