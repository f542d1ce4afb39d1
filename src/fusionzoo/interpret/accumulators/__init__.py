"""The metrics of :func:`fusionzoo.interpret.run`, one accumulator a file (protocol: :mod:`.base`).

:data:`ACCUMULATORS` maps each name of ``fusionzoo.interpret.METRICS`` to its class.
"""

from .base import BatchContext, MetricAccumulator, Needs, Pass, RunSpec
from .cka import CKAMetric
from .contribution import PIXEL_TASKS, ContributionMetric
from .gates import GatesMetric
from .gradcam import EXPLAIN, GradCamMetric, gradcam_taps
from .health import HealthMetric
from .purification import PurificationMetric
from .reliance import RelianceMetric, reliance_value
from .semantic_variance import SemanticVarianceMetric

ACCUMULATORS: dict[str, type[MetricAccumulator]] = {
    cls.name: cls
    for cls in (CKAMetric, SemanticVarianceMetric, HealthMetric, ContributionMetric, RelianceMetric, GradCamMetric,
                GatesMetric, PurificationMetric)
}

__all__ = [
    "ACCUMULATORS",
    "EXPLAIN",
    "PIXEL_TASKS",
    "BatchContext",
    "CKAMetric",
    "ContributionMetric",
    "GatesMetric",
    "GradCamMetric",
    "HealthMetric",
    "MetricAccumulator",
    "Needs",
    "Pass",
    "PurificationMetric",
    "RelianceMetric",
    "RunSpec",
    "SemanticVarianceMetric",
    "gradcam_taps",
    "reliance_value",
]
