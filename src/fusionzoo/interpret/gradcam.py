"""Spatial attribution: Grad-CAM on any tap, and fusion gate / attention maps.

Grad-CAM (Selvaraju et al., ICCV 2017) for segmentation as in Vinogradova, Dibrov, Myers,
"Towards Interpretable Semantic Segmentation via Gradient-weighted Class Activation Mapping"
(AAAI 2020 student abstract): the score is the class-``c`` logit summed over a pixel region
(default: every pixel predicted as ``c``; with ``target_class=None`` each pixel's own predicted
class), the weights are the spatially averaged gradients of that score w.r.t. a tap's
activations ``A (B, C, h, w)``, and the map is ``ReLU(sum_c alpha_c A_c)`` upsampled to the input.
Run on ``rgb.stageK`` and ``depth.stageK`` it shows where each modality's branch supports the
prediction; on ``fused.stageK`` it covers early-fusion models too.

The score is pluggable (``score_fn``): :func:`segmentation_score` above for segmentation models,
:class:`fusionzoo.interpret.detection.DetectionScore` for detectors (the scores of the top
detections, read from each box head); the weights, map and normalization are the same.

Gate maps come from taps of kind ``gate`` / ``attn``. Their channel layout is read from the
channel count, never from the model name: ``M`` channels (or a multiple ``M * C``) are split into
the model's ``M`` modalities in order; ``M + 1`` channels are ``("fused", *modalities)`` (hybrid
decision gates). Values are reported as emitted (some taps carry softmax weights, some raw
scores; see each model's docstring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..taps import capture, select_taps

__all__ = ["gate_maps", "grad_cam", "segmentation_score", "split_gate_channels"]


def segmentation_score(logits: torch.Tensor, target_class: int | None = None,
                       region: torch.Tensor | None = None) -> torch.Tensor:
    """The Grad-CAM score of a segmentation output (module docstring).

    Args:
        logits: ``(B, K, H, W)``.
        target_class: class ``c`` to explain; ``None`` explains each pixel's predicted class.
        region: optional ``(B, H, W)`` bool mask of the pixels whose scores are summed (default:
            pixels predicted as ``target_class``, or all pixels when ``target_class`` is None).

    Returns:
        A 0-dim tensor: the selected logits summed over the region.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"segmentation_score takes (B, K, H, W) logits, got {got}")
    b, k, h, w = logits.shape
    if target_class is None:
        sel = F.one_hot(logits.argmax(1), k).permute(0, 3, 1, 2).to(logits.dtype)
        keep = torch.ones(b, h, w, dtype=torch.bool, device=logits.device)
    else:
        if not 0 <= target_class < k:
            raise ValueError(f"target_class {target_class} is outside [0, {k})")
        sel = torch.zeros_like(logits)
        sel[:, target_class] = 1
        keep = logits.argmax(1) == target_class
    if region is not None:
        if region.shape != (b, h, w):
            raise ValueError(f"region must be (B, H, W) = {(b, h, w)}, got {tuple(region.shape)}")
        keep = region.to(torch.bool).to(logits.device)
    return (logits * sel * keep[:, None]).sum()


def grad_cam(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    taps: str | Sequence[str],
    target_class: int | None = None,
    region: torch.Tensor | None = None,
    missing: Iterable[str] = (),
    normalize: bool = True,
    score_fn: Callable[[Any], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Grad-CAM maps of one batch on the given taps.

    Args:
        model: a fusionzoo segmentation model or detector.
        inputs: modality -> ``(B, C_m, H, W)``.
        taps: tap names or fnmatch patterns (``"*.stage4"``).
        target_class: class ``c`` to explain; ``None`` explains each pixel's predicted class
            (detectors: detections of any class).
        region: segmentation only: optional ``(B, H, W)`` bool mask of the pixels whose scores
            are summed (default: pixels predicted as ``target_class``, or all pixels when
            ``target_class`` is None).
        missing: passed to the model.
        normalize: divide each image's map by its maximum (maps in ``[0, 1]``).
        score_fn: maps the model's output to the scalar explained. Default:
            :func:`segmentation_score` for segmentation models and
            :class:`~fusionzoo.interpret.detection.DetectionScore` (the highest-scoring
            detection per image) for ``task="detection"`` models; ``target_class`` and
            ``region`` apply to these defaults only. A score object with a ``watch(model)``
            method (a context manager) has it entered around the forward pass, so it can read
            intermediate outputs (the detection score reads each box head's detections).

    Returns:
        tap -> ``(B, H, W)`` float maps at input resolution (zeros where the tap got no gradient,
        e.g. a branch the score does not depend on, or a detector that detected nothing).
    """
    patterns = [taps] if isinstance(taps, str) else list(taps)
    names = select_taps(model, *patterns)
    if score_fn is None:
        if getattr(model, "task", "segmentation") == "detection":
            if region is not None:
                raise ValueError("region selects pixels of a segmentation output; a detector's Grad-CAM explains "
                                 "its detections (use target_class, or pass a DetectionScore as score_fn)")
            from .detection import DetectionScore

            score_fn = DetectionScore(target_class=target_class)
        else:
            def score_fn(out: torch.Tensor) -> torch.Tensor:
                return segmentation_score(out, target_class, region)
    elif target_class is not None or region is not None:
        raise ValueError("target_class / region configure the default score; with score_fn= put them in the score")
    watch = getattr(score_fn, "watch", None)
    was_training = model.training
    model.eval()
    try:
        # Gradients are taken w.r.t. input copies with torch.autograd.grad, so the tap hooks fire
        # but nothing accumulates in the parameters' .grad (the model is left untouched).
        xs = {m: x.detach().clone().requires_grad_(True) for m, x in inputs.items()}
        inner = watch(model) if callable(watch) else contextlib.nullcontext()
        with torch.enable_grad(), capture(model, *names, grads=True) as acts:
            with inner:
                output = model(xs, missing=tuple(missing))
                score = score_fn(output)
            if not isinstance(score, torch.Tensor) or score.dim() != 0:
                got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ValueError(f"score_fn must return a 0-dim tensor, got {got}")
            if score.requires_grad:
                torch.autograd.grad(score, list(xs.values()), allow_unused=True)
    finally:
        model.train(was_training)
    out = {}
    size = tuple(next(iter(inputs.values())).shape[-2:])
    div = 1
    if getattr(model, "task", "segmentation") == "detection":
        # detectors zero-pad their inputs (bottom / right) to a multiple of 32, so their maps
        # cover the padded image: upsample to it and crop the image part
        from ..detection.models import SIZE_DIVISIBLE as div
    padded = (-(-size[0] // div) * div, -(-size[1] // div) * div)
    for name in names:
        a = acts[name]
        g = acts.grads.get(name)
        if a.dim() != 4 or g is None:
            out[name] = torch.zeros(a.shape[0], *size)
            continue
        alpha = g.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((alpha * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=padded, mode="bilinear", align_corners=False)[:, 0, : size[0], : size[1]]
        if normalize:
            cam = cam / cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
        out[name] = cam.detach().cpu()
    return out


def split_gate_channels(x: torch.Tensor, modalities: Sequence[str]) -> dict[str, torch.Tensor]:
    """Split a gate / attention tap output into per-stream maps.

    Args:
        x: ``(B, G, h, w)`` tap output (``h = w = 1`` for channel attention).
        modalities: the model's ``M`` modalities in order.

    Returns:
        stream -> ``(B, h, w)`` (channel mean within the stream's chunk). Streams are the
        modalities when ``G`` is a multiple of ``M``, ``("fused", *modalities)`` when
        ``G == M + 1``; otherwise one stream ``"all"`` (the mean over all channels).
    """
    if x.dim() != 4:
        raise ValueError(f"gate tap output must be (B, G, h, w), got {tuple(x.shape)}")
    m, g = len(modalities), x.shape[1]
    if g % m == 0:
        names = list(modalities)
    elif g == m + 1:
        names = ["fused", *modalities]
    else:
        return {"all": x.mean(1)}
    chunks = x.chunk(len(names), dim=1)
    return {n: c.mean(1) for n, c in zip(names, chunks)}


@torch.no_grad()
def gate_maps(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], patterns: Sequence[str] = ("*.gate", "*.attn")
) -> dict[str, dict[str, torch.Tensor]]:
    """Fusion gate / attention maps of one batch.

    Args:
        model: a fusionzoo model.
        inputs: modality -> ``(B, C_m, H, W)``.
        patterns: tap patterns to read; patterns matching no tap are skipped (models without
            gates return ``{}``).

    Returns:
        tap -> stream -> ``(B, h, w)`` maps (``h = w = 1`` for channel attention), see
        :func:`split_gate_channels`.
    """
    info = model.tap_info()
    import fnmatch

    names = [n for n in info if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not names:
        return {}
    was_training = model.training
    model.eval()
    try:
        with capture(model, *names) as acts:
            model(dict(inputs))
    finally:
        model.train(was_training)
    return {n: {k: v.cpu() for k, v in split_gate_channels(acts[n], model.modalities).items()} for n in names}
