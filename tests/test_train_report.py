"""train.py ends by writing the interpretability report of its run (issue 5); the report and the
compare page show intervals, removal policies and both semantic-variance forms (issue 21).

The interval, policy and whitened keys are added by hand here (:func:`with_uncertainty`), in the
shapes the producers write (``InterpretResult.intervals`` paths, ``contribution["policies"]``,
``semantic_variance[tap]["sv_whitened"]``), so the page is tested on its own.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.interpret import report
from fusionzoo.interpret.style import STREAM_COLORS, stream_color

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("zero", "mean", "missing")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_writes_interpretability_report(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("fz_train_script_report", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.main([
        "--model", "late_mean_resnet18", "--image-size", "32,32", "--train-samples", "4", "--val-samples", "4",
        "--batch-size", "4", "--epochs", "1", "--threads", "1", "--no-progress",
        "--out-dir", str(tmp_path), "--run-name", "run",
    ])
    report_dir = tmp_path / "run" / "report"
    html = (report_dir / "report.html").read_text()
    assert "<img" in html and "late_mean_resnet18" in html
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics  # every number of the report is in the JSON
    assert all("after_fusion" in t for t in metrics["taps"].values())


@pytest.fixture(scope="module")
def measured() -> interpret.InterpretResult:
    """ESANet (RGB stream after fusion from its fused stem on) on 4 synthetic images, no replicates."""
    ds = fz.data.create_dataset("synthetic_rgbd", split="val", num_samples=4, image_size=(32, 32))
    torch.manual_seed(0)
    model = fz.create_model("esanet_resnet18", num_classes=ds.num_classes)
    return interpret.run(model, ds, metrics=["cka", "semantic_variance", "contribution", "reliance"],
                         batch_size=4, replicates=0, perceptual=False)


def _leaves(tree: Any, prefix: str):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}.{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        yield prefix, float(tree)


def with_uncertainty(res: interpret.InterpretResult) -> interpret.InterpretResult:
    """A copy with three removal policies (Shapley values scaled per policy), a whitened semantic
    variance per tap and an interval ``[v - d, v + d]`` on every number of contribution, semantic
    variance, reliance and CKA."""
    res = copy.deepcopy(res)
    c = res.contribution
    sections = {}
    for j, p in enumerate(POLICIES):
        sec = copy.deepcopy({k: v for k, v in c.items() if k != "policies"})
        sec["shapley"] = {m: v * (1 + j) + 0.01 * j for m, v in sec["shapley"].items()}
        sections[p] = sec
    c["policies"] = sections
    res.settings["empty_policies"] = {p: "zero" if p == "missing" else p for p in POLICIES}
    for v in res.semantic_variance.values():
        v["sv"] = v["semantic_variance"]
        v["sv_whitened"] = 0.5 + 0.4 * v["semantic_variance"]
    iv = {}
    for section in ("contribution", "semantic_variance", "reliance"):
        for path, x in _leaves(getattr(res, section), section):
            iv[path] = [x - 0.05 * abs(x) - 0.01, x + 0.05 * abs(x) + 0.01]
    for i, r in enumerate(res.cka["pairs"]):
        iv[f"cka.pairs.{i}.cka"] = [r["cka"] - 0.03, r["cka"] + 0.02]
    res.intervals = iv
    res.settings["intervals"] = {"method": "poisson bootstrap over images", "replicates": 200, "level": 0.95}
    return res


def _cell(v: float, iv: list[float], scale: float = 100, digits: int = 1) -> str:
    return f"{scale * v:.{digits}f} [{scale * iv[0]:.{digits}f}, {scale * iv[1]:.{digits}f}]"


def test_report_shows_intervals_policies_and_both_semantic_variance_forms(measured, tmp_path: Path) -> None:
    res = with_uncertainty(measured)
    files = report.write_report(res, tmp_path / "with")
    page = files["report"].read_text()
    shapley = res.contribution["shapley"]["depth"]
    assert _cell(shapley, res.intervals["contribution.shapley.depth"]) in page
    row = next(i for i, r in enumerate(res.cka["pairs"]) if r["kind"] == "cross_modal")
    assert _cell(res.cka["pairs"][row]["cka"], res.intervals[f"cka.pairs.{row}.cka"], 1, 3) in page
    sv = res.semantic_variance["rgb.stage2"]
    assert _cell(sv["sv_whitened"], res.intervals["semantic_variance.rgb.stage2.sv_whitened"], 1, 3) in page
    assert "Contribution under each removal policy" in page and "zero (main)" in page
    for p in POLICIES[1:]:
        mean_shapley = res.contribution["policies"][p]["shapley"]["depth"]
        assert _cell(mean_shapley, res.intervals[f"contribution.policies.{p}.shapley.depth"]) in page
    assert "whitened form" in page and "trace form" in page and "No intervals" not in page
    assert "contribution_policies" in files
    # The plots draw the intervals: the same numbers without them give other pixels, and the
    # semantic-variance figure has a second (whitened) panel.
    bare = copy.deepcopy(res)
    bare.intervals = {}
    plain = report._plot_contribution(bare, tmp_path / "plain.png")
    assert files["contribution"].read_bytes() != plain.read_bytes()
    trace_only = copy.deepcopy(measured)
    for v in trace_only.semantic_variance.values():
        v.pop("sv_whitened", None)
    single = report._plot_semantic_variance(trace_only, tmp_path / "single.png")
    assert Image.open(files["semantic_variance"]).width > 1.6 * Image.open(single).width


def test_report_says_when_there_are_no_intervals(measured, tmp_path: Path) -> None:
    page = report.write_report(measured, tmp_path)["report"].read_text()
    assert "No intervals" in page and "replicates=0" in page
    assert "[" not in page.split("Modality contribution")[1].split("</table>")[0]  # point estimates only


def test_comparison_page_carries_intervals_per_result(measured, tmp_path: Path) -> None:
    res = with_uncertainty(measured)
    files = report.write_comparison([res, measured], tmp_path)
    page = files["report"].read_text()
    assert "No intervals</b> for <code>esanet_resnet18#2</code>" in page
    assert _cell(res.contribution["shapley"]["rgb"], res.intervals["contribution.shapley.rgb"]) in page
    assert "Shapley value under each removal policy" in page and "whitened form" in page
    md = files["markdown"].read_text()
    assert _cell(res.contribution["shapley"]["rgb"], res.intervals["contribution.shapley.rgb"]) in md
    assert "| esanet_resnet18 | middle |" in md  # the registry entry's fusion family


def test_fusion_family_comes_from_the_entry(measured) -> None:
    assert "fusion family from its registry entry: middle" in report._intro(measured)
    unregistered = copy.deepcopy(measured)
    unregistered.fusion = None
    assert "unknown: not a registered model" in report._intro(unregistered)


def test_after_fusion_taps_are_marked(measured) -> None:
    tables = "".join(report._summary_tables(measured))
    assert "rgb.stage2* / depth.stage2" in tables and "depth.stage2*" not in tables  # ESANet: RGB stream only
    old = copy.deepcopy(measured)
    for t in old.taps.values():
        del t["after_fusion"]
    assert "which modality taps already carry another modality is unknown" in "".join(report._summary_tables(old))


def test_cka_panels_keep_their_labels_apart(measured) -> None:
    """A cell value of one panel never runs into the next panel's y tick labels ("0.94depth")."""
    for fig in (report._cka_stages_figure(with_uncertainty(measured)), report._cka_within_figure(measured)):
        FigureCanvasAgg(fig).draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.images]
        assert len(axes) >= 2
        for left, right in itertools.pairwise(axes):
            edge = left.get_window_extent(renderer).x1  # the left panel's cells end here
            labels = [t.get_window_extent(renderer) for t in right.get_yticklabels() if t.get_text()]
            assert min(lab.x0 for lab in labels) > edge


def test_training_caption_mentions_unimodal_confidence_only_with_unimodal_heads(measured) -> None:
    res = copy.deepcopy(measured)
    res.training = {"modalities": ["rgb", "depth"], "epochs": [
        {"epoch": e, "grad_norm": {"rgb": 1.0, "depth": 2.0}, "grad_ratio": {"depth/rgb": 2.0}} for e in (1, 2)]}
    assert "own head" not in report._training_caption(res)
    for r in res.training["epochs"]:
        r["confidence"] = {"rgb": 0.5, "depth": 0.7}
    assert "own head" in report._training_caption(res)


def test_one_colour_per_stream() -> None:
    assert report._color is stream_color
    assert len(set(STREAM_COLORS.values())) == len(STREAM_COLORS)
    assert stream_color("lidar", 0) not in STREAM_COLORS.values()
