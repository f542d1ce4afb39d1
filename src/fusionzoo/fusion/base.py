"""The contract every stage-fusion operator follows.

A middle-fusion model runs its per-modality encoders stage by stage. After stage k it hands the
list of per-modality features (all ``(B, C_k, h_k, w_k)``, modality order = the model's
``modalities``, RGB first) to one :class:`StageFusion` module and receives a
:class:`FusionResult`:

- ``fused`` goes to the decoder (and to the ``fused.stageK`` tap);
- ``streams`` (methods that feed fused or rectified features back, e.g. FuseNet, ESANet,
  SA-Gate, CMX) replaces the per-modality features that enter encoder stage k+1; ``None`` leaves
  the streams unchanged;
- ``details`` exposes fusion internals (gates, attention maps) as taps
  ``fused.stageK.<name>``; every key must be declared with its channel count in
  ``detail_channels`` at construction, because taps are declared before any forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

NUM_STAGES = 4  # stages 1..4 at strides 4, 8, 16, 32 (stage_index 0..3)


@dataclass
class FusionResult:
    fused: torch.Tensor
    streams: list[torch.Tensor] | None = None
    details: dict[str, torch.Tensor] = field(default_factory=dict)


class StageFusion(nn.Module):
    """Base class of per-stage fusion operators; it validates the arguments every operator shares.

    Args:
        channels: channel count ``C`` of every modality's feature at this stage.
        num_modalities: how many streams are fused (2 for RGB-D / RGB-T).
        stage_index: 0-based encoder stage (0..3 for strides 4..32); operators whose published
            settings differ per stage (CMX's heads, the cross-attention's spatial reduction) read it.

    Subclasses set ``max_modalities = 2`` when the published method is defined for exactly two
    streams, fill ``self.detail_channels`` with the channel count of every ``details`` entry
    (at the stage's resolution) they return, and call :meth:`check_features` first in ``forward``.
    """

    max_modalities: ClassVar[int | None] = None
    feeds_back: ClassVar[bool] = False
    # With feeds_back, which streams continue from features of every modality: "all" (CMX and
    # SA-Gate rectify both streams) or "first" (FuseNet's sum and ESANet's SE-add replace the RGB
    # stream; the others go on with their own features). Models derive the taps' after_fusion from it.
    feeds_back_into: ClassVar[str] = "all"
    # Details that are global vectors (B, C, 1, 1), e.g. channel-attention weights; their taps
    # get reduction 0 instead of the stage's stride.
    global_details: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, channels: int, num_modalities: int, *, stage_index: int = 0) -> None:
        super().__init__()
        name = type(self).__name__
        if self.max_modalities is not None and num_modalities != self.max_modalities:
            raise ValueError(
                f"{name} is defined for exactly {self.max_modalities} modalities "
                f"(RGB plus one auxiliary stream), got {num_modalities}; use a generic fusion "
                "(e.g. 'crossattn', 'early_concat', 'late_mean') for more streams."
            )
        if num_modalities < 2:
            raise ValueError(f"{name}: fusion needs at least 2 modalities, got {num_modalities}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{name}: channels must be a positive int, got {channels!r}")
        if isinstance(stage_index, bool) or not isinstance(stage_index, int):
            raise TypeError(f"{name}: stage_index must be an int in 0..{NUM_STAGES - 1}, got {stage_index!r}")
        if not 0 <= stage_index < NUM_STAGES:
            raise ValueError(f"{name}: stage_index must be in 0..{NUM_STAGES - 1} (stage1..stage4), got {stage_index}")
        self.channels = channels
        self.num_modalities = num_modalities
        self.stage_index = stage_index
        self.detail_channels: dict[str, int] = {}

    def mixed_streams(self, modalities: Sequence[str]) -> tuple[str, ...]:
        """The modalities (in ``modalities`` order, one per input stream) whose stream continues
        from this operator's mixed features when the model feeds its ``streams`` back."""
        if not self.feeds_back:
            return ()
        return tuple(modalities[:1]) if self.feeds_back_into == "first" else tuple(modalities)

    def check_features(self, features: Sequence[torch.Tensor]) -> tuple[int, int, int, int]:
        """Check the per-modality feature list handed to ``forward``.

        Args:
            features: ``num_modalities`` tensors, each ``(B, C, h, w)`` with identical shapes.

        Returns:
            The common shape ``(B, C, h, w)``.
        """
        name = type(self).__name__
        if not isinstance(features, (list, tuple)):
            raise TypeError(f"{name}.forward expects a list of tensors (one per modality), got {type(features)}")
        if len(features) != self.num_modalities:
            raise ValueError(f"{name} was built for {self.num_modalities} modalities, got {len(features)} feature maps")
        ref = features[0]
        for i, f in enumerate(features):
            if not isinstance(f, torch.Tensor) or f.dim() != 4:
                got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f)
                raise ValueError(f"{name}: feature {i} must be a (B, C, h, w) tensor, got {got}")
            if f.shape[1] != self.channels:
                raise ValueError(
                    f"{name}: feature {i} has {f.shape[1]} channels, expected {self.channels} (shape {tuple(f.shape)})"
                )
            if f.shape != ref.shape:
                raise ValueError(
                    f"{name}: all modality features must share one shape, feature 0 is {tuple(ref.shape)} "
                    f"but feature {i} is {tuple(f.shape)}"
                )
        b, c, h, w = ref.shape
        return b, c, h, w

    def forward(self, features: list[torch.Tensor]) -> FusionResult:  # pragma: no cover - abstract
        raise NotImplementedError
