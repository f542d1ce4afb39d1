"""What the zoo gives every model, for ICAFusion (icafusion_yolov5*): the detection call convention
with the authors' loss, taps (per stream, fused, per head level) with their ``after_fusion``
declarations as observed, capture, missing modality, bad inputs, save / load, train.py with its
interpretation report, and KAIST MR-2 through the detection task.

Published detectors are left out of ``tests/test_detection.py``'s registry sweep (it builds every
model at 64 px); ICAFusion's authors' fusion grids need inputs of 320 px, so these tests build the
lightest entry, ``icafusion_yolov5n``, with ``fusion_grids`` shrunk to the tiny input. Parity with
the authors' code is ``tests/test_parity_icafusion.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import train_script
from test_taps_after_fusion import observed_after_fusion, observed_dependence
from torch import nn
from torch.utils.data import DataLoader

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.data.collate import collate
from fusionzoo.engine.loop import evaluate
from fusionzoo.hub import from_pretrained, save_pretrained
from fusionzoo.models.export import check_export, export_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from seeded import calibrate_batchnorm

NAME = "icafusion_yolov5n"
SIZE = 64
SMALL_GRIDS = ((2, 2), (2, 2), (2, 2))  # P3 8x8, P4 4x4, P5 2x2 at 64 px (one token would make cross-attention constant)
NUM_CLASSES = 3
pytestmark = pytest.mark.usefixtures("one_thread")


def build(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return fz.create_model(NAME, **{"num_classes": NUM_CLASSES, "fusion_grids": SMALL_GRIDS, **kwargs})


def inputs(batch: int = 2, size: int = SIZE, thermal_chans: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.randn(batch, 3, size, size, generator=g),
            "thermal": torch.randn(batch, thermal_chans, size, size, generator=g)}


TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 62.0]]), "labels": torch.tensor([1, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build()


def test_entries_are_published_detectors_with_the_reference() -> None:
    names = fz.list_models("icafusion_*")
    assert names == ["icafusion_yolov5l", "icafusion_yolov5m", "icafusion_yolov5n", "icafusion_yolov5s"]
    for n in names:
        entry = fz.model_entry(n)
        assert entry.published and entry.task == "detection" and entry.fusion == "middle"
        assert entry.reference_repo == "https://github.com/chanchanchan97/ICAFusion" and entry.modalities == ("rgb", "thermal")
    with pytest.raises(TypeError, match="fusion_stages"):
        fz.create_model(NAME, fusion_stages=("stage4",))


def test_train_mode_returns_the_authors_losses_and_every_trainable_parameter_learns(model) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(inputs(), TARGETS)
    assert set(losses) == {"box", "obj", "cls"} and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, dead[:10]
    # the authors' tensors their forward never reads are kept (checkpoint, parameter count) and frozen
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert {n.split(".")[-2] for n in frozen if ".mlp." not in n} == {"ln_input", "ln_output", "LN1"}
    model.zero_grad(set_to_none=True)


def test_eval_detections_taps_and_capture(model) -> None:
    model.eval()
    x = inputs()
    with torch.no_grad():
        plain = model(x)
        with fz.capture(model) as acts:
            captured = model(x)
    assert len(plain) == 2 and all(set(d) >= {"boxes", "scores", "labels"} for d in plain)
    assert all(d["boxes"].shape[1] == 4 and (d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all() for d in plain)
    assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"]) for a, b in zip(plain, captured))
    info = model.tap_info()
    assert list(acts) == list(info)
    expected = {f"{m}.stage{k}" for m in ("rgb", "thermal") for k in range(1, 5)}
    expected |= {f"{m}.stage{k}.fused" for m in ("rgb", "thermal") for k in (2, 3, 4)}
    expected |= {f"fused.stage{k}" for k in (2, 3, 4)} | {f"fpn.p{k}" for k in (3, 4, 5)} | {f"head.p{k}" for k in (3, 4, 5)}
    assert set(info) == expected
    for name, t in info.items():
        assert acts[name].shape[1:] == (t.channels, SIZE // t.reduction, SIZE // t.reduction), name
    assert not any(m._forward_hooks for m in model.modules())


def test_after_fusion_is_declared_as_observed() -> None:
    """ICAFusion's streams never read the fusion output (each backbone runs on its own input):
    ``{m}.stageK`` is not after fusion, ``{m}.stageK.fused`` and everything from P3 on is. Weights
    get noise first: the authors' initialisation (query / key projections of std 0.001) makes the
    attention nearly uniform, which hides the other modality's queries; BatchNorm statistics of one
    batch keep stride-32 features from vanishing at init (as test_taps_after_fusion)."""
    model = build().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".crossatt." in name and name.endswith("weight") and p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
    calibrate_batchnorm(model, lambda: model.raw_head_outputs(inputs(4)))
    moved = observed_dependence(model)
    info = model.tap_info()
    wrong = {t: (info[t].after_fusion, sorted(ms)) for t, ms in moved.items()
             if info[t].after_fusion != observed_after_fusion(info[t].stream, model.modalities, ms)}
    assert not wrong
    assert not info["rgb.stage4"].after_fusion and info["rgb.stage2.fused"].after_fusion
    assert model.min_input_size == (SIZE, SIZE) and build(fusion_grids=((20, 20), (16, 16), (10, 10))).min_input_size == (320, 320)


def test_missing_modality_zero_fill(model) -> None:
    model.eval()
    x = inputs()
    with torch.no_grad():
        with fz.capture(model, "thermal.stage1") as acts:
            out = model(x, missing=("thermal",))
        zeroed = model({**x, "thermal": torch.zeros_like(x["thermal"])})
        full = model(x)
    assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(out, zeroed))
    assert not all(torch.equal(a["scores"], b["scores"]) for a, b in zip(out, full))
    assert acts["thermal.stage1"].shape[0] == 2


def test_bad_inputs_raise_clear_errors(model) -> None:
    model.eval()
    with pytest.raises(ValueError, match="thermal"):
        model(inputs(thermal_chans=1))
    with pytest.raises(ValueError, match="at least 320x320 pixels"):
        fz.create_model("icafusion_yolov5n", num_classes=1).eval()(inputs(1, 256))
    with pytest.raises(ValueError, match="fusion_grids"):
        fz.create_model(NAME, fusion_grids=((2, 2), (2, 2)))
    with pytest.raises(ValueError, match="replicate_x.*in_chans"):
        fz.create_model(NAME, replicate_x=True, in_chans={"thermal": 3})


def test_replicate_x_takes_one_channel_thermal() -> None:
    """A 1-channel thermal image repeated to three channels, as the authors' loader reads it."""
    rep, three = build(replicate_x=True).eval(), build().eval()
    assert rep.in_chans == {"rgb": 3, "thermal": 1}
    x = inputs(thermal_chans=1)
    with torch.no_grad():
        a = rep.raw_head_outputs(x)
        b = three.raw_head_outputs({**x, "thermal": x["thermal"].expand(-1, 3, -1, -1)})
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_pretrained_round_trip(model, tmp_path) -> None:
    model.eval()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").eval()
    x = inputs()
    with torch.no_grad():
        a, b = model.raw_head_outputs(x), loaded.raw_head_outputs(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.fusion_grids == SMALL_GRIDS


def test_interpretation_of_a_detector(model) -> None:
    """CKA, reliance and modality contribution (COCO AP) over the taps, on synthetic RGB-T boxes."""
    ds = fz.data.create_dataset("synthetic_rgbt", split="val", num_samples=2, image_size=(64, 64))
    one = build(replicate_x=True).eval()
    result = interpret.run(one, ds, metrics=["cka", "contribution"], taps=["rgb.stage3", "thermal.stage3", "fused.stage3"],
                           batch_size=2, replicates=0, perceptual=False)
    assert result.contribution["metric"] == "AP" and set(result.contribution["shapley"]) == {"rgb", "thermal"}
    assert any("rgb.stage3" in str(pair) for pair in result.cka["pairs"])


@pytest.mark.slow  # train.py end to end with its report: ~10 s on 2 idle cores, 25 s loaded
def test_train_script_trains_evaluates_and_interprets(tmp_path) -> None:
    train = train_script()
    summary = train.main([
        "--model", NAME, "--dataset", "synthetic_rgbt", "--model-kwargs",
        "{fusion_grids: [[2, 2], [2, 2], [2, 2]], replicate_x: true}", "--image-size", "64,64",
        "--train-samples", "4", "--val-samples", "2", "--batch-size", "2", "--epochs", "1", "--threads", "1",
        "--no-progress", "--out-dir", str(tmp_path), "--run-name", "ica",
    ])
    assert summary["task"] == "detection" and summary["metric"] == "ap" and summary["steps"] == 2
    report = json.loads((tmp_path / "ica" / "report" / "metrics.json").read_text())
    assert report["contribution"]["metric"] == "AP" and set(report["contribution"]["shapley"]) == {"rgb", "thermal"}


def test_kaist_mr2_through_the_detection_task(shared_data) -> None:
    """The real KAIST sample (one frame, 1-channel thermal) through ``evaluate`` as train.py calls it."""
    if not (shared_data / "kaist").is_dir():
        pytest.skip(f"{shared_data / 'kaist'} is absent (set FUSIONZOO_SHARED_DATA)")
    ds = fz.data.create_dataset("kaist", root=shared_data / "kaist", split="test")  # one 512x640 frame
    model = build(num_classes=1, replicate_x=True).eval()
    res = evaluate(model, DataLoader(ds, batch_size=1, collate_fn=collate), modalities=("rgb", "thermal"),
                   num_classes=1, device=torch.device("cpu"))
    assert res["images"] == 1 and {"mr2", "mr2_day", "ap50"} <= set(res)  # the sample is a day frame
    assert 0 <= res["mr2"] <= 1


@pytest.mark.slow  # torch.export tracing: several seconds, more on a loaded machine
def test_torch_export_to_raw_head_outputs(tmp_path) -> None:
    """``fusionzoo export``'s path: the raw head outputs (before decoding and NMS) traced, equal to eager."""
    model = build().eval()
    exported = export_model(model, tmp_path / "m.pt2", fmt="torch-export", size=(SIZE, SIZE))
    result = check_export(model, exported)
    assert set(result.per_output) == {"fused.p3", "fused.p4", "fused.p5"}
    assert all(diff <= result.tolerance for diff, _ in result.per_output.values())
