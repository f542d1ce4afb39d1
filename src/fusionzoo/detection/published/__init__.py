"""Published detectors: the authors' whole networks, to the parameter (DESIGN.md section 3).

One module per method, as ``fusionzoo.models.published`` for segmentation; each ends with its
registered entry points (``published=True``, the reference repository and commit), its released
weights (``register_weights``) and its converter (``register_converter``). Parity with the
authors' code is proven by ``tests/test_parity_<method>.py`` on fixtures that
``tools/parity/<method>.py`` regenerates from a checkout of their repository.
"""
# One import line per method module (each registers itself).
from . import mlpd  # noqa: F401  (MLPD, Kim et al. RA-L 2021)
from . import cft  # noqa: F401  (CFT, two-stream YOLOv5)
from . import icafusion  # noqa: F401
