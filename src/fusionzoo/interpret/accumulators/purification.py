"""What purification removes, as a run metric, for models with purification gates (MIM, Zeng et
al., IEEE TMM 2023; the gate tap contract of docs/interpret.md, "Purification gates"):

- the **keep rate** of every gate ``{m}.stageN.gate`` (a mask in [0, 1], ``(B, 1, h, w)``
  spatial or ``(B, C, h, w)`` channel-wise; its mean over channels is the share of the feature
  kept at each cell), over the dataset and per class, with the label mask at the gate's
  resolution (nearest neighbour);
- the task metric of every coalition of modalities, the Shapley values and the interaction with
  the gates as trained (**gated**) and with every gate forced open (**open**: each purified
  tap emits its stream tap's value, ``{m}.stageN.purified := {m}.stageN``: keep all), and their paired
  differences; the intervals of the differences come from the same bootstrap weights on both
  sides.

The semantic variance of each stream before and after its gate (``{m}.stageN`` against
``{m}.stageN.purified``) is in the ``semantic_variance`` section; the report puts it beside.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...engine.distributed import all_gather_objects, all_reduce_sum_
from ..contribution import METRIC_KEYS, ContributionAccumulator, replicate_intervals
from ..interaction import coalition_game, coalition_terms, game_terms
from ..plan import stage_index
from .base import BatchContext, MetricAccumulator, Needs, Pass, RunSpec
from .contribution import reduce_coalition_scores

__all__ = ["PurificationMetric", "gate_taps", "gates_open"]


def gate_taps(info: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, tuple[str, str, str, str]]:
    """Gate tap -> ``(modality, stage, unpurified tap, purified tap)`` for every
    ``{m}.stageN.gate`` tap of kind ``gate`` whose ``{m}.stageN`` and ``{m}.stageN.purified`` taps
    exist, in execution order."""
    out = {}
    for n, t in info.items():
        parts = n.split(".")
        if (getattr(t, "kind", None) == "gate" and len(parts) == 3 and parts[2] == "gate" and parts[0] in modalities
                and stage_index(parts[1]) is not None):
            stream, purified = f"{parts[0]}.{parts[1]}", f"{parts[0]}.{parts[1]}.purified"
            if stream in info and purified in info:
                out[n] = (parts[0], parts[1], stream, purified)
    return out


@contextlib.contextmanager
def gates_open(model: nn.Module, gates: Mapping[str, tuple[str, str, str, str]]) -> Iterator[None]:
    """Inside the block every gate is forced open (keeps all): each purified tap emits its stream
    tap's value of the same forward pass and each gate tap emits ones.

    ``gates``: :func:`gate_taps`'s mapping. The purified tap is where the gated feature enters the
    rest of the network (the tap contract), so replacing its output opens the gate whether or not
    the gate tap itself is the multiplier (MIM's models tap the mask beside the product). The
    hooks are removed on exit.
    """
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[name] = out

        return hook

    def stream_of(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if name not in seen:
                raise RuntimeError(f"gates_open: {name} did not fire before its purified tap")
            return seen[name]

        return hook

    handles = []
    for gate, (_, _, stream, purified) in gates.items():
        handles.append(model.taps.get(stream).register_forward_hook(keep(stream)))
        handles.append(model.taps.get(gate).register_forward_hook(lambda mod, args, out: torch.ones_like(out)))
        handles.append(model.taps.get(purified).register_forward_hook(stream_of(stream)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class PurificationMetric(MetricAccumulator):
    """Section (models with gate taps only): ``gates``: gate tap -> ``{"modality", "stage",
    "stream", "purified", "granularity", "keep", "keep_per_class"}``; ``contribution``:
    ``{"policy", "gated", "open", "difference"}`` with ``gated`` / ``open`` holding
    ``coalitions``, ``drop``, ``shapley``, ``shapley_per_class`` and ``interaction`` of the
    contribution section, and ``difference`` (gated minus open) ``{"full", "shapley": {m},
    "interaction": {pair}}``. Intervals: ``gates.<tap>.keep``, ``gates.<tap>.keep_per_class.<k>``,
    ``contribution.{gated,open}.<path>``, ``contribution.difference.<path>``.

    The coalition passes are those of the contribution metric under the run's main policy (its
    passes reach this accumulator too), each run once more with the gates open; without the
    contribution metric in the run, ``contribution`` is absent (``settings["purification"]``
    says why).
    """

    name = "purification"

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.gates = {n: v for n, v in gate_taps(spec.info, spec.modalities).items() if n in spec.plan.gates}
        self.needs = Needs(taps=tuple(self.gates))
        k, r = spec.label_classes, spec.replicates
        self.keep = {n: np.zeros(2) for n in self.gates}                  # (sum of keep, cells)
        self.keep_cls = {n: np.zeros((2, k)) for n in self.gates}         # per class
        self.keep_reps = {n: np.zeros((2, r)) for n in self.gates} if r else {}
        self.cls_reps = {n: np.zeros((2, r, k)) for n in self.gates} if r else {}
        self.granularity: dict[str, str] = {}
        self.pixels = spec.task.name == "segmentation"
        args = (spec.task, spec.modalities, spec.box_classes, spec.policy, spec.empty_policy, spec.stats, False,
                spec.seed, spec.device)
        self.acc = {side: ContributionAccumulator(*args, replicates=r) for side in ("gated", "open")}
        self.note: str | None = None
        self.passes_seen = 0

    # -- keep rates ---------------------------------------------------------------------------
    def update(self, batch: BatchContext) -> None:
        if not self.gates:
            return
        for n in self.gates:
            g = batch.acts[n].double()                                    # (B, C_g, h, w)
            keep = g.mean(1)                                              # (B, h, w)
            self.granularity[n] = "spatial" if g.shape[1] == 1 else "channel"
            b = keep.shape[0]
            per_img = torch.stack([keep.flatten(1).sum(1), torch.full((b,), float(keep[0].numel()), dtype=keep.dtype,
                                                                      device=keep.device)])      # (2, B)
            self.keep[n] += per_img.sum(1).cpu().numpy()
            if batch.weights is not None:
                self.keep_reps[n] += (per_img @ batch.weights.T.to(per_img)).cpu().numpy()   # (2, R)
            if batch.mask is None or not self.pixels:
                continue
            lab = F.interpolate(batch.mask[:, None].float(), size=keep.shape[-2:], mode="nearest")[:, 0].long()
            kk = self.spec.label_classes
            valid = (lab != self.spec.ignore_index) & (lab >= 0) & (lab < kk)
            idx = (torch.arange(b, device=lab.device)[:, None, None] * kk + lab.clamp(0, kk - 1))[valid]
            s = torch.zeros(b * kk, dtype=torch.float64, device=lab.device).index_add_(0, idx, keep[valid])
            c = torch.zeros(b * kk, dtype=torch.float64, device=lab.device).index_add_(
                0, idx, torch.ones_like(keep[valid]))
            sc = torch.stack([s.view(b, kk), c.view(b, kk)])                             # (2, B, K)
            self.keep_cls[n] += sc.sum(1).cpu().numpy()
            if batch.weights is not None:
                self.cls_reps[n] += torch.einsum("rb,sbk->srk", batch.weights.to(sc), sc).cpu().numpy()

    # -- gated and open coalitions ------------------------------------------------------------
    def update_pass(self, batch: BatchContext, p: Pass, output: Any, acts: Mapping[str, torch.Tensor]) -> None:
        key = getattr(p, "key", None)
        gated = self.acc["gated"]
        if not self.gates or key is None or key not in gated.users or p.permuted is not None:
            return
        if batch.targets is None:
            return
        gated.add(key, output, batch.targets, batch.weights)
        with gates_open(self.spec.model, self.gates):
            opened = self.spec.model(p.inputs, missing=p.missing)
        self.acc["open"].add(key, opened, batch.targets, batch.weights)
        self.passes_seen += 1

    # -- sharding over processes (base.MetricAccumulator.reduce) -------------------------------
    def reduce(self) -> None:
        arrays = [*self.keep.values(), *self.keep_cls.values(), *self.keep_reps.values(), *self.cls_reps.values()]
        sums = [torch.from_numpy(a) for a in arrays]  # share memory: the sum lands in the arrays
        sums.append(torch.tensor([float(self.passes_seen)], dtype=torch.float64))
        for side in ("gated", "open"):
            sums += reduce_coalition_scores(self.acc[side])
        all_reduce_sum_(sums, "purification keep rates and coalition scores")
        self.passes_seen = int(sums[len(arrays)])
        # a process that saw no batch of a gate learns its granularity from the others
        for named in all_gather_objects(self.granularity):
            for n, g in named.items():
                self.granularity.setdefault(n, g)

    # -- results ------------------------------------------------------------------------------
    def compute(self) -> dict[str, Any] | None:
        if not self.gates:
            return None
        gates_out: dict[str, Any] = {}
        for n, (m, st, stream, pure) in self.gates.items():
            s, c = self.keep[n]
            cls_s, cls_c = self.keep_cls[n]
            with np.errstate(divide="ignore", invalid="ignore"):
                per_class = np.where(cls_c > 0, cls_s / cls_c, np.nan)
            gates_out[n] = {"modality": m, "stage": st, "stream": stream, "purified": pure,
                            "granularity": self.granularity.get(n), "keep": float(s / c) if c else None,
                            "keep_per_class": [None if np.isnan(v) else float(v) for v in per_class]
                            if self.pixels and cls_c.sum() else None}
            if self.keep_reps:
                reps = {"keep": self.keep_reps[n][0] / np.maximum(self.keep_reps[n][1], 1e-12)}
                if gates_out[n]["keep_per_class"] is not None:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        reps["keep_per_class"] = np.where(self.cls_reps[n][1] > 0,
                                                          self.cls_reps[n][0] / self.cls_reps[n][1], np.nan)
                self.intervals.update(replicate_intervals(reps, self.spec.level, f"gates.{n}."))
        out: dict[str, Any] = {"gates": gates_out}
        if self.note is None and not self.passes_seen:
            self.note = ("gated / open contribution needs the contribution metric in the same run (its coalition "
                         "passes, with the task's targets)")
        if self.note is None:
            out["contribution"] = self._contribution()
        self.settings["purification"] = self.note or (
            f"keep rates on the label mask at each gate's resolution (nearest); gates forced open by making each "
            f"purified tap emit its stream tap; removal policy {self.spec.policy}")
        return out

    def _side(self, side: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        acc = self.acc[side]
        res = acc.result(self.spec.class_names).to_dict()
        terms = coalition_terms(res)
        point = {k: res[k] for k in ("metric", "coalitions", "drop", "shapley", "shapley_per_class")}
        point["interaction"] = terms["interaction"]
        reps = acc.replicate_values()
        if reps is not None:
            reps = {k: reps[k] for k in ("coalitions", "drop", "shapley", "shapley_per_class")} | {
                "interaction": game_terms(*coalition_game({"metric": acc.metric, "modalities": acc.modalities,
                                                           "coalitions": reps["coalitions"]}))["interaction"]}
        return point, reps

    def _contribution(self) -> dict[str, Any]:
        full = "+".join(self.spec.modalities)
        vk = METRIC_KEYS[self.acc["gated"].metric][0]
        sides, reps = {}, {}
        for side in ("gated", "open"):
            sides[side], reps[side] = self._side(side)
            if reps[side] is not None:
                self.intervals.update(replicate_intervals(reps[side], self.spec.level, f"contribution.{side}."))

        def diff(tree: Mapping[str, Any], cast: Any) -> dict[str, Any]:
            g, o = tree["gated"], tree["open"]
            return {"full": cast(g["coalitions"][full][vk]) - cast(o["coalitions"][full][vk]),
                    "shapley": {m: cast(g["shapley"][m]) - cast(o["shapley"][m]) for m in g["shapley"]},
                    "interaction": {p: cast(g["interaction"][p]["value"]) - cast(o["interaction"][p]["value"])
                                    for p in g["interaction"]}}

        def num(x: Any) -> float:
            return float("nan") if x is None else float(x)

        difference = diff(sides, num)
        if reps["gated"] is not None:
            self.intervals.update(replicate_intervals(diff(reps, np.asarray), self.spec.level,
                                                      "contribution.difference."))
        return {"policy": self.spec.policy, **sides, "difference": difference}
