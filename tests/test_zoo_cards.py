"""Every zoo/ recipe card parses into TrainConfig and names things that exist (litgpt-style)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import fusionzoo as fz
from fusionzoo import data
from fusionzoo._registry import accepted_kwargs
from fusionzoo.engine.config import TrainConfig, load_config

ZOO = Path(__file__).resolve().parents[1] / "zoo"
CARDS = sorted(ZOO.glob("*/*.yaml"))


def test_zoo_is_not_empty():
    assert len(CARDS) >= 10
    datasets = {p.stem for p in CARDS}
    assert {"nyuv2", "mfnet", "llvip", "flir_aligned"} <= datasets


@pytest.mark.parametrize("path", CARDS, ids=[f"{p.parent.name}/{p.stem}" for p in CARDS])
def test_card(path: Path):
    cfg, card = load_config(path)
    assert isinstance(cfg, TrainConfig)
    # the file location names the recipe
    assert (cfg.model, cfg.dataset) == (path.parent.name, path.stem)
    entry = fz.model_entry(cfg.model)  # raises for an unregistered model
    ds = data.dataset_entry(cfg.dataset)  # raises for an unregistered dataset
    assert entry.task in ds.task.split("+"), (entry.task, ds.task)  # a detector on a dataset with boxes
    # keyword arguments must be ones the entry point / dataset factory takes
    accepted = accepted_kwargs(cfg.model)
    if accepted is not None:
        assert set(cfg.model_kwargs) <= accepted, set(cfg.model_kwargs) - accepted
    params = inspect.signature(ds.factory).parameters
    assert set(cfg.dataset_kwargs) <= set(params), set(cfg.dataset_kwargs) - set(params)
    # streams exist in the dataset and fit the method
    mods = cfg.modalities or ds.modalities
    available = getattr(ds.factory, "available_modalities", ds.modalities)
    assert set(mods) <= set(available), (mods, available)
    if entry.max_modalities is not None:
        assert len(mods) == entry.max_modalities
    assert cfg.train_split in ds.splits and cfg.val_split in ds.splits
    # the card records the published target and a slot for our measurement
    assert {"paper", "target", "measured", "metric"} <= set(card)
    assert card["target"] is None or 0 < card["target"] < 100
    assert card["target"] is not None or "notes" in card, "a missing target must be explained in notes"
