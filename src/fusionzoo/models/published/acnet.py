"""ACNet, the published network (Hu, Yang, Fei, Huang, Wang, "ACNet: Attention Based Network to
Exploit Complementary Features for RGBD Semantic Segmentation", ICIP 2019; reference code
github anheidelonghu/ACNet, ``ACNet_models_V1.py``).

Encoder: three ResNet-50 branches (RGB, depth, merged); after the stem and after each of the four
stages the attention complementary modules re-weight RGB and depth per channel and add them into
the merged branch (``fusionzoo.fusion.ACNetFusion``, the authors' module; the generic
``acnet`` family's machinery, :class:`fusionzoo.models.acnet.ACNetModel`). Decoder (RedNet's): a
1x1 conv-BN-ReLU "agant" layer per fused feature (strides 2-32), four stages of residual
transposed-conv blocks (6, 4, 3, 3 blocks) that upsample by 2 and add the next agant skip, three
more residual blocks, and a stride-2 transposed-conv classifier to input resolution.

Side outputs (deep supervision): the reference's four 1x1 side classifiers (``decoder.out2_conv``
..``decoder.out5_conv``, on the outputs of ``deconv4``..``deconv1`` before the skip is added) are
part of the network, so the authors' checkpoint converts tensor for tensor. As in the reference
they run in training mode only: ``model.side_logits`` then holds their logits at strides 2, 4, 8,
16 (the order of the reference's training output ``(out, out2, out3, out4, out5)``), which
``fusionzoo.losses.segmentation_loss`` supervises (the card's ``side_loss_weights: [1, 1, 1, 1]``);
``model(inputs)`` returns only the main output in both modes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..._registry import ReleasedWeights, register_model, register_weights
from ...fusion.base import FusionResult
from ..acnet import ACNetModel
from ..base import entry_config
from ..convert import build_or_load, register_converter, rename_keys

__all__ = ["ACNetDecoder", "ACNetR50", "TransBasicBlock", "acnet_r50"]

REFERENCE_REPO = "https://github.com/anheidelonghu/ACNet"
REFERENCE_COMMIT = "073d6bb16b2d64d8508eba7b5eeaa34139748f08"
PAPER = (
    "Hu, Yang, Fei, Huang, Wang, 'ACNet: Attention Based Network to Exploit Complementary Features for "
    "RGBD Semantic Segmentation', ICIP 2019"
)


class TransBasicBlock(nn.Module):
    """RedNet's residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``conv1`` is a 3x3 conv keeping ``inplanes``; ``conv2`` maps to ``planes``, as a 3x3
    transposed conv with stride 2 (output padding 1) when upsampling, else a 3x3 conv. The
    shortcut (``upsample``) is given by the stage: a 2x2 stride-2 transposed conv + BN, a 1x1
    conv + BN, or identity.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, inplanes, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        if upsample is not None and stride != 1:
            self.conv2: nn.Module = nn.ConvTranspose2d(
                inplanes, planes, kernel_size=3, stride=stride, padding=1, output_padding=1, bias=False
            )
        else:
            self.conv2 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = self.upsample(x) if self.upsample is not None else x
        return self.relu(out + residual)


def transpose_stage(inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """``blocks - 1`` blocks at ``inplanes``, then one to ``planes`` (upsampling by ``stride``)."""
    upsample = None
    if stride != 1:
        upsample = nn.Sequential(
            nn.ConvTranspose2d(inplanes, planes, kernel_size=2, stride=stride, bias=False), nn.BatchNorm2d(planes)
        )
    elif inplanes != planes:
        upsample = nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, bias=False), nn.BatchNorm2d(planes))
    layers = [TransBasicBlock(inplanes, inplanes) for _ in range(blocks - 1)]
    layers.append(TransBasicBlock(inplanes, planes, stride, upsample))
    return nn.Sequential(*layers)


def agant(inplanes: int, planes: int) -> nn.Sequential:
    """1x1 conv (no bias) -> BN -> ReLU: a fused encoder feature reduced for the decoder."""
    return nn.Sequential(nn.Conv2d(inplanes, planes, kernel_size=1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True))


class ACNetDecoder(nn.Module):
    """ACNet's (RedNet's) decoder over the five fused features (strides 2, 4, 8, 16, 32).

    Args:
        in_channels: channels of the fused features, stem first (``[64, 256, 512, 1024, 2048]``
            for ResNet-50).
        num_classes: ``K`` of the four 1x1 side classifiers (``out2_conv``..``out5_conv``).

    Returns (forward): the 64-channel stride-2 embedding before the classifier. In training mode
    ``side_logits`` then holds the side classifiers' ``(B, K, H/s, W/s)`` logits, s = 2, 4, 8, 16.
    """

    STAGES = ((256, 6), (128, 4), (64, 3), (64, 3))  # (planes, blocks) of deconv1..deconv4

    def __init__(self, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(in_channels) != 5:
            raise ValueError(f"ACNetDecoder takes 5 fused features (stem + 4 stages), got channels {list(in_channels)}")
        # agant_k reduces fused feature k to the width of the decoder map it is added to.
        widths = [64, 64, 128, 256, 512]
        for k, (cin, cout) in enumerate(zip(in_channels, widths)):
            self.add_module(f"agant{k}", agant(cin, cout))
        inplanes = widths[-1]
        for k, (planes, blocks) in enumerate(self.STAGES):
            self.add_module(f"deconv{k + 1}", transpose_stage(inplanes, planes, blocks, stride=2))
            inplanes = planes
        self.final_conv = transpose_stage(inplanes, 64, 3)
        self.out_channels = 64
        # Side classifiers on the outputs of deconv1..deconv4 (strides 16, 8, 4, 2), with bias.
        for k, (planes, _) in zip((5, 4, 3, 2), self.STAGES):
            self.add_module(f"out{k}_conv", nn.Conv2d(planes, num_classes, kernel_size=1))
        self.side_logits: tuple[torch.Tensor, ...] = ()

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        f0, f1, f2, f3, f4 = features
        skips = (self.agant3(f3), self.agant2(f2), self.agant1(f1), self.agant0(f0))
        x = self.agant4(f4)
        sides = []
        for k, skip in enumerate(skips):  # deconv1..4: strides 16, 8, 4, 2
            x = getattr(self, f"deconv{k + 1}")(x)
            if self.training:  # the reference computes its side outputs in training mode only
                sides.append(getattr(self, f"out{5 - k}_conv")(x))
            x = x + skip
        self.side_logits = tuple(reversed(sides))  # strides 2, 4, 8, 16
        return self.final_conv(x)


class ACNetR50(ACNetModel):
    """ACNet with ResNet-50 branches and its own decoder; see the module docstring.

    Args:
        num_classes: ``K`` (40 for the released NYUDv2 weights).
        modalities: RGB first, then depth (or another single auxiliary stream).
        in_chans: per-modality channel overrides.
        pretrained: torchvision's ImageNet ResNet-50 (timm ``resnet50.tv_in1k``) in all three
            branches, the depth stem averaging the RGB filters, as the reference initialises.

    Taps: as the ``acnet`` family (``{m}.stem``, ``{m}.stage1..4``, ``fused.*`` with the ACM
    weights ``fused.*.attn``), then ``decoder.out`` (64 channels, stride 2) and ``head.logits``
    (stride 1). Inputs must have H and W divisible by 32.
    """

    # The decoder adds stride-2^k skips to 2x upsampled maps: sizes must halve exactly.
    input_multiple = 32
    input_multiple_reason = "its decoder adds skips at strides 2-32"
    # Deep supervision (engine.builders.check_side_loss, fusionzoo.losses): side_logits strides, and
    # how the reference meets them with the label (scikit-image order-0 resize: pixel-centre nearest).
    side_strides = (2, 4, 8, 16)
    side_logits_resize = "nearest-exact"

    def __init__(
        self,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
    ) -> None:
        super().__init__(
            "resnet50.tv_in1k", num_classes=num_classes, modalities=modalities, in_chans=in_chans, pretrained=pretrained,
            fusion_op="acnet", fuse_stem=True, feedback=False, mono_init="mean",
        )

    def build_head(self, decoder: str, decoder_channels: int | None, dropout: float) -> None:
        first = self.encoders[self.modalities[0]]
        self.decoder = ACNetDecoder(first.channels, self.num_classes)
        self.taps.declare("decoder.out", self.decoder.out_channels, 2, after_fusion=True)
        self.side_logits: tuple[torch.Tensor, ...] = ()  # set by every forward (training mode: 4 tensors)
        # The classifier: a 2x2 stride-2 transposed conv from stride 2 to input resolution.
        self.head = nn.ConvTranspose2d(self.decoder.out_channels, self.num_classes, kernel_size=2, stride=2)
        self.taps.declare("head.logits", self.num_classes, 1, "logits", after_fusion=True)

    def merge_result(
        self, index: int, result: FusionResult, features: list[torch.Tensor], previous: torch.Tensor | None
    ) -> torch.Tensor:
        """``m_k = layer_k^merged(m_{k-1}) + rgb_k * a_rgb + depth_k * a_depth``, summed left to right
        as the reference does (the ``acnet`` family adds ``m + (rgb * a_rgb + depth * a_depth)``,
        equal up to float rounding, which BatchNorm on small training batches amplifies)."""
        if previous is None:  # the stem: m_0 is the ACM sum itself
            return result.fused
        weights = result.details["attn"]  # (B, 2C, 1, 1): RGB's weights, then depth's
        channels = weights.shape[1] // 2
        rgb, depth = features
        return self.merged.forward_stage(index, previous) + rgb * weights[:, :channels] + depth * weights[:, channels:]

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        fused, _ = self.forward_streams(xs, include_stem=True)  # m0 (stride 2) .. m4 (stride 32)
        embedding = self.taps("decoder.out", self.decoder(fused))
        self.side_logits = self.decoder.side_logits  # training mode: strides 2, 4, 8, 16; else ()
        return self.taps("head.logits", self.head(embedding))


@register_model(
    task="segmentation", fusion="middle", method="acnet", encoder="r50", paper=PAPER,
    modalities=("rgb", "depth"), max_modalities=2, accepts=("num_classes", "modalities", "in_chans", "pretrained"),
    published=True, reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
)
def acnet_r50(pretrained: bool | str = False, **kwargs: object) -> nn.Module:
    """ACNet (three ResNet-50 branches, attention complementary modules, RedNet decoder).

    ``pretrained=True`` loads ImageNet ResNet-50 into the three branches; ``pretrained="nyuv2"``
    the authors' released NYUDv2 weights (converted with ``fusionzoo convert``).
    """

    def build() -> ACNetR50:
        model = ACNetR50(pretrained=bool(pretrained), **kwargs)  # type: ignore[arg-type]
        model.config = entry_config("acnet_r50", kwargs)
        model.encoder_name = "resnet50.tv_in1k"
        return model

    return build_or_load("acnet_r50", pretrained, build)


# -- released checkpoint and its conversion ------------------------------------------------------

def _branch_rules(suffix: str, prefix: str) -> list[tuple[str, str]]:
    """torchvision-style ResNet keys of one reference branch (``conv1{suffix}``, ``layer1{suffix}``)
    -> our timm stages (stem = segment 0; segment 1 = maxpool + layer1; segment k = layer k)."""
    return [
        (rf"conv1{suffix}\.weight", rf"{prefix}.segments.0.0.weight"),
        (rf"bn1{suffix}\.(.+)", rf"{prefix}.segments.0.1.\1"),
        (rf"layer1{suffix}\.(.+)", rf"{prefix}.segments.1.1.\1"),
        (rf"layer([2-4]){suffix}\.(.+)", rf"{prefix}.segments.\1.0.\2"),
    ]


AUTHORS_RULES = [
    *_branch_rules("_d", "encoders.depth"),
    *_branch_rules("_m", "merged"),
    *_branch_rules("", "encoders.rgb"),
    (r"atten_(rgb|depth)_0\.(.+)", r"fusions.stem.atten_\1.\2"),
    (r"atten_(rgb|depth)_([1-4])\.(.+)", r"fusions.stage\2.atten_\1.\3"),
    (r"(agant[0-4]|deconv[1-4]|final_conv|out[2-5]_conv)\.(.+)", r"decoder.\1.\2"),
    (r"final_deconv\.(weight|bias)", r"head.\1"),
]
CLASSIFIER_KEY = "final_deconv.bias"  # (K,): the weight of a transposed conv is (C_in, K, 2, 2)


@register_converter("acnet_r50", classifier_key=CLASSIFIER_KEY)
def convert_acnet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference ``ACNet`` state dict -> ours: a renaming, every tensor kept (the side
    classifiers ``out2_conv``..``out5_conv`` included)."""
    return rename_keys(state_dict, AUTHORS_RULES)


# The reference README: "The pretrained model for NYUDv2 is avaliable at http://wangkaiwei.org/file/NYUDv2.zip";
# the zip holds ckpt_epoch_1195.00.pth, the file its evaluation command loads. Inputs as its
# evaluation feeds them (ACNet_eval_nyuv2.py Normalize): RGB / 255 then mean/std; raw depth in metres.
register_weights(ReleasedWeights(
    name="acnet_r50", tag="nyuv2", url="http://wangkaiwei.org/file/NYUDv2.zip", filename="ckpt_epoch_1195.00.pth",
    num_classes=40, modalities=("rgb", "depth"),
    reported="mIoU 48.3 (NYUDv2 40 classes, reference README and paper)",
    normalization={
        "rgb": {"mean": (0.4850042694973687, 0.41627756261047333, 0.3981809741523051),
                "std": (0.26415541082494515, 0.2728415392982039, 0.2831175140191598)},
        "depth": {"mean": (2.8424503515351494,), "std": (0.9932836506164299,)},
    },
))
