"""The ``fusionzoo`` console script: list, interpret (model name and run folder), compare."""

import json

import pytest
import torch

import fusionzoo as fz
from fusionzoo import interpret
from fusionzoo.cli import main
from fusionzoo.data import collate, create_dataset
from fusionzoo.engine.config import TrainConfig, write_config
from fusionzoo.hub import save_pretrained
from fusionzoo.tasks import ConfusionMatrix

TINY = ["--num-samples", "4", "--image-size", "32", "32", "--batch-size", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_list_filters(capsys):
    assert main(["list", "cmx_*"]) == 0
    names = capsys.readouterr().out.split()
    assert names == fz.list_models("cmx_*") and names
    assert main(["list", "--fusion", "late", "--long"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all(" late " in line for line in lines)
    assert main(["list", "no_such_model_*"]) == 1


def test_interpret_model_name(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["interpret", "early_concat_resnet18", "--out", str(out), "--metrics",
                 "cka,semantic_variance,contribution", "--replicates", "30", "--level", "0.9", *TINY]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["model"] == "early_concat_resnet18" and data["num_images"] == 4
    assert data["settings"]["intervals"]["replicates"] == 30 and data["settings"]["intervals"]["level"] == 0.9
    kinds = {p["kind"] for p in data["cka"]["pairs"]}
    assert kinds == {"within", "to_final"}  # one stream (early fusion): stages vs stages and vs decoder.out
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html  # self-contained, static
    assert (out / "semantic_variance.png").is_file() and (out / "contribution.png").is_file()


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--replicates", "-1", "0 or more replicates"), ("--replicates", "many", "whole number"),
    ("--level", "95", "strictly between 0 and 1"), ("--level", "x", "between 0 and 1")])
def test_interval_flags_reject_bad_values_naming_the_flag(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["interpret", "early_concat_resnet18", "--out", str(tmp_path / "rep"), flag, value, *TINY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and expected in err
    assert not (tmp_path / "rep").exists()


def test_interpret_run_folder_uses_run_weights_data_and_history(tmp_path):
    # a run folder as train.py writes it: config.json (training config), best/ (weights),
    # checkpoints/last/state.json (callback states)
    torch.manual_seed(0)
    run = tmp_path / "runs" / "r1"
    cfg = TrainConfig(model="late_mean_resnet18", image_size=(32, 32), val_samples=4)
    run.mkdir(parents=True)
    write_config(cfg, run / "config.json", extra={"modalities": ["rgb", "depth"]})
    val = create_dataset("synthetic_rgbd", split=cfg.val_split, num_samples=4, image_size=(32, 32))
    model = fz.create_model("late_mean_resnet18", num_classes=val.num_classes).eval()
    save_pretrained(model, run / "best", class_names=val.classes)
    history = {"state_key": "modality_balance", "modalities": ["rgb", "depth"], "heads": ["rgb", "depth"], "steps": [],
               "epochs": [{"epoch": e, "grad_norm": {"rgb": 1.0, "depth": 0.5 + e}} for e in range(3)]}
    (run / "checkpoints" / "last").mkdir(parents=True)
    (run / "checkpoints" / "last" / "state.json").write_text(
        json.dumps({"trainer": {"callbacks": {"0:ModalityBalanceCallback": history}}}))
    out = tmp_path / "rep"
    assert main(["interpret", str(run), "--out", str(out), "--metrics", "contribution", "--no-progress",
                 "--batch-size", "2"]) == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["training"]["epochs"][2]["grad_norm"]["depth"] == 2.5
    assert (out / "training.png").is_file()
    # the full-input mIoU equals an independent evaluation of the saved weights on the run's val set
    cm = ConfusionMatrix(val.num_classes)
    with torch.no_grad():
        batch = collate([val[i] for i in range(4)])
        cm.update(model({m: batch[m] for m in model.modalities}).argmax(1), batch["mask"])
    assert data["contribution"]["coalitions"]["rgb+depth"]["miou"] == pytest.approx(cm.compute()["miou"])
    # the library entry point train.py can call at the end of a run
    files = interpret.report_run(run, metrics=["semantic_variance"], batch_size=2)
    assert files["report"] == run / "report" / "report.html" and files["report"].is_file()


def test_compare_reuses_and_builds(tmp_path, capsys):
    first = tmp_path / "a"
    assert main(["interpret", "late_mean_resnet18", "--out", str(first), "--metrics", "cka,contribution", *TINY]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(first), "esanet_resnet18", "--out", str(out), "--metrics", "cka,contribution", *TINY]) == 0
    cmp = json.loads((out / "comparison.json").read_text())
    assert cmp["models"] == ["late_mean_resnet18", "esanet_resnet18"]
    assert cmp["fusion"] == {"late_mean_resnet18": "late", "esanet_resnet18": "middle"}
    assert set(cmp["cka_modality_fused"]["esanet_resnet18"]) == {"stage1", "stage2", "stage3", "stage4"}
    assert cmp["cka_modality_fused"]["late_mean_resnet18"] == {}
    assert (out / "01_esanet_resnet18" / "metrics.json").is_file()
    assert (out / "report.html").is_file() and (out / "cmp_contribution.png").is_file()
    # the markdown tables are printed and written, one summary row per model, class names as columns
    md = (out / "comparison.md").read_text()
    assert md in capsys.readouterr().out
    summary = md.split("### Summary")[1].split("###")[0]
    assert "| late_mean_resnet18 | late |" in summary and "| esanet_resnet18 | middle |" in summary
    per_class = md.split("### Shapley value of class IoU per modality")[1].split("###")[0]
    header = next(line for line in per_class.splitlines() if line.startswith("| model"))
    class_names = json.loads((first / "metrics.json").read_text())["class_names"]
    assert [c.strip() for c in header.strip("| ").split("|")] == ["model", "modality", *class_names]
    assert sum(line.startswith("| esanet_resnet18 | ") for line in per_class.splitlines()) == 2  # rgb, depth


def test_bad_target(tmp_path, capsys):
    # user errors: one line on stderr, exit status 2 (--debug raises them with the traceback)
    assert main(["interpret", str(tmp_path), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "no trained weights" in capsys.readouterr().err
    assert main(["interpret", "no_such_model", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_a_closed_pipe_ends_the_command_quietly():
    # `fusionzoo list --long | head`: the reader goes away mid-output; no BrokenPipeError traceback,
    # status 0 (1 MB overflows the pipe's buffer, so the write meets the closed pipe)
    import subprocess
    import sys

    code = ("import sys; from fusionzoo.cli import run_command; "
            "sys.exit(run_command(lambda argv: print('x' * 1_000_000), [], prog='fusionzoo'))")
    cmd = f"{sys.executable} -c \"{code}\" | head -c 10"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0 and out.stdout == "x" * 10 and "Traceback" not in out.stderr, out.stderr
