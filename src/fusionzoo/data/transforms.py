"""Joint transforms: one geometric draw for every modality, mask and box; photometry on RGB only.

A raw sample (what a dataset reader produces, see :mod:`fusionzoo.data.io`) is a dict of
numpy arrays: ``rgb`` uint8 ``(H, W, 3)`` (or float32 in ``[0, 1]``), ``hha`` uint8
``(H, W, 3)``, ``depth`` float32 metres ``(H, W)`` with 0 = invalid, ``thermal`` float32
``(H, W)`` in ``[0, 1]``, ``mask`` uint8 ``(H, W)`` (255 = ignore), ``boxes`` float32
``(N, 4)`` xyxy pixels, ``labels`` int64 ``(N,)``, optional per-box ``ignore`` bool ``(N,)`` and
``occlusion`` int64 ``(N,)`` (they follow their boxes through crops), ``meta`` dict. :class:`JointTransform`
returns the same keys as tensors: modalities float32 ``(C, H, W)``, ``mask`` int64
``(H, W)``, ``boxes`` float32 ``(N, 4)``, ``labels`` int64 ``(N,)``.

Why the targets are declared the way they are (albumentations ``additional_targets``):

* ``depth`` is a *mask* target, so it is resampled with nearest neighbour. Bilinear
  resampling would average a valid depth with an invalid 0 at every hole border and invent
  depths that were never measured (ESANet resizes depth with nearest neighbour for the same
  reason).
* ``mask`` is shifted by +1 (mod 256) before the geometric ops and back after, so that the
  one shared mask fill value (0) becomes 255 = ignore for the label and 0 = invalid for depth:
  pixels rotated in from outside the image are "unknown" in both.
* ``thermal`` and ``hha`` are image targets (bilinear, fill 0).
* Resizes use ``cv2.INTER_NEAREST_EXACT`` for mask targets: OpenCV's plain ``INTER_NEAREST``
  picks ``floor(i * s)`` instead of the pixel centre, which shifts mask and depth by up to
  half an input pixel against the bilinear RGB when downscaling (the sub-pixel test in
  ``tests/test_data_transforms.py`` catches it). Custom pipelines should do the same.

Normalization statistics live in :data:`STATS` with their source; depth is in metres
(``depth_mode="metric"``) or normalized inverse depth (``depth_mode="inverse"``:
``near / d`` clipped to ``[0, 1]``). Invalid depth (0) is set to exactly 0 *after*
normalization in both modes, and every output is finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

__all__ = [
    "STATS",
    "JointTransform",
    "ModalityStats",
    "Normalize",
    "compute_stats",
    "eval_transforms",
    "to_tensor_sample",
    "train_transforms",
]

IMAGE_MODALITIES = ("rgb", "hha")
BOX_FLAGS = {"ignore": np.bool_, "occlusion": np.int64}  # per-box fields carried beside ``labels``
SCALAR_MODALITIES = ("depth", "thermal")


@dataclass(frozen=True)
class ModalityStats:
    """Per-channel mean and std of a modality in its raw unit (rgb/hha in [0, 1], depth in
    metres, thermal in [0, 1])."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET = ModalityStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: Normalization statistics by dataset and modality. Sources: ImageNet statistics for colour
#: (and for HHA, which is fed to ImageNet-pretrained encoders like an image); NYUDv2 depth from
#: ESANet (Seichter et al. 2021: 2841.9 mm / 1417.3 mm on the training set); the remaining depth
#: and thermal values are approximate and should be recomputed on the prepared training split
#: with :func:`compute_stats` when accuracy matters. Synthetic values were measured with
#: ``compute_stats`` on 256 default samples.
STATS: dict[str, dict[str, ModalityStats]] = {
    "default": {
        "rgb": IMAGENET,
        "hha": IMAGENET,
        "depth": ModalityStats((2.84,), (1.42,)),
        "thermal": ModalityStats((0.5,), (0.25,)),
    },
    "nyuv2": {"rgb": IMAGENET, "hha": IMAGENET, "depth": ModalityStats((2.842,), (1.417,))},
    "sunrgbd": {"rgb": IMAGENET, "hha": IMAGENET, "depth": ModalityStats((2.6,), (1.3,))},
    "mfnet": {"rgb": IMAGENET, "thermal": ModalityStats((0.38,), (0.15,))},
    "pst900": {"rgb": IMAGENET, "thermal": ModalityStats((0.40,), (0.17,))},
    "llvip": {"rgb": IMAGENET, "thermal": ModalityStats((0.35,), (0.20,))},
    "flir_aligned": {"rgb": IMAGENET, "thermal": ModalityStats((0.45,), (0.22,))},
    "kaist": {"rgb": IMAGENET, "thermal": ModalityStats((0.40,), (0.18,))},
    "m3fd": {"rgb": IMAGENET, "thermal": ModalityStats((0.38,), (0.20,))},
    # measured: compute_stats(create_dataset(name, num_samples=256, image_size=(240, 320)))
    "synthetic_rgbd": {
        "rgb": ModalityStats((0.550, 0.508, 0.490), (0.190, 0.159, 0.201)),
        "depth": ModalityStats((3.468,), (0.943,)),
    },
    "synthetic_rgbt": {
        "rgb": ModalityStats((0.546, 0.510, 0.493), (0.189, 0.158, 0.201)),
        "thermal": ModalityStats((0.495,), (0.147,)),
    },
}


def _stats_for(name: str | None) -> dict[str, ModalityStats]:
    stats = dict(STATS["default"])
    if name is not None:
        if name not in STATS:
            raise KeyError(f"no normalization statistics for {name!r}; known: {sorted(STATS)}")
        stats.update(STATS[name])
    return stats


class Normalize:
    """Per-modality normalization of raw float arrays (no tensors involved).

    Args:
        stats: Modality -> :class:`ModalityStats`, or a dataset name in :data:`STATS`.
        depth_mode: ``"metric"``: ``(d - mean) / std`` in metres; ``"inverse"``:
            ``min(near / d, 1)`` (0 for invalid, i.e. invalid reads as "infinitely far").
        near: Nearest depth in metres for ``depth_mode="inverse"``.
    """

    def __init__(
        self,
        stats: Mapping[str, ModalityStats] | str | None = None,
        depth_mode: str = "metric",
        near: float = 0.5,
    ) -> None:
        if depth_mode not in ("metric", "inverse"):
            raise ValueError(f"depth_mode must be 'metric' or 'inverse', got {depth_mode!r}")
        self.stats = _stats_for(stats) if stats is None or isinstance(stats, str) else dict(stats)
        self.depth_mode = depth_mode
        self.near = float(near)

    def __call__(self, key: str, arr: np.ndarray) -> np.ndarray:
        """Normalize one modality and move channels first.

        Args:
            key: Modality name.
            arr: Raw ``(H, W)`` or ``(H, W, C)`` array (uint8 images are scaled to [0, 1]).

        Returns:
            float32 ``(C, H, W)``, contiguous, finite everywhere.
        """
        chw = _chw_float(arr)
        if key == "depth":
            valid = chw > 0
            if self.depth_mode == "inverse":
                out = np.minimum(np.float32(self.near) / np.where(valid, chw, np.float32(1)), np.float32(1))
            else:
                st = self._get(key)
                out = chw
                out -= np.float32(st.mean[0])
                out *= np.float32(1.0 / st.std[0])
            out[~valid] = 0  # policy: invalid depth is exactly 0 after normalization
            return out
        st = self._get(key)
        if len(st.mean) != chw.shape[0]:
            raise ValueError(
                f"Normalize: {key!r} has {chw.shape[0]} channels but its statistics have {len(st.mean)}"
            )
        # (C, 1, 1) broadcasting keeps numpy's inner loop contiguous; a trailing axis of 3 is
        # several times slower.
        chw -= np.asarray(st.mean, np.float32)[:, None, None]
        chw *= (1.0 / np.asarray(st.std, np.float32))[:, None, None]
        if key not in IMAGE_MODALITIES:
            np.nan_to_num(chw, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        return chw

    def _get(self, key: str) -> ModalityStats:
        if key not in self.stats:
            raise KeyError(f"Normalize has no statistics for modality {key!r}; it has {sorted(self.stats)}")
        return self.stats[key]


def _chw_float(arr: np.ndarray) -> np.ndarray:
    """``(H, W)`` / ``(H, W, C)`` -> new float32 ``(C, H, W)`` array; uint8 is scaled to [0, 1]."""
    chw = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    out = np.empty(chw.shape, np.float32)
    if arr.dtype == np.uint8:
        np.multiply(chw, np.float32(1.0 / 255.0), out=out)
    else:
        out[...] = chw
    return out


def to_tensor_sample(sample: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, Any]:
    """Convert a raw numpy sample into the tensor sample of the data contract (no scaling
    beyond what the arrays already have: uint8 images become float in ``[0, 1]``)."""
    out = {key: torch.from_numpy(_chw_float(sample[key])) for key in modalities}
    out.update(_targets_to_tensors(sample))
    return out


def _targets_to_tensors(sample: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "mask" in sample:
        out["mask"] = torch.from_numpy(np.asarray(sample["mask"]).astype(np.int64))
    if "boxes" in sample:
        out["boxes"] = torch.from_numpy(np.asarray(sample["boxes"], np.float32).reshape(-1, 4))
        out["labels"] = torch.from_numpy(np.asarray(sample["labels"], np.int64).reshape(-1))
        for key, dtype in BOX_FLAGS.items():
            if key in sample:
                out[key] = torch.from_numpy(np.asarray(sample[key], dtype).reshape(-1))
    if "meta" in sample:
        out["meta"] = dict(sample["meta"])
    return out


class JointTransform:
    """Geometric ops applied identically to every modality/mask/box, photometric ops to RGB,
    then per-modality normalization and conversion to tensors.

    Args:
        geometric: albumentations transforms that move pixels (crop, flip, rotate, resize).
        photometric: albumentations transforms that change colours; applied to ``rgb`` only.
        normalize: A :class:`Normalize`, or ``None`` for un-normalized tensors (uint8 images
            scaled to ``[0, 1]``, depth in metres, thermal in ``[0, 1]``).
        min_box_visibility: Boxes keeping less than this fraction of their area after a crop
            are dropped.

    Randomness: each call draws one seed from numpy's global generator and reseeds the
    albumentations pipelines with it, so ``np.random.seed`` (which PyTorch's DataLoader sets per
    worker, and ``SeededDataset`` per sample) makes augmentation reproducible.

    Example:
        >>> t = train_transforms(("rgb", "depth"), size=(240, 320), stats="nyuv2")
        >>> out = t({"rgb": rgb_u8, "depth": depth_m, "mask": mask_u8})  # doctest: +SKIP
        >>> out["rgb"].shape, out["depth"].shape, out["mask"].dtype     # doctest: +SKIP
        (torch.Size([3, 240, 320]), torch.Size([1, 240, 320]), torch.int64)
    """

    def __init__(
        self,
        geometric: Sequence[A.BasicTransform] = (),
        photometric: Sequence[A.BasicTransform] = (),
        normalize: Normalize | None = None,
        min_box_visibility: float = 0.25,
    ) -> None:
        self.geometric = list(geometric)
        self.photometric = list(photometric)
        self.normalize = normalize
        self._geo = (
            A.Compose(
                self.geometric,
                bbox_params=A.BboxParams(
                    format="pascal_voc",
                    label_fields=["box_labels", *(f"box_{k}" for k in BOX_FLAGS)],
                    min_visibility=min_box_visibility,
                    clip=True,
                ),
                additional_targets={"depth": "mask", "thermal": "image", "hha": "image", "label": "mask"},
            )
            if self.geometric
            else None
        )
        self._photo = A.Compose(self.photometric) if self.photometric else None

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """Transform a raw numpy sample.

        Args:
            sample: Raw sample (see module docstring); ``meta`` is passed through.

        Returns:
            Tensor sample: modalities float32 ``(C, H, W)``, ``mask`` int64 ``(H, W)``,
            ``boxes`` float32 ``(N, 4)``, ``labels`` int64 ``(N,)``, ``meta``.
        """
        modalities = [k for k in ("rgb", "hha", "depth", "thermal") if k in sample]
        unknown = [k for k in sample if k not in (*modalities, "mask", "boxes", "labels", *BOX_FLAGS, "meta")]
        if unknown:
            raise KeyError(f"JointTransform: unknown sample keys {unknown}")
        self._reseed()
        data = {k: sample[k] for k in modalities}
        has_mask = "mask" in sample
        has_boxes = "boxes" in sample
        flags = {k: sample[k] for k in BOX_FLAGS if k in sample}
        if self._geo is not None:
            data, mask, boxes, labels, flags = self._apply_geometric(sample, data, modalities)
        else:
            mask = sample.get("mask")
            boxes, labels = sample.get("boxes"), sample.get("labels")
        if self._photo is not None and "rgb" in data:
            data["rgb"] = self._photo(image=data["rgb"])["image"]
        convert = self.normalize if self.normalize is not None else (lambda _key, arr: _chw_float(arr))
        out: dict[str, Any] = {k: torch.from_numpy(convert(k, v)) for k, v in data.items()}
        targets: dict[str, Any] = {}
        if has_mask:
            targets["mask"] = mask
        if has_boxes:
            targets["boxes"], targets["labels"] = boxes, labels
            targets.update(flags)
        if "meta" in sample:
            targets["meta"] = sample["meta"]
        out.update(_targets_to_tensors(targets))
        return out

    def _reseed(self) -> None:
        # albumentations 2 keeps private generators seeded from OS entropy at construction, so
        # by default every forked DataLoader worker replays the same augmentation stream and no
        # run is reproducible. One draw from numpy's global generator per sample ties the
        # augmentation to the seeding that PyTorch does per worker and that the training loop
        # does per sample (engine.distributed.SeededDataset).
        seed = int(np.random.randint(0, 2**31 - 1))
        if self._geo is not None:
            self._geo.set_random_seed(seed)
        if self._photo is not None:
            self._photo.set_random_seed(seed + 1)

    def _apply_geometric(self, sample, data, modalities):
        first = modalities[0]
        kwargs: dict[str, Any] = {"image": data[first]}
        for key in modalities[1:]:
            kwargs[key] = data[key]
        # +1 mod 256: ignore (255) -> 0, the fill value of every mask target (see module doc)
        if "mask" in sample:
            kwargs["label"] = np.asarray(sample["mask"], np.uint8) + np.uint8(1)
        boxes = np.asarray(sample.get("boxes", np.zeros((0, 4), np.float32)), np.float32).reshape(-1, 4)
        labels = np.asarray(sample.get("labels", np.zeros((0,), np.int64)), np.int64).reshape(-1)
        kwargs["bboxes"], kwargs["box_labels"] = boxes, labels
        for key, dtype in BOX_FLAGS.items():  # filled when absent: albumentations needs every label field
            kwargs[f"box_{key}"] = np.asarray(sample.get(key, np.zeros(len(labels), dtype)), dtype).reshape(-1)
        out = self._geo(**kwargs)
        data = {first: out["image"], **{k: out[k] for k in modalities[1:]}}
        mask = (out["label"] - np.uint8(1)) if "mask" in sample else None
        return (
            data,
            mask,
            np.asarray(out["bboxes"], np.float32).reshape(-1, 4),
            np.asarray(out["box_labels"], np.int64).reshape(-1),
            {k: np.asarray(out[f"box_{k}"], dtype).reshape(-1) for k, dtype in BOX_FLAGS.items() if k in sample},
        )

    def __repr__(self) -> str:
        return (
            f"JointTransform(geometric={[type(t).__name__ for t in self.geometric]}, "
            f"photometric={[type(t).__name__ for t in self.photometric]}, normalize={self.normalize is not None})"
        )


def train_transforms(
    modalities: Sequence[str] = ("rgb", "depth"),
    size: tuple[int, int] = (480, 640),
    *,
    scale: tuple[float, float] = (0.25, 1.0),
    crop: str = "resized",
    hflip: float = 0.5,
    rotate: float = 10.0,
    photometric: bool = True,
    stats: Mapping[str, ModalityStats] | str | None = None,
    depth_mode: str = "metric",
) -> JointTransform:
    """Standard training pipeline: random crop (two rules), horizontal flip, small rotation (all
    modalities), colour jitter (RGB only), per-modality normalization.

    Args:
        modalities: Modality keys the samples carry (only used to validate ``stats``).
        size: Output ``(H, W)``.
        scale: With ``crop="resized"``, the area fraction range of the random crop before resizing
            to ``size``; with ``crop="rescale_pad"``, the range of the factor the whole image is
            rescaled by (e.g. ``(0.5, 1.75)``).
        crop: ``"resized"`` (torchvision's RandomResizedCrop: zooms in only) or ``"rescale_pad"``
            (the CMX, SA-Gate and ESANet recipes: rescale the image by a factor in ``scale``, pad
            images with 0 and the label with the ignore index 255 where the image is smaller than
            ``size``, then crop ``size`` at random; zooms out as well). The reference codes pad
            normalized images with 0 (the mean); here raw images are padded with 0 before
            normalization.
        hflip: Probability of a horizontal flip.
        rotate: Maximum absolute rotation in degrees (0 disables).
        photometric: Colour jitter on RGB.
        stats: Normalization statistics (dataset name in :data:`STATS` or a mapping).
        depth_mode: See :class:`Normalize`.

    Returns:
        A :class:`JointTransform`.
    """
    norm = Normalize(stats, depth_mode=depth_mode)
    for m in modalities:
        if m != "depth":
            norm._get(m)
    if crop == "resized":
        geo: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=tuple(size),
                scale=scale,
                ratio=(0.75, 1.333),
                p=1.0,
                mask_interpolation=cv2.INTER_NEAREST_EXACT,
            )
        ]
    elif crop == "rescale_pad":
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"crop='rescale_pad' needs 0 < scale[0] <= scale[1] (rescale factors), got {scale}")
        geo = [
            # scale_limit is relative to 1: a factor in [scale[0], scale[1]].
            A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST_EXACT, p=1.0),
            # fill_mask 0 is the ignore label here (labels travel shifted by +1, see _apply_geometric).
            A.PadIfNeeded(min_height=size[0], min_width=size[1], position="top_left", border_mode=cv2.BORDER_CONSTANT,
                          fill=0, fill_mask=0),
            A.RandomCrop(height=size[0], width=size[1], p=1.0),
        ]
    else:
        raise ValueError(f"crop must be 'resized' or 'rescale_pad', got {crop!r}")
    if hflip > 0:
        geo.append(A.HorizontalFlip(p=hflip))
    if rotate > 0:
        geo.append(A.Affine(rotate=(-rotate, rotate), fill=0, fill_mask=0, p=0.5))
    photo = (
        [A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.8)] if photometric else []
    )
    return JointTransform(geo, photo, norm)


def eval_transforms(
    modalities: Sequence[str] = ("rgb", "depth"),
    size: tuple[int, int] | None = None,
    *,
    stats: Mapping[str, ModalityStats] | str | None = None,
    depth_mode: str = "metric",
) -> JointTransform:
    """Evaluation pipeline: optional resize to ``size`` and normalization, nothing random."""
    norm = Normalize(stats, depth_mode=depth_mode)
    for m in modalities:
        if m != "depth":
            norm._get(m)
    geo = (
        [A.Resize(height=size[0], width=size[1], p=1.0, mask_interpolation=cv2.INTER_NEAREST_EXACT)]
        if size is not None
        else []
    )
    return JointTransform(geo, [], norm)


def compute_stats(dataset, num_samples: int = 256) -> dict[str, ModalityStats]:
    """Measure per-modality mean/std (raw units, valid depth pixels only) on a dataset.

    Args:
        dataset: A fusionzoo dataset; its ``raw(index)`` method supplies numpy samples.
        num_samples: Number of evenly spaced samples to use.

    Returns:
        Modality -> :class:`ModalityStats`, ready for :class:`Normalize`.
    """
    n = len(dataset)
    idx = np.linspace(0, n - 1, min(n, num_samples)).round().astype(int)
    sums: dict[str, np.ndarray] = {}
    sq: dict[str, np.ndarray] = {}
    cnt: dict[str, float] = {}
    for i in idx:
        raw = dataset.raw(int(i))
        for key in dataset.modalities:
            x = raw[key].astype(np.float64)
            if raw[key].dtype == np.uint8:
                x /= 255.0
            x = x.reshape(-1, 1) if x.ndim == 2 else x.reshape(-1, x.shape[-1])
            if key == "depth":
                x = x[x[:, 0] > 0]
            sums[key] = sums.get(key, 0) + x.sum(0)
            sq[key] = sq.get(key, 0) + (x * x).sum(0)
            cnt[key] = cnt.get(key, 0) + x.shape[0]
    out = {}
    for key, total in sums.items():
        mean = total / cnt[key]
        std = np.sqrt(np.maximum(sq[key] / cnt[key] - mean**2, 1e-12))
        out[key] = ModalityStats(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    return out
