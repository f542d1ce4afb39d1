"""interpret.run plans its passes from the accumulators' declared needs: one full-input forward
per batch, plus the contribution's coalitions and permutations (which also feed reliance), or,
without contribution, one pass per removed modality. Tiny hand-built model, one 4-image batch."""

import pytest
import torch
from torch import nn

from fusionzoo import interpret
from fusionzoo.interpret.accumulators import ACCUMULATORS, MetricAccumulator
from fusionzoo.taps import TapSet


class Counting(nn.Module):
    """Logits from both modalities; counts forward calls and records their ``missing``."""

    modalities = ("rgb", "depth")
    num_classes = 2

    def __init__(self):
        super().__init__()
        self.taps = TapSet()
        self.taps.declare("rgb.stage1", 2, 1)
        self.taps.declare("depth.stage1", 2, 1)
        self.taps.declare("fused.stage1", 2, 1)
        self.taps.declare("head.logits", 2, 1, "logits")
        self.calls: list[tuple[str, ...]] = []
        self.images = 0  # images forwarded, over every call

    def tap_info(self):
        return self.taps.info()

    def forward(self, inputs, missing=()):
        self.calls.append(tuple(missing))
        x = next(iter(inputs.values()))
        self.images += x.shape[0]
        # a removed modality (missing=) reads as zeros and doubles the RGB stream, so the "missing" policy
        # differs from zero filling
        rgb = inputs["rgb"] if "rgb" in inputs else x.new_zeros(x.shape[0], 3, *x.shape[2:])
        depth = inputs["depth"] if "depth" in inputs else x.new_zeros(x.shape[0], 1, *x.shape[2:])
        r = self.taps("rgb.stage1", rgb[:, :2] * (2.0 if missing else 1.0))
        d = self.taps("depth.stage1", depth.expand(-1, 2, -1, -1))
        return self.taps("head.logits", self.taps("fused.stage1", r + d))


def _flat(tree, path=""):
    """Every number of a JSON tree by path (None as nan); strings left out."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{path}.{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{path}.{i}").items()}
    if tree is None or (isinstance(tree, (int, float)) and not isinstance(tree, bool)):
        return {path: float("nan") if tree is None else float(tree)}
    return {}


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randn(4, 3, 8, 8, generator=g), "depth": torch.randn(4, 1, 8, 8, generator=g),
            "mask": torch.randint(0, 2, (4, 8, 8), generator=g)}


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")  # 8x8 images: few cells, on purpose
@pytest.mark.parametrize(("metrics", "forwards", "images"), [
    (["cka", "health", "semantic_variance"], 1, 4),  # taps of the full-input pass only
    (["reliance"], 1 + 2, 4 * 3),                     # + one pass per removed modality
    # + the other 3 coalitions + 2 permutations; the empty coalition (both modalities zero) is the
    # same input for every image, so its forward is of one image
    (["contribution"], 1 + 3 + 2, 4 * 5 + 1),
    (["contribution", "reliance"], 1 + 3 + 2, 4 * 5 + 1),  # reliance rides on the one-removed coalitions
])
def test_one_forward_per_batch_plus_the_planned_passes(batch, metrics, forwards, images):
    model = Counting()
    res = interpret.run(model, [batch], metrics=metrics, samples_per_image=4, policies=(),  # the main policy only
                        pass_pixels=None)  # one forward per pass
    assert len(model.calls) == forwards and model.images == images
    for name in metrics:
        assert getattr(res, name) is not None, name
    # batched (the default): the removal passes run as one forward of their concatenated inputs,
    # apart from the one-image forward of the empty coalition
    batched = Counting()
    again = interpret.run(batched, [batch], metrics=metrics, samples_per_image=4, policies=())
    assert batched.images == images
    assert len(batched.calls) == min(forwards, 2 + ("contribution" in metrics))
    for name in metrics:
        assert _flat(again.to_json()[name]) == pytest.approx(_flat(res.to_json()[name]), rel=1e-6, abs=1e-9,
                                                             nan_ok=True)


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")
def test_a_pass_with_the_same_input_for_every_image_runs_one_image(batch, monkeypatch):
    """The empty coalition under ``zero`` and ``mean`` fills every modality with one constant: its
    one-image forward, broadcast, gives the numbers of the whole batch's forward (eval mode)."""
    kw = {"metrics": ["contribution", "reliance"], "samples_per_image": 4,
          "policies": ("mean", "missing"), "pass_pixels": None}
    fast = Counting()
    res = interpret.run(fast, [batch], **kw)
    monkeypatch.setattr(interpret.api, "_same_for_every_image", lambda inputs: False)
    whole = Counting()
    ref = interpret.run(whole, [batch], **kw)
    # zero's and mean's empty coalitions (missing's is zero's): 3 images fewer each
    assert whole.images - fast.images == 2 * 3 and len(whole.calls) == len(fast.calls)
    for name in kw["metrics"]:
        assert _flat(res.to_json()[name]) == pytest.approx(_flat(ref.to_json()[name]), rel=1e-6, abs=1e-9,
                                                           nan_ok=True)
    assert _flat(res.intervals) == pytest.approx(_flat(ref.intervals), nan_ok=True)  # flat: approx takes no lists in dicts


def test_batched_passes_keep_the_numbers_and_the_pixel_budget(batch):
    """Coalitions under two policies and the permutations in forwards of at most ``pass_pixels``
    input pixels (two 4-image 8x8 passes each here), with the numbers of one forward per pass; the
    ``missing`` passes (other ``missing=`` arguments) never share a forward with the others."""
    metrics = ["contribution", "reliance"]
    kw = {"metrics": metrics, "samples_per_image": 4, "policies": ("mean", "missing")}
    one, batched = Counting(), Counting()
    ref = interpret.run(one, [batch], pass_pixels=None, **kw)
    res = interpret.run(batched, [batch], pass_pixels=2 * 4 * 8 * 8, **kw)
    assert batched.images == one.images
    assert len(batched.calls) < len(one.calls)
    assert sorted(set(batched.calls)) == sorted(set(one.calls))  # missing=() and missing=(m,) kept apart
    for name in metrics:
        assert _flat(res.to_json()[name]) == pytest.approx(_flat(ref.to_json()[name]), rel=1e-6, abs=1e-9,
                                                           nan_ok=True)
    assert res.intervals.keys() == ref.intervals.keys()


def test_reliance_is_the_same_with_or_without_contribution(batch):
    alone = interpret.run(Counting(), [batch], metrics=["reliance"], samples_per_image=4).reliance
    shared = interpret.run(Counting(), [batch], metrics=["reliance", "contribution"], samples_per_image=4).reliance
    assert alone.keys() == shared.keys()
    for tap in alone:
        assert alone[tap] == pytest.approx(shared[tap])
    assert alone["rgb.stage1"] == pytest.approx({"rgb": 1.0, "depth": 0.0})


def test_every_metric_has_one_accumulator():
    assert set(ACCUMULATORS) == set(interpret.METRICS)
    for name, cls in ACCUMULATORS.items():
        assert issubclass(cls, MetricAccumulator) and cls.name == name
