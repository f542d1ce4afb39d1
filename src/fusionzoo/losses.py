"""Segmentation losses of the published recipes: deep supervision and class weighting.

Pure functions over tensors (no engine, no models): the trainer (``engine/loop.py``) calls
:func:`segmentation_loss` with the model's side outputs, and ``train.py`` computes the class
weights once with :func:`median_frequency_weights` over the training set's pixel counts
(``fusionzoo.data.statistics.class_pixel_counts``).

The references, read at the commits the published entries name:

- ESANet (Seichter et al., ICRA 2021, Sec. III-D "pyramid supervision"; TUI-NICR/ESANet
  ``src/utils.py`` ``CrossEntropyLoss2d``, ``train.py``): the main output at input resolution plus
  the side outputs at strides 8, 16, 32, each against the label resized to its size with
  nearest-neighbour sampling (OpenCV ``INTER_NEAREST``: row ``floor(i * H / h)``, the top-left
  pixel of each block); one weighted cross-entropy per scale, normalized by the summed class
  weights of its labelled pixels (PyTorch's weighted mean); the four terms summed with weight 1.
  Class weights: median frequency over the training set (``--class_weighting median_frequency``,
  the reference's default; :func:`median_frequency_weights`).
- ACNet (Hu et al., ICIP 2019; anheidelonghu/ACNet ``utils/utils.py`` ``CrossEntropyLoss2d``,
  RedNet's loss): the main output plus four side outputs at strides 2, 4, 8, 16, each against the
  label resized with scikit-image ``resize(order=0)``, whose pixel-centre nearest sampling is
  row ``floor((i + 0.5) * H / h)`` (PyTorch's ``nearest-exact``); one weighted cross-entropy per
  scale, normalized by the *number* of labelled pixels; the five terms summed with weight 1.
- SA-Gate (Chen et al., ECCV 2020; ``model/SA-Gate.nyu/network.py`` and ``train.py``): the FCN
  auxiliary head's logits upsampled bilinearly (``align_corners=True``) to the label's size,
  unweighted cross-entropy (mean over labelled pixels), ``loss + 0.2 * aux_loss``.

The side-output weights play the role of mmsegmentation's ``auxiliary_head`` ``loss_weight``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["SIDE_RESIZE", "median_frequency_weights", "segmentation_loss"]

# How a side output meets the label, by reference (see the module docstring):
# "nearest": the label down to the side output's size, OpenCV INTER_NEAREST (ESANet);
# "nearest-exact": the label down, pixel-centre nearest (scikit-image order 0; ACNet);
# "bilinear": the side logits up to the label's size, bilinear with align_corners=True (SA-Gate);
# "bilinear-half-pixel": the same with align_corners=False (GeminiFusion's per-modality logits).
SIDE_RESIZE = ("nearest", "nearest-exact", "bilinear", "bilinear-half-pixel")
AVERAGES = ("weighted", "pixels")


def _cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    average: str,
) -> torch.Tensor:
    """One scale's term: ``(B, K, h, w)`` logits against a ``(B, h, w)`` label."""
    if average == "weighted":  # sum_p w[y_p] * nll_p / sum_p w[y_p] over labelled p (ESANet)
        return F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                               label_smoothing=label_smoothing)
    # sum_p w[y_p] * nll_p / #labelled pixels (RedNet / ACNet); 0 / 0 = NaN as in the reference
    total = F.cross_entropy(logits, target, weight=class_weights, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction="sum")
    return total / (target != ignore_index).sum()


def _side_pair(side: torch.Tensor, target: torch.Tensor, resize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a side output ``(B, K, h, w)`` and the label ``(B, H, W)`` to one size, as ``resize`` says."""
    if resize in ("bilinear", "bilinear-half-pixel"):
        return F.interpolate(side, size=target.shape[-2:], mode="bilinear", align_corners=resize == "bilinear"), target
    # Labels as float are exact (integers < 2^24); nearest sampling never mixes two labels.
    small = F.interpolate(target[:, None].float(), size=side.shape[-2:], mode=resize)
    return side, small[:, 0].to(target.dtype)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    side_logits: Sequence[torch.Tensor] = (),
    side_weights: Sequence[float] | None = None,
    class_weights: torch.Tensor | None = None,
    ignore_index: int = 255,
    label_smoothing: float = 0.0,
    side_resize: Literal["nearest", "nearest-exact", "bilinear", "bilinear-half-pixel"] = "nearest",
    average: Literal["weighted", "pixels"] = "weighted",
) -> torch.Tensor:
    """Cross-entropy of the main output plus weighted side-output (deep supervision) terms.

    ``loss = CE(logits, target) + sum_i side_weights[i] * CE(side_i, target resized)``, each
    term its own mean (see ``average``): the ESANet, ACNet and SA-Gate recipes (module docstring).
    Without ``side_logits`` and class weights this is ``F.cross_entropy(logits, target)``.

    Args:
        logits: ``(B, K, H, W)`` main output at the label's resolution.
        target: ``(B, H, W)`` int64 class indices, ``ignore_index`` where unlabelled.
        side_logits: side outputs ``(B, K, h_i, w_i)``, in the model's ``side_logits`` order.
        side_weights: one weight per side output; ``None`` = deep supervision off: the side outputs
            then enter as ``0 * sum(side)``, so their parameters get an exact zero gradient (and
            DistributedDataParallel sees every parameter used).
        class_weights: ``(K,)`` per-class weights (e.g. :func:`median_frequency_weights`), or None.
        ignore_index: label value that contributes nothing (the resized labels keep it).
        label_smoothing: PyTorch's cross-entropy label smoothing, in every term.
        side_resize: how a side output meets the label: ``"nearest"`` / ``"nearest-exact"`` resize
            the label down to the side output (ESANet / ACNet), ``"bilinear"`` the side logits up
            to the label (SA-Gate); see :data:`SIDE_RESIZE`.
        average: ``"weighted"``: each term divided by the summed class weights of its labelled
            pixels (PyTorch's weighted mean; ESANet, SA-Gate); ``"pixels"``: by the number of
            labelled pixels (RedNet, ACNet). Equal without class weights.

    Returns:
        The scalar loss. A term without labelled pixels is NaN (0 / 0), as in the references.

    Raises:
        ValueError: ``side_weights`` and ``side_logits`` of different lengths, a negative side
            weight, class weights that are not ``(K,)``, or an unknown ``side_resize`` / ``average``.
    """
    if side_resize not in SIDE_RESIZE:
        raise ValueError(f"side_resize must be one of {list(SIDE_RESIZE)}, got {side_resize!r}")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {list(AVERAGES)}, got {average!r}")
    num_classes = logits.shape[1]
    if class_weights is not None:
        if class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},) for logits {tuple(logits.shape)}, "
                             f"got {tuple(class_weights.shape)}")
        class_weights = class_weights.to(device=logits.device, dtype=logits.dtype)
    loss = _cross_entropy(logits, target, class_weights, ignore_index, label_smoothing, average)
    if side_weights is None:
        # Off: keep the side classifiers in the graph with a zero gradient (DDP needs every
        # parameter used; the weights stay exactly as initialised).
        for side in side_logits:
            loss = loss + 0.0 * side.sum()
        return loss
    if len(side_weights) != len(side_logits):
        raise ValueError(f"side_weights has {len(side_weights)} entries but the model gave {len(side_logits)} side "
                         f"outputs (shapes {[tuple(s.shape) for s in side_logits]}); give one weight per side output")
    for weight, side in zip(side_weights, side_logits):
        if weight < 0:
            raise ValueError(f"side_weights must be >= 0, got {list(side_weights)}")
        side, small = _side_pair(side, target, side_resize)
        loss = loss + weight * _cross_entropy(side, small, class_weights, ignore_index, label_smoothing, average)
    return loss


def median_frequency_weights(class_pixel_counts: torch.Tensor, image_pixel_counts: torch.Tensor) -> torch.Tensor:
    """Median-frequency class weights (Eigen & Fergus, ICCV 2015, Sec. 4.1; ESANet's default).

    ``freq(c) = class_pixel_counts[c] / image_pixel_counts[c]``: the pixels of class ``c`` over the
    total pixels of the images in which ``c`` is present (ignored pixels included, as ESANet counts
    ``h * w`` per image); ``weight(c) = median(freq) / freq(c)``, where the median of an even number
    of classes is the mean of the two middle ones (``numpy.median``, as ESANet computes it).

    Absent classes (no pixel in the counted set): ESANet raises on them (its weights become NaN).
    Here they are left out of the median and get weight 0, with a warning naming them: a class
    that never occurs in the training labels is never a target, so its weight cannot change the
    training loss.

    Args:
        class_pixel_counts: ``(K,)`` pixels of each class over the training set.
        image_pixel_counts: ``(K,)`` summed sizes (``H * W``) of the images containing each class.

    Returns:
        ``(K,)`` float32 weights.

    Raises:
        ValueError: shapes differ or are not 1-D, negative counts, a class with pixels but no image
            pixels, or no class present at all.
    """
    cp = torch.as_tensor(class_pixel_counts, dtype=torch.float64)
    ip = torch.as_tensor(image_pixel_counts, dtype=torch.float64)
    if cp.ndim != 1 or cp.shape != ip.shape:
        raise ValueError(f"class_pixel_counts and image_pixel_counts must be (K,) each, got {tuple(cp.shape)} "
                         f"and {tuple(ip.shape)}")
    if (cp < 0).any() or (ip < 0).any():
        raise ValueError("pixel counts must be >= 0")
    present = cp > 0
    if (present & (ip < cp)).any():
        bad = torch.nonzero(present & (ip < cp)).flatten().tolist()
        raise ValueError(f"classes {bad} have more pixels than the images containing them: "
                         "image_pixel_counts must sum H * W over the images where the class occurs")
    if not present.any():
        raise ValueError("no class has any pixel: median-frequency weights need at least one labelled class")
    freq = cp[present] / ip[present]
    median = torch.quantile(freq, 0.5)  # the mean of the two middle values for an even count (numpy.median)
    weights = torch.zeros_like(cp)
    weights[present] = median / freq
    if not present.all():
        absent = torch.nonzero(~present).flatten().tolist()
        warnings.warn(f"median-frequency class weights: classes {absent} have no pixel in the counted "
                      "training labels; they get weight 0 and stay out of the median", stacklevel=2)
    return weights.float()
