"""Interaction index, score decomposition and BROJA PID: closed forms, gates, and known answers.

The known answers use a hand-built oracle of the synthetic RGB-D world
(``fusionzoo.data.synthetic``): each pixel's RGB evidence (grey / warm / cool) and depth evidence
(plane / raised / dome) are painted from the real generator's masks following the classes'
documented construction (``SyntheticConfig.class_dependence``), and the oracle classifies
exactly as the construction allows. Removing a modality (the ``zero`` policy) leaves "grey" or
"plane", so RGB alone confuses crates with posters and depth alone confuses crates with boxes,
as a trained model does. A second oracle that gives crates a colour of their own (so RGB alone
identifies them) must move the crate's dominant term away from synergy: the check can fail.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from fusionzoo import interpret
from fusionzoo.data import create_dataset
from fusionzoo.data.synthetic import SyntheticConfig
from fusionzoo.interpret.contribution import shapley_values
from fusionzoo.interpret.interaction import coalition_terms, interaction_index, score_decomposition
from fusionzoo.interpret.pid import broja_pid
from fusionzoo.models.base import FusionModel

# construction -> the term that must dominate
EXPECTED = {"rgb_only": "unique_rgb", "depth_only": "unique_depth", "either": "redundancy",
            "both_required": "synergy"}


# ------------------------------------------------------------------------------------ closed forms
def test_interaction_index_two_and_three_players():
    assert interaction_index(["a", "b"], lambda s: float(len(s) == 2)) == {("a", "b"): 1.0}
    assert interaction_index(["a", "b"], lambda s: float(len(s) >= 1)) == {("a", "b"): -1.0}
    # additive games have no interaction
    w = {"a": 0.3, "b": 0.5, "c": 0.1}
    assert all(abs(v) < 1e-12 for v in interaction_index(list(w), lambda s: sum(w[m] for m in s)).values())
    # unanimity game of all three: I_ij = 1 / (M - 1) = 1/2 (Grabisch and Roubens 1999)
    out = interaction_index(["a", "b", "c"], lambda s: float(len(s) == 3))
    assert out == pytest.approx({p: 0.5 for p in itertools.combinations("abc", 2)})


def test_score_decomposition_sums_and_relates_to_shapley():
    rng = np.random.default_rng(0)
    for _ in range(20):
        v0, va, vb, vab = rng.random(4)
        t = score_decomposition(vab, va, vb, v0)
        assert sum(t.values()) == pytest.approx(vab - v0)
        assert min(t["unique_a"], t["unique_b"]) == pytest.approx(0.0) and t["unique_a"] >= 0 <= t["unique_b"]
        table = {frozenset(): v0, frozenset("a"): va, frozenset("b"): vb, frozenset("ab"): vab}
        phi = shapley_values(["a", "b"], table.__getitem__)
        # Shapley = own unique part + half of redundancy and of synergy; interaction = S - R
        assert phi["a"] == pytest.approx(t["unique_a"] + t["redundancy"] / 2 + t["synergy"] / 2)
        inter = interaction_index(["a", "b"], table.__getitem__)[("a", "b")]
        assert inter == pytest.approx(t["synergy"] - t["redundancy"])


def _gate(f, ny=4):
    p = np.zeros((2, 2, ny))
    for a, b in itertools.product((0, 1), repeat=2):
        p[a, b, f(a, b)] += 0.25
    return p


@pytest.mark.parametrize("name, f, expected", [
    ("xor", lambda a, b: a ^ b, {"synergy": 1.0}),
    ("copy", lambda a, b: 2 * a + b, {"unique_1": 1.0, "unique_2": 1.0}),
    ("unique", lambda a, b: a, {"unique_1": 1.0}),
    ("and", lambda a, b: a & b, {"redundancy": 0.3113, "synergy": 0.5}),  # Bertschinger et al. 2014, Table 1
])
def test_broja_gates(name, f, expected):
    t = broja_pid(_gate(f))
    for term in ("redundancy", "unique_1", "unique_2", "synergy"):
        assert t[term] == pytest.approx(expected.get(term, 0.0), abs=2e-3), (name, term, t)


def test_broja_redundant_copy():
    p = np.zeros((2, 2, 2))
    p[0, 0, 0] = p[1, 1, 1] = 0.5
    assert broja_pid(p)["redundancy"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------ synthetic oracle
class SyntheticOracle(FusionModel):
    """Classifies a pixel from painted RGB evidence ``(warm, cool, crate colour)`` and depth
    evidence (0 plane, 1 raised, 2 dome) exactly as the synthetic construction allows."""

    def __init__(self) -> None:
        super().__init__(("rgb", "depth"), 5, {"rgb": 3, "depth": 1})
        self.taps.declare("head.logits", 5, 1, "logits")
        self.scale = nn.Parameter(torch.ones(()))  # a parameter, so the model has a device

    def forward_logits(self, xs, missing):
        warm, cool, own = (xs["rgb"][:, i] > 0.5 for i in range(3))
        raised = (xs["depth"][:, 0] > 0.5) & (xs["depth"][:, 0] < 1.5)
        dome = xs["depth"][:, 0] > 1.5
        cls = torch.zeros_like(warm, dtype=torch.long)           # grey + plane: background
        cls[warm & ~raised] = 1                                  # warm on the plane: poster
        cls[~warm & raised] = 2                                  # raised, not warm: box
        cls[cool | dome] = 3                                     # either cue: ball
        cls[(warm & raised) | own] = 4                           # warm and raised (or own colour): crate
        return self.taps("head.logits", nn.functional.one_hot(cls, 5).permute(0, 3, 1, 2).float() * self.scale)


def _evidence(mask: torch.Tensor, crate_colour: bool) -> dict[str, torch.Tensor]:
    """Paint each class's cues from its documented dependence (``SyntheticConfig``)."""
    dep = list(SyntheticConfig().class_dependence.values())
    rgb = torch.zeros(mask.shape[0], 3, *mask.shape[1:])
    depth = torch.zeros(mask.shape[0], 1, *mask.shape[1:])
    for c, d in enumerate(dep):
        m = mask == c
        if d in ("rgb_only", "both_required"):
            rgb[:, 0][m] = 1.0                                   # warm colour
        if d == "either":
            rgb[:, 1][m] = 1.0                                   # cool colour
            depth[:, 0][m] = 2.0                                 # dome
        if d in ("depth_only", "both_required"):
            depth[:, 0][m] = 1.0                                 # raised
        if d == "both_required" and crate_colour:
            rgb[:, 0][m], rgb[:, 2][m] = 0.0, 1.0                # control: a colour RGB alone identifies
    return {"rgb": rgb, "depth": depth}


@pytest.fixture(scope="module")
def oracle_results():
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=16, image_size=(64, 80), seed=0)
    mask = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    out = {}
    for crate_colour in (False, True):
        batches = [{**_evidence(mask[i:i + 8], crate_colour), "mask": mask[i:i + 8]} for i in (0, 8)]
        res = interpret.run(SyntheticOracle(), batches, metrics=["contribution"], taps="head.logits",
                            class_names=list(ds.classes), perceptual=False)
        out[crate_colour] = res
    return out, list(ds.classes), list(SyntheticConfig().class_dependence.values())


def _dominant_as_constructed(dominant: list[str], deps: list[str]) -> dict[int, bool]:
    return {c: dominant[c] == EXPECTED[d] for c, d in enumerate(deps) if d in EXPECTED}


def test_oracle_interaction_known_answer(oracle_results):
    out, _, deps = oracle_results
    inter = out[False].contribution["interaction"]["rgb|depth"]["per_class"]
    assert inter[deps.index("both_required")] == pytest.approx(1.0)   # nothing alone, all together
    assert inter[deps.index("either")] == pytest.approx(-1.0)         # each alone suffices
    # the Shapley values cannot tell the two apart: both split evenly
    sh = out[False].contribution["shapley_per_class"]
    for d in ("both_required", "either"):
        assert sh["rgb"][deps.index(d)] == pytest.approx(sh["depth"][deps.index(d)])
    # from a saved JSON (nulls) the same numbers come back
    again = coalition_terms(out[False].to_json()["contribution"])
    assert again["interaction"]["rgb|depth"]["per_class"] == pytest.approx(inter)


def test_oracle_score_decomposition_known_answer(oracle_results):
    out, classes, deps = oracle_results
    dom = out[False].contribution["decomposition"]["rgb|depth"]["dominant"]
    assert all(_dominant_as_constructed(dom, deps).values()), dict(zip(classes, dom))
    # control: a crate that RGB identifies alone is no longer synergistic, so the check fails
    dom_ctrl = out[True].contribution["decomposition"]["rgb|depth"]["dominant"]
    assert dom_ctrl[deps.index("both_required")] == "unique_rgb"
    assert not all(_dominant_as_constructed(dom_ctrl, deps).values())


def test_oracle_pid_known_answer(oracle_results):
    out, classes, deps = oracle_results
    pc = out[False].contribution["pid"]["pairs"]["rgb|depth"]["prediction"]["per_class"]
    name = {d: classes[deps.index(d)] for d in EXPECTED}
    assert pc[name["rgb_only"]]["dominant"] == "unique_1"
    assert pc[name["depth_only"]]["dominant"] == "unique_2"
    assert pc[name["either"]]["dominant"] == "redundancy"
    crate = pc[name["both_required"]]
    # the crate: synergy and no unique information. Its redundancy is the part both modalities
    # share, "this pixel is not background" (docs/interpret.md); it does not vanish
    assert crate["synergy"] > 0.1 and max(crate["unique_1"], crate["unique_2"]) < 0.02
    assert crate["redundancy"] + crate["synergy"] == pytest.approx(crate["mi"], abs=0.02)
    ctrl = out[True].contribution["pid"]["pairs"]["rgb|depth"]["prediction"]["per_class"][name["both_required"]]
    assert ctrl["unique_1"] > 0.1 and ctrl["synergy"] < 0.02
    # label target: the oracle is exact, so it equals the prediction target
    lab = out[False].contribution["pid"]["pairs"]["rgb|depth"]["label"]["per_class"]
    assert math.isclose(lab[name["either"]]["redundancy"], pc[name["either"]]["redundancy"], abs_tol=1e-6)


def test_coalition_terms_detection_ap_and_three_modalities():
    # detectors: the same terms in AP; three modalities: every pair
    coal = {"none": 0.0, "rgb": 0.2, "depth": 0.1, "thermal": 0.0, "rgb+depth": 0.5, "rgb+thermal": 0.2,
            "depth+thermal": 0.1, "rgb+depth+thermal": 0.5}
    c = {"metric": "AP", "modalities": ["rgb", "depth", "thermal"],
         "coalitions": {k: {"ap": v, "ap_per_class": [v, None]} for k, v in coal.items()}}
    out = coalition_terms(c)
    assert set(out["interaction"]) == {"rgb|depth", "rgb|thermal", "depth|thermal"}
    # thermal is a null player: no interaction with it; rgb-depth: (0.2 + 0.2) / 2 over S = {}, {thermal}
    assert out["interaction"]["rgb|thermal"]["value"] == pytest.approx(0.0)
    assert out["interaction"]["rgb|depth"]["value"] == pytest.approx(0.2)
    dec = out["decomposition"]["rgb|depth"]
    assert dec["overall"] == pytest.approx({"redundancy": 0.1, "unique_rgb": 0.1, "unique_depth": 0.0,
                                            "synergy": 0.3})
    assert dec["dominant"] == ["synergy", "none"]  # the second class is absent (null)
