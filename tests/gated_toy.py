"""A tiny segmentation model with MIM-style purification gates, declaring the gate tap contract
(``{m}.stageN.gate`` mask in [0, 1], ``{m}.stageN.purified`` gated feature, ``{m}.stageN`` the
unpurified one): a spatial gate ``(B, 1, h, w)`` at stage 1 and a channel gate ``(B, C, h, w)`` at
stage 2, fused by a sum. Used by tests/test_kgs.py and tests/test_interpret_gates.py."""

import torch
import torch.nn.functional as F
from torch import nn

from fusionzoo.models.base import FusionModel


class GatedToy(FusionModel):
    """Two conv stages per modality, each followed by a purification gate; fused by a sum."""

    def __init__(self, num_classes: int = 3, width: int = 8, bias: float = 0.0, oracle: bool = False,
                 force_open: bool = False) -> None:
        super().__init__(("rgb", "depth"), num_classes)
        # oracle: each gate is the mean of the modality's first input channel over the gate's cell,
        # clamped to [0, 1] (known keep rates: tests/test_interpret_gates.py)
        self.oracle = oracle
        self.force_open = force_open  # every gate emits ones: the model without purification
        self.encoders = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for m in self.modalities:
            c_in = self.in_chans[m]
            self.encoders[m] = nn.ModuleList([nn.Conv2d(c_in, width, 3, 2, 1), nn.Conv2d(width, width, 3, 2, 1)])
            self.gates[m] = nn.ModuleList([nn.Conv2d(width, 1, 1), nn.Conv2d(width, width, 1)])
            for g in self.gates[m]:
                nn.init.constant_(g.bias, bias)
        for m in self.modalities:
            for i, red in ((1, 2), (2, 4)):
                self.taps.declare(f"{m}.stage{i}", width, red)
                self.taps.declare(f"{m}.stage{i}.gate", 1 if i == 1 else width, red, kind="gate")
                self.taps.declare(f"{m}.stage{i}.purified", width, red)
        self.taps.declare("fused.stage2", width, 4, after_fusion=True)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.taps.declare("head.logits", num_classes, 4, kind="logits", after_fusion=True)

    def forward_logits(self, xs, missing):
        feats = []
        for m in self.modalities:
            x = xs[m]
            for i in (1, 2):
                x = self.taps(f"{m}.stage{i}", torch.relu(self.encoders[m][i - 1](x)))
                g = torch.sigmoid(self.gates[m][i - 1](x))
                if self.oracle:                                   # (B, 1 or C, h, w)
                    cell = F.adaptive_avg_pool2d(xs[m][:, :1], x.shape[-2:]).clamp(0, 1)
                    g = cell.expand_as(g) + 0 * g                 # keeps the gate weights in the graph
                if self.force_open:
                    g = torch.ones_like(g)
                g = self.taps(f"{m}.stage{i}.gate", g)
                x = self.taps(f"{m}.stage{i}.purified", x * g)
            feats.append(x)
        return self.taps("head.logits", self.head(self.taps("fused.stage2", sum(feats))))
