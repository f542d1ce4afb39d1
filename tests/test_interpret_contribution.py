"""Modality contribution: Shapley values on hand-written games, removal policies, and a toy
model whose answer is known (it reads only depth)."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fusionzoo.interpret.contribution import (
    StreamingModalityStats,
    derangement,
    modality_contribution,
    perceptual_score,
    remove_modalities,
    shapley_values,
)


def _by_orderings(players, v):
    """Shapley values as the mean marginal contribution over all orderings (independent method)."""
    phi = {p: 0.0 for p in players}
    perms = list(itertools.permutations(players))
    for order in perms:
        s = frozenset()
        for p in order:
            phi[p] += v(s | {p}) - v(s)
            s = s | {p}
    return {p: x / len(perms) for p, x in phi.items()}


def test_shapley_two_player_game():
    table = {frozenset(): 0.0, frozenset("a"): 1.0, frozenset("b"): 2.0, frozenset("ab"): 5.0}
    phi = shapley_values(["a", "b"], table.__getitem__)
    assert phi == pytest.approx({"a": 2.0, "b": 3.0})


def test_shapley_three_player_games():
    majority = shapley_values(["x", "y", "z"], lambda s: float(len(s) >= 2))
    assert majority == pytest.approx({"x": 1 / 3, "y": 1 / 3, "z": 1 / 3})
    vals = dict(zip(["", "a", "b", "c", "ab", "ac", "bc", "abc"], [0, 10, 20, 30, 40, 70, 60, 95]))
    v = lambda s: float(vals["".join(sorted(s))])
    phi = shapley_values(["a", "b", "c"], v)
    assert phi == pytest.approx(_by_orderings(["a", "b", "c"], v))
    assert sum(phi.values()) == pytest.approx(95.0)
    # a dummy player gets 0, an additive game gives each player its own worth
    add = shapley_values(["a", "b", "c"], lambda s: 3.0 * ("a" in s) + 5.0 * ("c" in s))
    assert add == pytest.approx({"a": 3.0, "b": 0.0, "c": 5.0})


def test_shapley_vector_values():
    v = lambda s: np.array([len(s), 2.0 * ("a" in s)])
    phi = shapley_values(["a", "b"], v)
    np.testing.assert_allclose(phi["a"], [1.0, 2.0])
    np.testing.assert_allclose(phi["b"], [1.0, 0.0])


def test_derangement_has_no_fixed_point():
    g = torch.Generator().manual_seed(0)
    for n in range(2, 9):
        p = derangement(n, g)
        assert sorted(p.tolist()) == list(range(n))
        assert (p != torch.arange(n)).all()
    with pytest.raises(ValueError, match="n >= 2"):
        derangement(1)


def test_removal_policies():
    x = {"rgb": torch.randn(2, 3, 8, 8) + 4, "depth": torch.randn(2, 1, 8, 8) * 3 + 1}
    z, miss = remove_modalities(x, ["depth"], "zero")
    assert miss == () and (z["depth"] == 0).all() and z["rgb"] is x["rgb"]
    stats = StreamingModalityStats()
    stats.update(x)
    m, _ = remove_modalities(x, ["rgb"], "mean", stats)
    assert torch.allclose(m["rgb"][0, :, 0, 0], x["rgb"].mean((0, 2, 3)), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    n, _ = remove_modalities({"depth": torch.zeros(64, 1, 16, 16)}, ["depth"], "noise",
                             _stats_of({"depth": torch.randn(64, 1, 16, 16) * 3 + 1}), g)
    assert n["depth"].mean().item() == pytest.approx(1, abs=0.1) and n["depth"].std().item() == pytest.approx(3, rel=0.05)
    dropped, miss = remove_modalities(x, ["depth"], "missing")
    assert miss == ("depth",) and "depth" not in dropped
    with pytest.raises(ValueError, match="policy"):
        remove_modalities(x, ["depth"], "blur")
    with pytest.raises(ValueError, match="StreamingModalityStats"):
        remove_modalities(x, ["depth"], "mean")


def _stats_of(x):
    s = StreamingModalityStats()
    s.update(x)
    return s


class DepthOnlyToy(nn.Module):
    """Predicts class 1 where depth > 0, class 0 elsewhere; ignores RGB entirely."""

    modalities = ("rgb", "depth")
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, inputs, missing=()):
        ref = next(iter(inputs.values()))
        d = torch.zeros_like(ref[:, :1]) if "depth" in missing else inputs["depth"]
        logit1 = self.scale * d[:, 0]
        return torch.stack([torch.zeros_like(logit1), logit1], 1)


def _toy_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        depth = torch.randn(4, 1, 8, 8, generator=g)
        out.append({"rgb": torch.randn(4, 3, 8, 8, generator=g), "depth": depth,
                    "mask": (depth[:, 0] > 0).long()})
    return out


@pytest.mark.parametrize("policy", ["zero", "noise", "missing"])
def test_contribution_recovers_depth_only_model(policy):
    res = modality_contribution(DepthOnlyToy(), _toy_batches(), policy=policy,
                                empty_policy="zero" if policy == "missing" else None)
    assert res.coalitions["rgb+depth"]["miou"] == pytest.approx(1.0)
    assert res.drop["rgb"] == pytest.approx(0.0, abs=1e-12)
    assert res.drop["depth"] > 0.4
    assert res.shapley["rgb"] == pytest.approx(0.0, abs=1e-12)
    assert res.shapley["rgb"] + res.shapley["depth"] == pytest.approx(
        res.coalitions["rgb+depth"]["miou"] - res.coalitions["none"]["miou"])
    assert res.perceptual["rgb"]["drop"] == pytest.approx(0.0, abs=1e-12)
    assert res.perceptual["depth"]["normalized"] > 0.3
    assert all(abs(v) < 1e-12 for v in res.shapley_per_class["rgb"])
    assert all(v > 0.2 for v in res.shapley_per_class["depth"])


def test_missing_policy_needs_explicit_empty_coalition():
    with pytest.raises(ValueError, match="empty_policy"):
        modality_contribution(DepthOnlyToy(), _toy_batches(1), policy="missing")


def test_perceptual_score_function():
    ps = perceptual_score(DepthOnlyToy(), _toy_batches(), num_permutations=2)
    assert ps["rgb"]["drop"] == pytest.approx(0.0, abs=1e-12)
    assert ps["depth"]["drop"] > 0.3 and not math.isnan(ps["depth"]["normalized"])


def test_single_example_batch_is_skipped_by_the_perceptual_score():
    batches = _toy_batches(2)
    one = {k: v[:1] for k, v in _toy_batches(1, seed=5)[0].items()}
    res = modality_contribution(DepthOnlyToy(), [*batches, one], policy="zero")
    assert res.perceptual["rgb"]["drop"] == pytest.approx(0.0, abs=1e-12)
    assert res.perceptual["depth"]["drop"] > 0.3
    assert res.coalitions["rgb+depth"]["miou"] == pytest.approx(1.0)


class PredictionOnlyClassToy(nn.Module):
    """3 classes; the ground truth has only 0 and 1 (depth > 0). Class 2 is predicted where
    rgb > 1.5 and, with ``always``, at pixel (0, 0) of every image whatever the input, so it is a
    prediction-only class (IoU 0) in every coalition (``always``) or only in those with RGB."""

    modalities = ("rgb", "depth")
    num_classes = 3

    def __init__(self, always: bool):
        super().__init__()
        self.always = always
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, inputs, missing=()):
        d, r = inputs["depth"][:, 0], inputs["rgb"][:, 0]
        logit2 = self.scale * (r - 1.5) - 30 * (r == 0)  # removed rgb (zeros) never predicts class 2
        if self.always:
            logit2 = logit2.clone()
            logit2[:, 0, 0] = 1e3
        return torch.stack([torch.zeros_like(d), self.scale * d, logit2], 1)


@pytest.mark.parametrize("always", [True, False])
def test_per_class_convention_matches_coalition_miou(always):
    # issue 11: per-class values were nan for prediction-only classes while the coalition mIoU
    # counted them as 0, so averaging per-class values did not give the mIoU
    from fusionzoo.tasks import ConfusionMatrix

    model, batches = PredictionOnlyClassToy(always), _toy_batches()
    res = modality_contribution(model, batches, policy="zero")
    for key, entry in res.coalitions.items():
        assert np.nanmean(entry["iou"]) == pytest.approx(entry["miou"], abs=1e-12), key
    assert res.coalitions["rgb+depth"]["iou"][2] == 0.0  # predicted, never in the ground truth
    # the full coalition's mIoU is the training evaluator's
    cm = ConfusionMatrix(3)
    for b in batches:
        cm.update(model({"rgb": b["rgb"], "depth": b["depth"]}), b["mask"])
    assert res.coalitions["rgb+depth"]["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-12)
    per_class = {m: np.asarray(v) for m, v in res.shapley_per_class.items()}
    if always:  # the same classes count in every coalition: per-class Shapley averages to Shapley
        for m in res.modalities:
            assert per_class[m].mean() == pytest.approx(res.shapley[m], abs=1e-12)
        assert res.shapley["rgb"] < 0  # RGB only adds false positives of class 2
    else:  # class 2 counts only with RGB: its IoU is undefined without, its Shapley value nan
        assert all(math.isnan(per_class[m][2]) for m in res.modalities)
        assert all(not math.isnan(v) for m in res.modalities for v in per_class[m][:2])
