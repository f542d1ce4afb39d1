"""The synthetic world: deterministic, fast to build, and with the documented modality dependence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionzoo.data import SyntheticConfig, SyntheticGenerator, collate, create_dataset

SIZE = (48, 64)


@pytest.fixture(scope="module", params=["depth", "thermal"])
def gen(request):
    return SyntheticGenerator(SyntheticConfig(image_size=SIZE, second=request.param), seed=0)


def test_deterministic_and_split_dependent(gen):
    a, b = gen(3, "train"), gen(3, "train")
    x = gen.config.second
    assert np.array_equal(a["rgb"], b["rgb"]) and np.array_equal(a[x], b[x])
    assert np.array_equal(a["mask"], b["mask"]) and np.array_equal(a["boxes"], b["boxes"])
    assert not np.array_equal(a["rgb"], gen(3, "val")["rgb"])
    assert not np.array_equal(a["rgb"], gen(4, "train")["rgb"])
    other_seed = SyntheticGenerator(gen.config, seed=1)(3, "train")
    assert not np.array_equal(a["rgb"], other_seed["rgb"])


def test_raw_sample_format(gen):
    x = gen.config.second
    s = gen(0)
    assert s["rgb"].shape == (*SIZE, 3) and s["rgb"].dtype == np.float32
    assert 0 <= s["rgb"].min() and s["rgb"].max() <= 1
    assert s[x].shape == SIZE and s[x].dtype == np.float32 and np.isfinite(s[x]).all()
    assert s["mask"].dtype == np.uint8 and s["mask"].max() < 5
    assert s["boxes"].shape[1] == 4 and s["labels"].dtype == np.int64


@pytest.mark.parametrize("cls", [1, 2, 3, 4])
def test_class_visible_exactly_in_documented_modalities(gen, cls):
    """Counterfactual: drawing the scene without class ``cls`` (every random draw unchanged)
    changes a modality if and only if ``class_visibility`` lists it."""
    cfg = gen.config
    name = cfg.class_names[cls]
    visible = cfg.class_visibility[name]
    changed = {m: False for m in cfg.modalities}
    present = 0
    for i in range(12):
        full, without = gen(i), gen(i, hide=[name])
        if not (full["mask"] == cls).any():
            continue
        present += 1
        assert not (without["mask"] == cls).any()
        for m in cfg.modalities:
            diff = np.abs(full[m] - without[m])
            if m in visible:
                changed[m] |= bool(diff.max() > 0.05)
            else:
                assert diff.max() == 0, f"{name} leaks into {m}"
    assert present >= 3
    assert all(changed[m] for m in visible), changed


def test_needs_both_class_shares_its_cues(gen):
    """Class 4 takes its colour from class 1's distribution and its depth/thermal signal from
    class 2's, so each modality alone confuses it (compare means of the counterfactual change)."""
    x = gen.config.second
    colour = {1: [], 4: []}
    lift = {2: [], 4: []}
    for i in range(60):
        full = gen(i)
        for c in (1, 2, 4):
            pix = full["mask"] == c
            if pix.sum() < 20:
                continue
            without = gen(i, hide=[c])
            if c in colour:
                rgb = full["rgb"][pix]
                colour[c].append((rgb[:, 0] - rgb[:, 2]).mean())  # warm colours: red > blue
            if c in lift:
                lift[c].append(np.abs(full[x][pix] - without[x][pix]).mean())
    assert min(len(v) for v in (*colour.values(), *lift.values())) >= 5
    assert np.mean(colour[1]) > 0.2 and abs(np.mean(colour[1]) - np.mean(colour[4])) < 0.1
    assert abs(np.mean(lift[2]) - np.mean(lift[4])) < 0.3 * np.mean(lift[2])


def test_sensor_effects_depth():
    g = SyntheticGenerator(SyntheticConfig(image_size=(96, 128)), seed=0)
    invalid = [(g(i)["depth"] == 0).mean() for i in range(8)]
    assert 0 < np.mean(invalid) < 0.1  # speckles + shadows, never most of the image
    clean = SyntheticGenerator(
        SyntheticConfig(image_size=(96, 128), invalid_fraction=(0, 0), shadow_px=(0, 0))
    )
    assert all((clean(i)["depth"] > 0).all() for i in range(4))


def test_boxes_match_visible_pixels(gen):
    for i in range(6):
        s = gen(i)
        for (x1, y1, x2, y2), lab in zip(s["boxes"].astype(int), s["labels"]):
            inside = s["mask"][y1:y2, x1:x2] == lab
            assert inside.any()
            assert inside[0].any() or inside[-1].any() or inside[:, 0].any()  # tight on some side
            assert 0 <= x1 < x2 <= SIZE[1] and 0 <= y1 < y2 <= SIZE[0]


def test_registered_dataset_contract():
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=5, image_size=SIZE, seed=2)
    assert len(ds) == 5 and ds.modalities == ("rgb", "depth") and ds.num_classes == 5
    assert ds.class_visibility["box_depth_only"] == ("depth",)
    assert ds.class_visibility["poster_rgb_only"] == ("rgb",)
    assert ds.class_dependence["crate_needs_both"] == "both_required"
    assert ds.ignore_index == 255 and len(ds.palette) == 5
    s = ds[0]
    assert s["rgb"].shape == (3, *SIZE) and s["depth"].shape == (1, *SIZE) and s["mask"].dtype == torch.int64
    assert torch.isfinite(s["depth"]).all() and s["rgb"].abs().max() < 10  # normalized
    assert s["meta"]["split"] == "val"
    batch = collate([ds[i] for i in range(3)])
    assert batch["rgb"].shape == (3, 3, *SIZE)
    t = create_dataset("synthetic_rgbt", num_samples=2, image_size=SIZE)
    assert t.modalities == ("rgb", "thermal") and t.class_visibility["heater_thermal_only"] == ("thermal",)
    assert t[1]["thermal"].shape == (1, *SIZE)
    with pytest.raises(IndexError):
        ds.raw(5)
    with pytest.raises(KeyError, match="unknown synthetic class"):
        ds.generator(0, hide=["tree"])


def test_normalized_statistics_are_close_to_standard():
    # 64 scenes: the plane distance varies per scene, so fewer would make the mean a coin toss
    ds = create_dataset("synthetic_rgbd", num_samples=64, image_size=(32, 40))
    rgb = torch.stack([ds[i]["rgb"] for i in range(64)])
    depth = torch.stack([ds[i]["depth"] for i in range(64)])
    assert rgb.mean().abs() < 0.5 and 0.5 < rgb.std() < 2
    valid = depth != 0
    assert depth[valid].mean().abs() < 0.5 and 0.4 < depth[valid].std() < 2


def test_dataset_pickles_for_spawned_workers():
    import pickle

    ds = create_dataset("synthetic_rgbt", num_samples=3, image_size=SIZE, seed=4)
    ds[0]  # creates the thread-local work buffers, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    a, b = ds[2], clone[2]
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["thermal"], b["thermal"])
    assert torch.equal(a["mask"], b["mask"])


@pytest.mark.parametrize("name", ["synthetic_rgbd", "synthetic_rgbt"])
def test_normalization_stats_match_the_generator(name):
    """STATS for the synthetic sets are measured values; they must follow generator changes."""
    from fusionzoo.data import compute_stats
    from fusionzoo.data.transforms import STATS

    measured = compute_stats(create_dataset(name, num_samples=128, image_size=(48, 64)), num_samples=128)
    for key, st in measured.items():
        # the plane distance varies per scene (2-5 m), so 128 scenes pin the depth mean to ~0.1 m
        tol = 0.3 if key == "depth" else 0.05
        assert np.allclose(st.mean, STATS[name][key].mean, atol=tol), (key, st.mean)
        assert np.allclose(st.std, STATS[name][key].std, atol=tol), (key, st.std)
