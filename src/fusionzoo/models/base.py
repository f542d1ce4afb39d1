"""FusionModel: the small base every model inherits from. It owns the taps, the input checks and
the missing-modality policy; subclasses implement :meth:`FusionModel.forward_logits`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._json import to_json
from .._registry import encoder_key, register_model
from ..heads import create_decoder
from ..hub import save_pretrained
from ..modalities import check_modality_names, resolve_in_chans
from ..taps import TapInfo, TapSet

MIN_INPUT_SIZE = 32  # stride-32 features need at least one cell
BN_STRIDE = 32  # deepest stride with BatchNorm (ResNet stage 4, fusion blocks on it)

DEFAULT_ENCODERS = ("resnet18", "resnet50", "pvt_v2_b2")


class FusionModel(nn.Module):
    """Base of every fusionzoo model.

    Args:
        modalities: stream names in order, RGB first by convention (``("rgb", "depth")``).
        num_classes: ``K``.
        in_chans: per-modality channel overrides (defaults: rgb/hha 3, depth/thermal 1).

    Missing-modality policy (``model(inputs, missing=("depth",))``): the absent stream is filled
    with zeros of its expected shape. Inputs are normalized per modality (fusionzoo.data), so zero
    is the dataset mean: the model sees "no information" rather than an out-of-range value. The
    branch still runs, so every tap still fires once. Late and hybrid models additionally drop
    the absent modality's prediction from their decision fusion (see their docstrings).
    """

    task = "segmentation"

    def __init__(self, modalities: Sequence[str], num_classes: int, in_chans: Mapping[str, int] | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.modalities = check_modality_names(modalities)
        self.in_chans = resolve_in_chans(self.modalities, in_chans)
        self.num_classes = num_classes
        self.taps = TapSet()
        self.config: dict[str, Any] = {}

    # -- interface -------------------------------------------------------------------------
    def tap_info(self) -> dict[str, TapInfo]:
        """Every tap of this model in execution order (see :mod:`fusionzoo.taps`)."""
        return self.taps.info()

    def modality_parameters(self, modality: str) -> Iterator[nn.Parameter]:
        """Parameters that belong only to ``modality``'s branch (empty for early fusion)."""
        if modality not in self.modalities:
            raise ValueError(f"{modality!r} is not one of this model's modalities {self.modalities}")
        branches = getattr(self, "encoders", None)
        if isinstance(branches, nn.ModuleDict) and modality in branches:
            yield from branches[modality].parameters()

    def forward(self, inputs: Mapping[str, torch.Tensor], missing: Iterable[str] = ()) -> torch.Tensor:
        """Segment a batch.

        Args:
            inputs: one tensor per modality, ``(B, C_m, H, W)``, same B, H, W for all.
            missing: modalities absent at inference; their keys may be left out of ``inputs``.

        Returns:
            Logits ``(B, K, H, W)`` at input resolution.
        """
        missing = self._check_missing(missing)
        xs = self.check_inputs(inputs, missing)
        logits = self.forward_logits(xs, missing)
        size = next(iter(xs.values())).shape[-2:]
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward_logits(self, xs: dict[str, torch.Tensor], missing: tuple[str, ...]) -> torch.Tensor:
        """Logits at decoder resolution from checked, filled inputs; passes ``head.logits``."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (see :func:`fusionzoo.hub.save_pretrained`
        for ``class_names``, ``normalization`` and ``extra``); reload with ``fz.from_pretrained``."""
        return save_pretrained(self, directory, **kwargs)

    # -- shared decoder tail ---------------------------------------------------------------
    def build_decoder(
        self, in_channels: Sequence[int], decoder: str, decoder_channels: int | None, dropout: float, tapped: bool = True
    ) -> nn.Module:
        """Create a decoder over stage features (strides 4..32); the model's main decoder
        (``tapped``, on features of every modality: after fusion) declares the ``decoder.out`` tap,
        per-modality decoders of late fusion do not."""
        dec = create_decoder(decoder, in_channels, self.num_classes, channels=decoder_channels, dropout=dropout)
        if tapped:
            self.taps.declare("decoder.out", dec.out_channels, 4, after_fusion=True)
        return dec

    def decode(self, decoder: nn.Module, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoder embedding (tap ``decoder.out``) -> logits at stride 4."""
        return decoder.classify(self.taps("decoder.out", decoder(features)))

    # -- input checks ----------------------------------------------------------------------
    def _check_missing(self, missing: Iterable[str]) -> tuple[str, ...]:
        if isinstance(missing, str):
            missing = (missing,)
        missing = tuple(missing)
        for m in missing:
            if m not in self.modalities:
                raise ValueError(f"missing={missing} names {m!r}, which is not one of the model's modalities {self.modalities}")
        if len(set(missing)) == len(self.modalities):
            raise ValueError(f"missing={missing} leaves no modality to run on")
        return missing

    def expected_shape(self, modality: str) -> str:
        return f"(B, {self.in_chans[modality]}, H, W)"

    # H and W must be multiples of this for networks whose decoder adds skips to exactly 2x upsampled
    # maps or unpools with the encoder's indices (published ESANet, ACNet, FuseNet); None: any size.
    input_multiple: int | None = None
    input_multiple_reason: str = ""
    # The model zero-pads its inputs (bottom / right) to a multiple of this before the encoder, so a
    # feature map of stride s covers the padded image ceil(H / size_divisible) * size_divisible / s
    # cells high: map -> image alignment (Grad-CAM) upsamples to the padded size and crops. 1: no
    # padding (segmentation models run on any size >= 32; published ones check input_multiple).
    size_divisible: int = 1

    def check_inputs(self, inputs: Mapping[str, torch.Tensor], missing: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Validate inputs and fill absent modalities; returns tensors in ``self.modalities`` order.

        Raises:
            ValueError: a missing or extra key, a wrong rank or channel count, a non-float dtype or
                one other than the weights' (float64 from numpy into a float32 model), modalities
                with different batch or spatial sizes, an input smaller than 32x32, or batch size
                1 in train mode at 32x32 (BatchNorm cannot take batch statistics of one value);
                the message names the key, the shape received and the shape expected.
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"inputs must be a dict of modality tensors with keys {self.modalities}, got {type(inputs).__name__}"
            )
        expected = {m: self.expected_shape(m) for m in self.modalities}
        extra = [k for k in inputs if k not in self.modalities]
        if extra:
            raise ValueError(f"unexpected modality key(s) {extra}; this model takes {expected}")
        absent = [m for m in self.modalities if m not in inputs and m not in missing]
        if absent:
            raise ValueError(
                f"modality {absent[0]!r} is absent from the inputs (keys {list(inputs)}); expected a tensor "
                f"{expected[absent[0]]}, or pass missing=({absent[0]!r},) to run without it"
            )
        present = [m for m in self.modalities if m not in missing]
        reference = None
        for m in present:
            x = inputs[m]
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {m!r} must be a torch.Tensor {expected[m]}, got {type(x).__name__}")
            if x.dim() != 4 or x.shape[1] != self.in_chans[m]:
                raise ValueError(f"input {m!r} has shape {tuple(x.shape)}; expected {expected[m]}")
            if not x.is_floating_point():
                raise ValueError(f"input {m!r} has dtype {x.dtype}; expected a floating-point tensor (normalized image)")
            self._check_dtype(m, x)
            if reference is None:
                reference = m
                if min(x.shape[-2:]) < MIN_INPUT_SIZE:
                    raise ValueError(
                        f"input {m!r} has spatial size {tuple(x.shape[-2:])}; models need at least "
                        f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (stride-32 features); resize or pad it"
                    )
                self._check_input_multiple(tuple(x.shape[-2:]))
            else:
                ref = inputs[reference]
                if x.shape[0] != ref.shape[0] or x.shape[-2:] != ref.shape[-2:]:
                    raise ValueError(
                        f"input {m!r} has shape {tuple(x.shape)} but {reference!r} has {tuple(ref.shape)}; "
                        f"expected (B, H, W) = {(ref.shape[0], *ref.shape[-2:])} for every modality (align and resize first)"
                    )
        ref = inputs[reference]
        self._check_batch_statistics(ref)
        out = {}
        for m in self.modalities:
            if m in missing:
                out[m] = ref.new_zeros(ref.shape[0], self.in_chans[m], *ref.shape[-2:])
            else:
                out[m] = inputs[m]
        return out

    def _check_input_multiple(self, size: tuple[int, int]) -> None:
        k = self.input_multiple
        if k and (size[0] % k or size[1] % k):
            name = (getattr(self, "config", None) or {}).get("name", type(self).__name__)
            raise ValueError(
                f"{name} needs H and W divisible by {k} ({self.input_multiple_reason}), got inputs of spatial size "
                f"{size}; pad or resize to {(-(-size[0] // k) * k, -(-size[1] // k) * k)}"
            )

    def _check_dtype(self, key: str, x: torch.Tensor) -> None:
        # A float64 input (numpy's default) into float32 weights fails deep inside the first conv
        # with "expected scalar type Double but found Float"; refuse it here, naming the fix.
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is None or x.dtype == weight.dtype:
            return
        try:  # under autocast, conv/matmul cast float16/bfloat16/float32 inputs themselves (not float64)
            autocast = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
        except (RuntimeError, ValueError):  # a device type autocast does not know
            autocast = False
        if not autocast:
            raise ValueError(
                f"input {key!r} has dtype {x.dtype} but the model's weights are {weight.dtype}; cast the "
                f"inputs (x.float() for float32 weights; numpy arrays are float64 by default) or the model "
                f"(model.to({x.dtype}))"
            )

    def _check_batch_statistics(self, ref: torch.Tensor) -> None:
        # BatchNorm in train mode needs more than one value per channel; at batch size 1 the
        # stride-32 features of a 32x32 input are one cell, and torch raises a bare "Expected more
        # than 1 value per channel" from deep inside the encoder.
        h, w = ref.shape[-2:]
        if not self.training or ref.shape[0] != 1 or -(-h // BN_STRIDE) * -(-w // BN_STRIDE) != 1:
            return
        # Synchronized BN (SyncBatchNorm, AllReduceBatchNorm) takes statistics over every rank.
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        if any(isinstance(mod, _BatchNorm) and mod.training and (not synced or isinstance(mod, plain)) for mod in self.modules()):
            raise ValueError(
                f"batch size 1 in train mode with a {h}x{w} input: the stride-{BN_STRIDE} features are one "
                "cell, so BatchNorm sees a single value per channel and cannot take batch statistics. Fix: "
                "batch size >= 2, an input larger than 32 px on one side (e.g. 64x64), model.eval() for "
                "inference, or BatchNorm in eval mode (training config freeze_bn=True; "
                "fusionzoo.engine.loop.set_bn_eval(model))"
            )


def register_family(
    *,
    method: str,
    model_cls: type[FusionModel],
    fusion: str,
    paper: str,
    fixed: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    max_modalities: int | None = None,
    encoders: Sequence[str] = DEFAULT_ENCODERS,
    default_encoder: str = "resnet50",
    task: str = "segmentation",
    modalities: tuple[str, ...] = ("rgb", "depth"),
    generic_methods: str = "early_concat, early_stem, crossattn, late_*, hybrid_gate",
) -> None:
    """Register the family entry ``{method}`` (takes ``encoder=``, default ``default_encoder``)
    and a named variant ``{method}_{encoder}`` per encoder in ``encoders``; segmentation models
    and detectors (``task="detection"``, ``fusionzoo.detection.models``) alike.

    Every entry builds ``model_cls(encoder, **defaults, **user_kwargs, **fixed)``: ``fixed`` is
    what makes the method (e.g. its fusion operator), ``defaults`` the method's published
    settings a user may change. The model's ``config`` records the entry name and the user-visible
    keywords, so ``create_model(**model.config)`` rebuilds the same architecture.

    Args:
        task: the registry's task of every entry (``model.task`` of what they build).
        modalities: the entries' default modalities (also what ``max_modalities`` is checked on
            when the user passes none).
        generic_methods: named in the error when a ``max_modalities`` method gets more streams.
    """
    fixed = dict(fixed or {})
    defaults = dict(defaults or {})
    accepts = frozenset(p for p in init_parameters(model_cls) if p not in fixed)
    doc = (model_cls.__doc__ or "").strip()
    noun = "" if task == "segmentation" else " detector"  # the entry's docstring: "fcos_cmx detector on ..."

    def make_entry(name: str, encoder_fixed: str | None) -> Callable[..., FusionModel]:
        def entry(**kwargs: Any) -> FusionModel:
            encoder = encoder_fixed or kwargs.pop("encoder", default_encoder)
            options = {**defaults, **kwargs}
            streams = tuple(options.get("modalities", modalities))
            if max_modalities is not None and len(streams) != max_modalities:
                raise ValueError(
                    f"{name} is defined for exactly {max_modalities} modalities (RGB plus one auxiliary "
                    f"stream), got {streams}; for more use a generic method: {generic_methods}"
                )
            model = model_cls(encoder, **options, **fixed)
            model.config = entry_config(name, {**({} if encoder_fixed else {"encoder": encoder}), **options})
            model.encoder_name = encoder
            return model

        entry.__name__ = entry.__qualname__ = name
        where = f"timm {encoder_fixed!r}" if encoder_fixed else f"any timm encoder (default {default_encoder!r})"
        entry.__doc__ = f"{method}{noun} on {where}; paper: {paper}.\n\n{doc}"
        entry.__module__ = model_cls.__module__
        return entry

    meta = {"task": task, "fusion": fusion, "method": method, "paper": paper, "modalities": tuple(modalities),
            "max_modalities": max_modalities, "accepts": accepts}
    register_model(encoder=default_encoder, **meta)(make_entry(method, None))
    for encoder in encoders:
        name = f"{method}_{encoder_key(encoder)}"
        register_model(encoder=encoder, **meta)(make_entry(name, encoder))


def init_parameters(model_cls: type[nn.Module]) -> list[str]:
    """The keyword names ``model_cls(...)`` takes, ``self`` left out; a constructor that forwards
    ``**kwargs`` (``HybridFusionDetector``) takes its own names plus those of the nearest base
    class constructor in the MRO (recursively)."""
    names: list[str] = []
    for cls in model_cls.__mro__:
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def entry_config(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``model.config`` of a registered entry: its name and the user-visible keywords, JSON-safe
    (tuples as lists), so ``create_model(**model.config)`` rebuilds the same architecture."""
    return {"name": name, **to_json(dict(options), nonfinite="keep")}
