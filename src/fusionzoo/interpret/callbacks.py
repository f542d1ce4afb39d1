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

:class:`OGMGECallback` *changes* training: it is OGM-GE itself (on-the-fly gradient modulation
with generalization enhancement), the imbalance remedy beside the training loop's modality
dropout (``modality_dropout``); docs/interpret.md, "Imbalance remedies".
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from timm.layers import DropPath
from torch import nn

from .._json import to_json
from ..weights import unwrap_model
from .contribution import remove_modalities

__all__ = ["ModalityBalanceCallback", "OGMGECallback", "check_segmentation", "modality_owned_gradients", "probe_mode"]


def _ratios(values: Mapping[str, float], order: list[str]) -> dict[str, float]:
    out = {}
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            va, vb = values.get(a, math.nan), values.get(b, math.nan)
            out[f"{a}/{b}"] = va / vb if vb and not math.isnan(vb) and not math.isnan(va) else math.nan
    return out


class HookOwner:
    """The forward hooks an object registered (``self._handles``): :meth:`close` removes them, and a
    callback does so at the end of training."""

    _handles: list[Any]

    def on_train_end(self, model: nn.Module | None = None) -> None:
        """Remove the hooks."""
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ModalityBalanceCallback(HookOwner):
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

    # names the state in callbacks.json / checkpoints, whatever key the trainer files it under
    state_key: ClassVar[str] = "modality_balance"

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
        inner = unwrap_model(model)
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
        self._conf = {}  # a new step: the next training forward is the one to read

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Record gradient norms (call after ``backward()``, before ``optimizer.step()``)."""
        conf = {m: (sum(v) / len(v)) for m, v in self._conf.items() if v}
        self._conf = {}
        self._mask = None
        if step % self.log_every:
            return
        inner = unwrap_model(model)
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
            entry["logs"] = {k: to_json(v, unknown="str") for k, v in logs.items()}
        self.epochs.append(entry)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able history (NaN written as null)."""
        return to_json({"state_key": self.state_key, "modalities": self.modalities, "heads": self.heads,
                        "log_every": self.log_every, "steps": self.steps, "epochs": self.epochs})

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
            if modality in self._conf:  # only the step's own forward, not other callbacks' probe passes
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
                        self._conf[modality] = [float(p_true[valid].mean())]
                        return
                self._conf[modality] = [float(prob.amax(1).mean())]

        return hook


MODULATE_SCOPES = ("encoder", "branch")


def check_owned_weights(model: nn.Module, callback: str, scope: str = "encoder", conv_only: bool = True,
                        why: str = "") -> None:
    """Raise ``ValueError`` naming ``callback`` unless the model has >= 2 modalities and each owns
    some weights in ``scope`` (:func:`modality_owned_gradients`)."""
    inner = unwrap_model(model)
    if len(getattr(inner, "modalities", ())) < 2:
        raise ValueError(f"callback {callback!r} needs a fusionzoo model with >= 2 modalities, "
                         f"got {type(inner).__name__}")
    for m in inner.modalities:
        try:
            modality_owned_gradients(inner, m, scope, conv_only=conv_only)
        except ValueError as e:
            raise ValueError(f"callback {callback!r}{why}{e}") from None


def modality_owned_gradients(model: nn.Module, modality: str, scope: str = "encoder",
                             conv_only: bool = True) -> list[tuple[nn.Parameter, slice | None]]:
    """The weights whose gradient belongs to one modality, as OGM-GE modulates them.

    OGM-GE (Peng et al., CVPR 2022, Sec. 3.2; the authors' ``main.py``) scales the gradient of
    every 4-d (convolution) weight of a modality's *encoder* (their ``audio_net`` / ``visual_net``;
    the fusion layer and classifier are left alone).

    - ``scope="encoder"`` (the authors'): the modality's encoder, ``model.encoders[m]``, when the
      model has one encoder per modality; otherwise what ``model.modality_parameters(m)`` says
      the modality owns (its own stem or patch embedding: DFormer, CMNeXt's auxiliary branch,
      ``early_stem``).
    - ``scope="branch"``: everything ``model.modality_parameters(m)`` yields, which for late and
      hybrid models also holds the modality's own decoder and classifier.
    - Plain early fusion owns no branch: the only weights that see one modality alone are that
      modality's input-channel slice of the first convolution, which takes the concatenation
      (channels in ``model.modalities`` order); the slice is returned with that parameter.

    Args:
        conv_only: only 4-d weights (the authors'); False: every parameter of the scope.

    Returns:
        ``[(parameter, slice of dim 1 or None), ...]``.

    Raises:
        ValueError: the model owns no such weights for ``modality`` (e.g. GeminiFusion, whose
            modalities own only LayerNorms), or an unknown ``scope``.
    """
    if scope not in MODULATE_SCOPES:
        raise ValueError(f"scope must be one of {MODULATE_SCOPES}, got {scope!r}")
    inner = unwrap_model(model)
    if modality not in getattr(inner, "modalities", ()):
        raise ValueError(f"modality {modality!r} is not one of {list(getattr(inner, 'modalities', ()))}")
    encoders = getattr(inner, "encoders", None)
    if scope == "encoder" and isinstance(encoders, nn.ModuleDict) and modality in encoders:
        params = list(encoders[modality].parameters())
    else:
        params = list(inner.modality_parameters(modality))
    owned = [(p, None) for p in params if p.requires_grad and (p.dim() == 4 or not conv_only)]
    if owned:
        return owned
    in_chans = dict(getattr(inner, "in_chans", {}))
    total = sum(in_chans.values())
    first = next((m for m in inner.modules() if isinstance(m, nn.Conv2d)), None)
    if params or first is None or first.in_channels != total:
        what = (f"{modality!r} owns only {len(params)} parameter tensor(s) of fewer than 4 dimensions (no convolution "
                "weights)" if params else
                f"no weights belong to {modality!r} alone (no per-modality branch, and the first Conv2d does not take "
                f"the {total} concatenated input channels {in_chans})")
        raise ValueError(f"{type(inner).__name__}: {what}; OGM-GE modulates modality-owned convolution weights")
    start = 0
    for m in inner.modalities:
        if m == modality:
            return [(first.weight, slice(start, start + in_chans[m]))]
        start += in_chans[m]
    raise AssertionError("unreachable: modality checked above")


@contextlib.contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """Extra forward passes inside a training step that change nothing and are deterministic.

    Dropout layers go to eval mode (so two probes of the same weights and batch agree: issue 21,
    on the same batch the suppressed modality flipped in 3 of 10 probes with dropout on);
    BatchNorm keeps its own mode (batch statistics in training, running ones under
    ``--freeze-bn``) with momentum 0, so running statistics do not move, and
    ``num_batches_tracked`` is restored. On exit every module gets back *its own* training flag:
    ``model.train(was_training)`` would re-enable the BatchNorm layers that ``--freeze-bn`` froze
    (issue 22, item 19).
    """
    inner = unwrap_model(model)
    flags = [(m, m.training) for m in inner.modules()]
    bns = [m for m in inner.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in bns]
    try:
        for m in inner.modules():
            if isinstance(m, (nn.modules.dropout._DropoutNd, DropPath)):  # DropPath: timm's stochastic depth
                m.eval()
        for m in bns:
            m.momentum = 0.0  # running = 1 * running + 0 * batch: the probes leave the statistics alone
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)
        for m, flag in flags:
            m.training = flag


class _FirstForward(HookOwner):
    """Keeps the first training-mode output of each ``{m}.head`` tap after :meth:`arm`.

    Other callbacks run probe forwards inside ``on_after_backward``; only the training step's own
    forward (after ``on_batch_start``, before the backward) is the one to read.
    """

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.armed = False
        self._handles: list[Any] = []

    def attach(self, inner: nn.Module, heads: list[str]) -> None:
        self.close()
        for m in heads:
            self._handles.append(inner.taps.get(f"{m}.head").register_forward_hook(self._hook(m)))

    def arm(self) -> None:
        self.outputs, self.armed = {}, True

    def take(self) -> dict[str, torch.Tensor]:
        out, self.outputs, self.armed = self.outputs, {}, False
        return out

    def _hook(self, modality: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self.armed and module.training and modality not in self.outputs and isinstance(output, torch.Tensor):
                self.outputs[modality] = output.detach()

        return hook


def check_segmentation(model: nn.Module, callback: str, why: str) -> None:
    """Raise ``ValueError`` naming ``callback`` and ``why`` unless ``model`` is a segmentation model."""
    inner = unwrap_model(model)
    task = getattr(inner, "task", "segmentation")
    if task != "segmentation":
        raise ValueError(f"callback {callback!r} supports segmentation models only ({why}); "
                         f"{type(inner).__name__} is a {task} model")


class OGMGECallback:
    """OGM-GE: on-the-fly gradient modulation with generalization enhancement (a remedy).

    Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient
    Modulation", CVPR 2022, Eq. 9-10 and Sec. 3.3, as in the authors' ``main.py``. Every step:

    1. unimodal scores ``s^m = mean over labelled pixels of softmax(out^m)[y]``. The authors'
       ``out^m`` is each modality's own share of the prediction in the training forward pass
       (their fusion layer's weights applied to one modality's features). Here:

       - models with a ``{m}.head`` tap for every modality (late and hybrid fusion): that
         modality's own prediction, read from the training step's forward pass (``source
         "heads"``, no extra pass), upsampled bilinearly to the label size as the model's output is;
       - other models (early and middle fusion have no unimodal output): the model's output with
         every other modality removed (``zero`` policy, the coalition ``{m}`` of
         :mod:`.contribution`), one probe forward per modality under :func:`probe_mode`
         (dropout off, BatchNorm statistics untouched; ``source "probe"``);
    2. discrepancy ``rho^m = s^m / mean_{n != m} s^n`` (for two modalities, the paper's ratio);
    3. the modality with ``rho > 1`` gets ``k = 1 - tanh(alpha * rho)`` (the authors'
       ``1 - tanh(alpha * relu(ratio))``), the others ``k = 1``;
    4. each modality's encoder convolution gradients (:func:`modality_owned_gradients`) become
       ``k * g + N(0, std(g)^2)`` (GE; ``ge=False`` gives plain OGM: ``k * g``).

    The noise is drawn from a generator seeded by ``(seed, step)`` and the scores are averaged
    over ranks, so every DDP rank applies the same update.

    Args:
        alpha: modulation strength; the authors recommend 0.1 (VGGSound) to 0.8 (CREMA-D).
        ge: add the generalization-enhancement noise.
        start_epoch: first epoch modulated (the authors' ``modulation_starts``, 0).
        end_epoch: last epoch modulated, inclusive. ``None``: the first half of training,
            epochs ``0 .. ceil(total_epochs / 2) - 1`` (the authors' defaults modulate epochs 0-50
            of 100); needs ``total_epochs``.
        total_epochs: the run's epochs (``train.py`` passes ``--epochs``).
        modulate: ``"encoder"`` (the authors': each modality's encoder) or ``"branch"``
            (also a late/hybrid model's per-modality decoder and classifier).
        ignore_index: label ignored in the scores.
        seed: noise seed.
    """

    # names the state in callbacks.json / checkpoints, whatever key the trainer files it under
    state_key: ClassVar[str] = "ogm_ge"

    def __init__(self, alpha: float = 0.5, ge: bool = True, start_epoch: int = 0, end_epoch: int | None = None,
                 total_epochs: int | None = None, modulate: str = "encoder", ignore_index: int = 255,
                 seed: int = 0) -> None:
        if alpha <= 0:
            raise ValueError(f"OGM-GE alpha must be > 0, got {alpha}")
        if modulate not in MODULATE_SCOPES:
            raise ValueError(f"OGM-GE modulate must be one of {MODULATE_SCOPES}, got {modulate!r}")
        if end_epoch is None:
            if total_epochs is None or total_epochs < 1:
                raise ValueError("OGM-GE needs end_epoch, or total_epochs (the default window is the first half of "
                                 f"training, as the authors'); got end_epoch=None, total_epochs={total_epochs!r}")
            end_epoch = -(-int(total_epochs) // 2) - 1
        if end_epoch < start_epoch:
            raise ValueError(f"OGM-GE end_epoch {end_epoch} is before start_epoch {start_epoch}")
        self.alpha, self.ge, self.modulate = float(alpha), bool(ge), modulate
        self.start_epoch, self.end_epoch = int(start_epoch), int(end_epoch)
        self.ignore_index, self.seed = int(ignore_index), int(seed)
        self.modalities: list[str] = []
        self.source = ""
        self.steps: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self._epoch_rows: list[dict[str, Any]] = []
        self._batch: Mapping[str, Any] | None = None
        self._owned: dict[str, list[tuple[nn.Parameter, slice | None]]] = {}
        self._heads = _FirstForward()

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (before training starts) when OGM-GE cannot run on ``model``."""
        check_segmentation(model, "ogm_ge", "its scores are true-class softmax probabilities per labelled pixel")
        check_owned_weights(model, "ogm_ge", self.modulate, why=" cannot modulate this model: ")

    def on_train_start(self, model: nn.Module) -> None:
        """Find the modalities, the weights each one owns and the unimodal outputs."""
        self.check(model)
        inner = unwrap_model(model)
        self.modalities = list(inner.modalities)
        self._owned = {m: modality_owned_gradients(inner, m, self.modulate) for m in self.modalities}
        info = inner.tap_info() if hasattr(inner, "tap_info") else {}
        heads = [m for m in self.modalities if f"{m}.head" in info]
        self.source = "heads" if len(heads) == len(self.modalities) else "probe"
        if self.source == "heads":
            self._heads.attach(inner, heads)

    def on_batch_start(self, batch: Mapping[str, Any]) -> None:
        """Keep the batch (its ``mask``; the probes also need its inputs) and arm the head hooks."""
        self._batch = batch
        self._heads.arm()

    def unimodal_scores(self, logits: Mapping[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
        """``s^m`` from per-modality logits ``(B, K, h, w)`` and labels ``(B, H, W)`` (summed over ranks)."""
        valid = mask != self.ignore_index
        out = {}
        for m in self.modalities:
            x = logits[m].float()
            if x.shape[-2:] != mask.shape[-2:]:  # head taps are at decoder resolution; the model's output is not
                x = torch.nn.functional.interpolate(x, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            prob = x.softmax(1)
            p_true = prob.gather(1, mask.clamp(0, prob.shape[1] - 1)[:, None])[:, 0]
            out[m] = torch.stack([p_true[valid].sum(), valid.sum().to(p_true)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stacked = torch.stack([out[m] for m in self.modalities])
            torch.distributed.all_reduce(stacked)
            out = dict(zip(self.modalities, stacked))
        return {m: float(v[0] / v[1].clamp(min=1)) for m, v in out.items()}

    @torch.no_grad()
    def scores(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, float]:
        """``s^m`` of one batch by probes: mean true-class probability with only modality ``m`` kept."""
        inner = unwrap_model(model)
        mask = _mask_of(batch)
        device = next(inner.parameters()).device
        inputs = {m: batch[m].to(device) for m in self.modalities}
        logits = {}
        with probe_mode(inner):
            for m in self.modalities:
                x, _ = remove_modalities(inputs, [n for n in self.modalities if n != m], "zero")
                logits[m] = inner(x)                                              # (B, K, H, W)
        return self.unimodal_scores(logits, mask.to(device))

    def coefficients(self, scores: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """``(rho, k)`` per modality from the scores (steps 2-3 of the class docstring)."""
        rho, k = {}, {}
        for m in self.modalities:
            others = [scores[n] for n in self.modalities if n != m]
            rho[m] = scores[m] / max(sum(others) / len(others), 1e-12)
            k[m] = 1.0 - math.tanh(self.alpha * rho[m]) if rho[m] > 1 else 1.0
        return rho, k

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` is inside the modulation window."""
        return self.start_epoch <= epoch <= self.end_epoch

    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Modulate the gradients (after ``backward()``, before clipping and the optimizer step)."""
        if not self.modalities:
            raise RuntimeError("OGMGECallback.on_after_backward called before on_train_start")
        if self._batch is None:
            raise RuntimeError("OGMGECallback needs on_batch_start(batch) before every step (the training loop "
                               "calls it; call it yourself in a hand-written loop)")
        batch, self._batch = self._batch, None
        heads = self._heads.take()
        if not self.active(epoch):
            return
        if self.source == "heads":
            if set(heads) != set(self.modalities):
                raise RuntimeError(f"OGMGECallback: the training forward did not fire the head taps of "
                                   f"{sorted(set(self.modalities) - set(heads))} in training mode")
            device = next(iter(heads.values())).device
            s = self.unimodal_scores(heads, _mask_of(batch).to(device))
        else:
            s = self.scores(model, batch)
        rho, k = self.coefficients(s)
        gen = None
        for m in self.modalities:
            for p, sl in self._owned[m]:
                if p.grad is None:
                    continue
                g = p.grad if sl is None else p.grad[:, sl]
                new = g * k[m]
                if self.ge:
                    if gen is None:  # same noise on every rank: seeded by (seed, step)
                        gen = torch.Generator(device=g.device).manual_seed(self.seed * 1_000_003 + int(step))
                    std = float(g.float().std()) + 1e-8 if g.numel() > 1 else 1e-8
                    new = new + torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype) * std
                if sl is None:
                    p.grad.copy_(new)
                else:
                    p.grad[:, sl] = new
        row = {"step": int(step), "epoch": int(epoch), "score": s, "ratio": rho, "coefficient": k}
        self.steps.append(row)
        self._epoch_rows.append(row)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Average the epoch's ratios and coefficients."""
        rows, self._epoch_rows = self._epoch_rows, []
        entry: dict[str, Any] = {"epoch": int(epoch), "num_steps": len(rows)}
        for key in ("score", "ratio", "coefficient"):
            entry[key] = {m: _nanmean([r[key][m] for r in rows]) for m in self.modalities} if rows else {}
        self.epochs.append(entry)

    def on_train_end(self, model: nn.Module | None = None) -> None:
        """Remove the head hooks."""
        self._heads.close()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able history and settings."""
        return to_json({"state_key": self.state_key, "alpha": self.alpha, "ge": self.ge, "modulate": self.modulate,
                        "source": self.source, "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                        "modalities": self.modalities, "steps": self.steps, "epochs": self.epochs})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history (resumed runs)."""
        self.steps = list(state.get("steps", []))
        self.epochs = list(state.get("epochs", []))


def _mask_of(batch: Mapping[str, Any]) -> torch.Tensor:
    mask = batch.get("mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor):
        raise KeyError("OGM-GE needs the batch's 'mask' (segmentation labels); got keys "
                       f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    return mask


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
