"""Linear CKA: exact, streaming and minibatch estimators against known answers."""

import math

import numpy as np
import pytest
import torch

from fusionzoo.interpret.cka import (
    MinibatchCKA,
    StreamingCKA,
    center_gram,
    cka_from_gram,
    gram_linear,
    hsic_unbiased,
    linear_cka,
    reduce_spatial,
)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# ---- reference: Kornblith et al. 2019's published formulation, transcribed in numpy ------------
def _ref_center_gram(gram, unbiased):
    gram = gram.copy()
    n = gram.shape[0]
    if unbiased:
        np.fill_diagonal(gram, 0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = gram.mean(0)
        means -= means.mean() / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def _ref_cka(x, y, debiased):
    gx = _ref_center_gram(x @ x.T, debiased)
    gy = _ref_center_gram(y @ y.T, debiased)
    return (gx.ravel() @ gy.ravel()) / (np.linalg.norm(gx) * np.linalg.norm(gy))


def _ref_feature_space(x, y, debiased):
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    xy = np.linalg.norm(x.T @ y) ** 2
    nx = np.linalg.norm(x.T @ x)
    ny = np.linalg.norm(y.T @ y)
    if debiased:
        n = x.shape[0]
        rx, ry = (x * x).sum(1), (y * y).sum(1)
        sx, sy = rx.sum(), ry.sum()

        def helper(v, ra, rb, a, b):
            return v - n / (n - 2.0) * ra @ rb + a * b / ((n - 1) * (n - 2))

        xy = helper(xy, rx, ry, sx, sy)
        nx = np.sqrt(helper(nx**2, rx, rx, sx, sx))
        ny = np.sqrt(helper(ny**2, ry, ry, sy, sy))
    return xy / (nx * ny)


# ---- known answers ----------------------------------------------------------------------------
@pytest.mark.parametrize("debiased", [True, False])
def test_identical_features_give_one(debiased):
    x = _randn(200, 30, seed=1)
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-12)
    assert cka_from_gram(gram_linear(x), gram_linear(x), debiased) == pytest.approx(1.0, abs=1e-12)


def test_independent_gaussians_published_values():
    # DESIGN section 5: biased CKA of independent 512 x 64 Gaussians ~0.11 (= p / (n + p) in
    # expectation), debiased ~0.
    biased, debiased = [], []
    for s in range(5):
        x, y = _randn(512, 64, seed=10 + s), _randn(512, 64, seed=100 + s)
        biased.append(linear_cka(x, y, debiased=False))
        debiased.append(linear_cka(x, y, debiased=True))
    assert np.mean(biased) == pytest.approx(64 / 576, abs=0.01)
    assert abs(np.mean(debiased)) < 0.01


@pytest.mark.parametrize("debiased", [True, False])
def test_parity_with_kornblith_reference(debiased):
    x = _randn(120, 40, seed=3)
    y = x[:, :25] @ _randn(25, 50, seed=4) + 0.7 * _randn(120, 50, seed=5) + 3.0  # large offset
    ours = linear_cka(x, y, debiased)
    ref_gram = _ref_cka(x.numpy(), y.numpy(), debiased)
    ref_feat = _ref_feature_space(x.numpy(), y.numpy(), debiased)
    assert ours == pytest.approx(ref_gram, rel=1e-10)
    assert ours == pytest.approx(ref_feat, rel=1e-10)
    assert cka_from_gram(gram_linear(x), gram_linear(y), debiased) == pytest.approx(ref_gram, rel=1e-10)
    assert 0.2 < ours < 0.95  # a partial-dependence case, not a trivial 0 or 1


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_gram_and_minibatch_accurate_under_a_large_shared_offset(offset):
    # issue 11: the raw sums of Song et al.'s eq. 5 cancelled catastrophically (error 1.5e-2 at
    # offset 1e3, nan at 1e4); U-centring the Gram / centring rows before it must hold 1e-8
    x = _randn(120, 40, seed=30)
    y = x[:, :20] @ _randn(20, 30, seed=31) + _randn(120, 30, seed=32)
    ref = _ref_feature_space(x.numpy(), y.numpy(), debiased=True)  # float64, centred features
    xo, yo = x + offset, y + offset
    assert cka_from_gram(gram_linear(xo), gram_linear(yo), debiased=True) == pytest.approx(ref, abs=1e-8)
    assert cka_from_gram(gram_linear(xo), gram_linear(yo), debiased=False) == pytest.approx(
        _ref_feature_space(x.numpy(), y.numpy(), debiased=False), abs=1e-8)
    one = MinibatchCKA()
    one.update({"x": xo, "y": yo})  # one minibatch = the full-data debiased CKA
    assert one.cka("x", "y") == pytest.approx(ref, abs=1e-8)
    clean, shifted = MinibatchCKA(), MinibatchCKA()
    for idx in torch.arange(120).split(30):
        clean.update({"x": x[idx], "y": y[idx]})
        shifted.update({"x": xo[idx], "y": yo[idx]})
    assert shifted.cka("x", "y") == pytest.approx(clean.cka("x", "y"), abs=1e-8)


def test_hsic_unbiased_matches_u_centring():
    x, y = _randn(30, 5, seed=6), _randn(30, 7, seed=7)
    k, l = gram_linear(x), gram_linear(y)
    n = 30
    via_u = (center_gram(k, unbiased=True) * center_gram(l, unbiased=True)).sum() / (n * (n - 3))
    assert float(hsic_unbiased(k, l)) == pytest.approx(float(via_u), rel=1e-10)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariance_orthogonal_and_isotropic_scaling(debiased):
    x = _randn(150, 20, seed=8)
    y = torch.tanh(x @ _randn(20, 30, seed=9)) + 0.5 * _randn(150, 30, seed=10)
    q, _ = torch.linalg.qr(_randn(30, 30, seed=11))
    base = linear_cka(x, y, debiased)
    assert linear_cka(x, 4.2 * (y @ q), debiased) == pytest.approx(base, rel=1e-9)
    assert linear_cka(0.01 * x, y, debiased) == pytest.approx(base, rel=1e-9)
    # not invariant to a general (anisotropic) linear map: the test can fail
    diag = torch.linspace(0.1, 10, 30, dtype=torch.float64)
    assert abs(linear_cka(x, y * diag, debiased) - base) > 1e-3


@pytest.mark.parametrize("debiased", [True, False])
def test_streaming_equals_full_gram(debiased):
    x = _randn(301, 12, seed=12) * 5 + 100.0  # large mean: exercises the shift
    y = torch.cat([x[:, :6] ** 2, _randn(301, 9, seed=13)], 1)
    z = _randn(301, 4, seed=14)
    acc = StreamingCKA()
    for idx in torch.arange(301).split(37):
        acc.update({"x": x[idx], "y": y[idx], "z": z[idx]})
    assert acc.num_examples == 301
    for a, b, (fa, fb) in [("x", "y", (x, y)), ("x", "z", (x, z)), ("y", "z", (y, z))]:
        full = cka_from_gram(gram_linear(fa), gram_linear(fb), debiased)
        assert acc.cka(a, b, debiased) == pytest.approx(full, rel=1e-8, abs=1e-12)
        assert acc.cka(b, a, debiased) == pytest.approx(full, rel=1e-8, abs=1e-12)
    m = acc.matrix(["x", "y", "z"], debiased=debiased)
    assert m.shape == (3, 3) and torch.allclose(m, m.T)


def test_streaming_debiased_hsic_value_matches_gram():
    x = _randn(64, 6, seed=15)
    y = _randn(64, 3, seed=16) + x[:, :3]
    acc = StreamingCKA([("x", "y")])
    for idx in torch.arange(64).split(10):
        acc.update({"x": x[idx], "y": y[idx]})
    assert acc.hsic("x", "y") == pytest.approx(float(hsic_unbiased(gram_linear(x), gram_linear(y))), rel=1e-9)
    assert acc.hsic("x", "x") == pytest.approx(float(hsic_unbiased(gram_linear(x), gram_linear(x))), rel=1e-9)


def test_minibatch_close_to_full_on_large_n():
    n = 6000
    x = _randn(n, 16, seed=17)
    y = x @ _randn(16, 24, seed=18) + 2.0 * _randn(n, 24, seed=19)
    full = linear_cka(x, y, debiased=True)
    mb = MinibatchCKA()
    for idx in torch.arange(n).split(200):
        mb.update({"x": x[idx], "y": y[idx]})
    assert mb.num_batches == 30
    assert 0.3 < full < 0.9
    assert mb.cka("x", "y") == pytest.approx(full, abs=0.03)
    # biased CKA on the same minibatches would be far off for small batches
    noise = MinibatchCKA()
    for s in range(10):
        noise.update({"a": _randn(64, 64, seed=200 + s), "b": _randn(64, 64, seed=300 + s)})
    assert abs(noise.cka("a", "b")) < 0.03


def test_reduce_spatial_modes():
    f = _randn(2, 3, 8, 8, seed=20)
    pooled = reduce_spatial(f, "pool")
    assert pooled.shape == (2, 3) and torch.allclose(pooled, f.mean((2, 3)))
    s = reduce_spatial(f, "sample", num_samples=5, seed=1)
    assert s.shape == (10, 3)
    # the same relative positions on a 2x upsampled copy give the same rows (alignment across taps)
    up = f.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.equal(reduce_spatial(up, "sample", num_samples=5, seed=1), s)
    assert not torch.equal(reduce_spatial(f, "sample", num_samples=5, seed=2), s)
    with pytest.raises(ValueError, match="mode"):
        reduce_spatial(f, "flatten")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        reduce_spatial(f[0], "pool")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(_randn(10, 3), _randn(11, 3))
    acc = StreamingCKA([("a", "b")])
    with pytest.raises(KeyError, match="missing taps"):
        acc.update({"a": _randn(5, 2)})
    with pytest.raises(ValueError, match="same number of rows"):
        acc.update({"a": _randn(5, 2), "b": _randn(6, 2)})
    acc.update({"a": _randn(5, 2), "b": _randn(5, 2)})
    with pytest.raises(ValueError, match="changed width"):
        acc.update({"a": _randn(5, 3), "b": _randn(5, 2)})


def test_degenerate_constant_features_give_nan():
    x = torch.ones(20, 4, dtype=torch.float64)
    assert math.isnan(linear_cka(x, _randn(20, 4), debiased=False))
