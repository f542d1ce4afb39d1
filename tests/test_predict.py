"""``fusionzoo predict``: a trained model on the user's own files (issue 19, item 1).

Models: a segmentation run trained for one tiny epoch on synthetic_rgbt with train.py (a run
folder, what users have), and an untrained tiny detector saved with save_pretrained (its boxes are
random, which is all the result-file conventions need). Frames are synthetic images written to
tmp_path, and the real LLVIP / KAIST frames of ../shared/data where present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from process_helpers import train_script

import fusionzoo as fz
from fusionzoo.cli import main
from fusionzoo.data.transforms import STATS, ModalityStats, Normalize
from fusionzoo.detection.kaist import evaluate_files
from fusionzoo.engine.predict import pair_files
from fusionzoo.hub import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train.py run: early_concat_resnet18 on synthetic_rgbt at 64x80, one epoch, no report."""
    train = train_script()
    out = tmp_path_factory.mktemp("runs")
    train.main(["--model", "early_concat_resnet18", "--dataset", "synthetic_rgbt", "--image-size", "64,80",
                "--train-samples", "8", "--val-samples", "4", "--batch-size", "4", "--epochs", "1",
                "--threads", "1", "--no-progress", "--no-report", "--out-dir", str(out), "--run-name", "run"])
    return out / "run"


def _u8(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.uint8 else (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def _frames(folder: Path, n: int = 3, size: tuple[int, int] = (70, 90), start: int = 0) -> tuple[Path, Path]:
    """``n`` synthetic RGB-T frames as ``rgb/<k>.png`` (uint8) and ``thermal/<k>.png`` (8-bit)."""
    ds = fz.data.create_dataset("synthetic_rgbt", split="test", num_samples=start + n, image_size=size)
    rgb, th = folder / "rgb", folder / "thermal"
    rgb.mkdir(parents=True, exist_ok=True)
    th.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + n):
        raw = ds.raw(k)
        Image.fromarray(_u8(raw["rgb"])).save(rgb / f"{k:04d}.png")
        Image.fromarray(_u8(raw["thermal"])).save(th / f"{k:04d}.png")
    return rgb, th


def _expected_classes(model_dir: Path, rgb: Path, th: Path, missing: tuple[str, ...] = (),
                      norm: Normalize | None = None) -> np.ndarray:
    """What the model predicts on the files, normalized by hand (default: synthetic_rgbt's
    statistics, the ones train.py stored) at the native size padded to a multiple of 32: the
    reference for predict."""
    model = fz.from_pretrained(model_dir)
    norm = norm or Normalize("synthetic_rgbt")
    x = {"rgb": norm("rgb", np.asarray(Image.open(rgb).convert("RGB")))}
    if "thermal" not in missing:
        x["thermal"] = norm("thermal", np.asarray(Image.open(th), np.float32) / 255)
    h, w = x["rgb"].shape[-2:]
    t = {m: torch.nn.functional.pad(torch.from_numpy(v)[None], (0, (-w) % 32, 0, (-h) % 32)) for m, v in x.items()}
    with torch.no_grad():
        logits = model(t, missing=missing) if missing else model(t)
    return logits[0, :, :h, :w].argmax(0).numpy()


def test_segmentation_run_folder_writes_palette_masks_and_overlays(run_dir: Path, tmp_path: Path, capsys) -> None:
    rgb, th = _frames(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), "--rgb", str(rgb), "--thermal", str(th), "--out", str(out),
                 "--size-policy", "pad"]) == 0
    stems = ["0000", "0001", "0002"]
    palette = fz.data.create_dataset("synthetic_rgbt", num_samples=1).palette
    for s in stems:
        mask = Image.open(out / "masks" / f"{s}.png")
        assert mask.mode == "P" and mask.size == (90, 70)
        assert mask.getpalette()[: 3 * len(palette)] == [v for c in palette for v in c]
        np.testing.assert_array_equal(np.asarray(mask), _expected_classes(run_dir / "best", rgb / f"{s}.png",
                                                                           th / f"{s}.png"))
        over = np.asarray(Image.open(out / "overlays" / f"{s}.png"))
        assert over.shape == (70, 90, 3)
        assert not np.array_equal(over, np.asarray(Image.open(rgb / f"{s}.png")))  # colours were blended in
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["settings"]["normalization"]["thermal"]["mean"] == list(STATS["synthetic_rgbt"]["thermal"].mean)
    assert manifest["model_kind"] == "training run" and manifest["settings"]["size_policy"] == "pad"
    assert "3 frame(s)" in capsys.readouterr().out


def test_the_statistics_stored_with_the_model_are_applied(run_dir, tmp_path) -> None:
    # A save_pretrained folder whose stored statistics differ from fusionzoo's for its dataset:
    # predict must use the stored ones (the weights' manifest does not cover config.json).
    folder = tmp_path / "saved"
    shutil.copytree(run_dir / "best", folder)
    cfg = json.loads((folder / "config.json").read_text())
    stored = {"rgb": ModalityStats((0.3, 0.3, 0.3), (0.4, 0.4, 0.4)), "thermal": ModalityStats((0.1,), (0.6,))}
    cfg["normalization"] = {m: {"mean": list(s.mean), "std": list(s.std)} for m, s in stored.items()}
    (folder / "config.json").write_text(json.dumps(cfg))
    rgb, th = _frames(tmp_path / "in", n=1)
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--rgb", str(rgb), "--thermal", str(th), "--out", str(out)]) == 0
    got = np.asarray(Image.open(out / "masks" / "0000.png"))
    np.testing.assert_array_equal(got, _expected_classes(folder, rgb / "0000.png", th / "0000.png",
                                                         norm=Normalize(stored)))
    assert not np.array_equal(got, _expected_classes(folder, rgb / "0000.png", th / "0000.png"))  # it matters
    assert json.loads((out / "predict.json").read_text())["settings"]["size_policy"] == "pad"  # size unknown


def test_resize_policy_defaults_to_the_runs_training_size_and_returns_the_original_size(run_dir, tmp_path) -> None:
    rgb, th = _frames(tmp_path / "in", n=1, size=(100, 130))
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), "--rgb", str(rgb / "0000.png"), "--thermal", str(th / "0000.png"),
                 "--out", str(out), "--no-progress"]) == 0
    settings = json.loads((out / "predict.json").read_text())["settings"]
    assert settings["size_policy"] == "resize" and settings["size"] == [64, 80]
    assert Image.open(out / "masks" / "0000.png").size == (130, 100)


def test_missing_runs_without_the_modality(run_dir, tmp_path) -> None:
    rgb, th = _frames(tmp_path / "in", n=1)
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), "--rgb", str(rgb), "--missing", "thermal", "--size-policy", "pad",
                 "--out", str(out)]) == 0
    got = np.asarray(Image.open(out / "masks" / "0000.png"))
    np.testing.assert_array_equal(got, _expected_classes(run_dir / "best", rgb / "0000.png", th / "0000.png",
                                                         missing=("thermal",)))


@pytest.mark.parametrize("argv, says", [
    (["--missing", "thermal"], "--thermal given but thermal is not used (named by --missing)"),
    (["--missing", "depth"], "--missing depth: the model takes rgb, thermal"),
    (["--size", "64", "64", "--size-policy", "pad"], "--size applies to --size-policy resize"),
    (["--size", "16", "64"], "--size 16 64: models need at least 32x32"),
    (["--annotations", "ann.json"], "--annotations applies to detectors"),
])
def test_flag_mistakes_are_one_line(run_dir, tmp_path, capsys, argv, says) -> None:
    rgb, th = _frames(tmp_path / "in", n=1)
    assert main(["predict", str(run_dir), "--rgb", str(rgb), "--thermal", str(th), "--out", str(tmp_path / "o"),
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err


def test_a_path_that_does_not_exist_is_one_line(run_dir, tmp_path, capsys) -> None:
    rgb, _ = _frames(tmp_path / "in", n=1)
    assert main(["predict", str(run_dir), "--rgb", str(rgb), "--thermal", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"fusionzoo: error: --thermal {tmp_path / 'nope'}: no such file or folder"


def test_unmatched_files_are_named_in_one_line(run_dir, tmp_path, capsys) -> None:
    rgb, th = _frames(tmp_path / "in", n=2)
    (th / "0001.png").rename(th / "0009.png")
    assert main(["predict", str(run_dir), "--rgb", str(rgb), "--thermal", str(th), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unmatched" in err
    assert str(rgb / "0001.png") in err and str(th / "0009.png") in err


def test_pairing_rules(tmp_path) -> None:
    rgb, th = _frames(tmp_path / "in", n=2)
    pairs = pair_files({"rgb": rgb, "thermal": th})
    assert [s for s, _ in pairs] == ["0000", "0001"] and pairs[1][1]["thermal"] == th / "0001.png"
    with pytest.raises(fz.data.DataError, match="not a mix"):
        pair_files({"rgb": rgb, "thermal": th / "0000.png"})
    shutil.copy(rgb / "0000.png", rgb / "0000.jpg")
    with pytest.raises(fz.data.DataError, match="share the stem '0000'"):
        pair_files({"rgb": rgb, "thermal": th})
    (tmp_path / "empty").mkdir()
    with pytest.raises(fz.data.DataError, match="no image files"):
        pair_files({"rgb": tmp_path / "empty", "thermal": th})


def test_model_that_is_not_loadable_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    rgb, th = _frames(tmp_path / "in", n=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    for model, says in (("early_concat_resnet18", "untrained"),
                        ("nobody/none", ("no such folder, and as a Hub id: config.json of hub model 'nobody/none' is "
                                         "not in the Hugging Face cache")),
                        ("esanet_r34_nbt1d.nosuchtag", "known tags")):
        assert main(["predict", model, "--rgb", str(rgb), "--thermal", str(th), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and "\n" not in err, err


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> Path:
    """An untrained one-class (person) RGB-T FCOS saved with save_pretrained; score_thresh 0 keeps boxes."""
    torch.manual_seed(0)
    model = fz.create_model("fcos_early_resnet18", num_classes=1, modalities=("rgb", "thermal"), fpn_channels=64,
                            score_thresh=0.0, detections_per_img=20).eval()
    folder = tmp_path_factory.mktemp("det") / "fcos"
    save_pretrained(model, folder, class_names=["person"],
                    normalization={m: {"mean": list(s.mean), "std": list(s.std)} for m, s in STATS["kaist"].items()},
                    extra={"dataset": "kaist"})
    return folder


def _annotations(path: Path, names: list[str], size: tuple[int, int]) -> Path:
    images = [{"id": i, "im_name": n, "height": size[0], "width": size[1]} for i, n in enumerate(names)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 70], "occlusion": 0} for i in range(len(names))]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cyclist"}]}))
    return path


def test_detection_json_is_read_by_mr2_and_pycocotools(detector_dir, tmp_path, capsys) -> None:
    pycocotools = pytest.importorskip("pycocotools.coco")
    rgb, th = _frames(tmp_path / "in", n=2, size=(96, 128))
    for folder in (rgb, th):  # KAIST file names; the annotation file lists them as set08/V000/I0000k
        for k in range(2):
            (folder / f"{k:04d}.png").rename(folder / f"set08_V000_I{k:05d}.png")
    ann = _annotations(tmp_path / "ann.json", ["set08/V000/I00001", "set08/V000/I00000"], (96, 128))
    out = tmp_path / "out"
    assert main(["predict", str(detector_dir), "--rgb", str(rgb), "--thermal", str(th), "--out", str(out),
                 "--annotations", str(ann)]) == 0
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["category_id"] for d in dets} == {1}
    assert {d["image_id"] for d in dets} == {0, 1}
    images = json.loads((out / "images.json").read_text())["images"]  # the annotation file's ids, matched by name
    assert {im["file_name"]: im["id"] for im in images} == {"set08_V000_I00000.png": 1, "set08_V000_I00001.png": 0}
    assert np.asarray(Image.open(out / "boxes" / "set08_V000_I00000.png")).shape == (96, 128, 3)
    res = evaluate_files(ann, out / "detections.json")  # what fusionzoo mr2 runs
    assert 0 <= res["all"] <= 1
    assert main(["mr2", "--annotations", str(ann), "--results", str(out / "detections.json")]) == 0
    coco = pycocotools.COCO(str(out / "images.json"))
    loaded = coco.loadRes(str(out / "detections.json"))
    assert len(loaded.getAnnIds()) == len(dets)


def test_llvip_frames_with_the_synthetic_rgbt_run(run_dir, shared_data, tmp_path) -> None:
    llvip = shared_data / "llvip"
    if not (llvip / "rgb").is_dir():
        pytest.skip(f"{llvip} is absent (set FUSIONZOO_SHARED_DATA)")
    stems = sorted(p.stem for p in (llvip / "rgb").iterdir())[:2]
    for m in ("rgb", "thermal"):
        (tmp_path / m).mkdir()
        for s in stems:
            (tmp_path / m / f"{s}.jpg").symlink_to(llvip / m / f"{s}.jpg")
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), "--rgb", str(tmp_path / "rgb"), "--thermal", str(tmp_path / "thermal"),
                 "--out", str(out), "--no-progress"]) == 0
    for s in stems:
        w, h = Image.open(llvip / "rgb" / f"{s}.jpg").size
        assert Image.open(out / "masks" / f"{s}.png").size == (w, h)
        assert np.asarray(Image.open(out / "overlays" / f"{s}.png")).shape == (h, w, 3)


def test_kaist_frame_detections_are_accepted_by_mr2(detector_dir, shared_data, kaist_eval, tmp_path) -> None:
    kaist = shared_data / "kaist"
    if not (kaist / "rgb").is_dir():
        pytest.skip(f"{kaist} is absent")
    out = tmp_path / "out"
    assert main(["predict", str(detector_dir), "--rgb", str(kaist / "rgb"), "--thermal", str(kaist / "thermal"),
                 "--out", str(out), "--annotations", str(kaist_eval / "KAIST_annotation.json")]) == 0
    dets = json.loads((out / "detections.json").read_text())
    names = {im["id"]: im["im_name"] for im in json.loads((kaist_eval / "KAIST_annotation.json").read_text())["images"]}
    assert {names[d["image_id"]] for d in dets} == {"set08/V000/I02159"}
    assert all(0 <= d["bbox"][0] < 640 and 0 <= d["bbox"][1] < 512 for d in dets)
    assert main(["mr2", "--annotations", str(kaist_eval / "KAIST_annotation.json"),
                 "--results", str(out / "detections.json")]) == 0


def test_depth_scale_reads_integer_depth_in_the_given_units(tmp_path) -> None:
    # The same depth as a uint16 PNG in 1/5000 m (TUM) and as float metres (.npy): equal masks with
    # --depth-scale 5000, other masks when the PNG is read as millimetres (the default).
    torch.manual_seed(0)
    model = fz.create_model("early_concat_resnet18", num_classes=4, modalities=("rgb", "depth")).eval()
    with torch.no_grad():  # an untrained head predicts one class everywhere; noise makes the mask follow the input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = save_pretrained(model, tmp_path / "rgbd", normalization={
        m: {"mean": list(s.mean), "std": list(s.std)} for m, s in STATS["nyuv2"].items() if m in ("rgb", "depth")})
    rng = np.random.default_rng(0)
    units = rng.integers(2000, 20000, (64, 96), dtype=np.uint16)  # 0.4 .. 4 m at 5000 units per metre
    units[:8, :8] = 0  # invalid
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(units).save(tmp_path / "depth.png")
    np.save(tmp_path / "depth.npy", units.astype(np.float32) / np.float32(5000))
    masks = {}
    for name, depth, scale in (("png", "depth.png", ["--depth-scale", "5000"]), ("npy", "depth.npy", []),
                               ("mm", "depth.png", [])):
        out = tmp_path / name
        assert main(["predict", str(folder), "--rgb", str(tmp_path / "rgb.png"), "--depth", str(tmp_path / depth),
                     "--out", str(out), *scale]) == 0
        masks[name] = np.asarray(Image.open(out / "masks" / "rgb.png"))
    np.testing.assert_array_equal(masks["png"], masks["npy"])
    assert not np.array_equal(masks["png"], masks["mm"])
    assert json.loads((tmp_path / "png" / "predict.json").read_text())["settings"]["depth_scale"] == 5000
