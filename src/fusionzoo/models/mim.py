"""MIM's Unimodal Purification Network as a fusion family (Zeng, Mai, Yan, Hu, "Multimodal Reaction:
Information Modulation for Cross-Modal Representation Learning", IEEE TMM 26, 2178-2191, 2023;
code github.com/zengy268/MIM).

Every modality's encoder stage output passes a learned, stochastic, binarised mask (hard concrete
gates, :class:`~fusionzoo.fusion.purification.HardConcrete`) before the stage's features are fused
by addition, multiplication or concatenation (:class:`~fusionzoo.fusion.purification.PurificationFusion`);
the expected L0 norm of the gates is a training penalty (weight 0.1 in MIM), and the gate
parameters get their own optimiser parameter group (MIM trains them with their own optimiser).
MIM gates sequences of a sentiment model (text, audio, video); here the gates sit over the
positions (or channels) of dense maps of any timm encoder. ``docs/mim.md`` says what changed.

Entries: ``mim_add``, ``mim_mul``, ``mim_concat`` (segmentation, any timm encoder) and named
variants; detectors ``{fcos,retinanet}_mim_{add,mul,concat}`` in :mod:`fusionzoo.detection.models`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..fusion.base import FusionResult
from ..fusion.purification import COMBINES, MASKS, PurificationFusion

__all__ = ["COMBINES", "GATE_PENALTY_WEIGHT", "PAPER", "MIMModel", "PurificationMixin"]
from .base import register_family
from .middle import MiddleFusionModel

PAPER = ("Zeng, Mai, Yan, Hu, 'Multimodal Reaction: Information Modulation for Cross-Modal Representation "
         "Learning' (MIM), IEEE TMM 2023: Unimodal Purification Network")
GATE_PENALTY_WEIGHT = 0.1  # MIM train.py: p_w = 0.1


class PurificationMixin:
    """MIM's purification on a middle-fusion model (segmentation :class:`MIMModel` and the
    detector ``fusionzoo.detection.models.PurificationDetector``). Mixed in before the model class.

    Args:
        combine: MIM's fusion of the purified maps: ``"add"``, ``"mul"`` or ``"concat"``.
        mask: ``"spatial"``: one gate per position, tap ``{m}.stageN.gate`` of shape
            ``(B, 1, h, w)``; ``"channel"``: one gate per channel and position, ``(B, C, h, w)``.
        gate_penalty_weight: the training loss adds ``gate_penalty_weight * gate_penalty()``
            (MIM: 0.1); the task's ``gate_penalty_weight`` (train.py ``--gate-penalty-weight``)
            overrides it.
        beta, gamma, zeta, loc_bias, threshold: the hard concrete gates (MIM's values).
        fusion_op, feedback: fixed (``"mim"``, no feedback: MIM purifies each modality on its own).
        fusion_kwargs: must leave these to the keywords above (refused otherwise).
        **kwargs: the model class's own keywords (encoder, decoder or detection head, ...).

    Taps, per fused stage, after the encoders' ``{m}.stageN``: for every modality
    ``{m}.stageN.gate`` (kind ``gate``: the binary mask in {0, 1}, sampled in training,
    deterministic in eval) and ``{m}.stageN.purified`` (``{m}.stageN * mask``), then
    ``fused.stageN``. The gate depends on its own modality only (no feedback), so these taps are
    not ``after_fusion``.
    """

    fusions: nn.ModuleDict

    def __init__(self, encoder: str, *, combine: str = "mul", mask: str = "spatial",
                 gate_penalty_weight: float = GATE_PENALTY_WEIGHT, beta: float = 1 / 3, gamma: float = -0.2,
                 zeta: float = 1.0, loc_bias: float = 3.0, threshold: float = 0.6,
                 fusion_op: str = "mim", feedback: bool = False, fusion_kwargs: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if fusion_op != "mim" or feedback:
            raise ValueError(f"MIM purifies with fusion_op='mim' and no feedback, got fusion_op={fusion_op!r}, "
                             f"feedback={feedback!r}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        if not gate_penalty_weight >= 0:
            raise ValueError(f"gate_penalty_weight must be >= 0, got {gate_penalty_weight}")
        if fusion_kwargs:
            raise ValueError(f"fusion_kwargs={dict(fusion_kwargs)!r}: set MIM's gates with the keywords combine, "
                             "mask, beta, gamma, zeta, loc_bias, threshold")
        self.gate_penalty_weight = float(gate_penalty_weight)
        self.mask_mode = mask
        op = {"combine": combine, "mask": mask, "beta": beta, "gamma": gamma, "zeta": zeta, "loc_bias": loc_bias,
              "threshold": threshold}
        self._nonzero: list[tuple[str, torch.Tensor]] = []
        super().__init__(encoder, fusion_op=fusion_op, feedback=feedback, fusion_kwargs=op, **kwargs)  # type: ignore[call-arg]

    def declare_fused_taps(self, stage: str, channels: int, reduction: int, op: nn.Module) -> None:
        info = self.taps.info()
        for m in self.modalities:
            mixed = info[f"{m}.{stage}"].after_fusion
            self.taps.declare(f"{m}.{stage}.gate", op.mask_channels, reduction, "gate", after_fusion=mixed)
            self.taps.declare(f"{m}.{stage}.purified", channels, reduction, after_fusion=mixed)
        super().declare_fused_taps(stage, channels, reduction, op)  # type: ignore[misc]

    def forward_streams(self, xs: dict[str, torch.Tensor], include_stem: bool = False) -> Any:
        self._nonzero = []  # this forward's P(gate != 0) maps, filled by fuse_stage
        return super().forward_streams(xs, include_stem)  # type: ignore[misc]

    def fuse_stage(self, stage: str, features: list[torch.Tensor]) -> FusionResult:
        op: PurificationFusion = self.fusions[stage]
        purified = []
        for m, part in zip(self.modalities, op.purify(features)):
            self.taps(f"{m}.{stage}.gate", part.mask)
            purified.append(self.taps(f"{m}.{stage}.purified", part.feature))
            self._nonzero.append((m, part.nonzero))
        return FusionResult(fused=op.combine(purified))

    def gate_penalty(self) -> torch.Tensor:
        """MIM's L0 penalty of the last forward pass: per modality, the mean over its gates (every
        fused stage, position and, for ``mask="channel"``, channel) of ``P(gate != 0)`` (the
        expected L0 norm, Louizos et al. 2018 eq. 12), summed over modalities as MIM sums its
        three ``penalty_l + penalty_a + penalty_v``. Differentiable in the gate parameters; the
        training loss adds it times :attr:`gate_penalty_weight`.

        Raises:
            RuntimeError: no forward pass ran yet.
        """
        if not self._nonzero:
            raise RuntimeError("gate_penalty() reads the gates of the last forward pass; run the model first")
        total = None
        for m in self.modalities:
            maps = [p for name, p in self._nonzero if name == m]
            term = torch.stack([p.float().mean() for p in maps]).mean()
            total = term if total is None else total + term
        return total

    def gate_parameters(self) -> Iterator[nn.Parameter]:
        """The purification gates' parameters (MIM's ``optimizer_UPN``), for their own optimiser
        group (``fusionzoo.engine.optim.build_optimizer``: own learning rate, no weight decay)."""
        for op in self.fusions.values():
            yield from op.gates.parameters()


class MIMModel(PurificationMixin, MiddleFusionModel):
    """Per-modality timm encoders; after every stage each modality's map is purified by its hard
    concrete mask and the purified maps are fused (add / mul / concat), then one decoder.
    See :class:`PurificationMixin` for the keywords and taps."""


for _combine in COMBINES:
    register_family(method=f"mim_{_combine}", model_cls=MIMModel, fusion="middle", paper=PAPER,
                    fixed={"combine": _combine, "fusion_op": "mim", "feedback": False, "fuse_stem": False})
