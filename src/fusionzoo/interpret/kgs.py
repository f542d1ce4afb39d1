"""MIM's Knowledge Guidance Scheme (KGS) as a training remedy for modality imbalance.

Zeng, Mai, Yan, Hu, "Multimodal Reaction: Information Modulation for Cross-Modal Representation
Learning", IEEE TMM 26, 2178-2191, 2023 (MIM; reference code zengy268/MIM, ``train.py`` and
``utils/loss.py``). MIM purifies each modality's features with a learned gate and guides the
encoders with unimodal classifiers:

- **unimodal classifiers**: one classifier per modality, applied to both its unpurified
  feature ``F_m`` and its purified (gated) feature ``P_m`` (the authors share
  ``l_classifier`` between the two); both are trained on the task's labels.
- **intra-modal guidance**: of ``h_m(F_m)`` and ``h_m(P_m)``, the one with the higher loss is
  pulled toward the other, which is held fixed (the authors' ``Loss_intra``: MSE with the
  lower-loss output detached).
- **inter-modal guidance**: normalised losses ``lambda_m = L_m / sum_n L_n`` of the purified
  predictions give the weights ``alpha_m = M prod_{n != m}(1 + lambda_n) / sum_k prod_{n != k}
  (1 + lambda_n)`` (the authors' ``Adjuster``); the modality with the lowest loss (the best,
  the one that dominates) is the teacher and is distilled into every other one with the
  temperature ``10 alpha_t`` (the authors' ``loss_kd``), which is how KGS counters dominance:
  the weak modalities are taught, the strong one is not slowed down.

For segmentation, :class:`KGSCallback` puts a per-pixel classifier (a 1x1 convolution, the
authors' linear classifier at every pixel) on one stage tap of each modality's stream,
``{m}.stageN`` (unpurified) and ``{m}.stageN.purified`` (purified, where the model has
purification gates), upsampled bilinearly to the label size as the model's logits are. Its loss
terms are added to the task's loss through the training loop's ``Callback.extra_loss`` hook and
its heads are trained by the run's optimizer (``Callback.parameters``); docs/interpret.md,
"Knowledge Guidance Scheme (KGS)".

Differences from the authors' code, each because the reference does not carry over as stored:

- one optimizer over ``task loss + unimodal losses + intra + inter`` (the authors step a second
  optimizer for the purification network with ``penalty + purified losses`` first); the gates'
  sparsity penalty stays the model's business;
- intra-modal guidance compares per-pixel class probabilities (squared L2 distance summed over
  classes, mean over labelled pixels): the authors' regression outputs are scalars;
- inter-modal guidance distils the heads' per-pixel class distributions with the logits
  softened by the temperature (Hinton et al. 2015), multiplied by ``T^2``. The authors' code
  applies the softmax to pooled *features* without dividing by ``T`` (the modalities' features
  here differ in width, and ``T^2 = 100`` on an unsoftened KL swamps the task's loss).
"""

from __future__ import annotations

import base64
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._json import to_json
from ..weights import unwrap_model
from .callbacks import HookOwner, check_segmentation
from .plan import model_name, stage_index

__all__ = ["KGSCallback", "dominance_weights", "kgs_taps"]


def kgs_taps(model: nn.Module, stage: str | None = None, purified: bool | None = None) -> tuple[str, dict[str, str],
                                                                                                 dict[str, str]]:
    """The stage and the taps KGS reads: ``(stage, {m: "{m}.stageN"}, {m: "{m}.stageN.purified"})``.

    Args:
        stage: ``"stageN"``; None: the deepest stage at which every modality has a stream tap
            (and, with purification, a purified tap).
        purified: use the purified taps; None: when every modality has one at the stage.

    Raises:
        ValueError: a modality has no stream tap ``{m}.stageN`` (early fusion: the modalities
            meet at the input, so there is no per-modality feature to classify), the stage is
            not one of the model's, or ``purified=True`` without purified taps.
    """
    inner = unwrap_model(model)
    name = model_name(inner)
    mods = list(getattr(inner, "modalities", ()))
    if len(mods) < 2:
        raise ValueError(f"callback 'kgs' needs a model with >= 2 modalities; {name} has {mods}")
    info = inner.tap_info()
    stages: dict[str, set[str]] = {}
    for n, t in info.items():
        if t.stream in mods and n == f"{t.stream}.{t.stage}" and stage_index(t.stage) is not None and t.reduction > 0:
            stages.setdefault(t.stream, set()).add(t.stage)
    lacking = [m for m in mods if not stages.get(m)]
    if lacking:
        raise ValueError(
            f"callback 'kgs' cannot run on {name}: modality {lacking} has no per-modality stream tap "
            f"'{{m}}.stageN' (its taps: {list(info)}); KGS puts a unimodal classifier on each modality's own "
            "stage features, and a model whose modalities meet at the input (early fusion) has none")
    common = set.intersection(*(stages[m] for m in mods))
    gated = {s for s in common if all(f"{m}.{s}.purified" in info for m in mods)}
    if purified is True and not gated:
        raise ValueError(f"callback 'kgs' purified=true: {name} has no purification gates (no "
                         f"'{{m}}.stageN.purified' taps for every modality {mods})")
    use_gated = bool(gated) if purified is None else purified
    pool = gated if use_gated else common
    if stage is None:
        if not pool:
            raise ValueError(f"callback 'kgs' cannot run on {name}: its modalities share no stage "
                             f"({ {m: sorted(s) for m, s in stages.items()} })")
        stage = max(pool, key=lambda s: stage_index(s))
    elif stage not in pool:
        raise ValueError(f"callback 'kgs' stage={stage!r}: {name} has it for every modality"
                         f"{' with purified taps' if use_gated else ''} only at {sorted(pool, key=stage_index)}")
    plain = {m: f"{m}.{stage}" for m in mods}
    pure = {m: f"{m}.{stage}.purified" for m in mods} if use_gated else {}
    return stage, plain, pure


def dominance_weights(losses: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``(lambda, alpha)`` of MIM's inter-modal guidance from per-modality losses.

    ``lambda_m = L_m / sum_n L_n``; ``alpha_m = M prod_{n != m}(1 + lambda_n) / sum_k prod_{n != k}(1 +
    lambda_n)`` (the authors' ``Adjuster``, written for any ``M``): the alphas sum to ``M`` and
    the modality with the lowest loss gets the largest.
    """
    mods = list(losses)
    total = sum(losses.values())
    lam = {m: (losses[m] / total if total > 0 else 1.0 / len(mods)) for m in mods}
    prods = {m: math.prod(1.0 + lam[n] for n in mods if n != m) for m in mods}
    den = sum(prods.values())
    return lam, {m: len(mods) * prods[m] / den for m in mods}


def _encode(t: torch.Tensor) -> dict[str, Any]:
    x = t.detach().to("cpu", torch.float32).contiguous()
    return {"shape": list(x.shape), "float32_base64": base64.b64encode(x.numpy().tobytes()).decode("ascii")}


def _decode(d: Mapping[str, Any]) -> torch.Tensor:
    buf = bytearray(base64.b64decode(d["float32_base64"]))
    return torch.frombuffer(buf, dtype=torch.float32).reshape(d["shape"]).clone()


class KGSCallback(HookOwner):
    """MIM's Knowledge Guidance Scheme as a training remedy (module docstring).

    Every step it reads, from the training forward itself, each modality's stage feature
    ``F_m = {m}.stageN`` and, for models with purification gates, ``P_m = {m}.stageN.purified``,
    and adds to the task's loss

    ``unimodal * sum_m [CE(h_m(F_m)) + CE(h_m(P_m))] + intra * sum_m intra_m + inter * inter``

    with ``h_m`` a per-pixel linear classifier. Without gates only ``CE(h_m(F_m))`` and the
    inter-modal guidance (on ``F_m``) apply: intra-modal guidance needs a purified and an
    unpurified version of the same feature (a warning says so). Modalities withheld on a step
    (modality dropout) are left out of that step's terms. Records (``kind: "kgs"``) go to
    ``metrics.jsonl`` every ``log_every`` steps and once per epoch.

    Args:
        stage: the stage tap read, ``"stageN"``; None: the deepest one every modality has
            (with purification: the deepest gated one).
        purified: None: use ``{m}.stageN.purified`` when the model has it; False: ignore it.
        unimodal: weight of the unimodal classifiers' cross-entropy (the authors' ``weight`` 1).
        intra: weight of the intra-modal guidance.
        inter: weight of the inter-modal guidance (the authors' ``weight`` 1).
        temperature: the distillation temperature is ``temperature * alpha_teacher`` (the
            authors' ``temp = 10 * alpha``).
        log_every: a step record every this many steps.
        ignore_index: label ignored by every term.
    """

    # names the state in callbacks.json / checkpoints, whatever key the trainer files it under
    state_key: ClassVar[str] = "kgs"

    def __init__(self, stage: str | None = None, purified: bool | None = None, unimodal: float = 1.0,
                 intra: float = 1.0, inter: float = 1.0, temperature: float = 10.0, log_every: int = 10,
                 ignore_index: int = 255) -> None:
        for key, v in (("unimodal", unimodal), ("intra", intra), ("inter", inter)):
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"KGS {key} must be a finite weight >= 0, got {v!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"KGS temperature must be > 0, got {temperature!r}")
        if not (isinstance(log_every, int) and log_every >= 1):
            raise ValueError(f"KGS log_every must be an integer >= 1, got {log_every!r}")
        if purified not in (None, True, False):
            raise ValueError(f"KGS purified must be true, false or null (auto), got {purified!r}")
        self.stage_opt, self.purified_opt = stage, purified
        self.w = {"unimodal": float(unimodal), "intra": float(intra), "inter": float(inter)}
        self.temperature, self.log_every, self.ignore_index = float(temperature), log_every, int(ignore_index)
        self.modalities: list[str] = []
        self.stage = ""
        self.taps: dict[str, str] = {}
        self.purified_taps: dict[str, str] = {}
        self.after_fusion: dict[str, bool | None] = {}
        self.heads: nn.ModuleDict | None = None
        self.epochs: list[dict[str, Any]] = []
        self._pending_heads: dict[str, Any] | None = None
        self._records: list[dict[str, Any]] = []
        self._epoch_rows: list[dict[str, Any]] = []
        self._last: dict[str, Any] | None = None
        self._acts: dict[str, torch.Tensor] = {}
        self._armed = False
        self._handles: list[Any] = []

    # -- set-up -----------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (before training starts) when KGS cannot run on ``model``; warn
        when only inter-modal guidance applies, or when a tap read already carries another modality."""
        check_segmentation(model, "kgs", "its unimodal heads are per-pixel classifiers trained on the masks")
        inner = unwrap_model(model)
        stage, plain, pure = kgs_taps(inner, self.stage_opt, self.purified_opt)
        first = not self.taps
        self.modalities, self.stage, self.taps, self.purified_taps = list(inner.modalities), stage, plain, pure
        info = inner.tap_info()
        self.after_fusion = {m: getattr(info[t], "after_fusion", None) for m, t in plain.items()}
        if not first:
            return
        name = model_name(inner)
        if not pure and self.purified_opt is None:
            warnings.warn(f"kgs: {name} has no purification gates ('{{m}}.stageN.purified' taps), so only "
                          "inter-modal guidance applies (with the unimodal heads' own loss); intra-modal guidance "
                          "needs a purified and an unpurified version of each feature", stacklevel=2)
        fused = [plain[m] for m, v in self.after_fusion.items() if v]
        if fused:
            warnings.warn(f"kgs: on {name} the taps {fused} sit after a point where modalities meet, so their heads "
                          "are not purely unimodal; pick an earlier stage where one is unimodal with "
                          "--callback-options '{kgs: {stage: stageN}}'", stacklevel=2)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The unimodal heads' parameters (one 1x1 convolution per modality, on ``model``'s device),
        made on the first call; train them with the model (``build_optimizer(extra=...)``)."""
        if self.heads is None:
            inner = unwrap_model(model)
            if not self.taps:
                self.check(inner)
            info = inner.tap_info()
            k = int(inner.num_classes)
            p = next(inner.parameters())
            self.heads = nn.ModuleDict({m: nn.Conv2d(info[t].channels, k, 1) for m, t in self.taps.items()}).to(p.device)
            if self._pending_heads is not None:
                self._load_heads(self._pending_heads)
        return list(self.heads.parameters())

    def on_train_start(self, model: nn.Module) -> None:
        """Attach the tap hooks; the heads must already be in the optimizer (:meth:`parameters`)."""
        inner = unwrap_model(model)
        if self.heads is None:
            raise RuntimeError("KGSCallback: call parameters(model) and give them to the optimizer before training "
                               "(train.py does); otherwise the unimodal heads would never train")
        self.close()
        self.heads.train()
        for t in [*self.taps.values(), *self.purified_taps.values()]:
            self._handles.append(inner.taps.get(t).register_forward_hook(self._hook(t)))

    def on_batch_start(self, batch: Mapping[str, Any]) -> None:
        """Arm the hooks: the next training forward is the step's own."""
        self._acts, self._armed = {}, True

    # -- the loss ---------------------------------------------------------------------------
    def extra_loss(self, model: nn.Module, targets: Any, missing: Sequence[str]) -> torch.Tensor | None:
        """The KGS terms of this step (``targets``: the masks ``(B, H, W)``)."""
        acts, self._acts, self._armed = self._acts, {}, False
        wanted = [*self.taps.values(), *self.purified_taps.values()]
        absent = [t for t in wanted if t not in acts]
        if absent:
            raise RuntimeError(f"KGSCallback: the training forward did not fire the taps {absent} with gradients "
                               "(call on_batch_start(batch) before the forward; the loop does)")
        mods = [m for m in self.modalities if m not in set(missing)]
        mask = targets
        logits_u = {m: self._logits(m, acts[self.taps[m]], mask) for m in mods}
        logits_p = {m: self._logits(m, acts[self.purified_taps[m]], mask) for m in mods} if self.purified_taps else {}
        valid = mask != self.ignore_index
        if not bool(valid.any()):
            self._last = None
            return None
        ce_u = {m: F.cross_entropy(z, mask, ignore_index=self.ignore_index) for m, z in logits_u.items()}
        ce_p = {m: F.cross_entropy(z, mask, ignore_index=self.ignore_index) for m, z in logits_p.items()}
        total = sum(ce_u.values()) + sum(ce_p.values())
        loss = self.w["unimodal"] * total
        intra: dict[str, torch.Tensor] = {}
        for m, zp in logits_p.items():
            # the lower-loss version teaches (held fixed); the other is pulled toward it
            teach_p = bool(ce_p[m] < ce_u[m])
            pu, pp = logits_u[m].softmax(1), zp.softmax(1)
            pu, pp = (pu, pp.detach()) if teach_p else (pu.detach(), pp)
            intra[m] = (pp - pu).pow(2).sum(1)[valid].mean()
        if intra:
            loss = loss + self.w["intra"] * sum(intra.values())
        guided = logits_p or logits_u  # MIM distils the purified predictions; without gates the plain ones
        row: dict[str, Any] = {"ce_unpurified": {m: float(v.detach()) for m, v in ce_u.items()},
                               "ce_purified": {m: float(v.detach()) for m, v in ce_p.items()},
                               "intra": {m: float(v.detach()) for m, v in intra.items()}}
        if len(guided) >= 2:
            scores = {m: float(v.detach()) for m, v in (ce_p or ce_u).items()}
            lam, alpha = dominance_weights(scores)
            teacher = min(scores, key=scores.get)
            temp = self.temperature * alpha[teacher]
            target = F.log_softmax(guided[teacher].detach() / temp, 1)
            kl = [(target.exp() * (target - F.log_softmax(guided[s] / temp, 1))).sum(1)[valid].mean()
                  for s in guided if s != teacher]
            inter = sum(kl) / len(kl) * temp ** 2
            loss = loss + self.w["inter"] * inter
            row.update({"teacher": teacher, "lambda": lam, "alpha": alpha, "temperature": temp, "inter": float(inter.detach())})
        row["loss"] = float(loss.detach())
        self._last = row
        return loss

    def _logits(self, m: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.heads[m](x.float())                                         # (B, K, h, w)
        return F.interpolate(z, size=mask.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)

    # -- after the step ---------------------------------------------------------------------
    def on_after_backward(self, model: nn.Module, step: int, epoch: int) -> None:
        """Average the heads' gradients over DDP ranks (the heads are outside the DDP wrapper);
        record the step's terms."""
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.heads is not None:
            world = torch.distributed.get_world_size()
            for p in self.heads.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        row, self._last = self._last, None
        if row is None:
            return
        row = {"step": int(step), "epoch": int(epoch), **row}
        self._epoch_rows.append(row)
        if step % self.log_every == 0:
            self._records.append({"kind": "kgs", "scope": "step", **row, "step": int(step) + 1})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Average the epoch's steps (the teacher as a count per modality)."""
        rows, self._epoch_rows = self._epoch_rows, []
        entry: dict[str, Any] = {"epoch": int(epoch), "num_steps": len(rows)}
        for key in ("ce_unpurified", "ce_purified", "intra", "lambda", "alpha"):
            keys = sorted({k for r in rows for k in r.get(key, {})})
            if keys:
                entry[key] = {k: _mean([r[key][k] for r in rows if k in r.get(key, {})]) for k in keys}
        for key in ("inter", "temperature", "loss"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                entry[key] = _mean(vals)
        teachers = [r["teacher"] for r in rows if "teacher" in r]
        if teachers:
            entry["teacher_steps"] = {m: teachers.count(m) for m in self.modalities}
        self.epochs.append(entry)
        self._records.append({"kind": "kgs", "scope": "epoch", **entry})

    def records(self) -> list[dict[str, Any]]:
        """Records since the last call (``kind: "kgs"``; the loop writes them to metrics.jsonl)."""
        out, self._records = self._records, []
        return out

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Settings, epoch history and the heads' weights (float32, base64) for an exact resume."""
        heads = {k: _encode(v) for k, v in self.heads.state_dict().items()} if self.heads is not None else None
        return to_json({"state_key": self.state_key, "stage": self.stage, "taps": self.taps,
                        "purified_taps": self.purified_taps, "after_fusion": self.after_fusion, "weights": self.w,
                        "temperature": self.temperature, "epochs": self.epochs, "heads": heads})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history and the heads' weights (resumed runs)."""
        self.epochs = list(state.get("epochs", []))
        if state.get("heads"):
            if self.heads is None:
                self._pending_heads = dict(state["heads"])
            else:
                self._load_heads(state["heads"])

    def _load_heads(self, heads: Mapping[str, Any]) -> None:
        own = self.heads.state_dict()
        if set(heads) != set(own):
            raise ValueError(f"KGS state: heads {sorted(heads)} do not match this model's {sorted(own)}")
        self.heads.load_state_dict({k: _decode(v).to(own[k].device) for k, v in heads.items()})
        self._pending_heads = None

    def _hook(self, tap: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._armed and module.training and tap not in self._acts and torch.is_grad_enabled():
                # clone: a later in-place op of the model must not change what the heads saw
                self._acts[tap] = output.clone()

        return hook


def _mean(values: list[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
