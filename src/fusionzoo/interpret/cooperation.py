"""How modalities cooperate during optimization: training callbacks whose records go to metrics.jsonl.

The seed question "what is the collaboration logic used when optimizing a multi-modality model"
is answered with three measurements taken while the model trains (docs/interpret.md,
"Optimization collaboration"):

- :class:`GradientDirectionCallback`: the direction, not only the size, of what each modality
  asks of the *shared* parameters (fusion, decoder, head: every parameter no modality owns).
  ``g_m`` is the gradient of the training loss on the shared parameters when the batch keeps only
  modality ``m`` (the others removed through the model's own ``missing`` path). Recorded: the
  cosine between every pair ``g_a, g_b`` (+1: the modalities push the shared weights the same
  way; < 0: they conflict, the case PCGrad, Yu et al. NeurIPS 2020, projects away), the fraction
  of shared tensors whose per-tensor cosine is negative, the cosine per top-level module, and the
  cosine of each ``g_m`` with the step's actual gradient; raw per logged step and as a
  bias-corrected EMA.
- :class:`LearningSpeedCallback`: Wu, Jastrzebski, Cho, Geras, "Characterizing and overcoming
  the greedy nature of learning in multi-modal deep neural networks", ICML 2022. Their learning
  speed of a parameter group is ``mu(t) = sum_{tau <= t} ||grad||^2 / ||theta||^2`` (their
  ``compute_BDR``); we record it for each modality's encoder, and beside it the same sum over
  the optimizer's actual relative updates ``||theta_after - theta_before||^2 / ||theta_before||^2``
  (under AdamW the update is not ``lr * grad``). The conditional learning speed of modality ``a``
  against ``b`` is ``log10(mu_a / mu_b)`` (adapted: see the class docstring).
- :class:`EpochInterpretCallback`: after every evaluation, :func:`fusionzoo.interpret.run` on a
  fixed subset of the validation set: the task metric, Wu et al.'s conditional utilisation rate
  ``u(m) = (A(all) - A(all without m)) / A(all)``, Shapley values, pairwise interaction, and the
  CKA of every tap to the model's output, per epoch.

Each callback's ``records()`` hands the training loop its new ``metrics.jsonl`` lines
(``kind`` ``grad_direction``, ``learning_speed``, ``epoch_interpret``); ``state_dict()`` keeps
the per-epoch summaries for ``callbacks.json``. :mod:`.training_report` plots them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Subset

from .._json import to_json
from ..tasks import Task, get_task
from ..weights import unwrap_model
from .api import METRICS, run
from .callbacks import check_owned_weights, modality_owned_gradients, probe_mode
from .contribution import REMOVAL_POLICIES, _coalition_key

__all__ = ["RECORD_KINDS", "EpochInterpretCallback", "GradientDirectionCallback", "LearningSpeedCallback",
           "shared_parameters", "summarize_result"]

# ``kind`` of the metrics.jsonl records these callbacks write (interpret.runs.training_history reads them)
RECORD_KINDS = ("grad_direction", "learning_speed", "epoch_interpret")


def shared_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters that no modality owns (``model.modality_parameters``): fusion,
    decoder and head weights, and the whole single encoder of early fusion; ``(name, parameter)``."""
    inner = unwrap_model(model)
    owned = {id(p) for m in inner.modalities for p in inner.modality_parameters(m)}
    return [(n, p) for n, p in inner.named_parameters() if p.requires_grad and id(p) not in owned]


def _pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1:]]


def _cos(dot: float, na2: float, nb2: float) -> float:
    return dot / math.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else math.nan


def _mean_rows(rows: list[Mapping[str, Any]], key: str) -> dict[str, float]:
    keys = {k for r in rows for k in (r.get(key) or {})}
    out = {}
    for k in sorted(keys):
        vals = [r[key][k] for r in rows if isinstance((r.get(key) or {}).get(k), (int, float))
                and not math.isnan(r[key][k])]
        out[k] = sum(vals) / len(vals) if vals else math.nan
    return out


class _Recorder:
    """Pending ``metrics.jsonl`` records and per-epoch summaries shared by the callbacks below."""

    state_key: ClassVar[str] = ""
    epoch_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.modalities: list[str] = []
        self.epochs: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._epoch_rows: list[dict[str, Any]] = []

    def _emit(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        if row.get("scope") == "step":
            self._epoch_rows.append(row)

    def records(self) -> list[dict[str, Any]]:
        """New ``metrics.jsonl`` records since the last call."""
        out, self._pending = self._pending, []
        return out

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Average the epoch's step records (keys ``epoch_keys``) into ``epochs``."""
        rows, self._epoch_rows = self._epoch_rows, []
        entry: dict[str, Any] = {"epoch": int(epoch), "num_steps": len(rows)}
        for key in self.epoch_keys:
            entry[key] = _mean_rows(rows, key)
        self.epochs.append(entry)

    def on_train_end(self, model: nn.Module | None = None) -> None:
        """Nothing to release."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able settings and per-epoch summaries (the step records are in metrics.jsonl)."""
        return to_json({"state_key": self.state_key, "modalities": self.modalities, "epochs": self.epochs,
                        **self.settings()})

    def settings(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the per-epoch summaries (resumed runs)."""
        self.epochs = list(state.get("epochs", []))


class GradientDirectionCallback(_Recorder):
    """Cosine and conflict between the gradients each modality sends to the shared parameters.

    Definition, every ``log_every``-th step (after the loop's backward, before clipping):

    - ``g_m = d loss(model(x, missing=others), y) / d theta_shared``: the task's training loss
      (the same loss the step minimizes, side outputs included) on the batch with every modality
      but ``m`` removed through the model's own missing path (zeros for dense models; late and
      hybrid models also drop the removed modality's vote), differentiated with respect to
      :func:`shared_parameters` only. The passes run under :func:`probe_mode` (dropout off,
      BatchNorm statistics untouched), in float32;
    - ``g_all``: the gradient the step actually took on the same parameters (read from ``.grad``);
    - ``cosine[a|b] = <g_a, g_b> / (|g_a| |g_b|)`` over all shared parameters; ``conflict[a|b]``:
      the fraction of shared tensors (both gradients non-zero) whose own cosine is negative;
      ``by_module[group][a|b]``: the cosine within each top-level module (``fusions``,
      ``decoder``, ...); ``cosine_to_update[m] = cos(g_m, g_all)``; ``norm[m] = |g_m|``;
    - ``*_ema``: exponential moving averages over the logged steps (``ema`` the decay), divided
      by ``1 - ema^n`` so that the first values are not pulled to 0 (Adam's bias correction).

    Cost: one forward and one backward pass per modality on each logged step, no optimizer
    step: 0.75 of a training step for ``hybrid_gate_resnet18`` on CPU, so ``log_every=10``
    adds about 8 % (docs/interpret.md, "Optimization collaboration").
    Under DDP each rank measures its own share of the batch; rank 0's records are written.
    Late fusion with a fixed rule (``late_mean``) has no shared parameters: nothing is recorded.

    Args:
        log_every: measure every this many optimizer steps.
        ema: decay of the moving averages.
        task: the run's :class:`~fusionzoo.tasks.Task` (default: the model's). ``train.py`` passes
            the task as the config builds it, before ``class_weighting`` counts its weights in
            the run folder: the probes' loss has no class weights.
    """

    state_key: ClassVar[str] = "grad_direction"
    epoch_keys: ClassVar[tuple[str, ...]] = ("cosine", "conflict", "cosine_to_update", "norm")

    def __init__(self, log_every: int = 10, ema: float = 0.9, task: Task | str | None = None) -> None:
        super().__init__()
        if log_every < 1:
            raise ValueError(f"grad_direction log_every must be >= 1, got {log_every}")
        if not 0 <= ema < 1:
            raise ValueError(f"grad_direction ema must be in [0, 1), got {ema}")
        self.log_every, self.ema, self.task = int(log_every), float(ema), task
        self.shared: list[tuple[str, nn.Parameter]] = []
        self._batch: Mapping[str, Any] | None = None
        self._ema: dict[str, float] = {}
        self._ema_n = 0

    def settings(self) -> dict[str, Any]:
        return {"log_every": self.log_every, "ema": self.ema, "shared_tensors": len(self.shared),
                "shared_parameters": sum(p.numel() for _, p in self.shared)}

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless the model has at least two modalities."""
        inner = unwrap_model(model)
        if len(getattr(inner, "modalities", ())) < 2:
            raise ValueError(f"callback 'grad_direction' needs a fusionzoo model with >= 2 modalities, "
                             f"got {type(inner).__name__}")

    def on_train_start(self, model: nn.Module) -> None:
        """Find the modalities and the shared parameters."""
        self.check(model)
        inner = unwrap_model(model)
        self.modalities = list(inner.modalities)
        self.shared = shared_parameters(inner)
        self.task = get_task(self.task if self.task is not None else inner)

    def on_batch_start(self, batch: Mapping[str, Any]) -> None:
        """Keep the batch for the per-modality passes."""
        self._batch = batch

    def modality_gradients(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, list[torch.Tensor | None]]:
        """``g_m`` per modality: gradients of the one-modality loss on :attr:`shared` (None: unused)."""
        inner = unwrap_model(model)
        device = next(inner.parameters()).device
        inputs = {m: batch[m].to(device) for m in self.modalities}
        targets = self.task.targets(batch, device)
        params = [p for _, p in self.shared]
        out = {}
        with probe_mode(inner):
            for m in self.modalities:
                loss = self.task.training_loss(inner, inputs, targets, tuple(n for n in self.modalities if n != m))
                out[m] = list(torch.autograd.grad(loss, params, allow_unused=True))
        return out

    def measure(self, grads: Mapping[str, Sequence[torch.Tensor | None]],
                full: Sequence[torch.Tensor | None]) -> dict[str, Any]:
        """The record's numbers from per-modality gradients and the step's gradient (same order as :attr:`shared`)."""
        streams = {**grads, "_all": full}
        groups = [n.split(".")[0] for n, _ in self.shared]
        sizes = [p.numel() for _, p in self.shared]
        # one float64 vector per stream (an unused tensor contributes zeros); per-tensor sums by split
        flat = {s: torch.cat([torch.zeros(n, dtype=torch.float64, device=p.device) if g is None
                              else g.detach().double().flatten() for g, n, (_, p) in zip(v, sizes, self.shared)])
                for s, v in streams.items()}

        def dots(a: str, b: str) -> torch.Tensor:  # (T,) per-tensor dot products
            return torch.stack([c.sum() for c in (flat[a] * flat[b]).split(sizes)]).cpu()

        sq = {s: dots(s, s) for s in streams}
        row: dict[str, Any] = {"cosine": {}, "conflict": {}, "by_module": {}, "cosine_to_update": {}, "norm": {}}
        for a, b in _pairs(self.modalities):
            d, key = dots(a, b), f"{a}|{b}"
            row["cosine"][key] = _cos(float(d.sum()), float(sq[a].sum()), float(sq[b].sum()))
            both = (sq[a] > 0) & (sq[b] > 0)
            row["conflict"][key] = float((d[both] < 0).double().mean()) if both.any() else math.nan
            for grp in dict.fromkeys(groups):
                sel = torch.tensor([g == grp for g in groups])
                row["by_module"].setdefault(grp, {})[key] = _cos(float(d[sel].sum()), float(sq[a][sel].sum()),
                                                                 float(sq[b][sel].sum()))
        for m in self.modalities:
            row["norm"][m] = math.sqrt(float(sq[m].sum()))
            row["cosine_to_update"][m] = _cos(float(dots(m, "_all").sum()), float(sq[m].sum()), float(sq["_all"].sum()))
        return row

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Measure on logged steps (after ``backward()``, before clipping and the optimizer step)."""
        batch, self._batch = self._batch, None
        if step % self.log_every or not self.shared:
            return
        if batch is None:
            raise RuntimeError("GradientDirectionCallback needs on_batch_start(batch) before every step (the training "
                               "loop calls it; call it yourself in a hand-written loop)")
        full = [None if p.grad is None else p.grad.detach().clone() for _, p in self.shared]
        row = self.measure(self.modality_gradients(model, batch), full)
        self._ema_n += 1
        for key in ("cosine", "cosine_to_update"):
            row[f"{key}_ema"] = {}
            for k, v in row[key].items():
                if math.isnan(v):
                    row[f"{key}_ema"][k] = math.nan
                    continue
                e = self._ema[f"{key}.{k}"] = self.ema * self._ema.get(f"{key}.{k}", 0.0) + (1 - self.ema) * v
                row[f"{key}_ema"][k] = e / (1 - self.ema ** self._ema_n)
        self._emit({"kind": self.state_key, "scope": "step", "step": int(step) + 1, "epoch": int(epoch), **row})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["ema_state"] = to_json({"n": self._ema_n, "values": self._ema})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        ema = state.get("ema_state") or {}
        self._ema_n = int(ema.get("n", 0))
        self._ema = {k: float(v) for k, v in (ema.get("values") or {}).items() if v is not None}


class LearningSpeedCallback(_Recorder):
    """Per-modality learning speed and the conditional learning speed (Wu et al., ICML 2022).

    Wu et al. measure how fast a group of parameters learns by ``mu(t) = sum over steps of
    ||grad||^2 / ||theta||^2`` (the authors' ``compute_BDR``, summed every step), and compare
    the groups that carry each modality. Their model has, per modality, a unimodal branch and the
    "bypass" (MMTM) weights that feed it the other modality; their conditional learning speed is
    ``log10(mu_bypass / mu_branch)`` per modality and its difference between modalities. Dense
    fusion models have no per-modality bypass: the fusion weights are shared. The adaptation:

    - the group of modality ``m`` is its encoder (``modality_owned_gradients(model, m,
      "encoder", conv_only=False)``; for plain early fusion, ``m``'s input-channel slice of the
      first convolution);
    - ``grad_ratio[m] = ||g_m||^2 / ||theta_m||^2`` (the authors' quantity) and
      ``update_ratio[m] = ||theta_m(after) - theta_m(before)||^2 / ||theta_m(before)||^2`` (what the
      optimizer did: AdamW's update is not proportional to the gradient);
    - ``mu_grad``, ``mu_update``: their running sums over the logged steps;
    - ``conditional_speed[a|b] = log10(mu_update_a / mu_update_b)`` (and ``_grad`` for the
      gradient form): > 0 means ``a``'s encoder has moved further, relative to its size, than
      ``b``'s: the greedy learner of Wu et al. learns the faster modality first.

    Cost: a copy of the modality-owned weights before each logged step and a few norms.

    Args:
        log_every: measure every this many steps (1 = the authors' sum over every step; a larger
            value sums a subsample, whose ratio estimates the same quantity).
    """

    state_key: ClassVar[str] = "learning_speed"
    epoch_keys: ClassVar[tuple[str, ...]] = ("grad_ratio", "update_ratio")

    def __init__(self, log_every: int = 1) -> None:
        super().__init__()
        if log_every < 1:
            raise ValueError(f"learning_speed log_every must be >= 1, got {log_every}")
        self.log_every = int(log_every)
        self.groups: dict[str, list[tuple[nn.Parameter, slice | None]]] = {}
        self.mu_grad: dict[str, float] = {}
        self.mu_update: dict[str, float] = {}
        self._before: dict[str, list[torch.Tensor]] | None = None
        self._row: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        return {"log_every": self.log_every, "mu_grad": self.mu_grad, "mu_update": self.mu_update,
                "group_sizes": {m: sum(_view(p, sl).numel() for p, sl in g) for m, g in self.groups.items()}}

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every modality owns some weights."""
        check_owned_weights(model, "learning_speed", "encoder", conv_only=False, why=": ")

    def on_train_start(self, model: nn.Module) -> None:
        """Find each modality's encoder weights."""
        self.check(model)
        inner = unwrap_model(model)
        self.modalities = list(inner.modalities)
        self.groups = {m: modality_owned_gradients(inner, m, "encoder", conv_only=False) for m in self.modalities}
        for m in self.modalities:
            self.mu_grad.setdefault(m, 0.0)
            self.mu_update.setdefault(m, 0.0)

    @torch.no_grad()
    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """On logged steps: the gradient ratio and a copy of the weights before the update."""
        if step % self.log_every:
            return
        grad_ratio, self._before = {}, {}
        for m, group in self.groups.items():
            weights = [_view(p, sl).detach() for p, sl in group]
            grads = [_view(p.grad, sl) for p, sl in group if p.grad is not None]
            w2 = _sq_norm(weights)
            grad_ratio[m] = _sq_norm(grads) / w2 if w2 > 0 else math.nan
            self._before[m] = [w.clone() for w in weights]
        self._row = {"step": int(step) + 1, "epoch": int(epoch), "grad_ratio": grad_ratio}

    @torch.no_grad()
    def on_step_end(self, model: nn.Module, step: int, epoch: int) -> None:
        """After the optimizer step: the relative update of each encoder, the sums and the record."""
        if self._before is None or self._row is None:
            return
        before, row, self._before, self._row = self._before, self._row, None, None
        update_ratio = {}
        for m, group in self.groups.items():
            w2 = _sq_norm(before[m])
            update_ratio[m] = _sq_norm(torch._foreach_sub([_view(p, sl) for p, sl in group], before[m])) / w2 \
                if w2 > 0 else math.nan
        for m in self.modalities:
            for mu, r in ((self.mu_grad, row["grad_ratio"][m]), (self.mu_update, update_ratio[m])):
                if not math.isnan(r):
                    mu[m] += r
        row["update_ratio"] = update_ratio
        row["mu_grad"], row["mu_update"] = dict(self.mu_grad), dict(self.mu_update)
        row["conditional_speed"] = _log_ratios(self.mu_update, self.modalities)
        row["conditional_speed_grad"] = _log_ratios(self.mu_grad, self.modalities)
        self._emit({"kind": self.state_key, "scope": "step", **row})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        self.epochs[-1].update({"mu_grad": dict(self.mu_grad), "mu_update": dict(self.mu_update),
                                "conditional_speed": _log_ratios(self.mu_update, self.modalities)})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.mu_grad = {k: float(v) for k, v in (state.get("mu_grad") or {}).items() if v is not None}
        self.mu_update = {k: float(v) for k, v in (state.get("mu_update") or {}).items() if v is not None}


def _sq_norm(tensors: list[torch.Tensor]) -> float:
    """Sum of squared entries of ``tensors`` (one fused norm per tensor, summed in float64)."""
    if not tensors:
        return 0.0
    return float(torch.stack([n.double() for n in torch._foreach_norm(tensors)]).pow(2).sum())


def _view(t: torch.Tensor, sl: slice | None) -> torch.Tensor:
    return t if sl is None else t[:, sl]


def _log_ratios(mu: Mapping[str, float], modalities: Sequence[str]) -> dict[str, float]:
    return {f"{a}|{b}": math.log10(mu[a] / mu[b]) if mu.get(a, 0) > 0 and mu.get(b, 0) > 0 else math.nan
            for a, b in _pairs(modalities)}


class EpochInterpretCallback(_Recorder):
    """:func:`fusionzoo.interpret.run` on a fixed validation subset after every evaluation.

    Records per evaluated epoch (``kind: epoch_interpret``): the task metric with every modality
    (``value``), the conditional utilisation rate of Wu et al. (ICML 2022, Sec. 3)
    ``u(m) = (A(all) - A(all without m)) / A(all)`` with ``A`` the task metric (mIoU / AP; they
    use accuracy) and the removal by the run's ``policy`` (and by every other policy that the
    contribution pass measured, under ``utilisation_by_policy``), Shapley values, the pairwise
    interaction index, the debiased CKA of every tap to the model's output
    (``cka_to_output``, the ``to_final`` pairs) and the cross-modal CKA per stage. With
    ``replicates > 0`` the bootstrap intervals of those numbers come along (``intervals``).

    Args:
        val_set: the validation dataset (``train.py`` passes the run's).
        images: the first this many images form the fixed subset.
        metrics: :data:`fusionzoo.interpret.METRICS` names to run (``contribution``, ``cka``).
        replicates: bootstrap replicates (0: no intervals, fastest).
        every: run after every this many evaluations' epochs.
        policy: removal policy of the contribution pass.
        batch_size: of the interpretation pass.
    """

    state_key: ClassVar[str] = "epoch_interpret"

    def __init__(self, val_set: Any = None, images: int = 16, metrics: Sequence[str] = ("contribution", "cka"),
                 replicates: int = 0, every: int = 1, policy: str = "zero", batch_size: int = 8) -> None:
        super().__init__()
        if images < 1 or every < 1 or replicates < 0 or batch_size < 1:
            raise ValueError(f"epoch_interpret: images, every and batch_size must be >= 1 and replicates >= 0, got "
                             f"images={images}, every={every}, batch_size={batch_size}, replicates={replicates}")
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise ValueError(f"epoch_interpret metrics must be some of {list(METRICS)}, got {list(metrics)}")
        if policy not in REMOVAL_POLICIES:
            raise ValueError(f"epoch_interpret policy must be one of {REMOVAL_POLICIES}, got {policy!r}")
        self.val_set, self.images, self.metrics = val_set, int(images), tuple(metrics)
        self.replicates, self.every, self.policy, self.batch_size = int(replicates), int(every), policy, int(batch_size)
        self._model: nn.Module | None = None

    def settings(self) -> dict[str, Any]:
        return {"images": self.images, "metrics": list(self.metrics), "replicates": self.replicates,
                "every": self.every, "policy": self.policy}

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` without a validation set."""
        if self.val_set is None or len(self.val_set) == 0:
            raise ValueError("callback 'epoch_interpret' needs a non-empty validation set (val_set)")

    def on_train_start(self, model: nn.Module) -> None:
        """Keep the model to interpret."""
        self.check(model)
        self._model = unwrap_model(model)
        self.modalities = list(self._model.modalities)

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Nothing per step."""

    def interpret(self, model: nn.Module) -> dict[str, Any]:
        """The record's numbers for ``model`` now (its modules' training flags are restored)."""
        inner = unwrap_model(model)
        flags = [(m, m.training) for m in inner.modules()]
        subset = Subset(self.val_set, range(min(self.images, len(self.val_set))))
        t0 = time.perf_counter()
        try:
            res = run(inner, subset, metrics=self.metrics, batch_size=self.batch_size, replicates=self.replicates,
                      policy=self.policy, gradcam_images=0)
        finally:
            for m, flag in flags:  # run() restores only the top-level flag; keep --freeze-bn's BatchNorms
                m.training = flag
        return {**summarize_result(res), "images": res.num_images, "seconds": time.perf_counter() - t0}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """After an evaluation (``logs`` with ``val_*`` keys, or no logs): interpret and record."""
        if self._model is None:
            raise RuntimeError("EpochInterpretCallback.on_epoch_end called before on_train_start")
        evaluated = logs is None or any(str(k).startswith("val_") for k in logs)
        if not evaluated or (epoch + 1) % self.every:
            return
        row = {"epoch": int(epoch), **self.interpret(self._model)}
        if logs and "step" in logs:
            row["step"] = logs["step"]
        self.epochs.append(row)
        self._emit({"kind": self.state_key, "scope": "epoch", **row})


def summarize_result(res: Any) -> dict[str, Any]:
    """Per-epoch numbers of an :class:`~fusionzoo.interpret.InterpretResult`: task metric,
    conditional utilisation rate per modality (and per removal policy), Shapley values, interaction,
    CKA to the output and across modalities, and the intervals of those numbers."""
    out: dict[str, Any] = {}
    c = res.contribution or {}
    if c:
        mods = list(c.get("modalities") or res.modalities)
        out["metric"] = c.get("metric")
        out["policy"] = c.get("policy")
        value, util = _utilisation(c, mods)
        out["value"], out["utilisation"] = value, util
        out["shapley"] = dict(c.get("shapley") or {})
        out["drop"] = dict(c.get("drop") or {})
        out["interaction"] = {k: v.get("value") for k, v in (c.get("interaction") or {}).items() if isinstance(v, Mapping)}
        by_policy = {p: _utilisation(sec, mods)[1] for p, sec in (c.get("policies") or {}).items()
                     if isinstance(sec, Mapping) and sec.get("coalitions")}
        if by_policy:
            out["utilisation_by_policy"] = by_policy
    pairs = (res.cka or {}).get("pairs") or []
    final = [p for p in pairs if p.get("kind") == "to_final"]
    if final:
        out["cka_target"] = final[0]["b"]
        out["cka_to_output"] = {p["a"]: p["cka"] for p in final}
    cross = {p["a"].split(".", 1)[1]: p["cka"] for p in pairs if p.get("kind") == "cross_modal" and "." in p["a"]}
    if cross:
        out["cross_modal_cka"] = cross
    keep = ("contribution.shapley.", "contribution.interaction.", "contribution.coalitions.")
    intervals = {k: v for k, v in (res.intervals or {}).items() if k.startswith(keep)}
    if intervals:
        out["intervals"] = intervals
    return out


def _utilisation(section: Mapping[str, Any], modalities: Sequence[str]) -> tuple[float, dict[str, float]]:
    """``(A(all), {m: (A(all) - A(all without m)) / A(all)})`` from a contribution section's coalitions."""
    coalitions = section.get("coalitions") or {}

    def score(names: Sequence[str]) -> float:
        entry = coalitions.get(_coalition_key(names, modalities)) or {}
        metric = str(section.get("metric") or "").lower()
        v = entry.get(metric, entry.get("miou", entry.get("ap")))
        return float(v) if isinstance(v, (int, float)) else math.nan

    full = score(list(modalities))
    util = {}
    for m in modalities:
        without = score([n for n in modalities if n != m])
        util[m] = (full - without) / full if full and not math.isnan(full) and full > 0 else math.nan
    return full, util
