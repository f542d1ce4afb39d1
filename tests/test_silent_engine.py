"""Issue 14, engine and CLI part: nothing silent, no work lost, CLI manners.

One test (or more) per item: 1 NaN loss, 4 resume flags, 6 SIGINT / time checkpoints / resume
message, 8 temp leftovers, 9 lazy CLI, 10 one-line user errors, 11 no empty run folder, 12 path
vs model name, 13 YAML model_kwargs, 14 train.py --help, 17 umask. Item 5 (DDP per-step loss) is
checked in tests/test_train_ddp.py, which already runs torchrun.

Fault tests run train.py as a subprocess (as tests/test_train_resume.py does); the rest call
``train.main`` in-process on a 0.7M-parameter model (early_concat + timm's test_resnet, 32x32).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from process_helpers import train_script
from torch import nn

from fusionzoo.cli import main
from fusionzoo.engine import builders
from fusionzoo.engine.checkpoint import remove_temp_leftovers, save_checkpoint
from fusionzoo.engine.config import ConfigError, TrainConfig, help_text, write_config
from fusionzoo.engine.loop import EpochState, train_one_epoch
from fusionzoo.engine.optim import build_optimizer
from fusionzoo.files import atomic_write_bytes

# Names this issue added are imported inside the tests, so that against the base commit each test
# fails on its own behaviour rather than the whole module on an ImportError.

ROOT = Path(__file__).resolve().parents[1]
# 8 samples / batch 2 = 4 steps per epoch.
TINY = ["--model", "early_concat", "--model-kwargs", "{encoder: test_resnet}", "--image-size", "32,32",
        "--train-samples", "8", "--val-samples", "2", "--batch-size", "2", "--epochs", "2", "--threads", "1",
        "--no-progress", "--no-report", "--callbacks=", "--log-interval", "1"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _subprocess(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd,
                          check=False, **kw)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------
# item 1: a NaN loss stops before the optimizer and leaves BatchNorm statistics clean


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bn(self.conv(torch.cat([x["rgb"], x["depth"]], 1)))


def test_nan_loss_stops_before_optimizer_and_batchnorm_and_names_the_sample():
    from fusionzoo.engine.loop import NonFiniteLossError

    model = _BNNet()
    opt = build_optimizer(model, lr=0.1, weight_decay=0.0)
    depth = torch.rand(2, 1, 8, 8)
    depth[1, 0, :2, :2] = float("nan")  # 4 pixels of one sample
    batch = {"rgb": torch.rand(2, 3, 8, 8), "depth": depth, "mask": torch.zeros(2, 8, 8, dtype=torch.long),
             "meta": [{"id": "kitchen_0001"}, {"id": "kitchen_0002"}]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(model, [batch], opt, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                        state=EpochState(), num_batches=1)
    msg = str(err.value)
    assert "'kitchen_0002' (depth)" in msg and "kitchen_0001" in msg and "before the optimizer step" in msg
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats untouched
    assert not opt.state  # no optimizer step was taken
    model.eval()  # clean inputs still give finite logits
    assert torch.isfinite(model({"rgb": torch.rand(1, 3, 8, 8), "depth": torch.rand(1, 1, 8, 8)})).all()


# ------------------------------------------------------------------------------------------------
# item 4: --resume --epochs N with N equal to the default is not ignored


def _saved_run(tmp_path: Path, **kw) -> Path:
    run = tmp_path / "r"
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "checkpoints" / "last" / "state.json").write_text("{}")
    write_config(TrainConfig(out_dir=str(tmp_path), **kw), run / "config.json", extra={"modalities": ["rgb"]})
    return run


def test_resume_counts_given_flags_even_at_their_default(tmp_path):
    from fusionzoo.engine.config import parse_command_line

    default = TrainConfig().epochs
    run = _saved_run(tmp_path, epochs=default - 1, lr=0.01)
    parsed = parse_command_line(["--resume", str(run), "--epochs", str(default)])  # the default value
    assert "epochs" in parsed.given
    assert builders.config_for_resume(parsed.config, run, parsed.given).epochs == default  # extends, not ignored
    parsed = parse_command_line(["--resume", str(run), "--lr", "0.002"])  # 0.002 is the default
    with pytest.raises(ConfigError, match="cannot change lr: run has 0.01, given 0.002"):
        builders.config_for_resume(parsed.config, run, parsed.given)
    parsed = parse_command_line(["--resume", str(run)])
    assert builders.config_for_resume(parsed.config, run, parsed.given).epochs == default - 1


# ------------------------------------------------------------------------------------------------
# item 6 (resume message) and item 8 (temp leftovers), on the state a kill leaves on disk


def test_resume_without_checkpoint_says_what_is_missing_and_removes_partial_write(tmp_path):
    # What a kill during the first checkpoint write leaves: config.json, and checkpoints/ holding
    # only save_checkpoint's hidden temp folder with a partial file (no last/).
    run = tmp_path / "r"
    write_config(TrainConfig(), run / "config.json")
    partial = run / "checkpoints" / ".last.k2j4x.tmp"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError) as err:
        builders.resume_run_dir(run)
    msg = str(err.value)
    assert "config.json exists but no complete checkpoint" in msg and "state.json is missing" in msg
    assert "removed 1 incomplete temp" in msg and not partial.exists()
    with pytest.raises(ConfigError, match="no such folder"):
        builders.resume_run_dir(tmp_path / "nope")


def test_remove_temp_leftovers_takes_only_our_temporaries(tmp_path):
    (tmp_path / "checkpoints" / ".last.ab12.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".last.ab12.tmp" / ".model.safetensors.x1.tmp").write_text("")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / ".model.safetensors.q9.tmp").write_text("")
    (tmp_path / "best" / "model.safetensors").write_text("keep")
    (tmp_path / "notes.tmp").write_text("keep")  # not hidden: not ours
    removed = remove_temp_leftovers(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        "best/.model.safetensors.q9.tmp", "checkpoints/.last.ab12.tmp"]
    assert (tmp_path / "best" / "model.safetensors").exists() and (tmp_path / "notes.tmp").exists()


# ------------------------------------------------------------------------------------------------
# item 17: run files get the umask's permissions, not mkstemp's 0600


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        save_checkpoint(tmp_path / "last", model=nn.Linear(2, 2))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "last") == 0o755 and _mode(tmp_path / "last" / "model.safetensors") == 0o644


# ------------------------------------------------------------------------------------------------
# items 6 + 4 + 8 + 17 end to end: Ctrl-C in epoch 1 keeps the work; the resume extends the run


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGINT after step 1 (subprocess), then resumed in-process with --epochs 3.

    The costliest part of this file (a subprocess's torch import plus 12 tiny steps; the whole
    file measured 16 s user CPU, 5 s of it collection), shared by four tests; a fault test must
    be a real process receiving a real signal.
    """
    out = tmp_path_factory.mktemp("runs")
    proc = _subprocess([str(ROOT / "train.py"), *TINY, "--out-dir", str(out), "--run-name", "r",
                        "--kill-after-step", "1", "--kill-signal", "SIGINT"], out, preexec_fn=lambda: os.umask(0o022))
    run = out / "r"
    position = json.loads((run / "checkpoints" / "last" / "state.json").read_text())["trainer"]["position"]
    # leftovers of earlier interrupted writes, to be removed by the resume
    (run / "checkpoints" / ".last.zz9.tmp").mkdir()
    (run / "best").mkdir()
    (run / "best" / ".model.safetensors.zz9.tmp").write_bytes(b"x")
    old = os.umask(0o022)
    try:
        summary = train_script().main(["--resume", str(run), "--epochs", "3"])
    finally:
        os.umask(old)
    return proc, position, run, summary


def test_sigint_in_epoch_one_checkpoints_and_exits_130(interrupted):
    proc, position, _, _ = interrupted
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "stopped by SIGINT" in proc.stderr and "--resume" in proc.stderr
    # the flag is read at the next step's loss: that step completes, then last/ is written
    assert (position["epoch"], position["batches_done"], position["global_step"]) == (0, 2, 2)


def test_resume_with_more_epochs_extends_the_run(interrupted, capsys):
    _, _, run, summary = interrupted
    assert summary["epochs"] == 3 and summary["steps"] == 12  # 3 epochs x 4 steps, not the saved 2
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [0, 1, 2]


def test_resume_removed_temp_leftovers(interrupted):
    _, _, run, _ = interrupted
    assert not list(run.rglob(".*.tmp"))


def test_run_files_are_readable_as_the_umask_says(interrupted):
    _, _, run, _ = interrupted
    for name in ("config.json", "summary.json", "best/model.safetensors", "best/config.json",
                 "checkpoints/last/state.json"):
        assert _mode(run / name) == 0o644, name
    assert _mode(run / "checkpoints" / "last") == 0o755


def test_first_checkpoint_by_time(tmp_path):
    assert TrainConfig().checkpoint_minutes == 5.0  # default: a kill loses at most ~5 minutes
    seen = []

    class Probe:
        def on_train_start(self, model):
            pass

        def on_after_backward(self, model, step, epoch):
            state = tmp_path / "t" / "checkpoints" / "last" / "state.json"
            seen.append(json.loads(state.read_text())["trainer"]["position"]["global_step"] if state.exists() else None)

        def on_epoch_end(self, epoch, logs):
            pass

        def state_dict(self):
            return {}

    argv = [*TINY, "--epochs", "1", "--train-samples", "6", "--out-dir", str(tmp_path), "--run-name", "t",
            "--checkpoint-minutes", "1e-9"]
    train_script().main(argv, callbacks=[Probe()])
    assert seen == [None, 1, 2]  # saved after every step (time limit ~0), long before the epoch end


# ------------------------------------------------------------------------------------------------
# items 10 + 11: user errors are one line with status 2, and leave no run folder


def test_train_script_user_error_one_line_exit_2_and_no_folder(tmp_path, monkeypatch, capsys):
    import runpy

    # train.py's own `if __name__ == "__main__"` block, run in-process (a subprocess costs a torch import)
    monkeypatch.setattr(sys, "argv", ["train.py", "--model", "esanet_resnet81", "--out-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'esanet_resnet81'" in lines[0] and "esanet_resnet18" in lines[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


FAILED_STARTS = [
    ["--model", "no_such_model"],
    ["--dataset", "nyuv2", "--data-root", "/nonexistent/nyuv2"],
    ["--model-kwargs", "{no_such_kwarg: 1}"],
]


@pytest.mark.parametrize("argv", FAILED_STARTS)
def test_failed_start_leaves_no_run_folder(tmp_path, argv):
    with pytest.raises(Exception):  # noqa: B017  (before issue 14 these were KeyError/FileNotFoundError/TypeError)
        train_script().main([*TINY, *argv, "--out-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("argv", FAILED_STARTS)
def test_train_user_errors_are_one_line_with_status_2(tmp_path, argv, capsys):
    from fusionzoo.cli import run_command

    train = train_script()
    assert run_command(train.main, [*TINY, *argv, "--out-dir", str(tmp_path)], prog="train.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ")
    with pytest.raises(ConfigError):  # --debug: the exception itself, with its traceback
        run_command(train.main, [*TINY, *argv, "--out-dir", str(tmp_path), "--debug"], prog="train.py")


def test_cli_user_errors_are_one_line(capsys):
    assert main(["list", "--modalities", "rgb,sonar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusionzoo: error: fusionzoo list:") and "sonar" in err[0]
    with pytest.raises(SystemExit) as e:  # argparse: the valid choices, status 2
        main(["list", "--fusion", "mid"])
    assert e.value.code == 2 and "invalid choice: 'mid'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# item 12: a mistyped path is not reported as an unknown model


def test_interpret_tells_a_missing_path_from_a_model_name(tmp_path, capsys):
    (tmp_path / "runs" / "late").mkdir(parents=True)
    assert main(["interpret", str(tmp_path / "runs" / "lat"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "late" in err and "unknown model" not in err
    assert main(["interpret", "cmx_resnet5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither an existing folder nor a registered model" in err and "cmx_resnet50" in err


# ------------------------------------------------------------------------------------------------
# item 13: --model-kwargs is YAML, and the message shows how it was parsed


def test_model_kwargs_yaml_mistakes_are_explained():
    from fusionzoo.engine.config import parse_command_line

    with pytest.raises(ConfigError) as err:
        parse_command_line(["--model-kwargs", "{dropout:0.0}"])
    assert "is YAML" in str(err.value) and "{'dropout:0.0': None}" in str(err.value)
    assert "'{dropout: 0.0}'" in str(err.value)
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_command_line(["--model-kwargs", "dropout=0.1"])
    cfg = TrainConfig(model="late_mean", model_kwargs={"dropuot": 0.1})
    with pytest.raises(ConfigError, match=r"model_kwargs \(YAML, parsed as \{'dropuot': 0.1\}\)"):
        builders.build_model(cfg, ("rgb", "depth"), 3)


# ------------------------------------------------------------------------------------------------
# item 14: train.py --help explains every key and lists Literal choices


def test_train_help_has_descriptions_and_choices():
    text = help_text()
    assert "--optimizer {adamw,sgd}" in text and "--amp {off,bf16,fp16}" in text
    assert "peak learning rate" in text and "--no-compile = false" in text
    flat = "".join(text.split())  # argparse wraps lines, also at hyphens
    for f in dataclasses.fields(TrainConfig):  # every key has its flag and its description
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no description: declare it with _key(default, help)"
        assert f"--{f.name.replace('_', '-')}" in flat and "".join(f.metadata["help"].split()) in flat
    assert "'{dropout:0.1}'" in flat  # the YAML hint of --model-kwargs


# ------------------------------------------------------------------------------------------------
# item 9: `fusionzoo --help` imports no torch


def test_cli_help_imports_no_torch(tmp_path):
    code = ("import sys\nfrom fusionzoo.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    proc = _subprocess(["-c", code], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("NO_TORCH"), proc.stdout + proc.stderr
    assert "interpret" in proc.stdout and "--debug" in proc.stdout


def test_cli_literal_choices_match_the_library():
    from fusionzoo.cli import DEFAULT_LEVEL, DEFAULT_REPLICATES, ROW_RULES
    from fusionzoo.interpret import intervals
    from fusionzoo.interpret.api import ROW_RULES as library

    assert ROW_RULES == library
    assert (DEFAULT_REPLICATES, DEFAULT_LEVEL) == (intervals.DEFAULT_REPLICATES, intervals.DEFAULT_LEVEL)
