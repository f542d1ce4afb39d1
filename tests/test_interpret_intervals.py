"""Bootstrap intervals of modality contribution, removal policies as a dimension, and the
Harsanyi dividend: known answers.

- Coverage: on the synthetic world, the 95 % interval from n images covers the value measured on
  a 10x larger sample in about 95 % of 20 seeds (a fixed nearest-class-mean predictor through the
  same accumulator code as ``interpret.run``).
- Exactness: all-one weights reproduce the point estimate; integer weights equal duplicating the
  images; two shards with their global image indices give the one-run replicates.
- Policies: every policy in one pass, shared full/empty passes, ``missing`` only where the model
  has its own path, ``mean`` statistics from an exact pre-pass.
- Harsanyi: the 3-way dividend of hand-computed 3-player games.
"""

import numpy as np
import pytest
import torch
from torch import nn

from fusionzoo import interpret
from fusionzoo.data import create_dataset
from fusionzoo.interpret.contribution import (
    ContributionAccumulator,
    StreamingModalityStats,
    WeightedConfusion,
    modality_contribution,
    replicate_intervals,
    task_for,
)
from fusionzoo.interpret.interaction import (
    coalition_game,
    coalition_terms,
    game_terms,
    harsanyi_dividend,
    interaction_index,
)
from fusionzoo.interpret.intervals import percentile_interval, poisson_weights
from fusionzoo.interpret.pid import PredictionJoint
from fusionzoo.taps import TapSet
from fusionzoo.tasks import get_task

K = 5  # synthetic world classes
N, SEEDS, TRUTH = 12, 20, 120  # images per interval, seeds, images of the reference value


class NearestMean(nn.Module):
    """Per-pixel nearest class mean over (rgb, depth) features: a fixed, deterministic predictor
    that uses both modalities. A removed modality is zeros (the ``zero`` policy); with
    ``own_missing`` the ``missing`` path instead drops that modality from the distance."""

    def __init__(self, means: torch.Tensor, own_missing: bool = True):
        super().__init__()
        self.modalities, self.num_classes = ("rgb", "depth"), means.shape[0]
        self.register_buffer("means", means)  # (K, 4)
        self.own_missing = own_missing
        self.taps = TapSet()
        self.taps.declare("head.logits", self.num_classes, 1, "logits")

    def tap_info(self):
        return self.taps.info()

    def forward(self, inputs, missing=()):
        ref = next(iter(inputs.values()))
        x = torch.cat([inputs["rgb"] if "rgb" in inputs else ref.new_zeros(ref.shape[0], 3, *ref.shape[-2:]),
                       inputs["depth"] if "depth" in inputs else ref.new_zeros(ref.shape[0], 1, *ref.shape[-2:])], 1)
        use = torch.ones(4)
        if self.own_missing:
            use[:3] -= float("rgb" in missing)
            use[3:] -= float("depth" in missing)
        d = (((x[:, None] - self.means[None, :, :, None, None]) ** 2) * use[None, None, :, None, None]).sum(2)
        return self.taps("head.logits", -d)


@pytest.fixture(scope="module")
def world():
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=SEEDS * N + TRUTH, image_size=(24, 32), seed=3)
    items = [ds[i] for i in range(len(ds))]
    batch = {k: torch.stack([it[k] for it in items]) for k in ("rgb", "depth", "mask")}
    x = torch.cat([batch["rgb"], batch["depth"]], 1)[:TRUTH].permute(0, 2, 3, 1).reshape(-1, 4)
    y = batch["mask"][:TRUTH].reshape(-1)
    means = torch.stack([x[y == c].mean(0) for c in range(K)])
    return batch, NearestMean(means)


def _accumulate(model, batch, idx, replicates, seed=0, policies=()):
    """A ContributionAccumulator over images ``idx`` (batches of 4) with global weights."""
    task = task_for(model)
    acc = ContributionAccumulator(task, model.modalities, K, "zero", perceptual=False, policies=policies,
                                  replicates=replicates)
    for start in range(0, len(idx), 4):
        sel = idx[start:start + 4]
        inputs = {m: batch[m][sel] for m in model.modalities}
        w = poisson_weights(seed, sel, replicates) if replicates else None
        for key, x, missing in acc.coalitions(inputs):
            acc.add(key, model(x, missing=missing), batch["mask"][sel], w)
    return acc


def _values(acc, tree=None):
    """Point values of the checked numbers, or their replicate arrays from ``tree``."""
    if tree is None:
        r = acc.result().to_dict()
        r.update(coalition_terms(r))
    else:
        r = tree
    return {"miou": r["coalitions"]["rgb+depth"]["miou"], "rgb_miou": r["coalitions"]["rgb"]["miou"],
            "shapley_rgb": r["shapley"]["rgb"], "shapley_depth": r["shapley"]["depth"],
            "interaction": r["interaction"]["rgb|depth"]["value"],
            "synergy": r["decomposition"]["rgb|depth"]["overall"]["synergy"]}


def _replicates(acc):
    tree = acc.replicate_values()
    tree.update(game_terms(*coalition_game({"metric": "mIoU", "modalities": acc.modalities,
                                            "coalitions": tree["coalitions"]})))
    return tree


def test_interval_covers_the_value_of_a_ten_times_larger_sample(world):
    batch, model = world
    truth = _values(_accumulate(model, batch, list(range(TRUTH)), 0))
    covered = {k: 0 for k in truth}
    widths = {k: [] for k in truth}
    for s in range(SEEDS):
        idx = list(range(TRUTH + s * N, TRUTH + (s + 1) * N))
        reps = _values(None, _replicates(_accumulate(model, batch, idx, 200, seed=s)))
        for k, r in reps.items():
            lo, hi = percentile_interval(r, 0.95)
            covered[k] += lo <= truth[k] <= hi
            widths[k].append(hi - lo)
    for k in truth:
        assert covered[k] >= 16, (k, covered[k], truth[k])
        # not absurdly wide: well inside the metric's range, and never degenerate
        assert 0 < np.median(widths[k]) < 0.25, (k, np.median(widths[k]))


def test_all_one_weights_reproduce_the_point_estimate(world):
    batch, model = world
    idx = list(range(8))
    acc = ContributionAccumulator(task_for(model), model.modalities, K, "zero", perceptual=True, replicates=3)
    joint = PredictionJoint(model.modalities, K, replicates=3)
    acc.observers["zero"].append(joint)
    for sel in (idx[:4], idx[4:]):
        inputs = {m: batch[m][sel] for m in model.modalities}
        ones = torch.ones(3, len(sel), dtype=torch.float64)
        full = None
        for key, x, missing in acc.coalitions(inputs):
            out = model(x, missing=missing)
            full = out if key[1] == acc.full else full
            acc.add(key, out, batch["mask"][sel], ones)
        for m, x in acc.permutations(inputs, full, batch["mask"][sel], ones):
            acc.add_permuted(m, model(x), batch["mask"][sel], ones)
    point, tree = _values(acc), _values(None, _replicates(acc))
    for k, v in point.items():
        np.testing.assert_allclose(tree[k], v, rtol=1e-12, atol=1e-14, err_msg=k)
    res, reps = acc.result(), acc.replicate_values()
    np.testing.assert_allclose(reps["perceptual"]["depth"]["drop"], res.perceptual["depth"]["drop"], rtol=1e-12)
    np.testing.assert_allclose(reps["shapley_per_class"]["rgb"], np.tile(res.shapley_per_class["rgb"], (3, 1)),
                               rtol=1e-12, atol=1e-14)
    for key, c in joint.counts.items():
        assert torch.equal(joint.rep_counts[key], c.double().expand(3, -1))
    pid = joint.replicate_values()["pairs"]["rgb|depth"]["prediction"]["overall"]
    point_pid = joint.result()["pairs"]["rgb|depth"]["prediction"]["overall"]
    np.testing.assert_allclose(pid["synergy"], point_pid["synergy"], atol=1e-5)


def test_integer_weights_equal_duplicated_images(world):
    batch, model = world
    idx = list(range(8))
    w = torch.tensor([[2.0, 0.0, 1.0, 3.0, 1.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    acc = ContributionAccumulator(task_for(model), model.modalities, K, "zero", perceptual=False, replicates=1)
    for sel in (idx[:4], idx[4:]):
        inputs = {m: batch[m][sel] for m in model.modalities}
        for key, x, missing in acc.coalitions(inputs):
            acc.add(key, model(x, missing=missing), batch["mask"][sel], w[:, sel])
    dup = [i for i in idx for _ in range(int(w[0, i]))]
    plain = _accumulate(model, batch, dup, 0)
    rep, ref = _values(None, _replicates(acc)), _values(plain)
    for k in ref:
        assert float(rep[k][0]) == pytest.approx(ref[k], rel=1e-12, abs=1e-14), k


def test_two_shards_with_global_indices_give_the_one_run_replicates(world):
    batch, model = world
    idx = list(range(16))
    assert torch.equal(poisson_weights(7, idx, 50), torch.cat([poisson_weights(7, idx[:8], 50),
                                                               poisson_weights(7, idx[8:], 50)], 1))
    one = _accumulate(model, batch, idx, 50, seed=7)
    a, b = _accumulate(model, batch, idx[:8], 50, seed=7), _accumulate(model, batch, idx[8:], 50, seed=7)
    for key, r in one.reps.items():  # replicate states all-reduce exactly: sums of integer-weighted counts
        assert torch.equal(r.matrix, a.reps[key].matrix + b.reps[key].matrix), key


def test_weighted_confusion_matches_the_training_metric():
    from fusionzoo.tasks import ConfusionMatrix

    g = torch.Generator().manual_seed(0)
    pred, mask = torch.randint(0, 3, (4, 6, 6), generator=g), torch.randint(0, 3, (4, 6, 6), generator=g)
    mask[0, 0] = 255
    cm, wc = ConfusionMatrix(3), WeightedConfusion(3, 255, 2)
    cm.update(pred, mask)
    wc.update(pred, mask, torch.ones(2, 4, dtype=torch.float64))
    assert torch.equal(wc.matrix[1], cm.matrix.double())
    assert wc.values()["miou"][0] == pytest.approx(cm.compute()["miou"], rel=1e-12)
    with pytest.raises(ValueError, match=r"\(R, B\)"):
        wc.update(pred, mask, torch.ones(2, 3, dtype=torch.float64))


def test_replicate_intervals_follow_the_json_paths():
    tree = {"shapley": {"rgb": np.arange(200.0)}, "shapley_per_class": {"rgb": np.zeros((200, 3))}, "a": "rgb"}
    iv = replicate_intervals(tree, 0.95)
    assert set(iv) == {"shapley.rgb", "shapley_per_class.rgb.0", "shapley_per_class.rgb.1", "shapley_per_class.rgb.2"}
    assert iv["shapley.rgb"] == pytest.approx([4.975, 194.025])


# ----------------------------------------------------------------------------------- policies
def test_policies_in_one_pass_with_intervals(world):
    batch, model = world
    data = [{k: v[i:i + 4] for k, v in batch.items()} for i in range(0, 8, 4)]
    res = interpret.run(model, data, metrics=["contribution"], replicates=50, perceptual=False)
    c = res.contribution
    assert res.settings["policies"] == ["zero", "mean", "missing"] == list(c["policies"])
    assert res.settings["stats"] == "measured by a pre-pass over the run's images"
    assert c["policies"]["zero"]["shapley"] == c["shapley"]  # the top level is the main policy
    # the full input is one pass shared by every policy; the missing policy's empty coalition is zero's
    fulls = {p: c["policies"][p]["coalitions"]["rgb+depth"]["miou"] for p in c["policies"]}
    assert len(set(fulls.values())) == 1
    none = {p: c["policies"][p]["coalitions"]["none"] for p in ("missing", "zero")}
    assert none["missing"]["iou"] == pytest.approx(none["zero"]["iou"], nan_ok=True, rel=0, abs=0)
    # the mean policy equals a separate run with the exact dataset statistics
    stats = StreamingModalityStats.measure(data, model.modalities)
    ref = modality_contribution(model, data, policy="mean", stats=stats, perceptual=False)
    assert c["policies"]["mean"]["shapley"] == pytest.approx(ref.shapley, rel=1e-9, abs=1e-12)
    assert c["policies"]["missing"]["shapley"] != pytest.approx(c["shapley"])  # its own path differs
    for p in ("zero", "mean", "missing"):
        lo, hi = res.intervals[f"contribution.policies.{p}.shapley.rgb"]
        assert lo <= c["policies"][p]["shapley"]["rgb"] <= hi
        assert f"contribution.policies.{p}.decomposition.rgb|depth.per_class.synergy.4" in res.intervals
    assert res.intervals["contribution.shapley.rgb"] == res.intervals["contribution.policies.zero.shapley.rgb"]
    assert "contribution.pid.pairs.rgb|depth.prediction.overall.synergy" in res.intervals
    assert "contribution.coalitions.rgb.iou.3" in res.intervals


def test_missing_policy_only_where_the_model_has_its_own_path(world):
    batch, _ = world
    data = [{k: v[:4] for k, v in batch.items()}]
    zero_fill = NearestMean(world[1].means, own_missing=False)  # missing = zeros: no path of its own
    res = interpret.run(zero_fill, data, metrics=["contribution"], replicates=0, perceptual=False)
    assert list(res.contribution["policies"]) == ["zero", "mean"]
    assert "zero filling" in res.settings["policies_dropped"]["missing"]
    # asked for explicitly, it is measured anyway; an unknown policy is an error naming the option
    res = interpret.run(zero_fill, data, metrics=["contribution"], replicates=0, perceptual=False,
                        policies=["missing"])
    assert list(res.contribution["policies"]) == ["zero", "missing"]
    with pytest.raises(ValueError, match="policies must be among"):
        interpret.run(zero_fill, data, metrics=["contribution"], policies=["blur"])


def test_mean_policy_on_an_iterator_needs_stats(world):
    batch, model = world
    data = [{k: v[:4] for k, v in batch.items()}]
    with pytest.raises(ValueError, match="stats="):
        interpret.run(model, iter(data), metrics=["contribution"], policy="mean", replicates=0)
    with pytest.warns(UserWarning, match="'mean' policy is left out"):
        res = interpret.run(model, iter(data), metrics=["contribution"], replicates=0, perceptual=False)
    assert list(res.contribution["policies"]) == ["zero", "missing"]


# ----------------------------------------------------------------------------------- harsanyi
def test_harsanyi_dividend_known_answers():
    vals = dict(zip(["", "a", "b", "c", "ab", "ac", "bc", "abc"], [0, 10, 20, 30, 40, 70, 60, 95]))
    v = lambda s: float(vals["".join(sorted(s))])
    # 95 - (40 + 70 + 60) + (10 + 20 + 30) - 0
    assert harsanyi_dividend("abc", v) == pytest.approx(-15.0)
    assert harsanyi_dividend("ab", v) == pytest.approx(10.0)  # 40 - 10 - 20 + 0
    # the pairwise index of a 3-player game is d(ab) + d(abc) / 2
    assert interaction_index("abc", v)[("a", "b")] == pytest.approx(10.0 - 15.0 / 2)
    assert harsanyi_dividend("abc", lambda s: float(len(s) == 3)) == 1.0   # only all three
    assert harsanyi_dividend("abc", lambda s: float(len(s) >= 1)) == 1.0   # any one: 3 - 3 + 1
    assert harsanyi_dividend("abc", lambda s: float("a" in s)) == 0.0      # additive: no 3-way term


def test_harsanyi_of_three_modalities_with_intervals():
    class AllThree(nn.Module):
        """Class 1 where rgb, depth and thermal are all positive: a pure 3-way AND."""

        modalities, num_classes = ("rgb", "depth", "thermal"), 2

        def forward(self, inputs, missing=()):
            on = (inputs["rgb"][:, 0] > 0) & (inputs["depth"][:, 0] > 0) & (inputs["thermal"][:, 0] > 0)
            return torch.stack([torch.zeros_like(on, dtype=torch.float), 10.0 * on.float() - 5], 1)

    g = torch.Generator().manual_seed(0)
    model = AllThree()
    acc = ContributionAccumulator(get_task("segmentation"), model.modalities, 2, "zero", perceptual=False,
                                  replicates=50)
    for i in range(3):
        x = {m: torch.randn(4, 1, 8, 8, generator=g) for m in model.modalities}
        mask = ((x["rgb"][:, 0] > 0) & (x["depth"][:, 0] > 0) & (x["thermal"][:, 0] > 0)).long()
        for key, xi, missing in acc.coalitions(x):
            acc.add(key, model(xi), mask, poisson_weights(0, range(4 * i, 4 * i + 4), 50))
    res = acc.result().to_dict()
    h = coalition_terms(res)["harsanyi"]["rgb|depth|thermal"]
    # every coalition short of all three predicts background only: IoU 1 of class 1 needs all three
    # (v(N) = 1, every smaller coalition scores the background IoU b and class 1 IoU 0)
    # so d(N) = v(N) - 3 v(pair) + 3 v(single) - v(none) = 1 - v(none): per class 1 - b and 1, overall 1 - b / 2
    b = res["coalitions"]["none"]["iou"][0]
    assert 0 < b < 1 and res["coalitions"]["rgb+depth"]["iou"] == pytest.approx([b, 0.0])
    assert h["per_class"] == pytest.approx([1.0 - b, 1.0], abs=1e-12)
    assert h["value"] == pytest.approx(1.0 - b / 2, abs=1e-12)
    reps = _replicates(acc)["harsanyi"]["rgb|depth|thermal"]
    lo, hi = percentile_interval(reps["per_class"][:, 1], 0.95)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)


def test_cli_policies_reach_interpret_run(tmp_path, capsys, monkeypatch):
    # the pass-through only (run() itself is tested above; tests/test_cli.py runs the command end to end)
    import fusionzoo.commands.interpret as command
    from fusionzoo.cli import main

    class Stop(Exception):
        pass

    seen = {}

    def fake_run(model, dataset, **options):
        seen.update(options)
        raise Stop

    monkeypatch.setattr(command, "interpret_model", fake_run)
    tiny = ["--num-samples", "2", "--image-size", "32", "32", "--no-progress"]
    with pytest.raises(Stop):
        main(["interpret", "late_mean_resnet18", "--out", str(tmp_path), "--policies", "zero,mean", *tiny])
    assert seen["policies"] == ["zero", "mean"]
    with pytest.raises(Stop):
        main(["interpret", "late_mean_resnet18", "--out", str(tmp_path), *tiny])
    assert seen["policies"] is None  # run()'s default: zero, mean and missing where the model has its own
    with pytest.raises(Stop):  # run() measures the mean policy's statistics itself, so it may be the main one
        main(["interpret", "late_mean_resnet18", "--out", str(tmp_path), "--policy", "mean", *tiny])
    assert seen["policy"] == "mean"
    with pytest.raises(SystemExit) as e:
        main(["interpret", "late_mean_resnet18", "--out", str(tmp_path), "--policies", "zero,blur", *tiny])
    assert e.value.code == 2 and "unknown removal policy 'blur'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- detection
def _detections(n_images, seed=0):
    """Random boxes with some near-copies of the ground truth, 3 classes."""
    g = torch.Generator().manual_seed(seed)
    preds, tgts = [], []
    for _ in range(n_images):
        n, m = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(0, 6, (1,), generator=g))
        corner = torch.rand(n, 2, generator=g) * 50
        gt = torch.cat([corner, corner + 10 + torch.rand(n, 2, generator=g) * 20], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        corner = torch.rand(m, 2, generator=g) * 50
        boxes = torch.cat([corner, corner + 10 + torch.rand(m, 2, generator=g) * 20], 1)
        pl = torch.randint(0, 3, (m,), generator=g)
        j = min(n, m)
        boxes[:j], pl[:j] = gt[:j] + torch.randn(j, 4, generator=g), labels[:j]
        preds.append({"boxes": boxes, "scores": torch.rand(m, generator=g), "labels": pl})
        tgts.append({"boxes": gt, "labels": labels})
    return preds, tgts


def test_weighted_coco_ap_is_pycocotools_and_duplication():
    from fusionzoo.detection.metrics import weighted_coco_ap
    from fusionzoo.tasks import DetectionEvaluator

    preds, tgts = _detections(12)
    ev = DetectionEvaluator(3, per_class=True)
    ev.update(preds, tgts)
    ref, w = ev.compute(), weighted_coco_ap(preds, tgts, np.ones((2, 12)), 3)
    for key in ("ap", "ap50", "ap75"):
        np.testing.assert_allclose(w[key], ref[key], rtol=1e-12)
    for key in ("ap_per_class", "ap50_per_class"):
        np.testing.assert_allclose(w[key], np.tile(ref[key], (2, 1)), rtol=1e-12)
    counts = np.array([[2, 0, 1, 3, 1, 0, 2, 1, 1, 1, 0, 2]], dtype=float)
    dup = [i for i in range(12) for _ in range(int(counts[0, i]))]
    ev = DetectionEvaluator(3, per_class=True)
    ev.update([preds[i] for i in dup], [tgts[i] for i in dup])
    ref, w = ev.compute(), weighted_coco_ap(preds, tgts, counts, 3)
    assert w["ap"][0] == pytest.approx(ref["ap"], rel=1e-12)
    np.testing.assert_allclose(w["ap_per_class"][0], ref["ap_per_class"], rtol=1e-12)
    with pytest.raises(ValueError, match=r"weights must be \(R, 12\)"):
        weighted_coco_ap(preds, tgts, np.ones((2, 11)), 3)


def test_detector_contribution_carries_intervals():
    import fusionzoo as fz

    ds = create_dataset("synthetic_rgbt", split="val", num_samples=2, image_size=(32, 32), seed=0)
    torch.manual_seed(0)
    model = fz.create_model("fcos_late_nms", encoder="resnet10t", num_classes=ds.num_classes - 1)
    res = interpret.run(model, ds, metrics=["contribution"], batch_size=2, replicates=20, policies=(),
                        perceptual=False)
    c = res.contribution
    assert c["metric"] == "AP" and "COCO AP with weighted" in res.settings["contribution_intervals"]
    for path in ("coalitions.rgb+thermal.ap", "shapley.rgb", "interaction.rgb|thermal.value",
                 "decomposition.rgb|thermal.overall.synergy"):
        assert f"contribution.{path}" in res.intervals, path


def test_passes_of_further_policies_reach_contribution_only(world):
    # reliance rides on the main policy's one-removed passes; the further policies' passes must not
    # reach it (Pass.shared), so reliance is the same with or without them
    batch, model = world
    data = [{k: v[i:i + 4] for k, v in batch.items()} for i in range(0, 8, 4)]
    kw = {"metrics": ["contribution", "reliance"], "replicates": 0, "perceptual": False, "samples_per_image": 8}
    alone = interpret.run(model, data, policies=(), **kw)
    several = interpret.run(model, data, **kw)
    assert list(several.contribution["policies"]) == ["zero", "mean", "missing"]
    assert several.reliance["head.logits"] == pytest.approx(alone.reliance["head.logits"], rel=1e-9)
    assert several.contribution["shapley"] == pytest.approx(alone.contribution["shapley"], rel=1e-12)
