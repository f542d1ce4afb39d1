"""Benchmarks of the interpretation suite (prints tables; nothing here is asserted).

    python bench/interpret.py                       # all three sections
    python bench/interpret.py --only capture        # tap capture overhead
    python bench/interpret.py --only cka --sizes 2500 5000 10000 --dim 2048
    python bench/interpret.py --only report --run runs/<run>   # wall time of a full report
    python bench/interpret.py --only cka_offset     # CKA error under a large shared feature offset
    python bench/interpret.py --only sv_stages --run runs/<run>   # semantic variance per stage and stream
    python bench/interpret.py --only gradcam_zero --run runs/<run>  # how many Grad-CAM maps are all zero
    python bench/interpret.py --only cost --run runs/<run>   # interpret.run / one evaluation pass
    python bench/interpret.py --only cost --model esanet_r34_nbt1d --image-size 480 640 --samples 16

1. **Capture overhead**: forward pass of a model with no listener vs ``fz.capture(model)`` on
   every tap, interleaved in the same process (median of ``--reps`` each; ratio = with / without).
2. **Streaming vs naive CKA**: exact full-dataset linear CKA (debiased and biased) of ``n``
   samples of ``d``-dimensional features, by :class:`fusionzoo.interpret.StreamingCKA` (batches of
   500 generated on the fly, memory ``O(d^2)``) and by a naive implementation that materializes
   both ``n x n`` Gram matrices (Kornblith et al.'s formulation). Each measurement runs in its own
   subprocess; its peak resident memory above the start of the computation is sampled every 2 ms.
   Both see identical data (per-batch seeded) and their values are printed side by side.
3. **Report wall time**: ``interpret.run`` + ``write_report`` over the embedded default run's
   validation set (``esanet_resnet18`` on 96 synthetic 64x80 images; untrained weights unless
   ``--run`` points at a run folder).
4. **CKA under a feature offset**: absolute error of ``cka_from_gram`` (debiased and biased),
   ``MinibatchCKA`` (one batch, which equals the full-data debiased CKA) and ``StreamingCKA``
   when the same constant is added to every feature of both representations, against debiased /
   biased CKA of the centred float64 features (CKA is invariant to the offset).
5. **Semantic variance across stages**: SV of every stage of the RGB, depth and fused streams
   over the validation set of a run (``--run``; its model, data and size; default: an untrained
   ``esanet_resnet18`` on 96 synthetic 64x80 images), measured on the common stride-4 grid
   (``sv_stride=4``, the default of ``interpret.run``) and on each tap's own grid
   (``sv_stride=None``, the former behaviour), with the number of labelled cells of each.
6. **Empty Grad-CAM maps**: on the first ``--gradcam-images`` validation images of a run, how
   many Grad-CAM maps of each stream are zero everywhere, per stage, for the two segmentation
   scores: every pixel's own predicted class at once (the former default of ``interpret.run``)
   and each image's second most frequent predicted class on its pixels (``object_class_region``,
   the current one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BATCH = 500


def _rss_mb() -> float:
    """Current resident set size (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples the resident set size every 2 ms in a thread; ``peak_mb`` = max above the start.

    (ru_maxrss cannot be used: the import of torch/timm peaks higher than small workloads.)
    """

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 - typing.Self needs Python 3.11; the project supports 3.10
        import threading

        self.base = _rss_mb()
        self.peak = self.base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mb())
                time.sleep(0.002)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())

    @property
    def peak_mb(self) -> float:
        return self.peak - self.base


def _batch(i: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``i`` of a fixed dataset: y depends on half of x's coordinates (CKA well inside (0, 1))."""
    g = torch.Generator().manual_seed(seed * 100003 + i)
    x = torch.randn(BATCH, dim, generator=g, dtype=torch.float64)
    y = torch.tanh(torch.roll(x, 7, dims=1)) * (torch.arange(dim) < dim // 2) + torch.randn(BATCH, dim, generator=g,
                                                                                               dtype=torch.float64)
    return x, y


# ---------------------------------------------------------------------------------------------
# workers (run in subprocesses)
# ---------------------------------------------------------------------------------------------
def _worker_streaming(n: int, dim: int) -> dict:
    from fusionzoo.interpret import StreamingCKA

    with PeakRSS() as mem:
        t = time.perf_counter()
        acc = StreamingCKA([("x", "y")])
        for i in range(n // BATCH):
            x, y = _batch(i, dim)
            acc.update({"x": x, "y": y})
        deb, bia = acc.cka("x", "y", True), acc.cka("x", "y", False)
        dt = time.perf_counter() - t
    return {"time_s": dt, "peak_mb": mem.peak_mb, "debiased": deb, "biased": bia}


def _worker_naive(n: int, dim: int) -> dict:
    from fusionzoo.interpret import cka_from_gram

    with PeakRSS() as mem:
        t = time.perf_counter()
        xs, ys = zip(*(_batch(i, dim) for i in range(n // BATCH)))
        x, y = torch.cat(xs), torch.cat(ys)
        del xs, ys
        kx, ky = x @ x.T, y @ y.T
        deb = cka_from_gram(kx, ky, debiased=True)
        bia = cka_from_gram(kx, ky, debiased=False)
        dt = time.perf_counter() - t
    return {"time_s": dt, "peak_mb": mem.peak_mb, "debiased": deb, "biased": bia}


def _worker_minibatch(n: int, dim: int) -> dict:
    from fusionzoo.interpret import MinibatchCKA

    with PeakRSS() as mem:
        t = time.perf_counter()
        acc = MinibatchCKA([("x", "y")])
        for i in range(n // BATCH):
            x, y = _batch(i, dim)
            acc.update({"x": x, "y": y})
        deb = acc.cka("x", "y")
        dt = time.perf_counter() - t
    return {"time_s": dt, "peak_mb": mem.peak_mb, "debiased": deb, "biased": float("nan")}


WORKERS = {"streaming": _worker_streaming, "naive": _worker_naive, "minibatch": _worker_minibatch}


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def bench_capture(models: list[str], reps: int, size: tuple[int, int], batch: int) -> None:
    import fusionzoo as fz

    print(f"\n## Capture overhead: forward pass, batch {batch} x {size[0]}x{size[1]}, CPU, "
          f"{torch.get_num_threads()} thread(s), median of {reps}\n")
    print("| model | taps | no capture (ms) | capture all taps (ms) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in models:
        torch.manual_seed(0)
        model = fz.create_model(name, num_classes=5).eval()
        x = {m: torch.randn(batch, model.in_chans[m], *size) for m in model.modalities}
        plain, cap = [], []
        with torch.no_grad():
            for _ in range(3):  # warm-up: first calls create oneDNN primitives
                model(x)
                with fz.capture(model):
                    model(x)
            for _ in range(reps):  # interleaved, so drift hits both equally
                t = time.perf_counter()
                model(x)
                plain.append(time.perf_counter() - t)
                t = time.perf_counter()
                with fz.capture(model):
                    model(x)
                cap.append(time.perf_counter() - t)
        a, b = statistics.median(plain), statistics.median(cap)
        print(f"| {name} | {len(model.tap_info())} | {1e3 * a:.1f} | {1e3 * b:.1f} | {b / a:.3f} |", flush=True)


def bench_cka(sizes: list[int], dim: int, methods: list[str]) -> None:
    print(f"\n## Exact linear CKA over n samples of {dim}-d features (float64, CPU, {torch.get_num_threads()} "
          f"thread(s)); peak = max resident memory (sampled every 2 ms) above the start of the computation\n")
    print("| method | n | time (s) | peak memory (MiB) | debiased CKA | biased CKA |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in methods:
        for n in sizes:
            cmd = [sys.executable, __file__, "--_worker", method, "--_n", str(n), "--dim", str(dim),
                   "--threads", str(torch.get_num_threads())]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"| {method} | {n} | failed: {proc.stderr.strip().splitlines()[-1:]} | | | |")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"| {method} | {n} | {r['time_s']:.1f} | {r['peak_mb']:.0f} | {r['debiased']:.6f} | "
                  f"{r['biased']:.6f} |", flush=True)


def bench_cka_offset(offsets: list[float]) -> None:
    import numpy as np

    from fusionzoo.interpret import MinibatchCKA, StreamingCKA, cka_from_gram
    from fusionzoo.interpret.cka import gram_linear

    g = torch.Generator().manual_seed(0)
    n = 200
    x = torch.randn(n, 64, generator=g, dtype=torch.float64)
    y = x[:, :32] @ torch.randn(32, 48, generator=g, dtype=torch.float64) + torch.randn(n, 48, generator=g,
                                                                                        dtype=torch.float64)

    def reference(debiased: bool) -> float:
        # feature-space CKA of the centred float64 features (no Gram of offset data anywhere)
        a, b = (x - x.mean(0)).numpy(), (y - y.mean(0)).numpy()
        def hsic(p: np.ndarray, q: np.ndarray) -> float:
            v = np.linalg.norm(p.T @ q) ** 2
            if not debiased:
                return v
            rp, rq = (p * p).sum(1), (q * q).sum(1)
            return v - n / (n - 2.0) * rp @ rq + rp.sum() * rq.sum() / ((n - 1) * (n - 2))
        return hsic(a, b) / np.sqrt(hsic(a, a) * hsic(b, b))

    ref_d, ref_b = reference(True), reference(False)
    print(f"\n## CKA error under a shared feature offset (n = {n}, 64-d vs 48-d, float64; "
          f"reference debiased {ref_d:.6f}, biased {ref_b:.6f})\n")
    print("| offset | cka_from_gram debiased | cka_from_gram biased | MinibatchCKA (1 batch) | StreamingCKA debiased |")
    print("|---:|---:|---:|---:|---:|")
    for off in offsets:
        xo, yo = x + off, y + off
        kx, ky = gram_linear(xo), gram_linear(yo)
        mb = MinibatchCKA([("x", "y")])
        mb.update({"x": xo, "y": yo})
        st = StreamingCKA([("x", "y")])
        for idx in torch.arange(n).split(50):
            st.update({"x": xo[idx], "y": yo[idx]})
        errs = [abs(cka_from_gram(kx, ky, True) - ref_d), abs(cka_from_gram(kx, ky, False) - ref_b),
                abs(mb.cka("x", "y") - ref_d), abs(st.cka("x", "y") - ref_d)]
        print(f"| {off:g} | " + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)


def _model_and_data(run: str | None, samples: int, size: tuple[int, int] = (64, 80), name: str = "esanet_resnet18"):
    """A trained run's best weights and validation set, or the untrained entry ``name`` (5
    classes) on the synthetic RGB-D validation split: ``(model, dataset, description)``."""
    import fusionzoo as fz
    from fusionzoo.data import create_dataset

    if run:
        from fusionzoo.interpret.runs import load_run

        model, ds, _ = load_run(run)
        return model, ds, f"run {Path(run).name}"
    torch.manual_seed(0)
    model = fz.create_model(name, num_classes=5)
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=samples, image_size=tuple(size))
    return model, ds, f"untrained {name} at {size[0]}x{size[1]}"


def bench_sv_stages(run: str | None, samples: int) -> None:
    import warnings

    from fusionzoo import interpret

    model, ds, what = _model_and_data(run, samples)
    results = {}
    for stride in (4, None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few-cell warnings of the native grid: the table shows the counts
            results[stride] = interpret.run(model, ds, metrics=["semantic_variance"], sv_stride=stride).semantic_variance
    info = model.tap_info()
    streams = [s for s in [*model.modalities, "fused"] if f"{s}.stage1" in info]
    stages = [f"stage{k}" for k in range(1, 5)]
    size = next(iter(results[4].values()))["grid"]
    print(f"\n## Semantic variance per stage, {what}, {len(ds)} validation images ({model.config.get('name')})\n")
    print(f"Common grid: stride 4, {size[0]}x{size[1]} cells per image; own grid: each tap's feature grid.\n")
    print("| stream | grid | " + " | ".join(stages) + " |")
    print("|---|---|" + "---:|" * len(stages))
    for stream in streams:
        for stride, label in ((4, "common (stride 4)"), (None, "own")):
            cells = []
            for st in stages:
                v = results[stride].get(f"{stream}.{st}")
                if v is None:
                    cells.append("n/a")
                    continue
                g = v["grid"]
                cells.append(f"{v['semantic_variance']:.3f} ({g[0]}x{g[1]}, {v['num_pixels']} cells)")
            print(f"| {stream} | {label} | " + " | ".join(cells) + " |", flush=True)


def bench_gradcam_zero(run: str | None, samples: int, images: int) -> None:
    from fusionzoo.data import collate
    from fusionzoo.interpret import grad_cam
    from fusionzoo.interpret.gradcam import object_class_region

    model, ds, what = _model_and_data(run, samples)
    model.eval()
    batch = collate([ds[i] for i in range(min(images, len(ds)))])
    x = {m: batch[m] for m in model.modalities}
    with torch.no_grad():
        region, _ = object_class_region(model(x).argmax(1))
    info = model.tap_info()
    streams = [s for s in [*model.modalities, "fused"] if f"{s}.stage1" in info]
    n = next(iter(x.values())).shape[0]
    print(f"\n## All-zero Grad-CAM maps, {what}, first {n} validation images "
          f"({tuple(next(iter(x.values())).shape[-2:])} input)\n")
    print("| stage (grid) | score | " + " | ".join(streams) + " |")
    print("|---|---|" + "---:|" * len(streams))
    h, w = next(iter(x.values())).shape[-2:]
    for k in (4, 3, 2):
        taps = [f"{s}.stage{k}" for s in streams]
        r = info[taps[0]].reduction
        for label, kw in (("every pixel's class", {}), ("one class per image", {"region": region})):
            cams = grad_cam(model, x, taps, **kw)
            zero = [int((cams[t].flatten(1).amax(1) == 0).sum()) for t in taps]
            print(f"| stage{k} ({-(-h // r)}x{-(-w // r)}) | {label} | " + " | ".join(f"{z}/{n}" for z in zero) + " |",
                  flush=True)


def bench_report(run: str | None, samples: int) -> None:
    import fusionzoo as fz
    from fusionzoo import interpret
    from fusionzoo.data import create_dataset
    from fusionzoo.interpret.report import write_report

    if run:
        from fusionzoo.hub import from_pretrained

        model = from_pretrained(Path(run) / "best")
    else:
        model = fz.create_model("esanet_resnet18", num_classes=5)
    ds = create_dataset("synthetic_rgbd", split="val", num_samples=samples, image_size=(64, 80))
    t = time.perf_counter()
    res = interpret.run(model, ds, batch_size=8)
    t_run = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        files = write_report(res, d)
        t_rep = time.perf_counter() - t
    print(f"\n## Full report, {res.model} on {samples} synthetic 64x80 images, CPU, {torch.get_num_threads()} thread(s)\n")
    print("| phase | wall time (s) |")
    print("|---|---:|")
    print(f"| interpret.run (all metrics, one pass) | {t_run:.1f} |")
    for k, v in res.timings.items():
        print(f"| &nbsp;&nbsp;{k} | {v:.1f} |")
    print(f"| write_report ({len(files)} files) | {t_rep:.1f} |")
    print(f"| total | {t_run + t_rep:.1f} |")


COST_VARIANTS = {  # label -> interpret.run options
    "default (zero, mean[, missing]; R=200)": {},
    "default, one forward per pass": {"pass_pixels": None},
    "one policy (zero), R=200": {"policies": ()},
    "one policy (zero), R=0": {"policies": (), "replicates": 0},
    "one policy (zero), R=0, one forward per pass": {"policies": (), "replicates": 0, "pass_pixels": None},
}


def bench_cost(run: str | None, samples: int, reps: int, variants: list[str] | None,
               size: tuple[int, int] = (64, 80), name: str = "esanet_resnet18") -> None:
    """``interpret.run`` against one evaluation pass (forward + confusion matrix over the same
    images, batch 8), alternated in this process; the ratio and the floor it is held to."""
    import warnings

    from torch.utils.data import DataLoader

    from fusionzoo import interpret
    from fusionzoo.data import collate
    from fusionzoo.interpret.contribution import ContributionAccumulator, task_for
    from fusionzoo.tasks import ConfusionMatrix

    model, ds, what = _model_and_data(run, samples, size, name)
    model.eval()
    forwards = {"calls": 0, "images": 0}

    def count(_m, args, _kw, _out) -> None:
        forwards["calls"] += 1
        forwards["images"] += next(iter(args[0].values())).shape[0]

    model.register_forward_hook(count, with_kwargs=True)

    def evaluate() -> tuple[float, float]:
        """(wall, process CPU) seconds of one evaluation pass."""
        cm = ConfusionMatrix(model.num_classes, 255)
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for b in DataLoader(ds, batch_size=8, collate_fn=collate):
                cm.update(model({m: b[m] for m in model.modalities}), b["mask"])  # logits: class_map, as every evaluator
        return time.perf_counter() - t, time.process_time() - c

    chosen = {k: v for k, v in COST_VARIANTS.items() if not variants or k in variants}
    evaluate()  # warm-up
    times: dict[str, list[float]] = {"eval": []}
    counts: dict[str, dict] = {}
    policies: dict[str, list[str]] = {}
    cpu: dict[str, list[float]] = {"eval": []}  # process CPU seconds (one thread: robust to other jobs' load)
    for _ in range(reps):
        for label, kw in chosen.items():
            wall_s, cpu_s = evaluate()
            times["eval"].append(wall_s)
            cpu["eval"].append(cpu_s)
            forwards.update(calls=0, images=0)
            t, c = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = interpret.run(model, ds, batch_size=8, **kw)
            times.setdefault(label, []).append(time.perf_counter() - t)
            cpu.setdefault(label, []).append(time.process_time() - c)
            counts[label], policies[label] = dict(forwards), res.settings["policies"]
            times.setdefault(label + " :compute", []).append(res.timings["compute_s"])
    ev, ev_cpu = statistics.median(times["eval"]), statistics.median(cpu["eval"])
    acc = ContributionAccumulator(task_for(model), model.modalities, model.num_classes)
    n_coal = len(acc.subsets)
    print(f"\n## Interpretation cost, {what} ({model.config.get('name')}), {len(ds)} images, batch 8, CPU, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}\n")
    print(f"One evaluation pass (forward + confusion matrix): median {ev:.2f} s wall, {ev_cpu:.2f} s CPU, of "
          f"{len(times['eval'])}.\n")
    print("| interpret.run | policies | wall (s) | of it compute (s) | forward images / eval images | ratio to eval "
          "| ratio of CPU time | ratio without compute | coalitions C (distinct coalition passes) | limit 1.3 (C + 1) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    batches = -(-len(ds) // 8)
    for label in chosen:
        wall = statistics.median(times[label])
        comp = statistics.median(times[label + " :compute"])
        pol = policies[label]
        # distinct coalition passes per batch: 2^M under the first policy, 2^M - 1 more per further
        # one (the full input is shared), 2^M - 2 for missing (its empty coalition is zero's)
        c = n_coal + sum(n_coal - (2 if p == "missing" else 1) for p in pol[1:])
        fwd = counts[label]["images"] / len(ds)
        print(f"| {label} | {', '.join(pol)} | {wall:.1f} | {comp:.1f} | {fwd:.1f} ({counts[label]['calls'] / batches:.1f} "
              f"forwards a batch) | {wall / ev:.1f} | {statistics.median(cpu[label]) / ev_cpu:.1f} | "
              f"{(wall - comp) / ev:.1f} | {c} | {1.3 * (c + 1):.1f} |", flush=True)
    print("\n'compute' is the stage after the pass over the data (bootstrap replicates: the whitened semantic "
          "variance's R Cholesky solves per tap, CKA's block terms): its cost depends on R and the taps, not on the "
          "number of images. Forward images per image: the full input (1), the other coalitions (the empty one as "
          "one image a batch: its input is the same for every image), M perceptual-score permutations, Grad-CAM's "
          "images.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("capture", "cka", "report", "cka_offset", "sv_stages", "gradcam_zero", "cost"),
                   action="append")
    p.add_argument("--image-size", type=int, nargs=2, default=(64, 80),
                   help="cost without --run: input size of the synthetic images (a published entry's: 480 640)")
    p.add_argument("--model", default="esanet_resnet18",
                   help="cost without --run: the registered entry, untrained (a published one: esanet_r34_nbt1d)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="cost: only these interpret.run variants (their labels, as the table prints them)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable timings on shared CPUs)")
    p.add_argument("--models", nargs="+", default=["esanet_resnet18", "cmx_resnet18", "late_mean_resnet18",
                                                   "early_concat_resnet18"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--size", type=int, nargs=2, default=(128, 160))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--methods", nargs="+", default=["streaming", "naive", "minibatch"])
    p.add_argument("--run", default=None, help="run folder for the report timing")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--offsets", type=float, nargs="+", default=[100.0, 1e3, 1e4])
    p.add_argument("--gradcam-images", type=int, default=16)
    p.add_argument("--_worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._worker:
        print(json.dumps(WORKERS[args._worker](args._n, args.dim)))
        return
    sections = args.only or ["capture", "cka", "report"]
    if "capture" in sections:
        bench_capture(args.models, args.reps, tuple(args.size), args.batch)
    if "cka" in sections:
        bench_cka(args.sizes, args.dim, args.methods)
    if "report" in sections:
        bench_report(args.run, args.samples)
    if "cka_offset" in sections:
        bench_cka_offset(args.offsets)
    if "sv_stages" in sections:
        bench_sv_stages(args.run, args.samples)
    if "cost" in sections:
        bench_cost(args.run, args.samples, args.reps if args.reps != 15 else 1, args.variants, tuple(args.image_size),
                   args.model)
    if "gradcam_zero" in sections:
        bench_gradcam_zero(args.run, args.samples, args.gradcam_images)


if __name__ == "__main__":
    main()
