"""datasets/<name>/prepare.py on tiny fakes of each official layout -> readable prepared layouts."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionzoo.data import create_dataset

REPO = Path(__file__).resolve().parents[1]
H, W = 24, 32


def run_prepare(name: str, *args: str | Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["prepare.py", *map(str, args)])
    runpy.run_path(str(REPO / "datasets" / name / "prepare.py"), run_name="__main__")


def img(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def voc(path: Path, objects: list[tuple[str, int, int, int, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for n, a, b, c, d in objects
    )
    path.write_text(f"<annotation><size><width>{W}</width><height>{H}</height></size>{objs}</annotation>")


def rand(rng, *shape, hi=256, dtype=np.uint8):
    return rng.integers(0, hi, shape).astype(dtype)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "datasets").iterdir() if p.is_dir()))
def test_every_dataset_folder_has_readme_and_prepare(name):
    readme = (REPO / "datasets" / name / "README.md").read_text()
    for section in ("Official source", "Licence", "Prepared layout", "Classes", "prepare.py"):
        assert section in readme, f"datasets/{name}/README.md lacks {section!r}"
    assert (REPO / "datasets" / name / "prepare.py").is_file()
    assert name in create_dataset.__globals__["_REGISTRY"]


def test_mfnet(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    src = tmp_path / "ir_seg_dataset"
    ids = {"train": ["00001D", "00002N"], "val": ["00003D"], "test": ["00004D", "00005N"]}
    for split, lst in ids.items():
        (src / f"{split}.txt").parent.mkdir(parents=True, exist_ok=True)
        (src / f"{split}.txt").write_text("\n".join(lst) + "\n")
        for sid in lst:
            img(src / "images" / f"{sid}.png", rand(rng, H, W, 4))
            img(src / "labels" / f"{sid}.png", rand(rng, H, W, hi=9))
    run_prepare("mfnet", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    ds = create_dataset("mfnet", root=tmp_path / "out", split="test_night")
    assert ds.ids == ["00005N"]
    four = np.asarray(Image.open(src / "images" / "00005N.png"))
    s = ds[0]
    assert torch.allclose(s["thermal"][0], torch.from_numpy(four[..., 3] / 255.0).float())
    assert torch.equal(
        s["mask"], torch.from_numpy(np.array(Image.open(src / "labels" / "00005N.png"))).long()
    )
    assert len(create_dataset("mfnet", root=tmp_path / "out", split="train")) == 2


def test_pst900(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    src = tmp_path / "PST900_RGBT_Dataset"
    for split in ("train", "test"):
        for name in ("0", "1"):
            img(src / split / "rgb" / f"{name}.png", rand(rng, H, W, 3))
            img(src / split / "thermal" / f"{name}.png", rand(rng, H, W))
            img(src / split / "labels" / f"{name}.png", rand(rng, H, W, hi=5))
    run_prepare("pst900", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    ds = create_dataset("pst900", root=tmp_path / "out", split="test")
    assert ds.ids == ["test_0", "test_1"] and ds[1]["mask"].max() <= 4


def test_pst900_partial_download_only_test(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "PST900_RGBT_Dataset"
    img(src / "test" / "rgb" / "0.png", rand(rng, H, W, 3))
    img(src / "test" / "thermal" / "0.png", rand(rng, H, W))
    img(src / "test" / "labels" / "0.png", rand(rng, H, W, hi=5))
    run_prepare("pst900", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    assert "train" in capsys.readouterr().err and not (tmp_path / "out" / "splits" / "train.txt").exists()
    assert create_dataset("pst900", root=tmp_path / "out", split="test").ids == ["test_0"]


def test_llvip_voc_boxes(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    src = tmp_path / "LLVIP"
    for split, sid in (("train", "010001"), ("test", "190001")):
        img(src / "visible" / split / f"{sid}.jpg", rand(rng, H, W, 3))
        img(src / "infrared" / split / f"{sid}.jpg", rand(rng, H, W, 3))
        voc(src / "Annotations" / f"{sid}.xml", [("person", 3, 4, 10, 20)])
    run_prepare("llvip", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    s = create_dataset("llvip", root=tmp_path / "out", split="train")[0]
    assert s["boxes"].tolist() == [[3, 4, 10, 20]] and s["labels"].tolist() == [0]
    assert s["thermal"].shape == (1, H, W)


def test_flir_aligned_drops_other_classes(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(3)
    src = tmp_path / "FLIR_aligned"
    for sid in ("FLIR_00001", "FLIR_00002"):
        img(src / "JPEGImages" / f"{sid}_RGB.jpg", rand(rng, H, W, 3))
        img(src / "JPEGImages" / f"{sid}_PreviewData.jpeg", rand(rng, H, W))
        voc(src / "Annotations" / f"{sid}_PreviewData.xml", [("car", 1, 2, 9, 9), ("dog", 0, 0, 4, 4)])
    (src / "align_train.txt").write_text("FLIR_00001_PreviewData\n")
    (src / "align_validation.txt").write_text("FLIR_00002_PreviewData\n")
    run_prepare("flir_aligned", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    assert "dog" in capsys.readouterr().out
    s = create_dataset("flir_aligned", root=tmp_path / "out", split="test")[0]
    assert s["labels"].tolist() == [2] and s["meta"]["id"] == "FLIR_00002"


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_kaist_bbgt_keeps_ignore_regions_and_occlusion(tmp_path, monkeypatch, ext):
    rng = np.random.default_rng(4)
    src = tmp_path / "kaist"
    for entry in ("set00/V000/I00000", "set06/V001/I00019"):
        s, v, f = entry.split("/")
        img(src / "images" / s / v / "visible" / f"{f}{ext}", rand(rng, H, W, 3))
        img(src / "images" / s / v / "lwir" / f"{f}{ext}", rand(rng, H, W, 3))
        ann = src / "annotations" / s / v / f"{f}.txt"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text("% bbGt version=3\nperson 10 5 8 16 1 0 0 0 0 0 0\npeople 1 1 5 5 0 0 0 0 0 0 0\n"
                       "person 20 2 6 10 2 0 0 0 0 1 0\n")
    (src / "imageSets").mkdir()
    (src / "imageSets" / "train-all-02.txt").write_text("set00/V000/I00000\n")
    (src / "imageSets" / "test-all-20.txt").write_text("set06/V001/I00019\n")
    run_prepare("kaist", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    ds = create_dataset("kaist", root=tmp_path / "out", split="test")
    s = ds[0]
    assert s["meta"]["id"] == "set06_V001_I00019" and ds.path("rgb", ds.ids[0]).suffix == ext
    assert s["boxes"].tolist() == [[10, 5, 18, 21], [1, 1, 6, 6], [20, 2, 26, 12]]  # bbGt x y w h -> xyxy
    assert s["labels"].tolist() == [0, 0, 0]
    assert s["ignore"].tolist() == [False, True, True]  # "people", and a person with bbGt ign = 1
    assert s["occlusion"].tolist() == [1, 0, 2]


def test_m3fd_seeded_split(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    src = tmp_path / "M3FD_Detection"
    for i in range(5):
        img(src / "Vis" / f"{i:05d}.png", rand(rng, H, W, 3))
        img(src / "Ir" / f"{i:05d}.png", rand(rng, H, W))
        voc(src / "Annotation" / f"{i:05d}.xml", [("People", 2, 2, 6, 12), ("Truck", 5, 5, 30, 20)])
    run_prepare("m3fd", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)
    train = create_dataset("m3fd", root=tmp_path / "out", split="train")
    test = create_dataset("m3fd", root=tmp_path / "out", split="test")
    assert len(train) == 4 and len(test) == 1 and not set(train.ids) & set(test.ids)
    assert train[0]["labels"].tolist() == [0, 5]


def test_m3fd_warns_about_an_empty_split(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(5)
    src = tmp_path / "M3FD_Detection"
    for i in range(2):
        img(src / "Vis" / f"{i:05d}.png", rand(rng, H, W, 3))
        img(src / "Ir" / f"{i:05d}.png", rand(rng, H, W))
        voc(src / "Annotation" / f"{i:05d}.xml", [("People", 2, 2, 6, 12)])
    run_prepare("m3fd", "--source", src, "--out", tmp_path / "out", monkeypatch=monkeypatch)  # 0.2 * 2 -> 0
    err = capsys.readouterr().err
    assert "warning: split 'test' is empty" in err and not (tmp_path / "out" / "splits" / "test.txt").exists()
    assert len(create_dataset("m3fd", root=tmp_path / "out", split="train")) == 2


def test_nyuv2_from_matlab_v73(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py", reason="NYUDv2 preparation reads MATLAB v7.3 files with h5py")
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(6)
    n = 3
    labels894 = rng.integers(0, 895, (n, W, H)).astype(np.uint16)  # MATLAB column-major: (N, W, H)
    labels894[:, 0, 0] = 0
    with h5py.File(tmp_path / "nyu.mat", "w") as f:
        f["images"] = rand(rng, n, 3, W, H)
        f["depths"] = rng.uniform(0.5, 5, (n, W, H)).astype(np.float32)
        f["rawDepths"] = np.zeros((n, W, H), np.float32)
        f["labels"] = labels894
    mapping = rng.integers(1, 41, (1, 894))
    scipy_io.savemat(tmp_path / "classMapping40.mat", {"mapClass": mapping})
    scipy_io.savemat(
        tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2]])}
    )
    run_prepare(
        "nyuv2",
        "--out",
        tmp_path / "out",
        "--mat",
        tmp_path / "nyu.mat",
        "--splits",
        tmp_path / "splits.mat",
        "--mapping",
        tmp_path / "classMapping40.mat",
        "--hha",
        monkeypatch=monkeypatch,
    )
    ds = create_dataset("nyuv2", root=tmp_path / "out", split="train", modalities=("rgb", "depth", "hha"))
    assert ds.ids == ["0001", "0003"]
    s = ds[1]  # frame 3 = index 2
    expected = mapping[0][labels894[2].T.astype(int) - 1] - 1
    expected[labels894[2].T == 0] = 255
    assert torch.equal(s["mask"], torch.from_numpy(expected).long())
    assert torch.allclose(
        s["depth"][0],
        torch.from_numpy(
            np.round(np.asarray(h5py.File(tmp_path / "nyu.mat")["depths"][2]).T * 1000) / 1000
        ).float(),
        atol=1e-6,
    )
    assert s["hha"].shape == (3, H, W)
    assert len(create_dataset("nyuv2", root=tmp_path / "out", split="test")) == 1
