"""Published detectors: the authors' whole networks, to the parameter (DESIGN.md section 3).

One module per method, as ``fusionzoo.models.published`` for segmentation; each ends with its
registered entry points (``published=True``, the reference repository and commit), its released
weights (``register_weights``) and its converter (``register_converter``). Parity with the
authors' code is proven by ``tests/test_parity_<method>.py`` on fixtures that
``tools/parity/<method>.py`` regenerates from a checkout of their repository.
"""
from . import (
    cft,  # noqa: F401  (CFT, Qingyun et al. 2021: two-stream YOLOv5 with cross-modality fusion transformers)
    icafusion,  # noqa: F401  (ICAFusion, Shen et al. Pattern Recognition 2024)
    mlpd,  # noqa: F401  (MLPD, Kim et al. RA-L 2021)
)
