"""Known answers on the synthetic RGB-D world (slow: trains a small late-fusion model on CPU).

The synthetic classes are built so that ``box_depth_only`` is invisible in RGB and
``poster_rgb_only`` invisible in depth (``fusionzoo.data.synthetic``). A trained model's
contribution metrics must recover that: depth carries the depth-only class, RGB the RGB-only
class, and the late-fusion model's per-modality heads fail exactly where their modality is blind.
"""

import pytest
import torch
from torch.utils.data import DataLoader

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.data import collate, create_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_late():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        train = create_dataset("synthetic_rgbd", split="train", num_samples=256, image_size=(64, 80), seed=0)
        val = create_dataset("synthetic_rgbd", split="val", num_samples=48, image_size=(64, 80), seed=0)
        model = fz.create_model("late_mean", encoder="resnet10t", num_classes=train.num_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(0))
        model.train()
        step = 0
        while step < 200:
            for b in loader:
                logits = model({m: b[m] for m in model.modalities})
                loss = torch.nn.functional.cross_entropy(logits, b["mask"], ignore_index=255)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step == 200:
                    break
        res = interpret.run(model, val, metrics=["contribution"], batch_size=8, policy="missing")
        yield res, list(val.classes)
    finally:
        torch.set_num_threads(n)


def test_shapley_per_class_recovers_modality_visibility(trained_late):
    res, classes = trained_late
    c = res.contribution
    assert c["coalitions"]["rgb+depth"]["miou"] > 0.6  # the model did learn the scene
    depth_only, rgb_only = classes.index("box_depth_only"), classes.index("poster_rgb_only")
    sh_rgb, sh_depth = c["shapley_per_class"]["rgb"], c["shapley_per_class"]["depth"]
    assert sh_depth[depth_only] > 2 * sh_rgb[depth_only]
    assert sh_rgb[rgb_only] > 2 * sh_depth[rgb_only]
    assert sh_depth[depth_only] > 2 * sh_depth[rgb_only]


def test_late_fusion_heads_are_blind_where_their_modality_is(trained_late):
    res, classes = trained_late
    heads = res.contribution["unimodal_heads"]
    depth_only, rgb_only = classes.index("box_depth_only"), classes.index("poster_rgb_only")
    assert heads["depth"]["iou"][depth_only] > heads["rgb"]["iou"][depth_only] + 0.3
    assert heads["rgb"]["iou"][rgb_only] > heads["depth"]["iou"][rgb_only] + 0.3
