"""``fusionzoo predict MODEL --rgb FILE|DIR --depth|--thermal FILE|DIR --out DIR``.

MODEL is a training run folder (its ``best/`` weights; its config gives the training image size,
the dataset and its depth units), a folder written by ``save_pretrained``, a Hugging Face Hub id
``owner/name`` (:func:`fusionzoo.hub.from_pretrained`), or a published entry with converted
weights ``name.tag`` (``fusionzoo convert``). A registered name without a tag is refused: its
weights are untrained.

Writes, per frame ``<stem>`` (files pair by stem across the modality folders):

- segmentation: ``masks/<stem>.png`` (palette PNG: pixel value = class id, colours = the dataset
  palette) and ``overlays/<stem>.png`` (the colours over the RGB image);
- detection: ``boxes/<stem>.png`` (drawn boxes with score >= ``--draw-threshold``), and for all
  frames ``detections.json`` (COCO results: ``image_id``, ``category_id`` = class + 1,
  ``bbox`` [x, y, w, h] in original pixels, ``score``) with ``images.json`` (COCO ``images`` +
  ``categories``: ``pycocotools.coco.COCO("images.json").loadRes("detections.json")`` reads them).
  ``image_id`` is the frame's position in stem order (0-based) or, with ``--annotations``, the id
  of the image of the same name in that COCO file (e.g. MLPD's ``KAIST_annotation.json``, whose
  ``set08/V000/I02159`` is the file ``set08_V000_I02159.png``), so that
  ``fusionzoo mr2 --annotations FILE --results OUT/detections.json`` scores it;
- ``predict.json``: the model, the input settings used and the files written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .._json import to_json
from .._registry import create_model, released_weights
from ..data import dataset_entry
from ..data.base import EXTENSIONS
from ..engine.predict import (
    InputSettings,
    coco_results,
    colour_mask,
    display_image,
    draw_detections,
    overlay_segmentation,
    pair_files,
    palette_for,
    predict_pair,
    prepare_inputs,
    read_pair,
    stored_normalization,
)
from ..files import atomic_write_bytes
from ..hub import from_pretrained
from ..interpret.runs import find_weights, is_pretrained_dir, run_config
from . import UsageError

__all__ = ["load_model", "run"]

SOURCES = ("rgb", "depth", "thermal", "hha")


def _warn(text: str) -> None:
    print(f"fusionzoo predict: warning: {text}", file=sys.stderr)


def load_model(target: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model named by ``target`` and what is known about its training data.

    Returns:
        ``(model in eval mode, info)`` with ``info``: ``kind``, ``dataset`` (or None),
        ``image_size`` (training ``(H, W)`` or None), ``dataset_kwargs``.

    Raises:
        UsageError: ``target`` is none of the four kinds, or cannot be loaded (the reason).
    """
    path = Path(target)
    info: dict[str, Any] = {"target": target, "dataset": None, "image_size": None, "dataset_kwargs": {}}
    try:
        if path.is_dir():
            if is_pretrained_dir(path):
                model, info["kind"] = from_pretrained(path), "save_pretrained folder"
            else:
                cfg = run_config(path)
                if cfg is None:
                    raise UsageError(f"{path} is neither a training run folder (config.json + best/) nor a folder "
                                     "written by save_pretrained (config.json + model.safetensors)")
                model, info["kind"] = from_pretrained(find_weights(path)), "training run"
                info["image_size"] = tuple(cfg["image_size"]) if cfg.get("image_size") else None
                info["dataset"] = cfg.get("dataset")
                info["dataset_kwargs"] = dict(cfg.get("dataset_kwargs") or {})
        elif "." in target and "/" not in target:
            name, tag = target.split(".", 1)
            released_weights(name, tag)  # unknown name or tag: KeyError listing the known ones
            model, info["kind"] = create_model(name, pretrained=tag).eval(), "published weights"
            info["dataset"] = tag
        elif target.count("/") == 1 and not path.exists():
            try:
                model, info["kind"] = from_pretrained(target), "Hub model"
            except FileNotFoundError as err:  # most often a mistyped run folder: say both readings
                raise UsageError(f"MODEL {target}: no such folder, and as a Hub id: {err}") from None
        else:
            raise UsageError(
                f"MODEL {target!r}: expected a training run folder, a save_pretrained folder, a Hub id owner/name "
                "or a published entry with converted weights name.tag (fusionzoo list --published); a registered "
                "name alone has untrained weights"
            )
    except (FileNotFoundError, KeyError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise UsageError(f"MODEL {target}: {text}") from None
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    info["dataset"] = info["dataset"] or (pretrained_cfg.get("extra") or {}).get("dataset")
    info["class_names"] = pretrained_cfg.get("class_names")
    return model, info


def _known_dataset(name: str | None) -> Any:
    if not name:
        return None
    try:
        return dataset_entry(name).factory
    except KeyError:
        return None


def _settings(args: argparse.Namespace, model: nn.Module, info: Mapping[str, Any], present: tuple[str, ...]) -> InputSettings:
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    norm, guessed = stored_normalization(pretrained_cfg, present, info["dataset"])
    if guessed:
        _warn(f"the model stores no input statistics for {', '.join(guessed)}; using fusionzoo's "
              f"{info['dataset'] if info['dataset'] else 'default'} statistics (data.transforms.STATS)")
    factory = _known_dataset(info["dataset"])
    depth_scale = args.depth_scale
    if depth_scale is None:
        scale = getattr(factory, "depth_scale", None)
        depth_scale = float(scale) if isinstance(scale, (int, float)) else 1000.0
    thermal_bits = args.thermal_bits if args.thermal_bits is not None else info["dataset_kwargs"].get("thermal_bits")
    size = tuple(args.size) if args.size else info["image_size"]
    policy = args.size_policy or ("resize" if size else "pad")
    if policy == "resize" and size is None:
        raise UsageError("--size-policy resize needs --size H W: the model does not record the size it was trained "
                         "at (only training run folders do); or use --size-policy pad")
    if policy == "pad" and args.size:
        raise UsageError("--size applies to --size-policy resize; pad keeps each image's own size")
    if policy == "resize" and min(size) < 32:
        raise UsageError(f"--size {size[0]} {size[1]}: models need at least 32x32 (stride-32 features)")
    multiple = int(getattr(model, "input_multiple", 0) or 0)
    divisor = max(32, multiple)
    if policy == "resize" and multiple and (size[0] % multiple or size[1] % multiple):
        raise UsageError(f"--size {size[0]} {size[1]}: this model takes sizes that are multiples of {multiple}")
    return InputSettings(norm, depth_scale=depth_scale, thermal_bits=thermal_bits, size_policy=policy,
                         size=size, divisor=divisor)


def _annotation_ids(path: str, stems: list[str]) -> dict[str, int]:
    """Stem -> ``images[].id`` of a COCO annotation file, matching ``im_name`` / ``file_name`` with
    ``/`` read as ``_`` and the extension dropped."""
    try:
        data = json.loads(Path(path).read_text())
        images = data["images"]
        by_name = {}
        for im in images:
            key = str(im.get("im_name", im.get("file_name", ""))).replace("/", "_")
            by_name[Path(key).stem if Path(key).suffix.lower() in EXTENSIONS else key] = int(im["id"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UsageError(f"--annotations {path}: not a COCO annotation file with images[].id and im_name/file_name "
                         f"({err})") from None
    absent = [s for s in stems if s not in by_name]
    if absent:
        raise UsageError(f"--annotations {path}: no image named like {', '.join(absent[:5])}"
                         f"{' ...' if len(absent) > 5 else ''} (im_name set06/V000/I00019 matches the file "
                         "set06_V000_I00019.png)")
    return {s: by_name[s] for s in stems}


def _save_png(array_or_image: np.ndarray | Image.Image, path: Path) -> None:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def run(args: argparse.Namespace) -> int:
    """Predict on every frame; print one summary line per output kind."""
    model, info = load_model(args.model)
    missing = tuple(dict.fromkeys(args.missing or ()))
    bad = [m for m in missing if m not in model.modalities]
    if bad:
        raise UsageError(f"--missing {bad[0]}: the model takes {', '.join(model.modalities)}")
    if len(missing) == len(model.modalities):
        raise UsageError("--missing names every modality of the model; keep at least one")
    present = tuple(m for m in model.modalities if m not in missing)
    given = {m: getattr(args, m) for m in SOURCES if getattr(args, m) is not None}
    absent = [m for m in present if m not in given]
    if absent:
        raise UsageError(f"the model takes {'+'.join(model.modalities)}: give --{absent[0]} FILE|DIR "
                         f"(or --missing {absent[0]} to run without it)")
    extra = [m for m in given if m not in present]
    if extra:
        why = "named by --missing" if any(m in missing for m in extra) else f"the model takes {'+'.join(model.modalities)}"
        raise UsageError(f"--{extra[0]} given but {extra[0]} is not used ({why})")
    if args.annotations and getattr(model, "task", "segmentation") != "detection":
        raise UsageError("--annotations applies to detectors (the image ids of detections.json)")
    try:
        pairs = pair_files({m: given[m] for m in present})
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    settings = _settings(args, model, info, present)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    detection = getattr(model, "task", "segmentation") == "detection"
    names = list(info["class_names"] or [str(k) for k in range(model.num_classes)])
    palette = palette_for(info["dataset"], model.num_classes)
    ids = _annotation_ids(args.annotations, [s for s, _ in pairs]) if args.annotations else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    written: dict[str, list[str]] = {}
    bar = tqdm(pairs, desc="predict", unit="frame", disable=args.no_progress or len(pairs) < 2)
    for k, (stem, files) in enumerate(bar):
        raw = read_pair(files, settings)
        inputs, geometry = prepare_inputs(raw, settings, device)
        pred = predict_pair(model, inputs, geometry, missing)
        shown = display_image(raw)
        if detection:
            image_id = ids[stem] if ids is not None else k
            results += coco_results(pred, image_id)
            images.append({"id": image_id, "file_name": files[present[0]].name, "height": geometry.original[0],
                           "width": geometry.original[1]})
            drawn = out / "boxes" / f"{stem}.png"
            _save_png(draw_detections(shown, pred, names, palette, args.draw_threshold), drawn)
            written.setdefault("boxes", []).append(str(drawn.relative_to(out)))
        else:
            mask, over = out / "masks" / f"{stem}.png", out / "overlays" / f"{stem}.png"
            _save_png(colour_mask(pred["classes"], palette), mask)
            _save_png(overlay_segmentation(shown, pred["classes"], palette, args.alpha), over)
            written.setdefault("masks", []).append(str(mask.relative_to(out)))
            written.setdefault("overlays", []).append(str(over.relative_to(out)))
    if detection:
        categories = [{"id": c + 1, "name": n} for c, n in enumerate(names)]
        atomic_write_bytes(out / "detections.json", (json.dumps(results) + "\n").encode())
        atomic_write_bytes(out / "images.json", (json.dumps({"images": images, "categories": categories,
                                                             "annotations": []}, indent=1) + "\n").encode())
        written["json"] = ["detections.json", "images.json"]
    manifest = {
        "model": info["target"], "model_kind": info["kind"], "model_name": (model.config or {}).get("name"),
        "task": "detection" if detection else "segmentation", "dataset": info["dataset"], "classes": names,
        "palette": [list(c) for c in palette], "missing": list(missing),
        "settings": {"normalization": {m: {"mean": list(s.mean), "std": list(s.std)} for m, s in settings.normalization.items()},
                     "depth_scale": settings.depth_scale, "thermal_bits": settings.thermal_bits,
                     "size_policy": settings.size_policy, "size": settings.size, "divisor": settings.divisor},
        "frames": [{"stem": s, "files": {m: str(p) for m, p in f.items()}} for s, f in pairs],
        "written": written,
    }
    atomic_write_bytes(out / "predict.json", (json.dumps(to_json(manifest), indent=2) + "\n").encode())
    policy = (f"resized to {settings.size[0]}x{settings.size[1]} and back" if settings.size_policy == "resize"
              else f"padded to a multiple of {settings.divisor}")
    print(f"{len(pairs)} frame(s), {info['kind']} {model.config.get('name')}, "
          f"{'+'.join(present)}{' (missing ' + '+'.join(missing) + ')' if missing else ''}, {policy}")
    if detection:
        print(f"{len(results)} detection(s) -> {out / 'detections.json'} (COCO results; images.json); drawn: {out / 'boxes'}")
    else:
        print(f"masks: {out / 'masks'}  overlays: {out / 'overlays'}")
    return 0
