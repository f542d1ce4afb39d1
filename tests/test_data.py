"""Dataset registry, prepared-layout readers, collate, and bad-data errors (tiny fixtures in tmp_path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo import data
from fusionzoo.data import DataError, collate, create_dataset, list_datasets
from fusionzoo.data.fixtures import write_fixture

BENCHMARKS = ["nyuv2", "sunrgbd", "mfnet", "pst900", "llvip", "flir_aligned", "kaist", "m3fd"]
EXPECTED_CLASSES = {
    "nyuv2": 40,
    "sunrgbd": 37,
    "mfnet": 9,
    "pst900": 5,
    "llvip": 1,
    "flir_aligned": 3,
    "kaist": 1,
    "m3fd": 6,
}


@pytest.fixture
def nyu(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "nyuv2", "nyuv2", num_samples=2, image_size=(24, 32), splits=("train",))


# --- registry -------------------------------------------------------------------------------


def test_registry_lists_every_dataset():
    names = list_datasets()
    assert set(BENCHMARKS + ["synthetic_rgbd", "synthetic_rgbt"]) <= set(names)
    assert names == sorted(names)
    assert list_datasets("synthetic_*") == ["synthetic_rgbd", "synthetic_rgbt"]
    assert set(list_datasets(task="detection")) == {
        "llvip",
        "flir_aligned",
        "kaist",
        "m3fd",
        "folder",  # its YAML says segmentation or detection
        "synthetic_rgbd",
        "synthetic_rgbt",
    }
    assert "mfnet" in list_datasets(modality="thermal") and "nyuv2" not in list_datasets(modality="thermal")


def test_unknown_name_suggests_close_match():
    with pytest.raises(KeyError, match="nyuv2"):
        create_dataset("nyu_v2", root=".")


def test_unknown_kwarg_raises_type_error(nyu):
    with pytest.raises(TypeError, match="num_sample"):
        create_dataset("synthetic_rgbd", num_sample=3)
    with pytest.raises(TypeError, match="nyuv2"):
        create_dataset("nyuv2", root=nyu, colour=True)


def test_root_required_and_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="prepare.py"):
        create_dataset("mfnet")
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset("nyuv2", task="segmentation", modalities=("rgb",), num_classes=1)(object)


# --- readers --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_reader_contract(tmp_path, name):
    root = write_fixture(tmp_path / name, name, num_samples=2, image_size=(24, 32), splits=("train",))
    ds = create_dataset(name, root=root, split="train")
    entry = data.dataset_entry(name)
    assert len(ds) == 2
    assert ds.num_classes == EXPECTED_CLASSES[name] == entry.num_classes == len(ds.classes)
    assert len(ds.palette) == ds.num_classes and all(len(c) == 3 for c in ds.palette)
    assert ds.ignore_index == 255 and ds.modalities == entry.modalities
    s = ds[1]
    for m in ds.modalities:
        assert s[m].dtype == torch.float32 and s[m].shape == (3 if m == "rgb" else 1, 24, 32)
    assert s["meta"]["id"] == "train_0001" and s["meta"]["orig_size"] == (24, 32)
    assert set(s["meta"]["paths"]) >= set(ds.modalities)
    if "detection" in entry.task:
        assert s["boxes"].dtype == torch.float32 and s["boxes"].shape[1] == 4
        assert s["labels"].dtype == torch.int64 and len(s["labels"]) == len(s["boxes"])
        assert (s["boxes"][:, 2] > s["boxes"][:, 0]).all() and (s["boxes"][:, 3] <= 24).all()
    else:
        assert s["mask"].dtype == torch.int64
        valid = s["mask"][s["mask"] != 255]
        assert valid.max() < ds.num_classes and (s["mask"] == 255).any()


def test_depth_png_is_read_in_metres(nyu):
    depth = np.full((24, 32), 2500, np.uint16)
    depth[0, :5] = 0
    Image.fromarray(depth).save(nyu / "depth" / "train_0000.png")
    s = create_dataset("nyuv2", root=nyu)[0]
    assert torch.allclose(s["depth"][0, 1:], torch.tensor(2.5))
    assert (s["depth"][0, 0, :5] == 0).all()


def test_modalities_subset_and_unknown_modality(nyu):
    ds = create_dataset("nyuv2", root=nyu, modalities=("rgb",))
    assert "depth" not in ds[0] and ds.modalities == ("rgb",)
    with pytest.raises(ValueError, match="thermal"):
        create_dataset("nyuv2", root=nyu, modalities=("rgb", "thermal"))


def test_collate_stacks_tensors_and_lists_boxes(tmp_path):
    root = write_fixture(tmp_path / "m3fd", "m3fd", num_samples=3, image_size=(24, 32), splits=("train",))
    ds = create_dataset("m3fd", root=root)
    batch = collate([ds[0], ds[1], ds[2]])
    assert batch["rgb"].shape == (3, 3, 24, 32) and batch["thermal"].shape == (3, 1, 24, 32)
    assert isinstance(batch["boxes"], list) and len(batch["boxes"]) == 3
    assert [b.shape[0] for b in batch["boxes"]] == [len(lab) for lab in batch["labels"]]
    assert [m["id"] for m in batch["meta"]] == ["train_0000", "train_0001", "train_0002"]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert next(iter(loader))["rgb"].shape == (2, 3, 24, 32)


def test_collate_rejects_size_mismatch():
    a = {"rgb": torch.zeros(3, 4, 4), "mask": torch.zeros(4, 4, dtype=torch.int64), "meta": {"id": "a"}}
    b = {"rgb": torch.zeros(3, 4, 5), "mask": torch.zeros(4, 5, dtype=torch.int64), "meta": {"id": "b"}}
    with pytest.raises(ValueError, match="'rgb'.*fixed output size"):
        collate([a, b])
    with pytest.raises(ValueError, match="empty"):
        collate([])


# --- bad data -------------------------------------------------------------------------------


def test_truncated_image_names_the_file(nyu):
    path = nyu / "rgb" / "train_0001.png"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    ds = create_dataset("nyuv2", root=nyu)
    ds[0]  # the other sample still reads
    with pytest.raises(DataError, match=r"train_0001\.png.*truncated"):
        ds[1]


def test_not_an_image_names_the_file(nyu):
    (nyu / "label" / "train_0000.png").write_text("this is not a png")
    with pytest.raises(DataError, match=r"label/train_0000\.png"):
        create_dataset("nyuv2", root=nyu)[0]


def test_modality_size_mismatch_names_both_files(nyu):
    Image.fromarray(np.zeros((20, 32), np.uint16)).save(nyu / "depth" / "train_0000.png")
    with pytest.raises(
        DataError, match=r"depth/train_0000\.png.*\(20, 32\).*rgb/train_0000\.png.*\(24, 32\)"
    ):
        create_dataset("nyuv2", root=nyu)[0]


def test_label_size_mismatch(nyu):
    Image.fromarray(np.zeros((24, 30), np.uint8)).save(nyu / "label" / "train_0000.png")
    with pytest.raises(DataError, match=r"label/train_0000\.png.*\(24, 30\)"):
        create_dataset("nyuv2", root=nyu)[0]


def test_label_out_of_range_but_255_allowed(nyu):
    label = np.zeros((24, 32), np.uint8)
    label[0] = 255
    label[1] = 39
    Image.fromarray(label).save(nyu / "label" / "train_0000.png")
    s = create_dataset("nyuv2", root=nyu)[0]
    assert (s["mask"][0] == 255).all() and (s["mask"][1] == 39).all()
    label[2, 3] = 40
    label[2, 4] = 200
    Image.fromarray(label).save(nyu / "label" / "train_0000.png")
    with pytest.raises(DataError, match=r"label/train_0000\.png.*\[40, 200\].*0\.\.39 or 255"):
        create_dataset("nyuv2", root=nyu)[0]


def test_colour_label_rejected(nyu):
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(nyu / "label" / "train_0000.png")
    with pytest.raises(DataError, match="single-channel"):
        create_dataset("nyuv2", root=nyu)[0]


def test_missing_split_file_lists_available(nyu):
    with pytest.raises(FileNotFoundError, match=r"splits/test\.txt.*\['train'\]"):
        create_dataset("nyuv2", root=nyu, split="test")


def test_missing_modality_folder(nyu):
    for f in (nyu / "depth").iterdir():
        f.unlink()
    (nyu / "depth").rmdir()
    with pytest.raises(FileNotFoundError, match=r"nyuv2/depth: modality folder 'depth' missing"):
        create_dataset("nyuv2", root=nyu)


def test_missing_label_folder_is_named_a_label_folder(nyu):
    for f in (nyu / "label").iterdir():
        f.unlink()
    (nyu / "label").rmdir()
    with pytest.raises(FileNotFoundError, match=r"nyuv2/label: label folder \(class-index PNGs\) 'label' missing"):
        create_dataset("nyuv2", root=nyu)


def test_missing_sample_file_and_missing_root(nyu, tmp_path):
    (nyu / "rgb" / "train_0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"rgb/train_0001\.png"):
        create_dataset("nyuv2", root=nyu)[1]
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        create_dataset("nyuv2", root=tmp_path / "nowhere")


def test_split_file_problems(nyu):
    (nyu / "splits" / "train.txt").write_text("train_0000\ntrain_0000\n")
    with pytest.raises(DataError, match="duplicated"):
        create_dataset("nyuv2", root=nyu)
    (nyu / "splits" / "train.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="no ids"):
        create_dataset("nyuv2", root=nyu)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0])
def test_nonfinite_depth_policy(nyu, bad):
    # Float depth maps (.npy, metres) may carry NaN/inf; the default policy makes them invalid (0)
    # and the normalized tensor is finite with those pixels exactly 0; "raise" names the file.
    for f in (nyu / "depth").iterdir():
        f.unlink()
    for sid in ("train_0000", "train_0001"):
        depth = np.full((24, 32), 3.0, np.float32)
        depth[5, 5:9] = bad
        depth[6, 0] = 0.0
        np.save(nyu / "depth" / f"{sid}.npy", depth)
    raw = create_dataset("nyuv2", root=nyu).raw(0)["depth"]
    assert raw[5, 5:9].tolist() == [0, 0, 0, 0] and raw[6, 0] == 0 and np.isfinite(raw).all()
    norm = create_dataset("nyuv2", root=nyu, transforms=data.eval_transforms(stats="nyuv2"))[0]["depth"][0]
    assert torch.isfinite(norm).all()
    assert norm[5, 5:9].tolist() == [0, 0, 0, 0] and norm[6, 0] == 0
    assert torch.allclose(norm[0, 0], torch.tensor((3.0 - 2.842) / 1.417), atol=1e-5)
    with pytest.raises(DataError, match=r"depth/train_0000\.npy.*4 NaN/inf/negative"):
        create_dataset("nyuv2", root=nyu, nonfinite="raise")[0]


def test_bad_box_files(tmp_path):
    root = write_fixture(tmp_path / "m3fd", "m3fd", num_samples=1, image_size=(24, 32), splits=("train",))
    box = root / "boxes" / "train_0000.txt"
    box.write_text("1 2 3 10 12\n0 -5 -5 8 40\n")
    s = create_dataset("m3fd", root=root)[0]
    assert s["boxes"].tolist() == [[2, 3, 10, 12], [0, 0, 8, 24]]  # clipped to the 24x32 image
    assert s["labels"].tolist() == [1, 0]
    box.write_text("7 2 3 10 12\n")
    with pytest.raises(DataError, match=r"train_0000\.txt:1: class 7 out of range 0\.\.5"):
        create_dataset("m3fd", root=root)[0]
    box.write_text("1 2 3 10\n")
    with pytest.raises(DataError, match=r"train_0000\.txt:1: expected"):
        create_dataset("m3fd", root=root)[0]
    box.write_text("1 10 3 2 12\n")
    with pytest.raises(DataError, match="degenerate"):
        create_dataset("m3fd", root=root)[0]


def test_thermal_three_channel_jpeg_becomes_one_channel(tmp_path):
    root = write_fixture(
        tmp_path / "kaist", "kaist", num_samples=1, image_size=(24, 32), splits=("train",), rgb_ext=".jpg"
    )
    t = np.asarray(Image.open(root / "thermal" / "train_0000.jpg"))
    Image.fromarray(np.repeat(t[:, :, None], 3, 2)).save(root / "thermal" / "train_0000.jpg", quality=100)
    s = create_dataset("kaist", root=root)[0]
    assert s["thermal"].shape == (1, 24, 32)
    assert 0 <= s["thermal"].min() and s["thermal"].max() <= 1
