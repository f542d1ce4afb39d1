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

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class FusionResult:
    fused: torch.Tensor
    streams: list[torch.Tensor] | None = None
    details: dict[str, torch.Tensor] = field(default_factory=dict)


class StageFusion(nn.Module):
    """Base class of per-stage fusion operators.

    Args:
        channels: channel count ``C`` of every modality's feature at this stage.
        num_modalities: how many streams are fused (2 for RGB-D / RGB-T).

    Subclasses set ``max_modalities = 2`` when the published method is defined for exactly two
    streams, and fill ``self.detail_channels`` with the channel count of every ``details`` entry
    (at the stage's resolution) they return.
    """

    max_modalities: ClassVar[int | None] = None
    feeds_back: ClassVar[bool] = False
    # Details that are global vectors (B, C, 1, 1), e.g. channel-attention weights; their taps
    # get reduction 0 instead of the stage's stride.
    global_details: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, channels: int, num_modalities: int) -> None:
        super().__init__()
        if self.max_modalities is not None and num_modalities != self.max_modalities:
            raise ValueError(
                f"{type(self).__name__} is defined for exactly {self.max_modalities} modalities "
                f"(RGB plus one auxiliary stream), got {num_modalities}; use a generic fusion "
                "(e.g. 'crossattn', 'early_concat', 'late_mean') for more streams."
            )
        if num_modalities < 2:
            raise ValueError(f"fusion needs at least 2 modalities, got {num_modalities}")
        self.channels = channels
        self.num_modalities = num_modalities
        self.detail_channels: dict[str, int] = {}

    def forward(self, features: list[torch.Tensor]) -> FusionResult:  # pragma: no cover - abstract
        raise NotImplementedError
