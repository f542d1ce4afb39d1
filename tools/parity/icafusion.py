#!/usr/bin/env python
"""Regenerate tests/fixtures/parity/icafusion/ from a checkout of the authors' ICAFusion repository.

    python tools/parity/icafusion.py --ref /path/to/ICAFusion

Reference: https://github.com/chanchanchan97/ICAFusion (the commit is read from the checkout).
Their two-stream YOLOv5 (``models/yolo_test.py`` ``Model``, the class their ``train.py`` and
``test.py`` use) is built from their config ``models/transformer/yolov5l_Transfusion_FLIR.yaml``
(the ``yolov5{n,s,m}`` configs differ only in ``depth_multiple`` / ``width_multiple``, the KAIST
and LLVIP ones only in ``nc: 1``). Their code needs pandas, seaborn and einops beside torch (a
virtual environment with ``--system-site-packages`` is enough); none of it enters this project.

What it writes (numbers only):

- ``reference.json``: the commit; the full-size key/shape list of ``yolov5l`` at 3 classes (FLIR)
  and of ``yolov5n`` at 1 class (a quick conversion test), the authors' parameter counts of ``yolov5{n,s,m,l}`` at 1 and 3 classes; the reduced
  configuration the outputs come from (``depth_multiple`` 0.33, ``width_multiple`` 0.125, 3
  classes, the three fusion blocks' pooled grids 5x5, 4x4, 2x2 so that a 2x3x96x96 input reaches
  every branch of their ``AdaptivePool2d``: overlapping windows at P4 and P5), its key/shape list,
  the fill rule's seeds (``seeded.py``), the values of the tensors the rule does not fill
  (``fixed``: the Detect anchors, which are geometry; the learnable residual coefficients and
  pooling weights, drawn as ``1 + 0.1 * S`` around their initial 1 and 0.5 so the fusion branches
  are not scaled away), the loss targets and hyperparameters;
- ``outputs.safetensors`` (float64, both sides run in float64; ``float32_drift`` per output in the
  JSON): in eval mode the decoded predictions before NMS ``eval.decoded`` ``(B, N, 5 + nc)``, the
  raw head maps ``eval.raw{i}`` ``(B, 3, h, w, 5 + nc)`` and the boxes of their test script's NMS
  (``non_max_suppression(conf_thres=0.001, iou_thres=0.5, multi_label=True)``) per image
  ``eval.boxes{b}`` ``(n, 6)`` (xyxy, score, class); in train mode (BatchNorm on batch statistics,
  nearest upsampling in the fusion blocks, dropout off) the raw head maps ``train.raw{i}`` and their
  ``ComputeLoss`` on fixed targets: ``train.loss`` (``loss * batch``, what ``train.py``
  backpropagates) and ``train.loss_items`` (box, obj, cls, ranking).

The module also gives ``bench/parity.py`` the authors' model, loss and post-processing:
:func:`reference_model`, :func:`reference_inputs`, :func:`reference_loss` (their ``ComputeLoss``
with ``hyp.scratch.yaml`` scaled as above, on the zoo's boxes as their loader's rows) and
:func:`reference_postprocess` (their test script's NMS).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import (
    count_parameters,
    in_both_precisions,
    key_shapes,
    seeded_inputs,
    seeded_state_dict,
    seeded_tensor,
    write_fixture,
    yolo_target_rows,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "icafusion"
CONFIG = "models/transformer/yolov5l_Transfusion_FLIR.yaml"
VARIANTS = {"yolov5n": (0.33, 0.25), "yolov5s": (0.33, 0.50), "yolov5m": (0.67, 0.75), "yolov5l": (1.0, 1.0)}
FULL_CLASSES = (1, 3)  # KAIST / LLVIP (person), FLIR-aligned (person, car, bicycle)
# The reduced configuration of the output fixture.
NUM_CLASSES, BATCH, SIZE = 3, 2, 96
DEPTH, WIDTH = 0.33, 0.125
FUSION_GRIDS = ((5, 5), (4, 4), (2, 2))  # P3 12x12 -> 5x5 (stride 2, kernel 4), P4 6x6 -> 4x4 (1, 3), P5 3x3 -> 2x2 (1, 2)
STATE_SEED, INPUT_SEED = 0, 1
# Their test script's NMS (test.py defaults and train.py's final evaluation).
CONF_THRES, IOU_THRES = 0.001, 0.5
# (image, class, x, y, w, h) normalised, as their dataloader yields: boxes of 10 to 80 pixels on the
# 96-pixel input, so each of P3, P4 and P5 gets targets; two sit next to cell borders (neighbour offsets).
TARGETS = [
    [0, 0, 0.30, 0.40, 0.12, 0.18],
    [0, 1, 0.55, 0.52, 0.40, 0.30],
    [0, 2, 0.50, 0.50, 0.85, 0.75],
    [1, 0, 0.7292, 0.2604, 0.10, 0.14],
    [1, 2, 0.40, 0.62, 0.35, 0.45],
]
IMG_SIZE = 640  # their training size, which scales hyp['obj'] (train.py)


def _authors(checkout: Path) -> SimpleNamespace:
    """The authors' modules, imported from ``checkout`` (packages ``models`` and ``utils``)."""
    checkout = Path(checkout).resolve()
    if not (checkout / "models" / "yolo_test.py").is_file():
        raise SystemExit(f"error: {checkout} is not a checkout of ICAFusion (no models/yolo_test.py)")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    import yaml
    from models import yolo_test  # type: ignore[import-not-found]
    from utils import general, loss  # type: ignore[import-not-found]

    with (checkout / CONFIG).open() as f:
        config = yaml.safe_load(f)
    return SimpleNamespace(Model=yolo_test.Model, nms=general.non_max_suppression, ComputeLoss=loss.ComputeLoss,
                           config=config, checkout=checkout)


def _config(authors: SimpleNamespace, depth: float, width: float, grids: tuple[tuple[int, int], ...] | None = None) -> dict[str, Any]:
    cfg = copy.deepcopy(authors.config)
    cfg["depth_multiple"], cfg["width_multiple"] = depth, width
    if grids is not None:
        fusion = [layer for layer in cfg["backbone"] if layer[2] == "TransformerFusionBlock"]
        for layer, (h, w) in zip(fusion, grids):
            layer[3] = [layer[3][0], h, w]
    return cfg


def reference_model(checkout: Path, variant: str = "yolov5l", num_classes: int = 3) -> nn.Module:
    """The authors' ``Model`` of ``yolov5{n,s,m,l}`` ICAFusion with ``num_classes`` classes."""
    if variant not in VARIANTS:
        raise ValueError(f"ICAFusion variants: {sorted(VARIANTS)}; got {variant!r}")
    authors = _authors(checkout)
    return authors.Model(_config(authors, *VARIANTS[variant]), ch=3, nc=num_classes)


def reference_inputs(model_inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``Model.forward(rgb, ir)`` (both 3-channel, as their loader reads the thermal image)."""
    return model_inputs["rgb"], model_inputs["thermal"]


def reference_loss(model: nn.Module, output: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Their ``ComputeLoss(model)(output, rows)[0]`` (``loss * batch``, what their train.py
    backpropagates) of the train-mode ``output`` on the zoo's targets (per image ``boxes`` xyxy
    pixels, ``labels``) as normalised rows, with :func:`loss_hyp` at the model's classes."""
    detect = model.model[-1]
    if not hasattr(model, "hyp"):  # once, as their train.py builds ComputeLoss once
        checkout = Path(sys.modules[type(model).__module__].__file__).parents[1]
        model.hyp, model.gr = loss_hyp(checkout / "data" / "hyp.scratch.yaml", detect.nc, detect.nl), 1.0
        model.compute_loss = sys.modules["utils.loss"].ComputeLoss(model)
    stride = int(detect.stride[0])  # P3's: the first raw map is (B, anchors, H / stride, W / stride, 5 + nc)
    rows = yolo_target_rows(targets, output[0].shape[2] * stride, output[0].shape[3] * stride)
    return model.compute_loss(output, rows.to(output[0]))[0].sum()


def reference_postprocess(output: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Their eval output's decoded predictions through their test script's NMS (per image ``(n, 6)``)."""
    nms = sys.modules["utils.general"].non_max_suppression
    return nms(output[0], CONF_THRES, IOU_THRES, multi_label=True)


def input_shapes() -> dict[str, list[int]]:
    return {"rgb": [BATCH, 3, SIZE, SIZE], "thermal": [BATCH, 3, SIZE, SIZE]}


def loss_hyp(hyp_file: Path, num_classes: int, nl: int = 3) -> dict[str, float]:
    """hyp.scratch.yaml as their train.py scales it (box, cls, obj by layers, classes, image size)."""
    import yaml

    with hyp_file.open() as f:
        hyp = yaml.safe_load(f)
    hyp["box"] *= 3.0 / nl
    hyp["cls"] *= num_classes / 80.0 * 3.0 / nl
    hyp["obj"] *= (IMG_SIZE / 640) ** 2 * 3.0 / nl
    hyp["label_smoothing"] = 0.0
    return hyp


def fixed_values(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, list]:
    """The tensors the rule leaves alone: Detect's anchors (the model's own, in grid units) and the
    learnable scalars of the fusion blocks (``1 + 0.1 * S``, S the rule's draw for the key)."""
    fixed = {}
    for key, value in state.items():
        if key.endswith(("anchors", "anchor_grid")):
            fixed[key] = value.tolist()
        elif ".coefficient" in key or key.endswith((".w1", ".w2")):
            fixed[key] = (1.0 + seeded_tensor(key, value.shape, "float32", seed)).tolist()
    return fixed


def authors_state(meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The fixture's authors'-format state dict: the rule over the key list, then ``fixed``."""
    state = seeded_state_dict(meta["keys"], meta["state_seed"])
    state.update({k: torch.tensor(v, dtype=torch.float32) for k, v in meta["fixed"].items()})
    return state


def targets_tensor(dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(TARGETS, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="checkout of chanchanchan97/ICAFusion")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    authors = _authors(args.ref)
    params = {v: {str(k): count_parameters(authors.Model(_config(authors, *VARIANTS[v]), ch=3, nc=k))
                  for k in FULL_CLASSES} for v in VARIANTS}
    full_keys = key_shapes(authors.Model(_config(authors, 1.0, 1.0), ch=3, nc=3).state_dict())
    nano_keys = key_shapes(authors.Model(_config(authors, *VARIANTS["yolov5n"]), ch=3, nc=1).state_dict())
    net = authors.Model(_config(authors, DEPTH, WIDTH, FUSION_GRIDS), ch=3, nc=NUM_CLASSES)
    keys = key_shapes(net.state_dict())
    fixed = fixed_values(net.state_dict(), STATE_SEED)
    hyp = loss_hyp(authors.checkout / "data" / "hyp.scratch.yaml", NUM_CLASSES)
    meta = {
        "reference_repo": "https://github.com/chanchanchan97/ICAFusion",
        "reference_commit": commit,
        "network": f"models/yolo_test.py Model({CONFIG}) with depth_multiple {DEPTH}, width_multiple {WIDTH}, "
                   f"TransformerFusionBlock grids {FUSION_GRIDS}",
        "num_classes": NUM_CLASSES,
        "depth_multiple": DEPTH,
        "width_multiple": WIDTH,
        "fusion_grids": FUSION_GRIDS,
        "state_seed": STATE_SEED,
        "input_seed": INPUT_SEED,
        "inputs": input_shapes(),
        "nms": {"conf_thres": CONF_THRES, "iou_thres": IOU_THRES, "multi_label": True, "max_det": 300},
        "targets": TARGETS,
        "hyp": hyp,
        "gr": 1.0,
        "authors_params": params,
        "full_keys": full_keys,
        "yolov5n_1_class_keys": nano_keys,
        "keys": keys,
        "fixed": fixed,
    }
    state = authors_state(meta)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]

    def outputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        net.to(dtype).load_state_dict(state)
        xs = {k: v.to(dtype) for k, v in seeded_inputs(meta["inputs"], INPUT_SEED).items()}  # drawn in float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # their loss makes its constants (BCE pos_weight) in the default dtype
        try:
            out: dict[str, torch.Tensor] = {}
            net.eval()
            with torch.no_grad():
                decoded, _, raw = net(*reference_inputs(xs))
                out["eval.decoded"] = decoded
                out.update({f"eval.raw{i}": r for i, r in enumerate(raw)})
                for b, boxes in enumerate(authors.nms(decoded.clone(), CONF_THRES, IOU_THRES, multi_label=True)):
                    out[f"eval.boxes{b}"] = boxes
                for m in dropouts:  # train mode without dropout (drop path off, tools/parity/README.md)
                    m.p = 0.0
                net.train()
                raw = net(*reference_inputs(xs))
                out.update({f"train.raw{i}": r for i, r in enumerate(raw)})
                net.hyp, net.gr = hyp, 1.0
                loss, items = authors.ComputeLoss(net)(raw, targets_tensor(dtype))
                out["train.loss"], out["train.loss_items"] = loss, items
            return out
        finally:
            torch.set_default_dtype(previous)

    out64, drift = in_both_precisions(outputs)
    write_fixture(FIXTURE, {**meta, "dtype": "float64", "float32_drift": drift}, out64)
    print(f"float32 drift (relative to each output's largest value): {drift}")
    print({k: tuple(v.shape) for k, v in out64.items()})
    print(f"wrote {FIXTURE}: {len(keys)} keys ({len(full_keys)} at full size), authors' parameters {params}")


if __name__ == "__main__":
    main()
