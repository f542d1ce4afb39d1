"""fusionzoo: RGB-D and RGB-T fusion models for segmentation and detection, with uniform taps for
interpretation.

>>> import fusionzoo as fz
>>> fz.list_models("cmx_*")
['cmx_pvt_v2_b2', 'cmx_resnet18', 'cmx_resnet50']
>>> model = fz.create_model("cmx_resnet50", num_classes=40)
>>> with fz.capture(model, "fused.*") as acts:
...     logits = model({"rgb": rgb, "depth": depth})
"""

from __future__ import annotations

from . import detection, models  # noqa: F401  (registers every segmentation and detection model)
from ._registry import (
    ModelEntry,
    ReleasedWeights,
    create_model,
    list_models,
    list_pretrained,
    model_entry,
    register_model,
    released_weights,
)
from .encoders import Encoder, PretrainedWeightsError
from .modalities import DEFAULT_CHANNELS
from .models import ConversionError, FusionModel, convert_checkpoint
from .taps import Captured, Tap, TapInfo, capture

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("data", "interpret", "engine")  # heavier imports (albumentations, matplotlib)


def __getattr__(name: str):  # PEP 562: fz.data / fz.interpret / fz.from_pretrained on first use
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "from_pretrained":
        from .engine.hub import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'fusionzoo' has no attribute {name!r}")

__all__ = [
    "DEFAULT_CHANNELS",
    "Captured",
    "ConversionError",
    "Encoder",
    "FusionModel",
    "ModelEntry",
    "PretrainedWeightsError",
    "ReleasedWeights",
    "Tap",
    "TapInfo",
    "__version__",
    "capture",
    "convert_checkpoint",
    "create_model",
    "from_pretrained",
    "list_models",
    "list_pretrained",
    "model_entry",
    "register_model",
    "released_weights",
]
