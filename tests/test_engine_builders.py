"""Run-folder policy: unique names, resume rules, comparable runs, modality checks, threads."""

from __future__ import annotations

import json

import pytest

from fusionzoo.engine import builders
from fusionzoo.engine.config import ConfigError, TrainConfig, config_to_dict, write_config
from fusionzoo.engine.distributed import auto_threads


def _finished_run(out, name, cfg: TrainConfig, miou: float, streams):
    run = out / name
    run.mkdir(parents=True)
    (run / "checkpoints").mkdir()
    write_config(cfg, run / "config.json", extra={"modalities": ["rgb", "depth"]})
    (run / "summary.json").write_text(json.dumps({"best_val_miou": miou, "streams": streams}))
    return run


def test_same_second_runs_get_distinct_folders(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path))
    a, b = builders.make_run_dir(cfg), builders.make_run_dir(cfg)
    assert a != b and a.is_dir() and b.is_dir()
    rgb = builders.make_run_dir(TrainConfig(out_dir=str(tmp_path), train_missing=("depth",)))
    assert "-no-depth-" in rgb.name


def test_named_run_folder_is_not_reused(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), run_name="x")
    run = builders.make_run_dir(cfg)
    (run / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already used"):
        builders.make_run_dir(cfg)


def test_resume_keeps_the_run_config_and_refuses_changes(tmp_path):
    saved = TrainConfig(out_dir=str(tmp_path), epochs=7, lr=0.01, threads=1, log_interval=3, kill_after_step=5)
    run = _finished_run(tmp_path, "r", saved, 0.5, ["rgb", "depth"])
    cfg = builders.config_for_resume(TrainConfig(resume=str(run)), run, given={"resume"})
    assert (cfg.epochs, cfg.lr, cfg.threads, cfg.log_interval) == (7, 0.01, 1, 3)
    assert cfg.kill_after_step is None and cfg.resume == str(run)  # per invocation, not inherited
    again = builders.config_for_resume(TrainConfig(resume=str(run), log_interval=50), run, given={"log_interval"})
    assert again.log_interval == 50
    with pytest.raises(ConfigError, match="cannot change lr: run has 0.01, given 0.5"):
        builders.config_for_resume(TrainConfig(resume=str(run), lr=0.5), run, given={"lr"})
    (run / "checkpoints" / "last").mkdir()
    (run / "checkpoints" / "last" / "state.json").write_text("{}")
    assert builders.resume_run_dir(run / "checkpoints" / "last") == run
    with pytest.raises(ConfigError, match="no such folder"):
        builders.resume_run_dir(tmp_path / "elsewhere")


def test_comparable_runs_differ_only_in_streams(tmp_path):
    base = TrainConfig(out_dir=str(tmp_path), threads=2)
    fusion = _finished_run(tmp_path, "fusion", base, 0.8, None)
    _finished_run(tmp_path, "rgb", TrainConfig(out_dir=str(tmp_path), train_missing=("depth",), threads=1), 0.5, None)
    _finished_run(tmp_path, "other_lr", TrainConfig(out_dir=str(tmp_path), train_missing=("depth",), lr=0.1), 0.4, None)
    _finished_run(tmp_path, "same_streams", TrainConfig(out_dir=str(tmp_path), run_name="again"), 0.79, None)
    found = builders.find_comparable_runs(base, fusion)
    assert [(f["streams"], f["best_value"]) for f in found] == [(["rgb"], 0.5)]


def test_modalities_are_checked_against_the_dataset():
    class DS:
        modalities = ("rgb", "depth")

    assert builders.resolve_modalities(TrainConfig(), DS()) == ("rgb", "depth")
    with pytest.raises(ConfigError, match="not provided by dataset"):
        builders.resolve_modalities(TrainConfig(modalities=("rgb", "thermal")), DS())
    with pytest.raises(ConfigError, match="eval_missing names"):
        builders.resolve_modalities(TrainConfig(eval_missing=("thermal",)), DS())
    with pytest.raises(ConfigError, match="leaves none"):
        builders.resolve_modalities(TrainConfig(train_missing=("rgb", "depth")), DS())


def test_unknown_callback_is_rejected():
    with pytest.raises(ConfigError, match="known callbacks"):
        TrainConfig(callbacks=("grad_spy",))
    assert type(builders.build_callbacks(["modality_balance"])[0]).__name__ == "ModalityBalanceCallback"


def test_auto_threads(monkeypatch):
    assert auto_threads(3) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.0, 0.0))
    assert auto_threads() == 2  # background noise does not cost a core
    monkeypatch.setattr("os.getloadavg", lambda: (1.1, 0.0, 0.0))
    assert auto_threads() == 1  # one core busy elsewhere
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert auto_threads() == 1  # two torchrun processes share the two cores
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 0.0, 0.0))
    assert auto_threads() == 1


def test_config_dict_round_trip():
    cfg = TrainConfig(modalities=("rgb",), image_size=(32, 48))
    assert builders.config_from_dict(config_to_dict(cfg)) == cfg


def test_benchmark_split_and_root_are_checked():
    with pytest.raises(ConfigError, match="has no split 'val'.*--val-split"):
        builders.build_datasets(TrainConfig(dataset="llvip", data_root="/nonexistent"))
    with pytest.raises(ConfigError, match="needs --data-root"):
        builders.build_datasets(TrainConfig(dataset="nyuv2", val_split="test"))
