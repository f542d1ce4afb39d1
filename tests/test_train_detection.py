"""train.py trains a registered detector on the synthetic set's boxes and keeps COCO AP."""

from __future__ import annotations

import json

import torch
from process_helpers import train_script

from fusionzoo.hub import from_pretrained


def test_detector_trains_and_reports_ap(tmp_path):
    train = train_script()
    summary = train.main([
        "--model", "fcos_early_resnet18", "--image-size", "64,64", "--train-samples", "8", "--val-samples", "4",
        "--batch-size", "4", "--epochs", "2", "--threads", "1", "--no-progress", "--eval-missing", "depth",
        "--out-dir", str(tmp_path), "--run-name", "det",
    ])
    assert summary["task"] == "detection" and summary["metric"] == "ap" and summary["steps"] == 4
    assert 0 <= summary["best_value"] <= 1 and 0 <= summary["missing_depth"]["ap"] <= 1
    run = tmp_path / "det"
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["val_images"] for r in epochs] == [4, 4] and all("val_ap50" in r for r in epochs)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"] * 1.5  # finite, same order of magnitude
    # the run ends with its interpretability report, contribution measured in COCO AP
    report = json.loads((run / "report" / "metrics.json").read_text())
    assert (run / "report" / "report.html").is_file() and report["contribution"]["metric"] == "AP"
    assert set(report["contribution"]["shapley"]) == {"rgb", "depth"}
    model = from_pretrained(run / "best")
    assert model.task == "detection"
    with torch.no_grad():
        out = model({"rgb": torch.randn(1, 3, 64, 64), "depth": torch.randn(1, 1, 64, 64)})
    assert set(out[0]) >= {"boxes", "scores", "labels"}
