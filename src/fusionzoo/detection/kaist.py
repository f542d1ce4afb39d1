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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import log_average_miss_rate

__all__ = [
    "KAIST_BORDER",
    "KAIST_PROTOCOL",
    "KaistEvalError",
    "condition_of",
    "evaluate_files",
    "load_annotations",
    "load_results",
    "miss_rates",
    "protocol_for",
    "protocol_miss_rates",
]

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
    path = Path(path)
    data = _read_json(path, "annotation")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise KaistEvalError(f"{path}: expected a COCO-style object with 'images' and 'annotations'")
    cats = {c.get("id"): str(c.get("name", "")) for c in data.get("categories", [])}
    try:
        images = sorted(data["images"], key=lambda im: im["id"])
        ids = [int(im["id"]) for im in images]
        names = [str(im.get("im_name", im.get("file_name", im["id"]))) for im in images]
    except (KeyError, TypeError) as err:
        raise KaistEvalError(f"{path}: every entry of 'images' needs an 'id' ({err})") from err
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
    return ids, names, targets


def _empty_prediction() -> dict[str, list]:
    return {"boxes": [], "scores": []}


def load_results(path: str | Path, image_ids: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Read detections in one of the common KAIST result formats, one dict per image of ``image_ids``.

    * ``.txt`` (MLPD / KAIST benchmark format): ``image_id, x, y, w, h, score`` per line, comma
      or space separated, ``image_id`` 1-based: ``k`` is the ``k``-th image of the annotations
      sorted by id (with MLPD's 0-based annotation ids, annotation id ``k - 1``).
    * ``.json`` (COCO results): a list of ``{"image_id", "bbox": [x, y, w, h], "score"}`` with
      the annotation's own image ids; an optional ``category_id`` other than 1 (person) is skipped.

    Raises:
        KaistEvalError: unknown format, a malformed line, or an image id not in the annotations.
    """
    path = Path(path)
    index = {int(i): k for k, i in enumerate(image_ids)}
    per: list[dict[str, list]] = [_empty_prediction() for _ in image_ids]
    if path.suffix.lower() == ".json":
        data = _read_json(path, "result")
        if not isinstance(data, list):
            raise KaistEvalError(f"{path}: expected a COCO results list [{{'image_id', 'bbox', 'score'}}, ...]")
        for k, d in enumerate(data):
            if not isinstance(d, dict) or not {"image_id", "bbox", "score"} <= d.keys():
                raise KaistEvalError(f"{path}: entry {k} needs 'image_id', 'bbox' (x, y, w, h) and 'score'")
            if d.get("category_id", 1) != 1:
                continue
            if d["image_id"] not in index:
                raise KaistEvalError(f"{path}: entry {k} has image_id {d['image_id']}, not in the annotations")
            slot = per[index[d["image_id"]]]
            slot["boxes"].append(d["bbox"])
            slot["scores"].append(d["score"])
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
            pos = int(vals[0]) - 1  # 1-based position in the sorted image list
            if vals[0] != int(vals[0]) or not 0 <= pos < len(per):
                raise KaistEvalError(
                    f"{path}:{lineno}: image id {int(vals[0])} is outside 1..{len(index)} (1-based, as in the "
                    "KAIST benchmark result files)"
                )
            slot = per[pos]
            slot["boxes"].append(vals[1:5])
            slot["scores"].append(vals[5])
    else:
        raise KaistEvalError(f"{path}: unknown result format {path.suffix!r}; give a .txt (image_id, x, y, w, h, score) "
                             "or a COCO results .json")
    out = []
    for slot in per:
        xywh = np.asarray(slot["boxes"], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        scores = np.asarray(slot["scores"], np.float64).reshape(-1)
        out.append({"boxes": torch.from_numpy(boxes), "scores": torch.from_numpy(scores),
                    "labels": torch.zeros(len(scores), dtype=torch.int64)})
    return out


def evaluate_files(annotations: str | Path, results: str | Path, **protocol: Any) -> dict[str, float]:
    """MR^-2 (all / day / night) of a result file against KAIST COCO-style annotations.

    Args:
        annotations: e.g. MLPD's ``KAIST_annotation.json`` (improved test annotations).
        results: ``.txt`` or COCO ``.json`` detections (:func:`load_results`).
        **protocol: overrides of :data:`KAIST_PROTOCOL`.

    Returns:
        ``{"all", "day", "night"}`` miss rates in [0, 1].
    """
    ids, names, targets = load_annotations(annotations)
    predictions = load_results(results, ids)
    conditions = [condition_of(n) for n in names]
    return miss_rates(predictions, targets, conditions if any(c is not None for c in conditions) else None, **protocol)
