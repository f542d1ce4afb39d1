"""Regenerate tests/fixtures/parity/proben/ from a checkout of the ProbEn authors' code.

    python tools/parity/proben.py --ref /path/to/Multimodal-Object-Detection-via-Probabilistic-Ensembling

What runs of theirs (nothing of it is copied): the late-fusion functions of
``demo/FLIR/demo_probEn.py`` (``fusion`` and what it calls: the clustering NMS with its score and
box rules, and plain NMS for ``max`` + ``argmax``), that file imported with its module imports
(detectron2, OpenCV, the FLIR evaluator) stubbed: detectron2's ``batched_nms`` is torchvision's
below 40,000 boxes, and is given as such. Their
per-image driver (``apply_late_fusion_and_evaluate``) also reads images and feeds an evaluator;
its dispatch is restated in :func:`reference_fusion` (no fusion when fewer than two detectors
fired on the image; the pair that fired when a third did not).

Inputs (:func:`detection_sets`, seeded numpy): ``IMAGES`` images of 640x512 (the FLIR size their
class offsets assume), ``K = 3`` classes (their multi-class rule is written for FLIR's three),
2 or 3 detectors per image, objects seen by several detectors with jittered boxes plus
duplicates and lone boxes, a small pair whose IoU is above 0.5 only pixel-inclusive, per box a softmax posterior over the ``K`` classes and background
(``probs``, the box's ``score`` its class's entry, as detectron2's Fast R-CNN output) and a
variance (``vars``). Image 4 has an empty detector (pass-through or pair fusion); the last
image's posteriors are weak, so fused background or another class wins for some clusters. Every
score / box rule pair of theirs runs in float64 (``torch.set_default_dtype``, so their
``torch.Tensor`` conversions keep float64). The fixture holds inputs and outputs;
``tests/test_parity_proben.py`` runs ``fusionzoo.detection.proben_fusion`` on the same inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import batched_nms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import write_fixture

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "proben"
SEED, IMAGES, NUM_CLASSES, WIDTH, HEIGHT = 0, 6, 3, 640, 512
SCORE_RULES, BOX_RULES = ("probEn", "avg", "max"), ("v-avg", "s-avg", "avg", "argmax")
# Our names for their rule names (docs/published.md "ProbEn").
OUR_SCORE = {"probEn": "proben", "avg": "avg", "max": "max"}
THEIR_FUNCTIONS = ("avg_bbox_fusion", "bayesian_fusion_multiclass", "nms_1", "weighted_box_fusion",
                   "prepare_data", "nms_bayesian", "fusion")


def load_reference(checkout: Path) -> dict[str, Any]:
    """Their ``demo/FLIR/demo_probEn.py`` imported as a module, its detectron2 / OpenCV imports
    stubbed (only ``batched_nms`` is called by the fusion: torchvision's, as detectron2's is below
    40,000 boxes); returns its namespace."""
    stubs = {"cv2": {}, "detectron2": {}, "detectron2.config": {"get_cfg": None},
             "detectron2.data": {"DatasetCatalog": None, "MetadataCatalog": None},
             "detectron2.data.datasets": {"register_coco_instances": None},
             "detectron2.structures": {"Instances": None, "Boxes": None},
             "detectron2.evaluation": {"FLIREvaluator": None}, "detectron2.layers": {},
             "detectron2.layers.nms": {"batched_nms": batched_nms}, "detectron2.utils": {},
             "detectron2.utils.opt": {"config_parser": None}}
    saved = {name: sys.modules.get(name) for name in stubs}
    for name, attrs in stubs.items():
        sys.modules[name] = types.SimpleNamespace(**attrs)
    try:
        spec = importlib.util.spec_from_file_location("demo_probEn", checkout / "demo" / "FLIR" / "demo_probEn.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    missing = [f for f in THEIR_FUNCTIONS if not hasattr(module, f)]
    if missing:
        raise SystemExit(f"{checkout}: demo/FLIR/demo_probEn.py lacks {missing}")
    return vars(module)


def detection_sets(seed: int = SEED) -> list[list[dict[str, np.ndarray]]]:
    """Per image, 2 or 3 detectors' sets: ``boxes`` ``(N, 4)``, ``scores`` ``(N,)``, ``labels``
    ``(N,)``, ``probs`` ``(N, K)``, ``vars`` ``(N,)`` (float64 but labels)."""
    rng = np.random.default_rng(seed)
    images = []
    for image in range(IMAGES):
        detectors = 3 if image % 2 else 2
        objects = rng.integers(3, 7)
        centre = rng.uniform([60, 60], [WIDTH - 60, HEIGHT - 60], size=(objects, 2))
        size = rng.uniform([20, 40], [110, 140], size=(objects, 2))
        cls = rng.integers(0, NUM_CLASSES, objects)
        sets = []
        for d in range(detectors):
            rows = []
            for o in range(objects):
                # seen by this detector with probability 0.75, sometimes twice (a duplicate)
                for _ in range(int(rng.random() < 0.75) + int(rng.random() < 0.2)):
                    rows.append((centre[o] + rng.normal(0, 4, 2), size[o] * rng.uniform(0.85, 1.15, 2), cls[o]))
            for _ in range(rng.integers(0, 3)):  # lone boxes
                rows.append((rng.uniform([40, 40], [WIDTH - 40, HEIGHT - 40]), rng.uniform(15, 60, 2),
                             rng.integers(0, NUM_CLASSES)))
            if d < 2:  # an 8x8 pair offset by 2.8 px: IoU 0.48 in continuous coordinates, 0.53
                # pixel-inclusive (their convention), so the two conventions cluster it differently
                corner = np.array([100.0 + 60 * image + 2.8 * d, 30.0])
                rows.append((corner + 4.0, np.array([8.0, 8.0]), image % NUM_CLASSES))
            if image == 4 and d == 0:
                rows = []  # a detector that fired on nothing
            boxes, scores, labels, probs, variances = [], [], [], [], []
            for c, wh, label in rows:
                logits = rng.normal(0, 1, NUM_CLASSES + 1)
                if image == IMAGES - 1:  # weak evidence: fused, background or another class can win
                    logits[label] += rng.uniform(0.0, 0.8)
                    logits[NUM_CLASSES] += 1.0
                else:
                    logits[label] += rng.uniform(1.0, 4.0)  # the box's class leads, by varying margins
                p = np.exp(logits) / np.exp(logits).sum()
                boxes.append(np.clip(np.concatenate([c - wh / 2, c + wh / 2]), 0, [WIDTH - 1, HEIGHT - 1] * 2))
                scores.append(p[label])
                labels.append(label)
                probs.append(p[:NUM_CLASSES])
                variances.append(rng.uniform(0.05, 2.0))
            n = len(rows)
            sets.append({"boxes": np.array(boxes, dtype=np.float64).reshape(n, 4),
                         "scores": np.array(scores, dtype=np.float64), "labels": np.array(labels, dtype=np.int64),
                         "probs": np.array(probs, dtype=np.float64).reshape(n, NUM_CLASSES),
                         "vars": np.array(variances, dtype=np.float64)})
        images.append(sets)
    return images


def reference_fusion(ref: dict[str, Any], sets: list[dict[str, np.ndarray]], method: tuple[str, str]) -> dict[str, np.ndarray]:
    """Their fusion of one image's sets (their per-image dispatch restated; their functions run)."""
    infos = [{"bbox": s["boxes"].tolist(), "score": s["scores"].tolist(), "class": s["labels"].tolist(),
              "prob": s["probs"].tolist(), "vars": s["vars"][:, None].tolist()} for s in sets]
    fired = [i for i in infos if len(i["bbox"]) > 0]
    if not fired:
        boxes, scores, labels = np.zeros((0, 4)), np.zeros(0), np.zeros(0)
    elif len(fired) == 1:
        boxes, scores, labels = np.array(fired[0]["bbox"]), np.array(fired[0]["score"]), np.array(fired[0]["class"])
    else:
        out_boxes, out_scores, out_class = ref["fusion"](list(method), *fired)
        boxes = np.array([np.asarray(b, dtype=np.float64) for b in out_boxes], dtype=np.float64).reshape(-1, 4)
        scores, labels = np.asarray(out_scores, dtype=np.float64), np.asarray(out_class)
    return {"boxes": boxes.astype(np.float64), "scores": scores.astype(np.float64), "labels": labels.astype(np.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", type=Path, required=True, help="checkout of Jamie725/Multimodal-Object-Detection-via-Probabilistic-Ensembling")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    ref = load_reference(args.ref)
    torch.set_default_dtype(torch.float64)  # their torch.Tensor(...) conversions then keep float64
    images = detection_sets()
    tensors: dict[str, torch.Tensor] = {}
    for i, sets in enumerate(images):
        for d, s in enumerate(sets):
            for key, value in s.items():
                tensors[f"input/{i}/{d}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
    counts = {}
    for score_rule in SCORE_RULES:
        for box_rule in BOX_RULES:
            for i, sets in enumerate(images):
                out = reference_fusion(ref, sets, (score_rule, box_rule))
                for key, value in out.items():
                    tensors[f"output/{score_rule}/{box_rule}/{i}/{key}"] = torch.from_numpy(np.ascontiguousarray(value))
                counts[f"{score_rule}/{box_rule}/{i}"] = int(out["scores"].shape[0])
    meta = {"seed": SEED, "images": IMAGES, "num_classes": NUM_CLASSES, "image_size": [HEIGHT, WIDTH],
            "detectors": [len(s) for s in images], "iou_thresh": 0.5,
            "score_rules": list(SCORE_RULES), "box_rules": list(BOX_RULES), "our_score_rules": OUR_SCORE,
            "input_boxes": [[int(s["boxes"].shape[0]) for s in sets] for sets in images], "output_boxes": counts}
    write_fixture(args.out, meta, tensors)
    print(f"wrote {args.out}: {len(tensors)} tensors; background-labelled outputs (probEn): "
          f"{sum(int((tensors[f'output/probEn/{b}/{i}/labels'] == NUM_CLASSES).sum()) for b in BOX_RULES for i in range(IMAGES))}")


if __name__ == "__main__":
    main()
