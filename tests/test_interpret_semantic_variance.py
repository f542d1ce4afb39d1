"""Semantic variance: known answers, streaming == one shot, label reduction to the feature grid."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from fusionzoo.interpret.semantic_variance import (
    SemanticVariance,
    labels_to_grid,
    resample_features,
    semantic_variance,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _brute_force(features, grid, k, ignore=255):
    """The definition in the module docstring, written directly."""
    c = features.shape[1]
    f = features.permute(0, 2, 3, 1).reshape(-1, c).double()
    lab = grid.reshape(-1)
    keep = lab != ignore
    f, lab = f[keep], lab[keep]
    mu = f.mean(0)
    s_b = sum((lab == j).sum() * ((f[lab == j].mean(0) - mu) ** 2).sum() for j in range(k) if (lab == j).any())
    s_w = sum(((f[lab == j] - f[lab == j].mean(0)) ** 2).sum() for j in range(k) if (lab == j).any())
    n = f.shape[0]
    return float(s_b / n), float(s_w / n)


def test_labels_to_grid_area_vote_and_purity():
    m = torch.tensor([[
        [0, 0, 1, 1],
        [0, 1, 1, 1],
        [2, 2, 255, 255],
        [2, 3, 255, 1],
    ]])
    g = labels_to_grid(m, (2, 2), num_classes=4, purity=0.5)
    # cells: TL {0,0,0,1} -> 0 (3/4); TR {1,1,1,1} -> 1; BL {2,2,2,3} -> 2; BR {255,255,255,1} -> 1/4 < 0.5
    assert g.tolist() == [[[0, 1], [2, 255]]]
    g = labels_to_grid(m, (2, 2), num_classes=4, purity=0.8)
    assert g.tolist() == [[[255, 1], [255, 255]]]
    # non-divisible sizes: partition still covers every pixel; identity when sizes match
    assert torch.equal(labels_to_grid(m, (4, 4), 4, purity=1.0), m)
    g3 = labels_to_grid(torch.zeros(2, 7, 5, dtype=torch.long), (3, 2), 4)
    assert g3.shape == (2, 3, 2) and (g3 == 0).all()
    # finer grid than mask: nearest upsampling
    assert labels_to_grid(m, (8, 8), 4, purity=1.0)[0, ::2, ::2].tolist() == m[0].tolist()


def test_bad_labels_raise():
    with pytest.raises(ValueError, match="outside"):
        labels_to_grid(torch.tensor([[[0, 7]]]), (1, 2), num_classes=4)
    sv = SemanticVariance(4)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        sv.update(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long))


def test_one_hot_features_give_one():
    k = 5
    mask = torch.randint(0, k, (3, 16, 16), generator=_gen(0))
    mask[0, :4] = 255
    feats = F.one_hot(mask.clamp(max=k - 1), k).permute(0, 3, 1, 2).float()
    r = semantic_variance(feats, mask, k, purity=1.0)
    assert r.semantic_variance == pytest.approx(1.0, abs=1e-12)
    assert r.within_share == pytest.approx(0.0, abs=1e-12)
    assert r.num_pixels == 3 * 256 - 64
    assert r.fisher_ratio > 1e10  # S_W is 0 up to float64 rounding


def test_label_independent_features_give_about_zero():
    k = 6
    mask = torch.randint(0, k, (4, 32, 32), generator=_gen(1))
    feats = torch.randn(4, 16, 32, 32, generator=_gen(2)) + 5.0
    r = semantic_variance(feats, mask, k)
    # E[S_B / S_T] = (K - 1) / (N - 1) for label-independent features
    assert 0 <= r.semantic_variance < 0.01
    assert r.within_share == pytest.approx(1 - r.semantic_variance)


def test_streaming_equals_one_shot_and_definition():
    k = 4
    g = _gen(3)
    mask = torch.randint(0, k, (6, 24, 24), generator=g)
    mask[:, :3, :] = 255
    # features partly driven by class: class mean offsets plus noise, at stride 4
    grid = labels_to_grid(mask, (6, 6), k)
    offs = torch.randn(k + 1, 8, generator=g) * 2
    feats = offs[grid.clamp(max=k)].permute(0, 3, 1, 2) + torch.randn(6, 8, 6, 6, generator=g) + 100.0
    one = semantic_variance(feats, mask, k)
    acc = SemanticVariance(k)
    for i in range(0, 6, 2):
        acc.update(feats[i:i + 2], mask[i:i + 2])
    st = acc.compute()
    s_b, s_w = _brute_force(feats, grid, k)
    assert one.s_between == pytest.approx(s_b, rel=1e-9)
    assert one.s_within == pytest.approx(s_w, rel=1e-9)
    assert st.s_between == pytest.approx(s_b, rel=1e-9)
    assert st.semantic_variance == pytest.approx(s_b / (s_b + s_w), rel=1e-9)
    assert 0.2 < st.semantic_variance < 0.95
    assert sum(st.class_between_share) == pytest.approx(st.semantic_variance, rel=1e-9)
    assert sum(st.class_within_share) == pytest.approx(st.within_share, rel=1e-9)
    assert st.class_counts == one.class_counts


def test_per_channel_values():
    k = 3
    mask = torch.randint(0, k, (2, 20, 20), generator=_gen(4))
    feats = torch.stack([mask.float() * 3.0, torch.randn(2, 20, 20, generator=_gen(5))], 1)
    r = semantic_variance(feats, mask, k)
    assert r.channel_semantic_variance[0] == pytest.approx(1.0, abs=1e-12)
    assert r.channel_semantic_variance[1] < 0.02


def test_empty_accumulator_is_nan():
    r = SemanticVariance(3).compute()
    assert math.isnan(r.semantic_variance) and r.num_pixels == 0


def test_common_grid_resamples_every_tap_onto_the_same_labelled_cells():
    # issue 11: deep stages of a small input have a few cells; on a common stride-4 grid every
    # tap is scored on the same cells, coarse taps upsampled bilinearly, fine ones area-averaged
    k, g = 3, _gen(9)
    mask = torch.randint(0, k, (2, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)  # 32x32
    coarse = torch.randn(2, 5, 2, 2, generator=g)      # stride 16
    native = torch.randn(2, 5, 8, 8, generator=g)      # stride 4: the common grid itself
    fine = torch.randn(2, 5, 16, 16, generator=g)      # stride 2
    grid = labels_to_grid(mask, (8, 8), k)
    results = {}
    for name, f in (("coarse", coarse), ("native", native), ("fine", fine)):
        r = semantic_variance(f, mask, k, stride=4)
        on_grid = resample_features(f.double(), (8, 8))  # SemanticVariance resamples in float64
        s_b, s_w = _brute_force(on_grid, grid, k)
        assert r.s_between == pytest.approx(s_b, rel=1e-9) and r.s_within == pytest.approx(s_w, rel=1e-9), name
        assert r.grid == [8, 8] and r.stride == 4 and r.num_pixels == 128
        results[name] = r
    assert results["coarse"].class_counts == results["fine"].class_counts == results["native"].class_counts
    assert torch.equal(resample_features(native, (8, 8)), native)
    assert torch.allclose(resample_features(fine, (8, 8)), F.avg_pool2d(fine, 2))
    assert torch.allclose(resample_features(coarse, (8, 8)),
                          F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False))
    # on its own 2x2 grid the coarse tap has 8 cells, and says so
    with pytest.warns(UserWarning, match="only 8 labelled cells"):
        own = semantic_variance(coarse, mask, k)
    assert own.grid == [2, 2] and own.stride is None



class _OnTheGrid(SemanticVariance):
    """Reference: every sum over the kept cells of the common grid, the tap upsampled to it
    first (the path before issue 23 part 3), ``O(h w C^2)`` per image whatever the tap's
    resolution."""

    def update(self, features, mask, blocks=None, first_image=None):
        h, w = -(-mask.shape[-2] // self.stride), -(-mask.shape[-1] // self.stride)
        on_grid = resample_features(features.double(), (h, w))
        assert on_grid.shape[-2:] == (h, w)
        super().update(on_grid, mask, blocks, first_image)


def _close(a, b, rel=1e-10, scale=None):
    """Equal within ``rel`` of ``scale`` (default: the largest ``|b|``), NaN where ``b`` is."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    both_nan = torch.isnan(a) & torch.isnan(b)
    if scale is None:
        scale = b[~both_nan].abs().max().clamp(min=1e-300) if (~both_nan).any() else 1.0
    return bool(((a - b).abs()[~both_nan] <= rel * scale).all()) and torch.equal(torch.isnan(a), torch.isnan(b))


@pytest.mark.parametrize("shape", [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2), (3, 14), (5, 7)])
def test_second_moment_at_tap_resolution_equals_the_grid_sum(shape):
    # issue 23 part 3: a tap coarser than the stride-4 grid gets every sum (class sums, squared
    # norms, per-channel squares, the C x C second moment: so every value and block replicate)
    # on its own cells (f^T A^T D_k A f); equal to the sums over the grid's kept cells to float64 rounding, for every stride (16x20 = stride 2,
    # area-averaged; 8x10 = the grid; 4x5 .. 1x2 = strides 8 .. 32; 3x14 and 5x7 = one dimension
    # finer or odd sizes), with ignored pixels, purity-dropped cells and an offset (the shift)
    k, g = 4, _gen(23)
    blocks = 4
    new, ref = (cls(k, purity=0.6, stride=4, blocks=blocks) for cls in (SemanticVariance, _OnTheGrid))
    for batch in range(3):
        mask = torch.randint(0, k, (3, 8, 10), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
        mask = torch.where(torch.rand(3, 32, 40, generator=g) < 0.3, torch.randint(0, k, (3, 32, 40), generator=g),
                           mask)  # mixed cells, some below purity 0.6
        mask[:, :5, :7] = 255
        mask[1] = 255 if batch == 1 else mask[1]  # an image with no kept cell
        feats = torch.randn(3, 6, *shape, generator=g) * torch.linspace(0.1, 10, 6)[:, None, None] + 50.0
        img_blocks = torch.tensor([(3 * batch + i) % blocks for i in range(3)])
        for acc in (new, ref):
            acc.update(feats, mask, img_blocks)
    grid = labels_to_grid(mask, (8, 10), k, purity=0.6)
    assert (grid == 255).any() and (grid != 255).any()
    for got, want in zip(new.state(), ref.state()):
        assert _close(got, want)
    a, b = new.compute(), ref.compute()
    for key in ("semantic_variance", "within_share", "sv_whitened_plugin", "s_total"):
        assert _close(getattr(a, key), getattr(b, key)), key
    # the split-half form is a difference of terms of the plug-in's size and can be about 0:
    # relative to the plug-in value
    assert _close(a.sv_whitened, b.sv_whitened, scale=b.sv_whitened_plugin)
    assert _close(a.class_between_share, b.class_between_share) and a.class_counts == b.class_counts
    w = torch.poisson(torch.ones(5, blocks), generator=g)
    ra, rb = new.replicates(w), ref.replicates(w)
    for key in rb:
        scale = rb["sv_whitened_plugin"].abs().max() if key == "sv_whitened" else None
        assert _close(ra[key], rb[key], scale=scale), key
    # without block moments (one total second moment) as well
    one_new, one_ref = (cls(k, stride=4, whitened_blocks=False) for cls in (SemanticVariance, _OnTheGrid))
    for acc in (one_new, one_ref):
        acc.update(feats, mask)
    for got, want in zip(one_new.state(), one_ref.state()):
        assert _close(got, want)
    a, b = one_new.compute(), one_ref.compute()
    assert _close(a.sv_whitened_plugin, b.sv_whitened_plugin)
    assert _close(a.sv_whitened, b.sv_whitened, scale=b.sv_whitened_plugin)


@pytest.mark.parametrize("size", [(8, 8), (16, 16)])  # a tap on the stride-4 grid, and a finer (stride-2) one
def test_cells_in_chunks_give_the_sums_of_one_chunk(size, monkeypatch):
    """The grid path reads an image's kept cells in chunks of ``CHUNK_BYTES`` (and area-averages a
    finer tap a few channels at a time): chunks of 3 rows and 1 channel give every sum of one chunk."""
    g = _gen(11)
    mask = torch.randint(0, 3, (3, 32, 32), generator=g)
    mask[0, :9] = 255  # ignored cells inside and across chunks
    feats = torch.randn(3, 6, *size, generator=g)
    blocks = torch.tensor([0, 1, 0])
    whole = SemanticVariance(3, stride=4, blocks=2)
    whole.update(feats, mask, blocks)
    monkeypatch.setattr(sys.modules["fusionzoo.interpret.semantic_variance"], "CHUNK_BYTES", 8 * 6 * 3)
    chunked = SemanticVariance(3, stride=4, blocks=2)
    chunked.update(feats, mask, blocks)
    for a, b in zip(chunked.state(), whole.state(), strict=True):
        assert _close(a, b), (a, b)
    assert _close(chunked.shift, whole.shift)
