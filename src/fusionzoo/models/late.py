"""Late fusion: one full network per modality; their predictions are fused."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..encoders import Encoder
from ..stream_memo import StreamMemo, stream_rows
from .base import FusionModel, register_family

LATE_RULES = ("mean", "weighted", "gate")


def decision_weights(scores: torch.Tensor, present: Sequence[bool]) -> torch.Tensor:
    """Softmax over predictions of unnormalized scores, absent predictions given weight 0.

    Args:
        scores: ``(P, 1, 1, 1)`` for a mean, ``(P, K, 1, 1)`` for per-class weights,
            ``(B, P, 1, h, w)`` for per-pixel gates.
        present: which of the ``P`` predictions may take part (missing modalities may not).

    Returns:
        Weights of the same shape, summing to 1 over ``P`` (dim 0, or dim 1 for gates).
    """
    dim = 1 if scores.dim() == 5 else 0
    shape = [1] * scores.dim()
    shape[dim] = len(present)
    mask = torch.tensor(present, device=scores.device).view(shape)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=dim)


def decision_fusion(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of ``P`` predictions ``(B, K, h, w)`` with weights from :func:`decision_weights`."""
    stacked = torch.stack(list(logits), dim=1)  # (B, P, K, h, w)
    return (weights * stacked).sum(dim=1)


class LateFusionModel(FusionModel):
    """One encoder + decoder per modality; per-modality logits (taps ``{m}.head``) are fused by

    - ``"mean"``: the average of the modalities' logits;
    - ``"weighted"``: learned per-class modality weights, softmax over modalities per class
      (parameter ``class_weights`` of shape ``(M, K)``, initialized to the mean);
    - ``"gate"``: per-pixel confidence gates: a 1x1 conv over the concatenated decoder
      embeddings predicts one score per modality and pixel, softmax over modalities (tap
      ``head.gate``: the weights, ``M`` channels summing to 1 per pixel).

    Missing modalities are excluded from the fusion (weight 0, the others renormalized).

    Taps: ``{m}.stage1..4`` and ``{m}.head`` for every modality, ``[head.gate,] head.logits``.
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
        rule: str = "mean",
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        if rule not in LATE_RULES:
            raise ValueError(f"unknown late-fusion rule {rule!r}; choose one of {LATE_RULES}")
        self.rule = rule
        self.encoders = nn.ModuleDict()
        self.decoders = nn.ModuleDict()
        for m in self.modalities:
            enc = Encoder(encoder, in_chans=self.in_chans[m], pretrained=pretrained)
            self.encoders[m] = enc
            for stage, channels, reduction in zip(enc.stage_names, enc.channels, enc.reductions):
                self.taps.declare(f"{m}.{stage}", channels, reduction)  # one network per modality: before fusion
            self.decoders[m] = self.build_decoder(enc.channels, decoder, decoder_channels, dropout, tapped=False)
            self.taps.declare(f"{m}.head", num_classes, 4, "logits")
        num = len(self.modalities)
        if rule == "weighted":
            self.class_weights = nn.Parameter(torch.zeros(num, num_classes))
        if rule == "gate":
            embed = self.decoders[self.modalities[0]].out_channels
            self.gate = nn.Conv2d(embed * num, num, 1)
            self.taps.declare("head.gate", num, 4, "gate", after_fusion=True)  # from every modality's embedding
        self.taps.declare("head.logits", num_classes, 4, "logits", after_fusion=True)

    def modality_parameters(self, modality: str):
        """The modality's encoder and decoder."""
        yield from super().modality_parameters(modality)
        yield from self.decoders[modality].parameters()

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        logits, embeddings = [], []
        for m in self.modalities:
            # stages 0..S-1 the encoder's, S the decoder's embedding, S + 1 the logits; under
            # reusing_streams (interpretation's passes) each computed only for images not seen before
            enc, dec = self.encoders[m], self.decoders[m]
            rows, count = stream_rows(self, m, xs[m]), enc.num_stages
            raw = rows.stages(enc, xs[m], count)
            feats = [self.taps(f"{m}.{s}", f) for s, f in zip(enc.stage_names, raw)]
            for f, t in zip(raw, feats):  # a tap listener may replace a feature
                rows.goes_on_with(f, t)
            embedding = rows.stage(count, dec, feats)
            logits.append(self.taps(f"{m}.head", rows.stage(count + 1, dec.classify, embedding)))
            embeddings.append(embedding)
        present = [m not in missing for m in self.modalities]
        if self.rule == "mean":
            weights = decision_weights(logits[0].new_zeros(len(logits), 1, 1, 1), present)
        elif self.rule == "weighted":
            weights = decision_weights(self.class_weights[:, :, None, None], present)
        else:
            scores = self.gate(torch.cat(embeddings, dim=1)).unsqueeze(2)  # (B, M, 1, h, w)
            weights = self.taps("head.gate", decision_weights(scores, present).squeeze(2)).unsqueeze(2)
        return self.taps("head.logits", decision_fusion(logits, weights))


_PAPER_LATE = "late (decision-level) fusion of per-modality networks, cf. Valada et al., 'AdapNet', ICRA 2017"
register_family(method="late_mean", model_cls=LateFusionModel, fusion="late", fixed={"rule": "mean"},
                paper=_PAPER_LATE + " (mean of logits)")
register_family(method="late_weighted", model_cls=LateFusionModel, fusion="late", fixed={"rule": "weighted"},
                paper=_PAPER_LATE + " (learned per-class weights)")
register_family(method="late_gate", model_cls=LateFusionModel, fusion="late", fixed={"rule": "gate"},
                paper="Valada et al., 'Deep Multispectral Semantic Scene Understanding of Forested Environments "
                      "using Multimodal Fusion', ISER 2016 / AdapNet ICRA 2017 (per-pixel convoluted mixture of experts gates)")
