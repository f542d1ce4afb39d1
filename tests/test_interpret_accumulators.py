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

    def tap_info(self):
        return self.taps.info()

    def forward(self, inputs, missing=()):
        self.calls.append(tuple(missing))
        r = self.taps("rgb.stage1", inputs["rgb"][:, :2])
        d = self.taps("depth.stage1", inputs["depth"].expand(-1, 2, -1, -1))
        return self.taps("head.logits", self.taps("fused.stage1", r + d))


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randn(4, 3, 8, 8, generator=g), "depth": torch.randn(4, 1, 8, 8, generator=g),
            "mask": torch.randint(0, 2, (4, 8, 8), generator=g)}


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")  # 8x8 images: few cells, on purpose
@pytest.mark.parametrize(("metrics", "forwards"), [
    (["cka", "health", "semantic_variance"], 1),  # taps of the full-input pass only
    (["reliance"], 1 + 2),                         # + one pass per removed modality
    (["contribution"], 1 + 3 + 2),                 # + the other 3 coalitions + 2 permutations
    (["contribution", "reliance"], 1 + 3 + 2),     # reliance rides on the one-removed coalitions
])
def test_one_forward_per_batch_plus_the_planned_passes(batch, metrics, forwards):
    model = Counting()
    res = interpret.run(model, [batch], metrics=metrics, samples_per_image=4, policies=())  # the main policy only
    assert len(model.calls) == forwards
    for name in metrics:
        assert getattr(res, name) is not None, name


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
