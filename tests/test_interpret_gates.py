"""What purification removes (fusionzoo.interpret.accumulators.purification): keep rates per
gate and class against known answers, the gates-open contribution against the same model built
without gates, paired differences with intervals, the section's absence for models without
gates, and the report's section. Tiny gated model (tests/gated_toy.py), two 4-image batches."""

import pytest
import torch
from gated_toy import GatedToy

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.interpret.accumulators.purification import gate_taps, gates_open
from fusionzoo.interpret.findings import findings
from fusionzoo.interpret.report import write_report

GATES = ["rgb.stage1.gate", "rgb.stage2.gate", "depth.stage1.gate", "depth.stage2.gate"]


def _data():
    """rgb's first channel 0.25 everywhere; depth's is 1 exactly on class 1 (the right half), so
    the oracle gates keep 0.25 of rgb everywhere and all of depth on class 1, none elsewhere."""
    mask = torch.zeros(8, 32, 32, dtype=torch.long)
    mask[:, :, 16:] = 1
    mask[:4, :8, :8] = 2
    return [{"rgb": torch.full((4, 3, 32, 32), 0.25), "depth": (mask[i:i + 4] == 1).float()[:, None],
             "mask": mask[i:i + 4]} for i in (0, 4)]


def _model(**kw):
    torch.manual_seed(0)
    m = GatedToy(num_classes=3, oracle=True, **kw).eval()
    with torch.no_grad():
        m.head.weight.mul_(40)  # predictions that vary with the inputs, so coalitions differ
    return m


@pytest.fixture(scope="module")
def result():
    return interpret.run(_model(), _data(), metrics=["semantic_variance", "contribution", "purification"],
                         replicates=40, policies=(), perceptual=False, seed=0)


def test_gate_taps_follow_the_contract():
    info = GatedToy().tap_info()
    assert list(gate_taps(info, ("rgb", "depth"))) == GATES
    assert gate_taps(info, ("rgb", "depth"))["depth.stage2.gate"] == ("depth", "stage2", "depth.stage2",
                                                                      "depth.stage2.purified")


def test_keep_rates_per_gate_and_class_equal_the_known_answers(result):
    g = result.purification["gates"]
    assert g["rgb.stage1.gate"]["granularity"] == "spatial" and g["rgb.stage2.gate"]["granularity"] == "channel"
    for n in ("rgb.stage1.gate", "rgb.stage2.gate"):
        assert g[n]["keep"] == pytest.approx(0.25) and g[n]["keep_per_class"] == pytest.approx([0.25] * 3)
    for n in ("depth.stage1.gate", "depth.stage2.gate"):
        assert g[n]["keep"] == pytest.approx(0.5) and g[n]["keep_per_class"] == pytest.approx([0.0, 1.0, 0.0])
    lo, hi = result.intervals["purification.gates.depth.stage2.gate.keep_per_class.1"]
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    assert "purification.gates.rgb.stage1.gate.keep" in result.intervals


def test_open_gates_equal_the_model_built_without_gates(result):
    c = result.purification["contribution"]
    assert c["gated"]["coalitions"] == result.contribution["coalitions"]
    opened = interpret.run(_model(force_open=True), _data(), metrics=["contribution"], replicates=0, policies=(),
                           perceptual=False, seed=0)
    assert c["open"]["coalitions"] == opened.contribution["coalitions"]
    assert c["gated"]["coalitions"] != c["open"]["coalitions"]   # the gates change the predictions here
    d = c["difference"]
    assert d["full"] == pytest.approx(c["gated"]["coalitions"]["rgb+depth"]["miou"]
                                      - c["open"]["coalitions"]["rgb+depth"]["miou"])
    for m in ("rgb", "depth"):
        assert d["shapley"][m] == pytest.approx(c["gated"]["shapley"][m] - c["open"]["shapley"][m])
        lo, hi = result.intervals[f"purification.contribution.difference.shapley.{m}"]
        assert lo <= d["shapley"][m] + 1e-9 and d["shapley"][m] - 1e-9 <= hi
    assert "purification.contribution.difference.interaction.rgb|depth" in result.intervals


def test_gates_open_keeps_all_and_leaves_the_model_unchanged_after_the_block():
    m, x = _model(), {k: v for k, v in _data()[0].items() if k != "mask"}
    before = m(x)
    gates = gate_taps(m.tap_info(), m.modalities)
    with gates_open(m, gates), fz.capture(m, "*.stage2", "*.stage2.purified", "*.stage2.gate") as acts:
        opened = m(x)
    torch.testing.assert_close(opened, _model(force_open=True)(x))
    for g, (_, _, stream, purified) in gates.items():
        if stream in acts:
            assert torch.equal(acts[purified], acts[stream]) and bool((acts[g] == 1).all())
    torch.testing.assert_close(m(x), before)
    assert not torch.allclose(opened, before)


def test_gates_open_opens_gates_whose_tap_only_observes_the_mask():
    """MIM's models tap the mask beside the product (feature = x * mask computed before the tap)."""
    torch.manual_seed(0)
    model = fz.create_model("mim_add", encoder="test_resnet", num_classes=3).eval()
    with torch.no_grad():
        for p in model.gate_parameters():    # shut every gate: the purified features are all zero
            p.fill_(0.0)
        for op in model.fusions.values():
            for gate in op.gates:
                gate.logits[-1].bias.fill_(-50.0)
    x = {k: v for k, v in _data()[0].items() if k != "mask"}
    gates = gate_taps(model.tap_info(), model.modalities)
    with fz.capture(model, "*.purified") as shut:
        model(x)
    with gates_open(model, gates), fz.capture(model, "*.purified", "rgb.stage3", "depth.stage3") as opened:
        model(x)
    assert torch.equal(opened["rgb.stage3.purified"], opened["rgb.stage3"])
    assert not torch.equal(shut["rgb.stage3.purified"], opened["rgb.stage3.purified"])


def test_models_without_gates_have_no_section():
    model = fz.create_model("late_mean", encoder="test_resnet", num_classes=3).eval()
    res = interpret.run(model, _data(), metrics=["purification"], replicates=0, max_batches=1)
    assert res.purification is None and "purification" not in res.settings["skipped"]


def test_report_has_the_purification_section_with_intervals(result, tmp_path):
    page = write_report(result, tmp_path)["report"].read_text()
    assert "What purification removes" in page
    assert "depth.stage2.gate" in page and "100.0 [100.0, 100.0]" in page   # class 1 kept, with its interval
    assert "gates forced open" in page


def test_a_mim_model_gets_keep_rates_and_the_open_comparison():
    torch.manual_seed(0)
    model = fz.create_model("mim_add", encoder="test_resnet", num_classes=3).eval()
    res = interpret.run(model, _data(), metrics=["contribution", "purification"], replicates=0, policies=(),
                        perceptual=False)
    sec = res.purification
    assert sorted(sec["gates"]) == sorted(f"{m}.stage{i}.gate" for m in ("rgb", "depth") for i in range(1, 5))
    assert all(0.0 <= g["keep"] <= 1.0 for g in sec["gates"].values())
    assert set(sec["contribution"]) == {"policy", "gated", "open", "difference"}   # the gate taps are the multipliers


def test_findings_state_what_each_gate_keeps_and_what_opening_them_changes(result):
    items = [f for f in findings(result) if f.kind == "purification"]
    depth = next(f for f in items if f.numbers.get("tap") == "depth.stage2.gate")
    assert depth.status == "holds" and "most of 1" in depth.text and "not resolved" not in depth.text
    rgb = next(f for f in items if f.numbers.get("tap") == "rgb.stage2.gate")
    assert "every class alike" in rgb.text                     # 25 % of every class in every resample
    change = next(f for f in items if "forced open" in f.text)
    assert change.policies == ["zero"] and "Shapley value" in change.text
