"""ESANet as published: Seichter, Koehler, Lewandowski, Wengefeld, Gross, "Efficient RGB-D Semantic
Segmentation for Indoor Scene Analysis", ICRA 2021 (reference code: TUI-NICR/ESANet).

The whole network of the paper (Fig. 2), to the parameter:

- two ResNet encoders (RGB, depth) of the paper's variants: ResNet-18/34 with the torchvision
  BasicBlock or with ERFNet's NonBottleneck1D block ("NBt1D", Sec. III-A: each 3x3 convolution
  factorized into 3x1 and 1x3), and ResNet-50 (Bottleneck);
- SE-add fusion after the stem and after every stage (:class:`~fusionzoo.fusion.ESANetFusion`,
  measured equal to the authors' module); the sum continues in the RGB encoder, the depth
  encoder runs on its own features;
- the pyramid pooling context module (Sec. III-C; bins 1 and 5, nearest upsampling, the
  reference code's ``ppm`` with learned decoder upsampling);
- the decoder (Sec. III-C): three modules (3x3 conv, three NBt1D blocks, learned 2x upsampling,
  the encoder skip added), a 3x3 classifier at stride 4 and two learned 2x upsamplings of the
  logits. "Learned" upsampling is nearest-neighbour 2x followed by a depthwise 3x3 convolution
  initialised with the bilinear kernel.

Side outputs (the paper's pyramid supervision, Sec. III-D): every decoder module has a 1x1
classifier whose logits the authors' loss uses at strides 32, 16 and 8. Here they are the taps
``decoder.side32``, ``decoder.side16``, ``decoder.side8`` (kind ``logits``) in every mode, and in
training mode also ``model.side_logits`` (strides 8, 16, 32: the order of the reference decoder's
training output) so a loss can supervise them. ``model(inputs)`` returns only the network output,
which is the published network's inference output in both modes.

The module ends with the entry points (``esanet_r18``, ``esanet_r18_nbt1d``, ``esanet_r34``,
``esanet_r34_nbt1d``, ``esanet_r50``), the authors' released checkpoints and their converter.
Parity: ``tests/test_parity_esanet.py`` on fixtures from ``tools/parity/esanet.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..._registry import ReleasedWeights, register_model, register_weights
from ...classes import NYU40_CLASSES
from ...encoders import PretrainedWeightsError
from ...fusion import ESANetFusion
from ...fusion._common import make_activation
from ..base import FusionModel
from ..convert import build_or_load, read_authors_checkpoint, register_converter, rename_keys

REFERENCE_REPO = "https://github.com/TUI-NICR/ESANet"
REFERENCE_COMMIT = "f72ea8a5ddb9dee6cea145d5309a27f521c4f376"
PAPER = "Seichter et al., 'Efficient RGB-D Semantic Segmentation for Indoor Scene Analysis', ICRA 2021"

# Blocks per stage (He et al. 2016, Table 1); ResNet-50 always uses Bottleneck in the reference.
RESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 6, 3)}
BLOCKS = ("basic", "nbt1d", "bottleneck")
STAGES = ("stage1", "stage2", "stage3", "stage4")
PPM_BINS = (1, 5)  # the reference's "ppm" context module


class ConvBNAct(nn.Sequential):
    """``conv(k x k, no bias, same padding) -> BatchNorm -> activation``."""

    def __init__(self, cin: int, cout: int, kernel_size: int, activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = make_activation(type(self).__name__, activation)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential:
    """The projection shortcut (1x1 conv with stride, BatchNorm) of a block that changes shape."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a residual (He et al. 2016)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.act = make_activation(type(self).__name__, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act(out + identity)


class NonBottleneck1D(nn.Module):
    """ERFNet's factorized residual block (Romera et al., T-ITS 2018, Fig. 3c), as ESANet uses it
    in the encoder (Sec. III-A) and the decoder (Sec. III-C).

    ``3x1 -> act -> 1x3 -> BN -> act -> 3x1 -> act -> 1x3 -> BN`` (biased convolutions, BatchNorm
    eps 1e-3), plus the identity or a projection; a stride is split over the first 3x1 (rows) and
    1x3 (columns) convolutions.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, activation: str) -> None:
        super().__init__()
        self.conv3x1_1 = nn.Conv2d(cin, planes, (3, 1), stride=(stride, 1), padding=(1, 0))
        self.conv1x3_1 = nn.Conv2d(planes, planes, (1, 3), stride=(1, stride), padding=(0, 1))
        self.bn1 = nn.BatchNorm2d(planes, eps=1e-3)
        self.conv3x1_2 = nn.Conv2d(planes, planes, (3, 1), padding=(1, 0))
        self.conv1x3_2 = nn.Conv2d(planes, planes, (1, 3), padding=(0, 1))
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-3)
        self.downsample = downsample
        self.act = make_activation(type(self).__name__, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1x3_1(self.act(self.conv3x1_1(x)))))
        out = self.bn2(self.conv1x3_2(self.act(self.conv3x1_2(out))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50's 1x1 -> 3x3 (stride) -> 1x1 block with 4x expansion (torchvision layout)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.act = make_activation(type(self).__name__, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act(out + identity)


BLOCK_CLASSES: dict[str, type[nn.Module]] = {"basic": BasicBlock, "nbt1d": NonBottleneck1D, "bottleneck": Bottleneck}


class ESANetResNet(nn.Module):
    """One ESANet encoder: torchvision's ResNet stem and four stages (no max pool, no classifier;
    ESANet max-pools the fused stem output itself), with the block chosen per variant.

    Args:
        depth: ``"r18"``, ``"r34"`` or ``"r50"``.
        block: ``"basic"``, ``"nbt1d"`` or ``"bottleneck"``.
        in_chans: input channels (3 for RGB, 1 for depth).
        activation: the network's activation (``"relu"`` in the paper).
    """

    def __init__(self, depth: str, block: str, in_chans: int, activation: str = "relu") -> None:
        super().__init__()
        block_cls = BLOCK_CLASSES[block]
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(type(self).__name__, activation)
        cin = 64
        self.channels: list[int] = []
        for k, (planes, blocks) in enumerate(zip((64, 128, 256, 512), RESNET_LAYERS[depth])):
            stride = 1 if k == 0 else 2
            cout = planes * block_cls.expansion
            down = _downsample(cin, cout, stride) if stride != 1 or cin != cout else None
            layer = [block_cls(cin, planes, stride, down, activation)]
            layer += [block_cls(cout, planes, 1, None, activation) for _ in range(blocks - 1)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*layer))
            self.channels.append(cout)
            cin = cout

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, 64, H/2, W/2)``."""
        return self.act(self.bn1(self.conv1(x)))

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` (0..3) of the ResNet."""
        return getattr(self, f"layer{index + 1}")(x)


class LearnedUpsample(nn.Module):
    """ESANet's learned 2x upsampling (Sec. III-C): nearest 2x, then a depthwise 3x3 convolution
    (zero padding, with bias) initialised with the bilinear kernel ``outer([1, 2, 1], [1, 2, 1]) / 16``
    and a zero bias, so training starts from a bilinear-like interpolation."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        kernel = torch.tensor([0.25, 0.5, 0.25])
        with torch.no_grad():
            self.conv.weight.copy_(torch.outer(kernel, kernel).expand(channels, 1, 3, 3))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, C, 2h, 2w)``."""
        return self.conv(F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="nearest"))


class PyramidPooling(nn.Module):
    """The context module (Sec. III-C; PSPNet's pyramid pooling, Zhao et al. CVPR 2017).

    Per bin: adaptive average pooling to ``bin x bin``, a 1x1 ConvBNAct to ``C_in // len(bins)``
    channels and nearest upsampling back (the reference uses nearest here because its decoder
    upsampling is learned); the input and the branches are concatenated and a 1x1 ConvBNAct maps
    them to ``C_out``.
    """

    def __init__(self, cin: int, cout: int, bins: Sequence[int], activation: str) -> None:
        super().__init__()
        reduced = cin // len(bins)
        self.bins = tuple(bins)
        self.branches = nn.ModuleList(ConvBNAct(cin, reduced, 1, activation) for _ in self.bins)
        self.final_conv = ConvBNAct(cin + reduced * len(self.bins), cout, 1, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, h, w)`` -> ``(B, C_out, h, w)``."""
        size = x.shape[-2:]
        pooled = [F.interpolate(conv(F.adaptive_avg_pool2d(x, b)), size=size, mode="nearest") for b, conv in zip(self.bins, self.branches)]
        return self.final_conv(torch.cat([x, *pooled], dim=1))


class DecoderModule(nn.Module):
    """One decoder module (Sec. III-C, Fig. 2): 3x3 ConvBNAct, NBt1D blocks, a 1x1 side
    classifier (pyramid supervision) and learned 2x upsampling; the caller adds the skip."""

    def __init__(self, cin: int, channels: int, blocks: int, num_classes: int, activation: str) -> None:
        super().__init__()
        self.conv3x3 = ConvBNAct(cin, channels, 3, activation)
        self.blocks = nn.Sequential(*(NonBottleneck1D(channels, channels, 1, None, activation) for _ in range(blocks)))
        self.side = nn.Conv2d(channels, num_classes, 1)
        self.upsample = LearnedUpsample(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the side classifier and the upsampling, ``(B, channels, h, w)``."""
        return self.blocks(self.conv3x3(x))


class ESANetDecoder(nn.Module):
    """Three decoder modules, the 3x3 classifier at stride 4 and two learned 2x upsamplings."""

    def __init__(self, cin: int, channels: Sequence[int], blocks: Sequence[int], num_classes: int, activation: str) -> None:
        super().__init__()
        ins = (cin, channels[0], channels[1])
        self.stages = nn.ModuleList(
            DecoderModule(i, c, b, num_classes, activation) for i, c, b in zip(ins, channels, blocks)
        )
        self.classifier = nn.Conv2d(channels[2], num_classes, 3, padding=1)
        self.upsample1 = LearnedUpsample(num_classes)
        self.upsample2 = LearnedUpsample(num_classes)


def _check_triple(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be three positive ints (one per decoder module, strides 32, 16, 8), got {value!r}")
    return values  # type: ignore[return-value]


class ESANet(FusionModel):
    """The published ESANet (see the module docstring), as a fusionzoo model.

    Args:
        depth: encoder depth, ``"r18"``, ``"r34"`` or ``"r50"``.
        block: ``"basic"`` or ``"nbt1d"`` for ResNet-18/34, ``"bottleneck"`` for ResNet-50.
        num_classes: ``K``.
        modalities: exactly two streams, RGB first (``("rgb", "depth")``; ``("rgb", "thermal")`` works too).
        in_chans: per-modality channel overrides.
        pretrained: ImageNet weights for the encoders (torchvision's, through timm's cache), for the
            BasicBlock and Bottleneck variants; the NBt1D variants' ImageNet encoders are the
            authors' own file (``encoder_weights``).
        decoder_channels: channels of the three decoder modules (reference: 512, 256, 128).
        decoder_blocks: NBt1D blocks per decoder module (reference: 3, 3, 3).
        activation: the network's activation (reference: ``"relu"``).
        encoder_weights: the authors' ImageNet-pretrained encoder file for the NBt1D variants
            (``imagenet_r34_NBt1D.tar.gz`` from their README, or the ``.pth`` inside), loaded into
            both encoders as the reference does (see :meth:`load_authors_encoder`).

    Taps: ``{m}.stem`` and ``{m}.stage1..4`` (encoder outputs before fusion), ``fused.stem``,
    ``fused.stage1..4`` and their SE weights ``fused.*.attn``; ``decoder.context`` (context module
    output, stride 32), ``decoder.side32/16/8`` (side-output logits), ``decoder.out`` (decoder
    features at stride 4) and ``head.logits`` (the output, at input resolution).

    Inputs must be divisible by 32: the decoder upsamples by exactly 2 and adds the encoder skip.
    """

    input_multiple = 32
    input_multiple_reason = "its decoder upsamples by exactly 2 and adds the encoder skip"
    # Deep supervision (engine.builders.check_side_loss, fusionzoo.losses): side_logits strides, and
    # how the reference meets them with the label (OpenCV INTER_NEAREST downsampling of the label).
    side_strides = (8, 16, 32)
    side_logits_resize = "nearest"

    def __init__(
        self,
        depth: str,
        block: str,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        decoder_channels: Sequence[int] = (512, 256, 128),
        decoder_blocks: Sequence[int] = (3, 3, 3),
        activation: str = "relu",
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__(modalities, num_classes, in_chans)
        if depth not in RESNET_LAYERS:
            raise ValueError(f"ESANet depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        if block not in BLOCKS or (block == "bottleneck") != (depth == "r50"):
            raise ValueError(f"ESANet {depth} takes block {'bottleneck' if depth == 'r50' else 'basic or nbt1d'}, got {block!r}")
        if len(self.modalities) != 2:
            raise ValueError(f"ESANet fuses exactly 2 modalities (RGB plus one auxiliary stream), got {self.modalities}")
        channels = _check_triple("decoder_channels", decoder_channels)
        blocks = _check_triple("decoder_blocks", decoder_blocks)
        self.depth, self.block = depth, block
        self.encoders = nn.ModuleDict({m: ESANetResNet(depth, block, self.in_chans[m], activation) for m in self.modalities})
        enc = self.encoders[self.modalities[0]]
        stage_channels = [64, *enc.channels]
        self.fusions = nn.ModuleDict()
        mixed: set[str] = set()  # streams that continue from a fused map (the RGB stream, from the stem on)
        for k, (stage, c) in enumerate(zip(("stem", *STAGES), stage_channels)):
            reduction = 2 ** (k + 1)  # stem 2, stages 4..32
            for m in self.modalities:
                self.taps.declare(f"{m}.{stage}", c, reduction, after_fusion=m in mixed)
            self.fusions[stage] = ESANetFusion(c, 2, stage_index=max(k - 1, 0), activation=activation)
            mixed.update(self.fusions[stage].mixed_streams(self.modalities))
            self.taps.declare(f"fused.{stage}", c, reduction, after_fusion=True)
            self.taps.declare(f"fused.{stage}.attn", 2 * c, 0, "attn", after_fusion=True)
        # Encoder skips into the decoder modules: a 1x1 ConvBNAct where the channels differ.
        self.skips = nn.ModuleDict({
            stage: ConvBNAct(c, d, 1, activation) if c != d else nn.Identity()
            for stage, c, d in zip(STAGES[:3], enc.channels[:3], channels[::-1])
        })
        self.context = PyramidPooling(enc.channels[3], channels[0], PPM_BINS, activation)
        self.taps.declare("decoder.context", channels[0], 32, after_fusion=True)
        self.decoder = ESANetDecoder(channels[0], channels, blocks, num_classes, activation)
        for stride in (32, 16, 8):
            self.taps.declare(f"decoder.side{stride}", num_classes, stride, "logits", after_fusion=True)
        self.taps.declare("decoder.out", channels[2], 4, after_fusion=True)
        self.taps.declare("head.logits", num_classes, 1, "logits", after_fusion=True)
        self.side_logits: tuple[torch.Tensor, ...] = ()
        if pretrained and encoder_weights is not None:
            raise ValueError("give pretrained=True (torchvision's ImageNet ResNets) or encoder_weights= (the authors' file), not both")
        if pretrained:
            self.load_imagenet()
        if encoder_weights is not None:
            self.load_authors_encoder(encoder_weights)

    def _load_encoders(self, weights: Mapping[str, torch.Tensor], where: str) -> None:
        """Load one RGB encoder state dict into both encoders; a 1-channel first convolution gets
        the sum over the RGB filters (the reference's rule for the depth encoder)."""
        for m, encoder in self.encoders.items():
            own = dict(weights)
            if self.in_chans[m] != 3:
                if self.in_chans[m] != 1:
                    raise PretrainedWeightsError(f"{where}: ImageNet weights fit 3- or 1-channel inputs; {m!r} has {self.in_chans[m]}")
                own["conv1.weight"] = weights["conv1.weight"].sum(dim=1, keepdim=True)
            missing, unexpected = encoder.load_state_dict(own, strict=False)
            if missing or unexpected:
                raise PretrainedWeightsError(
                    f"{where} does not fit ESANet's {self.depth} {self.block} encoder: missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]} (of {len(missing)} / {len(unexpected)})"
                )

    def load_authors_encoder(self, path: str) -> None:
        """The authors' ImageNet-pretrained encoder (``imagenet_pretraining.py`` of the reference:
        keys ``encoder.*`` plus the ImageNet classifier ``fc.*``, which is dropped) into both encoders.

        Raises:
            FileNotFoundError / ConversionError: no such file, or not a checkpoint.
            PretrainedWeightsError: keys that do not fit this variant's encoder.
        """
        weights = {}
        for key, tensor in read_authors_checkpoint(path).items():
            if key.startswith("encoder."):
                weights[key[len("encoder."):]] = tensor
            elif not key.startswith("fc."):
                raise PretrainedWeightsError(f"{path}: key {key!r} is neither encoder.* nor the ImageNet classifier fc.*")
        self._load_encoders(weights, str(path))

    def load_imagenet(self) -> None:
        """torchvision's ImageNet ResNet weights (timm ``resnet{18,34,50}.tv_in1k``) into both
        encoders; 1-channel first convolutions get the sum over the RGB filters (the reference's rule).

        Raises:
            PretrainedWeightsError: NBt1D encoders (the authors pretrained their own), or timm could
                not load the weights (offline with no cache).
        """
        if self.block == "nbt1d":
            raise PretrainedWeightsError(
                f"ImageNet weights of ResNet-{self.depth[1:]} NBt1D are the ESANet authors' own "
                "(imagenet_r34_NBt1D.tar.gz, see https://github.com/TUI-NICR/ESANet#training): download it and "
                "pass encoder_weights=<that file>, or use a released checkpoint (pretrained='nyuv2')"
            )
        name = f"resnet{self.depth[1:]}.tv_in1k"
        try:
            weights = timm.create_model(name, pretrained=True).state_dict()
        except Exception as err:  # hub errors: offline, no cache entry, HTTP
            raise PretrainedWeightsError(
                f"could not load timm {name!r} (ImageNet weights for ESANet's encoders): {type(err).__name__}: {err}. "
                "If offline, put them in the huggingface-hub cache (HF_HOME) first, or pass pretrained=False."
            ) from err
        self._load_encoders({k: v for k, v in weights.items() if not k.startswith("fc.")}, f"timm {name!r}")

    def forward(self, inputs: Mapping[str, torch.Tensor], missing: Sequence[str] = ()) -> torch.Tensor:
        """Segment a batch: ``(B, K, H, W)`` logits for inputs ``(B, C_m, H, W)`` with H, W divisible by 32.

        Raises:
            ValueError: see :meth:`FusionModel.check_inputs`, H, W not divisible by 32, or a batch of
                1 in training mode.
        """
        missing = self._check_missing(missing)
        xs = self.check_inputs(inputs, missing)
        if self.training and next(iter(xs.values())).shape[0] < 2:
            raise ValueError(
                "ESANet in training mode needs a batch of at least 2: its context module applies BatchNorm "
                "after pooling to 1x1, which has one value per channel for a batch of 1; use model.eval() to infer"
            )
        return self.forward_logits(xs, missing)  # already at input resolution

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        """The network output ``(B, K, H, W)``; fires every tap once."""
        m_rgb, m_aux = self.modalities
        enc_rgb, enc_aux = self.encoders[m_rgb], self.encoders[m_aux]
        rgb = self.taps(f"{m_rgb}.stem", enc_rgb.stem(xs[m_rgb]))
        aux = self.taps(f"{m_aux}.stem", enc_aux.stem(xs[m_aux]))
        fused = self._fuse("stem", rgb, aux)
        # ESANet max-pools the fused stem output (the RGB stream) and the depth stem output.
        rgb = F.max_pool2d(fused, kernel_size=3, stride=2, padding=1)
        aux = F.max_pool2d(aux, kernel_size=3, stride=2, padding=1)
        skips = []
        for k, stage in enumerate(STAGES):
            rgb = self.taps(f"{m_rgb}.{stage}", enc_rgb.stage(k, rgb))
            aux = self.taps(f"{m_aux}.{stage}", enc_aux.stage(k, aux))
            fused = rgb = self._fuse(stage, rgb, aux)
            if stage in self.skips:
                skips.append(self.skips[stage](fused))
        x = self.taps("decoder.context", self.context(fused))
        sides = []
        for module, skip, stride in zip(self.decoder.stages, reversed(skips), (32, 16, 8)):
            x = module(x)
            sides.append(self.taps(f"decoder.side{stride}", module.side(x)))
            x = module.upsample(x) + skip
        x = self.taps("decoder.out", x)
        logits = self.decoder.upsample2(self.decoder.upsample1(self.decoder.classifier(x)))
        # The reference decoder returns (out, side8, side16, side32) in training mode.
        self.side_logits = tuple(reversed(sides)) if self.training else ()
        return self.taps("head.logits", logits)

    def _fuse(self, stage: str, rgb: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        result = self.fusions[stage]([rgb, aux])
        fused = self.taps(f"fused.{stage}", result.fused)
        self.taps(f"fused.{stage}.attn", result.details["attn"])
        return fused


# -- entry points ------------------------------------------------------------------------------

VARIANTS = {  # name -> (depth, block, the paper's name)
    "r18": ("r18", "basic", "ESANet-R18"),
    "r18_nbt1d": ("r18", "nbt1d", "ESANet-R18-NBt1D"),
    "r34": ("r34", "basic", "ESANet-R34"),
    "r34_nbt1d": ("r34", "nbt1d", "ESANet-R34-NBt1D"),
    "r50": ("r50", "bottleneck", "ESANet-R50"),
}
ACCEPTS = ("num_classes", "modalities", "in_chans", "pretrained", "decoder_channels", "decoder_blocks", "encoder_weights")


def _make_entry(variant: str) -> Any:
    depth, block, paper_name = VARIANTS[variant]
    name = f"esanet_{variant}"

    def entry(
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool | str = False,
        decoder_channels: Sequence[int] = (512, 256, 128),
        decoder_blocks: Sequence[int] = (3, 3, 3),
        encoder_weights: str | None = None,
    ) -> ESANet:
        def build() -> ESANet:
            model = ESANet(depth, block, num_classes=num_classes, modalities=modalities, in_chans=in_chans,
                           pretrained=bool(pretrained), decoder_channels=decoder_channels, decoder_blocks=decoder_blocks,
                           encoder_weights=encoder_weights)
            model.config = {
                "name": name, "num_classes": num_classes, "modalities": list(model.modalities),
                **({"in_chans": dict(in_chans)} if in_chans else {}),
                "decoder_channels": list(decoder_channels), "decoder_blocks": list(decoder_blocks),
            }
            return model

        return build_or_load(name, pretrained, build)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{paper_name}: the published ESANet ({PAPER}), reference configuration: decoder channels "
        "(512, 256, 128), three NBt1D blocks per decoder module, pyramid pooling context, learned upsampling.\n\n"
        "``pretrained``: a released-weights tag (``fusionzoo.list_pretrained('esanet_*')``) or True for "
        "ImageNet encoders (BasicBlock / Bottleneck variants); ``encoder_weights``: the authors' ImageNet "
        "NBt1D encoder file (NBt1D variants)."
    )
    entry.__module__ = __name__
    register_model(
        task="segmentation", fusion="middle", method="esanet", encoder=variant, paper=PAPER, max_modalities=2,
        accepts=ACCEPTS, published=True, reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
    )(entry)
    return entry


esanet_r18 = _make_entry("r18")
esanet_r18_nbt1d = _make_entry("r18_nbt1d")
esanet_r34 = _make_entry("r34")
esanet_r34_nbt1d = _make_entry("r34_nbt1d")
esanet_r50 = _make_entry("r50")


# -- released checkpoints (README of the reference repository, "Pretrained models") ------------

_DRIVE = "https://drive.google.com/uc?id="
# Input normalization of the reference (src/preprocessing.py): RGB / 255 with ImageNet statistics;
# NYUv2 depth in millimetres with mean 2841.94941272766 and std 1417.2594281672277, i.e. the same
# numbers / 1000 for fusionzoo's depth in metres.
_RGB = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_NYUV2_NORM = {"rgb": _RGB, "depth": {"mean": (2.84194941272766,), "std": (1.4172594281672277,)}}
# SUN RGB-D depth is normalized in the units of the dataset's depth_bfx PNGs (mean 19025.149,
# std 9880.916), not in metres, so only the RGB statistics are recorded.
_SUNRGBD_NORM = {"rgb": _RGB}


def _nyuv2_classes() -> tuple[str, ...]:
    return tuple(NYU40_CLASSES)


for _tag, _file_id, _archive, _miou in (
    ("nyuv2", "1C5-kJv4w3foicEudP3DAjdIXVuzUK7O8", "nyuv2_r34_NBt1D.tar.gz", "50.30"),
    ("nyuv2_scenenet", "1w_Qa8AWUC6uHzQamwu-PAqA7P00hgl8w", "nyuv2_r34_NBt1D_scenenet.tar.gz", "51.58"),
):
    register_weights(ReleasedWeights(
        name="esanet_r34_nbt1d", tag=_tag, url=_DRIVE + _file_id, filename=_archive, num_classes=40,
        modalities=("rgb", "depth"), class_names=_nyuv2_classes(), normalization=_NYUV2_NORM,
        reported=f"mIoU {_miou} (NYUv2 test, 40 classes, single scale 480x640"
                 f"{', pretrained on SceneNet RGB-D' if 'scenenet' in _tag else ''}; authors' README)",
    ))
for _tag, _file_id, _archive, _miou in (
    ("sunrgbd", "1tviMAEOr-6lJphpluGvdhBDA_FetIR14", "sunrgbd_r34_NBt1D.tar.gz", "48.17"),
    ("sunrgbd_scenenet", "1ukKafozmAcr8fQLbVvTtioKPLwTu0XZO", "sunrgbd_r34_NBt1D_scenenet.tar.gz", "48.04"),
):
    register_weights(ReleasedWeights(
        name="esanet_r34_nbt1d", tag=_tag, url=_DRIVE + _file_id, filename=_archive, num_classes=37,
        modalities=("rgb", "depth"), class_names=_nyuv2_classes()[:37], normalization=_SUNRGBD_NORM,
        reported=f"mIoU {_miou} (SUN RGB-D test, 37 classes, single scale"
                 f"{', pretrained on SceneNet RGB-D' if 'scenenet' in _tag else ''}; authors' README)",
    ))


# -- converter: the reference's state dict (src/models/model.py) -> ours, one tensor each -------

AUTHORS_RULES: list[tuple[str, str]] = [
    (r"encoder_rgb\.(.+)", r"encoders.rgb.\1"),
    (r"encoder_depth\.(.+)", r"encoders.depth.\1"),
    (r"se_layer0\.(.+)", r"fusions.stem.\1"),
    (r"se_layer([1-4])\.(.+)", r"fusions.stage\1.\2"),
    (r"skip_layer([1-3])\.0\.(.+)", r"skips.stage\1.\2"),  # present where encoder and decoder channels differ
    (r"context_module\.features\.(\d+)\.1\.(.+)", r"context.branches.\1.\2"),  # .0 is the (parameter-free) pooling
    (r"context_module\.final_conv\.(.+)", r"context.final_conv.\1"),
    *[
        (rf"decoder\.decoder_module_{i}\.{theirs}\.(.+)", rf"decoder.stages.{i - 1}.{ours}.\1")
        for i in (1, 2, 3)
        for theirs, ours in (("conv3x3", "conv3x3"), ("decoder_blocks", "blocks"), ("side_output", "side"), ("upsample", "upsample"))
    ],
    (r"decoder\.conv_out\.(.+)", r"decoder.classifier.\1"),
    (r"decoder\.(upsample[12])\.(.+)", r"decoder.\1.\2"),
]


@register_converter(*(f"esanet_{v}" for v in VARIANTS), classifier_key="decoder.conv_out.weight")
def convert_esanet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference ESANet's state dict (``model.state_dict()`` of ``src/models/model.py``;
    released files hold it under ``state_dict``) -> ours: a renaming, no tensor changes value.
    The reference's second encoder is ``encoder_depth``, so it maps onto a model whose auxiliary
    stream is ``depth`` (the released RGB-D checkpoints)."""
    return rename_keys(state_dict, AUTHORS_RULES, where="ESANet checkpoint")
