"""Training engine: config, loops, checkpoints of the trainer's state, distributed helpers.

Every public name is imported on first use (PEP 562, ``fusionzoo._lazy``), so
``from fusionzoo.engine.config import TrainConfig`` does not import the training loop, the hub
and the distributed helpers.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "load_checkpoint": ".checkpoint", "save_checkpoint": ".checkpoint",
    "ConfigError": ".config", "TrainConfig": ".config", "load_config": ".config", "parse_args": ".config",
    "Callback": ".loop", "evaluate": ".loop", "train_one_epoch": ".loop",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

__all__ = [
    "Callback",
    "ConfigError",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "load_config",
    "parse_args",
    "save_checkpoint",
    "train_one_epoch",
]
