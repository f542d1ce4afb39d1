"""Interpretation under torchrun: 2 CPU processes (gloo) give the numbers of one process.

``torchrun --nproc-per-node 2 -m fusionzoo.cli interpret MODEL_DIR`` shards the batches over the
processes (batch ``b`` in process ``b mod 2``) and sums every accumulator over them: streamed
moments (CKA, reliance, semantic variance, effective rank), per-coalition confusion matrices
under every removal policy, PID counts, the bootstrap replicates and block weights; Grad-CAM and
the display images come from process 0, which runs the first batch. The test compares every
number of ``metrics.json`` (values and intervals) with a one-process run of the same command.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import torch
from process_helpers import check_completed, child_env, free_port

import fusionzoo as fz
from fusionzoo.cli import main

# 10 images in batches of 4: three batches (the last of 2), two in process 0 and one in process 1;
# fewer images than bootstrap blocks (20), so the processes allocate different blocks.
# 50 replicates: every interval is still compared, at a quarter of the default's bootstrap cost.
ARGS = ["--num-samples", "10", "--image-size", "32", "40", "--batch-size", "4", "--threads", "1", "--no-progress",
        "--device", "cpu", "--replicates", "50"]


def _numbers(tree, path=""):
    """Every number of a JSON tree, by path (lists by position)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}.{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)
    elif tree is None:
        yield path, math.nan


def _tolerance(path: str) -> float:
    """1e-10 relative; effective rank 1e-6: it takes square roots of the scatter's eigenvalues,
    and the eigenvalues at rounding level of a rank-deficient tap (1e-16 of the largest, from
    sums added in another order) become singular values of 1e-8."""
    return 1e-6 if path.startswith("effective_rank.") else 1e-10


def test_two_process_interpret_equals_one_process(tmp_path):
    torch.manual_seed(0)
    # MIM's purification gates with add fusion on timm's 1.1 M-parameter test_resnet: every
    # accumulator of a middle-fusion model plus the gates and the purification section
    model = fz.create_model("mim_add", num_classes=5, encoder="test_resnet")
    model.save_pretrained(tmp_path / "model")
    cli = ["interpret", str(tmp_path / "model"), *ARGS]
    threads = torch.get_num_threads()
    try:
        assert main([*cli, "--out", str(tmp_path / "single")]) == 0  # one process: this one
    finally:
        torch.set_num_threads(threads)
    cli = ["-m", "fusionzoo.cli", *cli]
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), *cli, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=child_env(), timeout=600, cwd=tmp_path, check=False)
    check_completed(ddp)
    assert ddp.stdout.count("wrote") == 1, ddp.stdout  # process 0 alone writes the report

    a = json.loads((tmp_path / "single" / "metrics.json").read_text())
    b = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert b["num_images"] == a["num_images"] == 10
    assert b["settings"]["processes"] == 2
    for key in ("cka", "semantic_variance", "health", "contribution", "reliance", "gates", "purification", "intervals"):
        assert a[key], key  # the section was measured (empty would compare equal trivially)
        na, nb = dict(_numbers(a[key])), dict(_numbers(b[key]))
        assert na.keys() == nb.keys(), (key, sorted(set(na) ^ set(nb))[:10])
        bad = [(p, na[p], nb[p]) for p in na if not (math.isnan(na[p]) and math.isnan(nb[p]))
               and abs(na[p] - nb[p]) > _tolerance(p) * max(1.0, abs(na[p]))]
        assert not bad, (key, len(bad), bad[:5])
    assert len(a["intervals"]) > 100  # the bootstrap intervals of every section were compared
    assert a["settings"]["policies"] == b["settings"]["policies"] == ["zero", "mean"]
    assert a["settings"]["gradcam"] == b["settings"]["gradcam"]
