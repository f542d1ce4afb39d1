"""Hybrid fusion: stage-wise fusion in the encoders plus late decision fusion of modality-specific
heads, so a model can fall back on one modality's own prediction where fusion hurts."""

from __future__ import annotations

import torch
from torch import nn

from .base import register_family
from .late import decision_fusion, decision_weights
from .middle import MiddleFusionModel


class HybridFusionModel(MiddleFusionModel):
    """Middle fusion (modality streams kept separate, fused per stage) with a fused decoder, plus
    one decoder per modality on its own stage features; the ``1 + M`` predictions (taps
    ``fused.head``, ``{m}.head``) are combined by per-pixel softmax gates predicted from the
    concatenated decoder embeddings (tap ``head.gate``: the weights, ``1 + M`` channels summing
    to 1 per pixel), in the spirit of
    the per-modality experts of Valada et al. (AdapNet, ICRA 2017) on top of ESANet-style
    squeeze-excitation fusion (Seichter et al., ICRA 2021) generalized to any number of streams.

    Missing modalities: their own prediction is excluded from the gate; the fused prediction stays.
    """

    def build_late_heads(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        self.taps.declare("fused.head", self.num_classes, 4, "logits", after_fusion=True)
        self.decoders = nn.ModuleDict()
        for m in self.modalities:
            self.decoders[m] = self.build_decoder(self.stage_channels, decoder, decoder_channels, dropout, tapped=False)
            self.taps.declare(f"{m}.head", self.num_classes, 4, "logits", after_fusion=self.own_stream_mixed(m))
        embed = self.decoder.out_channels
        self.gate = nn.Conv2d(embed * (1 + len(self.modalities)), 1 + len(self.modalities), 1)
        self.taps.declare("head.gate", 1 + len(self.modalities), 4, "gate", after_fusion=True)

    def modality_parameters(self, modality: str):
        """The modality's encoder and its own decoder."""
        yield from super().modality_parameters(modality)
        yield from self.decoders[modality].parameters()

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        fused_feats, own = self.forward_streams(xs)
        embedding = self.taps("decoder.out", self.decoder(fused_feats))
        logits = [self.taps("fused.head", self.decoder.classify(embedding))]
        embeddings = [embedding]
        for m in self.modalities:
            e = self.decoders[m](own[m])
            embeddings.append(e)
            logits.append(self.taps(f"{m}.head", self.decoders[m].classify(e)))
        scores = self.gate(torch.cat(embeddings, dim=1)).unsqueeze(2)  # (B, 1 + M, 1, h, w)
        present = [True] + [m not in missing for m in self.modalities]
        weights = self.taps("head.gate", decision_weights(scores, present).squeeze(2)).unsqueeze(2)
        return self.taps("head.logits", decision_fusion(logits, weights))


register_family(
    method="hybrid_gate",
    model_cls=HybridFusionModel,
    fusion="hybrid",
    paper="stage-wise SE fusion (Seichter et al., ICRA 2021) + per-pixel gated decision fusion of modality experts "
          "(Valada et al., AdapNet, ICRA 2017)",
    fixed={"fusion_op": "se_add", "fuse_stem": False, "feedback": False},
)
