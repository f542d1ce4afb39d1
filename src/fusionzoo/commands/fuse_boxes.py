"""``fusionzoo fuse-boxes A.json B.json [...] --rule proben --out FUSED.json``: late fusion of any
detectors' outputs.

Inputs are COCO results files, as ``fusionzoo predict`` writes ``detections.json`` (and as
pycocotools / MMDetection / detectron2 write them): a list of ``{image_id, category_id, bbox:
[x, y, w, h], score}``, ``category_id = class + 1``. A record may also carry ``probs`` (the ``K``
class probabilities, column ``k`` = category ``k + 1``; the multi-class ProbEn rule then applies)
and ``vars`` (one box variance, for ``--box-fusion v-avg``), in every record or in none. Per
image id (an image missing from a file: that detector found nothing there) the sets are fused
with :data:`fusionzoo.detection.boxes.BOX_FUSIONS` and written in the same format.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..detection.boxes import BOX_FUSIONS
from ..files import atomic_write_bytes
from . import UsageError

__all__ = ["read_results", "run"]


def read_results(path: str) -> dict[int, dict[str, torch.Tensor]]:
    """One COCO results file -> ``{image_id: detection set}`` (float64 ``boxes`` xyxy, ``scores``,
    ``labels`` = category_id - 1, and ``probs`` / ``vars`` when the records carry them).

    Raises:
        UsageError: unreadable JSON, not a list of records, a missing key, a bad box or score
            (naming the file and the record's index).
    """
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"fuse-boxes: cannot read {path}: {err}") from None
    if not isinstance(records, list):
        raise UsageError(f"fuse-boxes: {path} holds a {type(records).__name__}; expected a COCO results list "
                         "[{image_id, category_id, bbox: [x, y, w, h], score}, ...]")
    extras = [k for k in ("probs", "vars") if records and k in records[0]]
    rows: dict[int, list[Mapping[str, Any]]] = {}
    for i, r in enumerate(records):
        where = f"{path}[{i}]"
        if not isinstance(r, Mapping) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise UsageError(f"fuse-boxes: {where} must have image_id, category_id, bbox, score; got {r!r:.120}")
        missing = [k for k in extras if k not in r]
        surplus = [k for k in ("probs", "vars") if k in r and k not in extras]
        if missing or surplus:
            raise UsageError(f"fuse-boxes: {where}: '{(missing + surplus)[0]}' must be in every record of the file or in none")
        box, score = r["bbox"], r["score"]
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
                or box[2] <= 0 or box[3] <= 0):
            raise UsageError(f"fuse-boxes: {where}: bbox {box} is not [x, y, w, h] with finite numbers and w, h > 0")
        if not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise UsageError(f"fuse-boxes: {where}: score {score!r} is not a probability in [0, 1]")
        if not isinstance(r["category_id"], int) or r["category_id"] < 1:
            raise UsageError(f"fuse-boxes: {where}: category_id {r['category_id']!r} must be an integer >= 1 (class + 1)")
        rows.setdefault(int(r["image_id"]), []).append(r)
    sets = {}
    for image_id, rs in rows.items():
        boxes = torch.tensor([r["bbox"] for r in rs], dtype=torch.float64)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        one = {"boxes": boxes, "scores": torch.tensor([float(r["score"]) for r in rs], dtype=torch.float64),
               "labels": torch.tensor([r["category_id"] - 1 for r in rs], dtype=torch.long)}
        try:
            if "probs" in extras:
                one["probs"] = torch.tensor([r["probs"] for r in rs], dtype=torch.float64)
            if "vars" in extras:
                # one number, or a list of one (the ProbEn authors' saved predictions)
                one["vars"] = torch.tensor([_one_number(r["vars"]) for r in rs], dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, IndexError) as err:
            raise UsageError(f"fuse-boxes: {path}, image {image_id}: 'probs' must be equal-length lists of numbers and "
                             f"'vars' one number per record ({err})") from None
        sets[image_id] = one
    return sets


def _one_number(value: Any) -> float:
    value = value[0] if isinstance(value, list) and len(value) == 1 else value
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"vars {value!r} is not one positive number")
    return float(value)


def _empty() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4, dtype=torch.float64), "scores": torch.zeros(0, dtype=torch.float64),
            "labels": torch.zeros(0, dtype=torch.long)}


def fuse_files(files: Sequence[Mapping[int, Mapping[str, torch.Tensor]]], rule: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Fuse image by image; COCO results records sorted by image id, then score."""
    out = []
    for image_id in sorted(set().union(*files)):
        sets = [f.get(image_id) for f in files]
        keys = set().union(*(s for s in sets if s is not None)) - {"boxes", "scores", "labels"}
        filled = []
        for s in sets:
            if s is None:  # that detector found nothing on this image
                s = _empty()
                width = next(x["probs"].shape[1] for x in sets if x is not None and "probs" in x) if "probs" in keys else 0
                s.update({"probs": torch.zeros(0, width, dtype=torch.float64)} if "probs" in keys else {})
                s.update({"vars": torch.zeros(0, dtype=torch.float64)} if "vars" in keys else {})
            filled.append(s)
        fused = BOX_FUSIONS[rule](filled, **kwargs)
        for box, score, label in zip(fused["boxes"].tolist(), fused["scores"].tolist(), fused["labels"].tolist()):
            out.append({"image_id": image_id, "category_id": int(label) + 1,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
    return out


def run(args: argparse.Namespace) -> int:
    """Read, fuse, write; print one summary line."""
    if len(args.results) < 2:
        raise UsageError("fuse-boxes: give at least two results files (one per detector)")
    if args.max_detections < 1:
        raise UsageError(f"fuse-boxes: --max-detections must be at least 1, got {args.max_detections}")
    if args.iou is not None and not 0.0 <= args.iou < 1.0:
        raise UsageError(f"fuse-boxes: --iou must be in [0, 1), got {args.iou}")
    kwargs: dict[str, Any] = {"max_detections": args.max_detections}
    if args.iou is not None:
        kwargs["iou_thresh"] = args.iou
    proben_only = {"--score-fusion": args.score_fusion, "--box-fusion": args.box_fusion}
    if args.rule == "proben":
        kwargs.update({k: v for k, v in (("score_fusion", args.score_fusion), ("box_fusion", args.box_fusion)) if v})
    elif any(proben_only.values()):
        raise UsageError(f"fuse-boxes: {next(k for k, v in proben_only.items() if v)} applies to --rule proben only")
    files = [read_results(p) for p in args.results]
    try:
        records = fuse_files(files, args.rule, **kwargs)
    except ValueError as err:
        raise UsageError(f"fuse-boxes: {err}") from None
    atomic_write_bytes(Path(args.out), (json.dumps(records) + "\n").encode())
    n_in = sum(len(s["scores"]) for f in files for s in f.values())
    print(f"{n_in} detection(s) from {len(files)} files on {len({i for f in files for i in f})} image(s) -> "
          f"{len(records)} fused by {args.rule} -> {args.out}")
    return 0
