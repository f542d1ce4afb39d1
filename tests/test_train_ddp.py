"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch.

The one-process reference trains in this process (train.py's main): a subprocess would only add
the imports of a new interpreter; the two torchrun processes are the subject of the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from process_helpers import check_completed, child_env, free_port, train_script

from fusionzoo.weights import load_tensors

ROOT = Path(__file__).resolve().parents[1]

# BatchNorm statistics cover the global batch (sync_bn, all-reduce BN on gloo) and decoder dropout
# is off (its masks are per process): then the two set-ups compute the same averaged gradient.
# Modality dropout stays off here: a withheld stream feeds BatchNorm a constant, where the
# variance is ~0 and 1/sqrt(var + eps) magnifies rounding differences (its decisions are a pure
# function of (seed, step), tested in test_engine_loop.py). SGD, not
# Adam: parameters in front of a BatchNorm (the decoder's linear biases) have an analytically zero
# gradient, i.e. float noise of ~1e-9 that differs with the reduction order, and Adam's first
# steps turn any non-zero gradient into a +-lr update; SGD keeps the noise at noise level.
# ESANet's SE-add middle fusion on timm's 1.1 M-parameter test_resnet: esanet_resnet18's code paths.
COMMON = ["--model", "esanet", "--image-size", "32,32", "--train-samples", "8", "--val-samples", "3",
          "--epochs", "2", "--threads", "1", "--no-progress", "--seed", "1", "--optimizer", "sgd", "--lr", "0.05",
          "--model-kwargs", "{encoder: test_resnet, dropout: 0.0}", "--log-interval", "1", "--no-report"]

pytestmark = pytest.mark.usefixtures("one_thread")  # train.py's --threads 1 sets the torch threads of this process


def test_two_process_ddp_equals_single_process(tmp_path):
    train_script().main([*COMMON, "--batch-size", "4", "--out-dir", str(tmp_path), "--run-name", "single"])
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), str(ROOT / "train.py"), *COMMON, "--batch-size", "2",
         "--out-dir", str(tmp_path), "--run-name", "ddp"],
        capture_output=True, text=True, env=child_env(), timeout=600, cwd=tmp_path, check=False)
    check_completed(ddp)

    a = load_tensors(tmp_path / "single" / "checkpoints" / "last" / "model.safetensors")
    b = load_tensors(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, f"largest weight difference {worst}"

    recs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("single", "ddp")}
    train = {n: [r for r in rs if r["kind"] == "train"] for n, rs in recs.items()}
    assert [r["step"] for r in train["ddp"]] == [r["step"] for r in train["single"]] == [1, 2, 3, 4]
    # per-step losses are the global batch mean (all-reduced), not rank 0's half of the batch
    for rs, rd in zip(train["single"], train["ddp"]):
        assert abs(rs["loss"] - rd["loss"]) < 1e-4 * max(1.0, abs(rs["loss"])), (rs["loss"], rd["loss"])
    ep = {n: [r for r in rs if r["kind"] == "epoch"] for n, rs in recs.items()}
    # the validation confusion matrix is summed over ranks: every one of the 3 images counted once
    assert [r["val_pixels"] for r in ep["ddp"]] == [r["val_pixels"] for r in ep["single"]] == [3 * 32 * 32] * 2
    for rs, rd in zip(ep["single"], ep["ddp"]):
        assert abs(rs["train_loss"] - rd["train_loss"]) < 1e-4  # mean over all ranks' samples
        assert abs(rs["val_miou"] - rd["val_miou"]) < 1e-3
    assert not (tmp_path / "ddp" / "checkpoints" / "last" / ".last.old").exists()
    # only rank 0 wrote: one config, one summary
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["_resolved"]["world_size"] == 2
