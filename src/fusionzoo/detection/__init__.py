"""Detection zoo: RGB-T / RGB-D object detectors across early, middle, late and hybrid fusion.

The registry imports ``fusionzoo.detection.models`` on its first lookup, which registers the
detectors (``fusionzoo.list_models(task="detection")``).
See docs/detection.md for the models, box formats and metric protocols.
"""

from .._lazy import lazy_exports

# Imported on first use (PEP 562): the metrics (fusionzoo.tasks, the mr2 command) need neither
# torchvision's detection models nor timm. The registry imports .models when it fills itself.
_LAZY = {
    "BOX_FUSIONS": ".boxes", "check_targets": ".boxes", "nms_fusion": ".boxes", "proben_fusion": ".boxes",
    "weighted_boxes_fusion": ".boxes",
    "BoxDetector": ".heads",
    "coco_ap": ".metrics", "log_average_miss_rate": ".metrics",
    "EarlyFusionDetector": ".models", "HybridFusionDetector": ".models", "LateFusionDetector": ".models",
    "MiddleFusionDetector": ".models",
}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, ("boxes", "metrics"))

__all__ = [
    "BOX_FUSIONS",
    "BoxDetector",
    "EarlyFusionDetector",
    "HybridFusionDetector",
    "LateFusionDetector",
    "MiddleFusionDetector",
    "boxes",
    "check_targets",
    "coco_ap",
    "log_average_miss_rate",
    "metrics",
    "nms_fusion",
    "proben_fusion",
    "weighted_boxes_fusion",
]
