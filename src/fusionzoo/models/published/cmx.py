"""CMX on MiT, as published: ``cmx_mit_b0`` .. ``cmx_mit_b5``.

Zhang, Liu, Yang, Hu, Liu, Stiefelhagen, "CMX: Cross-Modal Fusion for RGB-X Semantic
Segmentation with Transformers", IEEE T-ITS 2023 (Sec. III; NYUDv2 Table, MFNet Table). The
reference is the authors' repository (:data:`REFERENCE_REPO` at :data:`REFERENCE_COMMIT`); its
state dict maps onto these models tensor for tensor (:func:`convert_cmx`), and
``tests/test_parity_cmx.py`` checks the outputs against numbers computed by the authors' code.

What makes this the authors' network rather than fusionzoo's ``cmx`` family on ``pvt_v2_b*``:

- the backbone is SegFormer's MiT: timm's ``pvt_v2`` with MLP ratio 4 in every stage (timm's
  ``pvt_v2_b0..b4`` use 8 in stages 1-2) and stochastic depth 0.1, on the authors' schedule:
  linear over all blocks, except that stage 2 gives every RGB block the rate of its first block
  and every X block the rate of its second (as ``dual_segformer.py`` builds them);
- two such backbones (RGB, X), FRM + FFM after every stage (``fusionzoo.fusion.cmx``, measured
  equal to the authors' modules), the MiT fusion preset (reduction 1, heads 1, 2, 5, 8);
- the MLP decoder with embedding 512 (the authors' ``config.decoder_embed_dim``, one value for
  every backbone), a fuse conv *with* bias and its BatchNorm with eps 1e-3 (their ``bn_eps``,
  set by ``init_weight`` when the training network is built).
- both inputs are 3-channel images, as the authors feed them: RGB and X (HHA; or depth / thermal
  replicated to three channels by their data loader, each normalized with the ImageNet mean and
  std). ``replicate_x=True`` takes a 1-channel X (depth, thermal) and repeats it to three
  channels in the model, as their loader does, keeping the network to the parameter (only the
  per-channel ImageNet normalization of the copies is not reproduced: the one channel is
  normalized with the dataset's statistics). ``in_chans={"depth": 1}`` instead gives a 1-channel
  X stem, which is no longer the authors' network (the released weights then do not convert).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch
from timm.layers import DropPath
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.pvt_v2 import PyramidVisionTransformerStage
from torch import nn

from ..._registry import ReleasedWeights, register_weights
from ...encoders import Encoder
from ...fusion._common import use_channels_last_depthwise
from ...heads.segformer import SegFormerDecoder
from ..cmx import CMXModel
from ..convert import StateDict, published_entry, read_authors_checkpoint, register_converter, rename_keys

REFERENCE_REPO = "https://github.com/huaaaliu/RGBX_Semantic_Segmentation"
REFERENCE_COMMIT = "e251d860aebc2f583a6c4919877e6bebe7f1aff3"
PAPER = (
    "Zhang, Liu, Yang, Hu, Liu, Stiefelhagen, 'CMX: Cross-Modal Fusion for RGB-X Semantic "
    "Segmentation with Transformers', IEEE T-ITS 2023"
)

# MiT-B0..B5 (SegFormer, Xie et al. NeurIPS 2021, Table 6): stage depths; widths are
# (32, 64, 160, 256) for B0 and (64, 128, 320, 512) for the others, heads (1, 2, 5, 8), spatial
# reduction (8, 4, 2, 1), MLP ratio 4. timm's pvt_v2_bK has the same depths and widths.
MIT_DEPTHS: dict[str, tuple[int, int, int, int]] = {
    "b0": (2, 2, 2, 2),
    "b1": (2, 2, 2, 2),
    "b2": (3, 4, 6, 3),
    "b3": (3, 4, 18, 3),
    "b4": (3, 8, 27, 3),
    "b5": (3, 6, 40, 3),
}
MIT_MLP_RATIOS = (4.0, 4.0, 4.0, 4.0)
DECODER_EMBED_DIM = 512  # the authors' config.decoder_embed_dim
DECODER_BN_EPS = 1e-3  # the authors' config.bn_eps, applied to the decoder's BatchNorm
DROP_PATH_RATE = 0.1  # mit_b0..mit_b5 in the authors' dual_segformer.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NYUV2_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refridgerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)  # fmt: skip
MFNET_CLASSES = ("unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump")


def authors_drop_path_rates(depths: Sequence[int], rate: float) -> tuple[list[list[float]], list[list[float]]]:
    """Stochastic-depth rate of every block, RGB stream and X stream, as the authors build them.

    ``dpr = linspace(0, rate, sum(depths))``, block ``i`` of stage ``s`` takes ``dpr[cur_s + i]``,
    except in stage 2, where every RGB block takes ``dpr[cur_2]`` and every X block
    ``dpr[cur_2 + 1]`` (``dual_segformer.py`` indexes without ``i`` there).

    Returns:
        ``(rgb, x)``: per stage, the rate of each block.
    """
    dpr = torch.linspace(0, rate, sum(depths), device="cpu").tolist()  # cpu: also under a meta device
    rgb: list[list[float]] = []
    x: list[list[float]] = []
    cur = 0
    for stage, depth in enumerate(depths):
        if stage == 1:
            rgb.append([dpr[cur]] * depth)
            x.append([dpr[cur + 1]] * depth)
        else:
            rgb.append(dpr[cur : cur + depth])
            x.append(dpr[cur : cur + depth])
        cur += depth
    return rgb, x


def _set_drop_path(encoder: Encoder, rates: Sequence[Sequence[float]]) -> None:
    """Give every block of a pvt_v2 encoder its stochastic-depth rate (0 -> Identity, as timm)."""
    stages = [m for m in encoder.modules() if isinstance(m, PyramidVisionTransformerStage)]
    if [len(s.blocks) for s in stages] != [len(r) for r in rates]:
        raise ValueError(f"encoder {encoder.name!r} has blocks {[len(s.blocks) for s in stages]}, rates for {[len(r) for r in rates]}")
    for stage, stage_rates in zip(stages, rates):
        for block, p in zip(stage.blocks, stage_rates):
            block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
            block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def select_attention_kernel(attentions: Sequence[PvtAttention], x: torch.Tensor, current: bool | None) -> bool:
    """Switch MiT's attention modules to the kernel that suits ``x``'s device; returns the choice.

    timm's fused attention (scaled_dot_product_attention) parallelizes over batch x heads on CPU,
    so MiT's stage 1 (one head) runs on one thread at batch 1; the authors' explicit
    ``(q @ k^T) softmax @ v`` uses every thread there. Fused on accelerators, explicit on CPU.
    ``current`` is the previous choice (``None`` before the first call), so nothing is set twice.
    """
    fused = x.device.type != "cpu"
    if fused != current:
        for attn in attentions:
            attn.fused_attn = fused
    return fused


class CMXMiT(CMXModel):
    """CMX with dual MiT backbones and the MLP decoder, the authors' network (module docstring).

    Args:
        variant: ``"b0"`` .. ``"b5"``.
        num_classes: ``K`` (40 for NYUDv2, 9 for MFNet).
        modalities: RGB first, then the X modality (``("rgb", "hha")`` for NYUDv2).
        in_chans: per-stream input channels; both default to 3 (see the module docstring).
        pretrained: ``False`` only here (MiT's ImageNet weights are SegFormer's, not timm's
            ``pvt_v2``: pass ``mit_weights``); the entry points also take a released tag.
        decoder_channels: MLP-decoder embedding (512).
        dropout: dropout before the classifier (0.1).
        drop_path_rate: MiT stochastic depth (0.1; 0 for exact train-mode comparisons).
        replicate_x: the X input has one channel, repeated to three before its 3-channel stem.
        mit_weights: path of SegFormer's ImageNet MiT file (``mit_b2.pth``, linked from the
            authors' README) loaded into both streams, as the reference trains from it.

    Taps as every middle-fusion model: ``{m}.stage1..4`` (each MiT stage's output before FRM),
    ``fused.stage1..4`` (FFM output) with ``.gate`` / ``.attn`` (FRM weights), ``decoder.out``,
    ``head.logits``.
    """

    def __init__(
        self,
        variant: str,
        *,
        num_classes: int = 40,
        modalities: Sequence[str] = ("rgb", "hha"),
        in_chans: Mapping[str, int] | None = None,
        pretrained: bool = False,
        decoder_channels: int = DECODER_EMBED_DIM,
        dropout: float = 0.1,
        drop_path_rate: float = DROP_PATH_RATE,
        replicate_x: bool = False,
        mit_weights: str | None = None,
    ) -> None:
        if variant not in MIT_DEPTHS:
            raise ValueError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_DEPTHS)}")
        if pretrained is not False:
            raise ValueError(
                "cmx_mit_*: pretrained=True has no timm weights to load (timm's pvt_v2 is not MiT); "
                "pass a released tag (pretrained='nyuv2'), or SegFormer's ImageNet MiT file as "
                "mit_weights='pretrained/segformer/mit_b2.pth' (the authors' README links it)"
            )
        if tuple(modalities)[:1] != ("rgb",) or len(tuple(modalities)) != 2:
            raise ValueError(f"cmx_mit_{variant} takes RGB then one X modality, e.g. ('rgb', 'hha'); got {tuple(modalities)}")
        self.variant = variant
        self.drop_path_rate = drop_path_rate
        if replicate_x and in_chans:
            raise ValueError("pass replicate_x=True (a 1-channel X repeated to 3) or in_chans, not both")
        chans = {m: 3 for m in modalities}
        chans.update(in_chans or {})
        # Channels each stream's stem takes; the input check (in_chans) may see fewer.
        self.stem_chans = dict(chans)
        self.replicate_x = replicate_x
        if replicate_x:
            chans[tuple(modalities)[1]] = 1
        super().__init__(
            f"pvt_v2_{variant}",
            num_classes=num_classes,
            modalities=modalities,
            in_chans=chans,
            pretrained=False,
            decoder="segformer",
            decoder_channels=decoder_channels,
            dropout=dropout,
            fusion_op="cmx",
            fuse_stem=False,
            feedback=True,
            fusion_kwargs={"preset": "mit"},
        )
        rgb_rates, x_rates = authors_drop_path_rates(MIT_DEPTHS[variant], drop_path_rate)
        _set_drop_path(self.encoders[self.modalities[0]], rgb_rates)
        _set_drop_path(self.encoders[self.modalities[1]], x_rates)
        use_channels_last_depthwise(self.encoders)  # the MLPs' depthwise convs on their token layout
        self._attentions = [m for m in self.encoders.modules() if isinstance(m, PvtAttention)]
        self._fused_attn: bool | None = None
        if mit_weights is not None:
            load_mit_imagenet(self, mit_weights)

    def forward_streams(self, xs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        self._fused_attn = select_attention_kernel(self._attentions, next(iter(xs.values())), self._fused_attn)
        if self.replicate_x:  # (B, 1, H, W) -> (B, 3, H, W), as the authors' cv2.merge([x, x, x])
            x = self.modalities[1]
            xs = {**xs, x: xs[x].expand(-1, self.stem_chans[x], -1, -1)}
        return super().forward_streams(xs)

    def make_encoder(self, modality: str, encoder: str, *, pretrained: bool, with_stem: bool, mono_init: str) -> Encoder:
        return Encoder(
            encoder,
            in_chans=self.stem_chans[modality],
            pretrained=False,
            with_stem=False,
            timm_kwargs={"mlp_ratios": MIT_MLP_RATIOS, "depths": MIT_DEPTHS[self.variant]},
        )

    def build_decoder(
        self, in_channels: Sequence[int], decoder: str, decoder_channels: int | None, dropout: float, tapped: bool = True
    ) -> nn.Module:
        dec = SegFormerDecoder(
            in_channels, self.num_classes, channels=decoder_channels or DECODER_EMBED_DIM, dropout=dropout,
            fuse_bias=True, bn_eps=DECODER_BN_EPS,
        )
        self.taps.declare("decoder.out", dec.out_channels, 4, after_fusion=True)
        return dec


# ----------------------------------------------------------------------------- authors' keys
# The authors number stages 1-4 (``block3``, ``linear_c3``) and fusion modules 0-3 (``FRMs.2``);
# ours are ``segments.2``, ``decoder.linear.2`` and ``fusions.stage3``. A regex replacement
# cannot add, so rules write ``<\1-1>`` / ``<\1+1>`` and :func:`_shift` evaluates them.
_SHIFT = re.compile(r"<(\d+)([+-]1)>")


def _shift(key: str) -> str:
    return _SHIFT.sub(lambda m: str(int(m.group(1)) + int(m.group(2))), key)


def rename_shifted(state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]], where: str) -> StateDict:
    """:func:`~fusionzoo.models.convert.rename_keys`, then the ``<k+1>`` / ``<k-1>`` stage shifts evaluated."""
    return {_shift(k): v for k, v in rename_keys(state_dict, rules, where=where).items()}


def load_mit_file(model: nn.Module, path: str, rules_for: Callable[[str], Sequence[tuple[str, str]]],
                  expected: Iterable[str], strict: bool = True) -> nn.Module:
    """SegFormer's ImageNet MiT file (its classifier ``head.*`` dropped) into ``model``, once per
    modality: ``rules_for(m)`` maps its keys for modality ``m``; ``expected`` are our keys that
    must receive a tensor (others keep their values).

    Raises:
        ConversionError: a key that does not map; ValueError: an expected tensor missing (with ``strict``).
    """
    sd = {k: v for k, v in read_authors_checkpoint(path).items() if not k.startswith("head.")}
    ours: StateDict = {}
    for m in model.modalities:
        ours.update(rename_shifted(sd, rules_for(m), str(path)))
    missing = sorted(set(expected) - set(ours))
    if strict and missing:
        raise ValueError(f"{path}: no tensor for {missing[0]!r} ({len(missing)} backbone tensors missing); is it MiT-{model.variant.upper()}?")
    model.load_state_dict(ours, strict=False)
    return model


def _mit_rules(src: str, dst: str) -> list[tuple[str, str]]:
    """Rules mapping one MiT stream of the authors' (or SegFormer's) naming onto our encoder
    ``dst`` (``encoders.<modality>.segments``); ``src`` is the key prefix before
    ``patch_embed`` / ``block`` / ``norm`` (``backbone.`` or ``backbone.extra_``)."""
    s = re.escape(src)
    return [
        # Stage 1's patch embedding is timm's stem (segments.0.0, then stage 1 is segments.0.1);
        # stages 2-4 carry theirs as `downsample` (segments.k.0).
        (rf"{s}patch_embed1\.(proj|norm)\.(weight|bias)", rf"{dst}.0.0.\1.\2"),
        (rf"{s}patch_embed([234])\.(proj|norm)\.(weight|bias)", rf"{dst}.<\1-1>.0.downsample.\2.\3"),
        (rf"{s}block1\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)", rf"{dst}.0.1.blocks.\1.mlp.dwconv.\2"),
        (rf"{s}block1\.(\d+)\.(.+)", rf"{dst}.0.1.blocks.\1.\2"),
        (rf"{s}block([234])\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)", rf"{dst}.<\1-1>.0.blocks.\2.mlp.dwconv.\3"),
        (rf"{s}block([234])\.(\d+)\.(.+)", rf"{dst}.<\1-1>.0.blocks.\2.\3"),
        (rf"{s}norm1\.(weight|bias)", rf"{dst}.0.1.norm.\1"),
        (rf"{s}norm([234])\.(weight|bias)", rf"{dst}.<\1-1>.0.norm.\2"),
    ]


def _cmx_rules(rgb: str, x: str) -> list[tuple[str, str]]:
    return [
        *_mit_rules("backbone.extra_", f"encoders.{x}.segments"),
        *_mit_rules("backbone.", f"encoders.{rgb}.segments"),
        (r"backbone\.FRMs\.([0-3])\.(.+)", r"fusions.stage<\1+1>.frm.\2"),
        (r"backbone\.FFMs\.([0-3])\.(.+)", r"fusions.stage<\1+1>.ffm.\2"),
        (r"decode_head\.linear_c([1-4])\.proj\.(weight|bias)", r"decoder.linear.<\1-1>.\2"),
        (r"decode_head\.linear_fuse\.([01])\.(.+)", r"decoder.fuse.\1.\2"),
        (r"decode_head\.linear_pred\.(weight|bias)", r"decoder.classifier.\1"),
    ]


def convert_cmx(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """The authors' CMX state dict (``EncoderDecoder`` of ``models/builder.py``: ``backbone.*``,
    ``decode_head.*``) -> ours. Every tensor maps one to one; nothing is folded.

    Raises:
        ConversionError: a key that is not part of the network (e.g. an ``aux_head`` of another
            decoder), named.
    """
    return rename_shifted(state_dict, _cmx_rules(*model.modalities), "the CMX checkpoint")


def load_mit_imagenet(model: nn.Module, path: str, strict: bool = True) -> nn.Module:
    """Initialize every MiT stream of ``model.encoders`` from SegFormer's ImageNet MiT file
    (``mit_b2.pth``, from the authors' README), as the authors' ``load_dualpath_model`` does: for
    CMX the same tensors into the RGB and the X backbone (CMNeXt has one, the RGB stream); the
    classifier ``head.*`` is dropped.

    Raises:
        ConversionError: a backbone key that does not map; ValueError: a backbone tensor missing.
    """
    own = [k for k in model.state_dict() if k.startswith("encoders.")]
    return load_mit_file(model, path, lambda m: _mit_rules("", f"encoders.{m}.segments"), own, strict)


# ----------------------------------------------------------------------------- entry points
ACCEPTS = (
    "num_classes", "modalities", "in_chans", "pretrained", "decoder_channels", "dropout", "drop_path_rate",
    "replicate_x", "mit_weights",
)


def register_mit_entry(
    method: str,
    variant: str,
    model_cls: Callable[..., nn.Module],
    *,
    title: str,
    paper: str,
    accepts: Sequence[str],
    max_modalities: int | None,
    reference_repo: str,
    reference_commit: str,
) -> Callable[..., nn.Module]:
    """Register the published entry ``{method}_mit_{variant}`` (:func:`~fusionzoo.models.convert.published_entry`
    over ``model_cls(variant, ...)``), shared by the MiT-based entries, CMX and CMNeXt."""
    return published_entry(
        f"{method}_mit_{variant}", partial(model_cls, variant),
        doc=f"{title} on MiT-{variant.upper()}, the authors' network; paper: {paper}.\n\n{model_cls.__doc__}",
        task="segmentation", fusion="middle", method=method, encoder=f"mit_{variant}", paper=paper,
        modalities=("rgb", "hha"), max_modalities=max_modalities, accepts=accepts,
        reference_repo=reference_repo, reference_commit=reference_commit,
    )


def _entry(variant: str) -> Callable[..., nn.Module]:
    return register_mit_entry(
        "cmx", variant, CMXMiT, title="CMX", paper=PAPER, accepts=ACCEPTS, max_modalities=2,
        reference_repo=REFERENCE_REPO, reference_commit=REFERENCE_COMMIT,
    )


cmx_mit_b0 = _entry("b0")
cmx_mit_b1 = _entry("b1")
cmx_mit_b2 = _entry("b2")
cmx_mit_b3 = _entry("b3")
cmx_mit_b4 = _entry("b4")
cmx_mit_b5 = _entry("b5")

register_converter(*(f"cmx_mit_{v}" for v in MIT_DEPTHS), classifier_key="decode_head.linear_pred.weight", with_model=True)(convert_cmx)

# ----------------------------------------------------------------------------- released weights
# The authors' README (reference commit) links these files; they publish no sha256.
_IMAGENET = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
register_weights(ReleasedWeights(
    name="cmx_mit_b2", tag="nyuv2",
    url="https://drive.google.com/file/d/1hlyglGnEB0pnWXfHPtBtCGGlKMDh2K--/view?usp=sharing",
    filename="NYUDV2_CMX+Segformer-B2.pth", num_classes=40, modalities=("rgb", "hha"),
    reported="mIoU 54.1 single scale, 54.4 multi-scale + flip (NYUDv2, 40 classes; README)",
    class_names=NYUV2_CLASSES, normalization={"rgb": _IMAGENET, "hha": _IMAGENET},
))
register_weights(ReleasedWeights(
    name="cmx_mit_b2", tag="mfnet",
    url="https://drive.google.com/file/d/1wtWxUgDk1N1QOhiGhUavBNc1_Bv9gzOM/view?usp=sharing",
    filename="MFNet_CMX+Segformer-B2.pth", num_classes=9, modalities=("rgb", "thermal"),
    reported="mIoU 58.2 (MFNet, 9 classes; README); thermal replicated to 3 channels",
    class_names=MFNET_CLASSES, normalization={"rgb": _IMAGENET, "thermal": _IMAGENET},
))
