"""Small blocks shared by the stage-fusion operators (the argument checks live in :class:`StageFusion`)
and by the published networks (:class:`DepthwiseConv2d`)."""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (``groups == in_channels``, weight ``(C, 1, kh, kw)``) that keeps a
    channels-last input channels-last.

    Transformer blocks hand their depthwise convolutions a token tensor ``(B, N, C)`` viewed as
    ``(B, C, H, W)``: channels-last strides. ``nn.Conv2d`` picks oneDNN's layout from the weight,
    whose strides say NCHW, so it copies the input to NCHW, and again the gradient in backward
    (timm's pvt_v2 MLP), or the caller copies first (the MiT authors' ``.contiguous()``). A
    ``(C, 1, kh, kw)`` weight addresses the same memory under channels-last strides
    ``(kh*kw, 1, kw, 1)`` (dimension 1 has size 1), so viewing it so costs nothing and lets oneDNN run
    in NHWC without either copy: the MiT-B2 stage-1 MLP (64 -> 256 channels, 64x80 tokens, one
    thread) trains in 25 ms instead of 37 ms (the authors' layout) and 43 ms (timm's). Same
    parameters, same arithmetic up to rounding. NCHW inputs take the plain path.
    """

    def forward(self, x: torch.Tensor, plus_input: bool = False) -> torch.Tensor:
        """``conv(x)``, or with ``plus_input`` ``conv(x) + x`` (a positional conv's residual, DFormer's
        MLP) as one convolution whose centre tap is increased by 1: no separate pass over ``x`` (the
        widest tensor of the block) forward or backward; DFormer-B's stage-1 MLP trains 18% faster."""
        w = self.weight
        if plus_input:
            kh, kw = w.shape[-2:]
            same = self.stride == (1, 1) and self.padding == (kh // 2, kw // 2) and self.padding_mode == "zeros"
            if kh % 2 == 0 or kw % 2 == 0 or not same:
                raise ValueError(
                    f"DepthwiseConv2d(plus_input=True) needs an odd 'same' kernel at stride 1, got {self}"
                )
            centre = torch.zeros_like(w)
            centre[:, :, kh // 2, kw // 2] = 1
            w = w + centre
        token_layout = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if w.shape[1] == 1 and token_layout:
            kh, kw = w.shape[-2:]
            w = w.as_strided(w.shape, (kh * kw, 1, kw, 1))
        return self._conv_forward(x, w, self.bias)


def use_channels_last_depthwise(module: nn.Module) -> nn.Module:
    """Make every depthwise ``nn.Conv2d`` in ``module`` (built by timm, e.g. pvt_v2's MLP) a
    :class:`DepthwiseConv2d`, in place: the class only, the parameters and their keys are kept."""
    for m in module.modules():
        if type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.groups > 1:
            m.__class__ = DepthwiseConv2d
    return module


def reduced_channels(op: str, channels: int, reduction: int, what: str) -> int:
    """``channels // reduction``, raising when it would be zero (a dead bottleneck)."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"{op}: {what} reduction must be a positive int, got {reduction!r}")
    hidden = channels // reduction
    if hidden < 1:
        raise ValueError(
            f"{op}: {what} needs channels >= reduction, got channels={channels}, reduction={reduction}; "
            "lower the reduction for such narrow features."
        )
    return hidden


def make_activation(op: str, activation: str) -> nn.Module:
    """Activation by name, following ESANet's options (``relu``, ``swish``/``silu``, ``hswish``)."""
    key = activation.lower()
    if key == "relu":
        return nn.ReLU(inplace=True)
    if key in ("swish", "silu"):
        return nn.SiLU()  # ESANet's Swish is x * sigmoid(x), which is SiLU
    if key == "hswish":
        return nn.Hardswish()  # x * relu6(x + 3) / 6, as ESANet's Hswish
    raise ValueError(f"{op}: activation must be one of 'relu', 'swish', 'silu', 'hswish', got {activation!r}")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation re-weighting as ESANet uses it (Seichter et al., ICRA 2021, Sec. III-B).

    ``x * sigmoid(conv1x1(act(conv1x1(avgpool(x)))))`` with biased 1x1 convolutions
    ``C -> C // reduction -> C`` (same parameter shapes as ESANet's ``SqueezeAndExcitation.fc``).

    Args:
        channels: ``C``.
        reduction: bottleneck ratio (16 in ESANet).
        activation: hidden activation name (see :func:`make_activation`).
    """

    def __init__(self, channels: int, reduction: int = 16, activation: str = "relu") -> None:
        super().__init__()
        hidden = reduced_channels(type(self).__name__, channels, reduction, "squeeze-excitation")
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            make_activation(type(self).__name__, activation),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """Channel weights ``(B, C, 1, 1)`` in (0, 1) for ``x`` of shape ``(B, C, h, w)``."""
        return self.fc(x.mean(dim=(2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Re-weighted ``x``, shape ``(B, C, h, w)``."""
        return x * self.weights(x)
