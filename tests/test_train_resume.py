"""train.py end to end: a run SIGKILLed mid-epoch and resumed ends with the same weights as an
uninterrupted run (bit for bit), and the run folder holds what the docs promise.

The killed run is a process of its own (a real SIGKILL at a step); the uninterrupted reference and
the resume (from the killed run's files alone) train in this process, sparing two interpreters'
imports (~5 s of CPU each).
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import child_env, train_script

from fusionzoo.cli import run_command
from fusionzoo.engine.config import ConfigError
from fusionzoo.weights import load_tensors

ROOT = Path(__file__).resolve().parents[1]

# 6 samples / batch 2 = 3 steps per epoch, 2 epochs; checkpoints every 2 steps, so the kill after
# step 5 leaves the mid-epoch checkpoint of step 4 (epoch 1, batch 1) to resume from.
# Middle fusion (two encoders, SE fusion) on timm's 1M-parameter test_resnet: the same code paths as
# esanet_resnet18 at a 20th of the checkpoint size (the fault tests write several checkpoints).
TINY = ["--model", "esanet", "--model-kwargs", "{encoder: test_resnet}", "--image-size", "32,32", "--train-samples", "6", "--val-samples", "2",
        "--batch-size", "2", "--epochs", "2", "--checkpoint-interval", "2", "--threads", "1",
        "--no-progress", "--seed", "3", "--log-interval", "1", "--modality-dropout", "0.5", "--no-report"]


def _epoch_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process run's --threads 1 sets this process's threads


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs")
    train_script().main([*TINY, "--run-name", "straight", "--out-dir", str(out)])
    killed = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--run-name", "killed", "--kill-after-step",
                             "5", "--out-dir", str(out)], capture_output=True, text=True, env=child_env(), timeout=600,
                            cwd=out, check=False)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    state = json.loads((out / "killed" / "checkpoints" / "last" / "state.json").read_text())
    position = state["trainer"]["position"]
    assert (position["epoch"], position["batches_done"], position["global_step"]) == (1, 1, 4)
    with contextlib.redirect_stdout(io.StringIO()) as resumed:
        train_script().main(["--resume", str(out / "killed"), "--out-dir", str(out)])
    return out, resumed.getvalue()


def test_resume_after_sigkill_gives_identical_weights(runs):
    out, _ = runs
    a = load_tensors(out / "straight" / "checkpoints" / "last" / "model.safetensors")
    b = load_tensors(out / "killed" / "checkpoints" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    oa = load_tensors(out / "straight" / "checkpoints" / "last" / "optimizer.safetensors")
    ob = load_tensors(out / "killed" / "checkpoints" / "last" / "optimizer.safetensors")
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resumed_log_matches_uninterrupted_log(runs):
    out, resumed = runs
    assert "resumed" in resumed and "step 4" in resumed
    a, b = _epoch_records(out / "straight"), _epoch_records(out / "killed")
    assert [r["epoch"] for r in b] == [0, 1]  # no duplicated epoch after the replayed steps
    for ra, rb in zip(a, b):
        assert ra["val_miou"] == rb["val_miou"] and ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-12)
    steps = [json.loads(line)["step"] for line in (out / "killed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 7))


def test_run_folder_contents(runs):
    out, _ = runs
    run = out / "straight"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["_resolved"]["modalities"] == ["rgb", "depth"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["best_val_miou"] <= 1
    best = json.loads((run / "best" / "config.json").read_text())
    assert best["model"]["name"] == "esanet" and best["class_names"][0] == "background"
    assert _epoch_records(run)[-1]["val_pixels"] == 2 * 32 * 32


def _train_command(args: list[str], out: Path) -> int:
    """train.py's command in this process (user errors: one line on stderr, status 2), as
    ``python train.py`` runs it, without a new interpreter's imports."""
    return run_command(train_script().main, [*args, "--out-dir", str(out)], prog="train.py")


def test_resume_refuses_a_changed_recipe(runs, tmp_path, capsys):
    out, _ = runs
    assert _train_command(["--resume", str(out / "straight"), "--lr", "0.5"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "cannot change lr" in err and "exact resume" in err


def test_unknown_flag_lists_valid_keys(tmp_path, capsys):
    assert _train_command(["--epoch", "3"], tmp_path) == 2
    err = capsys.readouterr().err
    assert "Valid keys:" in err and "did you mean epochs" in err


def test_single_modality_middle_fusion_explains_alternatives():
    from fusionzoo.engine.builders import build_model
    from fusionzoo.engine.config import TrainConfig

    with pytest.raises(ConfigError, match="--train-missing"):
        build_model(TrainConfig(modalities=("rgb",)), ("rgb",), 5)
