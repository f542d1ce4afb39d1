"""Regenerate tests/fixtures/parity/acnet/ from a checkout of the ACNet reference code.

    python tools/parity/acnet.py --ref /path/to/ACNet

Reference: github anheidelonghu/ACNet, ``ACNet_models_V1.py`` (``ACNet``), built with
``pretrained=False`` (nothing downloads). ResNet-50 is ACNet's only backbone, so the reduced
configuration is the input: batch 2, 64x64, 5 classes. The authors' state dict (with its four
training-only side classifiers) is filled by ``seeded.seeded_state_dict``, then its BatchNorm
running statistics are calibrated on a second seeded input (``seeded.calibrate_batchnorm``);
eval mode and train mode (BatchNorm on batch statistics; ACNet has no dropout) each run once. In train mode the
reference returns ``(out, out2, out3, out4, out5)``; ``out`` is what is compared.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import (
    count_parameters,
    key_shapes,
    reference_runs,
    seeded_state_dict,
    write_fixture,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "acnet"
NUM_CLASSES, BATCH, SIZE = 5, 2, 64
STATE_SEED, INPUT_SEED, CALIB_SEED = 0, 1, 3
FULL_CLASSES = (37, 40)  # SUN RGB-D (the reference's default), NYUDv2-40 (its released weights)


def reference_model(checkout: Path, variant: str = "r50", num_classes: int = NUM_CLASSES) -> nn.Module:
    """The reference ``ACNet`` (only variant: ``r50``)."""
    if variant != "r50":
        raise ValueError(f"ACNet has one variant, 'r50'; got {variant!r}")
    checkout = Path(checkout).resolve()
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    import ACNet_models_V1

    return ACNet_models_V1.ACNet(num_class=num_classes, pretrained=False)


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``ACNet.forward(rgb, depth)``."""
    return model_inputs["rgb"], model_inputs["depth"]


def input_shapes() -> dict[str, list[int]]:
    return {"rgb": [BATCH, 3, SIZE, SIZE], "depth": [BATCH, 1, SIZE, SIZE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="checkout of anheidelonghu/ACNet")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    net = reference_model(args.ref, "r50", NUM_CLASSES)
    keys = key_shapes(net.state_dict())
    state = seeded_state_dict(keys, STATE_SEED)
    params = {}
    for k in FULL_CLASSES:
        full = reference_model(args.ref, "r50", k)
        side = sum(p.numel() for name, p in full.named_parameters() if name.startswith(("out2_conv", "out3_conv", "out4_conv", "out5_conv")))
        params[str(k)] = {"total": count_parameters(full), "training_only_side_classifiers": side}
    meta = {
        "reference_repo": "https://github.com/anheidelonghu/ACNet",
        "reference_commit": commit,
        "network": "ACNet_models_V1.py ACNet",
        "num_classes": NUM_CLASSES,
        "state_seed": STATE_SEED,
        "input_seed": INPUT_SEED,
        "calibration_seed": CALIB_SEED,
        "inputs": input_shapes(),
        "authors_params": params,
        "keys": keys,
    }
    # The same runs as the test (seeded.run_modes), in float64 and float32 (seeded.reference_runs).
    outputs, drift = reference_runs(net, lambda xs: net(*reference_inputs(xs)), meta, state)
    write_fixture(FIXTURE, {**meta, "dtype": "float64", "float32_drift": drift}, outputs)
    print(f"float32 drift (relative to each output's largest value): {drift}")
    print(f"wrote {FIXTURE}: {len(keys)} keys, authors' parameters {params}")


if __name__ == "__main__":
    main()
