"""Findings sentences: derived from the numbers with the stated thresholds, withheld when their
interval straddles the threshold, per removal policy, and first on the pages."""

import copy
import itertools

import pytest
import torch

import fusionzoo as fz
from fusionzoo._registry import model_entry
from fusionzoo.interpret import InterpretResult
from fusionzoo.interpret.contribution import shapley_values
from fusionzoo.interpret.findings import THRESHOLDS, findings, findings_html
from fusionzoo.interpret.interaction import coalition_terms
from fusionzoo.interpret.plan import plan_taps

CLASSES = ["poster", "box", "ball", "crate"]
# per-class IoU of each coalition: poster needs rgb, box depth, ball either, crate both
IOU = {"none": [0.0, 0.0, 0.0, 0.0], "rgb": [0.8, 0.0, 0.9, 0.0], "depth": [0.0, 0.7, 0.9, 0.0],
       "rgb+depth": [0.8, 0.7, 0.9, 0.9]}
KEY = {frozenset(): "none", frozenset(["rgb"]): "rgb", frozenset(["depth"]): "depth",
       frozenset(["rgb", "depth"]): "rgb+depth"}


def _contribution(iou, policy="zero"):
    coal = {k: {"miou": sum(v) / 4, "iou": v} for k, v in iou.items()}
    sh = shapley_values(["rgb", "depth"], lambda s: coal[KEY[s]]["miou"])
    full = coal["rgb+depth"]["miou"]
    return {"metric": "mIoU", "policy": policy, "modalities": ["rgb", "depth"], "coalitions": coal, "shapley": sh,
            "drop": {"rgb": full - coal["depth"]["miou"], "depth": full - coal["rgb"]["miou"]},
            "shapley_per_class": {"rgb": [0.0] * 4, "depth": [0.0] * 4}}


def _taps(after=None):
    """Stage taps of two streams (after: tap -> after_fusion; None leaves the key out, as old
    metrics.json files do)."""
    out = {}
    for n in ("rgb.stage1", "depth.stage1", "rgb.stage2", "depth.stage2"):
        out[n] = {"name": n, "stream": n.split(".")[0], "stage": n.split(".")[1], "channels": 8, "reduction": 4,
                  "kind": "feature"}
        if after is not None:
            out[n]["after_fusion"] = after.get(n, False)
    return out


def _result(cross=(0.2, 0.7), iou=IOU, intervals=None, after=None, **extra) -> InterpretResult:
    pairs = [{"a": f"rgb.stage{i}", "b": f"depth.stage{i}", "kind": "cross_modal", "stage": f"stage{i}", "cka": v,
              "cka_biased": v} for i, v in enumerate(cross, 1)]
    data = {"model": "toy", "fusion": "middle", "config": {}, "modalities": ["rgb", "depth"], "num_classes": 4,
            "class_names": CLASSES, "num_images": 20, "taps": _taps(after),
            "settings": {"policy": "zero", "rows": "sample", "task": "segmentation"},
            "cka": {"pairs": pairs}, "contribution": _contribution(iou), "intervals": intervals or {}}
    data.update(extra)
    return InterpretResult.from_json(data)


def _texts(res, kind):
    return [f.text for f in findings(res) if f.kind == kind]


def _around(res, width):
    """Intervals of +-width around every decomposition term, interaction and Shapley value."""
    iv = {}
    c = findings.__globals__["_terms"](res.contribution)
    for pair, d in c["decomposition"].items():
        for t, vals in d["per_class"].items():
            for i, v in enumerate(vals):
                iv[f"contribution.decomposition.{pair}.per_class.{t}.{i}"] = [v - width, v + width]
    for pair, d in c["interaction"].items():
        iv[f"contribution.interaction.{pair}.value"] = [d["value"] - width, d["value"] + width]
        for i, v in enumerate(d["per_class"]):
            iv[f"contribution.interaction.{pair}.per_class.{i}"] = [v - width, v + width]
    for m, v in res.contribution["shapley"].items():
        iv[f"contribution.shapley.{m}"] = [v - width, v + width]
    for i, r in enumerate(res.cka["pairs"]):
        iv[f"cka.pairs.{i}.cka"] = [r["cka"] - width, r["cka"] + width]
    return iv


def test_sentences_follow_the_numbers_and_say_there_is_no_interval():
    res = _result()
    carriers = " ".join(_texts(res, "carriers"))
    assert "rgb alone carries the IoU of poster (unique rgb 80.0 of 80.0 points, 100%), under zero" in carriers
    assert "depth alone carries the IoU of box" in carriers
    assert "Either modality alone suffices for ball" in carriers
    assert "Only both modalities together give crate" in carriers
    inter = _texts(res, "interaction")[0]
    assert "crate (+90.0)" in inter and "ball (-90.0)" in inter
    assert "reaches 0.5 at stage2" in _texts(res, "convergence")[0]
    # shares: rgb (0.8 + 0.9/2 + 0.9/2) / 4 vs depth: neither below 30%
    assert _texts(res, "underuse")[0].startswith("No modality is under-used under zero")
    assert "stays below 0.5 at every stage" in _texts(_result(cross=(0.1, 0.2)), "convergence")[0]
    # said once, and every judged sentence is marked as resting on point values
    notes = [t for t in _texts(res, "measurement") if "no bootstrap intervals" in t]
    assert len(notes) == 1 and "written before intervals" in notes[0]
    assert all(f.text.endswith("[point values, no interval]") and f.status == "point"
               for f in findings(res) if f.kind in ("carriers", "interaction", "underuse"))
    zero = _result(settings={"policy": "zero", "intervals": {"replicates": 0}})
    assert "replicates=0" in _texts(zero, "measurement")[0]
    unfilled = _result(settings={"policy": "zero", "intervals": {"replicates": 200}})
    assert "none of its metrics recorded intervals from the 200 replicates" in _texts(unfilled, "measurement")[0]


def test_threshold_changes_the_judgement(monkeypatch):
    monkeypatch.setitem(THRESHOLDS, "underused_share", 0.49)
    under = next(f for f in findings(_result()) if f.kind == "underuse")
    assert under.numbers["underused"] == ["depth"] and "depth is under-used" in under.text


def test_interval_that_straddles_the_threshold_withholds_the_finding():
    base = _result()
    tight = _result(intervals=_around(base, 0.02))
    wide = _result(intervals=_around(base, 0.5))
    t_carriers = " ".join(_texts(tight, "carriers"))
    assert "Only both modalities together give crate (synergy 90.0 [88.0, 92.0] of 90.0 points" in t_carriers
    assert "Not resolved" not in t_carriers and "point values" not in t_carriers
    assert "95% bootstrap intervals over the 20 images" in _texts(tight, "measurement")[0]
    # +-50 points: poster's unique rgb [30, 130] does not clear 40% of its 80-point gain (32):
    # withheld, with its interval (crate's synergy [40, 140] still clears 36 and is stated)
    w = [f for f in findings(wide) if f.kind == "carriers"]
    unresolved = next(f for f in w if f.text.startswith("Not resolved with 20 images"))
    assert "poster (unique rgb 80.0 [30.0, 130.0] of 80.0 points, 100%; needs >= 32.0)" in unresolved.text
    assert unresolved.status == "unresolved"
    assert not any(f.text.startswith("rgb alone carries") for f in w)
    inter = _texts(wide, "interaction")[0]
    assert "Not resolved with 20 images" in inter and "crate (+90.0 [+40.0, +140.0])" in inter
    assert "They need each other" not in _texts(_result(intervals=_around(base, 0.85)), "interaction")[0]
    # under-use: rgb 0.5125 vs 30% of 0.825; with +-50 points neither verdict is resolved
    assert "is not resolved with 20 images" in _texts(wide, "underuse")[0]
    # the old code stated these findings whatever the interval
    assert "They need each other" in _texts(tight, "interaction")[0]


def test_verdict_that_changes_with_the_policy_says_so():
    # under missing, ball is carried by rgb alone (depth alone gives nothing); the rest as under zero
    missing_iou = {**IOU, "depth": [0.0, 0.7, 0.0, 0.0]}
    contribution = _contribution(IOU)
    contribution["policies"] = {"zero": copy.deepcopy(contribution), "missing": _contribution(missing_iou, "missing")}
    res = _result(contribution=contribution)
    carriers = [f for f in findings(res) if f.kind == "carriers"]
    ball = next(f for f in carriers if f.text.startswith("ball:"))
    assert ball.text.startswith("ball: the verdict depends on the removal policy: under zero: either alone suffices "
                                "(redundancy 90.0 of 90.0 points, 100%); under missing: rgb alone (unique rgb")
    assert ball.numbers["by_policy"] == {"zero": "redundancy", "missing": "unique_rgb"} and ball.status == "mixed"
    poster = next(f for f in carriers if "poster" in f.text)
    assert "under every removal policy measured (zero and missing) (numbers under zero)" in poster.text
    inter = _texts(res, "interaction")[0]
    assert "overall: +0.0 under zero; +22.5 under missing" in inter
    assert ("ball depends on the removal policy: under zero: either suffices (-90.0); under missing: no interaction "
            "beyond the threshold (+0.0)") in inter
    assert any("evaluated under zero and missing" in t for t in _texts(res, "measurement"))
    # policies' own intervals are read from contribution.policies.<p>.<path>
    iv = {"contribution.policies.missing.decomposition.rgb|depth.per_class.unique_rgb.2": [0.1, 1.0]}
    ball_missing = next(f for f in findings(_result(contribution=contribution, intervals=iv))
                        if f.text.startswith("ball:"))
    assert "under missing: not resolved (unique rgb 90.0 [10.0, 100.0]" in ball_missing.text


def test_convergence_reads_only_taps_upstream_of_fusion():
    cross = (0.2, 0.7)
    res = _result(cross, after={"rgb.stage2": True})
    text = _texts(res, "convergence")[0]
    assert "taps upstream of fusion only; the pairs at stage2 sit after fusion and are not used" in text
    assert "stays below 0.5" in text and "stage2" not in text.split("not used")[1]
    down = _texts(_result(cross, after={n: True for n in _taps()}), "convergence")[0]
    assert "convergence cannot be separated from the architecture" in down and "toy is registered as middle fusion" in down
    assert "converge" not in _texts(_result(cross, after={}), "convergence")[0].split("):")[0].replace(
        "convergence", "")  # all upstream: judged, no caveat
    unknown = _texts(_result(cross), "convergence")[0]
    assert "whether these taps sit after fusion is not recorded" in unknown


def test_semantic_variance_sentence_names_its_form_and_a_disagreement():
    def sv(a, b):
        return {"rgb.stage1": {"semantic_variance": 0.4, "sv": 0.4, "sv_whitened": a},
                "rgb.stage2": {"semantic_variance": 0.2, "sv": 0.2, "sv_whitened": b}}

    text = _texts(_result(semantic_variance=sv(0.13, 0.27)), "separability")[0]
    assert "trace form sv = S_B / S_T: falls from stage1 0.40 to stage2 0.20" in text
    assert "whitened form sv_whitened: rises from stage1 0.13 to stage2 0.27" in text
    assert "The two forms disagree in direction" in text
    agree = _texts(_result(semantic_variance=sv(0.27, 0.13)), "separability")[0]
    assert "disagree" not in agree
    # intervals that overlap leave the direction unresolved
    iv = {"semantic_variance.rgb.stage1.sv_whitened": [0.1, 0.3], "semantic_variance.rgb.stage2.sv_whitened": [0.2, 0.4],
          "semantic_variance.rgb.stage1.sv": [0.39, 0.41], "semantic_variance.rgb.stage2.sv": [0.19, 0.21]}
    text = _texts(_result(semantic_variance=sv(0.13, 0.27), intervals=iv), "separability")[0]
    assert "whitened form sv_whitened: has no direction resolved with 20 images" in text and "disagree" not in text


def test_pid_and_score_decomposition_are_reconciled_when_they_disagree():
    contribution = _contribution(IOU)
    o = {"redundancy": 0.3, "unique_1": 0.1, "unique_2": 0.1, "synergy": 0.05, "mi": 0.55, "dominant": "redundancy"}
    per_class = {"crate": {**o, "dominant": "redundancy"}, "poster": {**o, "dominant": "unique_1"}}
    contribution["pid"] = {"pairs": {"rgb|depth": {"prediction": {"overall": o, "per_class": per_class}}}}
    texts = _texts(_result(contribution=contribution), "information")
    assert texts[0].startswith("Under zero, the rgb-only and depth-only predictions carry 0.55 bits")
    rec = [t for t in texts if "name different dominant terms" in t]
    # overall the score's largest term is synergy (90 of 330 points... redundancy 90, unique 80+70, synergy 90)
    assert len(rec) == 1 and "crate (score: synergy; PID: redundancy)" in rec[0]
    assert "poster (score" not in rec[0]  # unique rgb both ways


def _registry_result(name: str) -> InterpretResult:
    """What run() records for a registered model, built on the meta device (no weights): its
    taps, its registry fusion, and a CKA row for every pair plan_taps makes."""
    with torch.device("meta"):
        model = fz.create_model(name)
    info = model.tap_info()
    plan = plan_taps(model, "*")
    pairs = [{"a": a, "b": b, "kind": k, "stage": s, "cka": 0.6, "cka_biased": 0.6} for a, b, k, s in plan.pairs]
    return InterpretResult(model=name, fusion=model_entry(name).fusion, config={}, modalities=list(model.modalities),
                           num_classes=model.num_classes, class_names=None, num_images=4,
                           taps={n: vars(t) for n, t in info.items()}, settings={}, cka={"pairs": pairs})


# the smallest published entry of each method, and one early and one late family entry; the
# other published entries run under -m slow (same code, bigger encoders)
FAST = ["acnet_r50", "cmnext_mit_b0", "cmx_mit_b0", "dformer_tiny", "esanet_r18", "fusenet_vgg16",
        "geminifusion_mit_b0", "sagate_r50", "mlpd_vgg16", "early_concat_resnet18", "late_mean_resnet18"]
REGISTRY = FAST + [pytest.param(n, marks=pytest.mark.slow) for n in fz.list_models(published=True) if n not in FAST]


@pytest.mark.parametrize("name", REGISTRY)
def test_fusion_named_in_findings_is_the_registry_entry(name):
    fusion = model_entry(name).fusion
    text = " ".join(f.text for f in findings(_registry_result(name)))
    assert f"{name} is registered as {fusion} fusion" in text
    for family in ("early", "middle", "late", "hybrid"):
        if family != fusion:
            assert f"{family} fusion" not in text, (name, text)


def test_dformer_tiny_is_not_called_early_fusion():
    text = " ".join(f.text for f in findings(_registry_result("dformer_tiny")))
    assert "registered as middle fusion" in text and "early" not in text


def test_report_and_compare_open_with_findings(tmp_path):
    from fusionzoo.interpret.report import write_comparison, write_report

    page = write_report(_result(), tmp_path / "one")["report"].read_text()
    assert page.index("<h2>Findings</h2>") < page.index("Modality contribution") < page.index("Pairwise interaction")
    assert "Thresholds:" in page and "no bootstrap intervals" in page
    cmp = write_comparison([_result(), _result(cross=(0.1, 0.2))], tmp_path / "cmp")
    html_text = cmp["report"].read_text()
    assert html_text.index("<h2>Findings</h2>") < html_text.index("<h2>Summary</h2>")
    assert "toy#2" in html_text and "stays below 0.5" in html_text
    assert "Headline numbers with 95% bootstrap intervals" in html_text
    assert "Score decomposition per class" in cmp["markdown"].read_text()
    assert "withheld" in findings_html(_result())


def test_three_way_interaction_is_the_harsanyi_dividend():
    # v = 1 only with all three modalities: the dividend of {rgb, depth, thermal} is the whole score
    mods = ["rgb", "depth", "thermal"]
    coal = {}
    for k in range(4):
        for combo in itertools.combinations(mods, k):
            v = 0.9 if k == 3 else 0.0
            coal["+".join(combo) or "none"] = {"miou": v, "iou": [v, 0.0]}
    three = coalition_terms({"metric": "mIoU", "modalities": mods, "coalitions": coal})["harsanyi"]["rgb|depth|thermal"]
    assert three["value"] == pytest.approx(0.9) and three["per_class"] == pytest.approx([0.9, 0.0])
    # a pairwise synergy of rgb and depth leaves no 3-way term
    pair = {k: {"miou": 0.9 if {"rgb", "depth"} <= set(k.split("+")) else 0.0, "iou": [0.0, 0.0]} for k in coal}
    assert coalition_terms({"metric": "mIoU", "modalities": mods, "coalitions": pair})["harsanyi"][
        "rgb|depth|thermal"]["value"] == pytest.approx(0.0)
    sh = shapley_values(mods, lambda s: coal["+".join(m for m in mods if m in s) or "none"]["miou"])
    res = InterpretResult(model="toy3", fusion="late", config={}, modalities=mods, num_classes=2,
                          class_names=["a", "b"], num_images=8, taps={}, settings={"policy": "zero"},
                          contribution={"metric": "mIoU", "policy": "zero", "modalities": mods, "coalitions": coal,
                                        "shapley": sh, "drop": {m: 0.9 for m in mods}})
    text = next(t for t in _texts(res, "interaction") if "3-way" in t)
    assert "Under zero, the 3-way interaction of rgb, depth, thermal" in text and "+90.0 points overall" in text
    assert "All three are needed together (dividend >= +10.0) on a (+90.0)" in text


def test_a_dominant_term_must_be_separated_from_a_runner_up_that_also_reaches_the_share():
    # poster: unique rgb 47 and synergy 43 of 90 points, both above 40 % of the gain
    iou = {k: list(v) for k, v in IOU.items()}
    iou["rgb"][0], iou["rgb+depth"][0] = 0.47, 0.9
    res = _result(iou=iou)
    wide = _result(iou=iou, intervals=_around(res, 0.05))
    text = " ".join(_texts(wide, "carriers"))
    assert "poster (unique rgb 47.0 [42.0, 52.0] of 90.0 points, 52%, but synergy 43.0 [38.0, 48.0] may also " \
           "reach 36.0 and overlaps it)" in text
    assert "rgb alone carries the IoU of poster" not in text
    narrow = _result(iou=iou, intervals=_around(res, 0.01))
    assert "rgb alone carries the IoU of poster (unique rgb 47.0 [46.0, 48.0]" in " ".join(_texts(narrow, "carriers"))
