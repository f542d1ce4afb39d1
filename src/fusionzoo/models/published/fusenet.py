"""FuseNet-SF5, the published network (Hazirbas, Ma, Domokos, Cremers, "FuseNet: Incorporating
Depth into Semantic Segmentation via Fusion-based CNN Architecture", ACCV 2016, section 3).

Two VGG-16 encoders with BatchNorm after every convolution (13 conv-BN-ReLU layers in five
blocks). After each of the five blocks, before its max pooling (strides 1, 2, 4, 8, 16), the
depth block output is fused into the RGB branch ("sparse fusion", SF5); the RGB branch pools
and continues with the fused map, the depth branch with its own. The decoder is SegNet's
mirror of the RGB encoder: max-unpooling with the RGB branch's pooling indices, then
conv-BN-ReLU blocks, and a 3x3 classifier at input resolution. Dropout 0.4 follows pooling 3, 4
and 5 in both encoders and decoder blocks 5, 4 and 3.

Parity reference: the authors' group's PyTorch port (github MehmetAygun/fusenet-pytorch, which
also hosts the released checkpoints); the original is Caffe (github tum-vision/fusenet). The
port fuses by the *mean* ``(rgb + depth) / 2`` where the Caffe prototxt sums (``Eltwise`` SUM in
tum-vision/fusenet ``fusenet/segmentation/sunrgbd-sf5/deploy.prototxt``, whose encoder dropout
is 0.5); ``fuse="mean"`` (default) is the port and its released weights, ``fuse="sum"`` with
``dropout=0.5`` the Caffe arrangement (not parity-tested: no Caffe run here).
``tests/test_parity_fusenet.py`` checks outputs against the port's ``FusenetGenerator``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..._registry import ReleasedWeights, register_model, register_weights
from ...encoders import pretrained_timm_model
from ...fusion import SumFusion
from ..base import FusionModel, entry_config
from ..convert import build_or_load, register_converter, rename_keys

__all__ = ["FuseNetVGG16", "VGG16BNEncoder", "fusenet_vgg16"]

REFERENCE_REPO = "https://github.com/MehmetAygun/fusenet-pytorch"
REFERENCE_COMMIT = "26d28b6cf40a6be28ad7e2190a0abe1f0f765b09"
PAPER = (
    "Hazirbas, Ma, Domokos, Cremers, 'FuseNet: Incorporating Depth into Semantic Segmentation via "
    "Fusion-based CNN Architecture', ACCV 2016"
)

# VGG-16's five blocks: output channels of each 3x3 conv (Simonyan & Zisserman 2015, config D).
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# SegNet decoder blocks 5..1 as (in, out) per conv; block 1's last conv is the classifier (``head``).
DECODER_BLOCKS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((512, 512), (512, 512), (512, 512)),
    ((512, 512), (512, 512), (512, 256)),
    ((256, 256), (256, 256), (256, 128)),
    ((128, 128), (128, 64)),
    ((64, 64),),
)
DROPOUT_BLOCKS = frozenset({3, 4, 5})  # blocks whose pooled output (encoder) / output (decoder) gets dropout


def conv_bn_relu(pairs: Sequence[tuple[int, int]]) -> nn.Sequential:
    """``[Conv3x3(bias) -> BN -> ReLU] * len(pairs)``; conv ``i`` sits at index ``3 * i``, its BN at
    ``3 * i + 1`` (the reference's layout, so its keys map by renaming the prefix only)."""
    layers: list[nn.Module] = []
    for cin, cout in pairs:
        layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VGG16BNEncoder(nn.Module):
    """VGG-16's 13 convolutions, each followed by BatchNorm and ReLU, in five blocks (no pooling:
    FuseNet pools after fusing).

    Args:
        in_chans: input channels (3 for RGB, 1 for depth).
    """

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        blocks, cin = {}, in_chans
        for k, widths in enumerate(VGG16_BLOCKS):
            pairs = [(cin, widths[0]), *itertools.pairwise(widths)]
            blocks[f"block{k + 1}"] = conv_bn_relu(pairs)
            cin = widths[-1]
        self.blocks = nn.ModuleDict(blocks)  # block1..block5, named as the reference's CBR1..CBR5
        self.channels = [w[-1] for w in VGG16_BLOCKS]
        self.reductions = [2**k for k in range(len(VGG16_BLOCKS))]  # block k runs after k poolings

    def load_imagenet(self, in_chans: int) -> None:
        """Copy the 13 ImageNet VGG-16 convolutions (torchvision's weights, timm ``vgg16.tv_in1k``) as
        FuseNet initialises its encoders; a 1-channel first conv gets the mean of the RGB filters
        (FuseNet section 4). BatchNorm layers keep their fresh initialisation.

        Raises:
            PretrainedWeightsError: the weights are not in the huggingface-hub cache and cannot be fetched.
        """
        vgg = pretrained_timm_model("vgg16.tv_in1k")
        source = [m for m in vgg.features if isinstance(m, nn.Conv2d)]
        target = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for k, (src, dst) in enumerate(zip(source, target, strict=True)):
                weight = src.weight
                if k == 0 and in_chans != weight.shape[1]:
                    if in_chans != 1:
                        raise ValueError(f"ImageNet VGG-16 initialises 1- or 3-channel inputs, not {in_chans}")
                    weight = weight.mean(dim=1, keepdim=True)
                dst.weight.copy_(weight)
                dst.bias.copy_(src.bias)


class FuseNetVGG16(FusionModel):
    """FuseNet-SF5 on two VGG-16 encoders with a SegNet decoder; see the module docstring.

    Args:
        num_classes: ``K`` (the released checkpoints include a void class: 38 for SUN RGB-D, 41
            for NYUDv2).
        modalities: RGB first, then one auxiliary stream (depth as published).
        in_chans: per-modality channel overrides.
        pretrained: ImageNet VGG-16 convolutions in both encoders (the paper's initialisation).
        fuse: ``"mean"`` (the PyTorch port and its released weights) or ``"sum"`` (the Caffe model).
        dropout: the rate after pooling 3-5 and decoder blocks 5-3 (0.4 as published).

    Taps: ``{aux}.stage1..5`` (the auxiliary branch runs first, as in the reference), then per
    block ``rgb.stageK`` (before fusion) and ``fused.stageK`` at strides 1, 2, 4, 8, 16; then
    ``decoder.out`` (64 channels, stride 1) and ``head.logits`` (stride 1).

    Inputs must have H and W divisible by 16 (unpooling reuses the encoder's pooling indices).
    """

    # Unpooling with the encoder's indices needs every pooled size even up to stride 16.
    input_multiple = 16
    input_multiple_reason = "SegNet unpooling"

    def __init__(
        self,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        fuse: str = "mean",
        dropout: float = 0.4,
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        if len(self.modalities) != 2:
            raise ValueError(f"fusenet_vgg16 is defined for exactly 2 modalities (RGB plus one auxiliary stream), got {self.modalities}")
        if fuse not in ("mean", "sum"):
            raise ValueError(f"fuse must be 'mean' (the PyTorch port, released weights) or 'sum' (Caffe), got {fuse!r}")
        self.fuse = fuse
        self.encoders = nn.ModuleDict({m: VGG16BNEncoder(self.in_chans[m]) for m in self.modalities})
        if pretrained:
            for m in self.modalities:
                self.encoders[m].load_imagenet(self.in_chans[m])
        first = self.encoders[self.modalities[0]]
        self.stage_names = [f"stage{k + 1}" for k in range(len(VGG16_BLOCKS))]
        # FuseNet's element-wise sum (parameter-free): the fused map continues in the RGB branch.
        self.fusions = nn.ModuleDict({s: SumFusion(c, 2) for s, c in zip(self.stage_names, first.channels)})
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.drop = nn.Dropout(p=dropout)
        self.decoder = nn.ModuleDict({f"block{5 - k}": conv_bn_relu(pairs) for k, pairs in enumerate(DECODER_BLOCKS)})
        self.head = nn.Conv2d(64, num_classes, kernel_size=3, padding=1)

        aux = self.modalities[1]
        for stage, c, r in zip(self.stage_names, first.channels, first.reductions):
            self.taps.declare(f"{aux}.{stage}", c, r)  # the auxiliary branch receives nothing back
        mixed: set[str] = set()  # the RGB branch continues from the fused map after stage 1
        for stage, c, r in zip(self.stage_names, first.channels, first.reductions):
            self.taps.declare(f"{self.modalities[0]}.{stage}", c, r, after_fusion=self.modalities[0] in mixed)
            mixed.update(self.fusions[stage].mixed_streams(self.modalities))
            self.taps.declare(f"fused.{stage}", c, r, after_fusion=True)
        self.taps.declare("decoder.out", 64, 1, after_fusion=True)
        self.taps.declare("head.logits", num_classes, 1, "logits", after_fusion=True)

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        rgb_name, aux_name = self.modalities
        last = len(self.stage_names) - 1
        # Auxiliary branch first and whole (it receives nothing back), as the reference runs it:
        # the same order of dropout draws makes train-mode outputs comparable under one seed.
        x, aux_feats = xs[aux_name], []
        for k, (stage, block) in enumerate(zip(self.stage_names, self.encoders[aux_name].blocks.values())):
            feat = self.taps(f"{aux_name}.{stage}", block(x))
            aux_feats.append(feat)
            if k < last:  # the reference's depth branch does not pool its last block
                x, _ = self.pool(feat)
                x = self.drop(x) if k + 1 in DROPOUT_BLOCKS else x
        y, unpool_args = xs[rgb_name], []
        for k, (stage, block) in enumerate(zip(self.stage_names, self.encoders[rgb_name].blocks.values())):
            feat = self.taps(f"{rgb_name}.{stage}", block(y))
            fused = self.fusions[stage]([feat, aux_feats[k]]).fused  # (B, C_k, H / 2^k, W / 2^k)
            if self.fuse == "mean":
                fused = fused / 2
            fused = self.taps(f"fused.{stage}", fused)
            y, indices = self.pool(fused)
            unpool_args.append((indices, fused.shape[-2:]))
            y = self.drop(y) if k + 1 in DROPOUT_BLOCKS else y
        for k in range(last, -1, -1):  # decoder blocks 5..1, unpooled with the RGB branch's indices
            indices, size = unpool_args[k]
            y = self.decoder[f"block{k + 1}"](self.unpool(y, indices, output_size=size))
            y = self.drop(y) if k + 1 in DROPOUT_BLOCKS else y
        y = self.taps("decoder.out", y)
        return self.taps("head.logits", self.head(y))


# -- released checkpoints and their conversion ---------------------------------------------------

# The port's key layout: CBR{k}_{RGB,DEPTH}_ENC.{3i,3i+1}.* and CBR{k}_RGB_DEC.*, where decoder
# block 1's index 3 is the classifier.
AUTHORS_RULES = [
    (r"CBR([1-5])_RGB_ENC\.(\d+\..+)", r"encoders.rgb.blocks.block\1.\2"),
    (r"CBR([1-5])_DEPTH_ENC\.(\d+\..+)", r"encoders.depth.blocks.block\1.\2"),
    (r"CBR1_RGB_DEC\.3\.(weight|bias)", r"head.\1"),
    (r"CBR([1-5])_RGB_DEC\.(\d+\..+)", r"decoder.block\1.\2"),
]
CLASSIFIER_KEY = "CBR1_RGB_DEC.3.weight"


@register_model(
    task="segmentation", fusion="middle", method="fusenet", encoder="vgg16", paper=PAPER,
    modalities=("rgb", "depth"), max_modalities=2,
    accepts=("num_classes", "modalities", "in_chans", "pretrained", "fuse", "dropout"),
    published=True, reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
)
def fusenet_vgg16(pretrained: bool | str = False, **kwargs: object) -> nn.Module:
    """FuseNet-SF5 (two VGG-16-BN encoders, SegNet decoder): 44,186,341 parameters at 37 classes,
    as the port (tests/test_parity_fusenet.py).

    ``pretrained=True`` loads ImageNet VGG-16 into both encoders; ``pretrained="nyuv2"`` or
    ``"sunrgbd"`` the authors' released weights (converted with ``fusionzoo convert``).
    """

    def build() -> FuseNetVGG16:
        model = FuseNetVGG16(pretrained=bool(pretrained), **kwargs)  # type: ignore[arg-type]
        model.config = entry_config("fusenet_vgg16", kwargs)
        model.encoder_name = "vgg16"
        return model

    return build_or_load("fusenet_vgg16", pretrained, build)


@register_converter("fusenet_vgg16", classifier_key=CLASSIFIER_KEY)
def convert_fusenet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's ``FusenetGenerator`` state dict -> ours: a renaming, no value changes."""
    return rename_keys(state_dict, AUTHORS_RULES)


# Released by the port's authors (README table); class 0 is void (ignored in training and
# evaluation), so the classifier has one output more than the benchmark's class count (class names
# are left out: fusionzoo.data's lists have no void entry, and importing them here would load the
# data stack with the models). Inputs as
# the port feeds them: RGB and depth through torchvision's ToTensor, no mean/std normalization.
_PORT_RELEASES = "https://vision.in.tum.de/webarchive/hazirbas/fusenet-pytorch"
register_weights(ReleasedWeights(
    name="fusenet_vgg16", tag="nyuv2", url=f"{_PORT_RELEASES}/nyu/400_net_FuseNet.pth", filename="400_net_FuseNet.pth",
    num_classes=41, modalities=("rgb", "depth"),
    reported="port README: mIoU 35.48, mean acc 46.42, pixel acc 68.76 (NYUDv2 40 classes, test); the port's README lists Caffe FuseNet-SF5 at 32.70",
))
register_weights(ReleasedWeights(
    name="fusenet_vgg16", tag="sunrgbd", url=f"{_PORT_RELEASES}/sun/400_net_FuseNet.pth", filename="400_net_FuseNet.pth",
    num_classes=38, modalities=("rgb", "depth"),
    reported="port README: mIoU 35.69, mean acc 46.48, pixel acc 75.41 (SUN RGB-D 37 classes, test); Caffe FuseNet-SF5 37.30 (same table)",
))
