"""Optional: a few real samples per benchmark, read from ../shared/data/<name>/ (prepared layout).

The folder lives outside the repository and is never committed; every test here skips with
a reason when it is absent, so the suite passes without any real data.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusionzoo.data import collate, create_dataset, dataset_entry, eval_transforms, list_datasets

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"
BENCHMARKS = [n for n in list_datasets() if dataset_entry(n).needs_root]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_samples(name):
    root = REAL / name
    if not root.is_dir():
        pytest.skip(
            f"no real {name} samples: {root} is absent (optional; prepared layout, see datasets/{name}/README.md)"
        )
    splits = sorted(p.stem for p in (root / "splits").glob("*.txt"))
    if not splits:
        pytest.skip(f"{root}/splits has no split files")
    entry = dataset_entry(name)
    ds = create_dataset(
        name, root=root, split=splits[0], transforms=eval_transforms(entry.modalities, stats=name)
    )
    samples = [ds[i] for i in range(min(3, len(ds)))]
    for s in samples:
        for m in entry.modalities:
            assert torch.isfinite(s[m]).all(), f"{name} {s['meta']['id']}: non-finite {m}"
            assert s[m].shape[-2:] == tuple(s["meta"]["orig_size"])
        if "mask" in s:
            valid = s["mask"][s["mask"] != 255]
            assert valid.numel() == 0 or valid.max() < ds.num_classes
        if "boxes" in s:
            h, w = s["meta"]["orig_size"]
            assert (s["boxes"][:, 2] <= w).all() and (s["boxes"][:, 3] <= h).all()
    if len({tuple(s["meta"]["orig_size"]) for s in samples}) == 1:
        collate(samples)
