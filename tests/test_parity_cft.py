"""cft_yolov5l / cft_yolov5s equal the CFT authors' two-stream YOLOv5 (DocF/multispectral-object-detection).

The fixture (tools/parity/cft.py) holds the authors' key/shape lists (reduced config and full
sizes), the seeds, their float64 outputs (eval decoded and raw predictions, NMS boxes at test.py's
settings, train-mode raw predictions, the loss on fixed targets) and their parameter counts; here
the same authors'-format state dict is rebuilt by the shared rule, converted and run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fusionzoo as fz
from fusionzoo.detection.published.yolov5 import non_max_suppression
from fusionzoo.models.convert import ConversionError, convert_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from seeded import (
    assert_parity,
    calibrate_batchnorm,
    read_fixture,
    relative_error,
    seeded_inputs,
    seeded_state_dict,
)

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "cft"
LEVELS = ("p3", "p4", "p5")
# The authors' ComputeLoss accumulates box/obj/cls in float32 accumulators (torch.zeros(1)) even in
# a float64 run, so their losses carry float32 rounding (2**-24 relative per step).
LOSS_RTOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def authors_state(meta, model):
    """The fixture's authors'-format state dict; Detect's anchor buffers are the config's anchors,
    taken from ours (so a wrong anchor of ours shows in the outputs, not here)."""
    own = {k.rsplit(".", 1)[-1]: v for k, v in model.head.state_dict().items() if k in meta["anchor_buffers"]}
    state = seeded_state_dict(meta["keys"], meta["state_seed"])
    return {k: own[k.rsplit(".", 1)[-1]].clone() if k.rsplit(".", 1)[-1] in own else v for k, v in state.items()}


def reduced_model(meta):
    return fz.create_model("cft_yolov5l", num_classes=meta["num_classes"])


def train_without_dropout(model):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()


@pytest.fixture(scope="module")
def case(one_thread):
    meta, outputs = read_fixture(FIXTURE)
    from fusionzoo.detection.published.cft import CFT

    model = CFT(num_classes=meta["num_classes"], depth_multiple=meta["depth_multiple"], width_multiple=meta["width_multiple"])
    model.load_state_dict(convert_state_dict("cft_yolov5l", authors_state(meta, model), model))
    model.double()
    xs = {k: v.double() for k, v in seeded_inputs(meta["inputs"], meta["input_seed"]).items()}
    # BatchNorm statistics := those of the calibration inputs, as the fixture script does
    calib = {k: v.double() for k, v in seeded_inputs(meta["inputs"], meta["calibration_seed"]).items()}
    calibrate_batchnorm(model, lambda: (train_without_dropout(model), model.raw_head_outputs(calib)))
    ours = {}
    model.eval()
    with torch.no_grad():
        raw = model.raw_head_outputs(xs)
        ours.update({f"eval.{lv}": raw[f"fused.{lv}"] for lv in LEVELS})
        ours["eval.decoded"] = model.head.decode(list(raw.values()))
        for i, det in enumerate(non_max_suppression(ours["eval.decoded"], meta["nms"]["conf_thres"],
                                                    meta["nms"]["iou_thres"], multi_label=meta["nms"]["multi_label"])):
            ours[f"nms.{i}"] = det
        detections = model(xs)
        train_without_dropout(model)
        raw = model.raw_head_outputs(xs)
        ours.update({f"train.{lv}": raw[f"fused.{lv}"] for lv in LEVELS})
        targets = [{"boxes": torch.tensor(t["boxes"]), "labels": torch.tensor(t["labels"])} for t in meta["targets"]]
        losses = model(xs, targets)
    return meta, outputs, ours, detections, losses


def test_fixture_is_from_the_registered_commit(case):
    meta = case[0]
    entry = fz.model_entry("cft_yolov5l")
    assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)


@pytest.mark.parametrize("output", ["eval.decoded", "eval.p3", "eval.p4", "eval.p5", "train.p3", "train.p4", "train.p5",
                                    "nms.0", "nms.1"])
def test_predictions_equal_the_authors(case, output):
    """Raw and decoded predictions before NMS, and the boxes after NMS (test.py's settings), in
    float64; bound: ``seeded.tolerance`` of the reference's own float32 drift."""
    meta, outputs, ours, _, _ = case
    assert_parity({output: ours[output]}, {output: outputs[output]}, meta["float32_drift"])


def test_eval_output_is_the_clipped_nms(case):
    """model(inputs) in eval: the NMS rows, boxes clipped to the image (test.py's scale_coords)."""
    meta, outputs, _, detections, _ = case
    h, w = meta["inputs"]["rgb"][-2:]
    for i, det in enumerate(detections):
        ref = outputs[f"nms.{i}"]
        clipped = torch.stack((ref[:, 0].clamp(0, w), ref[:, 1].clamp(0, h), ref[:, 2].clamp(0, w), ref[:, 3].clamp(0, h)), 1)
        assert relative_error(det["boxes"], clipped) <= 1e-10
        assert relative_error(det["scores"], ref[:, 4]) <= 1e-10
        assert torch.equal(det["labels"], ref[:, 5].long())


@pytest.mark.parametrize("loss", ["box", "obj", "cls"])
def test_loss_equals_the_authors(case, loss):
    """YOLOv5's loss (build_targets, CIoU, objectness, classes) on the fixture's targets, times the batch."""
    _, outputs, _, _, losses = case
    assert relative_error(losses[loss].reshape(1), outputs[f"loss.{loss}"].double()) <= LOSS_RTOL


@pytest.mark.parametrize("variant", ["yolov5l", "yolov5s"])
def test_parameter_count_and_full_size_keys_equal_the_authors(variant):
    """Full size on the meta device: every authors' parameter count, and their full key/shape
    list converts strictly (every tensor used, none of ours missing, shapes equal)."""
    meta, _ = read_fixture(FIXTURE)
    name = f"cft_{variant}"
    for classes, theirs in meta["authors_params"][variant].items():
        with torch.device("meta"):
            model = fz.create_model(name, num_classes=int(classes))
        assert sum(p.numel() for p in model.parameters()) == theirs, classes
    keys = meta["full_keys"][variant]
    classes = int(next(iter(meta["authors_params"][variant])))
    with torch.device("meta"):
        model = fz.create_model(name, num_classes=classes)
        authors = {k: torch.empty(shape) for k, shape, _ in keys}
    converted = convert_state_dict(name, authors, model)
    assert len(converted) == len(keys) == len(model.state_dict())


def test_converter_names_a_foreign_key():
    meta, _ = read_fixture(FIXTURE)
    with torch.device("meta"):
        model = fz.create_model("cft_yolov5l", num_classes=3)
        authors = {k: torch.empty(shape) for k, shape, _ in meta["full_keys"]["yolov5l"]}
        authors["model.47.m.0.weight"] = torch.empty(1)
    with pytest.raises(ConversionError, match="model.47.m.0.weight"):
        convert_state_dict("cft_yolov5l", authors, model)


def test_four_stage_config_converts_with_fusion_stages():
    """The four-stage configs (yolov5l_fusion_transformer_*.yaml) put a GPT after stage1 too:
    their layer indices shift (Detect is layer 49), which the converter follows from fusion_stages."""
    from fusionzoo.detection.published.cft import authors_layer_paths

    four = authors_layer_paths(("rgb", "thermal"), ("stage1", "stage2", "stage3", "stage4"))
    three = authors_layer_paths(("rgb", "thermal"), ("stage2", "stage3", "stage4"))
    assert (len(three), len(four)) == (47, 50)
    assert four[6] == "fusions.stage1" and four[49] == "head" and three[10] == "fusions.stage2" and three[46] == "head"
    assert four[23:26] == ["encoders.rgb.stage4.0", "encoders.rgb.stage4.1", "encoders.rgb.stage4.2"]
