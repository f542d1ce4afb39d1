"""Spatial attribution: Grad-CAM on any tap, and fusion gate / attention maps.

Grad-CAM (Selvaraju et al., ICCV 2017) for segmentation as in Vinogradova, Dibrov, Myers,
"Towards Interpretable Semantic Segmentation via Gradient-weighted Class Activation Mapping"
(AAAI 2020 student abstract): the score is the class-``c`` logit summed over a pixel region
(default: every pixel predicted as ``c``; with ``target_class=None`` each pixel's own predicted
class), the weights are the spatially averaged gradients of that score w.r.t. a tap's
activations ``A (B, C, h, w)``, and the map is ``ReLU(sum_c alpha_c A_c)`` upsampled to the input.
Run on ``rgb.stageK`` and ``depth.stageK`` it shows where each modality's branch supports the
prediction; on ``fused.stageK`` it covers early-fusion models too.

Gradients are taken w.r.t. the tap outputs themselves (Captum's ``LayerGradCam`` pattern): a
forward hook on each tap keeps its output (made to require grad when neither the weights nor
the inputs do) and ``torch.autograd.grad(score, tap outputs)`` differentiates only the part of
the graph between the taps and the score; the inputs never require grad and nothing
accumulates in the parameters' ``.grad``.

Normalization (``normalize=True``) is pytorch-grad-cam's ``scale_cam_image``: per image, on the
tap's grid, ``(cam - min) / (max - min + 1e-7)``, then bilinear upsampling (half-pixel
centres, as ``cv2.resize``) to the input. A map that is zero everywhere (no positive evidence
after the ReLU, or a tap the score does not depend on) stays all zero; the report writes "all
zero" on such a panel rather than drawing it as a uniform colour.

Which stage to explain (:func:`default_gradcam_taps`): the deepest stage of each stream whose
grid at the given input is at least ``MIN_GRID_CELLS`` (8) cells on each side. Deeper taps are
more semantic, but a 2x3-cell stage-4 grid of a 64x80 input cannot localize anything; at that
input the rule picks stage 2 (8x10 cells), at 480x640 stage 4 (15x20).

The score is pluggable (``score_fn``): :func:`segmentation_score` above for segmentation models,
:class:`fusionzoo.interpret.detection.DetectionScore` for detectors (the scores of the top
detections, read from each box head); the weights, map and normalization are the same.

Gate maps come from taps of kind ``gate`` / ``attn``. Their channel layout is read from the
tap's metadata (:func:`gate_streams`), never from the model name: a declared ``streams`` layout,
else the declared channel count: ``M`` channels (or a multiple ``M * C``) are the model's ``M``
modalities in order; ``M + 1`` channels are ``("fused", *modalities)`` (hybrid decision gates). Values are reported as emitted (some taps carry softmax weights, some raw
scores; see each model's docstring).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..taps import TapInfo, _taps_of, capture, select_taps
from ..tasks import class_map
from .detection import DetectionScore

__all__ = ["GRADCAM_TASKS", "MIN_GRID_CELLS", "default_gradcam_taps", "gate_maps", "gate_streams", "grad_cam",
           "object_class_region", "segmentation_score", "split_gate_channels"]

MIN_GRID_CELLS = 8  # smallest grid side (cells) a default Grad-CAM tap must have at the given input


def default_gradcam_taps(stage_taps: Mapping[str, Sequence[str]], reductions: Mapping[str, int],
                         size: tuple[int, int], min_cells: int = MIN_GRID_CELLS) -> list[str]:
    """The Grad-CAM tap of each stream: its deepest stage whose grid is at least ``min_cells``
    cells on each side at input ``size``.

    The grid of a tap with reduction ``r`` is ``ceil(H / r) x ceil(W / r)`` (the size of a
    stride-``r`` convolution stack with ``same`` padding). A stream none of whose stages reaches
    ``min_cells`` gets its finest stage, with a warning.

    Args:
        stage_taps: stream -> its stage taps ordered shallow to deep
            (``{"rgb": ["rgb.stage1", ..., "rgb.stage4"], "fused": [...]}``).
        reductions: tap -> input-to-feature stride (``TapInfo.reduction``).
        size: ``(H, W)`` of the input.
        min_cells: minimum grid side.

    Returns:
        one tap per stream, in the order of ``stage_taps``.

    Example:
        >>> default_gradcam_taps({"rgb": ["rgb.stage1", "rgb.stage2", "rgb.stage3", "rgb.stage4"]},
        ...                      {"rgb.stage1": 4, "rgb.stage2": 8, "rgb.stage3": 16, "rgb.stage4": 32}, (64, 80))
        ['rgb.stage2']
    """
    h, w = int(size[0]), int(size[1])
    out = []
    for stream, taps in stage_taps.items():
        taps = [t for t in taps if reductions.get(t, 0) > 0]
        if not taps:
            continue
        grids = {t: (math.ceil(h / reductions[t]), math.ceil(w / reductions[t])) for t in taps}
        ok = [t for t in taps if min(grids[t]) >= min_cells]
        if ok:
            out.append(ok[-1])
            continue
        finest = min(taps, key=lambda t: reductions[t])
        warnings.warn(f"Grad-CAM: no stage of stream {stream!r} has a grid of at least {min_cells}x{min_cells} cells "
                      f"at input {h}x{w} (finest: {finest} with {grids[finest][0]}x{grids[finest][1]}); explaining "
                      f"{finest}. Use a larger input for a deeper tap.", stacklevel=2)
        out.append(finest)
    return out


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
        sel = F.one_hot(class_map(logits), k).permute(0, 3, 1, 2).to(logits.dtype)
        keep = torch.ones(b, h, w, dtype=torch.bool, device=logits.device)
    else:
        if not 0 <= target_class < k:
            raise ValueError(f"target_class {target_class} is outside [0, {k})")
        sel = torch.zeros_like(logits)
        sel[:, target_class] = 1
        keep = class_map(logits) == target_class
    if region is not None:
        if region.shape != (b, h, w):
            raise ValueError(f"region must be (B, H, W) = {(b, h, w)}, got {tuple(region.shape)}")
        keep = region.to(torch.bool).to(logits.device)
    return (logits * sel * keep[:, None]).sum()


def object_class_region(pred: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The region ``run`` explains in each image: the pixels of its second most frequent
    predicted class (its most frequent one when it predicts a single class).

    Why not every pixel's own class at once: the summed score is then dominated by the class
    that covers most of the image (background, wall, road), whose logit grows where object
    evidence shrinks, so the Grad-CAM weights are mostly negative and the map is often zero
    after the ReLU. One class on its own region is pytorch-grad-cam's
    ``SemanticSegmentationTarget`` and, for most images, the largest object.

    Args:
        pred: ``(B, H, W)`` predicted class ids.

    Returns:
        ``(region (B, H, W) bool, class explained per image)``.
    """
    if pred.dim() != 3:
        raise ValueError(f"pred must be (B, H, W) class ids, got shape {tuple(pred.shape)}")
    classes = []
    for p in pred:
        ids, counts = p.unique(return_counts=True)
        order = counts.argsort(descending=True, stable=True)
        classes.append(int(ids[order[1 if len(order) > 1 else 0]]))
    chosen = torch.tensor(classes, device=pred.device)
    return pred == chosen[:, None, None], classes


def _segmentation_default(target_class: int | None, region: torch.Tensor | None) -> Callable[[Any], torch.Tensor]:
    def score_fn(out: torch.Tensor) -> torch.Tensor:
        return segmentation_score(out, target_class, region)

    return score_fn


def _detection_default(target_class: int | None, region: torch.Tensor | None) -> Callable[[Any], torch.Tensor]:
    if region is not None:
        raise ValueError("region selects pixels of a segmentation output; a detector's Grad-CAM explains "
                         "its detections (use target_class, or pass a DetectionScore as score_fn)")
    return DetectionScore(target_class=target_class)


@dataclass(frozen=True)
class GradCamTask:
    """What Grad-CAM needs to know about a task.

    Attributes:
        default_score: ``(target_class, region) -> score_fn``, the score explained when
            :func:`grad_cam` gets no ``score_fn``.
    """

    default_score: Callable[[int | None, torch.Tensor | None], Callable[[Any], torch.Tensor]]


# task name -> its Grad-CAM defaults
GRADCAM_TASKS: dict[str, GradCamTask] = {
    "segmentation": GradCamTask(_segmentation_default),
    "detection": GradCamTask(_detection_default),
}


def gradcam_task(model: nn.Module) -> GradCamTask:
    """The :data:`GRADCAM_TASKS` entry of ``model.task`` (segmentation when a model has none)."""
    name = getattr(model, "task", "segmentation")
    if name not in GRADCAM_TASKS:
        raise ValueError(f"Grad-CAM has no default score for task {name!r}; known: {sorted(GRADCAM_TASKS)} "
                         "(pass score_fn=)")
    return GRADCAM_TASKS[name]


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
        normalize: min-max scale each image's map on the tap's grid before upsampling, as
            pytorch-grad-cam's ``scale_cam_image``: ``(cam - min) / (max - min + 1e-7)``, in
            ``[0, 1)``; an all-zero map stays all zero. ``False``: the raw ``ReLU`` maps.
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

    Raises:
        RuntimeError: a tap fired more than once, never fired, or its output was modified in
            place after it fired (its gradient would then be the modified tensor's).
    """
    patterns = [taps] if isinstance(taps, str) else list(taps)
    names = select_taps(model, *patterns)
    task = gradcam_task(model)
    if score_fn is None:
        score_fn = task.default_score(target_class, region)
    elif target_class is not None or region is not None:
        raise ValueError("target_class / region configure the default score; with score_fn= put them in the score")
    watch = getattr(score_fn, "watch", None)
    taps = _taps_of(model)
    fired: dict[str, tuple[torch.Tensor, int]] = {}  # tap -> (its output, version when it fired)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in fired:
                raise RuntimeError(f"tap {name!r} fired twice in one forward pass; Grad-CAM explains one pass")
            if not output.requires_grad:
                # frozen weights and plain inputs: the model continues from a leaf copy that
                # requires grad (Captum's apply_gradient_requirements, without flipping the flag
                # of a tensor the caller may own); nothing upstream needs a gradient here
                output = output.detach().requires_grad_(True)
            fired[name] = (output, output._version)
            return output

        return hook

    was_training = model.training
    model.eval()
    handles = [taps.get(n).register_forward_hook(make_hook(n)) for n in names]
    grads: dict[str, torch.Tensor] = {}
    try:
        inner = watch(model) if callable(watch) else contextlib.nullcontext()
        with torch.enable_grad():
            with inner:
                output = model(dict(inputs), missing=tuple(missing))
                score = score_fn(output)
            if not isinstance(score, torch.Tensor) or score.dim() != 0:
                got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ValueError(f"score_fn must return a 0-dim tensor, got {got}")
            missing_taps = [n for n in names if n not in fired]
            if missing_taps:
                raise RuntimeError(f"taps {missing_taps} did not fire in the forward pass of {type(model).__name__}")
            changed = [n for n in names if fired[n][0]._version != fired[n][1]]
            if changed:
                raise RuntimeError(f"taps {changed} were modified in place after they fired; Grad-CAM needs the "
                                   "tap outputs intact (make the operation after the tap out-of-place)")
            if score.requires_grad:
                # only the graph between the taps and the score is differentiated; no input grads,
                # nothing accumulates in the parameters' .grad
                gs = torch.autograd.grad(score, [fired[n][0] for n in names], allow_unused=True)
                grads = {n: g for n, g in zip(names, gs) if g is not None}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    acts = {n: fired[n][0].detach() for n in names}
    out = {}
    size = tuple(next(iter(inputs.values())).shape[-2:])
    # detectors zero-pad their inputs (bottom / right) to a multiple of size_divisible, so their
    # maps cover the padded image: upsample to it and crop the image part
    div = int(getattr(model, "size_divisible", 1))  # every fusionzoo model says (1: no padding)
    padded = (-(-size[0] // div) * div, -(-size[1] // div) * div)
    for name in names:
        a = acts[name]
        g = grads.get(name)
        if a.dim() != 4 or g is None:
            out[name] = torch.zeros(a.shape[0], *size)
            continue
        alpha = g.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((alpha * a).sum(1, keepdim=True))  # (B, 1, h, w)
        if normalize:  # pytorch-grad-cam's scale_cam_image: min-max on the grid, then resize
            lo = cam.amin(dim=(2, 3), keepdim=True)
            cam = cam - lo
            cam = cam / (1e-7 + cam.amax(dim=(2, 3), keepdim=True))
        cam = F.interpolate(cam, size=padded, mode="bilinear", align_corners=False)[:, 0, : size[0], : size[1]]
        out[name] = cam.detach().float().cpu()
    return out


def gate_streams(info: TapInfo, modalities: Sequence[str]) -> list[str]:
    """The streams of a gate / attention tap's channel chunks, from the tap's metadata.

    A tap that declares its layout (``info.streams``) is read as declared. Otherwise the layout
    follows from the declared channel count ``G``: the model's ``M`` modalities in order when
    ``G`` is a multiple of ``M``, ``("fused", *modalities)`` when ``G == M + 1`` (hybrid decision
    gates), else one stream ``"all"``.

    Args:
        info: the tap's :class:`~fusionzoo.taps.TapInfo`.
        modalities: the model's modalities in order.
    """
    declared = getattr(info, "streams", None)
    if declared:
        return list(declared)
    m, g = len(modalities), int(info.channels)
    if g % m == 0:
        return list(modalities)
    if g == m + 1:
        return ["fused", *modalities]
    return ["all"]


def split_gate_channels(x: torch.Tensor, streams: Sequence[str]) -> dict[str, torch.Tensor]:
    """Split a gate / attention tap output into per-stream maps.

    Args:
        x: ``(B, G, h, w)`` tap output (``h = w = 1`` for channel attention).
        streams: the stream of each of ``len(streams)`` equal channel chunks, in order
            (:func:`gate_streams`); ``["all"]`` averages every channel.

    Returns:
        stream -> ``(B, h, w)`` (channel mean within the stream's chunk).

    Raises:
        ValueError: ``x`` is not 4-d, or ``G`` is not a multiple of ``len(streams)``.
    """
    if x.dim() != 4:
        raise ValueError(f"gate tap output must be (B, G, h, w), got {tuple(x.shape)}")
    if not streams or x.shape[1] % len(streams):
        raise ValueError(f"a gate tap with {x.shape[1]} channels cannot be split into the streams {list(streams)}; "
                         "expected a multiple of their count (see gate_streams)")
    chunks = x.chunk(len(streams), dim=1)
    return {n: c.mean(1) for n, c in zip(streams, chunks)}


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
    return {n: {k: v.cpu() for k, v in split_gate_channels(acts[n], gate_streams(info[n], model.modalities)).items()}
            for n in names}
