"""Checkpoints: exact round trip, atomic replacement, clear errors for corrupt or foreign files."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fusionzoo.engine import checkpoint as ck
from fusionzoo.engine.checkpoint import load_checkpoint, resolve_checkpoint_dir, save_checkpoint
from fusionzoo.engine.optim import build_optimizer, build_scheduler
from fusionzoo.files import atomic_write_bytes
from fusionzoo.weights import CheckpointError, load_model_weights, load_tensors, save_tensors


class Tiny(nn.Module):
    """Same call signature as a fusion model: dict of modalities -> logits (B, K, H, W)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 4, 3, padding=1)
        self.depth = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(0.3)
        self.head = nn.Conv2d(4, num_classes, 1)

    def forward(self, inputs, missing=()):
        x = self.rgb(inputs["rgb"])
        if "depth" not in missing:
            x = x + self.depth(inputs["depth"])
        return self.head(self.drop(torch.relu(self.bn(x))))


def _setup(seed: int = 0, num_classes: int = 3):
    torch.manual_seed(seed)
    model = Tiny(num_classes)
    opt = build_optimizer(model, lr=1e-2, weight_decay=1e-2)
    sched = build_scheduler(opt, kind="poly", total_steps=20, warmup_steps=3, base_lr=1e-2)
    return model, opt, sched


def _steps(model, opt, sched, n: int) -> None:
    for _ in range(n):
        x = {"rgb": torch.randn(2, 3, 8, 8), "depth": torch.randn(2, 1, 8, 8)}  # global RNG on purpose
        y = torch.randint(0, 3, (2, 8, 8))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_round_trip_continues_exactly(tmp_path):
    model, opt, sched = _setup()
    _steps(model, opt, sched, 4)
    save_checkpoint(tmp_path / "last", model=model, optimizer=opt, scheduler=sched, state={"step": 4})
    _steps(model, opt, sched, 5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fopt, fsched = _setup(seed=123)  # different init and RNG: everything must come from disk
    torch.manual_seed(999)
    state = load_checkpoint(tmp_path / "last", model=fresh, optimizer=fopt, scheduler=fsched)
    assert state == {"step": 4}
    _steps(fresh, fopt, fsched, 5)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert fsched.get_last_lr() == sched.get_last_lr()


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, sched = _setup()
    _steps(model, opt, sched, 1)
    path = save_checkpoint(tmp_path / "last", model=model, optimizer=opt, scheduler=sched)
    assert sorted(os.listdir(path)) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no temporary leftovers


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path / "last", model=model, optimizer=opt, state={"step": 1})
    _steps(model, opt, sched, 1)

    real = ck.save_tensors
    calls = {"n": 0}

    def dying(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # die after the model file, before the optimizer file
            raise KeyboardInterrupt("simulated kill")
        return real(tensors, path, metadata)

    monkeypatch.setattr(ck, "save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last", model=model, optimizer=opt, state={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["last"]
    fresh, fopt, _ = _setup(seed=5)
    assert load_checkpoint(tmp_path / "last", model=fresh, optimizer=fopt) == {"step": 1}


def test_kill_between_renames_falls_back_to_old(tmp_path):
    model, _opt, _ = _setup()
    save_checkpoint(tmp_path / "last", model=model, state={"step": 7})
    os.replace(tmp_path / "last", tmp_path / ".last.old")  # state right after the first rename
    assert resolve_checkpoint_dir(tmp_path / "last") == tmp_path / ".last.old"
    assert load_checkpoint(tmp_path / "last", model=Tiny()) == {"step": 7}
    save_checkpoint(tmp_path / "last", model=model, state={"step": 8})  # recovers cleanly
    assert sorted(os.listdir(tmp_path)) == ["last"]


def test_truncated_weights_name_the_file(tmp_path):
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "last", model=model, optimizer=opt)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(path, model=Tiny())


def test_flipped_bytes_are_caught_by_the_manifest(tmp_path):
    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "last", model=model, optimizer=opt)
    f = path / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors is corrupt: sha256"):
        load_checkpoint(path, model=Tiny(), optimizer=build_optimizer(Tiny(), lr=1e-3, weight_decay=0.0))


def test_corrupt_state_json_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "last", model=Tiny())
    (path / "state.json").write_text('{"format_version": 1, "fil')
    with pytest.raises(CheckpointError, match=r"state\.json is corrupt or truncated"):
        load_checkpoint(path, model=Tiny())


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_standalone_safetensors_truncation(tmp_path, cut):
    save_tensors({"w": torch.randn(5, 5)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"w\.safetensors is corrupt or truncated"):
        load_tensors(tmp_path / "w.safetensors")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing"):
        load_checkpoint(tmp_path / "nothing", model=Tiny())


def test_other_class_count_lists_shape_mismatches(tmp_path):
    save_tensors(Tiny(3).state_dict(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model_weights(Tiny(5), tmp_path / "m.safetensors")
    msg = str(e.value)
    assert "head.weight (checkpoint (3, 4, 1, 1), model (5, 4, 1, 1))" in msg
    assert "head.bias" in msg and "m.safetensors" in msg


def test_other_model_lists_missing_and_unexpected_keys(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    save_tensors(other.state_dict(), tmp_path / "m.safetensors")
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_model_weights(model, tmp_path / "m.safetensors")
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "rgb.weight" in msg
    assert "unexpected key(s)" in msg and "0.weight" in msg
    for k, v in model.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_tied_weights_are_saved(tmp_path):
    lin = nn.Linear(4, 4)
    tensors = {"a": lin.weight, "b": lin.weight}
    save_tensors(tensors, tmp_path / "t.safetensors")
    out = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(out["a"], out["b"])


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_bytes(p, b"old")
    atomic_write_bytes(p, b"new content")
    assert p.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["x.json"]
