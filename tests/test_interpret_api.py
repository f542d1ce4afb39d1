"""fusionzoo.interpret.run / compare: known structural answers, JSON round trip, and a
registry-driven check that every registered model runs through every metric on tiny inputs."""

import json
import math
import warnings

import pytest
import torch

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.data import collate, create_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
# Bootstrap replicates of the sweeps below: every interval is still computed (and must serialize),
# in a tenth of the default 200's time; the intervals' statistics are tested in test_interpret_intervals.py.
REPLICATES = 20


@pytest.fixture(scope="module")
def tiny_batch():
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=2, image_size=(32, 32), seed=0)
    return collate([ds[0], ds[1]]), ds.num_classes, list(ds.classes)


@pytest.fixture(scope="module")
def late_result(tiny_batch):
    batch, k, names = tiny_batch
    torch.manual_seed(0)
    model = fz.create_model("late_mean", encoder="resnet10t", num_classes=k)
    return interpret.run(model, [batch, batch], class_names=names, samples_per_image=4)


def test_late_fusion_structure_is_recovered(late_result):
    r = late_result
    assert r.model == "late_mean" and r.fusion == "late" and r.num_images == 4
    # a late model's rgb branch never sees depth: removing depth leaves rgb taps unchanged
    for stage in ("stage1", "stage2", "stage3", "stage4"):
        assert r.reliance[f"rgb.{stage}"]["depth"] == pytest.approx(0.0, abs=1e-9)
        assert r.reliance[f"depth.{stage}"]["rgb"] == pytest.approx(0.0, abs=1e-9)
        assert r.reliance[f"rgb.{stage}"]["rgb"] > 0.05
    kinds = {p["kind"] for p in r.cka_pairs()}
    assert kinds == {"cross_modal", "within", "to_final"}  # no fused stream in late fusion
    # no decoder.out in late fusion: the stages evolve towards the final logits
    assert {(p["a"], p["b"]) for p in r.cka_pairs("to_final")} == {
        (f"{m}.stage{i}", "head.logits") for m in ("rgb", "depth") for i in range(1, 5)}
    assert len(r.cka_pairs("cross_modal")) == 4
    assert set(r.semantic_variance) >= {"rgb.stage1", "depth.head", "head.logits"}
    for v in r.semantic_variance.values():
        assert 0.0 <= v["semantic_variance"] <= 1.0
    sh = r.contribution["shapley"]
    co = r.contribution["coalitions"]
    assert sh["rgb"] + sh["depth"] == pytest.approx(co["rgb+depth"]["miou"] - co["none"]["miou"])
    # Grad-CAM on the deepest stage with >= 8x8 cells: stage 1 (stride 4) at 32x32
    assert set(r.artifacts["gradcam"]) == {"rgb.stage1", "depth.stage1"}
    assert r.settings["gradcam"] == {"taps": ["rgb.stage1", "depth.stage1"], "input_size": [32, 32],
                                     "min_grid_cells": 8}
    assert r.artifacts["gradcam"]["rgb.stage1"].shape == (2, 32, 32)


def test_json_round_trip_and_compare(late_result, tmp_path):
    path = late_result.save(tmp_path / "metrics.json")
    data = json.loads(path.read_text())  # strict JSON (NaN written as null)
    back = interpret.load_result(tmp_path)
    assert back.to_json() == data
    assert back.miou() == pytest.approx(late_result.miou())
    cmp = interpret.compare([late_result, back])
    assert cmp.models == ["late_mean", "late_mean#2"]
    assert cmp.stages == ["stage1", "stage2", "stage3", "stage4"]
    assert cmp.cka_cross_modal["late_mean"] == cmp.cka_cross_modal["late_mean#2"]
    assert cmp.reliance["late_mean"]["head.logits"]["rgb"] > 0
    json.dumps(cmp.to_json(), allow_nan=False)
    with pytest.raises(ValueError, match="unknown keys"):
        interpret.InterpretResult.from_json({**data, "bogus": 1})


def test_bad_arguments(tiny_batch):
    batch, k, _ = tiny_batch
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=k)
    with pytest.raises(ValueError, match="unknown metric"):
        interpret.run(model, [batch], metrics=["cka", "vibes"])
    with pytest.raises(KeyError, match="matches no tap"):
        interpret.run(model, [batch], taps="rgb.*")
    with pytest.raises(KeyError, match="lacks modalities"):
        interpret.run(model, [{"rgb": batch["rgb"], "mask": batch["mask"]}])


_RGBT_BATCH = None


def _batch_for(model, rgbd_batch):
    """The tiny RGB-D batch, or an RGB-T one for models on thermal; a one-channel modality is
    repeated to the channels the model's stream takes (a published entry's 3-channel HHA depth,
    or the authors' 3-channel thermal of CFT and ICAFusion)."""
    global _RGBT_BATCH
    batch = rgbd_batch
    if "thermal" in model.modalities:
        if _RGBT_BATCH is None:
            ds = create_dataset("synthetic_rgbt", split="val", num_samples=2, image_size=(32, 32), seed=0)
            _RGBT_BATCH = collate([ds[0], ds[1]])
        batch = _RGBT_BATCH
    wants = getattr(model, "in_chans", {})
    return {k: (v.expand(-1, wants[k], -1, -1) if k in wants and v.shape[1] == 1 and wants[k] > 1 else v)
            for k, v in batch.items()}


def _check_runs(model, batch):
    batch = _batch_for(model, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = interpret.run(model, [batch], samples_per_image=4, gradcam_images=1, replicates=REPLICATES)
    info = model.tap_info()
    assert r.num_images == 2 and r.intervals  # every measured section with its bootstrap intervals
    assert set(r.semantic_variance) == {n for n, t in info.items() if t.kind in ("feature", "logits") and t.reduction > 0}
    # a tap's effective rank is finite, or undefined (constant features, e.g. a detector's 1x1 p7
    # logits at 32x32 input) and then named in a warning
    said = " ".join(str(w.message) for w in caught if "effective rank is undefined" in str(w.message))
    assert all(math.isfinite(v) or repr(n) in said for n, v in r.health["effective_rank"].items())
    fused = any(t.stream == "fused" and t.kind == "feature" for t in info.values())
    per_modality = all(f"{m}.stage1" in info for m in model.modalities)
    assert bool(r.cka_pairs("cross_modal")) == per_modality
    # a modality stream against the fused one wherever both exist (DFormer: a depth stream, RGB only fused)
    some_modality = any(f"{m}.stage1" in info for m in model.modalities)
    assert bool(r.cka_pairs("modality_fused")) == (some_modality and fused)
    if getattr(model, "task", "segmentation") == "segmentation":
        assert set(r.contribution["shapley"]) == set(model.modalities)
        assert "head.logits" in r.reliance
        assert r.artifacts["gradcam"]
    else:  # detectors: contribution in COCO AP, Grad-CAM of the top detection
        assert r.contribution["metric"] == "AP" and set(r.contribution["shapley"]) == set(model.modalities)
        assert r.settings["skipped"] == {} and r.artifacts["gradcam"]
    json.dumps(r.to_json(), allow_nan=False)


FAMILIES = [n for n in fz.list_models() if not fz.model_entry(n).encoder_fixed]


def _sweep_encoder(family: str) -> str:
    """timm's 1.1M-parameter ``test_resnet`` (stage widths 32, 48, 192, 96), half resnet10t's sweep
    time; CMX's attention presets need ResNet stage widths (64 * 2^k), so CMX methods take resnet10t."""
    return "resnet10t" if family.split("_")[-1] == "cmx" else "test_resnet"


def _small_head(name: str) -> dict[str, int]:
    """Detectors' narrowest FPN (64 channels, not 256): their box heads were most of the sweep's
    convolution time; every tap, pass and metric is the same."""
    return {"fpn_channels": 64} if fz.model_entry(name).task == "detection" else {}


@pytest.mark.parametrize("family", FAMILIES)
def test_metrics_run_on_every_fusion_method(family, tiny_batch):
    """Every registered method (family entry) with a tiny encoder: fast, default tier."""
    batch, k, _ = tiny_batch
    torch.manual_seed(0)
    _check_runs(fz.create_model(family, encoder=_sweep_encoder(family), num_classes=k, **_small_head(family)), batch)


@pytest.mark.slow
@pytest.mark.parametrize("name", fz.list_models())
def test_metrics_run_on_every_registered_model(name, tiny_batch):
    """Every registered name as registered (resnet50 / pvt_v2_b2 encoders: minutes on CPU)."""
    batch, k, _ = tiny_batch
    torch.manual_seed(0)
    entry = fz.model_entry(name)
    # Published segmentation entries default to their paper's streams (e.g. RGB + 3-channel HHA):
    # run them on RGB-D (depth repeated to the channels they take, _batch_for); published
    # detectors keep their RGB-T streams.
    kwargs = {"modalities": ("rgb", "depth")} if entry.published and entry.task == "segmentation" else {}
    model = fz.create_model(name, num_classes=k, **kwargs)
    low = getattr(model, "min_input_size", None)
    if low is not None and min(low) > 32:
        pytest.skip(f"{name} takes inputs of at least {low} (its own test_<method>.py interprets it with small grids)")
    _check_runs(model, batch)


@pytest.mark.parametrize("name", ["fcos_early", "fcos_cmx", "retinanet_late_nms", "fcos_hybrid_wbf"])
def test_every_metric_runs_on_detectors(name):
    ds = create_dataset("synthetic_rgbt", split="val", num_samples=2, image_size=(64, 64), seed=0)
    batch = collate([ds[0], ds[1]])
    torch.manual_seed(0)
    model = fz.create_model(name, encoder="resnet10t", num_classes=ds.num_classes - 1, **_small_head(name))
    r = interpret.run(model, ds, batch_size=2, samples_per_image=4, replicates=REPLICATES)
    assert r.settings["task"] == "detection"
    assert r.settings["skipped"] == {} and r.contribution["metric"] == "AP"
    assert r.semantic_variance and r.health and r.reliance and r.cka_pairs() and r.intervals
    assert batch["mask"].max() < ds.num_classes
    json.dumps(r.to_json(), allow_nan=False)


def test_compare_accepts_model_names_with_a_dataset(tiny_batch):
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=2, image_size=(32, 32), seed=0)
    cmp = interpret.compare(["early_concat_resnet18", "late_mean_resnet18"], dataset=ds,
                            metrics=["cka", "contribution"], batch_size=2, samples_per_image=4)
    assert cmp.models == ["early_concat_resnet18", "late_mean_resnet18"]
    assert cmp.fusion == {"early_concat_resnet18": "early", "late_mean_resnet18": "late"}
    assert set(cmp.shapley["late_mean_resnet18"]) == {"rgb", "depth"}
    with pytest.raises(ValueError, match="dataset"):
        interpret.compare(["esanet_resnet18"])
