"""MIM's Unimodal Purification Network (UPN) on dense feature maps.

Zeng, Mai, Yan, Hu, "Multimodal Reaction: Information Modulation for Cross-Modal Representation
Learning", IEEE Transactions on Multimedia 26, 2178-2191 (2023); code github.com/zengy268/MIM
(``modules/model.py``: ``HardConcrete``, ``MaskLearner``, ``Fusion``; ``train.py``: penalty weight
and optimisers). MIM holds that every modality carries "impurity" that misleads fusion, and
filters each modality with a learned, stochastic, binarised mask before fusing.

- :class:`HardConcrete`: the hard concrete gate of Louizos, Welling and Kingma ("Learning Sparse
  Neural Networks through L0 Regularization", ICLR 2018, Sec. 2.2, eqs. 10-12) with MIM's
  hyper-parameters (temperature ``beta = 1/3``, stretch ``gamma = -0.2``, ``zeta = 1.0``,
  location bias 3) and MIM's straight-through binarisation at 0.6. Its closed forms
  (:meth:`HardConcrete.exceed_probability`) give the expected L0 penalty and the probability of
  an exact zero, an exact one and a kept (binarised = 1) gate.
- :class:`PurificationGate`: MIM's ``MaskLearner`` for a ``(B, C, h, w)`` map: the gate logits
  of every position (``mask="spatial"``, one gate per position, as MIM gates every time step)
  or of every channel at every position (``mask="channel"``).
- :class:`PurificationFusion`: one gate per modality, then MIM's ``Fusion`` of the purified maps
  (``combine``: ``"add"``, ``"mul"`` or ``"concat"``).

What changed from sequences to dense maps is in ``docs/mim.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .base import FusionResult, StageFusion

__all__ = ["COMBINES", "MASKS", "HardConcrete", "PurificationFusion", "PurificationGate", "Purified"]

COMBINES = ("add", "mul", "concat")
MASKS = ("spatial", "channel")
U_EPS = 1e-6  # MIM draws u ~ U(1e-6, 1 - 1e-6): log(u) and log(1 - u) stay finite


class HardConcrete(nn.Module):
    """Hard concrete gate with straight-through binarisation (MIM's ``HardConcrete``).

    With ``log_alpha = logits + loc_bias`` and ``u ~ U(0, 1)``:
    ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretched to
    ``s * (zeta - gamma) + gamma`` and clipped to ``[0, 1]`` (Louizos et al. 2018, eqs. 10-11).
    Training returns ``1[z > threshold]`` forward with the gradient of ``z`` (straight-through,
    as MIM). Evaluation is deterministic (MIM samples at test time as well; we do not, so a
    trained model gives one answer and exports): the more probable value of the training-time
    binary gate, ``1[P(z > threshold) >= 0.5]``.

    Args:
        beta: temperature (MIM: 1/3, fixed).
        gamma, zeta: stretch interval ``(gamma, zeta)`` (MIM: -0.2, 1.0; with ``zeta = 1`` a gate
            is never exactly 1 before binarisation).
        loc_bias: added to the logits (MIM: 3), so a fresh gate keeps with probability
            ``sigmoid(3 - beta * log 2) = 0.94``.
        threshold: binarisation point (MIM: 0.6).

    Example:
        >>> hc = HardConcrete()
        >>> float(hc.nonzero_probability(torch.tensor(3.0)))  # sigmoid(3 - log(0.2) / 3)
        0.9718...
    """

    def __init__(self, beta: float = 1 / 3, gamma: float = -0.2, zeta: float = 1.0, loc_bias: float = 3.0,
                 threshold: float = 0.6) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"HardConcrete: beta (temperature) must be > 0, got {beta}")
        if not (gamma < 0 and zeta >= 1):
            raise ValueError(f"HardConcrete: needs gamma < 0 and zeta >= 1 (a stretch that reaches exact 0), "
                             f"got gamma={gamma}, zeta={zeta}")
        if not 0 < threshold < 1:
            raise ValueError(f"HardConcrete: threshold must be in (0, 1), got {threshold}")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.loc_bias, self.threshold = float(loc_bias), float(threshold)

    def extra_repr(self) -> str:
        return (f"beta={self.beta:.4g}, gamma={self.gamma}, zeta={self.zeta}, loc_bias={self.loc_bias}, "
                f"threshold={self.threshold}")

    def log_alpha(self, logits: torch.Tensor) -> torch.Tensor:
        """The concrete location ``log_alpha = logits + loc_bias``."""
        return logits + self.loc_bias

    def relaxed(self, log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Clipped stretched sample ``z`` in ``[0, 1]`` for uniform noise ``u`` (same shape)."""
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def exceed_probability(self, log_alpha: torch.Tensor, t: float) -> torch.Tensor:
        """``P(z > t)`` for ``t`` in ``[0, 1]`` (``t = 1``: ``P(z = 1)``), in closed form.

        ``z > t`` iff ``s > (t - gamma) / (zeta - gamma)``, and ``P(s > q) =
        sigmoid(log_alpha - beta * logit(q))``; so ``P(z != 0) = sigmoid(log_alpha - beta *
        log(-gamma / zeta))`` (Louizos et al. 2018, eq. 12: the expected L0 norm, MIM's penalty),
        ``P(z = 1) = sigmoid(log_alpha - beta * log((1 - gamma) / (zeta - 1)))`` (0 when
        ``zeta = 1``) and the keep probability of the binarised gate is ``t = threshold``.
        """
        if not 0 <= t <= 1:
            raise ValueError(f"t must be in [0, 1], got {t}")
        if t >= self.zeta:  # beyond the stretch: never reached
            return torch.zeros_like(log_alpha)
        return torch.sigmoid(log_alpha - self.beta * math.log((t - self.gamma) / (self.zeta - t)))

    def nonzero_probability(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """``P(z != 0)``: the expected L0 norm of each gate (differentiable in ``log_alpha``)."""
        return self.exceed_probability(log_alpha, 0.0)

    def keep_probability(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """``P(z > threshold)``: the probability that the binarised gate is 1 in training."""
        return self.exceed_probability(log_alpha, self.threshold)

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate logits (any shape) -> ``(mask, nonzero)``, both of the logits' shape: the binary mask
        (straight-through in training) and ``P(z != 0)`` (the L0 penalty's terms)."""
        log_alpha = self.log_alpha(logits)
        nonzero = self.nonzero_probability(log_alpha)
        if not self.training:
            return (self.keep_probability(log_alpha) >= 0.5).to(logits.dtype), nonzero
        u = torch.rand_like(log_alpha).clamp(U_EPS, 1.0 - U_EPS)
        z = self.relaxed(log_alpha, u)
        hard = (z > self.threshold).to(z.dtype)
        return z + (hard - z).detach(), nonzero


def _hidden(channels: int) -> int:
    # MIM's mask learner works at the model width d_l = 80 (bi-LSTM 2 x 40); a quarter of the
    # stage width, within [16, 128], keeps the gate cheap next to a 2048-channel ResNet stage.
    return min(max(channels // 4, 16), 128)


class PurificationGate(nn.Module):
    """Gate logits of one modality's map, then :class:`HardConcrete`.

    MIM's ``MaskLearner`` runs a bidirectional LSTM over the sequence (context), an MLP per time
    step (``pooler3``) and an MLP across the fixed 50 time steps (``imp_ratio``). Here: a 1x1 conv
    to ``hidden`` channels, a 3x3 conv (spatial context in place of the LSTM), ReLUs, and a 1x1
    conv to one logit per position (``mask="spatial"``) or one per channel and position
    (``mask="channel"``); the across-sequence MLP has no counterpart because a dense map has no
    fixed size.

    Args:
        channels: ``C`` of the map.
        mask: ``"spatial"`` (mask ``(B, 1, h, w)``) or ``"channel"`` (mask ``(B, C, h, w)``).
        **hard_concrete: :class:`HardConcrete` settings.
    """

    def __init__(self, channels: int, mask: str = "spatial", **hard_concrete: float) -> None:
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        hidden = _hidden(channels)
        self.mask = mask
        self.logits = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1 if mask == "spatial" else channels, 1),
        )
        self.concrete = HardConcrete(**hard_concrete)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, h, w)`` -> mask and ``P(gate != 0)``, each ``(B, 1, h, w)`` or ``(B, C, h, w)``."""
        return self.concrete(self.logits(x))


class Purified(NamedTuple):
    """One modality after its gate: ``mask`` ``(B, 1 | C, h, w)`` in {0, 1} (straight-through in
    training), ``feature = x * mask`` ``(B, C, h, w)``, ``nonzero`` = ``P(gate != 0)`` like ``mask``."""

    mask: torch.Tensor
    feature: torch.Tensor
    nonzero: torch.Tensor


class PurificationFusion(StageFusion):
    """MIM at one stage: purify every modality with its own gate, then fuse (MIM's ``Fusion``).

    ``combine``: ``"add"`` (``sum_m x_m``), ``"mul"`` (``tanh(conv1x1(prod_m x_m))``, MIM's
    default ``multiplication``) or ``"concat"`` (``tanh(conv1x1([x_1, ..., x_M]))``); MIM's
    linear layers on pooled vectors become 1x1 convolutions. The streams are not fed back.

    A model that taps the masks calls :meth:`purify` and :meth:`combine` itself
    (:class:`fusionzoo.models.mim.PurificationMixin`); ``forward`` is both in one call. The L0
    penalty is the mean of the :attr:`Purified.nonzero` maps; the model collects it.

    Args:
        channels: ``C`` of every input.
        num_modalities: ``M >= 2``.
        stage_index: accepted for a uniform constructor; unused.
        combine: ``"add"``, ``"mul"`` or ``"concat"``.
        mask: ``"spatial"`` or ``"channel"`` (:class:`PurificationGate`).
        beta, gamma, zeta, loc_bias, threshold: :class:`HardConcrete` (MIM's values by default).

    Example:
        >>> op = PurificationFusion(16, 2, combine="mul").eval()
        >>> op([torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)]).fused.shape
        torch.Size([1, 16, 4, 4])
    """

    feeds_back = False

    def __init__(self, channels: int, num_modalities: int, *, stage_index: int = 0, combine: str = "mul",
                 mask: str = "spatial", beta: float = 1 / 3, gamma: float = -0.2, zeta: float = 1.0,
                 loc_bias: float = 3.0, threshold: float = 0.6) -> None:
        super().__init__(channels, num_modalities, stage_index=stage_index)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.combine_mode = combine
        hard_concrete = {"beta": beta, "gamma": gamma, "zeta": zeta, "loc_bias": loc_bias, "threshold": threshold}
        self.gates = nn.ModuleList(PurificationGate(channels, mask, **hard_concrete) for _ in range(num_modalities))
        self.mask_channels = 1 if mask == "spatial" else channels
        if combine != "add":
            self.proj = nn.Conv2d((num_modalities if combine == "concat" else 1) * channels, channels, 1)
        self.detail_channels: dict[str, int] = {}

    def purify(self, features: Sequence[torch.Tensor]) -> list[Purified]:
        """Gate every modality's ``(B, C, h, w)`` map (modality order)."""
        self.check_features(list(features))
        out = []
        for gate, x in zip(self.gates, features):
            mask, nonzero = gate(x)
            out.append(Purified(mask, x * mask, nonzero))
        return out

    def combine(self, purified: Sequence[torch.Tensor]) -> torch.Tensor:
        """MIM's fusion of the purified ``(B, C, h, w)`` maps."""
        if self.combine_mode == "concat":
            return torch.tanh(self.proj(torch.cat(list(purified), dim=1)))
        fused = purified[0]
        for x in purified[1:]:
            fused = fused * x if self.combine_mode == "mul" else fused + x
        return torch.tanh(self.proj(fused)) if self.combine_mode == "mul" else fused

    def forward(self, features: list[torch.Tensor]) -> FusionResult:
        """``M`` tensors ``(B, C, h, w)`` -> ``fused`` ``(B, C, h, w)``."""
        return FusionResult(fused=self.combine([p.feature for p in self.purify(features)]))
