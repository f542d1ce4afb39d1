"""save_pretrained / from_pretrained: local folders and hub ids through an offline cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fusionzoo as fz
from fusionzoo.hub import from_pretrained, save_pretrained
from fusionzoo.weights import CheckpointError

NAME = "early_concat_resnet18"  # smallest registered model: one ResNet-18


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = fz.create_model(NAME, num_classes=3, modalities=("rgb", "depth")).eval()
    folder = tmp_path_factory.mktemp("pretrained") / "tiny"
    save_pretrained(model, folder, class_names=["a", "b", "c"],
                    normalization={"depth": {"mean": [2.8], "std": [1.4]}}, extra={"val_miou": 0.5})
    x = {"rgb": torch.randn(1, 3, 32, 32), "depth": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        y = model(x)
    return model, folder, x, y


def test_local_round_trip(saved):
    model, folder, x, y = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(folder)
    assert loaded.num_classes == 3 and tuple(loaded.modalities) == ("rgb", "depth")
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    assert loaded.pretrained_cfg["class_names"] == ["a", "b", "c"]
    assert loaded.pretrained_cfg["normalization"]["depth"]["std"] == [1.4]
    assert fz.from_pretrained is from_pretrained or callable(fz.from_pretrained)


def _hub_cache(root, repo_id: str, folder) -> str:
    """Lay out `folder` as huggingface-hub's cache does: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, snap / f.name)
    return str(root)


def test_hub_id_resolves_offline_through_the_cache(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    _, folder, x, y = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-fusion", folder)
    loaded = from_pretrained("someone/tiny-fusion", cache_dir=cache)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        from_pretrained("someone/not-cached", cache_dir=cache)


def test_config_can_only_name_registered_models(saved, tmp_path):
    _, folder, _, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["name"] = "os.system"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="unknown model"):
        from_pretrained(bad)


def test_corrupt_weights_name_the_file(saved, tmp_path):
    _, folder, _, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt or truncated"):
        from_pretrained(bad)


def test_class_count_mismatch_lists_keys(saved, tmp_path):
    _, folder, _, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_classes"] = 5
    cfg["class_names"] = None
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*\(checkpoint \(3,"):
        from_pretrained(bad)


def test_not_a_directory_or_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        from_pretrained(tmp_path / "missing" / "dir")


def test_save_rejects_plain_modules(tmp_path):
    with pytest.raises(TypeError, match="registry config"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
