"""DFormer as published: ``dformer_tiny``, ``dformer_small``, ``dformer_base``, ``dformer_large``.

Yin, Zhang, Li, Liu, Cheng, Hou, "DFormer: Rethinking RGBD Representation Learning for Semantic
Segmentation", ICLR 2024 (Sec. 3, Table 2). The reference is the authors' repository
(:data:`REFERENCE_REPO` at :data:`REFERENCE_COMMIT`), configurations
``local_configs/NYUDepthv2/DFormer_{Tiny,Small,Base,Large}.py``; its state dict maps onto these
models tensor for tensor (:func:`convert_dformer`), and ``tests/test_parity_dformer.py`` checks
the outputs against numbers computed by the authors' code.

The network, to the parameter:

- **one RGB-D backbone with two streams** (Sec. 3.1): an RGB stream of widths ``C_i`` and a depth
  stream of widths ``C_i / 2``, each with its own stem (two stride-2 3x3 convolutions with
  BatchNorm, GELU between them) and its own downsampling layers (BatchNorm, stride-2 3x3
  convolution), and shared RGB-D blocks in which the streams interact (:class:`DFormerBlock`);
- the RGB-D block (Sec. 3.2, Fig. 3): *global awareness attention* (GAA, stages 2-4: queries
  pooled to 7x7 from the concatenated RGB and depth features attend over the RGB keys and
  values) and *local enhancement attention* (LEA: a depthwise 7x7 convolution of the depth
  features gates a projection of the RGB features), then an MLP with a 3x3 depthwise positional
  convolution; layer scale on every residual; the last block of stage 4 updates only the RGB
  stream (it has no depth projection, depth layer scales or depth MLP);
- MLP ratios (8, 8, 4, 4), heads (1, 2, 4, 8), widths and depths per variant (:data:`VARIANTS`);
  stochastic depth linear over all blocks (0.1, 0.15 for Large, as the NYUDepthv2 configs);
- **the Ham decoder** (``LightHamHead`` of Geng et al., "Is Attention Better Than Matrix
  Decomposition?", ICLR 2021; the configs' ``C.decoder = "ham"``) over the RGB stream's stages
  2-4: resized to stride 8, concatenated, squeezed by a 1x1 ConvBNReLU to 512 channels, the
  Hamburger (1x1 conv with bias, ReLU, non-negative matrix factorization with 64 bases, 1x1
  conv + BN, residual, ReLU), a 1x1 ConvBNReLU to ``decoder_channels``, dropout 0.1 and a 1x1
  classifier; logits at stride 8, upsampled bilinearly to the input. Decoder BatchNorm eps 1e-3
  (the configs' ``C.bn_eps``, set by their ``init_weight``).

**Randomness of the NMF.** The authors draw fresh bases ``U(0, 1)`` (then L2-normalized over
channels) at every forward, in training and in evaluation, from the global CPU generator
(``torch.rand`` then ``.cuda()``); the multiplicative updates run 6 steps in training and 7 in
evaluation, with gradients through every step. Training mode here does exactly that (the same
draw from the same generator, so ``torch.manual_seed(s)`` before a forward gives their bases).
Evaluation mode is deterministic by default: the bases come from a CPU generator seeded
``nmf_eval_seed`` (0), one ``(D, 64)`` draw shared by every image of the batch, so an image's
output does not depend on the call or on its batch; ``nmf_eval_seed=None`` restores the authors'
per-call draw from the global generator.

**Inputs.** RGB, and depth as the authors' loader gives it: an 8-bit depth image (their NYUDv2 /
SUN RGB-D PNGs are the raw depth scaled per image to 0-255), ``/ 255``, normalized with mean 0.48
and std 0.28. Their loader replicates it to three channels, and their backbone uses only the
first (``x_e[:, 0]``); so ``depth`` is one channel here, and ``in_chans={"depth": 3}`` takes a
3-channel input of which, as theirs, only the first channel is used.

**Taps** (one backbone, two interacting streams): ``{rgb}.stem`` and ``{x}.stem`` (each
modality's own stem, before any interaction, stride 4); per stage ``fused.stageN`` (the RGB
stream's output, ``C_N`` channels: it carries both modalities after the stage's RGB-D blocks, and
stages 2-4 are the decoder's inputs) and ``{x}.stageN`` (the depth stream, ``C_N / 2`` channels;
for stage 4 the value the last block leaves, the LEA branch's depth features, since that block
has no depth residual); ``decoder.ham`` (Hamburger output, 512 channels, stride 8),
``decoder.out`` (before dropout and classifier, stride 8) and ``head.logits`` (stride 8).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from ..._registry import ReleasedWeights, register_weights
from ...classes import NYU40_CLASSES
from ...fusion._common import DepthwiseConv2d
from ...heads.segformer import upsampled_projection
from ..base import FusionModel
from ..convert import StateDict, published_entry, read_authors_checkpoint, register_converter, rename_keys

REFERENCE_REPO = "https://github.com/VCIP-RGBD/DFormer"
REFERENCE_COMMIT = "814799bb1f39eb380f72fdea1cd591f2cc27b6aa"
PAPER = (
    "Yin, Zhang, Li, Liu, Cheng, Hou, 'DFormer: Rethinking RGBD Representation Learning for Semantic "
    "Segmentation', ICLR 2024"
)

# name -> (stage widths C_i of the RGB stream, blocks per stage, the paper's name); the depth
# stream is C_i / 2 wide (models/encoders/DFormer.py of the reference: DFormer_Tiny .. _Large).
VARIANTS: dict[str, tuple[tuple[int, int, int, int], tuple[int, int, int, int], str]] = {
    "tiny": ((32, 64, 128, 256), (3, 3, 5, 2), "DFormer-T"),
    "small": ((64, 128, 256, 512), (2, 2, 4, 2), "DFormer-S"),
    "base": ((64, 128, 256, 512), (3, 3, 12, 2), "DFormer-B"),
    "large": ((96, 192, 288, 576), (3, 3, 12, 2), "DFormer-L"),
}
MLP_RATIOS = (8, 8, 4, 4)
NUM_HEADS = (1, 2, 4, 8)
WINDOWS = (0, 7, 7, 7)  # GAA's pooled query grid per stage; 0: no GAA (stage 1)
# C.drop_path_rate of local_configs/NYUDepthv2/DFormer_*.py (SUNRGBD's Large config uses 0.2).
DROP_PATH = {"tiny": 0.1, "small": 0.1, "base": 0.1, "large": 0.15}
LAYER_SCALE_INIT = 1e-6
LN_EPS = 1e-6
HAM_CHANNELS = 512  # LightHamHead's ham_channels (its default; the configs do not set it)
DECODER_CHANNELS = 512  # C.decoder_embed_dim
DECODER_BN_EPS = 1e-3  # C.bn_eps, applied to the decoder's BatchNorm by the authors' init_weight
NMF_BASES = 64  # MD_R
NMF_STEPS = {"train": 6, "eval": 7}  # TRAIN_STEPS, EVAL_STEPS
NMF_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH_MEAN, DEPTH_STD = 0.48, 0.28  # the authors' loader, x_is_single_channel (dataloader.py)


# ----------------------------------------------------------------------------- backbone
class DFormerMLP(nn.Module):
    """LayerNorm -> Linear (x ratio) -> + depthwise 3x3 conv of itself -> GELU -> Linear.
    Channels-last ``(B, H, W, C)`` in and out."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.pos = DepthwiseConv2d(hidden, hidden, 3, padding=1, groups=hidden)  # on a channels-last view
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.norm(x)).permute(0, 3, 1, 2)  # (B, hidden, H, W)
        x = self.pos(x, plus_input=True)  # pos(x) + x
        return self.fc2(self.act(x.permute(0, 2, 3, 1)))


class DFormerAttention(nn.Module):
    """GAA + LEA of the RGB-D block (Sec. 3.2) on channels-last ``x`` (B, H, W, C) and depth
    ``e`` (B, H, W, C/2); returns the RGB update (C) and, unless ``last``, the depth update (C/2).

    - local: ``a = Linear(dwconv7x7(GELU(Linear(x))))``, ``x_local = Linear_q(x) * a``;
    - LEA: ``e' = Linear(dwconv7x7(Linear(e)))`` gates ``Linear(x)`` (C/2 channels);
    - GAA (``window`` > 0): queries are the concatenated (x, e) pooled to ``window x window`` and
      projected to C/2; keys and values come from ``GELU(Linear(x))``; the ``window x window``
      result is resized bilinearly back to H x W;
    - the concatenation goes through ``proj`` (to C) and ``proj_e`` (to C/2).
    """

    def __init__(self, dim: int, heads: int, window: int, last: bool) -> None:
        super().__init__()
        half = dim // 2
        self.heads, self.window, self.last = heads, window, last
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_e = nn.LayerNorm(half, eps=LN_EPS)
        self.q = nn.Linear(dim, dim)
        self.q_cut = nn.Linear(dim, half)
        self.a = nn.Linear(dim, dim)
        self.l = nn.Linear(dim, dim)  # the authors' name, kept for the checkpoint keys
        self.conv = DepthwiseConv2d(dim, dim, 7, padding=3, groups=dim)  # channels-last views, as pos
        self.e_conv = DepthwiseConv2d(half, half, 7, padding=3, groups=half)
        self.e_fore = nn.Linear(half, half)
        self.e_back = nn.Linear(half, half)
        cat = dim * 2 if window else half * 3  # [x_local (C), GAA (C/2)?, LEA (C/2)]
        if window:
            self.short_cut_linear = nn.Linear(half * 3, half)
            self.kv = nn.Linear(dim, dim)
            self.pool = nn.AdaptiveAvgPool2d((window, window))
        self.proj = nn.Linear(cat, dim)
        if not last:
            self.proj_e = nn.Linear(cat, half)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = x.shape
        xn, en = self.norm(x), self.norm_e(e)
        q = self.q(xn)
        cut = self.q_cut(xn)
        x = self.act(self.l(xn).permute(0, 3, 1, 2))  # (B, C, H, W)
        a = self.a(self.conv(x).permute(0, 2, 3, 1))
        parts = [q * a]
        if self.window:
            d = c // self.heads // 2  # per-head width of GAA
            kv = self.kv(x.permute(0, 2, 3, 1)).reshape(b, h * w, 2, self.heads, d).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)  # (B, heads, HW, d)
            pooled = self.pool(torch.cat([xn, en], dim=3).permute(0, 3, 1, 2))
            m = self.short_cut_linear(pooled.permute(0, 2, 3, 1)).reshape(b, -1, self.heads, d).permute(0, 2, 1, 3)
            attn = ((m * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, window^2, HW)
            g = (attn @ v).reshape(b, self.heads, self.window, self.window, d).permute(0, 1, 4, 2, 3)
            g = F.interpolate(g.reshape(b, c // 2, self.window, self.window), (h, w), mode="bilinear", align_corners=False)
            parts.append(g.permute(0, 2, 3, 1))
        e = self.e_back(self.e_conv(self.e_fore(en).permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        parts.append(cut * e)
        x = torch.cat(parts, dim=3)
        return self.proj(x), (e if self.last else self.proj_e(x))


class DFormerBlock(nn.Module):
    """RGB-D block: attention and MLP residuals with layer scale on both streams (the last block
    of the network: RGB stream only, ``e`` passes through as the attention's LEA features)."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int, drop_path: float, last: bool) -> None:
        super().__init__()
        self.last = last
        self.attn = DFormerAttention(dim, heads, window, last)
        self.mlp = DFormerMLP(dim, mlp_ratio)
        # One module for every residual branch, as the authors' dropout_layer (independent masks per call).
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        if not last:
            self.layer_scale_1_e = nn.Parameter(torch.full((dim // 2,), LAYER_SCALE_INIT))
            self.layer_scale_2_e = nn.Parameter(torch.full((dim // 2,), LAYER_SCALE_INIT))
            self.mlp_e2 = DFormerMLP(dim // 2, mlp_ratio)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        res_x, res_e = x, e
        dx, de = self.attn(x, e)
        x = res_x + self.drop_path(self.layer_scale_1 * dx)
        x = x + self.drop_path(self.layer_scale_2 * self.mlp(x))
        if self.last:
            return x, de
        e = res_e + self.drop_path(self.layer_scale_1_e * de)
        e = e + self.drop_path(self.layer_scale_2_e * self.mlp_e2(e))
        return x, e


def _stem(cin: int, mid: int, cout: int) -> nn.Sequential:
    """Two stride-2 3x3 convolutions (with bias) with BatchNorm, GELU between: stride 4."""
    return nn.Sequential(
        nn.Conv2d(cin, mid, 3, stride=2, padding=1), nn.BatchNorm2d(mid), nn.GELU(),
        nn.Conv2d(mid, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout),
    )


def _downsample(cin: int, cout: int) -> nn.Sequential:
    """BatchNorm, then a stride-2 3x3 convolution (with bias)."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride=2, padding=1))


class DFormerBackbone(nn.Module):
    """The RGB-D backbone (module docstring): ``downsample_layers`` / ``downsample_layers_e`` (stem
    first) and ``stages`` of :class:`DFormerBlock`, named as the authors' so keys map by prefix."""

    def __init__(self, dims: Sequence[int], depths: Sequence[int], drop_path_rate: float) -> None:
        super().__init__()
        self.dims = tuple(dims)
        self.downsample_layers = nn.ModuleList([_stem(3, dims[0] // 2, dims[0])])
        self.downsample_layers_e = nn.ModuleList([_stem(1, dims[0] // 4, dims[0] // 2)])
        for cin, cout in itertools.pairwise(dims):
            self.downsample_layers.append(_downsample(cin, cout))
            self.downsample_layers_e.append(_downsample(cin // 2, cout // 2))
        # Linear over all blocks; under a meta device the schedule is still computed on the CPU.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            self.stages.append(nn.Sequential(*[
                DFormerBlock(dim, NUM_HEADS[i], WINDOWS[i], MLP_RATIOS[i], rates[cur + j], last=(i == 3 and j == depth - 1))
                for j in range(depth)
            ]))
            cur += depth


# ----------------------------------------------------------------------------- Ham decoder
class NMF2D(nn.Module):
    """Non-negative matrix factorization of ``(B, C, H, W)`` as ``C x HW`` into 64 bases by
    multiplicative updates (Hamburger's "ham"; ``S`` = 1, ``inv_t`` = 1), no parameters.

    Args:
        eval_seed: the bases' seed in evaluation mode (module docstring); ``None``: the authors'
            draw from the global generator at every call (then the model cannot be exported).
        dim: ``D`` (channels) of the inputs, so the seeded evaluation bases are drawn once.
    """

    def __init__(self, bases: int = NMF_BASES, eval_seed: int | None = 0, dim: int | None = None) -> None:
        super().__init__()
        self.rank = bases
        self.dim = dim  # D of the inputs, when known: the seeded evaluation bases are drawn once
        self.eval_seed = eval_seed

    @property
    def eval_seed(self) -> int | None:
        return self._eval_seed

    @eval_seed.setter
    def eval_seed(self, seed: int | None) -> None:
        # The seeded draw is made here, once, not in forward: the same values as drawing at every
        # call, and an exported graph (torch.export, ONNX) holds them as a constant (torch's ONNX
        # exporter cannot convert aten.rand with a generator). Kept out of the state dict.
        self._eval_seed = seed
        self._eval_draw = None if seed is None or self.dim is None else self._seeded_draw(seed, self.dim)

    def _seeded_draw(self, seed: int, dim: int) -> torch.Tensor:
        """``(1, D, R)`` float32 ``U(0, 1)`` from a CPU generator seeded ``seed`` (also under a
        meta-device context: the draw is real)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.rand((1, dim, self.rank), generator=g, device="cpu")

    def initial_bases(self, batch: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        """``(B, D, R)`` bases ``U(0, 1)``, L2-normalized over ``D``. Drawn on the CPU, as the
        authors draw them before moving them to the GPU, so a seed gives their bases anywhere."""
        if self.training or self.eval_seed is None:
            if torch.compiler.is_exporting():
                raise RuntimeError(
                    "DFormer's NMF draws new random bases at every call (nmf_eval_seed=None or training mode), "
                    "which an exported graph cannot reproduce: build the model with nmf_eval_seed=<int> "
                    "(the default, 0) and export it in eval mode")
            bases = torch.rand((batch, dim, self.rank), device="cpu")
        else:
            draw = self._eval_draw if self._eval_draw is not None and dim == self.dim else self._seeded_draw(self.eval_seed, dim)
            bases = draw.expand(batch, -1, -1)
        return F.normalize(bases.to(device=like.device, dtype=like.dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)  # (B, D, N)
        bases = self.initial_bases(b, c, x)  # (B, D, R)
        coef = F.softmax(torch.bmm(x.transpose(1, 2), bases), dim=-1)  # (B, N, R)
        for _ in range(NMF_STEPS["train" if self.training else "eval"]):
            coef = self._update_coef(x, bases, coef)
            # bases <- bases * (X C) / (B C^T C)
            bases = bases * torch.bmm(x, coef) / (bases.bmm(coef.transpose(1, 2).bmm(coef)) + NMF_EPS)
        coef = self._update_coef(x, bases, coef)
        return torch.bmm(bases, coef.transpose(1, 2)).reshape(b, c, h, w)

    @staticmethod
    def _update_coef(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        # coef <- coef * (X^T B) / (C B^T B)
        return coef * torch.bmm(x.transpose(1, 2), bases) / (coef.bmm(bases.transpose(1, 2).bmm(bases)) + NMF_EPS)


class ConvBN(nn.Sequential):
    """1x1 convolution without bias, BatchNorm (eps 1e-3), optionally ReLU (mmcv's ConvModule layout)."""

    def __init__(self, cin: int, cout: int, relu: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=DECODER_BN_EPS)
        if relu:
            self.act = nn.ReLU(inplace=True)


class LightHamDecoder(nn.Module):
    """The Ham decoder over stages 2-4 (module docstring); ``forward`` returns the embedding
    (tap ``decoder.out``), :meth:`classify` the logits at stride 8."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int, dropout: float, nmf_eval_seed: int | None) -> None:
        super().__init__()
        self.squeeze = ConvBN(sum(in_channels), HAM_CHANNELS, relu=True)
        self.ham_in = nn.Conv2d(HAM_CHANNELS, HAM_CHANNELS, 1)
        self.ham = NMF2D(eval_seed=nmf_eval_seed, dim=HAM_CHANNELS)
        self.ham_out = ConvBN(HAM_CHANNELS, HAM_CHANNELS, relu=False)
        self.align = ConvBN(HAM_CHANNELS, channels, relu=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.out_channels = channels
        # The authors' init_weight: Kaiming-normal (fan_in, relu) for every decoder convolution.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def hamburger(self, x: torch.Tensor) -> torch.Tensor:
        enjoy = self.ham_out(self.ham(F.relu(self.ham_in(x))))
        return F.relu(x + enjoy)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))


# ----------------------------------------------------------------------------- the model
class DFormer(FusionModel):
    """DFormer, the authors' network (module docstring), as a fusionzoo model.

    Args:
        variant: ``"tiny"``, ``"small"``, ``"base"`` or ``"large"``.
        num_classes: ``K`` (40 for NYUDv2, 37 for SUN RGB-D).
        modalities: RGB, then depth (``("rgb", "depth")``; another name for the second stream works).
        in_chans: channels of the second stream's input, 1 (default) or 3 (the first is used).
        pretrained: ``False`` (the entry points also take a released tag); the authors' RGB-D
            ImageNet backbone is ``encoder_weights``.
        decoder_channels: the decoder's output embedding (512, ``C.decoder_embed_dim``).
        dropout: before the classifier (0.1).
        drop_path_rate: stochastic depth (the variant's NYUDepthv2 config by default; 0 for exact
            train-mode comparisons).
        nmf_eval_seed: seed of the NMF bases in evaluation (0); ``None``: the authors' random draw.
        encoder_weights: the authors' RGB-D ImageNet-pretrained backbone file
            (``DFormer_Tiny.pth.tar`` ..., their ``C.pretrained_model``), as their ``init_weights``.
    """

    def __init__(
        self,
        variant: str,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "depth"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        decoder_channels: int = DECODER_CHANNELS,
        dropout: float = 0.1,
        drop_path_rate: float | None = None,
        nmf_eval_seed: int | None = 0,
        encoder_weights: str | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown DFormer variant {variant!r}; choose one of {sorted(VARIANTS)}")
        if pretrained is not False:
            raise ValueError(
                f"dformer_{variant}: pretrained=True has no timm weights to load; pass a released tag "
                f"(pretrained='nyuv2' or 'sunrgbd'), or the authors' RGB-D ImageNet backbone as "
                f"encoder_weights='checkpoints/pretrained/DFormer_{variant.capitalize()}.pth.tar'"
            )
        super().__init__(modalities, num_classes, in_chans)
        if len(self.modalities) != 2 or self.modalities[0] != "rgb":
            raise ValueError(f"dformer_{variant} takes RGB then depth, e.g. ('rgb', 'depth'); got {self.modalities}")
        rgb, aux = self.modalities
        if self.in_chans[rgb] != 3 or self.in_chans[aux] not in (1, 3):
            raise ValueError(
                f"dformer_{variant} takes a 3-channel {rgb!r} and a 1- or 3-channel {aux!r} (of which the first "
                f"channel is used, as the authors' backbone), got in_chans={self.in_chans}"
            )
        self.variant = variant
        dims, depths, _ = VARIANTS[variant]
        self.drop_path_rate = DROP_PATH[variant] if drop_path_rate is None else drop_path_rate
        self.encoder = DFormerBackbone(dims, depths, self.drop_path_rate)
        self.decoder = LightHamDecoder(dims[1:], num_classes, decoder_channels, dropout, nmf_eval_seed)
        self.taps.declare(f"{rgb}.stem", dims[0], 4)  # each stream's own stem: before any interaction
        self.taps.declare(f"{aux}.stem", dims[0] // 2, 4)
        # Every RGB-D block mixes the streams both ways (LEA gates RGB with depth; the depth update
        # projects the concatenation; Sec. 3.2), from the first block of stage 1 on.
        for i, dim in enumerate(dims):
            self.taps.declare(f"fused.stage{i + 1}", dim, 4 * 2**i, after_fusion=True)
            self.taps.declare(f"{aux}.stage{i + 1}", dim // 2, 4 * 2**i, after_fusion=True)
        self.taps.declare("decoder.ham", HAM_CHANNELS, 8, after_fusion=True)
        self.taps.declare("decoder.out", decoder_channels, 8, after_fusion=True)
        self.taps.declare("head.logits", num_classes, 8, "logits", after_fusion=True)
        if encoder_weights is not None:
            self.load_encoder_weights(encoder_weights)

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """The stream's own stem and downsampling layers (the blocks mix both streams)."""
        if modality not in self.modalities:
            raise ValueError(f"{modality!r} is not one of this model's modalities {self.modalities}")
        layers = self.encoder.downsample_layers if modality == self.modalities[0] else self.encoder.downsample_layers_e
        yield from layers.parameters()

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        """Logits ``(B, K, H/8, W/8)``; fires every tap once."""
        rgb, aux = self.modalities
        x, e = xs[rgb], xs[aux][:, :1]  # the authors' backbone takes the first depth channel
        enc = self.encoder
        feats = []
        for i, stage in enumerate(enc.stages):
            x, e = enc.downsample_layers[i](x), enc.downsample_layers_e[i](e)
            if i == 0:
                x, e = self.taps(f"{rgb}.stem", x), self.taps(f"{aux}.stem", e)
            x, e = x.permute(0, 2, 3, 1), e.permute(0, 2, 3, 1)  # blocks run channels-last
            for block in stage:
                x, e = block(x, e)
            x, e = x.permute(0, 3, 1, 2), e.permute(0, 3, 1, 2)
            feats.append(self.taps(f"fused.stage{i + 1}", x))
            e = self.taps(f"{aux}.stage{i + 1}", e)
        dec = self.decoder
        # The squeeze (1x1 conv over stages 2-4 resized to stride 8 and concatenated) as each stage's
        # slice of its weight applied at the stage's own resolution, then resized and summed: the
        # same function, 0.15 instead of 0.59 GMAC forward for DFormer-B at 256x320.
        squeeze = dec.squeeze
        weights = squeeze.conv.weight.flatten(1).split([f.shape[1] for f in feats[1:]], dim=1)
        y = squeeze.act(squeeze.bn(upsampled_projection(feats[1:], weights)))
        y = self.taps("decoder.ham", dec.hamburger(y))
        y = self.taps("decoder.out", dec.align(y))
        return self.taps("head.logits", dec.classify(y))

    def load_encoder_weights(self, path: str) -> None:
        """The authors' RGB-D ImageNet-pretrained backbone (``DFormer_Tiny.pth.tar`` ...) into the
        encoder, as their ``DFormer.init_weights``: ``state_dict_ema`` if present, else
        ``state_dict``; a ``backbone.`` / ``module.`` prefix is dropped. Keys that are not part of
        the segmentation backbone (the ImageNet classifier) are skipped with a warning naming them.

        Raises:
            FileNotFoundError, ConversionError: no such file, or not a checkpoint.
            ValueError: a backbone tensor the file does not provide, or one of another shape.
        """
        try:  # their pretraining files hold the EMA weights beside the raw ones
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001  (any unreadable file: read_authors_checkpoint names the problem)
            raw = None
        if isinstance(raw, Mapping) and isinstance(raw.get("state_dict_ema"), Mapping):
            weights = dict(raw["state_dict_ema"])
        else:
            weights = read_authors_checkpoint(path)
        weights = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in weights.items()}
        own = self.encoder.state_dict()
        skipped = sorted(k for k in weights if k not in own)
        missing = [k for k in own if k not in weights]
        if missing:
            raise ValueError(f"{path}: no tensor for backbone key {missing[0]!r} ({len(missing)} missing); is it DFormer-{self.variant}?")
        wrong = [k for k in own if tuple(weights[k].shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"{path}: {wrong[0]!r} has shape {tuple(weights[wrong[0]].shape)}, the {self.variant} backbone {tuple(own[wrong[0]].shape)}")
        if skipped:
            warnings.warn(f"{path}: {len(skipped)} keys are not part of the segmentation backbone and were skipped: {skipped[:5]}", stacklevel=2)
        self.encoder.load_state_dict({k: weights[k] for k in own})


# ----------------------------------------------------------------------------- authors' keys
# EncoderDecoder of models/builder.py: backbone.* (names kept), decode_head.* (LightHamHead).
AUTHORS_RULES: list[tuple[str, str]] = [
    (r"backbone\.(.+)", r"encoder.\1"),
    (r"decode_head\.squeeze\.(conv|bn)\.(.+)", r"decoder.squeeze.\1.\2"),
    (r"decode_head\.hamburger\.ham_in\.conv\.(weight|bias)", r"decoder.ham_in.\1"),
    (r"decode_head\.hamburger\.ham_out\.(conv|bn)\.(.+)", r"decoder.ham_out.\1.\2"),
    (r"decode_head\.align\.(conv|bn)\.(.+)", r"decoder.align.\1.\2"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"decoder.classifier.\1"),
]


def convert_dformer(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The authors' DFormer state dict (``EncoderDecoder``: ``backbone.*``, ``decode_head.*``;
    released files hold it under ``model``) -> ours: a renaming, nothing folded.

    Raises:
        ConversionError: a key that is not part of the network (e.g. an ``aux_head`` of a run with
            ``C.aux_rate > 0``), named.
    """
    return rename_keys(state_dict, AUTHORS_RULES, where="the DFormer checkpoint")


# ----------------------------------------------------------------------------- entry points
ACCEPTS = (
    "num_classes", "modalities", "in_chans", "pretrained", "decoder_channels", "dropout", "drop_path_rate",
    "nmf_eval_seed", "encoder_weights",
)


def _entry(variant: str) -> Callable[..., nn.Module]:
    return published_entry(
        f"dformer_{variant}", partial(DFormer, variant),
        doc=f"{VARIANTS[variant][2]}, the authors' network with the Ham decoder; paper: {PAPER}.\n\n{DFormer.__doc__}",
        task="segmentation", fusion="middle", method="dformer", encoder=variant, paper=PAPER,
        modalities=("rgb", "depth"), max_modalities=2, accepts=ACCEPTS,
        reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
    )


dformer_tiny = _entry("tiny")
dformer_small = _entry("small")
dformer_base = _entry("base")
dformer_large = _entry("large")

register_converter(*(f"dformer_{v}" for v in VARIANTS), classifier_key="decode_head.conv_seg.weight")(convert_dformer)

# ----------------------------------------------------------------------------- released weights
# The authors' README (reference commit) links one Google Drive folder per dataset holding the
# four variants, named as their eval.sh names them; no sha256 is published. mIoU: the paper's
# Table 2, evaluated by their eval.sh (utils/eval.py --mst: scales 0.5-1.5 and flip).
_NORM = {"rgb": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, "depth": {"mean": (DEPTH_MEAN,), "std": (DEPTH_STD,)}}
_FOLDERS = {
    "nyuv2": "https://drive.google.com/drive/folders/1P5HwnAvifEI6xiTAx6id24FUCt_i7GH8",
    "sunrgbd": "https://drive.google.com/drive/folders/1b005OUO8QXzh0sJM4iykns_UdlbMNZb8",
}
_REPORTED = {  # variant -> (NYUDepthv2 mIoU, SUN-RGBD mIoU), Table 2
    "tiny": (51.8, 48.8), "small": (53.6, 50.0), "base": (55.6, 51.2), "large": (57.2, 52.5),
}
for _variant, (_nyu, _sun) in _REPORTED.items():
    _cap = _variant.capitalize()
    register_weights(ReleasedWeights(
        name=f"dformer_{_variant}", tag="nyuv2", url=_FOLDERS["nyuv2"], filename=f"NYUv2_DFormer_{_cap}.pth",
        num_classes=40, modalities=("rgb", "depth"), class_names=tuple(NYU40_CLASSES), normalization=_NORM,
        reported=f"mIoU {_nyu} (NYUDepthv2 test, 40 classes, 480x640, multi-scale + flip; paper Table 2)",
    ))
    register_weights(ReleasedWeights(
        name=f"dformer_{_variant}", tag="sunrgbd", url=_FOLDERS["sunrgbd"], filename=f"SUNRGBD_DFormer_{_cap}.pth",
        num_classes=37, modalities=("rgb", "depth"), class_names=tuple(NYU40_CLASSES[:37]), normalization=_NORM,
        reported=f"mIoU {_sun} (SUN RGB-D test, 37 classes, 530x730, multi-scale + flip; paper Table 2)",
    ))
