"""Shared by the CNN parity tests (acnet, fusenet, sagate): our published entry, built on the meta
device and filled with the converted authors'-format state dict that the fixture's rule rebuilds.

(``tools/parity/seeded.py`` imports nothing of fusionzoo, so the regeneration scripts run beside the
authors' code alone; this half needs fusionzoo and lives with the tests.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from meta_build import meta_device
from seeded import authors_state_dict

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict


def converted_model(name: str, meta: Mapping[str, Any], **kwargs: Any) -> torch.nn.Module:
    """``name`` at the fixture's class count, its weights the converted rule-filled authors' state dict."""
    with meta_device():  # no initialisation: every tensor comes from the rule
        model = fz.create_model(name, num_classes=meta["num_classes"], **kwargs)
    model.load_state_dict(convert_state_dict(name, authors_state_dict(meta), model), assign=True)
    return model
