"""timm encoders: stages by stride, channels from feature_info, clear errors, offline weights."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch

import fusionzoo as fz
from fusionzoo.encoders import Encoder


@pytest.mark.parametrize("name", ["resnet18", "pvt_v2_b0", "convnext_atto", "mobilenetv3_small_050"])
def test_stages_match_timm_feature_info(name: str) -> None:
    enc = Encoder(name, in_chans=1)
    info = timm.create_model(name, features_only=True).feature_info
    by_stride = {r: c for r, c in zip(info.reduction(), info.channels())}
    assert enc.reductions == [4, 8, 16, 32]
    assert enc.channels == [by_stride[r] for r in (4, 8, 16, 32)]
    x = torch.randn(1, 1, 64, 64)
    whole = enc(x)
    assert [f.shape[1] for f in whole] == enc.channels
    assert [f.shape[-1] for f in whole] == [64 // r for r in enc.reductions]
    if name.startswith("mobilenetv3"):  # timm builds it as a feature class, not a module sequence
        assert not enc.stagewise
        with pytest.raises(RuntimeError, match="cannot run stage by stage"):
            enc.forward_stage(0, x)
        return
    assert enc.stagewise
    enc.eval()  # stage by stage gives the same features as the whole pass
    assert all(torch.equal(a, b) for a, b in zip(enc(x), _run_stages(enc, x)))


def _run_stages(enc: Encoder, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for k in range(enc.num_stages):
        x = enc.forward_stage(k, x)
        out.append(x)
    return out


def test_non_stagewise_encoder_works_without_feedback_and_refuses_feedback() -> None:
    model = fz.create_model("crossattn", encoder="mobilenetv3_small_050", num_classes=3).eval()
    with torch.no_grad():
        assert model({"rgb": torch.randn(1, 3, 64, 64), "depth": torch.randn(1, 1, 64, 64)}).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="feeds fused features back.*mobilenetv3_small_050"):
        fz.create_model("esanet", encoder="mobilenetv3_small_050")


def test_stem_stage_when_available() -> None:
    enc = Encoder("resnet18", with_stem=True)
    assert enc.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"] and enc.reductions[0] == 2
    pvt = Encoder("pvt_v2_b0", with_stem=True)
    assert pvt.stage_names == ["stage1", "stage2", "stage3", "stage4"] and not pvt.has_stem


def test_missing_stride_lists_available_strides() -> None:
    # A ViT has a single stride-16 feature map.
    with pytest.raises(ValueError, match=r"has feature strides \[16, 16, 16\].*missing \[4, 8, 32\]"):
        Encoder("vit_tiny_patch16_224", reductions=(4, 8, 16, 32))


def test_unknown_encoder_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="timm has no encoder 'resnet19'"):
        fz.create_model("late_mean", encoder="resnet19")


def test_pretrained_offline_without_cache_fails_fast_and_names_the_weights(tmp_path, monkeypatch) -> None:
    # An empty Hub cache and torch hub folder, offline, in this process: the Hub reads its cache
    # folder and offline flag at each download (a weights file put in that folder is what it reads).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(fz.PretrainedWeightsError) as err:
        fz.create_model("early_concat_resnet18", pretrained=True)
    assert "resnet18" in str(err.value) and "pretrained=False" in str(err.value)


def test_mean_rule_for_one_channel_first_conv() -> None:
    from fusionzoo.encoders import average_mono_first_conv

    body = timm.create_model("resnet18", features_only=True, in_chans=1)
    before = body.conv1.weight.detach().clone()
    conv = average_mono_first_conv(body)
    assert conv is body.conv1
    assert torch.allclose(body.conv1.weight, before / 3)
    with pytest.raises(ValueError, match="mono_init"):
        Encoder("resnet18", mono_init="median")
