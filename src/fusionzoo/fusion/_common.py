"""Helpers shared by the stage-fusion operators: input checks and small reusable blocks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import StageFusion

NUM_STAGES = 4  # stages 1..4 at strides 4, 8, 16, 32 (stage_index 0..3)


def check_stage_index(op: str, stage_index: int) -> int:
    """Validate the ``stage_index`` keyword every operator accepts.

    Args:
        op: class name, for the error message.
        stage_index: 0-based encoder stage (0..3 for strides 4..32).

    Returns:
        ``stage_index`` unchanged.
    """
    if isinstance(stage_index, bool) or not isinstance(stage_index, int):
        raise TypeError(f"{op}: stage_index must be an int in 0..{NUM_STAGES - 1}, got {stage_index!r}")
    if not 0 <= stage_index < NUM_STAGES:
        raise ValueError(
            f"{op}: stage_index must be in 0..{NUM_STAGES - 1} (stage1..stage4), got {stage_index}"
        )
    return stage_index


def check_positive_channels(op: str, channels: int) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{op}: channels must be a positive int, got {channels!r}")


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


def check_features(module: StageFusion, features: Sequence[torch.Tensor]) -> tuple[int, int, int, int]:
    """Check the per-modality feature list handed to :meth:`StageFusion.forward`.

    Args:
        module: the fusion operator (gives the expected count and channels).
        features: ``num_modalities`` tensors, each ``(B, C, h, w)`` with identical shapes.

    Returns:
        The common shape ``(B, C, h, w)``.
    """
    name = type(module).__name__
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{name}.forward expects a list of tensors (one per modality), got {type(features)}")
    if len(features) != module.num_modalities:
        raise ValueError(
            f"{name} was built for {module.num_modalities} modalities, got {len(features)} feature maps"
        )
    ref = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f)
            raise ValueError(f"{name}: feature {i} must be a (B, C, h, w) tensor, got {got}")
        if f.shape[1] != module.channels:
            raise ValueError(
                f"{name}: feature {i} has {f.shape[1]} channels, expected {module.channels} "
                f"(shape {tuple(f.shape)})"
            )
        if f.shape != ref.shape:
            raise ValueError(
                f"{name}: all modality features must share one shape, feature 0 is {tuple(ref.shape)} "
                f"but feature {i} is {tuple(f.shape)}"
            )
    b, c, h, w = ref.shape
    return b, c, h, w


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
