"""CFT (two-stream YOLOv5 + Cross-Modality Fusion Transformer) as a fusionzoo detector: the call
convention, taps, missing modality, interpretation, training through train.py, and the authors'
checkpoint conversion (``fusionzoo convert``, ``pretrained=TAG``).

Behaviour runs on ``CFT`` at depth 0.33 / width 0.125 (the class every entry builds; channels
8..128) so each test takes seconds; the entries themselves are built on the meta device, except
the conversion round trips. Numerical equality with the authors' code: tests/test_parity_cft.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import train_script

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.cli import main as cli_main
from fusionzoo.data import collate, create_dataset
from fusionzoo.detection.published.cft import CFT
from fusionzoo.interpret.detection import DetectionScore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from seeded import read_fixture

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "cft"
SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kwargs) -> CFT:
    torch.manual_seed(0)
    return CFT(**{"num_classes": 3, "depth_multiple": 0.33, "width_multiple": 0.125, **kwargs})


def inputs(batch: int = 2, thermal_chans: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"rgb": torch.rand(batch, 3, SIZE, SIZE, generator=g), "thermal": torch.rand(batch, thermal_chans, SIZE, SIZE, generator=g)}


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 62.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


def test_entries_are_published_detectors_with_the_papers_configs():
    assert fz.list_models("cft_*", published=True) == ["cft_yolov5l", "cft_yolov5s"]
    for name in ("cft_yolov5l", "cft_yolov5s"):
        entry = fz.model_entry(name)
        assert entry.task == "detection" and entry.fusion == "middle" and entry.modalities == ("rgb", "thermal")
        assert entry.reference_commit == "fb591c9b163177c0e950db08e213e24ddc912d41"
    with torch.device("meta"):
        model = fz.create_model("cft_yolov5s", num_classes=9)
    assert model.config == {"name": "cft_yolov5s", "num_classes": 9}
    assert model.fusion_stages == ("stage2", "stage3", "stage4") and model.in_chans == {"rgb": 3, "thermal": 3}
    assert fz.list_pretrained("cft_*") == ["cft_yolov5l.flir_aligned", "cft_yolov5l.llvip"]
    with pytest.raises(TypeError, match="cft_yolov5l"):
        fz.create_model("cft_yolov5l", fpn_channels=64)
    with torch.device("meta"):  # the loss gains as a mapping: model.config stays JSON
        tuned = fz.create_model("cft_yolov5s", loss={"img_size": 512, "fl_gamma": 1.5})
    assert tuned.loss_config.img_size == 512 and tuned.config["loss"] == {"img_size": 512, "fl_gamma": 1.5}
    with pytest.raises(TypeError, match="unknown field.*'gain'"):
        fz.create_model("cft_yolov5s", loss={"gain": 1.0})
    with pytest.raises(ValueError, match="exactly two streams|exactly 2 modalities"):
        fz.create_model("cft_yolov5s", modalities=("rgb", "thermal", "depth"))


def test_train_losses_reach_every_parameter():
    model = small().train()
    losses = model(inputs(), targets())
    assert set(losses) == {"box", "obj", "cls"} and all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert model.head_detections == {}
    sum(losses.values()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead, dead[:5]


def test_eval_detections_and_taps_in_declared_order():
    model = small().eval()
    info = model.tap_info()
    with torch.no_grad(), fz.capture(model) as acts:
        out = model(inputs())
    assert len(out) == 2 and model.head_detections["fused"] is out
    for d in out:
        n = d["boxes"].shape[0]
        assert 0 < n <= 300 and d["scores"].shape == (n,) and d["labels"].dtype == torch.long
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all() and ((d["scores"] > 0) & (d["scores"] <= 1)).all()
    assert list(acts) == list(info)
    for tap, value in acts.items():
        assert value.shape[1] == info[tap].channels, tap
        assert value.shape[-1] == math.ceil(SIZE / info[tap].reduction), tap
    assert {t for t, i in info.items() if not i.after_fusion} == {"rgb.stage1", "thermal.stage1", "rgb.stage2",
                                                                   "thermal.stage2"}
    assert info["head.p3"].kind == "logits" and info["head.p3"].channels == 3 * 8
    assert not any(m._forward_hooks for m in model.modules())


def test_inputs_not_divisible_by_32_are_padded_and_boxes_stay_inside():
    model = small().eval()
    x = {"rgb": torch.rand(1, 3, 50, 70), "thermal": torch.rand(1, 3, 50, 70)}
    with torch.no_grad():
        out = model(x)[0]
        raw = model.raw_head_outputs(x)
    assert (out["boxes"][:, [1, 3]] <= 50).all() and (out["boxes"][:, [0, 2]] <= 70).all()
    assert raw["fused.p3"].shape == (1, 3, 8, 12, 8)  # padded to 64x96


def test_missing_modality_is_zeros_and_checked():
    model = small().eval()
    x = inputs()
    with torch.no_grad():
        a = model(x, missing=("thermal",))
        b = model({"rgb": x["rgb"], "thermal": torch.zeros_like(x["thermal"])})
    assert all(torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["scores"], q["scores"]) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="'thermal' has shape"):
        model({"rgb": x["rgb"], "thermal": x["thermal"][:, :1]})


def test_replicate_x_feeds_a_one_channel_thermal_to_the_three_channel_stem():
    rep = small(replicate_x=True).eval()
    ref = small().eval()
    ref.load_state_dict(rep.state_dict())
    x = inputs(thermal_chans=1)
    with torch.no_grad():
        a = rep(x)
        b = ref({"rgb": x["rgb"], "thermal": x["thermal"].expand(-1, 3, -1, -1)})
    assert rep.in_chans["thermal"] == 1 and torch.equal(a[0]["scores"], b[0]["scores"])


def test_save_pretrained_round_trip(tmp_path):
    with torch.device("meta"):
        assert fz.create_model("cft_yolov5s", replicate_x=True).config["replicate_x"] is True
    model = small().eval()
    model.config = {"name": "cft_yolov5s"}  # save_pretrained records the entry; reload builds it
    folder = model.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_classes"] == 3


def test_gradcam_on_boxes_per_stream():
    model = small().eval()
    x = inputs()
    score = DetectionScore(top_k=2)
    taps = ["rgb.stage2", "thermal.stage2", "fused.stage2", "rgb.stage3.fused"]
    cams = interpret.grad_cam(model, x, taps, score_fn=score)
    assert set(cams) == set(taps)
    assert all(c.shape == (2, SIZE, SIZE) and torch.isfinite(c).all() for c in cams.values())
    assert [len(s["scores"]) for s in score.selected] == [2, 2]
    for tap in ("rgb.stage2", "thermal.stage2"):  # each stream's map attributes the explained boxes
        assert float(cams[tap].amax()) > 0.5, tap


def test_interpret_run_measures_contribution_in_ap():
    ds = create_dataset("synthetic_rgbt", split="val", num_samples=4, image_size=(SIZE, SIZE), seed=0)
    model = small(num_classes=ds.num_classes, in_chans={"thermal": 1})
    r = interpret.run(model, [collate([ds[0], ds[1]]), collate([ds[2], ds[3]])], gradcam_images=2,
                      metrics=["contribution", "gradcam"], replicates=0)
    c = r.contribution
    assert c["metric"] == "AP" and set(c["shapley"]) == {"rgb", "thermal"}
    assert sum(c["shapley"].values()) == pytest.approx(c["coalitions"]["rgb+thermal"]["ap"] - c["coalitions"]["none"]["ap"])
    assert r.settings["policies"] == ["zero", "mean"]  # no own missing path: the zoo's zero fill
    json.dumps(r.to_json(), allow_nan=False)


@pytest.mark.slow  # a fresh interpreter imports torch, torchvision and timm: ~20 s on a loaded 2-core machine
def test_a_detection_module_imported_first_does_not_re_enter_the_registry():
    """detection.models -> models -> a published converter's registration used to fill the
    registry, which imported detection.published (CFT) against the half-imported detection.models."""
    code = "import fusionzoo.detection.models; import fusionzoo as fz; print(fz.model_entry('cft_yolov5l').published)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False,
                         env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def authors_checkpoint(variant: str, path: Path, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """An authors'-format state dict of the full-size network (``ckpt['model'].state_dict()``,
    float16 as their train.py saves it) from the fixture's key/shape list (Detect's rows set for
    ``num_classes`` when given), saved to ``path``; Detect's anchors are the config's."""
    meta, _ = read_fixture(FIXTURE)
    keys = meta["full_keys"][variant]
    detect = max(int(k.split(".")[1]) for k, _, _ in keys)
    g = torch.Generator().manual_seed(0)
    anchors = torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
                           dtype=torch.float32).view(3, 3, 2)
    state = {}
    for key, shape, dtype in keys:
        if key == f"model.{detect}.anchors":
            state[key] = anchors / torch.tensor([8.0, 16.0, 32.0]).view(3, 1, 1)
        elif key == f"model.{detect}.anchor_grid":
            state[key] = anchors.view(3, 1, 3, 1, 1, 2)
        elif dtype != "float32":
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
        else:
            if num_classes is not None and key.startswith(f"model.{detect}.m."):
                shape = [3 * (5 + num_classes), *shape[1:]]
            state[key] = (0.02 * torch.rand(shape, generator=g)).half()
    torch.save(state, path)
    return state


@pytest.mark.slow  # cft_yolov5s at full size (44.5M parameters): written, read, converted, saved, reloaded
def test_convert_cli_and_from_pretrained(tmp_path):
    """``fusionzoo convert cft_yolov5s FILE --num-classes 9``: every tensor arrives where the
    authors' layer index says (checked on Detect and on a GPT block)."""
    path = tmp_path / "vedai_state_dict.pth"
    state = authors_checkpoint("yolov5s", path)
    assert cli_main(["convert", "cft_yolov5s", str(path), "--out", str(tmp_path / "o"), "--num-classes", "9"]) == 0
    model = fz.from_pretrained(tmp_path / "o")
    sd = model.state_dict()
    assert torch.equal(sd["head.m.2.weight"], state["model.46.m.2.weight"].float())
    assert torch.equal(sd["fusions.stage3.trans_blocks.7.sa.que_proj.weight"], state["model.17.trans_blocks.7.sa.que_proj.weight"].float())
    assert torch.equal(sd["encoders.thermal.stage4.1.cv2.conv.weight"], state["model.24.cv2.conv.weight"].float())
    assert torch.equal(sd["neck.c3_n5.m.0.cv1.conv.weight"], state["model.45.m.0.cv1.conv.weight"].float())
    # without --num-classes the class count cannot be read off Detect's na * (5 + K) rows: one line, exit 2
    assert cli_main(["convert", "cft_yolov5s", str(path), "--out", str(tmp_path / "p")]) == 2


@pytest.mark.slow
def test_convert_llvip_tag_and_create_model_pretrained(tmp_path, monkeypatch):
    """The released LLVIP tag at full size (206M parameters): ``fusionzoo convert cft_yolov5l FILE
    --tag llvip`` into the cache, then ``create_model("cft_yolov5l", pretrained="llvip")``."""
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cft_llvip_state_dict.pth"
    expected = authors_checkpoint("yolov5l", path, num_classes=1)["model.46.m.0.weight"].float()  # the rest freed
    assert cli_main(["convert", "cft_yolov5l", str(path), "--tag", "llvip"]) == 0
    model = fz.create_model("cft_yolov5l", pretrained="llvip")
    assert model.num_classes == 1 and model.pretrained_cfg["class_names"] == ["person"]
    assert torch.equal(model.state_dict()["head.m.0.weight"], expected)


@pytest.mark.slow  # cft_yolov5s at full size, two steps and an evaluation
def test_train_py_trains_cft_with_the_authors_loss(tmp_path):
    """train.py on synthetic RGB-T boxes: the YOLOv5 loss dict, COCO AP, the report, reload."""
    train = train_script()
    summary = train.main([
        "--model", "cft_yolov5s", "--dataset", "synthetic_rgbt", "--image-size", "64,64", "--train-samples", "4",
        "--val-samples", "2", "--batch-size", "2", "--epochs", "1", "--threads", "1", "--no-progress",
        "--model-kwargs", "{replicate_x: true}", "--eval-missing", "thermal", "--out-dir", str(tmp_path),
        "--run-name", "cft", "--no-report",
    ])
    assert summary["task"] == "detection" and summary["metric"] == "ap" and 0 <= summary["best_value"] <= 1
    model = fz.from_pretrained(tmp_path / "cft" / "best")
    assert model.config["name"] == "cft_yolov5s" and model.replicate_x


@pytest.mark.slow  # tracing the 8-block transformers: ~40 s (torch.export) and ~100 s (ONNX) on a loaded 2-core machine
@pytest.mark.parametrize("fmt", ["torch-export", "onnx"])
def test_export_round_trips_the_raw_head_outputs(fmt, tmp_path):
    from fusionzoo.models import export as fz_export

    if fmt == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("pip install 'fusionzoo[export]'")
    model = small().eval()
    model.config = {"name": "cft_yolov5s"}
    exported = fz_export.export_model(model, tmp_path / f"cft.{'onnx' if fmt == 'onnx' else 'pt2'}", fmt, size=(64, 64))
    check = fz_export.check_export(model, exported)
    assert set(check.per_output) == {"fused.p3", "fused.p4", "fused.p5"}
    assert all(rel <= check.tolerance for _, rel in check.per_output.values())
