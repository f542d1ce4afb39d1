"""Interpretability suite on detectors: AP contribution (known answers, efficiency, an ignored
modality), box masks for semantic variance, object rows for CKA, detection Grad-CAM, and
``interpret.run`` on one detector per fusion family. Tiny: resnet10t encoders, FPN width 64,
64x64 synthetic RGB-T images."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.data import collate, create_dataset
from fusionzoo.detection.metrics import coco_ap
from fusionzoo.interpret.cka import object_rows
from fusionzoo.interpret.contribution import modality_contribution
from fusionzoo.interpret.detection import DetectionScore
from fusionzoo.interpret.semantic_variance import box_mask, box_masks
from fusionzoo.tasks import detection_targets

pytest.importorskip("pycocotools")
pytest.importorskip("fusionzoo.detection")

SIZE = (64, 64)
# Bootstrap replicates of interpret.run here: the intervals are computed (and serialized) as with the
# default 200, in a tenth of the time (AP replicates re-run the COCO evaluation); the point values
# tested below do not depend on them, the intervals' statistics are tested in test_interpret_intervals.py.
REPLICATES = 20


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def dataset():
    return create_dataset("synthetic_rgbt", split="val", num_samples=8, image_size=SIZE, seed=0)


def _detector(name: str, encoder: str = "resnet10t", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return fz.create_model(name, encoder=encoder, num_classes=5, fpn_channels=64, **kwargs)


def _untrained(name: str, **kwargs) -> nn.Module:
    """An untrained detector for the structural runs: timm's 1.1M-parameter test_resnet (CMX's
    attention presets need ResNet stage widths: resnet10t)."""
    return _detector(name, encoder="resnet10t" if name.endswith("cmx") else "test_resnet", score_thresh=0.0, **kwargs)


@pytest.fixture(scope="module")
def trained_sum(dataset):
    """fcos_sum (middle fusion) overfit briefly on the 8 images: both modalities carry AP."""
    batch = collate([dataset[i] for i in range(len(dataset))])
    x = {m: batch[m] for m in ("rgb", "thermal")}
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])]
    model = _detector("fcos_sum")
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    model.train()
    for _ in range(20):
        loss = sum(model(x, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# box masks and object rows
# ---------------------------------------------------------------------------------------------
def test_box_mask_hand_case():
    boxes = torch.tensor([
        [0.0, 0.0, 6.0, 4.0],    # large, label 1
        [1.0, 1.0, 3.0, 3.0],    # small inside it, label 2: drawn on top
        [4.4, 2.6, 5.6, 3.6],    # fractional: the pixels whose centres are inside, (r3, c4) and (r3, c5)
        [5.0, 0.0, 9.0, 1.0],    # partly outside the 6-wide image: cut off; area as given, 4, like the next
        [5.0, 0.0, 6.0, 4.0],    # equal area 4, later in the list: on top of the previous one
    ])
    labels = torch.tensor([1, 2, 3, 0, 4])
    got = box_mask(boxes, labels, (5, 6), background=7)
    expected = torch.tensor([
        [1, 1, 1, 1, 1, 4],
        [1, 2, 2, 1, 1, 4],
        [1, 2, 2, 1, 1, 4],
        [1, 1, 1, 1, 3, 3],
        [7, 7, 7, 7, 7, 7],
    ])
    assert torch.equal(got, expected)
    assert got.dtype == torch.long
    # background None -> ignore index; no boxes -> all background
    ign = box_mask(boxes[:1], labels[:1], (5, 6), background=None, ignore_index=255)
    assert (ign[4] == 255).all() and (ign[:4] == 1).all()
    assert torch.equal(box_mask(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), (2, 3), 5),
                       torch.full((2, 3), 5))
    batch = box_masks([boxes, torch.zeros(0, 4)], [labels, torch.zeros(0, dtype=torch.long)], (5, 6), 7)
    assert batch.shape == (2, 5, 6) and torch.equal(batch[0], expected) and (batch[1] == 7).all()
    with pytest.raises(ValueError, match="one per box"):
        box_mask(boxes, labels[:2], (5, 6), 7)
    with pytest.raises(ValueError, match="integer"):
        box_mask(boxes, labels.float(), (5, 6), 7)


def test_object_rows_pool_each_box_and_count_objects():
    f = torch.arange(16.0).view(1, 1, 4, 4)  # a stride-2 map of an 8x8 image
    rows = object_rows(f, [torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 8.0, 8.0]])], 2)
    # means of the top-left 2x2 cells, of the whole map, of the bottom-right 2x2 cells
    assert torch.allclose(rows, torch.tensor([[2.5], [7.5], [12.5]]))
    feats = torch.randn(3, 5, 8, 8)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4), torch.tensor([[2.0, 2, 30, 30], [5, 5, 6, 6]])]
    assert object_rows(feats, boxes, 4).shape == (3, 5)
    # image-level vectors: each object gets its image's vector, rows stay aligned with map taps
    vec = torch.randn(3, 7)
    assert torch.equal(object_rows(vec, boxes, 0), vec[[0, 2, 2]])
    with pytest.raises(ValueError, match="batch of 3"):
        object_rows(feats, boxes[:2], 4)


def test_detection_targets_check_labels():
    batch = {"boxes": [torch.tensor([[0.0, 0, 4, 4]])], "labels": [torch.tensor([5])]}
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        detection_targets(batch, num_classes=5)
    assert detection_targets(batch, num_classes=6)[0]["labels"].tolist() == [5]
    with pytest.raises(KeyError, match="boxes"):
        detection_targets({"labels": []})


def test_detection_targets_keep_ignore_regions_for_ap():
    """KAIST's ignore regions (people / cyclist / person?) reach the AP the contribution uses: an
    undetected one is not a miss, as in the training evaluator."""
    batch = {"boxes": [torch.tensor([[0.0, 0, 20, 40], [40, 0, 60, 40]])], "labels": [torch.tensor([0, 0])],
             "ignore": [torch.tensor([False, True])]}
    targets = detection_targets(batch, num_classes=1)
    assert targets[0]["ignore"].tolist() == [False, True]
    pred = [{"boxes": torch.tensor([[0.0, 0, 20, 40]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([0])}]
    assert coco_ap(pred, targets, num_classes=1)["AP"] == pytest.approx(1.0)
    plain = [{k: v for k, v in targets[0].items() if k != "ignore"}]
    assert coco_ap(pred, plain, num_classes=1)["AP"] < 0.6  # without the flag the ignore box is a miss
    with pytest.raises(ValueError, match=r"ignore \(1,\) for labels \(2,\)"):
        detection_targets({**batch, "ignore": [torch.tensor([True])]}, num_classes=1)


# ---------------------------------------------------------------------------------------------
# contribution: a detector whose answer is known
# ---------------------------------------------------------------------------------------------
_QUADS = [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 64), (32, 32, 64, 64)]
# per image: quadrant -> class; class 0 is visible in RGB only, 1 in thermal only, 2 needs both
_SCENES = [{0: 0, 1: 1, 2: 2}, {0: 1, 1: 2, 3: 0}, {0: 2, 2: 0, 3: 1}, {1: 0, 2: 1, 3: 2}]


class QuadrantOracle(nn.Module):
    """Detects an object of class c in a quadrant when the quadrant's evidence exceeds 0.5:
    class 0 from rgb channel 0, class 1 from thermal channel 1, class 2 from the product of rgb
    and thermal channel 2. Removing (zeroing) a modality removes exactly its classes."""

    task = "detection"
    modalities = ("rgb", "thermal")
    num_classes = 3

    def forward(self, inputs, missing=()):
        rgb, th = inputs["rgb"], inputs["thermal"]
        out = []
        for i in range(rgb.shape[0]):
            boxes, scores, labels = [], [], []
            for x1, y1, x2, y2 in _QUADS:
                r = rgb[i, :, y1:y2, x1:x2].mean((1, 2))
                t = th[i, :, y1:y2, x1:x2].mean((1, 2))
                for c, s in enumerate((r[0], t[1], r[2] * t[2])):
                    if s > 0.5:
                        boxes.append(torch.tensor([x1, y1, x2, y2], dtype=torch.float32))
                        scores.append(s)
                        labels.append(c)
            out.append({"boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
                        "scores": torch.stack(scores) if scores else torch.zeros(0),
                        "labels": torch.tensor(labels, dtype=torch.long)})
        return out


def _oracle_batch():
    rgb, th = torch.zeros(4, 3, *SIZE), torch.zeros(4, 3, *SIZE)
    boxes, labels = [], []
    for i, scene in enumerate(_SCENES):
        b, lab = [], []
        for q, c in scene.items():
            x1, y1, x2, y2 = _QUADS[q]
            if c in (0, 2):
                rgb[i, c, y1:y2, x1:x2] = 1
            if c in (1, 2):
                th[i, c, y1:y2, x1:x2] = 1
            b.append([x1, y1, x2, y2])
            lab.append(c)
        boxes.append(torch.tensor(b, dtype=torch.float32))
        labels.append(torch.tensor(lab))
    return {"rgb": rgb, "thermal": th, "boxes": boxes, "labels": labels}


def test_contribution_of_a_known_detector():
    res = modality_contribution(QuadrantOracle(), [_oracle_batch()], policy="zero", seed=0)
    assert res.metric == "AP"
    co = res.coalitions
    assert co["rgb+thermal"]["ap"] == pytest.approx(1.0)
    assert co["rgb"]["ap_per_class"] == pytest.approx([1.0, 0.0, 0.0])
    assert co["thermal"]["ap_per_class"] == pytest.approx([0.0, 1.0, 0.0])
    assert co["none"]["ap"] == pytest.approx(0.0)
    # AP is the mean over classes of the per-class AP (each from its own COCO evaluation)
    for v in co.values():
        assert v["ap"] == pytest.approx(float(np.nanmean(v["ap_per_class"])))
    assert res.shapley == pytest.approx({"rgb": 0.5, "thermal": 0.5})
    assert res.shapley_per_class["rgb"] == pytest.approx([1.0, 0.0, 0.5])
    assert res.shapley_per_class["thermal"] == pytest.approx([0.0, 1.0, 0.5])
    assert res.drop == pytest.approx({"rgb": 2 / 3, "thermal": 2 / 3})
    # a permuted modality lands in the wrong quadrants (every image's objects sit elsewhere)
    assert res.perceptual["thermal"]["drop"] == pytest.approx(2 / 3)
    assert res.perceptual["thermal"]["per_class_drop"] == pytest.approx([0.0, 1.0, 1.0])
    assert res.perceptual["rgb"]["per_class_drop"] == pytest.approx([1.0, 0.0, 1.0])
    assert res.perceptual["rgb"]["normalized"] == pytest.approx(2 / 3)


def test_shapley_efficiency_on_a_trained_detector(trained_sum, dataset):
    r = interpret.run(trained_sum, dataset, metrics=["contribution"], batch_size=4, replicates=REPLICATES)
    c = r.contribution
    assert c["metric"] == "AP" and r.settings["skipped"] == {}
    co = c["coalitions"]
    full, none = co["rgb+thermal"]["ap"], co["none"]["ap"]
    assert full > 0.05  # the game is not trivial
    assert c["shapley"]["rgb"] > 0.01 and c["shapley"]["thermal"] > 0.01
    assert sum(c["shapley"].values()) == pytest.approx(full - none, abs=1e-12)
    per_full = np.asarray(co["rgb+thermal"]["ap_per_class"])
    per_none = np.asarray(co["none"]["ap_per_class"])
    per_sum = np.asarray(c["shapley_per_class"]["rgb"]) + np.asarray(c["shapley_per_class"]["thermal"])
    np.testing.assert_allclose(per_sum, per_full - per_none, atol=1e-12)
    assert math.isnan(per_full[0])  # class 0 (background) never occurs as a box
    assert full == pytest.approx(float(np.nanmean(per_full)))
    assert c["drop"]["thermal"] == pytest.approx(full - co["rgb"]["ap"])
    assert set(c["perceptual"]) == {"rgb", "thermal"}
    assert r.score() == pytest.approx(full) and r.miou() is None


def test_ignored_thermal_has_zero_shapley(trained_sum, dataset):
    model = copy.deepcopy(trained_sum)
    # zero the thermal encoder's first convolution: everything after it is constant in the
    # thermal input, so removing or permuting thermal cannot change a single detection
    stem = next(m for m in model.encoders["thermal"].modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        stem.weight.zero_()
    c = interpret.run(model, dataset, metrics=["contribution"], batch_size=4, replicates=REPLICATES).contribution
    assert c["shapley"]["thermal"] == 0.0
    assert c["drop"]["thermal"] == 0.0
    assert c["perceptual"]["thermal"]["drop"] == 0.0
    assert all(v == 0.0 or math.isnan(v) for v in c["shapley_per_class"]["thermal"])
    assert c["shapley"]["rgb"] > 0.01
    assert c["shapley"]["rgb"] == pytest.approx(c["coalitions"]["rgb+thermal"]["ap"] - c["coalitions"]["none"]["ap"])


# ---------------------------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------------------------
def test_gradcam_per_modality_stream_on_detected_objects(trained_sum, dataset):
    batch = collate([dataset[0], dataset[1]])
    x = {m: batch[m] for m in ("rgb", "thermal")}
    score = DetectionScore()
    taps = ["rgb.stage2", "thermal.stage2", "fused.stage2", "rgb.stage4", "thermal.stage4", "fused.stage4"]
    cams = interpret.grad_cam(trained_sum, x, taps, score_fn=score)
    assert set(cams) == set(taps)
    for t, cam in cams.items():
        assert cam.shape == (2, *SIZE) and torch.isfinite(cam).all(), t
    # one explained detection per image, a confident one
    assert [len(s["scores"]) for s in score.selected] == [1, 1]
    assert all(float(s["scores"][0]) > 0.3 for s in score.selected)
    for t in ("rgb.stage2", "thermal.stage2", "fused.stage2"):
        # min-max scaled on the grid, then upsampled: the peak is near 1 (bilinear need not hit it)
        assert float(cams[t].amax()) > 0.5, f"{t}: no attribution for the detected objects"
    # the default score of a detector is the same DetectionScore
    again = interpret.grad_cam(trained_sum, x, ["rgb.stage2"])
    assert torch.allclose(again["rgb.stage2"], cams["rgb.stage2"])
    # a class that was not detected: nothing to explain, zero maps
    none = interpret.grad_cam(trained_sum, x, ["rgb.stage2"], score_fn=DetectionScore(target_class=0))
    assert (none["rgb.stage2"] == 0).all()
    with pytest.raises(ValueError, match="target_class 9"):
        interpret.grad_cam(trained_sum, x, ["rgb.stage2"], target_class=9)
    with pytest.raises(ValueError, match="region"):
        interpret.grad_cam(trained_sum, x, ["rgb.stage2"], region=torch.ones(2, *SIZE, dtype=torch.bool))


def test_detection_score_reads_every_box_head():
    """Late fusion with WBF: fused scores are floats, so the score comes from the heads."""
    model = _detector("fcos_late_wbf", score_thresh=0.0).eval()
    ds = create_dataset("synthetic_rgbt", split="val", num_samples=2, image_size=SIZE, seed=0)
    batch = collate([ds[0], ds[1]])
    x = {m: batch[m].clone().requires_grad_(True) for m in ("rgb", "thermal")}
    score = DetectionScore(top_k=3)
    with torch.enable_grad(), score.watch(model):
        s = score(model(x))
    assert s.requires_grad and float(s) > 0
    grads = torch.autograd.grad(s, list(x.values()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert [len(d["scores"]) for d in score.selected] == [3, 3]


# ---------------------------------------------------------------------------------------------
# interpret.run on every family
# ---------------------------------------------------------------------------------------------
FAMILY_MODELS = {"early": "fcos_early", "middle": "fcos_cmx", "late": "fcos_late_nms", "hybrid": "fcos_hybrid_wbf"}


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_run_on_every_detection_family(family, dataset):
    name = FAMILY_MODELS[family]
    model = _untrained(name)
    subset = [dataset[i] for i in range(4)]
    r = interpret.run(model, [collate(subset[:2]), collate(subset[2:])], gradcam_images=2,
                      class_names=dataset.classes, replicates=REPLICATES)
    assert r.fusion == family and r.settings["task"] == "detection"
    assert r.settings["skipped"] == {}
    assert r.settings["rows"] == "object" and r.settings["sv_labels"] == "mask"
    c = r.contribution
    assert c["metric"] == "AP" and set(c["shapley"]) == {"rgb", "thermal"}
    assert set(c["coalitions"]) == {"rgb+thermal", "rgb", "thermal", "none"}
    assert len(c["shapley_per_class"]["rgb"]) == 5
    assert sum(c["shapley"].values()) == pytest.approx(c["coalitions"]["rgb+thermal"]["ap"] - c["coalitions"]["none"]["ap"])
    assert r.semantic_variance and all(0.0 <= v["semantic_variance"] <= 1.0 for v in r.semantic_variance.values()
                                       if v["semantic_variance"] is not None and not math.isnan(v["semantic_variance"]))
    assert r.cka_pairs() and r.intervals
    n_boxes = sum(len(s["boxes"]) for s in subset)
    assert r.cka["num_rows"] == n_boxes  # one row per ground-truth object
    assert r.reliance and r.health["effective_rank"]
    streams = {"early": ["fused"], "middle": ["rgb", "thermal", "fused"], "late": ["rgb", "thermal"],
               "hybrid": ["rgb", "thermal", "fused"]}[family]
    cams = r.artifacts["gradcam"]
    assert list(cams) == [f"{s}.stage2" for s in streams]  # deepest stage with >= 8x8 cells at 64x64
    assert all(v.shape == (2, *SIZE) and torch.isfinite(v).all() for v in cams.values())
    assert len(r.artifacts["gradcam_detections"]) == 2
    json.dumps(r.to_json(), allow_nan=False)


def test_run_without_masks_uses_box_masks_and_keeps_row_rules(dataset, tmp_path):
    """Real detection sets (LLVIP, ...) carry boxes but no masks."""
    samples = [{k: v for k, v in dataset[i].items() if k != "mask"} for i in range(4)]
    batches = [collate(samples[:2]), collate(samples[2:])]
    model = _untrained("fcos_late_nms")
    metrics = ["cka", "semantic_variance", "health", "contribution"]
    r = interpret.run(model, batches, metrics=metrics, class_names=dataset.classes, replicates=REPLICATES)
    assert r.settings["sv_labels"] == "boxes" and r.settings["box_background"] == 5
    assert r.settings["skipped"] == {}
    sv = r.semantic_variance["rgb.stage1"]
    assert len(sv["class_counts"]) == 6 and sv["class_counts"][5] > 0  # background is class 5
    assert sv["class_counts"][0] == 0  # synthetic labels are 1..4
    assert r.cka["num_rows"] == sum(len(s["boxes"]) for s in samples)
    assert r.contribution["metric"] == "AP"
    for rows, per_image in (("sample", 3), ("pool", 1)):
        rr = interpret.run(model, batches, metrics=["cka"], rows=rows, samples_per_image=3)
        assert rr.settings["rows"] == rows and rr.cka["num_rows"] == 4 * per_image
    # the single-run report labels contribution in AP
    files = interpret.write_report(r, tmp_path)
    page = files["report"].read_text()
    assert "Modality contribution (AP points, removal policy" in page and "AP50 (%)" in page
    cmp = interpret.compare([r])
    assert cmp.metric == {"fcos_late_nms": "AP"} and cmp.score["fcos_late_nms"] == r.score()


def test_run_errors_on_detection_data():
    model = _detector("fcos_early")
    ds = create_dataset("synthetic_rgbt", split="val", num_samples=2, image_size=SIZE, seed=0)
    batch = collate([ds[0], ds[1]])
    no_boxes = {k: v for k, v in batch.items() if k not in ("boxes", "labels")}
    with pytest.raises(KeyError, match="rows='object' needs ground-truth boxes"):
        interpret.run(model, [no_boxes], metrics=["cka"])
    # without boxes the contribution cannot be scored: said so, not silently empty
    r = interpret.run(model, [no_boxes], metrics=["cka", "contribution"], rows="pool", replicates=REPLICATES)
    assert r.contribution is None and "contribution" in r.settings["skipped"]
    bad = dict(batch, labels=[torch.tensor([7] * len(b)) for b in batch["boxes"]])
    with pytest.raises(ValueError, match="outside"):
        interpret.run(model, [bad], metrics=["contribution"])
    with pytest.raises(ValueError, match="rows must be"):
        interpret.run(model, [batch], rows="boxes")


def test_comparison_of_detectors_is_in_ap(dataset, tmp_path):
    from fusionzoo.interpret.report import write_comparison

    batches = [collate([dataset[i] for i in range(2)])]
    results = [interpret.run(_untrained(n), batches, metrics=["cka", "contribution"],
                             class_names=dataset.classes, replicates=REPLICATES) for n in ("fcos_early", "fcos_late_nms")]
    files = write_comparison(results, tmp_path)
    md = files["markdown"].read_text()
    assert "| model | fusion | AP (%) |" in md and "mIoU" not in md
    assert "### Shapley value of class AP per modality (AP points)" in md
    assert files["cmp_contribution"].is_file()
