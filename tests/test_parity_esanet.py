"""ESANet (published entries) against the authors' code: golden outputs and parameter counts.

The fixtures come from ``tools/parity/esanet.py --ref <checkout of TUI-NICR/ESANet>``: the
reference network in reduced configurations (3 classes, small decoders, one case per encoder
block type), its state dict filled by the shared rule (``models/published/parity.py``), and its outputs on a seeded 64x64
input in eval and train mode, in float64. Here the same state dict is rebuilt from the key list,
converted with the registered converter and loaded into our entry, run in float64; each output must
agree relative to its largest value within ``seeded.tolerance`` of the reference's recorded float32
drift (issue 22: float32 fixtures did not travel between CPUs; train-mode BatchNorm over the 2x2
map at stride 32 with batch 2 magnifies rounding, and that drift, not a guess, widens its bound).

Cost: about 1-2 s per reduced case on one thread, mostly filling the state dict; the reference fixes
the encoders' widths, so even the reduced cases hold two full ResNets (ResNet-50: 47 M values).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published.parity import read_fixture

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "parity" / "esanet"
REFERENCE = read_fixture(FIXTURES)
pytestmark = pytest.mark.usefixtures("one_thread")  # speed only: the float64 bounds hold at any thread count

_spec = importlib.util.spec_from_file_location("parity_esanet", ROOT / "tools" / "parity" / "esanet.py")
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_outputs_equal_authors(case: str) -> None:
    """Eval output, train output and the three train-mode side outputs (``model.side_logits``)."""
    errors = parity.measure_errors(FIXTURES, cases=[case])
    assert len(errors) == 5
    misses = {k: f"relative error {e:.3g} > {t:.3g}" for k, (e, t) in errors.items() if not e <= t}
    assert not misses, misses


@pytest.mark.parametrize("variant", sorted(REFERENCE["full"]))
def test_full_size_maps_tensor_for_tensor(variant: str) -> None:
    """At the paper's 40 classes: the authors' parameter count, and their whole key/shape list
    converts strictly onto ours (built on the meta device, nothing allocated)."""
    full = REFERENCE["full"][variant]
    name = f"esanet_{variant}"
    with torch.device("meta"):
        model = fz.create_model(name, num_classes=full["num_classes"])
    assert sum(p.numel() for p in model.parameters()) == full["parameters"]
    authors = {k: torch.empty(shape, device="meta") for k, shape in full["keys"].items()}
    assert len(convert_state_dict(name, authors, model)) == len(model.state_dict())


def test_reference_configuration_is_the_papers() -> None:
    # ESANet-R34-NBt1D, the configuration behind 50.3 mIoU on NYUv2: 46.96 M parameters.
    assert REFERENCE["full"]["r34_nbt1d"]["parameters"] == 46_955_840
    assert fz.model_entry("esanet_r34_nbt1d").published
    assert "esanet_r34_nbt1d.nyuv2" in fz.list_pretrained("esanet_*")


def test_clear_errors() -> None:
    with torch.device("meta"):
        model = fz.create_model("esanet_r18", num_classes=3)
        with pytest.raises(ValueError, match=r"divisible by 32.*\(48, 64\).*\(64, 64\)"):
            model({"rgb": torch.empty(1, 3, 48, 64), "depth": torch.empty(1, 1, 48, 64)})
        with pytest.raises(ValueError, match="batch of at least 2"):
            model.train()({"rgb": torch.empty(1, 3, 64, 64), "depth": torch.empty(1, 1, 64, 64)})
        with pytest.raises(ValueError, match="exactly 2 modalities"):
            fz.create_model("esanet_r18", modalities=("rgb", "depth", "thermal"))
        with pytest.raises(fz.encoders.PretrainedWeightsError, match="imagenet_r34_NBt1D"):
            fz.create_model("esanet_r34_nbt1d", pretrained=True)
        model = fz.create_model("esanet_r34_nbt1d", num_classes=40)
    authors = {k: torch.empty(s, device="meta") for k, s in REFERENCE["full"]["r34_nbt1d"]["keys"].items()}
    authors["decoder.aux.weight"] = torch.empty(1, device="meta")
    with pytest.raises(fz.ConversionError, match="'decoder.aux.weight'.*not part of the published network"):
        convert_state_dict("esanet_r34_nbt1d", authors, model)
    del authors["decoder.aux.weight"], authors["decoder.decoder_module_2.side_output.bias"]
    with pytest.raises(fz.ConversionError, match="needs 'decoder.stages.1.side.bias'"):
        convert_state_dict("esanet_r34_nbt1d", authors, model)


def test_released_tag_says_what_to_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FUSIONZOO_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"download nyuv2_r34_NBt1D.tar.gz from https://drive.google.com/uc\?id="
                                                r"1C5-kJv4w3foicEudP3DAjdIXVuzUK7O8, then run `fusionzoo convert "
                                                r"esanet_r34_nbt1d nyuv2_r34_NBt1D.tar.gz --tag nyuv2`"):
        fz.create_model("esanet_r34_nbt1d", pretrained="nyuv2")


def test_authors_imagenet_encoder_file(tmp_path) -> None:
    """``encoder_weights=``: the file of the reference's imagenet_pretraining.py (``encoder.*`` and
    the classifier ``fc.*``) fills both encoders; the depth stem gets the sum over RGB filters."""
    from fusionzoo.models.published.esanet import ESANetResNet

    torch.manual_seed(3)
    encoder = ESANetResNet("r18", "nbt1d", 3).state_dict()
    path = tmp_path / "r18_NBt1D.pth"
    torch.save({"epoch": 1, "state_dict": {**{f"encoder.{k}": v for k, v in encoder.items()},
                                           "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}}, path)
    model = fz.create_model("esanet_r18_nbt1d", num_classes=3, decoder_channels=(16, 16, 16), decoder_blocks=(1, 1, 1),
                            encoder_weights=str(path))
    rgb, depth = model.encoders["rgb"].state_dict(), model.encoders["depth"].state_dict()
    assert all(torch.equal(rgb[k], v) for k, v in encoder.items())
    assert torch.equal(depth["conv1.weight"], encoder["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(depth["layer4.1.bn2.weight"], encoder["layer4.1.bn2.weight"])
    torch.save({"state_dict": {"head.weight": torch.zeros(1)}}, path)
    with pytest.raises(fz.encoders.PretrainedWeightsError, match="'head.weight' is neither encoder"):
        fz.create_model("esanet_r18_nbt1d", num_classes=3, decoder_channels=(16, 16, 16), encoder_weights=str(path))


def test_imagenet_torchvision_weights_map_onto_basicblock_encoders(monkeypatch) -> None:
    """``pretrained=True`` loads timm's ``resnet18.tv_in1k`` (torchvision's ImageNet ResNet, the
    reference's source) key for key; timm's loader is replaced here, so nothing is downloaded."""
    import timm

    torch.manual_seed(5)
    source = timm.create_model("resnet18.tv_in1k", pretrained=False)
    asked = []
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: asked.append((name, pretrained)) or source)
    model = fz.create_model("esanet_r18", num_classes=3, decoder_channels=(16, 16, 16), decoder_blocks=(1, 1, 1),
                            pretrained=True)
    assert asked == [("resnet18.tv_in1k", True)]
    rgb, depth, weights = model.encoders["rgb"].state_dict(), model.encoders["depth"].state_dict(), source.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in rgb.items())
    assert torch.equal(depth["conv1.weight"], weights["conv1.weight"].sum(dim=1, keepdim=True))
