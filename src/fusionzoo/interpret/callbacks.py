"""Training callback recording the modality-imbalance signals of OGM-GE-style methods.

Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation",
CVPR 2022 (OGM-GE) measure, at every step, how confident each modality's unimodal prediction
is (``s^m = sum_i softmax(out^m_i)[y_i]``) and steer training by the ratio ``rho = s^a / s^v``;
a ratio far from 1 means one modality dominates and starves the other's encoder of gradient.
:class:`ModalityBalanceCallback` records the same signals without changing training:

- per-modality encoder gradient norm ``||grad||_2`` over ``model.modality_parameters(m)``
  (after backward, before the optimizer step), and their ratios;
- for models with ``{modality}.head`` taps (late and hybrid fusion), the per-modality unimodal
  confidence: the mean softmax probability of the true class per labelled pixel when the batch's
  mask is given through :meth:`on_batch_start`, otherwise the mean maximum softmax probability
  (label-free), and their ratios.

The training loop calls ``on_train_start(model)``, then per step ``on_after_backward(model, step,
epoch)``, and ``on_epoch_end(epoch, logs)``; ``state_dict()`` is JSON-able. Hooks live on the
head taps from ``on_train_start`` until ``on_train_end`` / :meth:`close`; they only record in
training mode, so validation passes do not mix in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ModalityBalanceCallback"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / torch.compile keep the fusionzoo model as .module / ._orig_mod
    while not hasattr(model, "modalities") and (hasattr(model, "module") or hasattr(model, "_orig_mod")):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _ratios(values: Mapping[str, float], order: list[str]) -> dict[str, float]:
    out = {}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            va, vb = values.get(a, math.nan), values.get(b, math.nan)
            out[f"{a}/{b}"] = va / vb if vb and not math.isnan(vb) and not math.isnan(va) else math.nan
    return out


def _clean(x: Any) -> Any:
    """NaN / inf -> None so the history is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


class ModalityBalanceCallback:
    """Per-modality gradient norms and unimodal confidence over training.

    Args:
        log_every: record every ``log_every``-th step (epoch means use the recorded steps).
        ignore_index: label ignored when masks are given.

    Example:
        >>> cb = ModalityBalanceCallback()
        >>> cb.on_train_start(model)
        >>> for step, batch in enumerate(loader):
        ...     cb.on_batch_start(batch)              # optional: true-class confidence
        ...     loss = criterion(model(inputs), batch["mask"]); loss.backward()
        ...     cb.on_after_backward(model, step, epoch)
        ...     optimizer.step(); optimizer.zero_grad()
        >>> cb.on_epoch_end(epoch, {"val_miou": 0.41})
        >>> json.dumps(cb.state_dict())
    """

    def __init__(self, log_every: int = 1, ignore_index: int = 255) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.log_every = log_every
        self.ignore_index = ignore_index
        self.modalities: list[str] = []
        self.heads: list[str] = []
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._epoch_rows: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._conf: dict[str, list[float]] = {}
        self._mask: torch.Tensor | None = None

    # -- the training loop's interface ------------------------------------------------------
    def on_train_start(self, model: nn.Module) -> None:
        """Find the modalities and the ``{m}.head`` taps; attach confidence hooks."""
        self.close()
        inner = _unwrap(model)
        if not hasattr(inner, "modalities"):
            raise TypeError(f"{type(model).__name__} is not a fusionzoo model (no .modalities)")
        self.modalities = list(inner.modalities)
        info = inner.tap_info() if hasattr(inner, "tap_info") else {}
        self.heads = [m for m in self.modalities if f"{m}.head" in info]
        for m in self.heads:
            tap = inner.taps.get(f"{m}.head")
            self._handles.append(tap.register_forward_hook(self._make_hook(m)))

    def on_batch_start(self, batch: Mapping[str, Any]) -> None:
        """Optional: give the batch so confidence uses the true class (``batch["mask"]``)."""
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Record gradient norms (call after ``backward()``, before ``optimizer.step()``)."""
        conf = {m: (sum(v) / len(v)) for m, v in self._conf.items() if v}
        self._conf = {}
        self._mask = None
        if step % self.log_every:
            return
        inner = _unwrap(model)
        if not self.modalities:
            raise RuntimeError("ModalityBalanceCallback.on_after_backward called before on_train_start")
        norms = {}
        for m in self.modalities:
            # nan = the modality owns no parameters (early fusion); 0 = it owns some and none
            # received a gradient this step (e.g. a dropped branch)
            sq, owns = 0.0, False
            for p in inner.modality_parameters(m):
                owns = True
                if p.grad is not None:
                    sq += float(p.grad.detach().float().pow(2).sum())
            norms[m] = math.sqrt(sq) if owns else math.nan
        row: dict[str, Any] = {"step": int(step), "epoch": int(epoch), "grad_norm": norms,
                               "grad_ratio": _ratios(norms, self.modalities)}
        if self.heads:
            row["confidence"] = {m: conf.get(m, math.nan) for m in self.heads}
            row["confidence_ratio"] = _ratios(row["confidence"], self.heads)
        self.steps.append(row)
        self._epoch_rows.append(row)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Average the epoch's recorded steps; keep ``logs`` (numbers) beside them."""
        rows, self._epoch_rows = self._epoch_rows, []
        entry: dict[str, Any] = {"epoch": int(epoch), "num_steps": len(rows)}
        for key in ("grad_norm", "grad_ratio", "confidence", "confidence_ratio"):
            keys = {k for r in rows for k in r.get(key, {})}
            if keys:
                entry[key] = {k: _nanmean([r[key].get(k, math.nan) for r in rows if key in r]) for k in sorted(keys)}
        if logs:
            entry["logs"] = {k: _jsonable(v) for k, v in logs.items()}
        self.epochs.append(entry)

    def on_train_end(self, model: nn.Module | None = None) -> None:
        """Remove the hooks."""
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able history (NaN written as null)."""
        return _clean({"modalities": self.modalities, "heads": self.heads, "log_every": self.log_every,
                       "steps": self.steps, "epochs": self.epochs})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a history (for resumed runs); hooks are attached by ``on_train_start``."""
        def nan(x):
            if x is None:
                return math.nan
            if isinstance(x, dict):
                return {k: nan(v) for k, v in x.items()}
            if isinstance(x, list):
                return [nan(v) for v in x]
            return x

        self.steps = nan(list(state.get("steps", [])))
        self.epochs = nan(list(state.get("epochs", [])))

    # -- internals --------------------------------------------------------------------------
    def _make_hook(self, modality: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not module.training or not isinstance(output, torch.Tensor) or output.dim() != 4:
                return
            with torch.no_grad():
                prob = output.detach().float().softmax(1)
                mask = self._mask
                if mask is not None and mask.dim() == 3 and mask.shape[0] == prob.shape[0]:
                    mask = mask.to(prob.device)
                    if mask.shape[-2:] != prob.shape[-2:]:
                        # head taps are at decoder resolution: nearest-neighbour labels
                        mask = torch.nn.functional.interpolate(mask[:, None].float(), size=prob.shape[-2:],
                                                               mode="nearest")[:, 0].long()
                    valid = mask != self.ignore_index
                    if valid.any():
                        idx = mask.clamp(0, prob.shape[1] - 1)[:, None]
                        p_true = prob.gather(1, idx)[:, 0]
                        self._conf.setdefault(modality, []).append(float(p_true[valid].mean()))
                        return
                self._conf.setdefault(modality, []).append(float(prob.amax(1).mean()))

        return hook


def _jsonable(v: Any) -> Any:
    """Numbers stay numbers (lists of them stay lists), anything else becomes its string."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [float(x) for x in v]
    return str(v)


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
