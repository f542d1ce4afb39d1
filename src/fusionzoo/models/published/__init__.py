"""Published entries: the authors' whole networks, to the parameter (DESIGN.md section 3).

One module per method; each ends with its registered entry points (``published=True``, the
reference repository and commit), its released weights (``register_weights``) and its converter
(``register_converter``). Parity with the authors' code is proven by ``tests/test_parity_*.py`` on
fixtures that ``tools/parity/<method>.py`` regenerates from a checkout of their repository.
"""
from . import (
    acnet,  # noqa: F401  (ACNet, Hu et al. ICIP 2019)
    cmnext,  # noqa: F401  (CMNeXt, Zhang et al. CVPR 2023)
    cmx,  # noqa: F401  (CMX, Zhang et al. T-ITS 2023)
    dformer,  # noqa: F401  (DFormer, Yin et al. ICLR 2024)
    esanet,  # noqa: F401  (ESANet, Seichter et al. ICRA 2021)
    fusenet,  # noqa: F401  (FuseNet, Hazirbas et al. ACCV 2016)
    geminifusion,  # noqa: F401  (GeminiFusion, Jia et al. ICML 2024)
    sagate,  # noqa: F401  (SA-Gate, Chen et al. ECCV 2020)
)
