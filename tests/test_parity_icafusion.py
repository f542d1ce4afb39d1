"""icafusion_yolov5* equal the authors' ICAFusion (chanchanchan97/ICAFusion, ``models/yolo_test.py``).

The fixture (``tools/parity/icafusion.py``) holds the authors' key/shape lists (the full yolov5l and
the reduced network its outputs come from), the seeds, the tensors the fill rule leaves alone, and
their float64 outputs: raw head maps and decoded predictions in eval mode, their NMS boxes, raw
maps in train mode and their ``ComputeLoss`` on fixed targets. Here the same authors'-format state
dict is rebuilt, converted with ``fusionzoo.convert_state_dict`` and run in float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fusionzoo as fz
from fusionzoo.cli import main as cli_main
from fusionzoo.detection.published.icafusion import ICAFusion
from fusionzoo.detection.published.yolov5 import YOLOv5Loss, non_max_suppression
from fusionzoo.models.convert import ConversionError, convert_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from icafusion import authors_state, targets_tensor
from seeded import assert_parity, read_fixture, seeded_inputs, seeded_state_dict, seeded_tensor

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "icafusion"
NAME = "icafusion_yolov5l"


@pytest.fixture(scope="module")
def fixture():
    return read_fixture(FIXTURE)


def reduced_model(meta) -> nn.Module:
    """The fixture's reduced network (our ICAFusion at its multiples and grids), converted weights, float64."""
    model = ICAFusion(
        num_classes=meta["num_classes"], depth_multiple=meta["depth_multiple"], width_multiple=meta["width_multiple"],
        fusion_grids=meta["fusion_grids"])
    model.load_state_dict(convert_state_dict(NAME, authors_state(meta), model))
    return model.double()


def our_outputs(meta):
    """Our outputs, computed as the script computed theirs: (fixture outputs, loss dict, eval detections, model)."""
    model = reduced_model(meta)
    xs = {k: v.double() for k, v in seeded_inputs(meta["inputs"], meta["input_seed"]).items()}
    out = {}
    model.eval()
    with torch.no_grad():
        raw = model.raw_predictions(xs)
        decoded = model.head.decode(raw)
        out["eval.decoded"] = decoded
        out.update({f"eval.raw{i}": r for i, r in enumerate(raw)})
        nms = meta["nms"]
        for b, boxes in enumerate(non_max_suppression(decoded, nms["conf_thres"], nms["iou_thres"],
                                                      multi_label=nms["multi_label"], max_det=nms["max_det"])):
            out[f"eval.boxes{b}"] = boxes
        detections = model(xs)  # the call convention: clipped boxes, scores, labels
        for m in model.modules():  # train mode without dropout, as the fixture
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        model.train()
        raw = model.raw_predictions(xs)
        out.update({f"train.raw{i}": r for i, r in enumerate(raw)})
        losses = YOLOv5Loss(model.num_classes, model.head.anchors, model.loss_config)(raw, targets_tensor(torch.float64))
    return out, losses, detections, model


@pytest.fixture(scope="module")
def ours(fixture):
    return our_outputs(fixture[0])


def test_fixture_is_from_the_registered_commit(fixture):
    meta, _ = fixture
    entry = fz.model_entry(NAME)
    assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)


def test_raw_decoded_and_nms_outputs_equal_the_reference(fixture, ours):
    """float64 both sides; relative error within ``seeded.tolerance`` of the reference's float32 drift."""
    meta, golden = fixture
    computed = ours[0]
    assert set(golden) - {"train.loss", "train.loss_items"} == set(computed)
    assert_parity(computed, {k: golden[k] for k in computed}, meta["float32_drift"])


def test_eval_call_returns_the_reference_boxes_clipped(fixture, ours):
    meta, golden = fixture
    size = meta["inputs"]["rgb"][-1]
    for b, det in enumerate(ours[2]):
        ref = golden[f"eval.boxes{b}"]
        torch.testing.assert_close(det["boxes"], ref[:, :4].clamp(0, size), rtol=1e-10, atol=1e-10 * size)
        torch.testing.assert_close(det["scores"], ref[:, 4], rtol=1e-10, atol=1e-12)
        assert torch.equal(det["labels"], ref[:, 5].long())


def test_loss_equals_the_reference(fixture, ours):
    """Our loss dict ``{box, obj, cls}`` (each times the batch) against their ``ComputeLoss``:
    ``loss * bs`` and the items ``(box, obj, cls, ranking)``; objectness targets in IoU order."""
    meta, golden = fixture
    losses = ours[1]
    batch = meta["inputs"]["rgb"][0]
    items = torch.stack([losses["box"], losses["obj"], losses["cls"]]) / batch
    assert golden["train.loss_items"][3] == 0  # their ranking term is switched off
    assert_parity({"train.loss": sum(losses.values()).reshape(1), "train.loss_items": torch.cat([items, items.new_zeros(1)])},
                  {k: golden[k] for k in ("train.loss", "train.loss_items")}, meta["float32_drift"])
    assert ours[3].loss_config.sort_obj_iou


def test_loss_config_is_the_authors_hyp(fixture, ours):
    meta, _ = fixture
    scaled = ours[3].loss_config.scaled(3, meta["num_classes"])
    for key in ("box", "cls", "obj", "cls_pw", "obj_pw", "anchor_t", "fl_gamma", "label_smoothing"):
        assert getattr(scaled, key) == pytest.approx(meta["hyp"][key], rel=1e-12), key
    assert scaled.gr == meta["gr"]


def test_parameter_counts_equal_the_authors(fixture):
    meta, _ = fixture
    for variant, counts in meta["authors_params"].items():
        for classes, theirs in counts.items():
            with torch.device("meta"):
                model = fz.create_model(f"icafusion_{variant}", num_classes=int(classes))
            assert sum(p.numel() for p in model.parameters()) == theirs, (variant, classes)


def test_full_size_key_list_converts_one_to_one(fixture):
    """Every key of the authors' yolov5l (FLIR, 3 classes) maps onto ours with its shape."""
    meta, _ = fixture
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=3)
    authors = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in meta["full_keys"]}
    ours = convert_state_dict(NAME, authors, model)
    assert set(ours) == set(model.state_dict())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.rsplit(".", 2)[-2] in ("ln_input", "ln_output", "LN1") or ".mlp." in n for n in frozen)


def test_converter_names_a_foreign_key(fixture):
    meta, _ = fixture
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=3)
    authors = {k: torch.empty(shape, device="meta") for k, shape, _ in meta["full_keys"]}
    authors["model.38.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ConversionError, match="model.38.extra.weight"):
        convert_state_dict(NAME, authors, model)


def test_fusionzoo_convert_cli_on_the_nano_key_list(fixture, tmp_path, capsys):
    """``fusionzoo convert icafusion_yolov5n FILE --out DIR`` on an authors'-format checkpoint made from
    the fixture's yolov5n key list (1 class, half precision as their ``best.pt``), then
    ``fz.from_pretrained(DIR)``: every tensor arrives, cast to float32; without a class count the
    command says to pass one."""
    meta, _ = fixture
    keys = meta["yolov5n_1_class_keys"]
    state = {k: v.half() if v.is_floating_point() else v for k, v in seeded_state_dict(keys, 0).items()}
    checkpoint = tmp_path / "best.safetensors"
    save_file(state, str(checkpoint))
    assert cli_main(["convert", "icafusion_yolov5n", str(checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "num_classes" in capsys.readouterr().err
    assert cli_main(["convert", "icafusion_yolov5n", str(checkpoint), "--out", str(tmp_path / "o"), "--num-classes", "1"]) == 0
    model = fz.from_pretrained(tmp_path / "o")
    ours = model.state_dict()
    mapped = convert_state_dict("icafusion_yolov5n", state, model)
    assert set(mapped) == set(ours)
    assert all(torch.equal(ours[k], v.to(ours[k].dtype)) for k, v in mapped.items())
    assert torch.equal(ours["fusions.stage4.conv1x1_out.conv.weight"], state["model.22.conv1x1_out.conv.weight"].float())


@pytest.mark.slow  # builds yolov5l twice and writes 0.5 GB: ~15 s on 2 idle cores
def test_fusionzoo_convert_and_pretrained_tag(fixture, tmp_path, monkeypatch, capsys):
    """``fusionzoo convert`` of an authors'-format yolov5l checkpoint made from the fixture's full key
    list (half precision, as their ``best.pt`` stores the model; zeros but for two rule-filled
    tensors, to keep the test quick), then ``create_model(..., pretrained=TAG)`` loads it."""
    meta, _ = fixture
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path / "cache"))
    reduced = tmp_path / "reduced.safetensors"
    save_file(authors_state(meta), str(reduced))
    # the reduced network's checkpoint does not fit the registered yolov5l: refused, naming a key
    assert cli_main(["convert", NAME, str(reduced), "--out", str(tmp_path / "o"), "--num-classes", "3"]) == 2
    assert "which no authors' key provides" in capsys.readouterr().err
    checked = ("model.20.crosstransformer.0.crossatt.que_proj_vis.weight", "model.37.m.2.weight")
    full = {k: torch.zeros(shape, dtype=torch.float16 if dtype == "float32" else getattr(torch, dtype))
            for k, shape, dtype in meta["full_keys"]}
    full.update({k: seeded_tensor(k, full[k].shape, "float32", 0).half() for k in checked})
    checkpoint = tmp_path / "best.safetensors"
    save_file(full, str(checkpoint))
    del full
    assert cli_main(["convert", NAME, str(checkpoint), "--tag", "flir_aligned"]) == 0
    model = fz.create_model(NAME, pretrained="flir_aligned")
    state = model.state_dict()
    for key, ours in zip(checked, ("fusions.stage2.crosstransformer.0.crossatt.que_proj_vis.weight", "head.m.2.weight")):
        assert torch.equal(state[ours], seeded_tensor(key, state[ours].shape, "float32", 0).half().float())
    assert model.pretrained_cfg["class_names"] == ["person", "car", "bicycle"]
    assert not model.training
