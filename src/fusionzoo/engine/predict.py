"""Run a trained fusion model on one's own image files (what ``fusionzoo predict`` does).

The steps, each a function so that Python users can call them one by one:

1. :func:`pair_files`: one file per modality, or folders paired by file stem;
2. :func:`read_pair`: the project's readers (:mod:`fusionzoo.data.io`: depth in metres from
   ``1/depth_scale`` m integer PNGs, thermal in ``[0, 1]``), so errors name the file;
3. :func:`prepare_inputs`: the model's stored normalization (the same :class:`Normalize` as
   training) and the input-size policy: ``resize`` to the training size (bilinear images,
   nearest-exact depth, as :func:`~fusionzoo.data.transforms.eval_transforms`), or ``pad`` the
   native size with zeros (after normalization: the mean; for depth: invalid) bottom/right to a
   multiple of the stride;
4. :func:`predict_pair`: the task's prediction (``missing=`` for an absent modality), brought back
   to the original frame: class probabilities cropped / resized bilinearly then arg-maxed; boxes
   rescaled to original pixels and clipped;
5. writers: :func:`colour_mask` (palette PNG whose pixel values are the class ids),
   :func:`overlay_segmentation` (``torchvision.utils.draw_segmentation_masks``),
   :func:`draw_detections` (``draw_bounding_boxes``) and :func:`coco_results` (COCO results list,
   ``category_id = class + 1``, the convention that ``fusionzoo mr2`` and pycocotools read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..data import dataset_entry
from ..data.base import EXTENSIONS
from ..data.benchmarks import voc_palette
from ..data.io import DataError, read_depth, read_rgb, read_thermal
from ..data.transforms import STATS, ModalityStats, eval_transforms
from ..tasks.segmentation import predict as segmentation_probabilities

__all__ = [
    "SIZE_POLICIES",
    "Geometry",
    "InputSettings",
    "coco_results",
    "colour_mask",
    "display_image",
    "draw_detections",
    "overlay_segmentation",
    "pair_files",
    "palette_for",
    "predict_pair",
    "prepare_inputs",
    "read_pair",
    "stored_normalization",
]

SIZE_POLICIES = ("resize", "pad")
_SHOWN = 5  # file names listed in a pairing error before "... and N more"


def _listing(paths: Sequence[Path]) -> str:
    names = ", ".join(str(p) for p in paths[:_SHOWN])
    return names + (f" ... and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def _folder_files(folder: Path, modality: str) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in EXTENSIONS:
            continue
        if path.stem in files:
            raise DataError(f"--{modality} {folder}: two files share the stem {path.stem!r} ({files[path.stem].name}, "
                            f"{path.name}); keep one per frame so that files pair by stem")
        files[path.stem] = path
    if not files:
        raise DataError(f"--{modality} {folder}: no image files ({', '.join(EXTENSIONS)})")
    return files


def pair_files(sources: Mapping[str, str | Path]) -> list[tuple[str, dict[str, Path]]]:
    """Pair one file per modality, or the files of one folder per modality by stem.

    Args:
        sources: modality -> a file, or a folder (``rgb/0001.jpg`` pairs with ``thermal/0001.png``).

    Returns:
        ``[(stem, {modality: path})]`` sorted by stem (a single pair named after the first file).

    Raises:
        FileNotFoundError: a path does not exist.
        DataError: files mixed with folders, an empty folder, two files of one stem in a folder, or
            files without a partner (names them, per modality).
    """
    paths = {m: Path(p) for m, p in sources.items()}
    for m, p in paths.items():
        if not p.exists():
            raise FileNotFoundError(f"--{m} {p}: no such file or folder")
    kinds = {m: p.is_dir() for m, p in paths.items()}
    if len(set(kinds.values())) > 1:
        raise DataError("give a file for every modality or a folder for every modality, not a mix: "
                        + ", ".join(f"--{m} {p} ({'folder' if kinds[m] else 'file'})" for m, p in paths.items()))
    if not any(kinds.values()):
        first = next(iter(paths.values()))
        return [(first.stem, paths)]
    listed = {m: _folder_files(p, m) for m, p in paths.items()}
    common = set.intersection(*(set(files) for files in listed.values()))
    unmatched = []
    for m, files in listed.items():
        alone = [files[s] for s in sorted(files) if s not in common]
        if alone:
            others = "/".join(k for k in listed if k != m)
            unmatched.append(f"{len(alone)} {m} file(s) without a {others} file of the same stem: {_listing(alone)}")
    if unmatched:
        raise DataError("unmatched files (pairing is by file stem): " + "; ".join(unmatched))
    return [(s, {m: listed[m][s] for m in listed}) for s in sorted(common)]


@dataclass(frozen=True)
class InputSettings:
    """How image files become model inputs.

    Attributes:
        normalization: modality -> statistics in raw units (rgb in [0, 1], depth in metres,
            thermal in [0, 1]); see :func:`stored_normalization`.
        depth_scale: integer depth units per metre (1000: millimetre PNGs; 5000: TUM / ICL).
        thermal_bits: significant bits of integer thermal files (None: the file's own).
        size_policy: ``"resize"`` to ``size`` and back, or ``"pad"`` to a multiple of ``divisor``.
        size: ``(H, W)`` for ``resize`` (the training size).
        divisor: padding multiple for ``pad`` (the deepest stride, 32).
    """

    normalization: Mapping[str, ModalityStats]
    depth_scale: float = 1000.0
    thermal_bits: int | None = None
    size_policy: str = "pad"
    size: tuple[int, int] | None = None
    divisor: int = 32

    def __post_init__(self) -> None:
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {self.size_policy!r}")
        if self.size_policy == "resize" and self.size is None:
            raise ValueError("size_policy='resize' needs size=(H, W), the size the model was trained at")
        if not self.depth_scale > 0:
            raise ValueError(f"depth_scale must be > 0 (integer depth units per metre), got {self.depth_scale}")


def stored_normalization(config: Mapping[str, Any] | None, modalities: Sequence[str],
                         dataset: str | None = None) -> tuple[dict[str, ModalityStats], list[str]]:
    """The model's input statistics: ``config["normalization"]`` (what ``save_pretrained`` stored),
    completed from :data:`~fusionzoo.data.transforms.STATS` of ``dataset`` (else ``default``).

    Returns:
        ``(stats per modality, modalities whose statistics were not stored)``: the caller warns.
    """
    stored = (config or {}).get("normalization") or {}
    fallback = dict(STATS["default"])
    fallback.update(STATS.get(dataset or "", {}))
    out, guessed = {}, []
    for m in modalities:
        if m in stored:
            out[m] = ModalityStats(tuple(stored[m]["mean"]), tuple(stored[m]["std"]))
        else:
            out[m] = fallback[m]
            guessed.append(m)
    return out, guessed


def palette_for(dataset: str | None, num_classes: int) -> list[tuple[int, int, int]]:
    """The colours of ``dataset``'s classes (its ``palette``), else the PASCAL VOC colour map
    without its black background entry (:func:`~fusionzoo.data.benchmarks.voc_palette`)."""
    palette: Any = None
    if dataset:
        try:
            factory = dataset_entry(dataset).factory
        except KeyError:
            factory = None
        palette = getattr(factory, "palette", None)
        if isinstance(palette, property):  # synthetic sets: a property whose value needs no instance state
            palette = palette.fget(None)
    if isinstance(palette, list) and len(palette) >= num_classes:
        return [tuple(int(v) for v in c) for c in palette[:num_classes]]
    return voc_palette(num_classes + 1)[1:]


def read_pair(files: Mapping[str, Path], settings: InputSettings) -> dict[str, np.ndarray]:
    """Read one frame's files in the raw convention of :mod:`fusionzoo.data.io`.

    Raises:
        DataError: an unreadable file, or files of one frame with different sizes (names both).
    """
    raw: dict[str, np.ndarray] = {}
    for m, path in files.items():
        if m in ("rgb", "hha"):
            raw[m] = read_rgb(path)
        elif m == "depth":
            raw[m] = read_depth(path, scale=settings.depth_scale)
        elif m == "thermal":
            raw[m] = read_thermal(path, bits=settings.thermal_bits)
        else:
            raise DataError(f"{path}: no reader for modality {m!r} (rgb, hha, depth, thermal)")
    sizes = {m: a.shape[:2] for m, a in raw.items()}
    if len(set(sizes.values())) > 1:
        raise DataError("files of one frame differ in size (align and resize them first): "
                        + ", ".join(f"{files[m]} {h}x{w}" for m, (h, w) in sizes.items()))
    return raw


@dataclass(frozen=True)
class Geometry:
    """Where the model input came from: the original ``(H, W)`` and the model input's ``(H, W)``
    before padding (``valid``); equal sizes for ``pad``, the training size for ``resize``."""

    original: tuple[int, int]
    valid: tuple[int, int]


def prepare_inputs(raw: Mapping[str, np.ndarray], settings: InputSettings,
                   device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], Geometry]:
    """Normalize (and resize or pad) raw arrays into ``{modality: (1, C, H, W)}`` float32 tensors."""
    modalities = tuple(raw)
    original = next(iter(raw.values())).shape[:2]
    size = settings.size if settings.size_policy == "resize" else None
    tf = eval_transforms(modalities, size=size, stats=dict(settings.normalization))
    sample = tf(dict(raw))
    inputs = {m: sample[m][None].to(device) for m in modalities}
    h, w = next(iter(inputs.values())).shape[-2:]
    if settings.size_policy == "pad":
        d = settings.divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            inputs = {m: F.pad(x, (0, pad_w, 0, pad_h)) for m, x in inputs.items()}
    return inputs, Geometry((int(original[0]), int(original[1])), (int(h), int(w)))


@torch.no_grad()
def predict_pair(model: nn.Module, inputs: Mapping[str, torch.Tensor], geometry: Geometry,
                 missing: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The model's prediction in the original frame.

    Returns:
        Segmentation: ``{"classes": (H, W) int64, "probabilities": (K, H, W) float32}``.
        Detection: ``{"boxes": (N, 4) xyxy original pixels, "scores": (N,), "labels": (N,)}``.
    """
    (vh, vw), (oh, ow) = geometry.valid, geometry.original
    if getattr(model, "task", "segmentation") == "detection":
        out = model(dict(inputs), missing=tuple(missing)) if missing else model(dict(inputs))
        det = {k: v.detach().float().cpu() if k != "labels" else v.detach().cpu() for k, v in out[0].items()
               if k in ("boxes", "scores", "labels")}
        boxes = det["boxes"] * torch.tensor([ow / vw, oh / vh, ow / vw, oh / vh])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, ow)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, oh)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {"boxes": boxes[keep], "scores": det["scores"][keep], "labels": det["labels"][keep]}
    prob = segmentation_probabilities(model, inputs, missing=missing)[:, :, :vh, :vw]  # (1, K, vh, vw)
    if (vh, vw) != (oh, ow):
        prob = F.interpolate(prob, size=(oh, ow), mode="bilinear", align_corners=False)
    prob = prob[0].float().cpu()
    return {"classes": prob.argmax(0), "probabilities": prob}


def colour_mask(classes: torch.Tensor | np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Image.Image:
    """A palette ("P" mode) PNG image: pixel values are the class ids, shown in the class colours."""
    ids = np.asarray(classes, dtype=np.uint8)
    img = Image.fromarray(ids, mode="P")
    flat = [v for c in palette for v in c]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def display_image(raw: Mapping[str, np.ndarray]) -> np.ndarray:
    """uint8 ``(H, W, 3)`` to draw on: the RGB image, else the first other modality in grey
    (thermal as is, depth scaled by its largest value)."""
    if "rgb" in raw:
        return raw["rgb"]
    key, arr = next(iter(raw.items()))
    if arr.ndim == 3:
        return arr
    top = float(arr.max()) if key == "depth" and arr.size and arr.max() > 0 else 1.0
    grey = (np.clip(arr / top, 0, 1) * 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def overlay_segmentation(image: np.ndarray, classes: torch.Tensor, palette: Sequence[tuple[int, int, int]],
                         alpha: float = 0.5) -> np.ndarray:
    """The class colours blended over ``image`` (uint8 ``(H, W, 3)``) with ``alpha``."""
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    masks = classes[None] == torch.arange(len(palette))[:, None, None]  # (K, H, W) bool
    out = draw_segmentation_masks(img, masks, alpha=alpha, colors=[tuple(c) for c in palette])
    return out.permute(1, 2, 0).numpy()


def draw_detections(image: np.ndarray, detections: Mapping[str, torch.Tensor], class_names: Sequence[str],
                    palette: Sequence[tuple[int, int, int]], score_thresh: float = 0.0) -> np.ndarray:
    """Boxes with ``score >= score_thresh`` drawn on ``image`` (uint8 ``(H, W, 3)``), labelled
    ``"<class> <score>"`` in the class colours."""
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    keep = detections["scores"] >= score_thresh
    boxes, scores, labels = detections["boxes"][keep], detections["scores"][keep], detections["labels"][keep]
    if len(boxes) == 0:
        return image.copy()
    text = [f"{class_names[int(c)] if int(c) < len(class_names) else int(c)} {float(s):.2f}"
            for c, s in zip(labels, scores)]
    colours = [tuple(palette[int(c) % len(palette)]) for c in labels]
    width = max(1, round(max(image.shape[:2]) / 400))  # visible on 1280-px frames, thin on small ones
    out = draw_bounding_boxes(img, boxes, labels=text, colors=colours, width=width)
    return out.permute(1, 2, 0).numpy()


def coco_results(detections: Mapping[str, torch.Tensor], image_id: int) -> list[dict[str, Any]]:
    """COCO result entries ``{image_id, category_id, bbox: [x, y, w, h], score}`` of one image:
    ``category_id`` is the class index + 1 (COCO ids start at 1; KAIST's ``person`` is 1), boxes
    are original-frame pixels."""
    out = []
    for box, score, label in zip(detections["boxes"].tolist(), detections["scores"].tolist(),
                                 detections["labels"].tolist()):
        x1, y1, x2, y2 = box
        out.append({"image_id": int(image_id), "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": round(float(score), 5)})
    return out
