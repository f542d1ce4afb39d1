"""Taps: named observation points that every model exposes the same way (DESIGN section 4).

A tap is an ``nn.Identity`` module at ``model.taps[stream][key]``; its public name is
``{stream}.{stage}[.{detail}]`` (``rgb.stage2``, ``fused.stage3.gate``, ``head.logits``). Nothing
listens by default, so a tap costs one Python call. :func:`capture` attaches forward hooks for
the duration of a ``with`` block and removes them in ``finally``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .weights import unwrap_model

TAP_KINDS = ("feature", "gate", "attn", "logits")


class Tap(nn.Identity):
    """An identity module that marks an observation point; ``name`` is its public tap name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        return repr(self.name)


@dataclass(frozen=True)
class TapInfo:
    """What a tap emits, known at construction.

    Attributes:
        name: ``{stream}.{stage}[.{detail}]``.
        stream: a modality (``rgb``, ``depth``, ``thermal``, ``hha``) or ``fused``, ``decoder``, ``head``.
        stage: ``stem``, ``stage1``..``stage4``, ``out``, ``logits`` or ``head``.
        channels: size of dim 1 of the emitted tensor ``(B, channels, H / reduction, W / reduction)``.
        reduction: input size / feature size; 0 for global vectors shaped ``(B, C, 1, 1)``
            (e.g. channel-attention weights).
        kind: ``feature``, ``gate``, ``attn`` or ``logits``.
        after_fusion: the tap sits downstream of a point where modalities meet, so its value
            depends on more than its own stream's input: for a modality stream, on another
            modality's input (ESANet's ``rgb.stage2`` reads the fused stage-1 output; CMX and
            SA-Gate feed rectified features back into both streams); for ``fused``, ``decoder``,
            ``head`` and other shared streams, on more than one modality (every one of them
            except, e.g., CMNeXt's stage-1 ``fused.stage1.hub`` with a single auxiliary
            modality). Declared by each model from its data flow and checked empirically for
            every registered model (tests/test_taps_after_fusion.py). Convergence found on such
            taps is built into the architecture, not learned (docs/interpret.md).
    """

    name: str
    stream: str
    stage: str
    channels: int
    reduction: int
    kind: str = "feature"
    after_fusion: bool = False


def tap_key(name: str) -> tuple[str, str]:
    """``"fused.stage2.gate"`` -> (``"fused"``, ``"stage2_gate"``): the ModuleDict keys of a tap
    (module names cannot contain dots)."""
    stream, _, rest = name.partition(".")
    return stream, rest.replace(".", "_")


class TapSet(nn.ModuleDict):
    """``model.taps``: ``taps[stream][key]`` -> :class:`Tap`, plus the ordered :class:`TapInfo` table."""

    def __init__(self) -> None:
        super().__init__()
        self._info: dict[str, TapInfo] = {}

    def declare(self, name: str, channels: int, reduction: int, kind: str = "feature", *,
                after_fusion: bool = False) -> Tap:
        """Create the tap ``name``; declare taps in the order the forward pass reaches them.

        ``after_fusion``: whether the tap's value depends on more than its own stream's input
        (see :class:`TapInfo`); the model knows it from its data flow."""
        if name in self._info:
            raise ValueError(f"tap {name!r} is declared twice")
        if kind not in TAP_KINDS:
            raise ValueError(f"tap kind must be one of {TAP_KINDS}, got {kind!r}")
        parts = name.split(".")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"tap name {name!r} must be '{{stream}}.{{stage}}[.{{detail}}]'")
        stream, key = tap_key(name)
        if stream not in self:
            self[stream] = nn.ModuleDict()
        tap = Tap(name)
        self[stream][key] = tap
        if not isinstance(after_fusion, bool):
            raise TypeError(f"tap {name!r}: after_fusion must be a bool, got {after_fusion!r}")
        self._info[name] = TapInfo(name, stream, parts[1], int(channels), int(reduction), kind, after_fusion)
        return tap

    def get(self, name: str) -> Tap:
        stream, key = tap_key(name)
        return self[stream][key]

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.get(name)(x)

    def info(self) -> dict[str, TapInfo]:
        return dict(self._info)


class Captured(dict):
    """Activations captured by :func:`capture`, keyed by tap name (detached clones).

    Attributes:
        grads: gradients w.r.t. each tap output, filled by ``backward()`` inside the ``with``
            block when ``grads=True``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grads: dict[str, torch.Tensor] = {}


def _taps_of(model: nn.Module) -> TapSet:
    # DistributedDataParallel / compiled wrappers keep the model as `.module` / `._orig_mod`.
    taps = getattr(unwrap_model(model), "taps", None)
    if not isinstance(taps, TapSet):
        raise TypeError(f"{type(model).__name__} has no taps; capture works on fusionzoo models")
    return taps


def select_taps(model: nn.Module, *patterns: str) -> list[str]:
    """Tap names matching any fnmatch pattern (all taps when none given), in execution order.

    Raises:
        KeyError: a pattern that matches no tap; the message lists the taps.
    """
    names = list(_taps_of(model).info())
    if not patterns:
        return names
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise KeyError(f"tap pattern {p!r} matches no tap of {type(model).__name__}; taps: {names}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@contextmanager
def capture(model: nn.Module, *patterns: str, grads: bool = False) -> Iterator[Captured]:
    """Record tap outputs during one forward pass.

    Args:
        model: a fusionzoo model (or a DDP / compiled wrapper of one).
        *patterns: fnmatch patterns over tap names (``"fused.*"``, ``"depth.stage2"``); none = all.
        grads: also record the gradient of the loss w.r.t. each tap output; call ``backward()``
            inside the block.

    Yields:
        A :class:`Captured` dict ``{tap name: tensor}`` filled by the forward pass.

    Raises:
        KeyError: a pattern matches no tap (checked before anything runs).
        RuntimeError: a selected tap fired more than once, or (on a clean exit) never fired:
            one capture covers exactly one forward pass.

    Example:
        >>> with capture(model, "fused.*", "depth.stage2") as acts:
        ...     logits = model(batch)
        >>> acts["fused.stage1"].shape
        torch.Size([2, 64, 16, 16])
    """
    taps = _taps_of(model)
    names = select_taps(model, *patterns)
    store = Captured()
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in store:
                raise RuntimeError(
                    f"tap {name!r} fired twice inside one capture; capture exactly one forward pass"
                )
            # Clone: a later in-place op (e.g. ReLU(inplace=True)) would overwrite a mere view.
            store[name] = output.detach().clone()
            if grads and output.requires_grad:
                def save_grad(g: torch.Tensor) -> None:
                    store.grads[name] = g.detach().clone()

                # register_full_backward_hook on an identity raises on torch 2.x; a tensor hook works.
                output.register_hook(save_grad)

        return hook

    try:
        for name in names:
            handles.append(taps.get(name).register_forward_hook(make_hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"taps {missing} did not fire; run exactly one forward pass inside capture()")
