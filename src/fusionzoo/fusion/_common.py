"""Small blocks shared by the stage-fusion operators (the argument checks live in :class:`StageFusion`)."""

from __future__ import annotations

import torch
from torch import nn


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
