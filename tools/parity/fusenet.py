"""Regenerate tests/fixtures/parity/fusenet/ from a checkout of the FuseNet PyTorch port.

    python tools/parity/fusenet.py --ref /path/to/fusenet-pytorch

Reference: github MehmetAygun/fusenet-pytorch (``models/networks.py``, ``FusenetGenerator``), the
port whose released checkpoints ``fusenet_vgg16`` converts. The network is fixed (two VGG-16
encoders), so the reduced configuration is the input: batch 2, 32x32, 5 classes. The authors'
state dict is filled by ``seeded.seeded_state_dict``; eval mode runs once; train mode (BatchNorm
on batch statistics, dropout 0.4 on) runs after ``torch.manual_seed(TRAIN_SEED)``, which gives
both networks the same dropout masks because both draw them in the same order and shapes.
Their ``__init__`` asks torchvision for ImageNet VGG-16 weights; that call is redirected to an
uninitialised VGG-16 here (the weights are overwritten by the rule anyway), so nothing downloads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import count_parameters, key_shapes, reference_runs, seeded_state_dict, write_fixture

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "fusenet"
NUM_CLASSES, BATCH, SIZE = 5, 2, 32
STATE_SEED, INPUT_SEED, TRAIN_SEED = 0, 1, 2
FULL_CLASSES = (37, 40)  # SUN RGB-D (the paper's table), NYUDv2-40


def reference_model(checkout: Path, variant: str = "vgg16", num_classes: int = NUM_CLASSES) -> nn.Module:
    """The port's ``FusenetGenerator`` (only variant: ``vgg16``), built without downloading."""
    if variant != "vgg16":
        raise ValueError(f"FuseNet has one variant, 'vgg16'; got {variant!r}")
    import torchvision

    checkout = Path(checkout).resolve()
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    original = torchvision.models.vgg16

    def vgg16_offline(*args: object, **kwargs: object) -> nn.Module:
        return original(weights=None)

    torchvision.models.vgg16 = vgg16_offline
    try:
        from models.networks import FusenetGenerator

        return FusenetGenerator(num_classes)
    finally:
        torchvision.models.vgg16 = original


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``FusenetGenerator.forward(rgb_inputs, depth_inputs)``."""
    return model_inputs["rgb"], model_inputs["depth"]


def input_shapes() -> dict[str, list[int]]:
    return {"rgb": [BATCH, 3, SIZE, SIZE], "depth": [BATCH, 1, SIZE, SIZE]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="checkout of MehmetAygun/fusenet-pytorch")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    net = reference_model(args.ref, "vgg16", NUM_CLASSES)
    keys = key_shapes(net.state_dict())
    state = seeded_state_dict(keys, STATE_SEED)
    params = {str(k): count_parameters(reference_model(args.ref, "vgg16", k)) for k in FULL_CLASSES}
    meta = {
        "reference_repo": "https://github.com/MehmetAygun/fusenet-pytorch",
        "reference_commit": commit,
        "network": "models/networks.py FusenetGenerator",
        "num_classes": NUM_CLASSES,
        "state_seed": STATE_SEED,
        "input_seed": INPUT_SEED,
        "train_seed": TRAIN_SEED,
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
