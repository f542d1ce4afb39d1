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

from ._lazy import lazy_exports

__version__ = "0.1.0"

# Every public name is imported on first use (PEP 562), so `import fusionzoo` and `fusionzoo --help`
# need no torch. The registry imports the model modules (which register themselves) on its first
# lookup, so fz.list_models() / fz.create_model() see every model as before.
_LAZY = {
    "ModelEntry": "._registry", "create_model": "._registry", "list_models": "._registry",
    "model_entry": "._registry", "register_model": "._registry",
    "ReleasedWeights": "._registry", "list_pretrained": "._registry", "released_weights": "._registry",
    "ConversionError": ".models.convert", "convert_checkpoint": ".models.convert",
    "Encoder": ".encoders", "PretrainedWeightsError": ".encoders",
    "DEFAULT_CHANNELS": ".modalities",
    "FusionModel": ".models",
    "Captured": ".taps", "Tap": ".taps", "TapInfo": ".taps", "capture": ".taps",
    "from_pretrained": ".hub",
    "push_to_hub": ".hub_push",
}
_LAZY_SUBMODULES = ("data", "interpret", "engine", "models", "detection", "losses")


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, _LAZY_SUBMODULES)

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
    "push_to_hub",
    "register_model",
    "released_weights",
]
