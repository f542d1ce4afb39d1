"""KAIST multispectral pedestrian benchmark: the MR^-2 protocol, annotation and result files.

The protocol (Hwang et al., CVPR 2015; the Python evaluation distributed with MLPD, Kim et al.,
RA-L 2021, which ports Dollar's Matlab toolbox) on top of :func:`.metrics.log_average_miss_rate`:

* ground truth: ``person`` boxes; ``people``, ``cyclist`` and ``person?`` boxes (and boxes a
  file flags ``ignore``) are ignore regions; a detection on an ignore region is neither a true
  nor a false positive;
* "reasonable" subset: height >= 55 px and occlusion none (0) or partial (1); other boxes
  become ignore regions;
* boxes not inside the 5 px image border ``(5, 5, 635, 507)`` become ignore regions;
* miss rate against FPPI, log-averaged over 9 points from 1e-2 to 1e0;
* subsets ``all``, ``day`` (test sets 06-08; train sets 00-02) and ``night`` (09-11; 03-05).

:func:`miss_rates` is the one entry point: ``train.py`` (through
the detection task's evaluator, ``fusionzoo.tasks.DetectionEvaluator``) and ``fusionzoo mr2``
both call it.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import _numpy, _overlaps, log_average_miss_rate

__all__ = [
    "KAIST_BORDER",
    "KAIST_PROTOCOL",
    "KaistEvalError",
    "check_alignment",
    "condition_of",
    "evaluate_files",
    "load_annotations",
    "load_results",
    "miss_rates",
    "protocol_for",
    "protocol_miss_rates",
]

KAIST_FRAME = (640.0, 512.0)  # width, height of a KAIST frame
KAIST_BORDER = (5.0, 5.0, 635.0, 507.0)  # x1, y1, x2, y2 of the 640x512 frame minus 5 px
KAIST_PROTOCOL: dict[str, Any] = {
    "height_range": (55.0, math.inf),
    "max_occlusion": 1,
    "border": KAIST_BORDER,
    "fppi_range": (1e-2, 1.0),
    "num_points": 9,
    "iou_thresh": 0.5,
}
# Datasets whose validation reports MR^-2 (beside COCO AP) and the protocol they use.
PROTOCOLS: dict[str, dict[str, Any]] = {"kaist": KAIST_PROTOCOL}
DAY_SETS = frozenset({0, 1, 2, 6, 7, 8})  # KAIST capture sets recorded in daylight
PERSON_LABELS = ("person",)  # KAIST labels that are pedestrians; the others are ignore regions
_SET_RE = re.compile(r"set(\d\d)")


class KaistEvalError(ValueError):
    """A malformed annotation or result file (the message names the file and the fix)."""


def protocol_for(dataset: str | None) -> dict[str, Any] | None:
    """The MR^-2 protocol of ``dataset`` (keyword arguments of ``log_average_miss_rate``), or None."""
    return PROTOCOLS.get(dataset) if dataset else None


def condition_of(name: str) -> str | None:
    """``"day"`` or ``"night"`` of a KAIST frame name (``set06/V000/I00019``, ``set06_V000_I00019``),
    None when the name carries no ``setXX``."""
    m = _SET_RE.search(name)
    if m is None:
        return None
    return "day" if int(m.group(1)) in DAY_SETS else "night"


def miss_rates(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    conditions: Sequence[str | None] | None = None,
    **protocol: Any,
) -> dict[str, float]:
    """MR^-2 over all images and per condition (day / night), KAIST protocol by default.

    Args:
        predictions: per image ``boxes`` ``(N, 4)`` xyxy pixels of the original frame,
            ``scores`` ``(N,)``, ``labels`` ``(N,)``.
        targets: per image ``boxes`` ``(M, 4)``, ``labels`` ``(M,)``, optional ``ignore`` and
            ``occlusion`` ``(M,)``.
        conditions: per image ``"day"``, ``"night"`` or None (then only ``all`` is reported).
        **protocol: overrides of :data:`KAIST_PROTOCOL` (e.g. ``border=None``).

    Returns:
        ``{"all": mr, "day": mr, "night": mr}`` in [0, 1]; a condition without images is absent.
    """
    kwargs = {**KAIST_PROTOCOL, **protocol}
    out = {"all": float(log_average_miss_rate(predictions, targets, **kwargs))}
    if conditions is None:
        return out
    if len(conditions) != len(predictions):
        raise ValueError(f"got {len(conditions)} conditions for {len(predictions)} images; give one per image")
    for cond in ("day", "night"):
        idx = [i for i, c in enumerate(conditions) if c == cond]
        if idx:
            out[cond] = float(log_average_miss_rate([predictions[i] for i in idx], [targets[i] for i in idx], **kwargs))
    return out


def _scale(d: Mapping[str, torch.Tensor], sx: float, sy: float) -> dict[str, torch.Tensor]:
    out = dict(d)
    if sx != 1.0 or sy != 1.0:
        factor = torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
        out["boxes"] = torch.as_tensor(d["boxes"]).double().reshape(-1, 4) * factor
    return out


def protocol_miss_rates(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    metas: Sequence[Mapping[str, Any]],
    input_sizes: Sequence[tuple[int, int]],
) -> dict[str, float]:
    """MR^-2 of a validation pass when the dataset has a protocol (``{}`` otherwise).

    Boxes are mapped back to the original frame (``meta["orig_size"]`` over the network
    input size) first: the protocol's 55 px height and its border are in original pixels.

    Args:
        predictions, targets: as :func:`miss_rates`, in network-input pixels.
        metas: the samples' ``meta`` (``dataset``, ``id``, ``orig_size``).
        input_sizes: ``(H, W)`` of each image as the network saw it.

    Returns:
        ``{"mr2": all, "mr2_day": day, "mr2_night": night}`` (keys present where measured), or ``{}``.
    """
    datasets = {m.get("dataset") for m in metas}
    protocol = protocol_for(next(iter(datasets))) if len(datasets) == 1 else None
    if protocol is None:
        return {}
    preds, gts = [], []
    for p, t, m, (h, w) in zip(predictions, targets, metas, input_sizes):
        oh, ow = m.get("orig_size", (h, w))
        preds.append(_scale(p, ow / w, oh / h))
        gts.append(_scale(t, ow / w, oh / h))
    res = miss_rates(preds, gts, [condition_of(str(m.get("id", ""))) for m in metas], **protocol)
    return {("mr2" if k == "all" else f"mr2_{k}"): v for k, v in res.items()}


# -- files --------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise KaistEvalError(f"{path}: {what} file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KaistEvalError(f"{path}: not valid JSON ({err}); expected a COCO-style {what} file") from err


def _annotation_data(path: Path) -> tuple[list[int], list[str], list[dict[str, torch.Tensor]], dict[int, str], list[tuple[float, float]]]:
    """:func:`load_annotations` plus the categories (``id -> name``) and each image's ``(width, height)``."""
    data = _read_json(path, "annotation")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise KaistEvalError(f"{path}: expected a COCO-style object with 'images' and 'annotations'")
    if not data["images"]:
        raise KaistEvalError(f"{path}: 'images' is empty; no image to evaluate")
    cats = {c.get("id"): str(c.get("name", "")) for c in data.get("categories", [])}
    try:
        images = sorted(data["images"], key=lambda im: im["id"])
        ids = [int(im["id"]) for im in images]
        names = [str(im.get("im_name", im.get("file_name", im["id"]))) for im in images]
        # KAIST frames are 640x512; files that give no size are taken to be KAIST's.
        sizes = [(float(im.get("width", KAIST_FRAME[0])), float(im.get("height", KAIST_FRAME[1]))) for im in images]
    except (KeyError, TypeError, ValueError) as err:
        raise KaistEvalError(f"{path}: every entry of 'images' needs an integer 'id' ({err})") from err
    per_image: dict[int, list[dict]] = {i: [] for i in ids}
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "bbox" not in a:
            raise KaistEvalError(f"{path}: annotations[{k}] needs 'image_id' and 'bbox' (x, y, w, h)")
        if a["image_id"] not in per_image:
            raise KaistEvalError(f"{path}: annotations[{k}] refers to image_id {a['image_id']} absent from 'images'")
        per_image[a["image_id"]].append(a)
    targets = []
    for i in ids:
        anns = per_image[i]
        xywh = np.asarray([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        name_ok = [cats.get(a.get("category_id"), "person") in PERSON_LABELS for a in anns]
        ignore = np.asarray([bool(a.get("ignore", 0)) or not ok for a, ok in zip(anns, name_ok)], bool)
        occlusion = np.asarray([int(a.get("occlusion", -1)) for a in anns], np.int64)
        targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.zeros(len(anns), dtype=torch.int64),
                        "ignore": torch.from_numpy(ignore), "occlusion": torch.from_numpy(occlusion)})
    return ids, names, targets, cats, sizes


def load_annotations(path: str | Path) -> tuple[list[int], list[str], list[dict[str, torch.Tensor]]]:
    """Read KAIST COCO-style test annotations (the format of MLPD's ``KAIST_annotation.json``).

    ``images`` carry ``id`` and ``im_name`` (``set06/V000/I00019``); ``annotations`` carry
    ``image_id``, ``category_id``, ``bbox`` (x, y, w, h), optional ``occlusion`` (0/1/2) and
    ``ignore``. Categories not named ``person`` (``people``, ``cyclist``, ``person?``) are
    ignore regions.

    Returns:
        ``(image_ids, names, targets)`` sorted by image id; targets have ``boxes`` xyxy float64,
        ``labels`` (0), ``ignore`` bool and ``occlusion`` int64 (-1 where not given).

    Raises:
        KaistEvalError: unreadable file or missing keys (names the file and the key).
    """
    ids, names, targets, _, _ = _annotation_data(Path(path))
    return ids, names, targets


def _empty_prediction() -> dict[str, list]:
    return {"boxes": [], "scores": []}


def _check_detection(where: str, bbox: Any, score: Any, size: tuple[float, float] | None) -> None:
    """Refuse a detection that would enter the metric as a plausible number: a bbox that is not
    4 finite numbers with positive width and height, a non-finite score, or a box wholly outside
    its ``(width, height)`` image (a sign of another coordinate convention, e.g. normalised)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise KaistEvalError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
        s = float(score)
    except (TypeError, ValueError):
        raise KaistEvalError(f"{where}: bbox {bbox!r} and score {score!r} must be numbers") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise KaistEvalError(f"{where}: bbox {list(bbox)!r} is not finite")
    if not math.isfinite(s):
        raise KaistEvalError(f"{where}: score {score!r} is not finite; scores rank the detections and must be numbers")
    if w <= 0 or h <= 0:
        raise KaistEvalError(f"{where}: bbox [x, y, w, h] = {list(bbox)!r} has a width or height <= 0")
    if size is not None and (x >= size[0] or y >= size[1] or x + w <= 0 or y + h <= 0):
        raise KaistEvalError(
            f"{where}: bbox [x, y, w, h] = {list(bbox)!r} lies wholly outside the {size[0]:g}x{size[1]:g} image "
            "(boxes are in pixels of the original frame)"
        )


def load_results(
    path: str | Path,
    image_ids: Sequence[int],
    *,
    categories: Mapping[int, str] | None = None,
    sizes: Sequence[tuple[float, float]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Read detections in one of the common KAIST result formats, one dict per image of ``image_ids``.

    * ``.txt`` (MLPD / KAIST benchmark format): ``image_id, x, y, w, h, score`` per line, comma
      or space separated, ``image_id`` 1-based: ``k`` is the ``k``-th image of the annotations
      sorted by id (with MLPD's 0-based annotation ids, annotation id ``k - 1``).
    * ``.json`` (COCO results): a list of ``{"image_id", "bbox": [x, y, w, h], "score"}``. Here
      ``image_id`` is the annotation file's own ``images[].id``, an integer, exactly as
      written there (0-based in MLPD's ``KAIST_annotation.json``: the txt format's line id
      ``k`` is JSON id ``k - 1``). An optional ``category_id`` must be a category of the
      annotations; detections of a category other than ``person`` are skipped with a warning.

    Every detection is checked: 4 finite numbers with positive width and height, a finite
    score, inside its image (``sizes``, ``(width, height)`` per image). A file without any
    (person) detection is refused: it would score a plausible-looking 100 % miss rate.

    Args:
        path: the result file.
        image_ids: the annotations' image ids, sorted (:func:`load_annotations`).
        categories: the annotations' ``category id -> name`` (default: ``{1: "person"}``).
        sizes: ``(width, height)`` per image of ``image_ids`` (default: not checked).

    Raises:
        KaistEvalError: unknown format, a malformed line or entry, an image id not in the
            annotations, an unknown category, or no detection at all.
    """
    path = Path(path)
    index = {int(i): k for k, i in enumerate(image_ids)}
    cats = dict(categories) if categories is not None else {1: "person"}
    per: list[dict[str, list]] = [_empty_prediction() for _ in image_ids]
    skipped: dict[Any, int] = {}
    if path.suffix.lower() == ".json":
        data = _read_json(path, "result")
        if not isinstance(data, list):
            raise KaistEvalError(f"{path}: expected a COCO results list [{{'image_id', 'bbox', 'score'}}, ...]")
        for k, d in enumerate(data):
            if not isinstance(d, dict) or not {"image_id", "bbox", "score"} <= d.keys():
                raise KaistEvalError(f"{path}: entry {k} needs 'image_id', 'bbox' (x, y, w, h) and 'score'")
            image_id = d["image_id"]
            if isinstance(image_id, bool) or not isinstance(image_id, int):
                raise KaistEvalError(
                    f"{path}: entry {k} has image_id {image_id!r}, a {type(image_id).__name__}; JSON results give "
                    "the annotations' integer images[].id"
                )
            category = d.get("category_id", 1)
            if category not in cats:
                raise KaistEvalError(
                    f"{path}: entry {k} has category_id {category!r}, not a category of the annotations "
                    f"({', '.join(f'{i}={n}' for i, n in sorted(cats.items(), key=lambda c: str(c[0])))})"
                )
            if image_id not in index:
                raise KaistEvalError(
                    f"{path}: entry {k} has image_id {image_id}, not in the annotations (ids "
                    f"{min(index)}..{max(index)}; JSON results use the annotations' own ids, the .txt format is 1-based)"
                )
            pos = index[image_id]
            _check_detection(f"{path}: entry {k}", d["bbox"], d["score"], sizes[pos] if sizes is not None else None)
            if cats[category] not in PERSON_LABELS:
                skipped[category] = skipped.get(category, 0) + 1
                continue
            per[pos]["boxes"].append([float(v) for v in d["bbox"]])
            per[pos]["scores"].append(float(d["score"]))
    elif path.suffix.lower() == ".txt":
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError as err:
            raise KaistEvalError(f"{path}: result file not found") from err
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                vals = [float(v) for v in line.replace(",", " ").split()]
                if len(vals) != 6:
                    raise ValueError(f"{len(vals)} fields")
            except ValueError as err:
                raise KaistEvalError(f"{path}:{lineno}: expected 'image_id, x, y, w, h, score' ({err}): {line!r}") from err
            pos = int(vals[0]) - 1 if math.isfinite(vals[0]) else -1  # 1-based position in the sorted image list
            if vals[0] != pos + 1 or not 0 <= pos < len(per):
                raise KaistEvalError(
                    f"{path}:{lineno}: image id {vals[0]:g} is outside 1..{len(index)} (1-based, as in the "
                    "KAIST benchmark result files)"
                )
            _check_detection(f"{path}:{lineno}", vals[1:5], vals[5], sizes[pos] if sizes is not None else None)
            per[pos]["boxes"].append(vals[1:5])
            per[pos]["scores"].append(vals[5])
    else:
        raise KaistEvalError(f"{path}: unknown result format {path.suffix!r}; give a .txt (image_id, x, y, w, h, score) "
                             "or a COCO results .json")
    if skipped:
        warnings.warn(
            f"{path}: skipped {sum(skipped.values())} detection(s) of non-person categories "
            f"({', '.join(f'{cats[c]!r} (id {c}): {n}' for c, n in skipped.items())}); MR-2 counts pedestrians",
            stacklevel=2,
        )
    if not any(slot["scores"] for slot in per):
        raise KaistEvalError(
            f"{path}: holds no {'person ' if skipped else ''}detection; an empty result would score a 100 % "
            "miss rate (check the file and, in JSON, category_id 1 = person)"
        )
    out = []
    for slot in per:
        xywh = np.asarray(slot["boxes"], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        scores = np.asarray(slot["scores"], np.float64).reshape(-1)
        out.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                    "labels": torch.zeros(len(scores), dtype=torch.int64)})
    return out


def _hits(predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]], shift: int) -> int:
    """Detections of image ``k`` that overlap (IoU >= 0.5) a ground-truth box of image ``k + shift``."""
    n = 0
    for k, p in enumerate(predictions):
        if not 0 <= k + shift < len(targets) or len(p["boxes"]) == 0 or len(targets[k + shift]["boxes"]) == 0:
            continue
        dt, gt = _numpy(p["boxes"]).reshape(-1, 4), _numpy(targets[k + shift]["boxes"]).reshape(-1, 4)
        iou = _overlaps(dt, gt, np.zeros(len(gt), bool))
        n += int((iou.max(axis=1) >= 0.5).sum())
    return n


def check_alignment(
    predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]], where: str
) -> None:
    """Refuse results whose image ids are off by one: when the detections read as belonging to the
    previous (or next) image overlap the ground truth at least twice as often as read as given
    (and at least 3 times), the ids follow another convention (e.g. 1-based ids in a COCO JSON).

    Raises:
        KaistEvalError: names the file, both hit counts and the convention.
    """
    given = _hits(predictions, targets, 0)
    for shift in (-1, 1):
        shifted = _hits(predictions, targets, shift)
        if shifted >= max(3, 2 * given + 1):
            raise KaistEvalError(
                f"{where}: image ids look off by one: read as image_id {shift:+d}, {shifted} detections overlap a "
                f"ground-truth box (IoU >= 0.5), as given only {given}. JSON results use the annotations' own "
                "images[].id (0-based in MLPD's KAIST_annotation.json); the .txt format is 1-based"
            )


def evaluate_files(annotations: str | Path, results: str | Path, **protocol: Any) -> dict[str, float]:
    """MR^-2 (all / day / night) of a result file against KAIST COCO-style annotations.

    Args:
        annotations: e.g. MLPD's ``KAIST_annotation.json`` (improved test annotations).
        results: ``.txt`` or COCO ``.json`` detections (:func:`load_results`).
        **protocol: overrides of :data:`KAIST_PROTOCOL`.

    Returns:
        ``{"all", "day", "night"}`` miss rates in [0, 1].

    Raises:
        KaistEvalError: a malformed file (:func:`load_results`) or image ids off by one
            (:func:`check_alignment`).
    """
    ids, names, targets, categories, sizes = _annotation_data(Path(annotations))
    predictions = load_results(results, ids, categories=categories or None, sizes=sizes)
    check_alignment(predictions, targets, str(results))
    conditions = [condition_of(n) for n in names]
    return miss_rates(predictions, targets, conditions if any(c is not None for c in conditions) else None, **protocol)
