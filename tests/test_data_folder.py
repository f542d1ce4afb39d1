"""The ``folder`` dataset: any layout described by ``fusionzoo.yaml`` (docs/custom_data.md).

Tiny folders written here (PNG images, labels, boxes, YAML); YAML errors name the key and the
file; ``train.py --dataset folder`` trains on them and on a folder made from the shared LLVIP frames.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from process_helpers import train_script

from fusionzoo.cli import main as cli_main
from fusionzoo.data import DataError, FolderSpecError, create_dataset, dataset_entry, load_folder_spec
from fusionzoo.engine.builders import build_datasets
from fusionzoo.engine.config import ConfigError, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 40)
PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30]]


def _write_yaml(root: Path, spec: dict, name: str = "fusionzoo.yaml") -> Path:
    (root / name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def _seg_folder(root: Path, n: int = 4, *, encoding: str = "index", **overrides) -> Path:
    """rgb/ (JPEG), depth/<id>_d.png (uint16 mm), masks/ (index or colour PNG), ids files; 3 classes."""
    rng = np.random.default_rng(0)
    for d in ("rgb", "depth", "masks", "lists"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:02d}" for i in range(n)]
    for i, sid in enumerate(ids):
        Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(root / "rgb" / f"{sid}.jpg")
        depth = np.full(SIZE, 1500 + 100 * i, np.uint16)
        depth[0, 0] = 0  # one invalid pixel
        Image.fromarray(depth).save(root / "depth" / f"{sid}_d.png")
        mask = np.zeros(SIZE, np.uint8)
        mask[:, SIZE[1] // 2:] = 1 + i % 2
        mask[:2] = 255  # ignore
        if encoding == "color":
            lut = np.array([*PALETTE, *[[0, 0, 0]] * 252, [255, 255, 255]], np.uint8)
            Image.fromarray(lut[mask]).save(root / "masks" / f"{sid}.png")
        else:
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{sid}.png")
    (root / "lists" / "train.txt").write_text("\n".join(ids[: n // 2 + 1]) + "\n")
    (root / "lists" / "val.txt").write_text("# comment lines are skipped\n" + "\n".join(ids[n // 2 + 1:]) + "\n")
    spec = {
        "task": "segmentation",
        "classes": ["background", "red", "green"],
        "palette": PALETTE,
        "modalities": {"rgb": "rgb", "depth": {"folder": "depth", "pattern": "{id}_d.png", "scale": 1000}},
        "labels": {"folder": "masks", "encoding": encoding},
        "splits": {"train": "lists/train.txt", "val": "lists/val.txt"},
        "normalization": {"depth": {"mean": [1.6], "std": [0.2]}},
    }
    if encoding == "color":
        spec["labels"]["ignore_color"] = [255, 255, 255]
    spec.update(overrides)
    return _write_yaml(root, spec)


def _det_folder(root: Path) -> Path:
    """Split folders train/ and val/, each with visible/ + lwir/ PNGs and boxes/*.txt; 2 classes."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("val", 2)):
        for d in ("visible", "lwir", "boxes"):
            (root / split / d).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            sid = f"{split}_{i}"
            Image.fromarray(rng.integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(root / split / "visible" / f"{sid}.png")
            Image.fromarray(rng.integers(0, 255, SIZE, dtype=np.uint8)).save(root / split / "lwir" / f"{sid}.png")
            (root / split / "boxes" / f"{sid}.txt").write_text(f"{i % 2} 2 3 {12 + i} 20\n1 15 4 30 22\n")
    return _write_yaml(root, {
        "task": "detection",
        "classes": ["person", "car"],
        "modalities": {"rgb": {"folder": "visible"}, "thermal": {"folder": "lwir", "bits": 8}},
        "boxes": {"folder": "boxes"},
        "splits": {"train": "train", "val": "val"},
    })


# --- reading ---------------------------------------------------------------------------------


def test_segmentation_folder_reads_files_and_metadata(tmp_path):
    root = _seg_folder(tmp_path)
    entry = dataset_entry("folder", root)
    assert entry.task == "segmentation" and entry.modalities == ("rgb", "depth") and entry.num_classes == 3
    assert entry.splits == ("train", "val") and entry.extra["palette"] == PALETTE
    ds = create_dataset("folder", root, split="train")
    assert len(ds) == 3 and ds.classes == ["background", "red", "green"] and ds.num_classes == 3
    assert ds.palette == [tuple(c) for c in PALETTE] and ds.modalities == ("rgb", "depth")
    s = ds[1]
    assert s["rgb"].shape == (3, *SIZE) and s["depth"].shape == (1, *SIZE) and s["mask"].shape == SIZE
    assert s["depth"][0, 5, 5].item() == pytest.approx(1.6)  # 1600 units at scale 1000 -> metres
    assert s["depth"][0, 0, 0].item() == 0  # invalid stays 0
    assert set(s["mask"].unique().tolist()) == {0, 2, 255}
    assert s["meta"]["paths"]["depth"].endswith("depth/img01_d.png")
    val = create_dataset("folder", root, split="val")
    assert val.ids == ["img03"]
    # normalisation: the YAML's depth statistics over the defaults (ImageNet RGB)
    stats = entry.stats()
    assert stats["depth"].mean == (1.6,) and stats["rgb"].mean == pytest.approx((0.485, 0.456, 0.406))


def test_colour_labels_map_through_the_palette(tmp_path):
    index = create_dataset("folder", _seg_folder(tmp_path / "i"), split="train")[0]["mask"]
    colour = create_dataset("folder", _seg_folder(tmp_path / "c", encoding="color"), split="train")[0]["mask"]
    assert torch.equal(index, colour)


def test_colour_label_with_an_unknown_colour_names_file_and_colour(tmp_path):
    root = _seg_folder(tmp_path, encoding="color")
    Image.fromarray(np.full((*SIZE, 3), 7, np.uint8)).save(root / "masks" / "img00.png")
    with pytest.raises(DataError, match=r"img00.png: colours \[\[7, 7, 7\]\] are not in .*palette"):
        create_dataset("folder", root, split="train")[0]


def test_reduce_zero_label_and_ignore_index(tmp_path):
    root = _seg_folder(tmp_path, reduce_zero_label=True, classes=["red", "green"], palette=PALETTE[1:])
    mask = create_dataset("folder", root, split="train")[1]["mask"]
    # stored 0 (background) becomes ignore, 2 (green) becomes class 1; 255 stays ignore
    assert set(mask.unique().tolist()) == {1, 255}
    root2 = _seg_folder(tmp_path / "b", ignore_index=2)  # value 2 in the files means "not labelled"
    with pytest.raises(FolderSpecError, match="ignore_index"):
        load_folder_spec(root2)  # 2 is a class index of the 3 classes
    root3 = _seg_folder(tmp_path / "c", ignore_index=2, classes=["background", "red"], palette=PALETTE[:2])
    assert set(create_dataset("folder", root3, split="train")[1]["mask"].unique().tolist()) == {0, 255}


def test_detection_folder_with_split_folders(tmp_path):
    root = _det_folder(tmp_path)
    ds = create_dataset("folder", root, split="train")
    assert ds.ids == ["train_0", "train_1", "train_2", "train_3"]  # the split folder's files
    s = ds[1]
    assert s["rgb"].shape == (3, *SIZE) and s["thermal"].shape == (1, *SIZE)
    assert s["boxes"].tolist() == [[2, 3, 13, 20], [15, 4, 30, 22]] and s["labels"].tolist() == [1, 1]
    assert len(create_dataset("folder", root, split="val")) == 2


def test_yolo_boxes_read_as_the_same_pixel_boxes(tmp_path):
    root = _det_folder(tmp_path)
    xyxy = create_dataset("folder", root, split="val")[1]
    h, w = SIZE
    for path in (root / "val" / "boxes").glob("*.txt"):  # rewrite every file as YOLO fractions
        lines = []
        for line in path.read_text().splitlines():
            c, x1, y1, x2, y2 = (float(v) for v in line.split())
            lines.append(f"{int(c)} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}")
        path.write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load((root / "fusionzoo.yaml").read_text())
    spec["boxes"]["format"] = "yolo"
    _write_yaml(root, spec)
    yolo = create_dataset("folder", root, split="val")[1]
    torch.testing.assert_close(yolo["boxes"], xyxy["boxes"], rtol=0, atol=1e-4)
    assert torch.equal(yolo["labels"], xyxy["labels"]) and not yolo["ignore"].any()
    (root / "val" / "boxes" / "val_1.txt").write_text("0 0.5 0.5 12 20\n")  # pixels given as YOLO
    with pytest.raises(DataError, match=r"val_1.txt:1: YOLO box .* must be fractions .*boxes.format: xyxy"):
        create_dataset("folder", root, split="val")[1]
    spec["boxes"]["format"] = "coco"
    _write_yaml(root, spec)
    with pytest.raises(FolderSpecError, match=r"boxes.format: expected 'xyxy' .* or 'yolo'"):
        load_folder_spec(root)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "pattern"), [
    ({"colour": 1}, r"fusionzoo.yaml: top level: unknown key\(s\) \['colour'\]; valid keys: \['name', 'task'"),
    ({"task": "classification"}, r"fusionzoo.yaml: task: expected one of \['segmentation', 'detection'\]"),
    ({"palette": PALETTE[:2]}, r"fusionzoo.yaml: palette: 2 colours for 3 classes"),
    ({"palette": [[0, 0, 0], [0, 0, 0], [1, 1, 1]]}, r"palette: colours \[\(0, 0, 0\)\] repeat"),
    ({"classes": ["a", "a", "b"]}, r"classes: names repeat: \['a'\]"),
    ({"modalities": {"rgb": "rgb", "lidr": "x"}}, r"modalities: unknown key\(s\) \['lidr'\]; valid keys: \['rgb', 'hha'"),
    ({"modalities": {"rgb": {"folder": "rgb", "scale": 2}}}, r"modalities.rgb: unknown key\(s\) \['scale'\]"),
    ({"modalities": {"rgb": "rgb", "depth": {"folder": "depth", "scale": -1}}}, r"modalities.depth.scale: expected"),
    ({"modalities": {"rgb": {"folder": "rgb", "pattern": "x.png"}}}, r"modalities.rgb.pattern: expected a file name"),
    ({"modalities": {"rgb": {"folder": "rgb", "pattern": "{id}_{n}.png"}}}, r"modalities.rgb.pattern: expected"),
    ({"labels": {"folder": "masks", "encoding": "rgb"}}, r"labels.encoding: expected 'index'"),
    ({"boxes": "boxes"}, r"boxes: is for task detection; this file says task: segmentation"),
    ({"splits": {"train": "lists/nope.txt"}}, r"splits.train: .*lists/nope.txt not found"),
    ({"normalization": {"depth": {"mean": [1, 2], "std": [1]}}}, r"normalization.depth.mean: expected 1 number"),
])
def test_yaml_errors_name_key_and_file(tmp_path, change, pattern):
    root = _seg_folder(tmp_path, **change)
    with pytest.raises(FolderSpecError, match=pattern):
        load_folder_spec(root)


def test_missing_yaml_folder_files_and_split(tmp_path):
    root = _seg_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no fusionzoo.yaml or dataset.yaml"):
        load_folder_spec(tmp_path / "rgb")
    with pytest.raises(FolderSpecError, match="no split 'test'; it names \\['train', 'val'\\]"):
        create_dataset("folder", root, split="test")
    _write_yaml(root, {"task": "segmentation", "classes": ["a"]}, name="dataset.yaml")
    with pytest.raises(FolderSpecError, match="both fusionzoo.yaml and dataset.yaml exist"):
        load_folder_spec(root)
    (root / "dataset.yaml").unlink()
    (root / "depth" / "img01_d.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing for ids of split 'train': .*depth/img01_d.png"):
        create_dataset("folder", root, split="train")
    spec = yaml.safe_load((root / "fusionzoo.yaml").read_text())
    spec["labels"]["folder"] = "labels"
    _write_yaml(root, spec)
    with pytest.raises(FileNotFoundError, match=r"fusionzoo.yaml: labels.folder: .*labels not found"):
        create_dataset("folder", root, split="val")


def test_train_config_errors_are_one_line_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"needs root=<folder holding fusionzoo.yaml> \(see docs/custom_data.md\)"):
        create_dataset("folder")
    with pytest.raises(ConfigError, match="needs --data-root .*docs/custom_data.md"):
        build_datasets(TrainConfig(dataset="folder"))
    root = _seg_folder(tmp_path, palette=PALETTE[:1])
    with pytest.raises(ConfigError, match="--data-root .*palette: 1 colours for 3 classes"):
        build_datasets(TrainConfig(dataset="folder", data_root=str(root)))


# --- train.py and interpret ------------------------------------------------------------------


SEG_MODEL = ["--model", "early_concat", "--model-kwargs", "{encoder: test_resnet}"]  # timm's 0.7M-parameter test net
DET_MODEL = ["--model", "fcos_early", "--model-kwargs", "{encoder: test_resnet, fpn_channels: 64}"]
TINY = ["--image-size", "32,40", "--batch-size", "2", "--epochs", "1", "--threads", "1", "--no-progress",
        "--no-report", "--callbacks=", "--checkpoint-minutes", "0"]


def test_train_py_segmentation_on_a_folder(tmp_path):
    root = _seg_folder(tmp_path / "data")
    summary = train_script().main(["--dataset", "folder", "--data-root", str(root), *SEG_MODEL, *TINY, "--out-dir", str(tmp_path / "runs"),
                                    "--run-name", "seg"])
    run = tmp_path / "runs" / "seg"
    assert summary["class_names"] == ["background", "red", "green"] and summary["steps"] == 1
    saved = json.loads((run / "best" / "config.json").read_text())
    assert saved["class_names"] == ["background", "red", "green"] and saved["num_classes"] == 3
    assert saved["modalities"] == ["rgb", "depth"]
    assert saved["normalization"]["depth"] == {"mean": [1.6], "std": [0.2]}  # the YAML's, stored with the model
    assert saved["extra"]["palette"] == PALETTE  # for fusionzoo predict's colour masks


def test_train_py_refuses_a_model_of_the_other_task_in_one_line(tmp_path, capsys):
    root = _det_folder(tmp_path / "data")
    with pytest.raises(ConfigError, match="early_concat is a segmentation model but dataset 'folder' provides "
                                          "detection targets"):
        train_script().main(["--dataset", "folder", "--data-root", str(root), *SEG_MODEL, *TINY,
                              "--out-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_interpret_cli_on_a_folder(tmp_path, capsys):
    root = _seg_folder(tmp_path / "data")
    rc = cli_main(["interpret", "early_concat_resnet18", "--dataset", "folder", "--data-root", str(root),
                   "--split", "train", "--image-size", "32", "40", "--metrics", "contribution", 
                   "--no-progress", "--out", str(tmp_path / "rep")])
    assert rc == 0
    res = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(res["contribution"]["shapley"]) == {"rgb", "depth"}
    rc = cli_main(["interpret", "early_concat_resnet18", "--dataset", "folder", "--data-root", str(tmp_path),
                   "--out", str(tmp_path / "rep2")])
    assert rc == 2 and "no fusionzoo.yaml" in capsys.readouterr().err
    rc = cli_main(["interpret", "early_concat_resnet18", "--dataset", "folder", "--out", str(tmp_path / "rep3")])
    assert rc == 2 and "needs --data-root (see docs/custom_data.md)" in capsys.readouterr().err


def _doc_yaml(marker: str) -> str:
    """The YAML block of docs/custom_data.md that contains ``marker``."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "custom_data.md").read_text(), re.DOTALL)
    return next(b for b in blocks if marker in b)


def test_the_documented_schema_example_is_valid(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\n")
    (tmp_path / "val").mkdir()
    (tmp_path / "fusionzoo.yaml").write_text(_doc_yaml("name: my_rooms"))
    spec = load_folder_spec(tmp_path)
    assert spec.classes == ("floor", "wall", "chair") and list(spec.modalities) == ["rgb", "depth"]
    assert spec.modalities["depth"].options == {"scale": 1000} and spec.stats["depth"].mean == (2.1,)
    assert spec.splits == {"train": tmp_path / "splits" / "train.txt", "val": tmp_path / "val"}


def test_train_py_trains_on_a_folder_made_from_shared_llvip(tmp_path, shared_data):
    """The worked example of docs/custom_data.md, its YAML pointed at the shared frames (never copied)."""
    llvip = shared_data / "llvip"
    if not (llvip / "rgb").is_dir():
        pytest.skip(f"{llvip} is absent (set FUSIONZOO_SHARED_DATA to the shared data folder)")
    root = tmp_path / "llvip_folder"
    root.mkdir()
    (root / "fusionzoo.yaml").write_text(_doc_yaml("name: llvip_frames").replace("/work/shared/data", str(shared_data)))
    ds = create_dataset("folder", root, split="train")
    assert len(ds) == 5 and ds.classes == ["person"] and ds.modalities == ("rgb", "thermal")
    raw = ds.raw(0)
    assert raw["rgb"].shape == (1024, 1280, 3) and raw["thermal"].shape == (1024, 1280)
    assert raw["boxes"].tolist() == [[1018, 330, 1137, 588], [1204, 304, 1280, 531]]  # 190001, as documented
    summary = train_script().main(["--dataset", "folder", "--data-root", str(root), *DET_MODEL, *TINY,
                                    "--image-size", "64,80", "--max-steps-per-epoch", "1",
                                    "--out-dir", str(tmp_path / "runs"), "--run-name", "llvip"])
    assert summary["task"] == "detection" and summary["steps"] == 1 and 0 <= summary["best_value"] <= 1
    saved = json.loads((tmp_path / "runs" / "llvip" / "best" / "config.json").read_text())
    assert saved["modalities"] == ["rgb", "thermal"] and saved["extra"]["palette"] == [[220, 20, 60]]
