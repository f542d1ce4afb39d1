"""Speed, memory, parameters and FLOPs of one model, in several execution modes (``fusionzoo bench``).

What each number is:

- **latency p50 / p95** (ms, batch 1): ``torch.utils.benchmark.Timer.blocked_autorange`` after
  ``warmup`` untimed calls. The Timer runs the call in blocks (as many calls per block as fit
  its block time; one call per block for a model slower than that); p50 and p95 are quantiles
  over the blocks' mean call times, and ``runs`` is how many blocks they rest on. On CUDA every
  timed call ends with ``torch.cuda.synchronize()`` so the time covers the kernels, not their
  launch.
- **images/s** at batch N: N divided by the median call time of one batch-N forward, timed the
  same way.
- **peak memory** (MiB) of one batch-N forward above what was held before it. CUDA:
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, the
  caching allocator's reserve not counted). CPU (Linux): the process's resident high-water mark
  (``VmHWM`` in ``/proc/self/status``), reset to the current resident size by writing ``5`` to
  ``/proc/self/clear_refs`` before the forward, minus the resident size then: everything the
  forward touched (tensors, oneDNN scratch, allocator caches), not tensors alone. glibc's
  ``malloc_trim(0)`` runs first, so pages freed by earlier calls are not silently reused. Where
  ``clear_refs`` cannot be written the column is empty and the result says why.
- **params** (M): ``sum(p.numel())`` of the module as given.
- **GFLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one batch-1 forward in float32,
  counting a multiply-add as 2 FLOPs. Many papers' "FLOPs" (fvcore, thop, mmcv's
  ``get_model_complexity_info``) count multiply-adds, i.e. half of this; ``gmacs`` gives that number.
  Operators without a FLOP formula in torch (e.g. pooling, normalisation, elementwise) count 0.

Modes: ``eager`` (the model as given), ``channels_last`` (model and inputs in NHWC),
``compile`` (``torch.compile``; the first call's wall time, compilation included, is
``compile_s``), ``bf16`` (``torch.autocast`` to bfloat16; on CPU only where oneDNN reports
native bf16 support, since emulated bf16 is slower than float32 and would mislead; otherwise a
"skipped" row says why) and ``exported`` (a ``torch.export`` ``.pt2`` file loaded with
``torch.export.load``, called like the model). A mode that fails keeps its row with
``status = "failed: <error>"``; nothing is left out silently.
"""

from __future__ import annotations

import copy
import ctypes
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MODES", "BenchResult", "BenchRow", "benchmark", "count_flops", "example_inputs", "markdown_table"]

MODES = ("eager", "channels_last", "compile", "bf16", "exported")

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
try:  # glibc's malloc_trim (Linux); None elsewhere
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None


@dataclass
class BenchRow:
    """One execution mode's measurements (None where not measured; ``status`` says why)."""

    mode: str
    status: str = "ok"  # "ok", "skipped: <why>" or "failed: <error>"
    p50_ms: float | None = None
    p95_ms: float | None = None
    runs: int | None = None  # timed blocks behind p50 / p95
    images_per_s: float | None = None
    peak_mib: float | None = None
    compile_s: float | None = None
    note: str = ""


@dataclass
class BenchResult:
    """A model's benchmark: settings, size numbers shared by all modes, and one row per mode."""

    model: str
    size: tuple[int, int]
    batch_size: int
    device: str
    machine: str
    threads: int
    torch_version: str
    params_m: float
    gflops: float
    gmacs: float
    memory: str  # how peak memory was measured (or why it was not)
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``rows`` as a list of dicts)."""
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    def markdown(self) -> str:
        """The table :func:`markdown_table` prints for this result."""
        return markdown_table(self)


def example_inputs(model: nn.Module, batch_size: int, size: tuple[int, int],
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random inputs ``{modality: (B, in_chans[m], H, W)}`` for a fusionzoo model.

    Raises:
        ValueError: the model does not say its modalities and channels (``modalities``, ``in_chans``).
    """
    modalities = getattr(model, "modalities", None)
    in_chans = getattr(model, "in_chans", None)
    if not modalities or not isinstance(in_chans, Mapping):
        raise ValueError(f"{type(model).__name__} has no 'modalities' / 'in_chans' attributes; "
                         "benchmark takes fusionzoo models (create_model / from_pretrained)")
    gen = torch.Generator().manual_seed(0)
    return {m: torch.randn(batch_size, in_chans[m], *size, generator=gen).to(device) for m in modalities}


def count_flops(model: nn.Module | Callable[..., Any], inputs: Any) -> int:
    """FLOPs of one ``model(inputs)`` call under ``torch.no_grad`` (a multiply-add counts 2).

    Example:
        >>> count_flops(nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.zeros(1, 3, 4, 4))
        6912
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(inputs)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, min_run_time: float) -> tuple[float, float, int]:
    """(p50, p95, blocks) of ``fn`` in seconds per call, from ``Timer.blocked_autorange``."""
    def call() -> None:
        fn()
        _sync(device)  # torch's Timer also syncs CUDA; explicit so a custom device type is covered too

    m = Timer(stmt="call()", globals={"call": call}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    return statistics.median(times), _quantile(times, 0.95), len(times)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _rss_kib(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{_STATUS} has no {key}")


def cpu_peak_supported() -> str | None:
    """None when the CPU peak-RSS measurement works here, else why not."""
    try:
        _CLEAR_REFS.write_text("5")
        _rss_kib("VmHWM")
    except OSError as e:
        return f"CPU peak memory needs Linux's /proc/self/clear_refs and VmHWM ({e})"
    return None


def _peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Memory one ``fn()`` call takes above what was held before it (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if _LIBC is not None:
        # Hand freed heap pages back to the OS first: otherwise the forward reuses pages an earlier
        # call left resident and the high-water mark does not move (glibc keeps freed memory).
        _LIBC.malloc_trim(0)
    _CLEAR_REFS.write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
    before = _rss_kib("VmRSS")
    fn()
    return max(_rss_kib("VmHWM") - before, 0) / 1024


def bf16_unsupported(device: torch.device) -> str | None:
    """None when bf16 autocast runs natively on ``device``, else why the bf16 mode is skipped."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type == "cpu":
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return "this CPU has no native bf16 (oneDNN reports no avx512_bf16/AMX); emulated bf16 would be slower than float32"
    return f"bf16 autocast is not measured on device type {device.type!r}"


def machine_name(device: torch.device) -> str:
    """The device in words: GPU name, or CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s)"


def _prepare(mode: str, model: nn.Module, device: torch.device, exported: str | Path | None,
             ) -> tuple[Callable[[dict[str, torch.Tensor]], Any], Callable[[dict[str, torch.Tensor]], dict]]:
    """(callable, input converter) for one mode; raises on an unusable mode."""
    same = dict  # inputs unchanged (a shallow copy)
    if mode == "eager":
        return model, same
    if mode == "channels_last":
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return cl, lambda x: {k: v.contiguous(memory_format=torch.channels_last) for k, v in x.items()}
    if mode == "compile":
        # dynamic=False: one specialised graph per input shape (batch 1, batch N), as a deployment
        # at a fixed size runs; automatic dynamic shapes would time a slower shape-generic graph.
        return torch.compile(copy.deepcopy(model), dynamic=False), same
    if mode == "bf16":
        def autocast_call(x: dict[str, torch.Tensor]) -> Any:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(x)
        return autocast_call, same
    if mode == "exported":
        if exported is None:
            raise ValueError("mode 'exported' needs the exported file (--exported FILE.pt2)")
        return torch.export.load(str(exported)).module().to(device), same
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def _measure_mode(mode: str, model: nn.Module, batch1: dict, batchn: dict, device: torch.device, *,
                  warmup: int, min_run_time: float, exported: str | Path | None, memory: bool,
                  progress: Callable[[str], None]) -> BenchRow:
    row = BenchRow(mode)
    if mode == "bf16":
        why = bf16_unsupported(device)
        if why:
            row.status = f"skipped: {why}"
            return row
    fn, convert = _prepare(mode, model, device, exported)
    x1, xn = convert(batch1), convert(batchn)
    with torch.inference_mode() if mode != "compile" else torch.no_grad():
        t0 = time.perf_counter()
        fn(x1)  # first call: compiles under torch.compile
        _sync(device)
        if mode == "compile":
            row.compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            fn(x1)
        progress(f"{mode}: latency at batch 1")
        p50, p95, row.runs = _time(lambda: fn(x1), device, min_run_time)
        row.p50_ms, row.p95_ms = 1e3 * p50, 1e3 * p95
        progress(f"{mode}: throughput at batch {len(next(iter(xn.values())))}")
        try:
            t0 = time.perf_counter()
            fn(xn)  # first call at batch N: compiles its own graph under torch.compile; a static export may refuse it
            _sync(device)
            if mode == "compile":
                row.compile_s += time.perf_counter() - t0
        except Exception as e:  # recorded in the row, not swallowed
            if mode != "exported":
                raise
            row.note = f"throughput not measured: the exported graph refused batch {len(next(iter(xn.values())))} ({type(e).__name__})"
            return row
        for _ in range(warmup):
            fn(xn)
        med, _, _ = _time(lambda: fn(xn), device, min_run_time)
        row.images_per_s = len(next(iter(xn.values()))) / med
        if memory:
            row.peak_mib = _peak_mib(lambda: fn(xn), device)
    return row


def benchmark(model: nn.Module, *, name: str | None = None, size: tuple[int, int] = (480, 640), batch_size: int = 8,
              modes: Sequence[str] = ("eager", "channels_last", "compile", "bf16"), device: str | torch.device = "cpu",
              warmup: int = 3, min_run_time: float = 2.0, exported: str | Path | None = None,
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure a fusionzoo model in each mode (see the module docstring for what each number is).

    Args:
        model: a fusionzoo model (it has ``modalities`` and ``in_chans``); put in eval mode.
        name: label of the result (default: ``model.config["name"]``, else the class name).
        size: input (H, W).
        batch_size: batch of the throughput and peak-memory measurements.
        modes: subset of :data:`MODES`, measured in this order.
        device: where to run.
        warmup: untimed calls before each timing.
        min_run_time: seconds each timing runs at least (``blocked_autorange``).
        exported: a ``torch.export`` ``.pt2`` file, for the ``exported`` mode.
        progress: called with a short line before each step (e.g. ``print``).

    Returns:
        The result; a mode that raised has ``status = "failed: <ExcType: message>"``.

    Raises:
        ValueError: an unknown mode, ``exported`` without a file, a non-positive size, batch or
            run time.

    Example:
        >>> res = benchmark(fz.create_model("cmx_mit_b0"), size=(480, 640), modes=["eager"])
        >>> print(res.markdown())
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if "exported" in modes and exported is None:
        raise ValueError("mode 'exported' needs the exported file (--exported FILE.pt2)")
    if min(size) < 1 or batch_size < 1 or min_run_time <= 0 or warmup < 0:
        raise ValueError(f"size {tuple(size)} and batch size {batch_size} must be positive, min_run_time "
                         f"{min_run_time} > 0 and warmup {warmup} >= 0")
    device = torch.device(device)
    progress = progress or (lambda text: None)
    model = model.eval().to(device)
    label = name or (getattr(model, "config", None) or {}).get("name") or type(model).__name__
    batch1 = example_inputs(model, 1, size, device)
    batchn = example_inputs(model, batch_size, size, device)

    progress("parameters and FLOPs (one batch-1 forward)")
    flops = count_flops(model, batch1)
    memory_why = cpu_peak_supported() if device.type == "cpu" else None
    memory = ("CUDA max_memory_allocated above the allocation before one batch-N forward" if device.type == "cuda" else
              memory_why or "CPU resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) above the "
                            "resident size before one batch-N forward")
    result = BenchResult(
        model=label, size=(int(size[0]), int(size[1])), batch_size=batch_size, device=str(device),
        machine=machine_name(device), threads=torch.get_num_threads(), torch_version=torch.__version__,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6, gflops=flops / 1e9, gmacs=flops / 2e9,
        memory=memory)
    for mode in modes:
        progress(f"{mode}: start")
        try:
            row = _measure_mode(mode, model, batch1, batchn, device, warmup=warmup, min_run_time=min_run_time,
                                exported=exported, memory=memory_why is None, progress=progress)
        except Exception as e:  # noqa: BLE001 - a mode that fails is a result: its row says why
            first = (str(e).strip().splitlines() or [""])[0][:200]
            row = BenchRow(mode, status=f"failed: {type(e).__name__}: {first}")
            print(f"bench: {mode} failed: {type(e).__name__}: {first}", file=sys.stderr)
        result.rows.append(row)
    return result


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(result: BenchResult) -> str:
    """One row per mode: p50 ms, p95 ms, runs, images/s at batch N, peak MiB, params M, GFLOPs, GMACs, status.

    Compile time and notes follow the table as lines.
    """
    n = result.batch_size
    head = ("mode", "p50 ms (b1)", "p95 ms (b1)", "runs", f"images/s (b{n})", f"peak MiB (b{n})", "params M",
            "GFLOPs (b1)", "GMACs (b1)", "status")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for r in result.rows:
        cells = (r.mode, _fmt(r.p50_ms, 1), _fmt(r.p95_ms, 1), "" if r.runs is None else str(r.runs),
                 _fmt(r.images_per_s, 2), _fmt(r.peak_mib, 0), f"{result.params_m:.2f}", f"{result.gflops:.2f}",
                 f"{result.gmacs:.2f}", r.status)
        lines.append("| " + " | ".join(cells) + " |")
    extra = [f"- {r.mode}: compile (first call) {r.compile_s:.1f} s" for r in result.rows if r.compile_s is not None]
    extra += [f"- {r.mode}: {r.note}" for r in result.rows if r.note]
    return "\n".join(lines + ([""] + extra if extra else []))
