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
from fusionzoo import encoders
from fusionzoo.cli import main as cli_main
from fusionzoo.detection.published.mlpd import mlpd_loss, mlpd_priors
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
def converted():
    """The converted rule-filled authors' state dict in our model, float64 (shared by every test
    that runs the network: building a 60M-parameter model is the slow part)."""
    meta, outputs = read_fixture(FIXTURE)
    return meta, outputs, converted_model(NAME, meta).double()


@pytest.fixture(scope="module")
def case(converted):
    meta, outputs, model = converted
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
        # The loss of training mode's forward on these outputs: targets checked and normalized as there.
        targets = model.loss_targets(our_targets(meta), 2, (height, width), torch.device("cpu"))
        losses = mlpd_loss(raw["fused.bbox_regression"], raw["fused.cls_logits"], priors, targets, 1)
    ours.update({f"loss.{k}": v for k, v in losses.items()})
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
    with torch.device("meta"):  # what `fusionzoo convert` builds without --tag: K read as 18 filters
        wrong = fz.create_model(NAME, num_classes=18)
    with pytest.raises(fz.ConversionError, match=r"1 \+ 2K with K = 1 .*num_classes=18.*--num-classes 1"):
        convert_state_dict(NAME, authors, wrong)
    del authors["base.feat_6_bn.running_var"]
    with pytest.raises(fz.ConversionError, match="fusions.conv10.bn.running_var"):
        convert_state_dict(NAME, authors, model)


@pytest.mark.slow  # builds the full model twice and writes 240 MB (the converter's mapping is checked above)
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


# -- the detector contract on a small input (the converted model, float64) ---------------------------------------------
@pytest.fixture(scope="module")
def small(converted, case):  # after the parity runs, which need the freshly loaded statistics
    g = torch.Generator().manual_seed(1)
    xs = {"rgb": torch.randn(2, 3, 32, 40, generator=g), "thermal": torch.randn(2, 1, 32, 40, generator=g)}
    return converted[2], {k: v.double() for k, v in xs.items()}


def small_targets() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 2.0, 30.0, 30.0], [22.0, 6.0, 39.0, 30.0]]), "labels": torch.tensor([0, 0]),
             "visibility": torch.tensor([3, 2]), "ignore": torch.tensor([False, True])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]


def test_training_returns_the_loss_dict_and_every_parameter_learns(small):
    model, xs = small
    model.train().zero_grad(set_to_none=True)
    losses = model(xs, small_targets())
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    assert model.head_detections == {}
    sum(losses.values()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead, dead[:5]
    model.zero_grad(set_to_none=True)


def test_eval_detections_taps_and_missing_modality(small):
    model, xs = small
    model.eval()
    info = model.tap_info()
    with torch.no_grad(), fz.capture(model) as acts:
        out = model(xs)
    assert list(acts) == list(info), "taps fire in their declared order"
    for name, value in acts.items():
        side = (-(-32 // info[name].reduction), -(-40 // info[name].reduction))
        assert value.shape[1] == info[name].channels and tuple(value.shape[-2:]) == side, name
    assert [t for t, i in info.items() if i.after_fusion] == [t for t in info if t.startswith(("fused.", "head."))]
    assert model.head_detections == {"fused": out} and len(out) == 2
    assert all(set(d) == {"boxes", "scores", "labels"} for d in out)
    with torch.no_grad():  # one image: eval-mode images are independent
        alone = model({"rgb": xs["rgb"][:1]}, missing=("thermal",))
        zeros = model({"rgb": xs["rgb"][:1], "thermal": torch.zeros_like(xs["thermal"][:1])})
    assert all(torch.equal(a["boxes"], z["boxes"]) for a, z in zip(alone, zeros))  # the missing policy: zeros


def test_bad_inputs_and_targets_name_the_problem(small):
    model, xs = small
    model.train()
    with pytest.raises(ValueError, match=r"thermal.*\(2, 3, 32, 40\).*\(B, 1, H, W\)"):
        model({**xs, "thermal": torch.randn(2, 3, 32, 40, dtype=torch.float64)}, small_targets())
    with pytest.raises(ValueError, match="needs targets"):
        model(xs)
    bad = small_targets()
    bad[0]["visibility"] = torch.tensor([3, 4])
    with pytest.raises(ValueError, match=r"targets\[0\]\['visibility'\].*1 \(RGB only\), 2 \(thermal only\) or 3"):
        model(xs, bad)
    bad = small_targets()
    bad[0]["ignore"] = torch.tensor([True])
    with pytest.raises(ValueError, match=r"targets\[0\]\['ignore'\] has shape \(1,\); expected \(2,\)"):
        model(xs, bad)


def test_several_classes_score_and_suppress_per_class():
    """K = 2: outputs [background, RGB, thermal of class 0, RGB, thermal of class 1]; a class's score
    is the mean of its two sigmoids, and NMS suppresses within a class only."""
    with torch.device("meta"):
        model = fz.create_model(NAME, num_classes=2)
    assert model.cls_head["conv4_3"].out_channels == 6 * 5
    # Priors 0 and 1 overlap (IoU 0.82 > 0.425); prior 2 is background.
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.52, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1]], dtype=torch.float64)
    probs = torch.tensor([[0.1, 0.7, 0.7, 0.05, 0.05], [0.1, 0.5, 0.5, 0.6, 0.7], [0.9, 0.01, 0.01, 0.01, 0.01]],
                         dtype=torch.float64)
    (det,) = model.postprocess(torch.zeros(1, 3, 4, dtype=torch.float64), torch.logit(probs)[None], priors, (100, 200))
    assert det["labels"].tolist() == [0, 1] and det["scores"].tolist() == pytest.approx([0.7, 0.65])
    assert det["boxes"][0].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0])  # (cx, cy, w, h) fractions -> xyxy pixels


def test_imagenet_initialisation_follows_the_reference(converted, small, monkeypatch):
    """``pretrained=True`` copies torchvision's VGG-16-BN as ``load_pretrained_layers`` does: conv1-4
    (+ BN) into both streams, channel 0 of the first conv for the 1-channel stream, conv5 into the
    shared layers. A stand-in ``features`` stack replaces the download (runs last: it overwrites
    the shared model's weights)."""
    model = converted[2]
    g = torch.Generator().manual_seed(3)
    layers, cin = [], 3
    for widths in ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)):
        for cout in widths:
            conv, bn = torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout)
            for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.data = torch.rand(t.shape, generator=g)
            layers += [conv, bn, torch.nn.ReLU()]
            cin = cout
    stand_in = torch.nn.Module()
    stand_in.features = torch.nn.Sequential(*layers)
    monkeypatch.setattr(encoders.timm, "create_model", lambda name, pretrained: stand_in)  # pretrained_timm_model
    model.load_imagenet()
    convs, norms = layers[0::3], layers[1::3]
    state = model.state_dict()
    assert torch.equal(state["encoders.rgb.conv1_1.conv.weight"], convs[0].weight.double())
    assert torch.equal(state["encoders.thermal.conv1_1.conv.weight"], convs[0].weight[:, 0:1].double())
    assert torch.equal(state["encoders.thermal.conv4_3.bn.running_var"], norms[9].running_var.double())
    assert torch.equal(state["shared.conv5_1.conv.bias"], convs[10].bias.double())
    assert torch.equal(state["shared.conv5_3.bn.weight"], norms[12].weight.double())
