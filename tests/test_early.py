"""Early fusion: which parameters belong to one modality (gradient-balance callbacks use them)."""

from __future__ import annotations

import pytest
import torch

import fusionzoo as fz
from fusionzoo.interpret.callbacks import modality_owned_gradients


def test_early_stem_owns_its_stems_and_concat_owns_nothing() -> None:
    stem = fz.create_model("early_stem", encoder="test_resnet", num_classes=3)
    for m in ("rgb", "depth"):
        owned = {id(p) for p in stem.modality_parameters(m)}
        assert owned == {id(p) for p in stem.stems[m].parameters()}
        # OGM-GE modulates the stem's convolution, not a slice of the encoder's first layer.
        assert [(tuple(p.shape), s) for p, s in modality_owned_gradients(stem, m)] == [
            (tuple(stem.stems[m][0].weight.shape), None)]
    concat = fz.create_model("early_concat", encoder="test_resnet", num_classes=3)
    assert list(concat.modality_parameters("depth")) == []
    (weight, channels), = modality_owned_gradients(concat, "depth")
    assert weight.shape[1] == 4 and channels == slice(3, 4)
    with pytest.raises(ValueError, match="thermal"):
        list(stem.modality_parameters("thermal"))
    assert torch.is_tensor(weight)
