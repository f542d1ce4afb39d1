"""mlpd_vgg16 equals the MLPD reference code (sejong-rcv/MLPD-Multi-Label-Pedestrian-Detection) with
mapped weights: raw head outputs (eval and train mode), the prior boxes, the post-processed boxes of
their evaluation, and the training loss on fixed targets (an ignore box and all three visibility codes).

The fixture (tools/parity/mlpd.py) holds the reference's key/shape list, the seeds and its float64
outputs; here the same authors'-format state dict is rebuilt by the shared rule, converted, and run.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

import fusionzoo as fz
from fusionzoo.cli import main as cli_main
from fusionzoo.detection.published.mlpd import mlpd_priors
from fusionzoo.models.convert import convert_state_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from parity_helpers import converted_model
from seeded import assert_parity, authors_state_dict, read_fixture, seeded_inputs

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "mlpd"
NAME = "mlpd_vgg16"
# The reference's create_prior_boxes fmap_dims at 512x640, as (h, w) per level conv4_3 .. conv10.
REFERENCE_LEVELS = [(64, 80), (32, 40), (16, 20), (8, 10), (8, 10), (8, 10)]
LEVELS_64x80 = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 2), (1, 2)]  # the fixture's input (ceil-mode pooling)


def our_targets(meta: dict) -> list[dict[str, torch.Tensor]]:
    """The fixture's targets in our convention: pixels, class 0, visibility code, ignore flag."""
    out = []
    for image in meta["targets"]:
        codes = torch.tensor([t["code"] for t in image])
        out.append({"boxes": torch.tensor([t["box"] for t in image], dtype=torch.float64),
                    "labels": torch.zeros(len(image), dtype=torch.long),
                    "visibility": codes.clamp(min=1), "ignore": codes < 0})
    return out


@pytest.fixture(scope="module")
def case():
    meta, outputs = read_fixture(FIXTURE)
    model = converted_model(NAME, meta).double()
    xs = {k: v.double() for k, v in seeded_inputs(meta["inputs"], meta["input_seed"]).items()}
    height, width = meta["inputs"]["rgb"][-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    ours = {}
    with torch.no_grad():
        model.eval()
        raw = model.raw_head_outputs(xs)
        ours.update({"eval.locs": raw["fused.bbox_regression"], "eval.scores": raw["fused.cls_logits"]})
        priors = mlpd_priors(LEVELS_64x80, (height, width), torch.float64)
        assert priors.shape[0] == raw["fused.bbox_regression"].shape[1]
        ours["priors"] = priors
        dets = model.postprocess(raw["fused.bbox_regression"], raw["fused.cls_logits"], priors, (height, width))
        ours["det.boxes"] = torch.cat([d["boxes"] for d in dets]) / scale
        ours["det.scores"] = torch.cat([d["scores"] for d in dets])
        ours["det.counts"] = torch.tensor([float(len(d["boxes"])) for d in dets], dtype=torch.float64)
        model.train()
        raw = model.raw_head_outputs(xs)
        ours.update({"train.locs": raw["fused.bbox_regression"], "train.scores": raw["fused.cls_logits"]})
    losses = model(xs, our_targets(meta))  # train mode: the whole call, targets checked and normalized
    ours.update({f"loss.{k}": v.detach() for k, v in losses.items()})
    ours["loss.total"] = sum(ours[f"loss.{k}"] for k in losses)
    return meta, outputs, ours, dets


def test_fixture_is_from_the_registered_commit(case):
    meta = case[0]
    entry = fz.model_entry(NAME)
    assert (meta["reference_repo"], meta["reference_commit"]) == (entry.reference_repo, entry.reference_commit)
    assert entry.published and entry.task == "detection" and entry.fusion == "middle"


@pytest.mark.parametrize("group", ["priors", "eval", "train", "det", "loss"])
def test_outputs_equal_the_reference(case, group):
    """float64 on both sides; relative error bounded by ``seeded.tolerance`` of the reference's own
    float32 drift (recorded in the fixture), so the bound holds on any CPU (issue 22)."""
    meta, outputs, ours, _ = case
    golden = {k: v for k, v in outputs.items() if k.split(".")[0] == group}
    assert golden
    assert_parity({k: ours[k] for k in golden}, golden, meta["float32_drift"])


def test_detections_follow_the_detection_convention(case):
    *_, dets = case
    for d in dets:
        n = d["boxes"].shape[0]
        assert 0 < n <= 200 and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        assert d["labels"].dtype == torch.long and (d["labels"] == 0).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and (d["scores"] > 0.1).all()


def test_priors_at_512x640_are_the_references_bit_for_bit():
    meta, _ = read_fixture(FIXTURE)
    priors = mlpd_priors(REFERENCE_LEVELS, (512, 640))
    assert priors.dtype == torch.float32 and priors.shape[0] == meta["priors_512x640"]["count"] == 41760
    assert hashlib.sha256(priors.numpy().tobytes()).hexdigest() == meta["priors_512x640"]["sha256_float32"]


def test_parameter_count_equals_the_reference():
    meta, _ = read_fixture(FIXTURE)
    for classes, theirs in meta["authors_params"].items():
        with torch.device("meta"):
            model = fz.create_model(NAME, num_classes=int(classes))
        assert sum(p.numel() for p in model.parameters()) == theirs == 59_712_764


def test_converter_is_strict():
    meta, _ = read_fixture(FIXTURE)
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=meta["num_classes"])
    authors = {k: torch.empty(shape, device="meta") for k, shape, _ in meta["keys"]}
    assert set(convert_state_dict(NAME, authors, model)) == set(model.state_dict())
    with pytest.raises(fz.ConversionError, match="base.extra_conv.weight"):
        convert_state_dict(NAME, {**authors, "base.extra_conv.weight": torch.empty(1, device="meta")}, model)
    del authors["base.feat_6_bn.running_var"]
    with pytest.raises(fz.ConversionError, match="fusions.conv10.bn.running_var"):
        convert_state_dict(NAME, authors, model)


def test_convert_command_then_pretrained_tag(tmp_path, monkeypatch):
    """``fusionzoo convert mlpd_vgg16 FILE --tag kaist`` on an authors'-format checkpoint (their keys,
    DataParallel's ``module.`` prefix, under ``"model"``), then ``create_model(pretrained="kaist")``."""
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path / "cache"))
    meta, _ = read_fixture(FIXTURE)
    authors = authors_state_dict(meta)
    path = tmp_path / "best_checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in authors.items()}}, path)
    assert cli_main(["convert", NAME, str(path), "--tag", "kaist"]) == 0
    model = fz.create_model(NAME, pretrained="kaist")
    assert not model.training and model.pretrained_cfg["normalization"]["thermal"]["mean"] == [0.1598]
    assert torch.equal(model.state_dict()["encoders.thermal.conv1_1.conv.weight"], authors["base.conv1_1_lwir.weight"])
    assert torch.equal(model.state_dict()["cls_head.conv10.bias"], authors["pred_convs.cl_conv10.bias"])
