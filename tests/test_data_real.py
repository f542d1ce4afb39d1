"""Optional: a few real samples per benchmark, read from the shared data folder (prepared layout).

The folder lives outside the repository and is never committed: ``$FUSIONZOO_SHARED_DATA``, else
``<repo>/../shared/data`` (conftest.py ``shared_data_dir``). Every test here skips with a reason
when a benchmark's folder is absent, so the suite passes without any real data.
"""

from __future__ import annotations

import pytest
import torch

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.data import collate, create_dataset, dataset_entry, eval_transforms, list_datasets
from fusionzoo.engine.loop import evaluate

BENCHMARKS = [n for n in list_datasets() if dataset_entry(n).needs_root and not dataset_entry(n).resolve]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _root(shared_data, name):
    root = shared_data / name
    if not root.is_dir():
        pytest.skip(
            f"no real {name} samples: {root} is absent (optional; prepared layout, see datasets/{name}/README.md; "
            "set FUSIONZOO_SHARED_DATA to the shared data folder)"
        )
    return root


@pytest.mark.parametrize("name", BENCHMARKS)
def test_real_samples(name, shared_data):
    root = _root(shared_data, name)
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
            assert s["ignore"].shape == s["labels"].shape == s["occlusion"].shape
    if len({tuple(s["meta"]["orig_size"]) for s in samples}) == 1:
        collate(samples)


@pytest.mark.parametrize(("name", "size"), [("kaist", (512, 640)), ("llvip", (1024, 1280))])
def test_detector_on_a_real_frame(name, size, shared_data):
    """One real frame at full resolution through a detector (eval) and the validation pass train.py
    runs (COCO AP; MR^-2 for KAIST); on the KAIST frame also the whole interpretation suite. A tiny
    untrained detector (timm ``test_resnet`` stages, FPN width 64, score threshold 0 so that
    Grad-CAM has detections to explain): the point is that real formats and sizes go through, not
    accuracy. The interpretation suite runs on KAIST only, the cheaper frame (its cost is a dozen
    forwards and backwards at full resolution). Measured: 9.7 s (KAIST) and 2.8 s (LLVIP) wall on
    2 cores shared with ~20 other processes; about 5 s of CPU for both together."""
    root = _root(shared_data, name)
    ds = create_dataset(name, root=root, split="test", transforms=eval_transforms(("rgb", "thermal"), stats=name))
    batch = collate([ds[0]])
    assert tuple(batch["rgb"].shape[-2:]) == size and tuple(batch["meta"][0]["orig_size"]) == size
    torch.manual_seed(0)
    model = fz.create_model("fcos_sum", encoder="test_resnet", num_classes=1, fpn_channels=64, pretrained=False,
                            score_thresh=0.0).eval()
    val = evaluate(model, [batch], modalities=("rgb", "thermal"), num_classes=1,
                             device=torch.device("cpu"))
    assert val["images"] == 1 and 0 <= val["ap50"] <= 1
    if name != "kaist":
        assert "mr2" not in val
        return
    # the KAIST protocol applies: both boxes are reasonable, and set08 is a day sequence
    assert {"mr2", "mr2_day"} <= val.keys() and "mr2_night" not in val and 0 < val["mr2"] <= 1
    r = interpret.run(model, [batch], gradcam_images=1)
    assert r.num_images == 1 and r.settings["skipped"] == {}
    assert r.contribution["metric"] == "AP" and r.cka["pairs"]
    dets = r.artifacts["detections"][0]
    h, w = size
    assert len(dets["boxes"]) > 0 and (dets["boxes"][:, 2] <= w).all() and (dets["boxes"][:, 3] <= h).all()
