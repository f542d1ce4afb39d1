"""Middle fusion: one encoder per modality, features fused at every stage by a
:class:`~fusionzoo.fusion.StageFusion` operator, one decoder on the fused features."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..encoders import Encoder
from ..fusion import FUSION_OPS
from ..fusion.base import FusionResult
from ..stream_memo import StreamMemo, stream_rows
from .base import FusionModel, register_family


class MiddleFusionModel(FusionModel):
    """Per-modality timm encoders run stage by stage; after each stage a fusion operator merges
    the streams, the fused feature goes to the decoder and, for methods that feed back (FuseNet,
    ESANet, SA-Gate, CMX), the operator's rectified streams enter the next encoder stage.

    Args:
        encoder: timm model name; every modality gets its own copy (weights not shared).
        fusion_op: key of ``fusionzoo.fusion.FUSION_OPS``.
        fuse_stem: also fuse after the stride-2 stem when the encoder has one (ESANet, ACNet).
        feedback: feed the operator's ``streams`` back into the encoders (the published design
            of feed-back methods); hybrid models switch it off to keep modality-specific streams.
        fusion_kwargs: extra keyword arguments for every stage's operator (e.g. CMX's
            ``{"preset": "resnet"}`` or ``{"num_heads": 4}``).
        mono_init: pretrained first-conv rule for 1-channel modalities (``"sum"`` as timm,
            ``"mean"`` as ACNet and FuseNet); see :class:`~fusionzoo.encoders.Encoder`.

    Taps, per stage: ``{m}.{stage}`` for every modality (encoder output before fusion),
    ``fused.{stage}`` and the operator's internals ``fused.{stage}.{detail}``; then
    ``decoder.out`` and ``head.logits``.
    """

    # set by fusionzoo.stream_memo.reusing_streams for interpretation's passes over a batch
    stream_memo: StreamMemo | None = None

    def __init__(
        self,
        encoder: str,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        decoder: str = "segformer",
        decoder_channels: int | None = None,
        dropout: float = 0.1,
        fusion_op: str = "crossattn",
        fuse_stem: bool = False,
        feedback: bool = True,
        fusion_kwargs: Mapping[str, Any] | None = None,
        mono_init: str = "sum",
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        if fusion_op not in FUSION_OPS:
            raise ValueError(f"unknown fusion_op {fusion_op!r}; choose one of {sorted(FUSION_OPS)}")
        op_cls = FUSION_OPS[fusion_op]
        if len(self.modalities) < 2:
            raise ValueError(f"middle fusion needs at least two modalities, got {self.modalities}")
        if op_cls.max_modalities is not None and len(self.modalities) != op_cls.max_modalities:
            raise ValueError(
                f"fusion {fusion_op!r} is defined for exactly {op_cls.max_modalities} modalities, got "
                f"{self.modalities}; use a generic method (crossattn, early_concat, late_*, hybrid_gate) for more"
            )
        self.encoders = nn.ModuleDict({
            m: self.make_encoder(m, encoder, pretrained=pretrained, with_stem=fuse_stem, mono_init=mono_init)
            for m in self.modalities
        })
        first = self.encoders[self.modalities[0]]
        self.stage_names = first.stage_names
        self.feedback = feedback and op_cls.feeds_back
        self.stagewise = all(e.stagewise for e in self.encoders.values())
        if self.feedback and not self.stagewise:
            raise ValueError(
                f"fusion {fusion_op!r} feeds fused features back into the encoders, which needs an encoder that "
                f"runs stage by stage; timm {encoder!r} does not"
            )
        self.decoder_stages = [s for s in self.stage_names if s != "stem"]
        offset = len(self.stage_names) - len(self.decoder_stages)
        self.fusion_kwargs = dict(fusion_kwargs or {})
        self.fusions = nn.ModuleDict()
        self._detail_names: dict[str, list[str]] = {}
        mixed: set[str] = set()  # modalities whose stream has taken in another modality's features
        for k, (stage, channels, reduction) in enumerate(zip(self.stage_names, first.channels, first.reductions)):
            for m in self.modalities:
                self.taps.declare(f"{m}.{stage}", channels, reduction, after_fusion=m in mixed)
            if not self.fuses_stage(stage):
                continue
            # The stem shares the first stage's hyper-parameters (stage_index 0).
            stage_index = max(k - offset, 0)
            op = op_cls(channels, len(self.modalities), stage_index=stage_index, **self.op_kwargs(first.channels[offset:]))
            self.fusions[stage] = op
            self.declare_fused_taps(stage, channels, reduction, op)
            if self.feedback:  # the next stage of these streams runs on the operator's mixed streams
                mixed.update(op.mixed_streams(self.modalities))
        self.stage_channels = [c for s, c in zip(self.stage_names, first.channels) if s != "stem"]
        self.pretrained = pretrained
        self.build_extra()
        self.build_head(decoder, decoder_channels, dropout)

    def build_head(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        """The task head over the fused stage features: here the segmentation decoder (+ late heads)
        and ``head.logits``; detection models (``fusionzoo.detection``) build an FPN + box head."""
        self.decoder = self.build_decoder(self.stage_channels, decoder, decoder_channels, dropout)
        self.build_late_heads(decoder, decoder_channels, dropout)
        self.taps.declare("head.logits", self.num_classes, 4, "logits", after_fusion=True)

    def declare_fused_taps(self, stage: str, channels: int, reduction: int, op: nn.Module) -> None:
        self.taps.declare(f"fused.{stage}", channels, reduction, after_fusion=True)
        global_details = getattr(op, "global_details", frozenset())
        self._detail_names[stage] = list(op.detail_channels)
        for detail, detail_channels in op.detail_channels.items():
            kind = detail if detail in ("gate", "attn") else "feature"
            self.taps.declare(f"fused.{stage}.{detail}", detail_channels, 0 if detail in global_details else reduction, kind,
                              after_fusion=True)

    def own_stream_mixed(self, modality: str) -> bool:
        """Whether ``modality``'s own stage features (the ``{m}.stage*`` taps that
        :meth:`forward_streams` returns per modality) already carry another modality's input: the
        ``after_fusion`` of a modality-specific head on them (hybrid models)."""
        info = self.taps.info()
        return any(info[f"{modality}.{s}"].after_fusion for s in self.decoder_stages)

    # Hooks for subclasses (CMX's presets, ACNet's merged branch, hybrid heads, detection).
    def make_encoder(self, modality: str, encoder: str, *, pretrained: bool, with_stem: bool, mono_init: str) -> Encoder:
        """The encoder of one modality's stream (a published network passes its backbone's settings or
        reshapes it, e.g. SA-Gate's dilated last stage, before the taps are declared from its
        ``channels`` and ``reductions``)."""
        return Encoder(encoder, in_chans=self.in_chans[modality], pretrained=pretrained, with_stem=with_stem, mono_init=mono_init)

    def fuses_stage(self, stage: str) -> bool:
        """Whether a fusion operator follows ``stage`` (all stages here; a detector whose FPN skips
        stride 4 leaves that stage unfused when the operator does not feed back)."""
        return True

    def op_kwargs(self, stage_channels: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments for every stage's fusion operator."""
        return self.fusion_kwargs

    def build_extra(self) -> None:
        pass

    def build_late_heads(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        pass

    def fuse_stage(self, stage: str, features: list[torch.Tensor]) -> FusionResult:
        """The operator of ``stage`` on the modalities' features (MIM's purification gates override
        this to tap each modality's mask and gated feature before the fusion)."""
        return self.fusions[stage](features)

    def merge(self, index: int, fused: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Combine the operator's output with the previous fused feature (ACNet's merged branch)."""
        return fused

    def merge_result(
        self, index: int, result: FusionResult, features: list[torch.Tensor], previous: torch.Tensor | None
    ) -> torch.Tensor:
        """The fused feature of stage ``index`` from the operator's result and the stage's inputs;
        by default :meth:`merge` of ``result.fused`` (a published network that sums its terms in
        another order overrides this to reproduce its arithmetic exactly)."""
        return self.merge(index, result.fused, previous)

    def forward_streams(
        self, xs: dict[str, torch.Tensor], include_stem: bool = False
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """Run encoders and fusion.

        Args:
            xs: checked inputs per modality.
            include_stem: also return the fused stride-2 stem feature first, when the stem is
                fused (ACNet's decoder uses it).

        Returns:
            The fused feature of each decoder stage (strides 4..32) and, per modality, its own
            encoder outputs at those stages (before fusion).
        """
        streams = [xs[m] for m in self.modalities]
        # Under reusing_streams (interpretation's repeated passes over a batch): each stream's
        # stage outputs for images it has already seen, while it runs on its own modality alone
        reuse = [stream_rows(self, m, xs[m]) for m in self.modalities]
        if not self.stagewise:  # no feedback: run each encoder whole, then fuse stage by stage
            per_modality = [r.stages(self.encoders[m], xs[m], len(self.stage_names)) for m, r in zip(self.modalities, reuse)]
        fused_feats: list[torch.Tensor] = []
        own: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        previous = None
        for k, stage in enumerate(self.stage_names):
            if self.stagewise:
                feats = [r.stage(k, functools.partial(self.encoders[m].forward_stage, k), s)
                         for m, s, r in zip(self.modalities, streams, reuse)]
            else:
                feats = [f[k] for f in per_modality]
            tapped = [self.taps(f"{m}.{stage}", f) for m, f in zip(self.modalities, feats)]
            for r, f, t in zip(reuse, feats, tapped):  # a tap listener may replace the feature
                r.goes_on_with(f, t)
            feats = tapped
            if stage not in self.fusions:  # unfused stage (see fuses_stage): streams go on as they are
                streams = feats
                if stage != "stem":
                    for m, f in zip(self.modalities, feats):
                        own[m].append(f)
                continue
            result = self.fuse_stage(stage, feats)
            fused = self.taps(f"fused.{stage}", self.merge_result(k, result, feats, previous))
            for detail in self._detail_names[stage]:
                self.taps(f"fused.{stage}.{detail}", result.details[detail])
            streams = result.streams if self.feedback and result.streams is not None else feats
            for r, s, f in zip(reuse, streams, feats):  # the operator may feed other modalities in
                r.goes_on_with(f, s)
            previous = fused
            if stage == "stem" and include_stem:
                fused_feats.append(fused)
            if stage != "stem":
                fused_feats.append(fused)
                for m, f in zip(self.modalities, feats):
                    own[m].append(f)
        return fused_feats, own

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        fused_feats, _ = self.forward_streams(xs)
        return self.taps("head.logits", self.decode(self.decoder, fused_feats))


PAPER_CROSSATTN = (
    "per-stage multi-head cross-attention between modality tokens with spatially reduced keys "
    "(PVT, Wang et al. ICCV 2021; cf. CMX's cross-attention, Zhang et al. T-ITS 2023)"
)
register_family(method="crossattn", model_cls=MiddleFusionModel, fusion="middle", paper=PAPER_CROSSATTN,
                fixed={"fusion_op": "crossattn", "fuse_stem": False, "feedback": False})
