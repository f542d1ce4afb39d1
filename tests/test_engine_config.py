"""TrainConfig: YAML + CLI precedence, strict keys, type checks, card validation."""

from __future__ import annotations

import json

import pytest

from fusionzoo.engine.config import ConfigError, TrainConfig, load_config, parse_args, write_config


def _yaml(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_defaults_without_arguments():
    cfg, card = parse_args([])
    assert cfg == TrainConfig() and card == {}


def test_cli_overrides_are_typed():
    cfg, _ = parse_args(
        ["--epochs", "3", "--modalities", "rgb,thermal", "--lr=0.01", "--image-size", "32x48",
         "--compile", "--no-progress", "--grad-clip", "none", "--eval-missing", "thermal",
         "--model-kwargs", "{decoder: ppm}", "--amp", "bf16"]
    )
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.modalities == ("rgb", "thermal")
    assert cfg.lr == 0.01
    assert cfg.image_size == (32, 48)
    assert cfg.compile is True and cfg.progress is False
    assert cfg.grad_clip is None
    assert cfg.eval_missing == ("thermal",)
    assert cfg.model_kwargs == {"decoder": "ppm"}
    assert cfg.amp == "bf16"


def test_yaml_then_cli_precedence(tmp_path):
    p = _yaml(tmp_path, "model: cmx_resnet18\nepochs: 5\nbatch_size: 4\ncrop_size: [32, 32]\n"
                        "card:\n  target: 50.1\n  measured: null\n  paper: X\n")
    cfg, card = parse_args(["--config", str(p), "--epochs", "2"])
    assert cfg.model == "cmx_resnet18" and cfg.batch_size == 4 and cfg.epochs == 2
    assert cfg.crop_size == (32, 32)
    assert card == {"target": 50.1, "measured": None, "paper": "X"}


@pytest.mark.parametrize("argv", [["--epoch", "3"], ["--learning-rate", "1"], ["--no-epochs"]])
def test_unknown_cli_key_lists_valid_keys(argv):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    msg = str(e.value)
    assert "unknown configuration key" in msg and "Valid keys:" in msg and "batch_size" in msg


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean epochs"):
        parse_args(["--epoch", "3"])


def test_unknown_yaml_key_names_file(tmp_path):
    p = _yaml(tmp_path, "epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "learning_rate" in str(e.value) and "Valid keys" in str(e.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("epochs: '3'\n", "'epochs' expects int"),
        ("epochs: 2.5\n", "'epochs' expects int"),
        ("lr: fast\n", "'lr' expects float"),
        ("amp: fp8\n", "'amp' must be one of"),
        ("image_size: [32]\n", "'image_size' expects 2 values"),
        ("compile: 1\n", "'compile' expects bool"),
        ("modalities: rgb\n", "'modalities'"),
        ("epochs: 0\n", "'epochs' must be >= 1"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_yaml_type_errors(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(_yaml(tmp_path, text))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--epochs", "three"], "expects an integer"),
        (["--compile", "maybe"], "expects a boolean"),
        (["--epochs"], "--epochs: expected one argument"),
        (["stray"], "unexpected argument"),
        (["--modalities", "rgb,rgb"], "must not repeat"),
        (["--modalities", "rgb,depth", "--eval-missing", "thermal"], "must name modalities"),
        (["--aug-scale", "0.5,1.75"], "crop area fractions"),  # zooming out needs --aug-crop rescale_pad
        (["--aug-crop", "rescale_pad", "--aug-scale", "0,1.5"], "rescale factors"),
        (["--aug-crop", "zoom"], "zoom"),
    ],
)
def test_cli_value_errors(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_args(argv)


def test_rescale_pad_crop_takes_factors_above_one():
    cfg, _ = parse_args(["--aug-crop", "rescale_pad", "--aug-scale", "0.5,1.75"])
    assert cfg.aug_crop == "rescale_pad" and cfg.aug_scale == (0.5, 1.75)


def test_card_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown card key"):
        load_config(_yaml(tmp_path, "card:\n  targt: 3\n"))
    with pytest.raises(ConfigError, match="wrong type"):
        load_config(_yaml(tmp_path, "card:\n  target: high\n"))


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg, _ = parse_args(["--epochs", "2", "--modalities", "rgb", "--tta"])
    write_config(cfg, tmp_path / "config.json", extra={"world_size": 1})
    data = json.loads((tmp_path / "config.json").read_text())
    assert data.pop("_resolved") == {"world_size": 1}
    p = _yaml(tmp_path, json.dumps(data))  # JSON is YAML
    again, _ = load_config(p)
    assert again == cfg


def test_flags_take_either_spelling_and_values_keep_underscores():
    cfg, _ = parse_args(["--eval_missing=thermal", "--modalities", "rgb,thermal", "--run_name", "my_run"])
    assert cfg.eval_missing == ("thermal",) and cfg.run_name == "my_run"
