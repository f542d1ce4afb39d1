"""Registry: grammar, strictness, suggestions, filters."""

from __future__ import annotations

import pytest

import fusionzoo as fz
from fusionzoo._registry import NAME_PATTERN, encoder_key, register_model


def test_every_name_follows_the_grammar() -> None:
    for name in fz.list_models():
        entry = fz.model_entry(name)
        assert NAME_PATTERN.match(name), name
        base = name.split(".")[0]
        expected = f"{entry.method}_{encoder_key(entry.encoder)}" if entry.encoder_fixed else entry.method
        assert base == expected, name
        assert entry.paper and entry.task in ("segmentation", "detection")
        assert entry.fusion in ("early", "middle", "late", "hybrid")


def test_list_is_sorted_and_filters_compose() -> None:
    names = fz.list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    late = fz.list_models("*_resnet50", task="segmentation", fusion="late", modalities=("rgb", "thermal"))
    assert late == ["late_gate_resnet50", "late_mean_resnet50", "late_weighted_resnet50"]
    assert fz.list_models("cmx_*", exclude="*_pvt_v2_b2", published=False) == ["cmx_resnet18", "cmx_resnet50"]
    assert fz.list_models("cmx_*", published=True) == [f"cmx_mit_b{k}" for k in range(6)]
    assert set(fz.list_models(fusion=["early", "hybrid"])) == {
        n for n in names if fz.model_entry(n).fusion in ("early", "hybrid")
    }
    three = fz.list_models(modalities=("rgb", "depth", "thermal"))
    assert "crossattn_resnet18" in three and "cmx_resnet18" not in three
    assert fz.list_models(method="esanet", published=False) == ["esanet", "esanet_pvt_v2_b2", "esanet_resnet18", "esanet_resnet50"]
    assert fz.list_models(method="esanet", published=True) == [
        "esanet_r18", "esanet_r18_nbt1d", "esanet_r34", "esanet_r34_nbt1d", "esanet_r50"]
    # `import fusionzoo` registers the detectors too (no extra import that a user could forget)
    detection = fz.list_models(task="detection")
    assert {fz.model_entry(n).fusion for n in detection} == {"early", "middle", "late", "hybrid"}
    assert not set(detection) & set(fz.list_models(task="segmentation"))


def test_bad_filters_raise() -> None:
    with pytest.raises(ValueError, match="fusion must be one of"):
        fz.list_models(fusion="intermediate")
    with pytest.raises(ValueError, match="task must be one of"):
        fz.list_models(task="classification")
    with pytest.raises(ValueError, match="unknown modality 'radar'"):
        fz.list_models(modalities=("rgb", "radar"))


def test_model_entry_metadata() -> None:
    entry = fz.model_entry("cmx_resnet50")
    assert (entry.task, entry.fusion, entry.method, entry.encoder) == ("segmentation", "middle", "cmx", "resnet50")
    assert entry.modalities == ("rgb", "depth") and entry.max_modalities == 2
    assert "CMX" in entry.paper
    assert fz.model_entry("late_mean").encoder_fixed is False


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(KeyError, match=r"cmx_resnet50.*list_models\('cmx\*'\)"):
        fz.create_model("cmx_resnet05")


def test_unknown_kwargs_raise_type_error_naming_the_entry() -> None:
    with pytest.raises(TypeError, match=r"esanet_resnet18\(\) got unexpected keyword argument\(s\) \['num_class'\]"):
        fz.create_model("esanet_resnet18", num_class=3)
    # What makes a method (its fusion operator) is not a user keyword.
    with pytest.raises(TypeError, match="fusion_op"):
        fz.create_model("cmx_resnet18", fusion_op="sum")


def test_duplicate_and_malformed_names_raise() -> None:
    def esanet_resnet18():
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model(task="segmentation", fusion="middle", method="esanet", encoder="resnet18", paper="x")(esanet_resnet18)

    def BadName():
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="grammar"):
        register_model(task="segmentation", fusion="middle", method="BadName", encoder="resnet18", paper="x")(BadName)

    def mymethod_resnet50():
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="must be 'mymethod'"):
        register_model(task="segmentation", fusion="middle", method="mymethod", encoder="resnet18", paper="x")(mymethod_resnet50)
    with pytest.raises(ValueError, match="fusion must be one of"):
        register_model(task="segmentation", fusion="intermediate", method="m", encoder="resnet18", paper="x")


def test_config_values_are_validated() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        fz.create_model("late_mean_resnet18", num_classes=0)
    with pytest.raises(ValueError, match="unknown modality 'radar'"):
        fz.create_model("late_mean_resnet18", modalities=("rgb", "radar"))
    with pytest.raises(ValueError, match="unknown decoder 'unet'"):
        fz.create_model("late_mean_resnet18", decoder="unet")
    with pytest.raises(ValueError, match="in_chans names modality 'thermal'"):
        fz.create_model("late_mean_resnet18", in_chans={"thermal": 3})
