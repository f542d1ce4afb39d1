"""Which taps :func:`fusionzoo.interpret.run` measures and how they pair up: :func:`plan_taps`.

Everything here is read from the model's tap metadata (:meth:`FusionModel.tap_info`), never
from its class or name, so early, middle, late and hybrid models and detectors are planned the
same way: a metric whose taps a model lacks (e.g. cross-modal CKA of an early-fusion model)
simply gets no pairs.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["TapPlan", "model_name", "plan_taps", "stage_index"]

_STAGE_RE = re.compile(r"^stage(\d+)$")


def stage_index(stage: str) -> int | None:
    """``"stage3"`` -> 3; None for any other stage name (``stem``, ``head``, ``logits``...)."""
    m = _STAGE_RE.match(stage)
    return int(m.group(1)) if m else None


def model_name(model: nn.Module) -> str:
    """The registry name (``model.config["name"]``), else the class name."""
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("name"), str):
        return cfg["name"]
    return type(model).__name__


@dataclass
class TapPlan:
    """The taps a run measures.

    Attributes:
        features: feature and logits taps (CKA rows, semantic variance, health, reliance).
        spatial: the features with a spatial map (semantic variance).
        gates: gate / attention taps.
        pairs: CKA pairs ``(a, b, kind, stage)``.
        stage_taps: stage -> stream -> tap, for the ``{stream}.stageK`` taps of the modality and
            fused streams, shallow to deep.
        reliance_taps: taps whose reliance on each modality is measured.
    """

    features: list[str]
    spatial: list[str]
    gates: list[str]
    pairs: list[tuple[str, str, str, str]]
    stage_taps: dict[str, dict[str, str]]
    reliance_taps: list[str]


def plan_taps(model: nn.Module, taps: str | Sequence[str]) -> TapPlan:
    """The :class:`TapPlan` of the taps matching ``taps`` (fnmatch patterns).

    Raises:
        KeyError: a pattern matches no tap (lists the model's taps).
    """
    info = model.tap_info()
    patterns = [taps] if isinstance(taps, str) else list(taps)
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in info):
            raise KeyError(f"tap pattern {p!r} matches no tap of {model_name(model)}; taps: {list(info)}")
    chosen = [n for n in info if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    mods = list(model.modalities)
    features = [n for n in chosen if info[n].kind in ("feature", "logits")]
    spatial = [n for n in features if info[n].reduction > 0]
    gates = [n for n in chosen if info[n].kind in ("gate", "attn")]
    stage_taps: dict[str, dict[str, str]] = {}
    for n in chosen:
        t = info[n]
        is_stage = t.kind == "feature" and stage_index(t.stage) is not None and n == f"{t.stream}.{t.stage}"
        if is_stage and (t.stream in mods or t.stream == "fused"):
            stage_taps.setdefault(t.stage, {})[t.stream] = n
    stage_taps = dict(sorted(stage_taps.items(), key=lambda kv: stage_index(kv[0])))
    pairs: list[tuple[str, str, str, str]] = []
    for stage, streams in stage_taps.items():
        present = [m for m in mods if m in streams]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                pairs.append((streams[a], streams[b], "cross_modal", stage))
        if "fused" in streams:
            for a in present:
                pairs.append((streams[a], streams["fused"], "modality_fused", stage))
    for stream in [*mods, "fused"]:
        seq = [(s, st[stream]) for s, st in stage_taps.items() if stream in st]
        for i, (sa, a) in enumerate(seq):
            for sb, b in seq[i + 1:]:
                pairs.append((a, b, "within", f"{sa}-{sb}"))
    # evolution towards the output: every stage tap against the final representation (decoder.out;
    # late fusion has one decoder per modality, so its final representation is head.logits)
    final = next((n for n in ("decoder.out", "head.logits") if n in features), None)
    if final is not None:
        for stage, streams in stage_taps.items():
            for stream in [*mods, "fused"]:
                if stream in streams:
                    pairs.append((streams[stream], final, "to_final", stage))
    return TapPlan(features, spatial, gates, pairs, stage_taps, list(features))
