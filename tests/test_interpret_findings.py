"""Findings sentences: derived from the numbers with the stated thresholds, and first on the pages."""


from fusionzoo.interpret import InterpretResult
from fusionzoo.interpret.contribution import shapley_values
from fusionzoo.interpret.findings import THRESHOLDS, findings

CLASSES = ["poster", "box", "ball", "crate"]
# per-class IoU of each coalition: poster needs rgb, box depth, ball either, crate both
IOU = {"none": [0.0, 0.0, 0.0, 0.0], "rgb": [0.8, 0.0, 0.9, 0.0], "depth": [0.0, 0.7, 0.9, 0.0],
       "rgb+depth": [0.8, 0.7, 0.9, 0.9]}


def _result(cross=(0.2, 0.7)) -> InterpretResult:
    coal = {k: {"miou": sum(v) / 4, "iou": v} for k, v in IOU.items()}
    key = {frozenset(): "none", frozenset(["rgb"]): "rgb", frozenset(["depth"]): "depth",
           frozenset(["rgb", "depth"]): "rgb+depth"}
    sh = shapley_values(["rgb", "depth"], lambda s: coal[key[s]]["miou"])
    taps = {n: {"name": n, "stream": n.split(".")[0], "stage": n.split(".")[1], "channels": 8, "reduction": 4,
                "kind": "feature"} for n in ("rgb.stage1", "depth.stage1", "rgb.stage2", "depth.stage2")}
    pairs = [{"a": f"rgb.stage{i}", "b": f"depth.stage{i}", "kind": "cross_modal", "stage": f"stage{i}", "cka": v,
              "cka_biased": v} for i, v in enumerate(cross, 1)]
    return InterpretResult.from_json({
        "model": "toy", "fusion": "middle", "config": {}, "modalities": ["rgb", "depth"], "num_classes": 4,
        "class_names": CLASSES, "num_images": 2, "taps": taps, "settings": {"policy": "zero", "rows": "sample"},
        "cka": {"pairs": pairs},
        "contribution": {"metric": "mIoU", "policy": "zero", "modalities": ["rgb", "depth"], "coalitions": coal,
                         "shapley": sh, "drop": {"rgb": 0.1, "depth": 0.1},
                         "shapley_per_class": {"rgb": [0.0] * 4, "depth": [0.0] * 4}}})


def test_sentences_follow_the_numbers():
    text = {f.kind: [] for f in findings(_result())}
    for f in findings(_result()):
        text[f.kind].append(f.text)
    carriers = " ".join(text["carriers"])
    assert "rgb alone carries the IoU of poster (80.0 of 80.0 points, 100%)" in carriers
    assert "depth alone carries the IoU of box" in carriers
    assert "Either modality alone suffices for ball" in carriers
    assert "Only both modalities together give crate" in carriers
    inter = text["interaction"][0]
    assert "crate (+90.0)" in inter and "ball (-90.0)" in inter
    assert "converge at stage2 (cross-modal CKA 0.70 >= 0.5" in text["convergence"][0]
    # shares: rgb (0.8 + 0.9/2 + 0.9/2) / 4 vs depth: neither below 30%
    assert text["underuse"][0].startswith("No modality is under-used")
    apart = next(f.text for f in findings(_result(cross=(0.1, 0.2))) if f.kind == "convergence")
    assert "stay apart" in apart


def test_threshold_changes_the_judgement(monkeypatch):
    monkeypatch.setitem(THRESHOLDS, "underused_share", 0.49)
    under = next(f for f in findings(_result()) if f.kind == "underuse")
    assert under.numbers["underused"] == ["depth"] and "depth is under-used" in under.text


def test_report_and_compare_open_with_findings(tmp_path):
    from fusionzoo.interpret.report import write_comparison, write_report

    page = write_report(_result(), tmp_path / "one")["report"].read_text()
    assert page.index("<h2>Findings</h2>") < page.index("Modality contribution") < page.index("Pairwise interaction")
    assert "Thresholds:" in page
    cmp = write_comparison([_result(), _result(cross=(0.1, 0.2))], tmp_path / "cmp")
    html_text = cmp["report"].read_text()
    assert html_text.index("<h2>Findings</h2>") < html_text.index("<h2>Summary</h2>")
    assert "toy#2" in html_text and "stay apart" in html_text
    assert "Score decomposition per class" in cmp["markdown"].read_text()
