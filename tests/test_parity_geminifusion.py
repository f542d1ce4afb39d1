"""GeminiFusion published entries against the authors' code: golden outputs of their network
(computed by tools/parity/geminifusion.py from their repository, reduced to MiT-B0 at 64x64, 3
classes), their state dict converted into ours, and their parameter counts of WeTr on
MiT-B0..B5 at 40 (NYUDv2) and 37 (SUN RGB-D) classes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published.parity import fill_state_dict, read_fixture, seeded_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "parity"))
from seeded import assert_parity, to_float64

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "geminifusion"
_TOOL = Path(__file__).resolve().parents[1] / "tools" / "parity" / "geminifusion.py"
_spec = importlib.util.spec_from_file_location("parity_geminifusion", _TOOL)
_tool = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_tool)  # type: ignore[union-attr]  (imports the authors' code only when asked)
parity_check = _tool.check
# Issue 22: the fixture is float64 and ours runs in float64; each output's relative error is bounded
# by seeded.tolerance of how far the authors' own float32 run moved it (fixture "float32_drift").
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return read_fixture(FIXTURE)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "outputs.safetensors")


@pytest.fixture(scope="module")
def converted(fixture: dict) -> torch.nn.Module:
    return _tool.converted(fixture)


def test_fixture_names_the_entries_commit(fixture: dict) -> None:
    for variant in ("b0", "b3", "b5"):
        entry = fz.model_entry(f"geminifusion_mit_{variant}")
        assert entry.published and (entry.reference_repo, entry.reference_commit) == (fixture["reference_repo"], fixture["reference_commit"])


def test_eval_and_train_outputs_equal_the_authors() -> None:
    """Eval, then train mode (BatchNorm on batch statistics; drop path and dropout off): the
    ensemble (our output, and at stride 4) and the per-modality logits; in train mode the
    gradients of a loss over all three outputs (as theirs) w.r.t. both inputs and alpha."""
    errors = parity_check(FIXTURE)  # tools/parity/geminifusion.py --check: float64, relative errors and bounds
    assert len(errors) == 11
    misses = {k: f"relative error {e:.3g} > {t:.3g}" for k, (e, t) in errors.items() if not e <= t}
    assert not misses, misses


def test_wrong_checkpoint_names_the_first_key(fixture: dict, converted: torch.nn.Module) -> None:
    authors = fill_state_dict(fixture["authors_state_dict"], 0)
    authors["encoder.block1.0.attn.norm.ln_2.weight"] = torch.zeros(32)  # a third modality's norm
    with pytest.raises(fz.ConversionError, match="ln_2"):
        convert_state_dict(fixture["model"], authors, converted)


# Built on the meta device (no memory, no init).
@pytest.mark.parametrize("variant", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_parameter_count_equals_the_authors(fixture: dict, variant: str) -> None:
    name = f"geminifusion_mit_{variant}"
    for tag, classes in (("nyuv2", 40), ("sunrgbd", 37)):
        with torch.device("meta"):
            model = fz.create_model(name, num_classes=classes)
        assert sum(p.numel() for p in model.parameters()) == fixture["authors_param_counts"][tag][name], tag


def test_convert_checkpoint_file_then_from_pretrained(fixture: dict, golden: dict, tmp_path: Path) -> None:
    """An authors'-format file (their main.py's Saver: ``segmenter`` with DDP's ``module.``
    prefix, plus epoch and best_val) -> a from_pretrained folder giving the authors' eval output."""
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    segmenter = {f"module.{k}": v for k, v in authors.items()}
    torch.save({"segmenter": segmenter, "epoch_start": 300, "best_val": 0.5}, tmp_path / "mit-b0.pth.tar")
    out = fz.convert_checkpoint(fixture["model"], tmp_path / "mit-b0.pth.tar", tmp_path / "converted",
                                modalities=tuple(fixture["config"]["modalities"]))
    model = fz.from_pretrained(out).double()  # num_classes read from the classifier: 3
    with torch.no_grad():
        logits = model(to_float64(seeded_inputs(fixture["inputs"], fixture["seed_inputs"])))
    assert_parity({"eval_logits": logits}, {"eval_logits": golden["eval_logits"]}, fixture["float32_drift"])


def test_one_channel_depth_is_the_authors_tiled_depth(fixture: dict, converted: torch.nn.Module) -> None:
    """Their loader tiles gray depth to 3 channels: a 1-channel depth repeated in the model equals a
    3-channel model fed the tiled copy; only the norms are per modality."""
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    assert converted.in_chans == {"rgb": 3, "depth": 1}
    with torch.device("meta"):
        three = fz.create_model(fixture["model"], **fixture["config"], in_chans={"depth": 3})
    three.load_state_dict(converted.state_dict(), assign=True)
    with torch.no_grad():
        tiled = {"rgb": inputs["rgb"], "depth": inputs["depth"].expand(-1, 3, -1, -1)}
        assert torch.equal(converted.eval()(inputs), three.eval()(tiled))
    own = {n for n, _ in converted.named_parameters()}
    rgb_only = {n for n, p in converted.named_parameters() if any(p is q for q in converted.modality_parameters("rgb"))}
    assert rgb_only and all(".rgb." in n for n in rgb_only) and rgb_only < own


def test_imagenet_mit_init_fills_the_shared_backbone(fixture: dict, converted: torch.nn.Module, tmp_path: Path) -> None:
    """SegFormer's ImageNet MiT file (keys as the authors' minus ModuleParallel / LayerNormParallel
    wrappers) -> shared weights and every modality's norms, as their expand_state_dict."""
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    fusion = (".cross_attn_", ".relation_judger.", "_noise.", ".ln_1.")
    mit = {k.removeprefix("encoder.").replace(".module.", ".").replace(".ln_0.", "."): v
           for k, v in authors.items() if k.startswith("encoder.") and not any(f in k for f in fusion)}
    mit["head.weight"] = torch.zeros(1000, 256)  # the ImageNet classifier: dropped
    torch.save(mit, tmp_path / "mit_b0.pth")
    mapped = convert_state_dict(fixture["model"], authors, converted)
    model = fz.create_model(fixture["model"], **fixture["config"], mit_weights=str(tmp_path / "mit_b0.pth"))
    own = model.state_dict()
    for key, value in mapped.items():
        if key.startswith("stages.") and ".gemini." not in key and ".depth." not in key:
            assert torch.equal(own[key], value), key
            assert torch.equal(own[key.replace(".rgb.", ".depth.")], value), key
