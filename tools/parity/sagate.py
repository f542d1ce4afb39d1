"""Regenerate tests/fixtures/parity/sagate/ from a checkout of the SA-Gate reference code.

    python tools/parity/sagate.py --ref /path/to/RGBD_Semantic_Segmentation_PyTorch

Reference: github charlesCXK/RGBD_Semantic_Segmentation_PyTorch, ``model/SA-Gate.nyu/network.py``
(``DeepLab`` on ``dual_resnet.py``). Their modules import a run configuration (``config.py``, which
needs ``easydict`` and a checkout path containing the repository name) and a logger from
``furnace``; this script puts stand-ins for both into ``sys.modules`` at run time (the network
reads only ``config.bn_eps`` = 1e-5 and ``config.bn_momentum`` = 0.1 from it, the values of their
config.py). ``network.py`` hard-wires ResNet-101; the reduced configuration swaps in their
``dual_resnet.resnet50`` (same ``DeepLab`` otherwise), with batch 2, 64x64 inputs, 5 classes.
The state dict (with the training-only FCN auxiliary head) is filled by
``seeded.seeded_state_dict``, each ``hha_downsample`` key then takes its ``downsample`` twin's tensor
(one shared module in their network, so one tensor in any checkpoint of it), BatchNorm running statistics are calibrated on a second seeded
input; eval mode runs once, train mode (batch statistics, Dropout2d 0.1 on) after
``torch.manual_seed(TRAIN_SEED)``: both networks draw that one dropout mask first.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import (
    count_parameters,
    key_shapes,
    reference_runs,
    seeded_state_dict,
    tie_shared,
    write_fixture,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "sagate"
VARIANT, NUM_CLASSES, BATCH, SIZE = "r50", 5, 2, 64
STATE_SEED, INPUT_SEED, TRAIN_SEED, CALIB_SEED = 0, 1, 2, 3
# Their DualBottleneck registers one shortcut module as both `downsample` and `hha_downsample`.
TIE = (".hha_downsample.", ".downsample.")
FULL_CLASSES = 40  # NYUDv2-40, the paper's benchmark


def _import_reference(checkout: Path) -> tuple[types.ModuleType, types.ModuleType]:
    model_dir = (Path(checkout) / "model" / "SA-Gate.nyu").resolve()
    if str(model_dir) not in sys.path:
        sys.path.insert(0, str(model_dir))
    run_config = types.SimpleNamespace(bn_eps=1e-5, bn_momentum=0.1)
    config_module = types.ModuleType("config")
    config_module.config = run_config
    sys.modules["config"] = config_module
    logger_module = types.ModuleType("engine.logger")
    logger_module.get_logger = lambda *a, **k: logging.getLogger("sagate-reference")
    sys.modules.setdefault("engine", types.ModuleType("engine"))
    sys.modules["engine.logger"] = logger_module
    import dual_resnet
    import network

    return network, dual_resnet


def reference_model(checkout: Path, variant: str = VARIANT, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The reference ``DeepLab`` (SA-Gate) on ResNet-50 (``r50``) or ResNet-101 (``r101``), no weights loaded."""
    network, dual_resnet = _import_reference(checkout)
    backbones = {"r50": dual_resnet.resnet50, "r101": dual_resnet.resnet101}
    if variant not in backbones:
        raise ValueError(f"SA-Gate variants: {sorted(backbones)}; got {variant!r}")
    original = network.resnet101
    network.resnet101 = backbones[variant]  # DeepLab.__init__ looks the name up at call time
    try:
        return network.DeepLab(num_classes, criterion=None, norm_layer=nn.BatchNorm2d)
    finally:
        network.resnet101 = original


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``DeepLab.forward(data, hha)``."""
    return model_inputs["rgb"], model_inputs["hha"]


def input_shapes() -> dict[str, list[int]]:
    return {"rgb": [BATCH, 3, SIZE, SIZE], "hha": [BATCH, 3, SIZE, SIZE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="checkout of charlesCXK/RGBD_Semantic_Segmentation_PyTorch")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    net = reference_model(args.ref, VARIANT, NUM_CLASSES)
    keys = key_shapes(net.state_dict())
    state = tie_shared(seeded_state_dict(keys, STATE_SEED), TIE)
    params = {}
    for variant in ("r50", "r101"):
        full = reference_model(args.ref, variant, FULL_CLASSES)
        aux = count_parameters(full.head.auxlayer)
        params[variant] = {"total": count_parameters(full), "training_only_aux_head": aux}
    meta = {
        "reference_repo": "https://github.com/charlesCXK/RGBD_Semantic_Segmentation_PyTorch",
        "reference_commit": commit,
        "network": "model/SA-Gate.nyu/network.py DeepLab (backbone dual_resnet.resnet50 for the fixture)",
        "variant": VARIANT,
        "num_classes": NUM_CLASSES,
        "state_seed": STATE_SEED,
        "input_seed": INPUT_SEED,
        "train_seed": TRAIN_SEED,
        "calibration_seed": CALIB_SEED,
        "tie": list(TIE),
        "inputs": input_shapes(),
        "authors_params_at_40_classes": params,
        "keys": keys,
    }
    # The same runs as the test (seeded.run_modes), in float64 and float32 (seeded.reference_runs).
    outputs, drift = reference_runs(net, lambda xs: net(*reference_inputs(xs)), meta, state)
    write_fixture(FIXTURE, {**meta, "dtype": "float64", "float32_drift": drift}, outputs)
    print(f"float32 drift (relative to each output's largest value): {drift}")
    print(f"wrote {FIXTURE}: {len(keys)} keys, authors' parameters at {FULL_CLASSES} classes {params}")


if __name__ == "__main__":
    main()
