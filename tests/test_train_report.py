"""train.py ends by writing the interpretability report of its run (issue 5)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_writes_interpretability_report(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fz_train_script_report", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.main([
        "--model", "late_mean_resnet18", "--image-size", "64,64", "--train-samples", "8", "--val-samples", "4",
        "--batch-size", "4", "--epochs", "1", "--threads", "1", "--no-progress",
        "--out-dir", str(tmp_path), "--run-name", "run",
    ])
    report = tmp_path / "run" / "report"
    html = (report / "report.html").read_text()
    assert "<img" in html and "late_mean_resnet18" in html
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics  # every number of the report is in the JSON
