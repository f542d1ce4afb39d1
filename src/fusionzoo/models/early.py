"""Early fusion: modalities meet at the input, one encoder sees them all."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..encoders import Encoder
from .base import FusionModel, register_family


class EarlyFusionModel(FusionModel):
    """Early fusion into one timm encoder, then a segmentation decoder.

    With ``stem_channels=None`` the modalities are concatenated along channels and the encoder
    takes ``sum(C_m)`` input channels (timm adapts pretrained first-conv weights). With
    ``stem_channels=c`` each modality first passes its own 3x3 conv-BN-ReLU stem to ``c``
    channels (taps ``{m}.stem``), and a 1x1 conv mixes the concatenation into 3 channels (tap
    ``fused.stem``), so an ImageNet-pretrained encoder keeps its RGB first layer unchanged.

    Taps: ``[{m}.stem, fused.stem,] fused.stage1..4, decoder.out, head.logits``.
    """

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
        stem_channels: int | None = None,
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        self.stems = None
        if stem_channels is not None:
            self.stems = nn.ModuleDict({
                m: nn.Sequential(nn.Conv2d(c, stem_channels, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(stem_channels), nn.ReLU())
                for m, c in self.in_chans.items()
            })
            for m in self.modalities:
                self.taps.declare(f"{m}.stem", stem_channels, 1)  # the modality's own stem: before fusion
            self.mix = nn.Conv2d(stem_channels * len(self.modalities), 3, 1)
            self.taps.declare("fused.stem", 3, 1, after_fusion=True)
            encoder_in = 3
        else:
            encoder_in = sum(self.in_chans.values())
        self.encoder = Encoder(encoder, in_chans=encoder_in, pretrained=pretrained)
        for stage, channels, reduction in zip(self.encoder.stage_names, self.encoder.channels, self.encoder.reductions):
            self.taps.declare(f"fused.{stage}", channels, reduction, after_fusion=True)  # one encoder sees all
        self.decoder = self.build_decoder(self.encoder.channels, decoder, decoder_channels, dropout)
        self.taps.declare("head.logits", num_classes, 4, "logits", after_fusion=True)

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The modality's own input stem (``stem_channels`` set, e.g. ``early_stem``); nothing for plain
        concatenation, whose only modality-owned weights are input-channel slices of the first
        convolution (see ``fusionzoo.interpret.callbacks.modality_owned_gradients``)."""
        yield from super().modality_parameters(modality)  # checks the name; no per-modality encoder here
        if self.stems is not None:
            yield from self.stems[modality].parameters()

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        if self.stems is not None:
            stems = [self.taps(f"{m}.stem", self.stems[m](xs[m])) for m in self.modalities]
            x = self.taps("fused.stem", self.mix(torch.cat(stems, dim=1)))
        else:
            x = torch.cat([xs[m] for m in self.modalities], dim=1)
        feats = [self.taps(f"fused.{stage}", f) for stage, f in zip(self.encoder.stage_names, self.encoder(x))]
        return self.taps("head.logits", self.decode(self.decoder, feats))


register_family(
    method="early_concat",
    model_cls=EarlyFusionModel,
    fusion="early",
    paper="Couprie et al., 'Indoor Semantic Segmentation using depth information', ICLR 2013 (RGB-D input concatenation)",
    fixed={"stem_channels": None},
)
register_family(
    method="early_stem",
    model_cls=EarlyFusionModel,
    fusion="early",
    paper="learned per-modality input stems mixed to 3 channels (fusionzoo baseline; cf. Hazirbas et al., ACCV 2016, early-fusion baseline)",
    defaults={"stem_channels": 16},
)
