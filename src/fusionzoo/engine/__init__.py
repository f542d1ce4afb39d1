"""Training engine: config, loops, metrics, checkpoints, distributed helpers, hub save/load.

Every public name is imported on first use (PEP 562, ``fusionzoo._lazy``), so
``from fusionzoo.engine.config import TrainConfig`` does not import the training loop, the hub
and the distributed helpers.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "CheckpointError": ".checkpoint", "load_checkpoint": ".checkpoint", "load_model_weights": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "ConfigError": ".config", "TrainConfig": ".config", "load_config": ".config", "parse_args": ".config",
    "from_pretrained": ".hub", "save_pretrained": ".hub",
    "Callback": ".loop", "evaluate": ".loop", "train_one_epoch": ".loop",
    "ConfusionMatrix": ".metrics",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

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
