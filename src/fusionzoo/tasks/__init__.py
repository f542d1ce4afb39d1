"""Tasks: what differs between segmentation and detection (targets, loss, prediction, metrics).

``get_task(model)`` returns the task object that the engine, ``train.py`` and
``fusionzoo.interpret`` use instead of branching on ``model.task``; see :mod:`.base`.
"""

from .base import Evaluator, Task, get_task, register_task, task_names
from .detection import DetectionEvaluator, DetectionTask, detection_targets
from .segmentation import ConfusionMatrix, SegmentationEvaluator, SegmentationTask, class_map, predict

__all__ = [
    "ConfusionMatrix",
    "DetectionEvaluator",
    "DetectionTask",
    "Evaluator",
    "SegmentationEvaluator",
    "SegmentationTask",
    "Task",
    "class_map",
    "detection_targets",
    "get_task",
    "predict",
    "register_task",
    "task_names",
]
