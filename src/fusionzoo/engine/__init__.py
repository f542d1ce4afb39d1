"""Training engine: config, loops, metrics, checkpoints, distributed helpers, hub save/load.

Every public name is imported on first use (PEP 562, as in ``fusionzoo/__init__.py``), so
``from fusionzoo.engine.config import TrainConfig`` does not import the training loop, the hub
and the distributed helpers.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "CheckpointError": ".checkpoint", "load_checkpoint": ".checkpoint", "load_model_weights": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "ConfigError": ".config", "TrainConfig": ".config", "load_config": ".config", "parse_args": ".config",
    "from_pretrained": ".hub", "save_pretrained": ".hub",
    "Callback": ".loop", "evaluate": ".loop", "train_one_epoch": ".loop",
    "ConfusionMatrix": ".metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'fusionzoo.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Callback",
    "CheckpointError",
    "ConfigError",
    "ConfusionMatrix",
    "TrainConfig",
    "evaluate",
    "from_pretrained",
    "load_checkpoint",
    "load_config",
    "load_model_weights",
    "parse_args",
    "save_checkpoint",
    "save_pretrained",
    "train_one_epoch",
]
