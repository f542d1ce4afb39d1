"""timm encoders that run whole or stage by stage.

Stages are picked by ``feature_info.reduction()`` (strides 4, 8, 16, 32) and their channels read
from ``feature_info.channels()``; nothing is typed by hand or guessed from a model name (STYLE 7).
Methods that feed fused features back into the streams (FuseNet, ESANet, SA-Gate, CMX) need to
run stage k, fuse, then run stage k+1 on the fused result, so the encoder also exposes each
stage as a separate call (:meth:`Encoder.forward_stage`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

STAGE_REDUCTIONS = (4, 8, 16, 32)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be loaded (offline with no cache, missing file, ...)."""


def _create_timm(name: str, in_chans: int, pretrained: bool, timm_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, in_chans=in_chans, **(timm_kwargs or {}))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
            raise ValueError(f"timm has no encoder {name!r}; similar names: {close}") from err
        if not pretrained:
            raise
        raise _weights_error(name, err) from err
    except Exception as err:  # hub errors: offline, no cache entry, HTTP, corrupt file
        if not pretrained:
            raise
        raise _weights_error(name, err) from err


def pretrained_timm_model(name: str) -> nn.Module:
    """timm's whole model ``name`` with its pretrained weights, for a published network that copies
    them layer by layer (FuseNet's and MLPD's VGG-16).

    Raises:
        PretrainedWeightsError: the weights are not in the huggingface-hub cache and cannot be fetched.
    """
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # hub errors: offline, no cache entry, HTTP, corrupt file
        raise _weights_error(name, err) from err


def _weights_error(name: str, err: Exception) -> PretrainedWeightsError:
    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - only used to enrich the message
        cfg = None
    source = (cfg.hf_hub_id or cfg.url) if cfg is not None else None
    return PretrainedWeightsError(
        f"could not load pretrained weights for timm encoder {name!r} (from {source or 'an unknown source'}): "
        f"{type(err).__name__}: {err}. If offline, put the weights in the huggingface-hub cache "
        "(HF_HOME) first, or pass pretrained=False."
    )


def average_mono_first_conv(module: nn.Module, rgb_channels: int = 3) -> nn.Conv2d:
    """Turn timm's summed 1-channel first-conv filters into the mean over the RGB filters.

    Returns:
        The convolution changed (the first ``Conv2d`` with one input channel).
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and layer.in_channels == 1:
            with torch.no_grad():
                layer.weight.div_(rgb_channels)
            return layer
    raise ValueError(f"{type(module).__name__} has no 1-channel first convolution to rescale")


class Encoder(nn.Module):
    """A timm ``features_only`` backbone cut into stages at strides 4, 8, 16, 32.

    Args:
        name: any timm model name with features at the required strides.
        in_chans: input channels (3 for RGB/HHA, 1 for depth/thermal). With pretrained weights,
            timm adapts the first convolution (for 1 channel it *sums* the RGB filters).
        pretrained: load timm's ImageNet weights through huggingface-hub's cache.
        with_stem: also expose the stride-2 stem as a stage named ``stem`` when the encoder has
            one (ResNets do, PVT does not; see :attr:`has_stem`).
        mono_init: how pretrained RGB first-conv filters become 1-channel filters: ``"sum"``
            (timm's rule, kept by ESANet) or ``"mean"`` (ACNet and FuseNet average them, so the
            depth response has the scale of one colour channel).
        timm_kwargs: extra arguments of the timm model's constructor (e.g. ``mlp_ratios`` and
            ``drop_path_rate``, which make timm's ``pvt_v2_b*`` SegFormer's MiT for CMX).

    Attributes:
        stage_names: ``["stem"?, "stage1", ..., "stage4"]``.
        channels: channels of each stage output, read from timm's ``feature_info``.
        reductions: stride of each stage output.
        stagewise: whether :meth:`forward_stage` is available (timm models built as a sequence
            of modules; a few models only expose features through ``forward_intermediates``).
    """

    def __init__(
        self,
        name: str,
        in_chans: int = 3,
        pretrained: bool = False,
        with_stem: bool = False,
        reductions: Sequence[int] = STAGE_REDUCTIONS,
        mono_init: str = "sum",
        timm_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mono_init not in ("sum", "mean"):
            raise ValueError(f"mono_init must be 'sum' or 'mean', got {mono_init!r}")
        self.name = name
        self.in_chans = in_chans
        body = _create_timm(name, in_chans, pretrained, timm_kwargs)
        if pretrained and in_chans == 1 and mono_init == "mean":
            average_mono_first_conv(body)
        info = body.feature_info
        available = list(info.reduction())
        missing = [r for r in reductions if r not in available]
        if missing:
            raise ValueError(
                f"timm encoder {name!r} has feature strides {available}, but fusionzoo needs "
                f"{list(reductions)} (missing {missing}); pick an encoder with all four"
            )
        wanted = list(reductions)
        self.has_stem = 2 in available
        if with_stem and self.has_stem:
            wanted = [2, *wanted]
        # The last feature at each stride is the deepest one (some nets emit two per stride).
        picked = [max(i for i, r in enumerate(available) if r == red) for red in wanted]
        self.channels = [int(info.channels()[i]) for i in picked]
        self.reductions = [int(available[i]) for i in picked]
        self.stage_names = (["stem"] if wanted[0] == 2 else []) + [f"stage{k + 1}" for k in range(len(reductions))]

        return_layers = getattr(body, "return_layers", None)
        self.stagewise = isinstance(body, nn.ModuleDict) and return_layers is not None
        if self.stagewise:
            # FeatureListNet / FeatureDictNet: a ModuleDict run in order; return_layers (in the
            # order of feature_info) names the module after which each feature is read.
            cut_after = [list(return_layers)[i] for i in picked]
            segments, current = [], []
            for module_name, module in body.items():
                current.append(module)
                if module_name in cut_after:
                    segments.append(nn.Sequential(*current))
                    current = []
                if len(segments) == len(cut_after):
                    break  # modules after the last stage (heads, final norms) are not used
            self.segments = nn.ModuleList(segments)
        else:
            self.body = body
            self._picked = picked

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    def forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage ``index`` (0-based over :attr:`stage_names`) on the previous stage's output
        (or the input image for index 0)."""
        if not self.stagewise:
            raise RuntimeError(
                f"timm encoder {self.name!r} cannot run stage by stage (timm exposes its features only "
                "through forward_intermediates); use a fusion method that does not feed features back, "
                "or another encoder"
            )
        return self.segments[index](x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All stage outputs, ``[(B, channels[i], H / reductions[i], W / reductions[i])]``."""
        if self.stagewise:
            feats = []
            for segment in self.segments:
                x = segment(x)
                feats.append(x)
            return feats
        all_feats = self.body(x)
        return [all_feats[i] for i in self._picked]
