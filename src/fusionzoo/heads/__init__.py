"""Segmentation decoders; every decoder maps stage features at strides 4..32 to an embedding at
stride 4 (:attr:`out_channels`, tap ``decoder.out``) and classifies it (tap ``head.logits``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .fpn import FPNDecoder
from .segformer import SegFormerDecoder, upsampled_projection

DECODERS: dict[str, type[nn.Module]] = {"segformer": SegFormerDecoder, "fpn": FPNDecoder}


def create_decoder(
    name: str, in_channels: Sequence[int], num_classes: int, channels: int | None = None, dropout: float = 0.1
) -> nn.Module:
    """Build a decoder by name (``"segformer"`` or ``"fpn"``).

    Raises:
        ValueError: unknown name, listing the known decoders.
    """
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(DECODERS)}")
    kwargs = {} if channels is None else {"channels": channels}
    return DECODERS[name](list(in_channels), num_classes, dropout=dropout, **kwargs)


__all__ = ["DECODERS", "FPNDecoder", "SegFormerDecoder", "create_decoder", "upsampled_projection"]
