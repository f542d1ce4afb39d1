"""Detection zoo: RGB-T / RGB-D object detectors across early, middle, late and hybrid fusion.

``import fusionzoo`` imports this package, which registers the detectors
(``fusionzoo.list_models(task="detection")``).
See docs/detection.md for the models, box formats and metric protocols.
"""

from . import boxes, metrics
from .boxes import BOX_FUSIONS, check_targets, nms_fusion, proben_fusion, weighted_boxes_fusion
from .heads import BoxDetector
from .metrics import coco_ap, log_average_miss_rate
from .models import EarlyFusionDetector, HybridFusionDetector, LateFusionDetector, MiddleFusionDetector

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
