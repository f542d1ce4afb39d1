"""Regenerate tests/fixtures/parity/cft/ from a checkout of the CFT authors' repository.

    python tools/parity/cft.py --ref /path/to/multispectral-object-detection

Reference: github DocF/multispectral-object-detection, ``models/yolo_test.py`` ``Model`` (the
two-stream YOLOv5 whose ``forward(rgb, ir)`` train.py and test.py call) built from
``models/transformer/yolov5l_fusion_transformerx3_FLIR_aligned.yaml`` (the paper's three-stage
CFT, 3 classes), ``utils/general.py non_max_suppression`` with test.py's settings (conf 0.001,
IoU 0.5, multi-label) and ``utils/loss.py ComputeLoss`` with ``data/hyp.scratch.yaml`` scaled as
train.py scales it (3 levels, 3 classes, image size 640).

Reduced configuration: the same config at depth multiple 0.33 and width multiple 0.125 (channels
8..128; the transformers keep 8 heads and 8 layers), batch 2, 128x128, so the float64 test runs
in seconds; the full sizes are checked by parameter count and key/shape list (``full_keys``).
Their state dict is filled by ``seeded.seeded_state_dict``; the run records, in float64 (and
the float32 drift): the eval forward's decoded predictions and raw per-level outputs, the boxes
after NMS, the train-mode raw outputs (BatchNorm on batch statistics, the transformers' dropout
off) and the loss on fixed targets (``targets``: per image xyxy pixels and labels).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import (
    calibrate_batchnorm,
    count_parameters,
    in_both_precisions,
    key_shapes,
    seeded_inputs,
    seeded_state_dict,
    write_fixture,
    yolo_target_rows,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "cft"
NUM_CLASSES, BATCH, SIZE = 3, 2, 128
DEPTH, WIDTH = 0.33, 0.125
STATE_SEED, INPUT_SEED, CALIBRATION_SEED = 0, 1, 1  # calibrated on the test inputs: O(1) eval outputs (other draws give 3-12)
ANCHOR_BUFFERS = ("anchors", "anchor_grid")  # Detect's buffers: the config's anchors, not filled by the rule
CONF_THRES, IOU_THRES = 0.001, 0.5  # test.py's command line defaults
CONFIGS = {  # our entry's encoder -> the paper's config (README: the transformerx3 configs)
    "yolov5l": "models/transformer/yolov5l_fusion_transformerx3_FLIR_aligned.yaml",
    "yolov5s": "models/transformer/yolov5s_fusion_transformerx3_vedai.yaml",
}
FULL_CLASSES = {"yolov5l": (3, 1), "yolov5s": (9,)}  # FLIR aligned, LLVIP; VEDAI
# Fixed targets of the loss run: per image xyxy pixels and labels, chosen to hit several anchors,
# levels and the neighbouring-cell rule (centres near cell borders), plus one tiny and one wide box.
TARGETS = [
    {"boxes": [[10.0, 12.0, 30.0, 40.0], [60.0, 20.0, 124.0, 100.0], [3.5, 90.0, 11.0, 97.5]], "labels": [0, 2, 1]},
    {"boxes": [[40.0, 40.0, 56.0, 72.0], [8.0, 64.0, 120.0, 110.0]], "labels": [1, 0]},
]


def _import_reference(checkout: Path) -> Any:
    checkout = Path(checkout).resolve()
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from models import yolo_test

    return yolo_test


def reference_config(checkout: Path, variant: str, num_classes: int, depth: float | None = None,
                     width: float | None = None) -> dict[str, Any]:
    """The config dict of ``variant`` (``CONFIGS``) with ``nc`` and, when given, the multiples replaced."""
    cfg = yaml.safe_load((Path(checkout) / CONFIGS[variant]).read_text())
    cfg["nc"] = num_classes
    if depth is not None:
        cfg["depth_multiple"], cfg["width_multiple"] = depth, width
    return cfg


def reference_model(checkout: Path, variant: str = "yolov5l", num_classes: int = NUM_CLASSES,
                    depth: float | None = None, width: float | None = None) -> nn.Module:
    """The authors' ``Model`` of ``variant`` (``yolov5l`` / ``yolov5s``) at ``num_classes``."""
    yolo_test = _import_reference(checkout)
    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints the model table
        return yolo_test.Model(reference_config(checkout, variant, num_classes, depth, width), ch=3, nc=num_classes)


def reference_inputs(model_inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``Model.forward(rgb, ir)``."""
    return model_inputs["rgb"], model_inputs["thermal"]


def reference_loss(model: nn.Module, output: Any, targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Their training loss (``ComputeLoss(model)(output, rows)[0]``, ``loss * bs``) of their
    train-mode ``output`` on the zoo's targets (xyxy pixels, normalized by the input size as
    their loader does), with ``hyp.scratch.yaml`` scaled as their train.py (for ``bench/parity.py``)."""
    from utils.loss import ComputeLoss

    detect = model.model[-1]
    if not hasattr(model, "hyp"):
        model.hyp, model.gr, model.nc = scaled_hyp(Path(sys.modules["models.yolo_test"].__file__).parents[1],
                                                   detect.nl, detect.nc), 1.0, detect.nc
    rows = yolo_target_rows(targets, output[0].shape[2] * 8, output[0].shape[3] * 8)  # P3 is stride 8
    with old_clamp():
        return ComputeLoss(model)(output, rows.to(output[0].device))[0].sum()


def reference_postprocess(output: Any) -> list[torch.Tensor]:
    """Their eval output through their NMS at test.py's settings."""
    from utils.general import non_max_suppression

    return non_max_suppression(output[0], CONF_THRES, IOU_THRES, multi_label=True)


def yolo_rows(targets: list[dict[str, list]], size: int, dtype: torch.dtype) -> torch.Tensor:
    """train.py's target rows ``(n, 6)``: image, class, centre x, centre y, width, height normalized by the image size."""
    rows = []
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), c in zip(t["boxes"], t["labels"]):
            rows.append([i, c, (x1 + x2) / 2 / size, (y1 + y2) / 2 / size, (x2 - x1) / size, (y2 - y1) / size])
    return torch.tensor(rows, dtype=dtype)


def scaled_hyp(checkout: Path, nl: int, nc: int, imgsz: int = 640) -> dict[str, float]:
    """``data/hyp.scratch.yaml`` scaled as train.py scales it."""
    hyp = yaml.safe_load((Path(checkout) / "data" / "hyp.scratch.yaml").read_text())
    hyp["box"] *= 3.0 / nl
    hyp["cls"] *= nc / 80.0 * 3.0 / nl
    hyp["obj"] *= (imgsz / 640) ** 2 * 3.0 / nl
    hyp["label_smoothing"] = 0.0
    return hyp


def train_without_dropout(model: nn.Module) -> None:
    """Train mode (BatchNorm on batch statistics) with every dropout off (the transformers')."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()


def authors_state(keys: list, seed: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """The rule-filled authors' state dict with Detect's anchor buffers kept as the model's own."""
    own = model.state_dict()
    state = seeded_state_dict(keys, seed)
    return {k: own[k].clone() if k.rsplit(".", 1)[-1] in ANCHOR_BUFFERS else v for k, v in state.items()}


@contextlib.contextmanager
def old_clamp() -> Any:
    """torch 1.7's ``Tensor.clamp_``, which their ``build_targets`` relies on: a 0-dim tensor bound
    was read as a Python number and cast to the clamped tensor's type (``gj.clamp_(0, gain[3] - 1)``
    on int64 indices with a float32 bound holding a whole number); current torch refuses to cast
    the float result into the int64 tensor."""
    original = torch.Tensor.clamp_

    def clamp_(self: torch.Tensor, min: Any = None, max: Any = None) -> torch.Tensor:
        def as_number(v: Any) -> Any:
            v = v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v
            return int(v) if v is not None and not self.is_floating_point() else v

        return original(self, as_number(min), as_number(max))

    torch.Tensor.clamp_ = clamp_
    try:
        yield
    finally:
        torch.Tensor.clamp_ = original


def record(checkout: Path, net: nn.Module, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], dtype: torch.dtype
           ) -> dict[str, torch.Tensor]:
    """Every output the fixture holds, of ``net`` with ``state`` freshly loaded, in ``dtype``."""
    from utils.general import non_max_suppression
    from utils.loss import ComputeLoss

    net = copy.deepcopy(net).to(dtype)
    net.load_state_dict(state)
    xs = {k: v.to(dtype) for k, v in seeded_inputs(meta["inputs"], meta["input_seed"]).items()}
    calib = {k: v.to(dtype) for k, v in seeded_inputs(meta["inputs"], meta["calibration_seed"]).items()}
    # BatchNorm statistics := the calibration batch's (seeded.calibrate_batchnorm, dropout off): the
    # rule's statistics saturate the head's sigmoids (raw outputs ~20), which would hide errors
    calibrate_batchnorm(net, lambda: (train_without_dropout(net), net(*reference_inputs(calib))))
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        decoded, raw = net(*reference_inputs(xs))
        out["eval.decoded"] = decoded
        for level, r in zip(("p3", "p4", "p5"), raw):
            out[f"eval.{level}"] = r
        nms = non_max_suppression(decoded.clone(), CONF_THRES, IOU_THRES, multi_label=True)
        for i, det in enumerate(nms):
            out[f"nms.{i}"] = det
    train_without_dropout(net)
    net.hyp, net.gr, net.nc = scaled_hyp(checkout, 3, meta["num_classes"]), 1.0, meta["num_classes"]
    raw = net(*reference_inputs(xs))
    for level, r in zip(("p3", "p4", "p5"), raw):
        out[f"train.{level}"] = r.detach()
    with old_clamp():
        _, items = ComputeLoss(net)(raw, yolo_rows(meta["targets"], SIZE, dtype))
    lbox, lobj, lcls, _ = items
    for k, v in (("box", lbox), ("obj", lobj), ("cls", lcls)):
        out[f"loss.{k}"] = (v * BATCH).reshape(1)  # ComputeLoss returns loss * bs; its items are per image
    return {k: v.detach().contiguous() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="checkout of DocF/multispectral-object-detection")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    net = reference_model(args.ref, "yolov5l", NUM_CLASSES, DEPTH, WIDTH)
    keys = key_shapes(net.state_dict())
    state = authors_state(keys, STATE_SEED, net)
    params: dict[str, dict[str, int]] = {}
    full_keys: dict[str, list] = {}
    for variant, classes in FULL_CLASSES.items():
        params[variant] = {}
        for k in classes:
            full = reference_model(args.ref, variant, k)
            params[variant][str(k)] = count_parameters(full)
            if k == classes[0]:
                full_keys[variant] = key_shapes(full.state_dict())
            del full
    meta = {
        "reference_repo": "https://github.com/DocF/multispectral-object-detection",
        "reference_commit": commit,
        "network": f"models/yolo_test.py Model({CONFIGS['yolov5l']}, depth_multiple={DEPTH}, width_multiple={WIDTH})",
        "num_classes": NUM_CLASSES,
        "depth_multiple": DEPTH,
        "width_multiple": WIDTH,
        "state_seed": STATE_SEED,
        "input_seed": INPUT_SEED,
        "calibration_seed": CALIBRATION_SEED,
        "anchor_buffers": list(ANCHOR_BUFFERS),
        "inputs": {"rgb": [BATCH, 3, SIZE, SIZE], "thermal": [BATCH, 3, SIZE, SIZE]},
        "nms": {"conf_thres": CONF_THRES, "iou_thres": IOU_THRES, "multi_label": True},
        "targets": TARGETS,
        "authors_params": params,
        "keys": keys,
        "full_keys": full_keys,
    }
    outputs, drift = in_both_precisions(lambda dtype: record(args.ref, net, state, meta, dtype))
    write_fixture(FIXTURE, {**meta, "dtype": "float64", "float32_drift": drift}, outputs)
    print(f"float32 drift (relative to each output's largest value): {drift}")
    print(f"shapes: { {k: tuple(v.shape) for k, v in outputs.items()} }")
    print(f"wrote {FIXTURE}: {len(keys)} keys, authors' parameters {params}")


if __name__ == "__main__":
    main()
