"""SA-Gate, the published network (Chen, Lin, Wang, Zeng, Cheng, Yuan, "Bi-directional Cross-Modality
Feature Propagation with Separation-and-Aggregation Gate for RGB-D Semantic Segmentation", ECCV
2020; reference code github charlesCXK/RGBD_Semantic_Segmentation_PyTorch, ``model/SA-Gate.nyu``).

Encoder: two ResNet-50/101 branches with the wide deep stem (three 3x3 convs, 64-64-128, as
timm's ``resnet50s`` / ``resnet101s``), the last stage dilated for output stride 16 with
DeepLabV3's multi-grid (dilations 2, 4, 8 over its three blocks). After each of the four stages
the separation-and-aggregation gate (``fusionzoo.fusion.SAGateFusion``, the authors' module)
merges the streams and feeds ``relu((x + merged) / 2)`` back into both. The reference's
``DualBottleneck`` gives both branches one shared ``downsample`` module per stage (its
``hha_downsample`` is the same object), so the shortcut projections are shared here as well
(:class:`SharedProjection`).

Decoder: DeepLabV3+ on the merged features: ASPP (rates 6, 12, 18, image pooling, LeakyReLU) on
the stride-16 merge, upsampled (bilinear, corners aligned) to the stride-4 merge reduced to 48
channels, two 3x3 conv-BN-ReLU, Dropout2d 0.1, a 1x1 classifier, bilinear upsampling (corners
aligned) to the input.

Auxiliary output (deep supervision): the reference's FCN auxiliary head on the stride-16 merge
(``auxlayer``: 3x3 conv 2048->512, BN, ReLU, dropout 0.1, 1x1 classifier), which its training loss
weighs 0.2 after upsampling the logits to the label (bilinear, corners aligned). It runs in
training mode only, after the main head (so dropout draws in the reference's order):
``model.side_logits`` then holds its stride-16 logits, which ``fusionzoo.losses.segmentation_loss``
supervises (the card's ``side_loss_weights: [0.2]``); ``model(inputs)`` returns the main output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..._registry import register_model
from ...encoders import Encoder
from ..base import entry_config
from ..convert import ConversionError, build_or_load, register_converter, rename_keys
from ..middle import MiddleFusionModel

__all__ = ["ASPP", "DeepLabV3PlusHead", "FCNHead", "SAGateDeepLab", "dilate_last_stage", "sagate_r50", "sagate_r101"]

REFERENCE_REPO = "https://github.com/charlesCXK/RGBD_Semantic_Segmentation_PyTorch"
REFERENCE_COMMIT = "32b3f86822d278103a13ea6f93f9668d3b631398"
PAPER = (
    "Chen, Lin, Wang, Zeng, Cheng, Yuan, 'Bi-directional Cross-Modality Feature Propagation with "
    "Separation-and-Aggregation Gate for RGB-D Semantic Segmentation', ECCV 2020"
)
MULTI_GRID = (2, 4, 8)  # DeepLabV3 (Chen et al. 2017) multi-grid (1, 2, 4) at rate 2, one per last-stage block


def dilate_last_stage(encoder: Encoder, rates: Sequence[int] = MULTI_GRID) -> None:
    """Turn the last ResNet stage's stride into dilation (output stride 32 -> 16), block ``i``
    getting dilation ``rates[i]`` in its 3x3 convs; updates ``encoder.reductions``.

    Raises:
        ValueError: the last stage does not have ``len(rates)`` blocks.
    """
    stage = encoder.segments[-1][-1]  # the timm ``layer4`` Sequential of bottlenecks
    if len(stage) != len(rates):
        raise ValueError(f"{encoder.name}'s last stage has {len(stage)} blocks; multi-grid rates {tuple(rates)} need {len(rates)}")
    for block, rate in zip(stage, rates):
        for conv in block.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            if conv.stride == (2, 2):
                conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                conv.dilation, conv.padding = (rate, rate), (rate, rate)
    encoder.reductions[-1] //= 2


class ASPP(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling as SA-Gate builds it: four branches (1x1 and three
    dilated 3x3 convs) concatenated, one BN + LeakyReLU, a 1x1 reduction; plus image pooling
    (mean -> 1x1 conv -> BN -> LeakyReLU -> 1x1 conv) added everywhere; then BN + LeakyReLU.

    ``(B, C_in, h, w) -> (B, C_out, h, w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (6, 12, 18), hidden: int = 256) -> None:
        super().__init__()
        self.map_convs = nn.ModuleList([
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            *(nn.Conv2d(in_channels, hidden, 3, padding=r, dilation=r, bias=False) for r in rates),
        ])
        self.map_bn = nn.BatchNorm2d(hidden * (len(rates) + 1))
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.global_pooling_bn = nn.BatchNorm2d(hidden)
        self.red_conv = nn.Conv2d(hidden * (len(rates) + 1), out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(out_channels)
        self.leak_relu = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.red_conv(self.leak_relu(self.map_bn(torch.cat([m(x) for m in self.map_convs], dim=1))))
        pool = x.mean(dim=(2, 3), keepdim=True)  # (B, C_in, 1, 1), broadcast over (h, w) below
        pool = self.pool_red_conv(self.leak_relu(self.global_pooling_bn(self.global_pooling_conv(pool))))
        return self.leak_relu(self.red_bn(out + pool))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder over a low-level (stride 4) and a high-level (stride 16) feature.

    Returns (forward): the 256-channel stride-4 embedding (after Dropout2d 0.1) that the 1x1
    classifier reads.
    """

    def __init__(self, low_channels: int, high_channels: int) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, 256)
        self.reduce = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.last_conv = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Dropout2d(0.1),
        )
        self.out_channels = 256

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.aspp(high)
        low = self.reduce(low)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat([x, low], dim=1))


class FCNHead(nn.Module):
    """The reference's FCN auxiliary head: 3x3 conv (no bias) to ``C_in // 4``, BN, ReLU, dropout
    0.1 (element-wise), 1x1 classifier with bias; ``block`` keeps the reference's indices."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        inter = in_channels // 4
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False), nn.BatchNorm2d(inter), nn.ReLU(),
            nn.Dropout(0.1), nn.Conv2d(inter, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class SharedProjection(nn.Module):
    """Calls a module registered elsewhere in the model, without registering it here: its
    parameters appear once in ``parameters()`` and ``state_dict()`` (safetensors refuses tensors
    stored under two names), and ``.to()`` moves them through their owner."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self._target = [target]  # a list, so nn.Module does not register it as a child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._target[0](x)


class SAGateDeepLab(MiddleFusionModel):
    """SA-Gate with a ResNet-50/101 (deep stem, output stride 16) and DeepLabV3+; see the module
    docstring.

    Args:
        depth: 50 or 101.
        num_classes: ``K`` (40 for NYUDv2).
        modalities: RGB first, then HHA as published (or depth / thermal).
        in_chans: per-modality channel overrides.
        pretrained: ImageNet weights of timm ``resnet{depth}s.gluon_in1k`` in both branches (the
            reference loads TorchSeg's ``resnet101_v1c.pth``, same architecture).

    Taps: ``{m}.stage1..4`` (strides 4, 8, 16, 16), ``fused.stage1..4`` and ``fused.*.gate``,
    ``decoder.out`` (256 channels, stride 4) and ``head.logits`` (stride 4).
    """

    # Deep supervision (engine.builders.check_side_loss, fusionzoo.losses): the auxiliary head's
    # stride, and how the reference meets it with the label (logits upsampled bilinearly).
    side_strides = (16,)
    side_logits_resize = "bilinear"

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "hha"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
    ) -> None:
        if depth not in (50, 101):
            raise ValueError(f"SA-Gate is published on ResNet-50 and ResNet-101; got depth {depth}")
        super().__init__(
            f"resnet{depth}s.gluon_in1k", num_classes=num_classes, modalities=modalities, in_chans=in_chans,
            pretrained=pretrained, fusion_op="sagate", fuse_stem=False, feedback=True,
        )

    def make_encoder(self, modality: str, encoder: str, *, pretrained: bool, with_stem: bool, mono_init: str) -> Encoder:
        built = super().make_encoder(modality, encoder, pretrained=pretrained, with_stem=with_stem, mono_init=mono_init)
        dilate_last_stage(built)
        return built

    def build_extra(self) -> None:
        # The reference's two streams share each stage's shortcut projection (see module docstring):
        # the auxiliary stream calls the RGB stream's, which alone holds the parameters.
        rgb, aux = (self.encoders[m] for m in self.modalities)
        for mine, theirs in zip(rgb.segments, aux.segments):
            for block_rgb, block_aux in zip(mine[-1], theirs[-1]):
                if block_rgb.downsample is not None:
                    block_aux.downsample = SharedProjection(block_rgb.downsample)

    def build_head(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        self.decoder = DeepLabV3PlusHead(self.stage_channels[0], self.stage_channels[-1])
        self.taps.declare("decoder.out", self.decoder.out_channels, 4, after_fusion=True)
        self.head = nn.Conv2d(self.decoder.out_channels, self.num_classes, 1)
        self.taps.declare("head.logits", self.num_classes, 4, "logits", after_fusion=True)
        self.auxlayer = FCNHead(self.stage_channels[-1], self.num_classes)
        self.side_logits: tuple[torch.Tensor, ...] = ()  # set by every forward (training mode: 1 tensor)

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        fused, _ = self.forward_streams(xs)  # merges at strides 4, 8, 16, 16
        embedding = self.taps("decoder.out", self.decoder(fused[0], fused[-1]))
        logits = self.taps("head.logits", self.head(embedding))
        # After the main head, as in the reference (its dropout draws come second).
        self.side_logits = (self.auxlayer(fused[-1]),) if self.training else ()
        # The reference upsamples with aligned corners; FusionModel.forward's resize is then a no-op.
        size = next(iter(xs.values())).shape[-2:]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _entry(name: str, depth: int, pretrained: bool | str, kwargs: Mapping[str, object]) -> nn.Module:
    def build() -> SAGateDeepLab:
        model = SAGateDeepLab(depth, pretrained=bool(pretrained), **kwargs)  # type: ignore[arg-type]
        model.config = entry_config(name, kwargs)
        model.encoder_name = f"resnet{depth}s.gluon_in1k"
        return model

    return build_or_load(name, pretrained, build)


_META = {
    "task": "segmentation", "fusion": "middle", "method": "sagate", "paper": PAPER, "modalities": ("rgb", "hha"),
    "max_modalities": 2, "accepts": ("num_classes", "modalities", "in_chans", "pretrained"),
    "published": True, "reference_repo": REFERENCE_REPO, "reference_commit": REFERENCE_COMMIT,
}


@register_model(encoder="r50", **_META)
def sagate_r50(pretrained: bool | str = False, **kwargs: object) -> nn.Module:
    """SA-Gate on ResNet-50 (deep stem, output stride 16) with DeepLabV3+."""
    return _entry("sagate_r50", 50, pretrained, kwargs)


@register_model(encoder="r101", **_META)
def sagate_r101(pretrained: bool | str = False, **kwargs: object) -> nn.Module:
    """SA-Gate on ResNet-101 (deep stem, output stride 16) with DeepLabV3+: the paper's NYUDv2 network."""
    return _entry("sagate_r101", 101, pretrained, kwargs)


# -- conversion of checkpoints trained with the reference code --------------------------------------
# The authors released no trained SA-Gate weights (their README links ImageNet ResNet-101 and data
# only), so no tag is registered; the converter maps checkpoints trained with their code
# (``{"model": state_dict}`` as their engine saves them).

def _branch_rules(prefix: str, target: str) -> list[tuple[str, str]]:
    """One stream's keys (``{prefix}conv1``, ``layer*.*.{prefix}conv1``, ...) -> our timm stages
    (segment 0 = stem + maxpool + layer1 at index 4; segment k - 1 = layer k at index 0)."""
    block = rf"(\d+)\.{prefix}((?:conv|bn)[1-3]\..+|downsample\..+)"
    return [
        (rf"backbone\.{prefix}conv1\.(.+)", rf"encoders.{target}.segments.0.0.\1"),
        (rf"backbone\.{prefix}bn1\.(.+)", rf"encoders.{target}.segments.0.1.\1"),
        (rf"backbone\.layer1\.{block}", rf"encoders.{target}.segments.0.4.\1.\2"),
        (rf"backbone\.layer2\.{block}", rf"encoders.{target}.segments.1.0.\1.\2"),
        (rf"backbone\.layer3\.{block}", rf"encoders.{target}.segments.2.0.\1.\2"),
        (rf"backbone\.layer4\.{block}", rf"encoders.{target}.segments.3.0.\1.\2"),
    ]


AUTHORS_RULES = [
    *_branch_rules("hha_", "hha"),
    *_branch_rules("", "rgb"),
    (r"backbone\.sagates\.0\.(.+)", r"fusions.stage1.\1"),
    (r"backbone\.sagates\.1\.(.+)", r"fusions.stage2.\1"),
    (r"backbone\.sagates\.2\.(.+)", r"fusions.stage3.\1"),
    (r"backbone\.sagates\.3\.(.+)", r"fusions.stage4.\1"),
    (r"head\.(aspp|reduce|last_conv)\.(.+)", r"decoder.\1.\2"),
    (r"head\.classify\.(weight|bias)", r"head.\1"),
    (r"head\.auxlayer\.(.+)", r"auxlayer.\1"),
]
CLASSIFIER_KEY = "head.classify.weight"


# The reference's state dict lists each shared shortcut projection twice; ours holds it once (RGB).
SHARED_TWIN = re.compile(r"(backbone\.layer[1-4]\.\d+\.)hha_downsample\.(.+)")


@register_converter("sagate_r50", "sagate_r101", classifier_key=CLASSIFIER_KEY)
def convert_sagate(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference ``DeepLab`` (SA-Gate) state dict -> ours, RGB + HHA: a renaming (the auxiliary
    head included), minus the second name of each shared shortcut projection
    (``*.hha_downsample.*``), which must equal its ``*.downsample.*`` twin.

    Raises:
        ConversionError: a ``hha_downsample`` tensor without an equal ``downsample`` twin.
    """
    kept = {}
    for key, tensor in state_dict.items():
        shared = SHARED_TWIN.fullmatch(key)
        if shared is not None:
            twin = f"{shared[1]}downsample.{shared[2]}"
            if twin not in state_dict or (not tensor.is_meta and not torch.equal(tensor, state_dict[twin])):
                raise ConversionError(
                    f"{key!r} must equal {twin!r}: the reference shares one shortcut projection between its streams"
                )
            continue
        kept[key] = tensor
    return rename_keys(kept, AUTHORS_RULES)
