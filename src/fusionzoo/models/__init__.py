"""Model families; importing this package registers every entry point."""

from . import acnet, cmx, early, esanet, fusenet, hybrid, late, middle, mim, published, sagate  # noqa: F401  (registration)
from .base import FusionModel
from .convert import ConversionError, convert_checkpoint, load_released
from .early import EarlyFusionModel
from .hybrid import HybridFusionModel
from .late import LateFusionModel
from .middle import MiddleFusionModel
from .mim import MIMModel

__all__ = [
    "ConversionError",
    "EarlyFusionModel",
    "FusionModel",
    "HybridFusionModel",
    "LateFusionModel",
    "MIMModel",
    "MiddleFusionModel",
    "convert_checkpoint",
    "load_released",
]
