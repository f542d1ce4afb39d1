"""Training engine: config, loops, checkpoints of the trainer's state, distributed helpers.

Saving and loading models (``save_pretrained`` / ``from_pretrained``, safetensors weights) is the
model layer's: :mod:`fusionzoo.hub` and :mod:`fusionzoo.weights`.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config, parse_args
from .loop import Callback, evaluate, train_one_epoch

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
