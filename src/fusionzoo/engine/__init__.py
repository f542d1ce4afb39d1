"""Training engine: config, loops, checkpoints, distributed helpers, hub save/load."""

from .checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from .config import ConfigError, TrainConfig, load_config, parse_args
from .hub import from_pretrained, save_pretrained
from .loop import Callback, evaluate, train_one_epoch

__all__ = [
    "Callback",
    "CheckpointError",
    "ConfigError",
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
