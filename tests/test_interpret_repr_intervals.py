"""Bootstrap intervals of the representation metrics (CKA, reliance, semantic variance) and the
whitened semantic variance: replicates are exact (all-ones weights give the point value, integer
weights equal duplicated images), the whitened form is invariant to invertible channel maps and
sees class information the trace form misses, and the intervals cover the large-sample value."""

import math

import pytest
import torch
from torch import nn

from fusionzoo import interpret
from fusionzoo.interpret.accumulators import blocks as blocks_mod
from fusionzoo.interpret.accumulators.blocks import checked_interval
from fusionzoo.interpret.accumulators.reliance import reliance_replicates, reliance_value
from fusionzoo.interpret.cka import StreamingCKA, cka_from_gram, gram_linear
from fusionzoo.interpret.intervals import poisson_weights
from fusionzoo.interpret.semantic_variance import SemanticVariance
from fusionzoo.taps import TapSet


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _duplicate(blocks, weights):
    """Row indices of the data with every row of block g repeated weights[g] times."""
    return torch.cat([torch.nonzero(blocks == g).flatten().repeat(int(k)) for g, k in enumerate(weights.tolist())])


# ---- CKA and reliance ----------------------------------------------------------------------------
_MIX = torch.randn(5, 7, generator=_gen(123), dtype=torch.float64)  # one population for every seed


def _cka_data(n=48, seed=0):
    g = _gen(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) + 3.0  # an offset: the shift must not matter
    y = x @ _MIX + 2 * torch.randn(n, 7, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("debiased", [True, False])
# two images a batch: each in its own block, the blocks' sums batched; eight: blocks 0 and 1 twice
# in a batch, rows sorted by block and summed block by block
@pytest.mark.parametrize("images", [2, 8])
def test_cka_replicates_are_exact(debiased, images):
    x, y = _cka_data()
    blk = torch.arange(x.shape[0]) // 4 % 6  # 4 rows per image, images in 6 blocks
    acc = StreamingCKA(pairs=[("x", "y")], blocks=6)
    for i in range(0, x.shape[0], 4 * images):
        acc.update({"x": x[i:i + 4 * images], "y": y[i:i + 4 * images]}, blk[i:i + 4 * images])
    w = torch.tensor([[1.0] * 6, [2, 0, 1, 3, 1, 0], [0, 0, 0, 1, 1, 1]])
    reps = acc.replicates(w, debiased)[("x", "y")]
    assert reps[0] == pytest.approx(acc.cka("x", "y", debiased), rel=1e-10)
    # the reference is the in-memory Gram estimator on the duplicated rows: another code path
    for r in (1, 2):
        idx = _duplicate(blk, w[r])
        ref = cka_from_gram(gram_linear(x[idx]), gram_linear(y[idx]), debiased)
        assert reps[r] == pytest.approx(ref, rel=1e-9)
    # self-similarity of the reversed pair is the same HSIC
    assert acc.replicate_hsic("y", "x", w, debiased) == pytest.approx(acc.replicate_hsic("x", "y", w, debiased), rel=1e-10)


def test_cka_replicate_with_fewer_than_four_rows_is_nan():
    x, y = _cka_data(n=8)
    acc = StreamingCKA(pairs=[("x", "y")], blocks=8)
    acc.update({"x": x, "y": y}, torch.arange(8))
    reps = acc.replicates(torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0], [1.0] * 8]))[("x", "y")]
    assert math.isnan(reps[0]) and math.isfinite(reps[1])


def test_reliance_replicates_are_exact():
    g = _gen(1)
    full = torch.randn(40, 6, generator=g, dtype=torch.float64)
    removed = full[:, :3] @ torch.randn(3, 6, generator=g, dtype=torch.float64)  # part of the variation left
    blk = torch.arange(40) % 5
    acc = StreamingCKA(pairs=[("full::t", "removed::t")], blocks=5)
    acc.update({"full::t": full, "removed::t": removed}, blk)
    w = torch.tensor([[1.0] * 5, [3, 1, 0, 1, 2]])
    reps = reliance_replicates(acc, "t", w)
    assert reps[0] == pytest.approx(reliance_value(acc, "t"), rel=1e-10)
    idx = _duplicate(blk, w[1])
    dup = StreamingCKA(pairs=[("full::t", "removed::t")])
    dup.update({"full::t": full[idx], "removed::t": removed[idx]})
    assert reps[1] == pytest.approx(reliance_value(dup, "t"), rel=1e-9)


# ---- semantic variance ---------------------------------------------------------------------------
def _sv_images(n, seed, k=3, c=5, effect=1.0):
    """Images of 8x8 cells: class k shifts channel 0 by k * effect; an image-level random offset
    makes the cells of one image correlated (the image is the resampling unit)."""
    g = _gen(seed)
    lab = torch.randint(0, k, (n, 8, 8), generator=g)
    means = torch.zeros(k, c, dtype=torch.float64)
    means[:, 0] = torch.arange(k) * effect
    f = (means[lab].permute(0, 3, 1, 2) + torch.randn(n, c, 8, 8, generator=g, dtype=torch.float64)
         + 0.5 * torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64))
    return f, lab


def test_semantic_variance_replicates_are_exact():
    f, lab = _sv_images(12, 0)
    blk = torch.arange(12) % 4
    acc = SemanticVariance(3, blocks=4)
    for i in range(0, 12, 3):
        acc.update(f[i:i + 3], lab[i:i + 3], blk[i:i + 3])
    point = acc.compute()
    w = torch.tensor([[1.0] * 4, [2, 0, 1, 3]])
    reps = acc.replicates(w)
    assert reps["sv"][0] == pytest.approx(point.semantic_variance, rel=1e-10)
    assert reps["within_share"][0] == pytest.approx(point.within_share, rel=1e-10)
    assert reps["sv_whitened"][0] == pytest.approx(point.sv_whitened, rel=1e-10)
    assert reps["class_between_share"][0].tolist() == pytest.approx(point.class_between_share, rel=1e-10)
    assert reps["sv_whitened_plugin"][0] == pytest.approx(point.sv_whitened_plugin, rel=1e-10)
    # the duplicated images, each copy in its block (so in its block's half for the split form)
    img = _duplicate(blk, w[1])
    dup = SemanticVariance(3, blocks=4)
    dup.update(f[img], lab[img], blk[img])
    d = dup.compute()
    assert reps["sv"][1] == pytest.approx(d.semantic_variance, rel=1e-9)
    assert reps["sv_whitened"][1] == pytest.approx(d.sv_whitened, rel=1e-9)
    assert reps["sv_whitened_plugin"][1] == pytest.approx(d.sv_whitened_plugin, rel=1e-9)
    assert reps["class_between_share"][1].tolist() == pytest.approx(d.class_between_share, rel=1e-9)


def test_whitened_form_is_invariant_to_invertible_channel_maps_and_the_trace_form_is_not():
    f, lab = _sv_images(6, 2, c=4)
    base = SemanticVariance(3)
    base.update(f, lab)
    b = base.compute()
    scaled = f.clone()
    scaled[:, 3] *= 1000.0  # a loud channel without class information
    mix = torch.linalg.qr(torch.randn(4, 4, generator=_gen(3), dtype=torch.float64))[0]  # a rotation
    mix = mix @ torch.diag(torch.tensor([1.0, 5.0, 0.2, 30.0], dtype=torch.float64))        # and anisotropic scales
    mapped = torch.einsum("dc,bchw->bdhw", mix.T, f)
    for g in (scaled, mapped):
        acc = SemanticVariance(3)
        acc.update(g, lab)
        r = acc.compute()
        assert r.sv_whitened == pytest.approx(b.sv_whitened, rel=1e-5)
        assert abs(r.semantic_variance - b.semantic_variance) > 0.1 * b.semantic_variance
    assert 0.0 <= b.sv_whitened <= 1.0


def test_whitened_form_sees_class_information_in_a_low_variance_channel():
    """Classes live in channels 0 and 1 with a spread of 1e-3 (class means 1e-2 apart); three
    more channels carry unit-variance noise. The trace form, dominated by the loud channels,
    is at its chance level ((K - 1) / N cells = 0.004); the whitened form, near 1 (two discriminant directions, both almost pure)."""
    g = _gen(4)
    lab = torch.randint(0, 3, (8, 8, 8), generator=g)
    f = torch.randn(8, 5, 8, 8, generator=g, dtype=torch.float64)
    f[:, :2] *= 1e-3
    f[:, 0] += 1e-2 * (lab == 1)
    f[:, 1] += 1e-2 * (lab == 2)
    acc = SemanticVariance(3)
    acc.update(f, lab)
    r = acc.compute()
    assert r.semantic_variance < 1e-2
    assert r.sv_whitened > 0.9


def test_whitened_form_handles_constant_and_duplicate_channels():
    """A constant channel (dead ReLU) and an exact copy of another (rank-deficient total scatter):
    the ridge keeps the solve defined and the value equals that of the features without them."""
    f, lab = _sv_images(6, 5, c=4)
    extra = torch.cat([f, torch.zeros_like(f[:, :1]) + 7.0, 2 * f[:, :1]], 1)
    vals = []
    for g in (f, extra):
        acc = SemanticVariance(3)
        acc.update(g, lab)
        vals.append(acc.compute().sv_whitened)
    assert vals[1] == pytest.approx(vals[0], rel=1e-4)


# ---- coverage ------------------------------------------------------------------------------------
def test_intervals_cover_the_large_sample_value():
    """20 seeds of 60 images in 20 blocks: the 95 % intervals of SV (trace and split-half
    whitened) and CKA, as run() stores them, cover the value measured on 10x more images in at
    least 16 of 20 (here 19, 20 and 17; a withheld interval counts as a miss; the percentile
    bootstrap of 60 images is a little narrow: about 0.9 in longer runs of this check)."""
    big_f, big_lab = _sv_images(600, 999)
    ref = SemanticVariance(3)
    ref.update(big_f, big_lab)
    ref_sv = ref.compute()
    bx, by = _cka_data(n=2400, seed=999)
    ref_cka = StreamingCKA(pairs=[("x", "y")])
    ref_cka.update({"x": bx, "y": by})
    truth = {"sv": ref_sv.semantic_variance, "sv_whitened": ref_sv.sv_whitened, "cka": ref_cka.cka("x", "y")}
    hits = dict.fromkeys(truth, 0)
    for seed in range(20):
        f, lab = _sv_images(60, seed)
        x, y = _cka_data(n=240, seed=100 + seed)
        img_blocks = torch.arange(60) % 20
        sv = SemanticVariance(3, blocks=20)
        sv.update(f, lab, img_blocks)
        cka = StreamingCKA(pairs=[("x", "y")], blocks=20)
        cka.update({"x": x, "y": y}, img_blocks.repeat_interleave(4))
        w = poisson_weights(seed, range(20), 200)
        reps = sv.replicates(w)
        reps["cka"] = cka.replicates(w)[("x", "y")]
        p = sv.compute()
        point = {"sv": p.semantic_variance, "sv_whitened": p.sv_whitened, "cka": cka.cka("x", "y")}
        for key, value in truth.items():
            lo, hi = checked_interval(reps[key], point[key], 0.95)  # as run() stores them; withheld = a miss
            hits[key] += lo <= value <= hi
    assert all(h >= 16 for h in hits.values()), hits


# ---- through interpret.run -----------------------------------------------------------------------
class Tiny(nn.Module):
    """Two 4-channel streams, a fused stream (their sum through a fixed mix) and logits."""

    modalities = ("rgb", "depth")
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.taps = TapSet()
        for s in ("rgb", "depth", "fused"):
            self.taps.declare(f"{s}.stage1", 4, 1)
        self.taps.declare("head.logits", 3, 1, "logits")
        self.mix = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def tap_info(self):
        return self.taps.info()

    def forward(self, inputs, missing=()):
        r = self.taps("rgb.stage1", torch.cat([inputs["rgb"], inputs["rgb"][:, :1] ** 2], 1))
        d = self.taps("depth.stage1", inputs["depth"].expand(-1, 4, -1, -1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1))
        fused = self.taps("fused.stage1", torch.tanh(self.mix(r + d)))
        return self.taps("head.logits", self.head(fused))


def _batches(n=12, b=4):
    g = _gen(7)
    out = []
    for _ in range(n // b):
        mask = torch.randint(0, 3, (b, 8, 8), generator=g)
        out.append({"rgb": torch.randn(b, 3, 8, 8, generator=g) + mask[:, None].float(),
                    "depth": torch.randn(b, 1, 8, 8, generator=g), "mask": mask})
    return out


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")  # 8x8 images: few cells, on purpose
def test_run_gives_intervals_at_the_contract_paths():
    torch.manual_seed(0)
    model = Tiny()
    res = interpret.run(model, _batches(), metrics=["cka", "semantic_variance", "reliance"], samples_per_image=4,
                        sv_stride=None, replicates=100)
    for key in ("cka", "semantic_variance", "reliance"):
        assert res.settings[f"{key}_intervals"]["blocks"] == blocks_mod.BLOCKS
    for i, pair in enumerate(res.cka["pairs"]):
        lo, hi = res.intervals[f"cka.pairs.{i}.cka"]
        assert lo <= pair["cka"] + 1e-12 and pair["cka"] - 1e-12 <= hi or not math.isfinite(pair["cka"])
        assert f"cka.pairs.{i}.cka_biased" in res.intervals
    for tap, v in res.semantic_variance.items():
        assert v["sv"] == v["semantic_variance"] and 0.0 <= v["sv_whitened_plugin"] <= 1.0
        assert v["sv_whitened"] <= v["sv_whitened_plugin"] + 0.05  # the split form has no chance term
        for key in ("sv", "within_share", "sv_whitened", "sv_whitened_plugin"):
            lo, hi = res.intervals[f"semantic_variance.{tap}.{key}"]
            assert lo <= hi or (math.isnan(lo) and math.isnan(hi))  # nan: withheld (bootstrap bias)
        assert f"semantic_variance.{tap}.class_between_share.2" in res.intervals
    for tap, mods in res.reliance.items():
        for m in mods:
            assert f"reliance.{tap}.{m}" in res.intervals
    # with at most G images a block is one image: the block weights are the per-image Poisson weights
    assert res.num_images <= blocks_mod.BLOCKS
    none = interpret.run(model, _batches(), metrics=["cka", "semantic_variance", "reliance"], samples_per_image=4,
                         sv_stride=None, replicates=0)
    assert none.intervals == {} and "cka_intervals" not in none.settings
    # the point values do not depend on the blocks (sums in another order: rounding only)
    for p, q in zip(none.cka["pairs"], res.cka["pairs"]):
        assert p["cka"] == pytest.approx(q["cka"], rel=1e-9, abs=1e-12)
    for tap, mods in none.reliance.items():
        assert mods == pytest.approx(res.reliance[tap], rel=1e-9, abs=1e-12)
    for tap, v in none.semantic_variance.items():
        assert v["sv_whitened"] == pytest.approx(res.semantic_variance[tap]["sv_whitened"], rel=1e-9)


def test_block_weights_are_the_per_image_poisson_weights():
    spec = type("S", (), {"rows": "sample"})()
    boot = blocks_mod.BlockBootstrap(50, 8, "cka")
    for first in (0, 4, 8):
        batch = type("B", (), {"weights": poisson_weights(3, range(first, first + 4), 50), "first_image": first,
                               "batch_size": 4, "spec": spec, "index": first // 4})()
        boot.observe(batch)
        assert boot.image_blocks(batch).tolist() == [(first + j) % blocks_mod.BLOCKS for j in range(4)]
    w = boot.weights()
    assert torch.equal(w[:, :12], poisson_weights(3, range(12), 50)) and not w[:, 12:].any()


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")
def test_intervals_withheld_when_blocks_exceed_the_budget(monkeypatch):
    monkeypatch.setattr(blocks_mod, "BLOCK_BUDGET", 1000)
    with pytest.warns(UserWarning, match="cka intervals withheld.*BLOCK_BUDGET"):
        res = interpret.run(Tiny(), _batches(), metrics=["cka"], samples_per_image=4, replicates=20)
    assert "withheld" in res.settings["cka_intervals"] and not res.intervals
    assert res.cka["pairs"]


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")
def test_intervals_withheld_below_min_blocks_images():
    """Four images are four bootstrap units: too few to state an interval; the states hold
    four blocks, not G."""
    res = interpret.run(Tiny(), _batches(n=4), metrics=["cka", "semantic_variance"], samples_per_image=4,
                        sv_stride=None, replicates=50)
    assert not res.intervals
    assert "fewer than MIN_BLOCKS" in res.settings["cka_intervals"]["withheld"]
    assert "fewer than MIN_BLOCKS" in res.settings["semantic_variance_intervals"]["withheld"]
    acc = StreamingCKA(pairs=[("x", "y")], blocks=20)
    x, y = _cka_data(n=12)
    acc.update({"x": x, "y": y}, torch.arange(12) // 4)
    assert acc._self["x"].g.shape[0] == 3  # the three blocks seen, not G = 20


def test_split_half_whitened_form_has_no_chance_term():
    """Label-independent features, 40 channels on 16 images of 4x4 cells (256 cells): Pillai's
    plug-in trace sits at its chance level (about C / N = 0.16); the split-half form near 0."""
    g = _gen(8)
    lab = torch.randint(0, 3, (16, 4, 4), generator=g)
    f = torch.randn(16, 40, 4, 4, generator=g, dtype=torch.float64)
    acc = SemanticVariance(3)
    acc.update(f, lab)
    r = acc.compute()
    assert r.sv_whitened_plugin > 0.1
    assert abs(r.sv_whitened) < 0.03


def test_interval_withheld_when_the_bootstrap_bias_is_large():
    reps = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)  # mean 0.5, sd 0.29
    assert checked_interval(reps, 0.55, 0.95) == pytest.approx([0.025, 0.975])
    assert all(math.isnan(v) for v in checked_interval(reps, 0.9, 0.95))  # bias 0.4 > 0.5 sd


@pytest.mark.filterwarnings("ignore:semantic variance computed on only")
def test_wide_taps_keep_trace_intervals_when_whitened_blocks_exceed_the_budget(monkeypatch):
    """A budget that holds the per-class sums in 10 blocks but not the C x C moments: the trace
    form keeps its intervals, the whitened forms keep their values and say why they have none."""
    monkeypatch.setattr(blocks_mod, "BLOCK_BUDGET", 6000)  # Tiny: 552 B a block without, 1008 B with C x C
    res = interpret.run(Tiny(), _batches(), metrics=["semantic_variance"], sv_stride=None, replicates=50)
    assert "sv_whitened intervals withheld" in res.settings["semantic_variance_intervals"]["sv_whitened"]
    assert res.settings["semantic_variance_intervals"]["blocks"] == 10
    for tap, v in res.semantic_variance.items():
        assert f"semantic_variance.{tap}.sv" in res.intervals
        assert f"semantic_variance.{tap}.sv_whitened" not in res.intervals and math.isfinite(v["sv_whitened_plugin"])
