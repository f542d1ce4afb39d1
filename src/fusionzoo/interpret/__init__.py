"""Interpretation of fusion models through their taps (DESIGN section 5).

>>> import fusionzoo as fz
>>> res = fz.interpret.run(model, dataset, metrics=["cka", "semantic_variance", "contribution"])
>>> fz.interpret.write_report(res, "report/")
>>> cmp = fz.interpret.compare([res_a, res_b, res_c])

Building blocks (pure functions and streaming accumulators over captured tensors):
:mod:`.cka`, :mod:`.semantic_variance`, :mod:`.contribution`, :mod:`.health`, :mod:`.gradcam`,
and the training callback :class:`ModalityBalanceCallback`. See ``docs/interpret.md``.
"""

import importlib

from .api import METRICS, InterpretResult, load_result, run
from .callbacks import ModalityBalanceCallback, OGMGECallback
from .cka import (
    MinibatchCKA,
    StreamingCKA,
    center_gram,
    cka_from_gram,
    gram_linear,
    hsic_biased,
    hsic_unbiased,
    linear_cka,
    reduce_spatial,
)
from .compare import ComparisonResult, compare
from .contribution import (
    REMOVAL_POLICIES,
    ContributionAccumulator,
    ContributionResult,
    StreamingModalityStats,
    derangement,
    modality_contribution,
    perceptual_score,
    remove_modalities,
    shapley_values,
)
from .cooperation import EpochInterpretCallback, GradientDirectionCallback, LearningSpeedCallback
from .gradcam import gate_maps, grad_cam, split_gate_channels
from .health import EffectiveRank, FeatureNorm, effective_rank
from .kgs import KGSCallback
from .runs import interpret_run, load_run
from .semantic_variance import SemanticVariance, SemanticVarianceResult, labels_to_grid, semantic_variance

__all__ = [
    "METRICS",
    "REMOVAL_POLICIES",
    "ComparisonResult",
    "ContributionAccumulator",
    "ContributionResult",
    "EffectiveRank",
    "EpochInterpretCallback",
    "FeatureNorm",
    "GradientDirectionCallback",
    "InterpretResult",
    "KGSCallback",
    "LearningSpeedCallback",
    "MinibatchCKA",
    "ModalityBalanceCallback",
    "OGMGECallback",
    "SemanticVariance",
    "SemanticVarianceResult",
    "StreamingCKA",
    "StreamingModalityStats",
    "center_gram",
    "cka_from_gram",
    "compare",
    "derangement",
    "effective_rank",
    "gate_maps",
    "grad_cam",
    "gram_linear",
    "hsic_biased",
    "hsic_unbiased",
    "interpret_run",
    "labels_to_grid",
    "linear_cka",
    "load_result",
    "load_run",
    "modality_contribution",
    "perceptual_score",
    "reduce_spatial",
    "remove_modalities",
    "report_run",
    "run",
    "semantic_variance",
    "shapley_values",
    "split_gate_channels",
    "write_comparison",
    "write_report",
]


def __getattr__(name: str):
    # The report pulls in matplotlib (~0.5 s); load it on first use so `import fusionzoo` stays light.
    if name in ("report_run", "write_report", "write_comparison"):
        return getattr(importlib.import_module(".report", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
