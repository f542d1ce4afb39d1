"""Issue 14 ("nothing silent"), data and model side: bad inputs fail or warn, naming the file.

Items: 1 (non-finite depth/thermal repaired with a count, or refused), 2 (8-bit depth, 12-bit
thermal in 16 bits), 3 (sha256 manifest of save_pretrained folders), 7 (missing files found when
the dataset is built), 15 (float64 input), 16 (batch size 1 in train mode at 32x32).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fusionzoo as fz
from fusionzoo.data import DataError, create_dataset
from fusionzoo.data.fixtures import write_fixture
from fusionzoo.hub import from_pretrained, save_pretrained
from fusionzoo.weights import CheckpointError

SIZE = (24, 32)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def nyu(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "nyuv2", "nyuv2", num_samples=3, image_size=SIZE, splits=("train",))


@pytest.fixture
def mfnet(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "mfnet", "mfnet", num_samples=2, image_size=SIZE, splits=("train",))


def _replace(root: Path, folder: str, ext: str, make) -> None:
    """Replace every file of ``folder`` by ``make(sample_index)`` saved as ``<id><ext>``."""
    ids = sorted(p.stem for p in (root / folder).iterdir())
    for f in (root / folder).iterdir():
        f.unlink()
    for i, sid in enumerate(ids):
        arr = make(i)
        if ext == ".npy":
            np.save(root / folder / f"{sid}{ext}", arr)
        else:
            Image.fromarray(arr).save(root / folder / f"{sid}{ext}")


# --- item 1: non-finite depth and thermal -----------------------------------------------------


def test_nonfinite_depth_is_repaired_with_a_count_once_per_folder(nyu):
    def depth(i):
        d = np.full(SIZE, 2.0, np.float32)
        d[3, 4:8] = np.nan  # 4 bad pixels in every file
        return d

    _replace(nyu, "depth", ".npy", depth)
    ds = create_dataset("nyuv2", root=nyu)
    with pytest.warns(UserWarning, match=r"depth/train_0000\.npy: 4 NaN/inf/negative depth pixels set to 0"):
        raw = ds.raw(0)["depth"]
    assert raw[3, 4:8].tolist() == [0, 0, 0, 0] and np.isfinite(raw).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same folder is reported once, not once per sample
        ds.raw(1)
    with pytest.raises(DataError, match=r"train_0000\.npy: depth has 4 NaN/inf/negative"):
        create_dataset("nyuv2", root=nyu, nonfinite="raise").raw(0)


def test_nonfinite_float_thermal_is_repaired_or_refused(mfnet):
    def thermal(i):
        t = np.full(SIZE, 0.5, np.float32)
        t[2, :3] = [np.nan, np.inf, -np.inf]
        return t

    _replace(mfnet, "thermal", ".tif", thermal)
    ds = create_dataset("mfnet", root=mfnet)
    with pytest.warns(UserWarning, match=r"thermal/train_0000\.tif: 3 NaN/inf thermal pixels set to 0"):
        raw = ds.raw(0)["thermal"]
    assert np.isfinite(raw).all() and raw[2, :3].tolist() == [0, 0, 0] and raw[0, 0] == np.float32(0.5)
    with pytest.raises(DataError, match=r"train_0000\.tif: thermal has 3 NaN/inf"):
        create_dataset("mfnet", root=mfnet, nonfinite="raise").raw(0)


# --- item 2: encodings ------------------------------------------------------------------------


def test_8bit_depth_png_is_refused_naming_the_file(nyu):
    _replace(nyu, "depth", ".png", lambda i: np.full(SIZE, 120, np.uint8))
    with pytest.raises(DataError, match=r"depth/train_0000\.png: depth is an 8-bit image.*millimetres"):
        create_dataset("nyuv2", root=nyu).raw(0)


def test_millimetres_in_npy_depth_are_caught(nyu):
    _replace(nyu, "depth", ".npy", lambda i: np.full(SIZE, 2500, np.uint16))
    with pytest.raises(DataError, match=r"train_0000\.npy: \.npy depth holds uint16.*millimetres"):
        create_dataset("nyuv2", root=nyu).raw(0)
    _replace(nyu, "depth", ".npy", lambda i: np.full(SIZE, 2500.0, np.float32))
    with pytest.warns(UserWarning, match=r"train_0000\.npy: float depth up to 2500 m.*millimetres"):
        create_dataset("nyuv2", root=nyu).raw(0)


def test_12bit_thermal_in_16bit_warns_once_and_thermal_bits_fixes_it(mfnet):
    _replace(mfnet, "thermal", ".png", lambda i: np.full(SIZE, 2000 + i, np.uint16))
    ds = create_dataset("mfnet", root=mfnet)
    with pytest.warns(UserWarning, match=r"thermal/train_0000\.png: 16-bit thermal.*thermal_bits=12"):
        raw = ds.raw(0)["thermal"]
    assert raw.max() == pytest.approx(2000 / 65535)  # values are kept as declared, but not silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.raw(1)
        fixed = create_dataset("mfnet", root=mfnet, thermal_bits=12).raw(0)["thermal"]
    assert fixed.max() == pytest.approx(2000 / 4095)
    _replace(mfnet, "thermal", ".png", lambda i: np.full(SIZE, 5000, np.uint16))
    with pytest.raises(DataError, match=r"train_0000\.png: thermal value 5000 exceeds 4095.*thermal_bits=12"):
        create_dataset("mfnet", root=mfnet, thermal_bits=12).raw(0)


# --- item 7: missing files found at construction ----------------------------------------------


def test_missing_files_are_listed_when_the_dataset_is_built(nyu):
    (nyu / "rgb" / "train_0001.png").unlink()
    (nyu / "depth" / "train_0002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 file\(s\) missing") as err:
        create_dataset("nyuv2", root=nyu)
    assert "rgb/train_0001.png" in str(err.value) and "depth/train_0002.png" in str(err.value)
    assert "splits/train.txt" in str(err.value)  # the fix: drop the ids or re-run prepare.py


# --- item 3: save_pretrained manifest ---------------------------------------------------------


def test_bit_flipped_pretrained_weights_are_refused(tmp_path):
    model = fz.create_model("early_concat", encoder="resnet10t", num_classes=2)
    folder = save_pretrained(model, tmp_path / "best")
    bad = tmp_path / "flipped"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte inside the tensor data: still a valid safetensors file
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped/model\.safetensors is corrupt: sha256"):
        from_pretrained(bad)
    files = json.loads((folder / "config.json").read_text())["files"]
    assert set(files) == {"model.safetensors"} and len(files["model.safetensors"]["sha256"]) == 64
    # (the intact folder loads: tests/test_engine_hub.py round-trips one with its manifest)


# --- items 15 and 16: model input check -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return fz.create_model("early_concat", encoder="resnet10t", num_classes=2)


def _inputs(batch: int, h: int, w: int = 32, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"rgb": torch.zeros(batch, 3, h, w, dtype=dtype), "depth": torch.zeros(batch, 1, h, w, dtype=dtype)}


def test_float64_input_is_refused_with_the_fix(tiny):
    with pytest.raises(ValueError, match=r"input 'rgb' has dtype torch\.float64 but the model's weights are torch\.float32.*\.float\(\)"):
        tiny.eval()(_inputs(1, 32, dtype=torch.float64))


def test_batch_of_one_in_train_mode_at_32px_names_the_fix(tiny):
    with pytest.raises(ValueError, match=r"batch size 1 in train mode.*32x32.*batch size >= 2"):
        tiny.train()(_inputs(1, 32))
    with torch.no_grad():
        assert tiny.train()(_inputs(1, 32, 64)).shape == (1, 2, 32, 64)  # a 1x2 stride-32 grid trains with B=1
        assert tiny.eval()(_inputs(1, 32)).shape == (1, 2, 32, 32)
