"""``fusionzoo bench`` and fusionzoo.benchmark: the table's structure, FLOPs and parameters against
hand-computed answers, the exported mode, and one-line errors. Timings are never asserted."""

import json

import pytest
import torch
from torch import nn

import fusionzoo as fz
import fusionzoo.benchmark as fb
from fusionzoo.benchmark import MODES, benchmark, count_flops
from fusionzoo.cli import _parser, main
from fusionzoo.hub import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

FAST = ["--size", "32", "32", "--batch-size", "2", "--warmup", "0", "--min-run-time", "0.01", "--no-progress"]
HEADER = ["mode", "p50 ms (b1)", "p95 ms (b1)", "runs", "images/s (b2)", "peak MiB (b2)", "params M",
          "GFLOPs (b1)", "GMACs (b1)", "status"]


class TwoConv(nn.Module):
    """A fusion model whose FLOPs are known by hand: one 3x3 conv per modality, outputs summed."""

    def __init__(self) -> None:
        super().__init__()
        self.modalities = ("rgb", "depth")
        self.in_chans = {"rgb": 3, "depth": 1}
        self.rgb = nn.Conv2d(3, 4, 3, padding=1)
        self.depth = nn.Conv2d(1, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.rgb(x["rgb"]) + self.depth(x["depth"])


def _table(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def test_flops_known_answer_conv():
    # Conv2d(3 -> 8, 3x3) on 4x4 with padding 1: 8 * 4 * 4 outputs, each 3 * 3 * 3 multiply-adds = 2 FLOPs.
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, torch.zeros(1, 3, 4, 4)) == 2 * 8 * 4 * 4 * 3 * 3 * 3


def test_benchmark_counts_flops_and_params_of_a_fusion_model():
    model = TwoConv()
    h, w = 6, 5
    res = benchmark(model, size=(h, w), batch_size=3, modes=["eager", "channels_last"], warmup=0, min_run_time=0.01)
    # FlopCounterMode counts convolutions (2 per multiply-add; bias and the sum are not counted).
    flops = 2 * h * w * 4 * (3 * 9 + 1 * 9)
    assert res.gflops * 1e9 == pytest.approx(flops, rel=1e-12)
    assert res.gmacs * 2e9 == pytest.approx(flops, rel=1e-12)
    assert res.params_m * 1e6 == 4 * 3 * 9 + 4 + 4 * 9
    assert [r.mode for r in res.rows] == ["eager", "channels_last"]
    for r in res.rows:
        assert r.status == "ok" and r.runs >= 1 and r.p50_ms > 0 and r.p95_ms >= r.p50_ms and r.images_per_s > 0
    table = _table(res.markdown())
    assert table[0][:4] == ["mode", "p50 ms (b1)", "p95 ms (b1)", "runs"] and table[0][4] == "images/s (b3)"
    assert [row[0] for row in table[2:]] == ["eager", "channels_last"]


def test_bf16_unsupported_is_a_skipped_row(monkeypatch):
    monkeypatch.setattr(fb, "bf16_unsupported", lambda device: "no native bf16 here")
    res = benchmark(TwoConv(), size=(4, 4), batch_size=1, modes=["bf16"], warmup=0, min_run_time=0.01)
    (row,) = res.rows
    assert row.status == "skipped: no native bf16 here" and row.p50_ms is None
    assert _table(res.markdown())[2][-1] == "skipped: no native bf16 here"


def test_a_failing_mode_keeps_its_row(capsys):
    class NoNHWC(TwoConv):
        def forward(self, x):
            if x["rgb"].is_contiguous(memory_format=torch.channels_last) and not x["rgb"].is_contiguous():
                raise RuntimeError("this model refuses NHWC")
            return super().forward(x)

    res = benchmark(NoNHWC(), size=(4, 4), batch_size=1, modes=["eager", "channels_last"], warmup=0, min_run_time=0.01)
    assert res.rows[0].status == "ok"
    assert res.rows[1].status == "failed: RuntimeError: this model refuses NHWC"
    assert "channels_last failed" in capsys.readouterr().err


def test_exported_mode_loads_a_pt2(tmp_path):
    model = TwoConv().eval()
    path = tmp_path / "two_conv.pt2"
    x = {"rgb": torch.randn(1, 3, 8, 8), "depth": torch.randn(1, 1, 8, 8)}
    torch.export.save(torch.export.export(model, (x,)), str(path))
    res = benchmark(model, size=(8, 8), batch_size=2, modes=["exported"], exported=path, warmup=0, min_run_time=0.01)
    (row,) = res.rows
    assert row.status == "ok" and row.p50_ms > 0
    # exported at batch 1 with static shapes: batch 2 is refused and the row says so.
    assert row.images_per_s is None and "refused batch 2" in row.note


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "early_concat_resnet18", *FAST, "--modes", "eager,bf16,channels_last", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = _table(printed)
    assert table[0] == HEADER
    assert [row[0] for row in table[2:]] == ["eager", "bf16", "channels_last"]
    assert all(row[-1] == "ok" or row[-1].startswith("skipped: ") for row in table[2:])
    data = json.loads(out.read_text())
    assert data["model"] == "early_concat_resnet18" and data["size"] == [32, 32] and data["batch_size"] == 2
    assert [r["mode"] for r in data["rows"]] == ["eager", "bf16", "channels_last"]
    assert data["gflops"] > 0 and data["gmacs"] == pytest.approx(data["gflops"] / 2)
    assert table[2][7] == f"{data['gflops']:.2f}" and table[2][6] == f"{data['params_m']:.2f}"


def test_cli_save_pretrained_and_run_folder(tmp_path, capsys):
    run = tmp_path / "run"  # a run folder: train.py writes its weights to run/best/
    save_pretrained(fz.create_model("early_concat_resnet18", pretrained=False, num_classes=3), run / "best")
    for target in (run / "best", run):
        assert main(["bench", str(target), *FAST, "--modes", "eager"]) == 0
        assert capsys.readouterr().out.startswith("early_concat_resnet18 at 32x32")


def test_default_modes_are_library_modes():
    defaults = _parser().parse_args(["bench", "x"]).modes.split(",")
    assert set(defaults) <= set(MODES) and "exported" not in defaults


@pytest.mark.parametrize("argv, says", [
    (["--modes", "eager,fast"], "unknown mode 'fast'"),
    (["--modes", "eager,eager"], "names a mode twice"),
    (["--modes", "exported"], "no --exported"),
    (["--exported", "no_such.pt2"], "no_such.pt2: no such file"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--min-run-time", "0"], "--min-run-time 0"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flags_one_line(argv, says, capsys):
    assert main(["bench", "early_concat_resnet18", *FAST, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and err.startswith("fusionzoo: error: bench:")


def test_bad_model_one_line(tmp_path, capsys):
    assert main(["bench", "no_such_model", *FAST]) == 2
    assert main(["bench", str(tmp_path), *FAST]) == 2  # a folder without weights
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no_such_model" in err[0] and "no trained weights" in err[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_one_line(capsys):
    assert main(["bench", "early_concat_resnet18", *FAST, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_mode_reports_compile_time():
    res = benchmark(TwoConv(), size=(8, 8), batch_size=2, modes=["compile"], warmup=0, min_run_time=0.01)
    (row,) = res.rows
    assert row.status == "ok" and row.compile_s > 0
    assert "compile (first call)" in res.markdown()


@pytest.mark.skipif(fb.cpu_peak_supported() is not None, reason="CPU peak memory needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_known_allocation():
    class Allocates(TwoConv):
        def forward(self, x):
            # 8 x 8 MiB of float32 written (so resident) and alive together, freed at return. After the
            # first call glibc serves 8 MiB blocks from its heap and keeps them when freed: without
            # malloc_trim before the measurement only ~16 MiB would show.
            parts = [torch.ones(2 * 2**20) for _ in range(8)]
            return super().forward(x) + sum(p.sum() for p in parts)

    res = benchmark(Allocates(), size=(4, 4), batch_size=1, modes=["eager", "eager"], warmup=1, min_run_time=0.01)
    for row in res.rows:  # the second eager row runs after the first freed its pages: still counted
        assert 63 <= row.peak_mib <= 64 + 48
