"""Model families; importing this package registers every entry point."""

from . import acnet, cmx, early, esanet, fusenet, hybrid, late, middle, sagate  # noqa: F401  (registration)
from .base import FusionModel
from .early import EarlyFusionModel
from .hybrid import HybridFusionModel
from .late import LateFusionModel
from .middle import MiddleFusionModel

__all__ = ["EarlyFusionModel", "FusionModel", "HybridFusionModel", "LateFusionModel", "MiddleFusionModel"]
