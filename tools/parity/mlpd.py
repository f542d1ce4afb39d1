"""Regenerate tests/fixtures/parity/mlpd/ from a checkout of the MLPD reference code.

    python tools/parity/mlpd.py --ref /path/to/MLPD-Multi-Label-Pedestrian-Detection

Reference: github sejong-rcv/MLPD-Multi-Label-Pedestrian-Detection, ``src/model.py``: ``SSD300``
(network and prior boxes), ``MultiBoxLoss`` (training loss) and ``SSD300.detect_objects`` with the
settings of ``src/inference.py`` ``val_epoch`` (min_score 0.1, max_overlap 0.425, top_k 200).
Their ``n_classes`` is 3 (background, person in RGB, person in thermal): ``num_classes=1`` here.

Reduced configuration: the input, batch 2 at 64x80 (the network is fixed). The authors' state dict
is filled by ``seeded.seeded_state_dict``; eval mode and train mode (BatchNorm on batch
statistics; MLPD has no dropout) each run once; the post-processing runs on the eval outputs and
the loss on the train outputs with fixed targets (``TARGETS``: boxes in pixels, labels in their
codes 1 = RGB only, 2 = thermal only, 3 = both, -1 = ignore; no zero-size placeholder box, which
their data loader prepends to every image). Everything runs in float64 and float32
(``float32_drift``).

Running their code on CPU at another size needs four interventions, none in the arithmetic:

- ``torchvision.models.vgg16_bn`` is redirected to an uninitialised VGG-16-BN (their ``__init__``
  asks for ImageNet weights; the rule overwrites them anyway), and ``PIL.PILLOW_VERSION`` (gone
  from Pillow 10, imported by their ``utils/functional.py``) is set to Pillow's version;
- ``_to_one_hot`` casts through ``torch.cuda`` tensor types: replaced by the same scatter on CPU,
  in the predictions' dtype;
- ``MultiBoxLoss.forward`` stores encoded targets in a ``dtype=torch.float`` buffer: its source is
  re-executed with the predictions' dtype there, so the float64 run is float64 throughout;
- ``create_prior_boxes`` hard-codes the feature-map sizes of 512x640 and divides by 512 and 640:
  its source is re-executed with this input's sizes. Their unchanged priors at 512x640 are
  recorded by count and sha256 of the float32 bytes (the test rebuilds ours bit for bit).

``reference_model`` / ``reference_inputs`` / ``reference_loss`` / ``reference_postprocess`` follow
tools/parity/README.md for ``bench/parity.py`` (speed side by side): their ``forward`` returns box
offsets and class logits; the model's priors follow the input size (a forward pre-hook re-executes
``create_prior_boxes`` as above when the size is not 512x640); the loss is their ``MultiBoxLoss``
on the targets their data loader would make of the boxes when every box is annotated in both
modalities; the post-processing is ``detect_objects`` as ``val_epoch`` calls it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import (
    count_parameters,
    float32_drift,
    key_shapes,
    seeded_inputs,
    seeded_state_dict,
    write_fixture,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "mlpd"
NUM_CLASSES, BATCH, HEIGHT, WIDTH = 1, 2, 64, 80
STATE_SEED, INPUT_SEED = 0, 1
MIN_SCORE, MAX_OVERLAP, TOP_K = 0.1, 0.425, 200  # src/inference.py val_epoch
LEVEL_NAMES = ("conv4_3", "conv6", "conv7", "conv8", "conv9", "conv10")
# Per image (x1, y1, x2, y2) pixels of the 64x80 input and the reference's label code.
TARGETS: list[list[tuple[tuple[int, int, int, int], int]]] = [
    [((8, 4, 36, 60), 3), ((44, 10, 76, 42), 1), ((60, 40, 70, 60), -1)],
    [((20, 8, 60, 60), 2), ((2, 30, 18, 62), 3)],
]
_DTYPE = {"value": torch.float64}  # the dtype _to_one_hot returns (the run's)
_LAST_RUN: dict[str, nn.Module] = {}  # the reference_model network that ran last (its priors decode its output)
FRAME_HEIGHT, FRAME_WIDTH = 512, 640  # KAIST frames, the size their priors assume
# src/config.py's train load condition, in pixels of the frame: a box is ignored (label -1) when its
# corner leaves [5, 635) (their y is checked against the x range too) or it is under 12 pixels tall.
IGNORE_LOW, IGNORE_HIGH, IGNORE_MIN_HEIGHT = 5, 635, 12
BOTH_MODALITIES = 3  # their label code of a pedestrian annotated in RGB and thermal


def _import_reference(checkout: Path) -> ModuleType:
    import PIL
    import torchvision

    src = Path(checkout).resolve() / "src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
        sys.path.append(str(src / "utils"))  # their transforms.py falls back to `import functional`
    if not hasattr(PIL, "PILLOW_VERSION"):
        PIL.PILLOW_VERSION = PIL.__version__
    if getattr(torchvision.models.vgg16_bn, "offline", False):  # imported and patched already
        import model as reference

        return reference
    original = torchvision.models.vgg16_bn

    def vgg16_bn_offline(*args: object, **kwargs: object) -> nn.Module:
        return original(weights=None)

    vgg16_bn_offline.offline = True  # type: ignore[attr-defined]
    torchvision.models.vgg16_bn = vgg16_bn_offline  # for this process: every SSD300() asks for it
    import model as reference

    def one_hot_cpu(y: torch.Tensor, n_dims: int, dtype: Any = None) -> torch.Tensor:
        index = y.long().view(*y.size(), -1)
        return torch.zeros(*y.size(), n_dims, dtype=_DTYPE["value"]).scatter(len(y.size()), index, 1)

    reference._to_one_hot = one_hot_cpu
    source = textwrap.dedent(inspect.getsource(reference.MultiBoxLoss.forward))
    source, n = re.subn(r"true_locs = torch\.zeros\(\(batch_size, n_priors, 4\), dtype=torch\.float,",
                        "true_locs = torch.zeros((batch_size, n_priors, 4), dtype=predicted_locs.dtype,", source)
    if n != 1:
        raise RuntimeError("MultiBoxLoss.forward changed: its true_locs buffer was not found")
    namespace: dict[str, Any] = {}
    exec(source, reference.__dict__, namespace)  # noqa: S102  (their source, one dtype widened)
    reference.MultiBoxLoss.forward = namespace["forward"]
    return reference


def reference_model(checkout: Path, variant: str = "vgg16", num_classes: int = NUM_CLASSES) -> nn.Module:
    """The reference ``SSD300`` with ``1 + 2 * num_classes`` outputs (3: their pedestrian model)."""
    if variant != "vgg16":
        raise ValueError(f"MLPD has one variant here, 'vgg16'; got {variant!r}")
    net = _import_reference(checkout).SSD300(n_classes=1 + 2 * num_classes)
    net.register_forward_pre_hook(_priors_for_input)
    return net


def _priors_for_input(net: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    """Forward pre-hook: ``net.priors_cxcy`` for this input's size (their own at 512x640)."""
    height, width = args[0].shape[-2:]
    if getattr(net, "priors_size", (FRAME_HEIGHT, FRAME_WIDTH)) != (height, width):
        reference = sys.modules[type(net).__module__]
        net.priors_cxcy = reference_priors(reference, level_sizes(height, width), height, width).to(args[0].device)
        net.priors_size = (height, width)
    _LAST_RUN["net"] = net


def reference_loss(model: nn.Module, output: tuple[torch.Tensor, torch.Tensor], targets: list[dict[str, torch.Tensor]]
                   ) -> torch.Tensor:
    """Their ``MultiBoxLoss`` (total) of their train-mode ``output`` on the zoo's targets (per image
    ``boxes`` xyxy pixels of the input, ``labels``), converted by :func:`loader_targets`."""
    locs, scores = output
    _DTYPE["value"] = scores.dtype
    height, width = getattr(model, "priors_size", (FRAME_HEIGHT, FRAME_WIDTH))
    reference = sys.modules[type(model).__module__]
    boxes, labels = loader_targets(targets, height, width)
    loss = reference.MultiBoxLoss(priors_cxcy=model.priors_cxcy)
    return loss(locs, scores, [b.to(locs) for b in boxes], [c.to(scores) for c in labels])[0]


def reference_postprocess(output: tuple[torch.Tensor, torch.Tensor]) -> list[list[torch.Tensor]]:
    """``detect_objects`` of the network that produced ``output`` (the last to run), with
    ``val_epoch``'s settings: per image boxes, labels, scores and background scores."""
    locs, scores = output
    return _LAST_RUN["net"].detect_objects(locs, scores, min_score=MIN_SCORE, max_overlap=MAX_OVERLAP, top_k=TOP_K)


def loader_targets(targets: list[dict[str, torch.Tensor]], height: int, width: int
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What their ``KAISTPed`` yields for these boxes when each is annotated in both modalities
    (paired): the boxes as fractions of the input, their leading ``[0, 0, 0, 0]`` placeholder
    (label -1), label 3 (both modalities; the RGB and thermal copies merge into one row) and -1
    where their train load condition ignores the box (measured on the 640x512 frame)."""
    boxes, labels = [], []
    frame = torch.tensor([FRAME_WIDTH, FRAME_HEIGHT, FRAME_WIDTH, FRAME_HEIGHT], dtype=torch.float64)
    for t in targets:
        b = t["boxes"].double().cpu() / torch.tensor([width, height, width, height], dtype=torch.float64)
        x1, y1, x2, y2 = (b * frame).unbind(1)
        ignored = (x1 < IGNORE_LOW) | (y1 < IGNORE_LOW) | (x2 > IGNORE_HIGH) | (y2 > IGNORE_HIGH) | (y2 - y1 < IGNORE_MIN_HEIGHT)
        codes = torch.where(ignored, -1.0, float(BOTH_MODALITIES)).double()
        boxes.append(torch.cat((b.new_zeros(1, 4), b)))
        labels.append(torch.cat((codes.new_full((1,), -1.0), codes)))
    return boxes, labels


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``SSD300.forward(image_vis, image_lwir)``."""
    return model_inputs["rgb"], model_inputs["thermal"]


def reference_priors(reference: ModuleType, sizes: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    """Their ``create_prior_boxes`` re-executed with these level sizes ``[(h, w)]`` and input size."""
    source = textwrap.dedent(inspect.getsource(reference.SSD300.create_prior_boxes))
    dims = "{" + ", ".join(f"'{n}': [{w}, {h}]" for n, (h, w) in zip(LEVEL_NAMES, sizes)) + "}"
    source, n1 = re.subn(r"fmap_dims = \{.*?\}", lambda _: f"fmap_dims = {dims}", source, flags=re.DOTALL)
    source, n2 = re.subn(r"/512\.", f"/{height}.", source)
    source, n3 = re.subn(r"/640\.", f"/{width}.", source)
    if (n1, n2, n3) != (1, 1, 1):
        raise RuntimeError(f"create_prior_boxes changed: replaced {(n1, n2, n3)} of (1, 1, 1) places")
    namespace: dict[str, Any] = {}
    exec(source, reference.__dict__, namespace)  # noqa: S102
    return namespace["create_prior_boxes"](None)


def level_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """Their maps' sizes: ceil-mode 2x2 poolings to stride 8 and 16, then two stride-2 1x1 convs."""
    sizes, h, w = [], height, width
    for _ in range(3):
        h, w = -(-h // 2), -(-w // 2)
    sizes.append((h, w))
    h, w = -(-h // 2), -(-w // 2)
    sizes.append((h, w))
    for _ in range(2):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes + [sizes[-1], sizes[-1]]


def target_tensors(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Their loss's ``boxes`` (fractions of the input, as their dataset divides) and float ``labels``."""
    scale = torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT], dtype=torch.float64)
    boxes = [(torch.tensor([b for b, _ in image], dtype=torch.float64) / scale).to(dtype) for image in TARGETS]
    labels = [torch.tensor([float(c) for _, c in image], dtype=dtype) for image in TARGETS]
    return boxes, labels


def run(reference: ModuleType, net: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every output the fixture records, the reference in ``dtype``."""
    _DTYPE["value"] = dtype
    net.to(dtype).load_state_dict(state)
    shapes = {"rgb": [BATCH, 3, HEIGHT, WIDTH], "thermal": [BATCH, 1, HEIGHT, WIDTH]}
    xs = {k: v.to(dtype) for k, v in seeded_inputs(shapes, INPUT_SEED).items()}
    net.priors_cxcy = reference_priors(reference, level_sizes(HEIGHT, WIDTH), HEIGHT, WIDTH)
    out: dict[str, torch.Tensor] = {"priors": net.priors_cxcy.double()}
    with torch.no_grad():
        net.eval()
        locs, scores = net(*reference_inputs(xs))
        out.update({"eval.locs": locs, "eval.scores": scores})
        boxes, _, det_scores, _ = net.detect_objects(locs, scores, min_score=MIN_SCORE, max_overlap=MAX_OVERLAP, top_k=TOP_K)
        out["det.boxes"] = torch.cat(boxes)
        out["det.scores"] = torch.cat([s.mean(dim=1) for s in det_scores])  # val_epoch's score
        out["det.counts"] = torch.tensor([len(b) for b in boxes], dtype=torch.float64)
        net.train()
        locs, scores = net(*reference_inputs(xs))
        out.update({"train.locs": locs, "train.scores": scores})
        loss, conf, loc, _ = reference.MultiBoxLoss(priors_cxcy=net.priors_cxcy)(locs, scores, *target_tensors(dtype))
        out.update({"loss.total": loss.reshape(()), "loss.classification": conf.reshape(()),
                    "loss.bbox_regression": loc.reshape(())})
    return {k: v.detach().double().contiguous() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, required=True, help="checkout of sejong-rcv/MLPD-Multi-Label-Pedestrian-Detection")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    reference = _import_reference(args.ref)
    net = reference.SSD300(n_classes=1 + 2 * NUM_CLASSES)
    full_priors = net.priors_cxcy.float().contiguous()  # their unchanged 512x640 priors
    keys = key_shapes(net.state_dict())
    state = seeded_state_dict(keys, STATE_SEED)
    out64 = run(reference, net, state, torch.float64)
    out32 = run(reference, net, state, torch.float32)
    if not torch.equal(out32["det.counts"], out64["det.counts"]):
        raise RuntimeError(f"float32 keeps {out32['det.counts'].tolist()} boxes, float64 {out64['det.counts'].tolist()}")
    meta = {
        "reference_repo": "https://github.com/sejong-rcv/MLPD-Multi-Label-Pedestrian-Detection",
        "reference_commit": commit,
        "network": "src/model.py SSD300 (n_classes 3), MultiBoxLoss, SSD300.detect_objects",
        "num_classes": NUM_CLASSES,
        "state_seed": STATE_SEED,
        "input_seed": INPUT_SEED,
        "inputs": {"rgb": [BATCH, 3, HEIGHT, WIDTH], "thermal": [BATCH, 1, HEIGHT, WIDTH]},
        "postprocess": {"min_score": MIN_SCORE, "max_overlap": MAX_OVERLAP, "top_k": TOP_K},
        "targets": [[{"box": list(b), "code": c} for b, c in image] for image in TARGETS],
        "authors_params": {str(NUM_CLASSES): count_parameters(net)},
        "priors_512x640": {"count": int(full_priors.shape[0]),
                           "sha256_float32": hashlib.sha256(full_priors.numpy().tobytes()).hexdigest()},
        "keys": keys,
        "dtype": "float64",
        "float32_drift": float32_drift(out32, out64),
    }
    write_fixture(FIXTURE, meta, out64)
    print(f"float32 drift (relative to each output's largest value): {meta['float32_drift']}")
    print(f"boxes kept per image: {out64['det.counts'].tolist()}; loss {out64['loss.total'].item():.6f}")
    print(f"wrote {FIXTURE}: {len(keys)} keys, authors' parameters {meta['authors_params']}")


if __name__ == "__main__":
    main()
