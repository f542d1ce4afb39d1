"""CMNeXt on MiT, as published: ``cmnext_mit_b0`` .. ``cmnext_mit_b5``.

Zhang, Liu, Shi, Yang, Reiss, Peng, Fu, Wang, Stiefelhagen, "Delivering Arbitrary-Modal Semantic
Segmentation", CVPR 2023 (CMNeXt: the Hub2Fuse paradigm with asymmetric branches). The
reference is the authors' repository (:data:`REFERENCE_REPO` at :data:`REFERENCE_COMMIT`); its
state dict maps onto these models tensor for tensor (:func:`convert_cmnext`), and
``tests/test_parity_cmnext.py`` checks the outputs against numbers computed by the authors' code
for RGB + one and RGB + two auxiliary modalities.

The network, RGB first, then any number of auxiliary modalities (RGB-D, RGB-D-E-L, ...):

- the RGB branch is SegFormer's MiT (timm's ``pvt_v2`` with MLP ratio 4 in every stage, every
  LayerNorm with eps 1e-5 as the authors' ``Block``/``PatchEmbed`` build them, where timm and
  SegFormer use 1e-6 in the blocks), stochastic depth 0.1 linear over all blocks;
- one auxiliary branch for all auxiliary modalities (:class:`AuxiliaryBranch`): per stage a patch
  embedding whose convolution is shared by the modalities and whose channel LayerNorm (eps 1e-6)
  is each modality's own; with two or more modalities, the Self-Query Hub (:class:`SelfQueryHub`)
  scores each modality per pixel and keeps the element-wise maximum of the re-weighted features;
  then the Parallel Pooling Mixer blocks (:class:`PPXBlock`, MLP ratio 8, 8, 4, 4 in stages 1-4,
  the RGB blocks' drop-path rates) and a channel LayerNorm;
- after every stage CMX's FRM + FFM (``fusionzoo.fusion.cmx``, the MiT preset: reduction 1,
  heads 1, 2, 5, 8) between the RGB feature and the auxiliary branch's; the rectified RGB feature
  enters the next RGB stage, the rectified auxiliary feature is added to every modality's feature
  for the next stage (see :meth:`CMNeXtMiT.forward_streams` for the authors' exact arithmetic);
- SegFormer's MLP decoder over the four fused features: embedding 256 for MiT-B0/B1, 512
  otherwise (the authors' ``CMNeXt.__init__``), fuse conv without bias, BatchNorm eps 1e-5.

Every input has three channels, as the authors' loaders give them (HHA for depth; thermal, event
and LiDAR images repeated or stored as three channels). The authors normalize RGB with ImageNet's
mean and std and every other modality only by ``/ 255``; ``replicate_x=True`` takes 1-channel
auxiliary inputs and repeats them to three in the model, which then equals the authors' loader
exactly (their repeat comes before a per-channel identity normalization).

The authors' ``cmnext_settings`` builds B2, B4 and B5 by name; the B0, B1 and B3 rows are
commented out there. The entries for those three are the same network with those rows (their
``CMNeXt`` picks the 256 decoder embedding for B0/B1 by name); the parity fixture reinstates the
B0 row in the authors' code at run time and its parameter counts cover all six.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from timm.layers import DropPath, LayerNorm2d
from timm.models.pvt_v2 import Attention as PvtAttention
from torch import nn

from ..._registry import ReleasedWeights, register_weights
from ...encoders import Encoder
from ...fusion._common import use_channels_last_depthwise
from ...fusion.cmx import CMXFusion
from ...heads.segformer import SegFormerDecoder
from ..base import FusionModel
from ..convert import StateDict, register_converter, rename_keys
from .cmx import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MFNET_CLASSES,
    MIT_DEPTHS,
    MIT_MLP_RATIOS,
    NYUV2_CLASSES,
    _mit_rules,
    _set_drop_path,
    _shift,
    load_mit_imagenet,
    register_mit_entry,
    select_attention_kernel,
)

REFERENCE_REPO = "https://github.com/jamycheung/DELIVER"
REFERENCE_COMMIT = "4981c16d0fd825d9309ce97a7a1654fef1756bbf"
PAPER = (
    "Zhang, Liu, Shi, Yang, Reiss, Peng, Fu, Wang, Stiefelhagen, 'Delivering Arbitrary-Modal "
    "Semantic Segmentation', CVPR 2023"
)

MIT_WIDTHS: dict[str, tuple[int, int, int, int]] = {
    v: (32, 64, 160, 256) if v == "b0" else (64, 128, 320, 512) for v in MIT_DEPTHS
}
PPX_MLP_RATIOS = (8.0, 8.0, 4.0, 4.0)  # the authors' extra_block1..4
PPX_POOLS = (3, 7, 11)  # MSPoolAttention's average-pooling windows
PPX_LAYER_SCALE = 1e-2  # initial layer scale of both PPX residual branches
RGB_LN_EPS = 1e-5  # nn.LayerNorm's default, used by every LayerNorm of the authors' RGB branch
AUX_LN_EPS = 1e-6  # the authors' ConvLayerNorm (channel-first), in the auxiliary branch
DROP_PATH_RATE = 0.1  # hard-coded in the authors' CMNeXt backbone
AUX_MEAN = (0.0, 0.0, 0.0)  # auxiliary modalities: only / 255 in the authors' Normalize
AUX_STD = (1.0, 1.0, 1.0)


def decoder_embed_dim(variant: str) -> int:
    """The authors' decoder embedding: 256 for MiT-B0/B1, 512 otherwise."""
    return 256 if variant in ("b0", "b1") else 512


def linear_drop_path_rates(depths: Sequence[int], rate: float) -> list[list[float]]:
    """``linspace(0, rate, sum(depths))`` cut into stages: block ``i`` of stage ``s`` takes
    ``dpr[cur_s + i]``, in the RGB blocks and in the PPX blocks alike (the authors' backbone)."""
    dpr = torch.linspace(0, rate, sum(depths), device="cpu").tolist()  # cpu: also under a meta device
    starts = [sum(depths[:s]) for s in range(len(depths))]
    return [dpr[start : start + depth] for start, depth in zip(starts, depths)]


def _init_cmnext_weights(m: nn.Module) -> None:
    """The authors' ``BaseModel._init_weights``, applied to the whole network last: trunc-normal
    linears; convolutions ``N(0, sqrt(2 / fan_out))`` with ``fan_out = k * k * out_channels``
    (their line ``fan_out // m.groups`` discards its result, so depth-wise convs are not
    divided by groups); unit/zero LayerNorm and BatchNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------- auxiliary branch
class ParallelPatchEmbed(nn.Module):
    """One stage's patch embedding of every auxiliary modality: one convolution shared by all,
    a channel LayerNorm (eps 1e-6) per modality.

    Args:
        in_channels: input channels (3 at stage 1, the previous stage's width after).
        out_channels: this stage's width ``C``.
        num_modalities: auxiliary modalities ``M``.
        kernel_size, stride: 7 / 4 at stage 1, 3 / 2 after (padding ``kernel_size // 2``).
    """

    def __init__(self, in_channels: int, out_channels: int, num_modalities: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2)
        self.norms = nn.ModuleList([LayerNorm2d(out_channels, eps=AUX_LN_EPS) for _ in range(num_modalities)])

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``M`` tensors ``(B, C_in, H, W)`` -> ``M`` tensors ``(B, C, H / stride, W / stride)``."""
        return [norm(self.proj(x)) for norm, x in zip(self.norms, xs)]


class SelfQueryHub(nn.Module):
    """Self-Query Hub (the paper's hub step): a per-pixel score ``s_m = sigmoid(conv1x1(dwconv3x3(x_m)))``
    per modality; each feature becomes ``s_m * x_m + x_m`` and the hub keeps their element-wise
    maximum (taken pairwise in modality order, as ``functools.reduce(torch.max, ...)``)."""

    def __init__(self, channels: int, num_modalities: int) -> None:
        super().__init__()
        self.scores = nn.ModuleList([
            nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, groups=channels), nn.Conv2d(channels, 1, 1), nn.Sigmoid())
            for _ in range(num_modalities)
        ])

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """``M`` features ``(B, C, h, w)`` -> the selected feature ``(B, C, h, w)``, the re-weighted
        features, and the scores ``(B, M, h, w)``."""
        scores = [net(x) for net, x in zip(self.scores, xs)]
        weighted = [s * x + x for s, x in zip(scores, xs)]
        return functools.reduce(torch.max, weighted), weighted, torch.cat(scores, dim=1)


class PoolingMixer(nn.Module):
    """The PPX token mixer: a depth-wise 7x7 conv, average pooling over 3x3, 7x7 and
    11x11 windows (padding excluded from the mean) summed with it, a 1x1 conv and a sigmoid that
    re-weights the input: ``x * sigmoid(proj(d + p3(d) + p7(d) + p11(d))) + x``, ``d = dwconv(x)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.pools = nn.ModuleList([nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False) for k in PPX_POOLS])
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dwconv(x)
        mixed = d
        for pool in self.pools:  # summed left to right, as the authors write it
            mixed = mixed + pool(d)
        return torch.sigmoid(self.proj(mixed)) * x + x


class ConvMlp(nn.Module):
    """PPX's channel MLP on ``(B, C, h, w)``: 1x1 conv, depth-wise 3x3 conv, GELU, 1x1 conv."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class PPXBlock(nn.Module):
    """Parallel Pooling Mixer (PPX) block, the auxiliary branch's block.

    ``x = x + drop(g1 * mixer(BN1(x)))``, then a channel gate ``c = sigmoid(conv1d_3(avg(x)))``
    over the channel axis and ``x = c * x + drop(g2 * mlp(BN2(x)))``: the second residual is the
    gated ``x``, not ``x`` (as the authors' ``MSPABlock`` computes it). ``g1``, ``g2`` are
    per-channel layer scales initialized to 0.01.

    Args:
        channels: ``C``.
        mlp_ratio: hidden width of the MLP over ``C`` (8 in stages 1-2, 4 in stages 3-4).
        drop_path: stochastic-depth rate of both residual branches.
    """

    def __init__(self, channels: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.attn = PoolingMixer(channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.BatchNorm2d(channels)
        self.mlp = ConvMlp(channels, int(channels * mlp_ratio))
        self.layer_scale_1 = nn.Parameter(torch.full((channels,), PPX_LAYER_SCALE))
        self.layer_scale_2 = nn.Parameter(torch.full((channels,), PPX_LAYER_SCALE))
        self.channel_mix = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` in and out."""
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        pooled = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C): the 1-D conv slides over channels
        gate = torch.sigmoid(self.channel_mix(pooled)).transpose(1, 2).unsqueeze(-1)  # (B, C, 1, 1)
        return gate * x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class AuxiliaryBranch(nn.Module):
    """CMNeXt's one branch for every auxiliary modality, stage by stage (see the module docstring).

    Args:
        widths: ``C`` of stages 1-4.
        depths: PPX blocks per stage (the RGB branch's depths).
        num_modalities: auxiliary modalities ``M`` (the hub exists only for ``M >= 2``).
        drop_path: per stage, the rate of each block.
    """

    def __init__(self, widths: Sequence[int], depths: Sequence[int], num_modalities: int, drop_path: Sequence[Sequence[float]]) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        ins = [3, *widths[:-1]]
        self.embeds = nn.ModuleList([
            ParallelPatchEmbed(c_in, c, num_modalities, 7 if k == 0 else 3, 4 if k == 0 else 2)
            for k, (c_in, c) in enumerate(zip(ins, widths))
        ])
        self.hubs = nn.ModuleList([SelfQueryHub(c, num_modalities) for c in widths]) if num_modalities > 1 else None
        self.blocks = nn.ModuleList([
            nn.ModuleList([PPXBlock(c, ratio, p) for p in rates])
            for c, ratio, rates in zip(widths, PPX_MLP_RATIOS, drop_path)
        ])
        self.norms = nn.ModuleList([LayerNorm2d(c, eps=AUX_LN_EPS) for c in widths])
        if [len(b) for b in self.blocks] != list(depths):
            raise ValueError(f"drop-path rates for {[len(b) for b in self.blocks]} blocks, depths {list(depths)}")


# ----------------------------------------------------------------------------- the network
class CMNeXtMiT(FusionModel):
    """CMNeXt with a MiT RGB branch and the MLP decoder, the authors' network (module docstring).

    Args:
        variant: ``"b0"`` .. ``"b5"``.
        num_classes: ``K`` (25 for DeLiVER, 19 for KITTI-360, 40 for NYUDv2, 9 for MFNet).
        modalities: RGB first, then one or more auxiliary modalities (``("rgb", "hha")``,
            ``("rgb", "hha", "event", "lidar")``).
        pretrained: ``False`` only here (MiT's ImageNet weights are SegFormer's: pass
            ``mit_weights``); the entry points also take a released tag.
        decoder_channels: MLP-decoder embedding (default: 256 for B0/B1, 512 otherwise).
        dropout: dropout before the classifier (0.1).
        drop_path_rate: stochastic depth of both branches (0.1; 0 for exact train-mode comparisons).
        replicate_x: the auxiliary inputs have one channel each, repeated to three in the model.
        mit_weights: SegFormer's ImageNet MiT file (``mit_b2.pth``, linked from the authors'
            README), loaded into the RGB branch only, as their ``init_pretrained`` does.

    Taps, per stage: ``rgb.stageK`` (the MiT stage's output before FRM); ``{aux}.stageK`` (each
    auxiliary modality's own patch embedding, before the hub); ``fused.stageK.scores`` (the
    hub's per-modality scores ``(B, M, h, w)``, with ``M >= 2`` only); ``fused.stageK.hub`` (the
    auxiliary branch's feature entering FRM); ``fused.stageK`` (FFM output) with ``.gate`` /
    ``.attn`` (FRM weights); then ``decoder.out``, ``head.logits``.
    """

    def __init__(
        self,
        variant: str,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "hha"),
        pretrained: bool = False,
        decoder_channels: int | None = None,
        dropout: float = 0.1,
        drop_path_rate: float = DROP_PATH_RATE,
        replicate_x: bool = False,
        mit_weights: str | None = None,
    ) -> None:
        if variant not in MIT_DEPTHS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_DEPTHS)}")
        if pretrained is not False:
            raise ValueError(
                "cmnext_mit_*: pretrained=True has no timm weights to load (timm's pvt_v2 is not MiT); "
                "pass a released tag (pretrained='deliver_rgbdel'), or SegFormer's ImageNet MiT file as "
                "mit_weights='pretrained/segformer/mit_b2.pth' (the authors' README links it)"
            )
        mods = tuple(modalities)
        if mods[:1] != ("rgb",) or len(mods) < 2:
            raise ValueError(f"cmnext_mit_{variant} takes RGB then one or more auxiliary modalities, e.g. ('rgb', 'hha'); got {mods}")
        self.variant = variant
        self.replicate_x = replicate_x
        super().__init__(mods, num_classes, {m: 1 if replicate_x and m != "rgb" else 3 for m in mods})
        self.auxiliary_modalities = self.modalities[1:]
        depths, widths = MIT_DEPTHS[variant], MIT_WIDTHS[variant]
        rates = linear_drop_path_rates(depths, drop_path_rate)
        rgb = Encoder(f"pvt_v2_{variant}", in_chans=3, pretrained=False, timm_kwargs={"mlp_ratios": MIT_MLP_RATIOS, "depths": depths})
        for module in rgb.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = RGB_LN_EPS
        _set_drop_path(rgb, rates)
        use_channels_last_depthwise(rgb)  # the MLPs' depthwise convs on their token layout (as cmx_mit_*)
        self.encoders = nn.ModuleDict({"rgb": rgb})
        self.stage_names = rgb.stage_names
        if list(rgb.channels) != list(widths):
            raise ValueError(f"timm pvt_v2_{variant} has stage widths {rgb.channels}, MiT-{variant.upper()} {list(widths)}")
        self.auxiliary = AuxiliaryBranch(widths, depths, len(self.auxiliary_modalities), rates)
        self.fusions = nn.ModuleDict()
        several_aux = len(self.auxiliary_modalities) > 1
        for k, (stage, channels, reduction) in enumerate(zip(self.stage_names, widths, rgb.reductions)):
            # Stage k > 0 runs on the streams the previous stage's FRM rectified with both branches.
            for m in self.modalities:
                self.taps.declare(f"{m}.{stage}", channels, reduction, after_fusion=k > 0)
            if several_aux:
                self.taps.declare(f"fused.{stage}.scores", len(self.auxiliary_modalities), reduction, "gate",
                                  after_fusion=True)
            # The hub merges the auxiliary modalities: with one of them, its stage-1 output is that modality's own.
            self.taps.declare(f"fused.{stage}.hub", channels, reduction, after_fusion=k > 0 or several_aux)
            op = CMXFusion(channels, 2, stage_index=k, preset="mit")
            self.fusions[stage] = op
            self.taps.declare(f"fused.{stage}", channels, reduction, after_fusion=True)
            self.taps.declare(f"fused.{stage}.gate", op.detail_channels["gate"], reduction, "gate", after_fusion=True)
            self.taps.declare(f"fused.{stage}.attn", op.detail_channels["attn"], 0, "attn", after_fusion=True)
        self.decoder = SegFormerDecoder(widths, num_classes, channels=decoder_channels or decoder_embed_dim(variant), dropout=dropout)
        self.taps.declare("decoder.out", self.decoder.out_channels, 4, after_fusion=True)
        self.taps.declare("head.logits", num_classes, 4, "logits", after_fusion=True)
        self.apply(_init_cmnext_weights)
        self._attentions = [m for m in rgb.modules() if isinstance(m, PvtAttention)]
        self._fused_attn: bool | None = None
        if mit_weights is not None:
            load_mit_imagenet(self, mit_weights)

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """RGB: the MiT branch. An auxiliary modality: the whole auxiliary branch when it is the
        only one; otherwise its own patch-embedding LayerNorms and hub scorers (the embedding
        convolutions, PPX blocks and norms are shared by the auxiliary modalities)."""
        if modality not in self.modalities:
            raise ValueError(f"{modality!r} is not one of this model's modalities {self.modalities}")
        if modality == "rgb":
            yield from self.encoders["rgb"].parameters()
            return
        if len(self.auxiliary_modalities) == 1:
            yield from self.auxiliary.parameters()
            return
        i = self.auxiliary_modalities.index(modality)
        for embed, hub in zip(self.auxiliary.embeds, self.auxiliary.hubs):
            yield from embed.norms[i].parameters()
            yield from hub.scores[i].parameters()

    def forward_streams(self, xs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Both branches and the fusion, stage by stage; returns the four fused features.

        Per stage ``k`` (the authors' ``CMNeXt.forward``): the RGB stage runs on the previous
        rectified RGB feature; each auxiliary feature is patch-embedded, the hub (``M >= 2``)
        selects one feature, the PPX blocks and a LayerNorm follow; FRM rectifies both, FFM fuses
        them. The next stage's auxiliary inputs are the rectified auxiliary feature ``f`` with one
        modality, and with ``M >= 2`` each modality's hub-weighted feature ``x_m`` plus ``f``, where
        the authors read ``x_m`` ``(B, C, h, w)`` as if it were ``(B, h, w, C)``
        (``x_m.reshape(B, h, w, C).permute(0, 3, 1, 2)``, which permutes its elements); the
        released weights were trained with that arithmetic, so it is kept.
        """
        rgb_in = xs["rgb"]
        self._fused_attn = select_attention_kernel(self._attentions, rgb_in, self._fused_attn)
        aux = [xs[m] for m in self.auxiliary_modalities]
        if self.replicate_x:  # (B, 1, H, W) -> (B, 3, H, W), as the authors' loader repeats them
            aux = [x.expand(-1, 3, -1, -1) for x in aux]
        branch = self.auxiliary
        fused_feats: list[torch.Tensor] = []
        x = rgb_in
        for k, stage in enumerate(self.stage_names):
            x = self.taps(f"rgb.{stage}", self.encoders["rgb"].forward_stage(k, x))
            embedded = branch.embeds[k](aux)
            embedded = [self.taps(f"{m}.{stage}", e) for m, e in zip(self.auxiliary_modalities, embedded)]
            if branch.hubs is not None:
                f, embedded, scores = branch.hubs[k](embedded)
                self.taps(f"fused.{stage}.scores", scores)
            else:
                f = embedded[0]
            for block in branch.blocks[k]:
                f = block(f)
            f = self.taps(f"fused.{stage}.hub", branch.norms[k](f))
            result = self.fusions[stage]([x, f])
            fused_feats.append(self.taps(f"fused.{stage}", result.fused))
            self.taps(f"fused.{stage}.gate", result.details["gate"])
            self.taps(f"fused.{stage}.attn", result.details["attn"])
            x, f = result.streams
            if branch.hubs is not None:
                b, _, h, w = f.shape
                aux = [e.reshape(b, h, w, -1).permute(0, 3, 1, 2) + f for e in embedded]
            else:
                aux = [f]
        return fused_feats

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        return self.taps("head.logits", self.decode(self.decoder, self.forward_streams(xs)))


# ----------------------------------------------------------------------------- authors' keys
def _cmnext_rules() -> list[tuple[str, str]]:
    """The authors' ``CMNeXt`` keys (``backbone.*``, ``decode_head.*``) -> ours; ``<\\1-1>`` /
    ``<\\1+1>`` are evaluated by :func:`fusionzoo.models.published.cmx._shift`."""
    aux = r"backbone\.extra_"
    return [
        (rf"{aux}downsample_layers\.([0-3])\.proj\.module\.(weight|bias)", r"auxiliary.embeds.\1.proj.\2"),
        (rf"{aux}downsample_layers\.([0-3])\.norm\.ln_(\d+)\.(weight|bias)", r"auxiliary.embeds.\1.norms.\2.\3"),
        (rf"{aux}score_predictor\.([0-3])\.score_nets\.(\d+)\.([01])\.(weight|bias)", r"auxiliary.hubs.\1.scores.\2.\3.\4"),
        (rf"{aux}block([1-4])\.(\d+)\.attn\.conv0\.(weight|bias)", r"auxiliary.blocks.<\1-1>.\2.attn.dwconv.\3"),
        (rf"{aux}block([1-4])\.(\d+)\.attn\.conv4\.(weight|bias)", r"auxiliary.blocks.<\1-1>.\2.attn.proj.\3"),
        (rf"{aux}block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)", r"auxiliary.blocks.<\1-1>.\2.mlp.dwconv.\3"),
        (rf"{aux}block([1-4])\.(\d+)\.c_nets\.0\.weight", r"auxiliary.blocks.<\1-1>.\2.channel_mix.weight"),
        (rf"{aux}block([1-4])\.(\d+)\.((?:norm[12]|mlp\.fc[12])\.\w+|layer_scale_[12])", r"auxiliary.blocks.<\1-1>.\2.\3"),
        (rf"{aux}norm([1-4])\.(weight|bias)", r"auxiliary.norms.<\1-1>.\2"),
        *_mit_rules("backbone.", "encoders.rgb.segments"),
        (r"backbone\.FRMs\.([0-3])\.(.+)", r"fusions.stage<\1+1>.frm.\2"),
        (r"backbone\.FFMs\.([0-3])\.(.+)", r"fusions.stage<\1+1>.ffm.\2"),
        (r"decode_head\.linear_c([1-4])\.proj\.(weight|bias)", r"decoder.linear.<\1-1>.\2"),
        (r"decode_head\.linear_fuse\.conv\.weight", r"decoder.fuse.0.weight"),
        (r"decode_head\.linear_fuse\.bn\.(.+)", r"decoder.fuse.1.\1"),
        (r"decode_head\.linear_pred\.(weight|bias)", r"decoder.classifier.\1"),
    ]


def convert_cmnext(state_dict: dict[str, torch.Tensor]) -> StateDict:
    """The authors' CMNeXt state dict (``semseg.models.CMNeXt``: ``backbone.*``, ``decode_head.*``;
    their ``train_mm.py`` saves it bare) -> ours. Every tensor maps one to one; nothing is folded.
    The auxiliary modalities' order is the checkpoint's (``ln_0``, ``score_nets.0`` belong to
    the first auxiliary modality, as in the authors' ``MODALS`` list).

    Raises:
        ConversionError: a key that is not part of the network, named.
    """
    renamed = rename_keys(state_dict, _cmnext_rules(), where="the CMNeXt checkpoint")
    return {_shift(k): v for k, v in renamed.items()}


# ----------------------------------------------------------------------------- entry points
ACCEPTS = ("num_classes", "modalities", "pretrained", "decoder_channels", "dropout", "drop_path_rate", "replicate_x", "mit_weights")


def _entry(variant: str) -> Callable[..., nn.Module]:
    return register_mit_entry(
        "cmnext", variant, CMNeXtMiT, title="CMNeXt", paper=PAPER, accepts=ACCEPTS, max_modalities=None,
        reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
    )


cmnext_mit_b0 = _entry("b0")
cmnext_mit_b1 = _entry("b1")
cmnext_mit_b2 = _entry("b2")
cmnext_mit_b3 = _entry("b3")
cmnext_mit_b4 = _entry("b4")
cmnext_mit_b5 = _entry("b5")

register_converter(*(f"cmnext_mit_{v}" for v in MIT_DEPTHS), classifier_key="decode_head.linear_pred.weight")(convert_cmnext)

# ----------------------------------------------------------------------------- released weights
# The authors' README (reference commit) links one Google Drive folder per dataset and names the
# files in it; they publish no sha256. mIoU as their README's model-zoo tables report it.
DELIVER_CLASSES = (
    "Building", "Fence", "Other", "Pedestrian", "Pole", "RoadLine", "Road", "SideWalk", "Vegetation", "Cars",
    "Wall", "TrafficSign", "Sky", "Ground", "Bridge", "RailTrack", "GroundRail", "TrafficLight", "Static",
    "Dynamic", "Water", "Terrain", "TwoWheeler", "Bus", "Truck",
)  # fmt: skip
KITTI360_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
_IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
_AUX = {"mean": AUX_MEAN, "std": AUX_STD}
_DELIVER_URL = "https://drive.google.com/drive/folders/1OWteEOrjfrC3VNg3sxJFZPHz9urkZ3lm?usp=share_link"
_KITTI360_URL = "https://drive.google.com/drive/folders/1OXfBNNcwMCQWGmvOqvkAHd8xViKJ6djf?usp=share_link"
# The authors' modality letters (D = HHA-encoded depth, E = event, L = LiDAR) -> fusionzoo's names.
_LETTERS = {"d": "hha", "e": "event", "l": "lidar"}
_MIOU = {  # README: DeLiVER, KITTI-360 (CMNeXt on MiT-B2)
    "deliver": {"rgbd": 63.58, "rgbe": 57.48, "rgbl": 58.04, "rgbde": 64.44, "rgbdl": 65.50, "rgbdel": 66.30},
    "kitti360": {"rgbd": 65.09, "rgbe": 66.13, "rgbl": 65.26, "rgbde": 67.73, "rgbdl": 66.55, "rgbdel": 67.84},
}
for _dataset, _url, _classes, _label in (
    ("deliver", _DELIVER_URL, DELIVER_CLASSES, "DeLiVER, 25 classes"),
    ("kitti360", _KITTI360_URL, KITTI360_CLASSES, "KITTI-360, 19 classes"),
):
    for _combo, _miou in _MIOU[_dataset].items():
        _mods = ("rgb", *(_LETTERS[c] for c in _combo[3:]))
        register_weights(ReleasedWeights(
            name="cmnext_mit_b2", tag=f"{_dataset}_{_combo}", url=_url,
            filename=f"cmnext_b2_{_dataset}_{_combo}.pth", num_classes=len(_classes), modalities=_mods,
            reported=f"mIoU {_miou:.2f} ({_label}; README model zoo, CMNeXt-{'-'.join(['RGB', *_combo[3:].upper()])})",
            class_names=_classes, normalization={m: _IMAGENET if m == "rgb" else _AUX for m in _mods},
        ))
register_weights(ReleasedWeights(
    name="cmnext_mit_b4", tag="nyuv2",
    url="https://drive.google.com/drive/folders/1OXrMv1Mi6E-vyedlkNpfc5ibJeJDfwqq?usp=share_link",
    filename="cmnext_b4_nyu_rgbd.pth", num_classes=40, modalities=("rgb", "hha"),
    reported="mIoU 56.9 (NYUDv2, 40 classes; README and paper, MiT-B4, multi-scale + flip as configs/nyu_rgbd.yaml evaluates)",
    class_names=NYUV2_CLASSES, normalization={"rgb": _IMAGENET, "hha": _AUX},
))
register_weights(ReleasedWeights(
    name="cmnext_mit_b4", tag="mfnet",
    url="https://drive.google.com/drive/folders/1OaOHMbD5P_HPwTzzXwdYRUFIiGkyFQfP?usp=share_link",
    filename="cmnext_b4_mfnet_rgbt.pth", num_classes=9, modalities=("rgb", "thermal"),
    reported="mIoU 59.9 (MFNet, 9 classes; README and paper, MiT-B4, single scale); thermal repeated to 3 channels",
    class_names=MFNET_CLASSES, normalization={"rgb": _IMAGENET, "thermal": _AUX},
))
