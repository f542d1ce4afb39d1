"""SA-Gate: separation-and-aggregation gate.

Chen et al., "Bi-directional Cross-Modality Feature Propagation with Separation-and-Aggregation
Gate for RGB-D Semantic Segmentation", ECCV 2020, Sec. 3.2 (feature separation, Eq. 1-2) and
Sec. 3.3 (feature aggregation, Eq. 3-5). Layout follows the reference ``SAGate``
(charlesCXK/RGBD_Semantic_Segmentation_PyTorch, ``SA-Gate.nyu/net_util.py``) so its state-dict keys
(``fsp_rgb.filter.fc.{0,2}``, ``fsp_hha.filter.fc.{0,2}``, ``gate_rgb``, ``gate_hha``) map one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import reduced_channels
from .base import FusionResult, StageFusion


class FilterLayer(nn.Module):
    """SE-style channel filter: ``(B, C_in, h, w) -> (B, C_out, 1, 1)`` weights in (0, 1).

    ``sigmoid(fc(relu(fc(avgpool(x)))))`` with biased linear layers ``C_in -> C_out // r -> C_out``;
    the hidden width is ``out_planes // reduction`` as in the reference.
    """

    def __init__(self, in_planes: int, out_planes: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = reduced_channels("SAGateFusion", out_planes, reduction, "FilterLayer")
        self.out_planes = out_planes
        self.fc = nn.Sequential(
            nn.Linear(in_planes, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_planes),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.fc(x.mean(dim=(2, 3))).view(b, self.out_planes, 1, 1)


class FSP(nn.Module):
    """Feature separation part (Sec. 3.2): recalibrate ``main`` with channel-filtered ``guide``.

    ``out = main + FilterLayer([guide, main]) * guide``, all ``(B, C, h, w)``.
    """

    def __init__(self, in_planes: int, out_planes: int, reduction: int = 16) -> None:
        super().__init__()
        self.filter = FilterLayer(2 * in_planes, out_planes, reduction)

    def channel_weights(self, guide: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        """``(B, C, 1, 1)`` weights applied to ``guide``."""
        return self.filter(torch.cat([guide, main], dim=1))

    def forward(self, guide: torch.Tensor, main: torch.Tensor) -> torch.Tensor:
        return main + self.channel_weights(guide, main) * guide


class SAGateFusion(StageFusion):
    """Separation-and-aggregation gate for two streams (RGB first, then depth/HHA/thermal).

    1. Separation: each stream is recalibrated by the other (``FSP``).
    2. Aggregation: two 1x1 convs on the concatenated recalibrated features give one logit map
       per stream; a softmax over the two gives per-pixel gates ``g_rgb + g_x = 1``.
    3. ``fused = rgb * g_rgb + x * g_x`` (the merged feature that goes to the decoder), and each
       stream continues as ``relu((stream + fused) / 2)``.

    As in the reference code, the gates weight the *input* features, not the recalibrated ones
    (the recalibrated features only drive the gates).

    Args:
        channels: ``C`` of both inputs.
        num_modalities: must be 2.
        stage_index: accepted for a uniform constructor; the gate is the same at every stage.
        reduction: FilterLayer bottleneck ratio, 16 in the reference.

    Details:
        ``"gate"``: ``(B, 2, h, w)``, the softmax gates of RGB (channel 0) and the other stream.

    Example:
        >>> op = SAGateFusion(64, 2)
        >>> res = op([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)])
        >>> res.details["gate"].sum(1).allclose(torch.ones(2, 8, 8))
        True
    """

    max_modalities = 2
    feeds_back = True

    def __init__(
        self, channels: int, num_modalities: int, *, stage_index: int = 0, reduction: int = 16
    ) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        self.fsp_rgb = FSP(channels, channels, reduction)
        self.fsp_hha = FSP(channels, channels, reduction)
        self.gate_rgb = nn.Conv2d(2 * channels, 1, kernel_size=1, bias=True)
        self.gate_hha = nn.Conv2d(2 * channels, 1, kernel_size=1, bias=True)
        self.detail_channels = {"gate": 2}

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """Fuse ``[rgb, x]``, each ``(B, C, h, w)``.

        Returns:
            ``fused`` ``(B, C, h, w)``; ``streams`` the two fed-back streams ``(B, C, h, w)``;
            ``details["gate"]`` ``(B, 2, h, w)``.
        """
        self.check_features(features)
        rgb, hha = features
        rec_rgb = self.fsp_rgb(hha, rgb)  # RGB recalibrated by the other modality
        rec_hha = self.fsp_hha(rgb, hha)
        cat = torch.cat([rec_rgb, rec_hha], dim=1)
        gates = torch.softmax(torch.cat([self.gate_rgb(cat), self.gate_hha(cat)], dim=1), dim=1)
        fused = rgb * gates[:, 0:1] + hha * gates[:, 1:2]
        streams = [torch.relu((rgb + fused) / 2), torch.relu((hha + fused) / 2)]
        return FusionResult(fused=fused, streams=streams, details={"gate": gates})
