"""``proben_fusion`` equals the ProbEn authors' late fusion (tools/parity/proben.py) on seeded
detection sets: every score rule (``probEn``, ``avg``, ``max``) with every box rule (``v-avg``,
``s-avg``, ``avg``, ``argmax``), 6 images of 2 or 3 detectors, 3 classes, float64."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fusionzoo import cli
from fusionzoo.detection import proben_fusion
from fusionzoo.detection.boxes import BOX_FUSIONS, PROBEN_BOX_FUSIONS, PROBEN_SCORE_FUSIONS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "parity"))
from seeded import read_fixture

FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "proben"
META, TENSORS = read_fixture(FIXTURE)
RTOL = 1e-12  # float64 on both sides; only the order of a few sums differs


def image_sets(image: int) -> list[dict[str, torch.Tensor]]:
    return [{key: TENSORS[f"input/{image}/{d}/{key}"] for key in ("boxes", "scores", "labels", "probs", "vars")}
            for d in range(META["detectors"][image])]


def reference(score_rule: str, box_rule: str, image: int) -> dict[str, torch.Tensor]:
    return {key: TENSORS[f"output/{score_rule}/{box_rule}/{image}/{key}"] for key in ("boxes", "scores", "labels")}


def assert_same_detections(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], num_classes: int) -> None:
    """Row sets equal (their order is cluster order, ours by score): each of their rows is matched
    to our row with the nearest box. Where their label is background (``K``), ours keeps the box
    with the best object class, scored below their background probability."""
    assert ours["boxes"].dtype == torch.float64
    assert ours["scores"].shape == theirs["scores"].shape, (ours["scores"], theirs["scores"])
    scale = float(theirs["boxes"].abs().max()) if theirs["boxes"].numel() else 1.0
    free = list(range(ours["scores"].shape[0]))
    for row in range(theirs["scores"].shape[0]):
        gaps = (ours["boxes"][free] - theirs["boxes"][row]).abs().amax(1)
        j = free.pop(int(gaps.argmin()))
        assert float(gaps.min()) <= RTOL * scale, f"row {row}: box {theirs['boxes'][row].tolist()} has no match"
        if int(theirs["labels"][row]) == num_classes:
            assert int(ours["labels"][j]) < num_classes and float(ours["scores"][j]) < float(theirs["scores"][row])
        else:
            assert int(ours["labels"][j]) == int(theirs["labels"][row])
            assert float(ours["scores"][j]) == pytest.approx(float(theirs["scores"][row]), rel=RTOL, abs=RTOL)


@pytest.mark.parametrize("box_rule", META["box_rules"])
@pytest.mark.parametrize("score_rule", META["score_rules"])
def test_proben_fusion_equals_the_authors(score_rule: str, box_rule: str) -> None:
    for image in range(META["images"]):
        ours = proben_fusion(image_sets(image), iou_thresh=META["iou_thresh"],
                             score_fusion=META["our_score_rules"][score_rule], box_fusion=box_rule)
        assert_same_detections(ours, reference(score_rule, box_rule, image), META["num_classes"])


def test_fixture_exercises_fusion_passthrough_and_background() -> None:
    # Clusters merged (fewer outputs than inputs), a detector that fired on nothing, and fused
    # posteriors where background wins: the cases where the rules differ.
    merged = [META["output_boxes"][f"probEn/s-avg/{i}"] < sum(META["input_boxes"][i]) for i in range(META["images"])]
    assert sum(merged) >= 4 and min(min(n) for n in META["input_boxes"]) == 0
    background = sum(int((TENSORS[f"output/probEn/s-avg/{i}/labels"] == META["num_classes"]).sum()) for i in range(META["images"]))
    assert background >= 1


def test_binary_form_is_the_multiclass_rule_with_the_rest_on_background() -> None:
    # Without class posteriors, a box's score p for its class leaves 1 - p to background: the
    # multi-class rule on those one-hot posteriors is the binary rule (the default of the
    # late_proben detectors, whose heads give one score per box).
    sets = image_sets(0)
    binary = [{k: s[k] for k in ("boxes", "scores", "labels")} for s in sets]
    onehot = [dict(b, probs=torch.nn.functional.one_hot(b["labels"], META["num_classes"]).double() * b["scores"][:, None])
              for b in binary]
    a, b = proben_fusion(binary), proben_fusion(onehot)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_proben_options_are_checked() -> None:
    sets = image_sets(1)
    with pytest.raises(ValueError, match="score_fusion='mean'"):
        proben_fusion(sets, score_fusion="mean")
    with pytest.raises(ValueError, match="box_fusion='wavg'"):
        proben_fusion(sets, box_fusion="wavg")
    with pytest.raises(ValueError, match="'v-avg' weights boxes by 1 / variance"):
        proben_fusion([{k: s[k] for k in ("boxes", "scores", "labels")} for s in sets], box_fusion="v-avg")
    with pytest.raises(ValueError, match="'probs' is in detection sets \\[0\\] but not in all 3"):
        proben_fusion([sets[0]] + [{k: s[k] for k in ("boxes", "scores", "labels")} for s in sets[1:]])
    with pytest.raises(ValueError, match="prior applies to the binary form"):
        proben_fusion(sets, prior=0.3)
    with pytest.raises(ValueError, match=r"detection set 0: 'vars' has shape \(\d+, 1\); expected \(\d+,\)"):
        proben_fusion([dict(sets[0], vars=sets[0]["vars"][:, None])] + sets[1:])


def coco_records(image: int, detector: int) -> list[dict]:
    s = image_sets(image)[detector]
    boxes = s["boxes"].tolist()
    return [{"image_id": image, "category_id": int(label) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "score": float(score), "probs": probs, "vars": [float(v)]}
            for b, score, label, probs, v in zip(boxes, s["scores"], s["labels"], s["probs"].tolist(), s["vars"])]


def test_fuse_boxes_command_on_results_files_equals_the_authors(tmp_path, capsys) -> None:
    """`fusionzoo fuse-boxes` on one COCO results file per detector (with the authors' per-box
    probabilities and variances) gives their fusion of every image."""
    paths = []
    for d in range(max(META["detectors"])):
        records = [r for i in range(META["images"]) if d < META["detectors"][i] for r in coco_records(i, d)]
        paths.append(tmp_path / f"det{d}.json")
        paths[-1].write_text(json.dumps(records))
    out = tmp_path / "fused.json"
    assert cli.main(["fuse-boxes", *map(str, paths), "--score-fusion", "avg", "--box-fusion", "v-avg", "--out", str(out)]) == 0
    assert "fused by proben" in capsys.readouterr().out
    fused = json.loads(out.read_text())
    for image in range(META["images"]):
        rows = [r for r in fused if r["image_id"] == image]
        boxes = torch.tensor([r["bbox"] for r in rows], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        ours = {"boxes": boxes, "scores": torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                "labels": torch.tensor([r["category_id"] - 1 for r in rows])}
        assert_same_detections(ours, reference("avg", "v-avg", image), META["num_classes"])


@pytest.mark.parametrize("records, says", [
    ({"a": 1}, "holds a dict; expected a COCO results list"),
    ([{"image_id": 0, "category_id": 1, "bbox": [0, 0, -1, 5], "score": 0.5}], r"\[0\]: bbox \[0, 0, -1, 5\] is not"),
    ([{"image_id": 0, "category_id": 0, "bbox": [0, 0, 1, 5], "score": 0.5}], "category_id 0 must be an integer >= 1"),
    ([{"image_id": 0, "category_id": 1, "bbox": [0, 0, 1, 5], "score": 1.5}], r"score 1.5 is not a probability"),
])
def test_fuse_boxes_refuses_bad_files_in_one_line(tmp_path, capsys, records, says) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(coco_records(0, 0)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    assert cli.main(["fuse-boxes", str(good), str(bad), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(says, err[0]) and "bad.json" in err[0], err
    assert cli.main(["fuse-boxes", str(good), str(good), "--rule", "wbf", "--box-fusion", "avg", "--out", "x"]) == 2
    assert "--box-fusion applies to --rule proben only" in capsys.readouterr().err
    assert cli.main(["fuse-boxes", str(good), str(good), "--iou", "1.5", "--out", "x"]) == 2
    assert "--iou must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_fuse_boxes_cli_literals_match_the_library() -> None:
    actions = {a.dest: a for a in cli._parser()._subparsers._group_actions[0].choices["fuse-boxes"]._actions}
    assert set(actions["rule"].choices) == set(BOX_FUSIONS)
    assert tuple(actions["score_fusion"].choices) == PROBEN_SCORE_FUSIONS
    assert set(actions["box_fusion"].choices) == set(PROBEN_BOX_FUSIONS)
