"""DFormer published entries against the authors' code: golden outputs of their network (computed
by tools/parity/dformer.py from their repository, reduced to DFormer-Tiny with the Ham decoder at
64x96, 3 classes), their state dict converted into ours, their parameter counts of DFormer-T/S/B/L
at 40 classes, and the NMF's bases (the one random part of the network)."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import DropPath

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published.dformer import NMF2D
from fusionzoo.models.published.parity import (
    eval_and_train_outputs,
    fill_state_dict,
    fixture_model,
    max_abs_diff,
    read_fixture,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from seeded import RTOL_FLOOR, assert_parity, to_float64

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "dformer"
# Issue 22: the fixture is float64 and ours runs in float64; each output's relative error is bounded
# by seeded.tolerance of how far the authors' own float32 run moved it (fixture "float32_drift").
# One image against its batch, ours alone in float32 (batched kernels may sum in another order).
BATCH_TOLERANCE = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return read_fixture(FIXTURE)


@pytest.fixture(scope="module")
def converted(fixture: dict) -> torch.nn.Module:
    return fixture_model(fixture)


def test_fixture_names_the_entries_commit(fixture: dict) -> None:
    entry = fz.model_entry(fixture["model"])
    assert entry.published and entry.reference_commit == fixture["reference_commit"]


def test_eval_and_train_outputs_equal_the_authors(fixture: dict, converted: torch.nn.Module) -> None:
    """Both networks start the NMF from the same bases: torch.manual_seed(seed_nmf) before each
    forward. Train mode: BatchNorm on batch statistics, 6 NMF steps; drop path and dropout off."""
    model = copy.deepcopy(converted).double()
    inputs = to_float64(seeded_inputs(fixture["inputs"], fixture["seed_inputs"]))
    outputs = eval_and_train_outputs(model, model, inputs, seed=fixture["seed_forward"])
    golden = load_file(FIXTURE / "outputs.safetensors")
    assert set(golden) == {"eval_logits", "train_logits", "train_grad_rgb", "train_grad_depth"}
    assert_parity(outputs, golden, fixture["float32_drift"])


def test_wrong_checkpoint_names_the_first_key(fixture: dict, converted: torch.nn.Module) -> None:
    authors = fill_state_dict(fixture["authors_state_dict"], 0)
    authors["aux_head.conv_seg.weight"] = torch.zeros(3, 32, 1, 1)  # a run with C.aux_rate > 0
    with pytest.raises(fz.ConversionError, match="aux_head.conv_seg.weight"):
        convert_state_dict(fixture["model"], authors, converted)


# Built on the meta device (no memory, no init): 0.1-0.3 s each on an idle CPU.
@pytest.mark.parametrize("variant", ["tiny", "small", "base", "large"])
def test_parameter_count_equals_the_authors(fixture: dict, variant: str) -> None:
    name = f"dformer_{variant}"
    with torch.device("meta"):
        model = fz.create_model(name, num_classes=40)
    assert sum(p.numel() for p in model.parameters()) == fixture["authors_param_counts_40_classes"][name]


def test_full_size_variants_were_equal_to_the_authors(fixture: dict) -> None:
    """Small, Base and Large at 40 classes, compared by tools/parity/dformer.py against their code
    in float64 (too large to rerun here; the recorded relative errors must be float64 rounding)."""
    errors = fixture["full_size_40_classes_float64_relative_errors"]
    assert set(errors) == {"dformer_small", "dformer_base", "dformer_large"}
    assert all(set(variant) == {"eval_logits", "train_logits", "train_grad_rgb", "train_grad_depth"} for variant in errors.values())
    assert all(e <= RTOL_FLOOR for variant in errors.values() for e in variant.values()), errors


def test_drop_path_schedule_equals_the_authors(fixture: dict) -> None:
    with torch.device("meta"):
        model = fz.create_model("dformer_large")  # 0.15, as their NYUDepthv2 config
    ours = [[float(getattr(b.drop_path, "drop_prob", 0.0)) for b in stage] for stage in model.encoder.stages]
    theirs = fixture["authors_drop_path_large"]
    assert [len(s) for s in ours] == [len(s) for s in theirs]
    assert all(abs(a - b) < 1e-7 for s, t in zip(ours, theirs) for a, b in zip(s, t))
    assert isinstance(model.encoder.stages[3][1].drop_path, DropPath)


def test_convert_checkpoint_file_then_from_pretrained(fixture: dict, tmp_path: Path) -> None:
    """An authors'-format file (their Engine.save_checkpoint: model, optimizer, epoch, iteration) -> a
    from_pretrained folder whose model gives the authors' eval outputs (their NMF draw, seeded)."""
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    optimizer = {"state": {}, "param_groups": [{"lr": 6e-5, "params": [0]}]}
    torch.save({"model": authors, "optimizer": optimizer, "epoch": 500, "iteration": 50000}, tmp_path / "epoch-last.pth")
    out = fz.convert_checkpoint(fixture["model"], tmp_path / "epoch-last.pth", tmp_path / "converted")
    model = fz.from_pretrained(out).double()  # num_classes read from the classifier: 3
    model.decoder.ham.eval_seed = None  # the authors' per-call draw, from the seeded global generator
    golden = load_file(FIXTURE / "outputs.safetensors")
    with torch.no_grad():
        torch.manual_seed(fixture["seed_forward"])
        logits = model(to_float64(seeded_inputs(fixture["inputs"], fixture["seed_inputs"])))
    assert_parity({"eval_logits": logits}, {"eval_logits": golden["eval_logits"]}, fixture["float32_drift"])


def test_nmf_bases_are_the_authors_draw_and_eval_is_deterministic(fixture: dict, converted: torch.nn.Module) -> None:
    """Training mode draws the authors' bases (torch.rand from the global CPU generator); seeded
    evaluation (the default) gives every image the bases that draw gives after manual_seed(seed),
    so one image's output depends neither on the call nor on its batch."""
    nmf = NMF2D(eval_seed=7)
    like = torch.zeros(())
    torch.manual_seed(7)
    theirs = torch.nn.functional.normalize(torch.rand((1, 16, 64)), dim=1)
    assert torch.equal(nmf.eval().initial_bases(3, 16, like), theirs.expand(3, -1, -1))
    torch.manual_seed(7)
    assert torch.equal(nmf.train().initial_bases(1, 16, like), theirs)

    model = converted.eval()
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    model.decoder.ham.eval_seed = 0
    try:
        with torch.no_grad():
            batch = model(inputs)
            assert torch.equal(model(inputs), batch)
            one = model({m: x[1:] for m, x in inputs.items()})
        assert max_abs_diff(one, batch[1:]) <= BATCH_TOLERANCE
    finally:
        model.decoder.ham.eval_seed = fixture["config"]["nmf_eval_seed"]


def test_three_channel_depth_and_authors_backbone_file(fixture: dict, converted: torch.nn.Module, tmp_path: Path) -> None:
    """A 3-channel depth (their loader's cv2.merge) uses its first channel, as their backbone; their
    RGB-D ImageNet backbone file (state_dict_ema, backbone.* keys, a classifier) loads into the encoder."""
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    backbone = {k: v for k, v in authors.items() if k.startswith("backbone.")}
    pretrain = {"state_dict_ema": {**backbone, "head.weight": torch.zeros(1000, 256)}, "state_dict": {}}
    torch.save(pretrain, tmp_path / "DFormer_Tiny.pth.tar")
    with pytest.warns(UserWarning, match=r"1 keys .*head\.weight"):
        model = fz.create_model(fixture["model"], **fixture["config"], in_chans={"depth": 3},
                                encoder_weights=str(tmp_path / "DFormer_Tiny.pth.tar"))
    assert all(torch.equal(v, converted.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items()
               if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    model.load_state_dict(converted.state_dict())  # (its BN statistics moved in the train-mode test)
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    three = torch.cat([inputs["depth"], torch.randn_like(inputs["depth"]).expand(-1, 2, -1, -1)], dim=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(1)
        expected = converted.eval()(inputs)
        torch.manual_seed(1)
        assert torch.equal(model.eval()({"rgb": inputs["rgb"], "depth": three}), expected)


def test_taps_missing_depth_and_capture_on_real_tensors(fixture: dict, converted: torch.nn.Module) -> None:
    """What tests/test_models.py checks on light variants, here at one thread (dformer_tiny runs
    there on the meta device only): taps fire once each with their declared shapes, capture
    changes nothing, and a missing depth is the zero-filled input (seeded eval bases)."""
    model = converted.eval()
    model.decoder.ham.eval_seed = 0
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    h, w = inputs["rgb"].shape[-2:]
    info = model.tap_info()
    try:
        with torch.no_grad():
            before = model(inputs)
            with fz.capture(model) as acts:
                during = model(inputs)
            missing = model({"rgb": inputs["rgb"]}, missing=("depth",))
            zero = model({**inputs, "depth": torch.zeros_like(inputs["depth"])})
    finally:
        model.decoder.ham.eval_seed = fixture["config"]["nmf_eval_seed"]
    assert list(acts) == list(info)
    assert all(acts[k].shape[1:] == (t.channels, h // t.reduction, w // t.reduction) for k, t in info.items())
    assert torch.equal(before, during) and torch.equal(missing, zero)
    assert not any(m._forward_hooks for m in model.modules())
