"""compare over seeds (mean +- spread, differences against the seed spread), retrained
references, refusal of incomparable runs, and interpret's data checks (issue 21 item 1 and 3,
issue 22 items 3, 4 and 9)."""

import json

import pytest
import torch

import fusionzoo as fz
from fusionzoo.cli import main
from fusionzoo.data import create_dataset
from fusionzoo.engine.config import TrainConfig, write_config
from fusionzoo.hub import save_pretrained
from fusionzoo.interpret import InterpretResult, compare
from fusionzoo.interpret.compare import IncomparableError, check_comparable, find_references, seed_groups
from fusionzoo.interpret.findings import findings, seed_verdicts

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CLASSES = ["poster", "box", "ball", "crate"]


def _result(model="esanet_resnet18", seed=0, full=0.8, rgb=0.5, depth=0.4, mods=("rgb", "depth"), cfg=None,
            task="segmentation", classes=CLASSES, width=0.02, drop_width=None, **cfg_extra) -> InterpretResult:
    """A hand-built result: per-class IoU equal to the mIoU in every class, intervals of +-width."""
    mods = list(mods)
    if len(mods) == 2:  # the second modality (depth or thermal) takes the "depth" numbers
        a, b = mods
        vals = {"none": 0.0, a: rgb, b: depth, f"{a}+{b}": full}
        sh = {a: (full - depth + rgb) / 2, b: (full - rgb + depth) / 2}
        drop = {a: full - depth, b: full - rgb}
    else:
        vals = {"none": 0.0, mods[0]: {"rgb": rgb, "depth": depth}.get(mods[0], rgb)}
        sh, drop = {mods[0]: vals[mods[0]]}, {mods[0]: vals[mods[0]]}
    coal = {k: {"miou": v, "iou": [v] * len(classes)} for k, v in vals.items()}
    key = "+".join(mods)
    intervals = {f"contribution.coalitions.{key}.miou": [vals[key] - width, vals[key] + width]}
    dw = width if drop_width is None else drop_width
    intervals.update({f"contribution.drop.{m}": [v - dw, v + dw] for m, v in drop.items()})
    intervals.update({f"contribution.shapley.{m}": [v - width, v + width] for m, v in sh.items()})
    if len(mods) == 2:
        intervals.update({f"contribution.coalitions.{m}.miou": [vals[m] - width, vals[m] + width] for m in mods})
    config = {"model": model, "dataset": "synthetic_rgbd", "lr": 0.002, "epochs": 3, "seed": seed,
              "modalities": None if len(mods) == 2 else mods, "modality_dropout": 0.0, "train_missing": [],
              "out_dir": f"runs{seed}", **cfg_extra}
    if cfg is not None:
        config = cfg
    return InterpretResult(
        model=model, fusion="middle", config={}, modalities=mods, num_classes=len(classes), class_names=list(classes),
        num_images=24, taps={}, settings={"policy": "zero", "task": task, "run": {"dir": "x", "config": config}},
        contribution={"metric": "mIoU" if task == "segmentation" else "AP", "policy": "zero", "modalities": mods,
                      "coalitions": coal, "shapley": sh, "drop": drop},
        intervals=intervals)


def test_seeds_of_one_recipe_are_grouped_with_mean_and_spread():
    a = [_result(seed=s, full=f) for s, f in enumerate((0.80, 0.82, 0.84))]
    b = [_result("cmx_resnet18", seed=s, full=f) for s, f in enumerate((0.70, 0.72, 0.74))]
    c = [_result("late_mean_resnet18", seed=s, full=f) for s, f in enumerate((0.79, 0.85, 0.90))]
    cmp = compare([*a, *b, *c])
    groups = {g["label"]: g for g in cmp.groups}
    g = groups["esanet_resnet18"]
    assert g["n"] == 3 and g["members"] == ["esanet_resnet18", "esanet_resnet18#2", "esanet_resnet18#3"]
    assert g["seeds"] == [0, 1, 2]
    s = g["stats"]["score"]
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02)
    assert (s["min"], s["max"], s["n"]) == (pytest.approx(0.80), pytest.approx(0.84), 3)
    diff = {(d["a"], d["b"], d["number"]): d for d in cmp.differences}
    # esanet 0.80..0.84 vs cmx 0.70..0.74: apart; esanet vs late 0.79..0.90: ranges overlap
    assert diff[("esanet_resnet18", "cmx_resnet18", "score")]["exceeds_seed_spread"] is True
    assert diff[("esanet_resnet18", "cmx_resnet18", "score")]["p_separation"] == pytest.approx(0.1)
    assert diff[("esanet_resnet18", "late_mean_resnet18", "score")]["exceeds_seed_spread"] is False
    # intervals of the headline numbers travel into the comparison (and its JSON)
    assert cmp.intervals["esanet_resnet18"]["score"] == pytest.approx([0.78, 0.82])
    assert json.loads(json.dumps(cmp.to_json()))["groups"][0]["stats"]["score"]["n"] == 3


def test_another_recipe_or_an_unknown_one_is_not_pooled_as_seeds():
    lr = _result(seed=1, lr=0.01)
    unknown = _result(seed=2)
    unknown.settings.pop("run")
    groups = seed_groups(["a", "b", "c"], [_result(seed=0), lr, unknown])
    assert [g["n"] for g in groups] == [1, 1, 1]
    # bookkeeping keys (out_dir, the seed) do not split a recipe
    assert [g["n"] for g in seed_groups(["a", "b"], [_result(seed=0), _result(seed=5)])] == [2]


def test_class_verdict_over_seeds():
    # seeds disagree on the carrier: with rgb 0.5 / depth 0.4 of 0.8 the class is mixed ... make one
    # seed redundant (both alone give 0.8) and two seeds synergy (neither alone gives anything)
    runs = [_result(seed=0, full=0.8, rgb=0.8, depth=0.8), _result(seed=1, full=0.8, rgb=0.0, depth=0.0),
            _result(seed=2, full=0.8, rgb=0.0, depth=0.0)]
    ((_, _, rows),) = seed_verdicts(["a", "b", "c"], runs)
    ball = next(r for r in rows if r[2] == "ball")
    assert ball[3] == "redundancy 1, synergy 2 (of 3)" and ball[4] == "no"
    stable = [_result(seed=s, full=0.8, rgb=0.0, depth=0.0) for s in range(3)]
    (_, _, rows), = seed_verdicts(["a", "b", "c"], stable)
    assert all(r[4] == "synergy" for r in rows)


def test_incomparable_runs_are_refused_naming_both():
    seg = _result()
    with pytest.raises(IncomparableError, match=r"cannot compare a and b: they differ in task"):
        check_comparable(["a", "b"], [seg, _result(task="detection")])
    with pytest.raises(IncomparableError, match=r"differ in modalities \(a: rgb\+depth; b: rgb\+thermal\)"):
        check_comparable(["a", "b"], [seg, _result(mods=("rgb", "thermal"))])
    with pytest.raises(IncomparableError, match=r"differ in classes"):
        check_comparable(["a", "b"], [seg, _result(classes=["person"] * 4)])
    unnamed = _result()
    unnamed.class_names = None  # an older result without names: the class counts are compared
    check_comparable(["a", "b"], [seg, unnamed])
    with pytest.raises(IncomparableError, match=r"differ in classes \(a: 4 classes; b: 2 classes\)"):
        check_comparable(["a", "b"], [unnamed, _result(classes=["x", "y"])])
    check_comparable(["a", "b"], [seg, _result(mods=("rgb",))])  # a unimodal reference is welcome


def test_compare_cli_refuses_in_one_line_and_prints_seed_spread(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _result().save(a / "metrics.json")
    _result(mods=("rgb", "thermal"), task="detection").save(b / "metrics.json")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot compare {b} and {a}" in err[0] or f"cannot compare {a} and {b}" in err[0]
    assert "differ in task" in err[0]
    seeds = []
    for s, f in enumerate((0.80, 0.82, 0.84)):
        seeds.append(tmp_path / f"s{s}")
        _result(seed=s, full=f).save(seeds[-1] / "metrics.json")
    assert main(["compare", *map(str, seeds), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| esanet_resnet18 | score | 82.0 +- 2.0 | 80.0..84.0 | 3 |" in out
    assert "80.0 [78.0, 82.0]" in out  # the headline table carries intervals
    data = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert data["groups"][0]["n"] == 3 and data["intervals"]["esanet_resnet18"]["score"] == pytest.approx([0.78, 0.82])
    assert "mean +- std" in (tmp_path / "cmp" / "report.html").read_text()


def _reference_text(fused, ref):
    refs = find_references(["fused", "ref"], [fused, ref])
    fused.settings["references"] = refs["fused"]
    return next(f for f in findings(fused) if f.kind == "references")


def test_retrained_reference_tells_learned_use_from_breakage():
    ref = _result(mods=("rgb",), rgb=0.5, seed=3)
    learned = _reference_text(_result(full=0.8, rgb=0.3), ref)
    assert learned.text.startswith("Learned to use both: the fused model beats a model retrained on rgb alone (ref) "
                                   "by 30.0 points")
    assert "removing depth drops it by 50.0 [48.0, 52.0] under zero" in learned.text
    # removal costs 50 points, but a model trained on rgb alone does as well as the fused one
    broke = _reference_text(_result(full=0.8, rgb=0.3), _result(mods=("rgb",), rgb=0.79, seed=3))
    assert broke.text.startswith("Breaks when depth is removed under zero (drop 50.0 [48.0, 52.0] under zero), but a "
                                 "model retrained on rgb alone (ref) does as well (fused 80.0 [78.0, 82.0], reference "
                                 "79.0 [77.0, 81.0], intervals overlap)")
    assert "the drop measures breakage, not what depth adds" in broke.text
    # a modality-dropout run of the same recipe: its rgb-only coalition is the reference
    dropout = _result(full=0.8, rgb=0.78, seed=4, modality_dropout=0.5, modality_dropout_candidates=["depth"])
    dtext = _reference_text(_result(full=0.8, rgb=0.3), dropout)
    assert "trained with modality dropout, evaluated on rgb alone under zero" in dtext.text
    assert dtext.text.startswith("Breaks")
    # another recipe is no reference
    assert find_references(["f", "r"], [_result(), _result(mods=("rgb",), lr=0.1)]) == {}


def _run_folder(root, name, modalities=None):
    torch.manual_seed(0)
    run = root / name
    run.mkdir(parents=True)
    cfg = TrainConfig(model="late_mean_resnet18", image_size=(32, 32), val_samples=4,
                      modalities=tuple(modalities) if modalities else None)
    val = create_dataset("synthetic_rgbd", split=cfg.val_split, num_samples=4, image_size=(32, 32))
    write_config(cfg, run / "config.json", extra={"modalities": list(modalities or val.modalities)})
    model = fz.create_model("late_mean_resnet18", num_classes=val.num_classes,
                            modalities=tuple(modalities or val.modalities)).eval()
    save_pretrained(model, run / "best", class_names=val.classes)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders of one recipe as train.py writes them: RGB-D and RGB only (untrained weights)."""
    root = tmp_path_factory.mktemp("runs")
    return {"fused": _run_folder(root, "fused"), "rgb": _run_folder(root, "rgb", modalities=("rgb",))}


ARGS = ["--metrics", "contribution", "--no-progress", "--batch-size", "2"]


def test_interpret_says_when_flags_replace_the_runs_validation_set(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["interpret", str(runs["fused"]), "--out", str(out), *ARGS, "--num-samples", "4",
                 "--image-size", "32", "32"]) == 0
    err = capsys.readouterr().err
    assert "warning: --num-samples replaced the run's validation set" in err
    data = json.loads((out / "metrics.json").read_text())
    assert data["settings"]["data"]["flags"] == ["--num-samples"]
    assert "replaced the run&#x27;s validation set" in (out / "report.html").read_text()
    assert data["settings"]["run"]["config"]["model"] == "late_mean_resnet18"


def test_interpret_refuses_data_the_model_cannot_take(runs, tmp_path, capsys):
    wide = tmp_path / "m40"
    save_pretrained(fz.create_model("late_mean_resnet18", num_classes=40), wide)
    tiny = ["--num-samples", "4", "--image-size", "32", "32", *ARGS]
    assert main(["interpret", str(wide), "--out", str(tmp_path / "o"), *tiny]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "predicts 40 classes but the data" in err[0] and "has 5" in err[0]
    best = runs["fused"] / "best"
    assert main(["interpret", str(best), "--dataset", "synthetic_rgbt", "--out", str(tmp_path / "o"), *tiny]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes rgb+depth but the data" in err[0] and "(no depth)" in err[0]


def test_interpret_with_a_retrained_reference_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["interpret", str(runs["fused"]), "--reference", f"rgb={runs['rgb']}", "--out", str(out), *ARGS,
                 "--image-size", "32", "32"]) == 0
    # the run's own validation set: nothing replaced, and a flag that cannot apply to it says so
    err = capsys.readouterr().err
    assert "replaced" not in err and "warning: --image-size ignored: the run's own validation set is used" in err
    data = json.loads((out / "metrics.json").read_text())
    assert data["settings"]["data"]["source"] == "the run's validation set"
    (ref,) = data["settings"]["references"]
    assert ref["kind"] == "unimodal" and ref["kept"] == ["rgb"] and ref["removed"] == ["depth"]
    assert ref["score"] is not None and ref["fused"] == pytest.approx(
        data["contribution"]["coalitions"]["rgb+depth"]["miou"])
    assert "retrained references" in (out / "report.html").read_text()
    # the fused run's own output is no reference for it (same streams, no modality dropout)
    assert main(["interpret", str(runs["fused"]), "--reference", f"rgb={out}", "--out", str(tmp_path / "o2"),
                 *ARGS]) == 2
    assert "is no reference for rgb+depth keeping rgb" in capsys.readouterr().err


def test_repeated_models_are_labelled_by_their_run_folders():
    from fusionzoo.interpret.api import InterpretResult
    from fusionzoo.interpret.compare import labels_of

    def res(run_dir):
        settings = {"run": {"dir": run_dir}} if run_dir else {}
        return InterpretResult(model="esanet_resnet18", fusion="middle", config={}, modalities=["rgb", "depth"],
                               num_classes=5, class_names=None, num_images=4, taps={}, settings=settings)

    assert labels_of([res("runs/seed0"), res("runs/seed1")]) == ["esanet_resnet18@seed0", "esanet_resnet18@seed1"]
    # folders of one name, or one without a folder: numbered as before
    assert labels_of([res("a/x"), res("b/x")]) == ["esanet_resnet18", "esanet_resnet18#2"]
    assert labels_of([res("runs/seed0"), res(None)]) == ["esanet_resnet18", "esanet_resnet18#2"]
    assert labels_of([res("runs/seed0")]) == ["esanet_resnet18"]
