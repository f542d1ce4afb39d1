"""Regenerate tests/fixtures/parity/losses/ from checkouts of the ESANet and ACNet reference code.

    python tools/parity/loss_recipes.py --esanet /path/to/ESANet --acnet /path/to/ACNet

What the authors' code computes, on seeded labels and logits (nothing of theirs is copied):

- ESANet (TUI-NICR/ESANet): ``DatasetBase.compute_class_weights("median_frequency")`` over the
  labels (called on a stand-in dataset that serves them, caching into a temporary folder), then
  ``utils.CrossEntropyLoss2d`` with those weights on the main logits and three side outputs at
  strides 8, 16, 32, the targets made by ``preprocessing.MultiScaleLabel`` (OpenCV nearest);
  the fixture holds the weights and the summed loss.
- ACNet (anheidelonghu/ACNet): ``utils.utils.CrossEntropyLoss2d`` with the same weights on the
  main logits and four side outputs at strides 2, 4, 8, 16. Its targets come from
  scikit-image ``resize(order=0)`` in ``ACNet_data_nyuv2.ToTensor``; they are made here by
  pixel-centre nearest sampling (rows ``s * i + s // 2``), so this fixture checks ACNet's
  weighting and per-pixel averaging, not scikit-image itself.

Labels follow the references' convention (0 = void, classes 1..K); ``seeded_labels`` draws them
(8x8 blocks, class frequencies uneven, some classes absent from some images). Needs OpenCV,
matplotlib and torchvision (ESANet's preprocessing imports them); the ESANet utils' pandas import
is stubbed when pandas is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import seeded_inputs, write_fixture

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "losses"
NUM_CLASSES, IMAGES, HEIGHT, WIDTH, BLOCK = 5, 3, 64, 96, 8
LABEL_SEED, LOGIT_SEED = 0, 1
# Block probabilities of void, then classes 1..K: uneven, so the median-frequency weights differ.
BLOCK_PROBS = (0.1, 0.4, 0.25, 0.15, 0.07, 0.03)
ESANET_STRIDES, ACNET_STRIDES = (8, 16, 32), (2, 4, 8, 16)


def seeded_labels(seed: int = LABEL_SEED) -> torch.Tensor:
    """``(IMAGES, HEIGHT, WIDTH)`` int64 labels, 0 = void, one class per 8x8 block."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.multinomial(torch.tensor(BLOCK_PROBS), IMAGES * (HEIGHT // BLOCK) * (WIDTH // BLOCK),
                               replacement=True, generator=g)
    blocks = blocks.view(IMAGES, HEIGHT // BLOCK, WIDTH // BLOCK)
    return blocks.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)


def logit_shapes(strides: tuple[int, ...]) -> dict[str, list[int]]:
    """The main logits and one side output per stride, ``(IMAGES, K, H / s, W / s)``."""
    shapes = {"main": [IMAGES, NUM_CLASSES, HEIGHT, WIDTH]}
    shapes.update({f"side{s}": [IMAGES, NUM_CLASSES, HEIGHT // s, WIDTH // s] for s in strides})
    return shapes


def _git_commit(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def esanet(checkout: Path, labels: torch.Tensor) -> tuple[np.ndarray, float]:
    """ESANet's median-frequency weights over ``labels`` and its summed multi-scale loss."""
    sys.path.insert(0, str(checkout))
    try:
        import pandas  # noqa: F401
    except ImportError:  # src/utils.py imports pandas; its loss does not use it: a stub during that import
        sys.modules["pandas"] = types.ModuleType("pandas")
    from src.utils import CrossEntropyLoss2d

    if isinstance(sys.modules["pandas"], types.ModuleType) and not hasattr(sys.modules["pandas"], "__file__"):
        del sys.modules["pandas"]  # torch looks modules up by spec; the stub has none
    # dataset_base.py alone: the src.datasets package imports every dataset's own dependencies.
    spec = importlib.util.spec_from_file_location("esanet_dataset_base", checkout / "src/datasets/dataset_base.py")
    dataset_base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dataset_base)
    DatasetBase = dataset_base.DatasetBase
    from src.preprocessing import MultiScaleLabel

    class Labels:  # what compute_class_weights reads of a dataset
        n_classes = NUM_CLASSES + 1
        n_classes_without_void = NUM_CLASSES
        split = "train"

        def __init__(self, folder: str) -> None:
            self.source_path = folder

        def __len__(self) -> int:
            return IMAGES

        def load_label(self, i: int) -> np.ndarray:
            return labels[i].numpy().astype(np.uint8)

    with tempfile.TemporaryDirectory() as folder:
        weights = DatasetBase.compute_class_weights(Labels(folder), weight_mode="median_frequency").astype(np.float32)
    logits = seeded_inputs(logit_shapes(ESANET_STRIDES), LOGIT_SEED)
    samples = [MultiScaleLabel(list(ESANET_STRIDES))({"label": labels[i].float()}) for i in range(IMAGES)]
    targets = [labels.float()] + [torch.stack([s["label_down"][r] for s in samples]) for r in ESANET_STRIDES]
    losses = CrossEntropyLoss2d("cpu", weights)(list(logits.values()), targets)
    return weights, float(sum(losses))


def acnet(checkout: Path, labels: torch.Tensor, weights: np.ndarray) -> float:
    """ACNet's summed multi-scale loss with ``weights`` (targets by pixel-centre nearest sampling)."""
    sys.path.insert(0, str(checkout))
    from utils.utils import CrossEntropyLoss2d

    logits = seeded_inputs(logit_shapes(ACNET_STRIDES), LOGIT_SEED)
    targets = [labels.float()] + [labels[:, s // 2::s, s // 2::s].float() for s in ACNET_STRIDES]
    return float(CrossEntropyLoss2d(weight=list(weights))(list(logits.values()), targets))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--esanet", type=Path, required=True, help="checkout of TUI-NICR/ESANet")
    parser.add_argument("--acnet", type=Path, required=True, help="checkout of anheidelonghu/ACNet")
    args = parser.parse_args()
    labels = seeded_labels()
    weights, esanet_loss = esanet(args.esanet.resolve(), labels)
    acnet_loss = acnet(args.acnet.resolve(), labels, weights)
    meta = {
        "esanet": {"repo": "https://github.com/TUI-NICR/ESANet", "commit": _git_commit(args.esanet)},
        "acnet": {"repo": "https://github.com/anheidelonghu/ACNet", "commit": _git_commit(args.acnet)},
        "label_seed": LABEL_SEED, "logit_seed": LOGIT_SEED, "num_classes": NUM_CLASSES,
        "esanet_strides": list(ESANET_STRIDES), "acnet_strides": list(ACNET_STRIDES),
        "esanet_loss": esanet_loss, "acnet_loss": acnet_loss,
    }
    write_fixture(FIXTURE, meta, {"esanet_class_weights": torch.from_numpy(weights)})
    print(f"esanet weights {weights.tolist()}\nesanet loss {esanet_loss:.7f}, acnet loss {acnet_loss:.7f}\n-> {FIXTURE}")


if __name__ == "__main__":
    main()
