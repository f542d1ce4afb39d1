#!/usr/bin/env python
"""Our published entry against the authors' network, side by side: training and inference
images/s, measured in one process with alternating steps (ours, theirs, then theirs, ours, ...), so both see
the same machine load.

    python bench/parity.py --ref /path/to/RGBX_Semantic_Segmentation --method cmx --model cmx_mit_b2
    python bench/parity.py --ref ... --method cmx --model cmx_mit_b0 --steps 3 --size 240 320

The authors' model comes from ``tools/parity/<method>.py`` (``reference_model(checkout, variant,
num_classes)`` and ``reference_inputs(inputs)``; see tools/parity/README.md), so every published
method plugs in. Both networks get the same inputs, the same loss (cross-entropy on the same
random labels, on logits at input size, plus on the side logits where both models expose
``side_logits``, as GeminiFusion's loss) and AdamW (lr 6e-5, weight decay 0.01); a training step is
forward + backward + optimizer step in train mode, an inference step one forward in eval mode
under ``torch.inference_mode``. Reported: median seconds per step -> images/s, ours/theirs, and
the median of the per-step ratios (robust to a load that drifts during the run), of wall time
and of the process's CPU time (steadier on a machine shared with other jobs).

``--optimizer`` says whose AdamW each side gets. ``recipe`` (the default): each side the AdamW its
own training script builds, ours ``fusionzoo.engine.optim.build_optimizer`` as ``train.py`` calls it
(PyTorch's fused kernel, one pass over every tensor; no decay on tensors of fewer than 2 dims),
the authors' ``torch.optim.AdamW(params, ...)`` with PyTorch's defaults, as CMX's and DFormer's
``train.py`` construct it (on CPU the per-tensor loop). ``plain``: both the latter, so the ratio
is the networks' alone.

Two columns of ours: ``eager`` (the entry as ``fz.create_model`` builds it, float32) and
``fastest`` (the same weights with the speed flags that ``train.py`` offers: ``--channels-last``,
``--compile``, ``--amp bf16``). ``--fastest auto`` (the default) takes channels_last and compile
everywhere and bf16 autocast where the device computes it natively (a CUDA GPU with bf16, or a
CPU whose oneDNN has bf16 kernels: AVX512-BF16 / AMX; ``torch.backends.cpu.get_cpu_capability()``
is printed); ``--fastest channels_last,bf16`` picks flags, ``--fastest off`` drops the column.
The fastest model joins the same alternation (ours, fastest, theirs, then reversed); its compilation
happens in the warmup steps, which are not timed (``--warmup`` >= 1 when compiling).

Detectors (``task="detection"``): both train on the same random boxes with their own loss, ours
``sum(model(inputs, targets).values())``, theirs ``reference_loss(model, output, targets)`` of the
parity module; inference includes the box post-processing (ours in the forward, theirs through
the module's ``reference_postprocess(output)`` when it has one); their fastest column trains on the
sum of the loss terms computed under the flags (upcast to float32) and infers boxes under them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fusionzoo as fz
from fusionzoo.benchmark import bf16_unsupported
from fusionzoo.engine.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def load_method(method: str) -> ModuleType:
    """``tools/parity/<method>.py`` as a module (it imports the authors' code only when asked)."""
    path = ROOT / "tools" / "parity" / f"{method}.py"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.py"))
        raise SystemExit(f"error: no {path.relative_to(ROOT)}; methods with a parity module: {known}")
    spec = importlib.util.spec_from_file_location(f"parity_{method}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    for attr in ("reference_model", "reference_inputs"):
        if not hasattr(module, attr):
            raise SystemExit(f"error: {path.relative_to(ROOT)} has no {attr}() (tools/parity/README.md)")
    return module


def _train_step(forward: Callable[[], torch.Tensor], labels: torch.Tensor, opt: torch.optim.Optimizer,
                sides: Callable[[], tuple[torch.Tensor, ...]] = tuple) -> None:
    """One step; the loss is cross-entropy on the output plus on each of ``sides()`` (the side
    logits of that forward), all upsampled to the label size. A reference that returns
    ``(output, side outputs...)`` in training mode (ACNet) is timed on that whole forward; its loss
    takes the output."""
    opt.zero_grad(set_to_none=True)
    loss = 0.0
    out = forward()
    out = out[0] if isinstance(out, (tuple, list)) else out
    for logits in (out, *sides()):
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = loss + F.cross_entropy(logits.float(), labels, ignore_index=255)  # bf16 side logits: upcast
    loss.backward()
    opt.step()


def random_boxes(batch: int, h: int, w: int, num_classes: int, g: torch.Generator, per_image: int = 4
                 ) -> list[dict[str, torch.Tensor]]:
    """``per_image`` random boxes (xyxy pixels, 1/16 to 1/2 of the side) and labels per image."""
    out = []
    for _ in range(batch):
        size = torch.rand(per_image, 2, generator=g) * 0.4375 + 0.0625
        centre = size / 2 + torch.rand(per_image, 2, generator=g) * (1 - size)
        scale = torch.tensor([w, h], dtype=torch.float32)
        boxes = torch.cat(((centre - size / 2) * scale, (centre + size / 2) * scale), 1)
        out.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (per_image,), generator=g)})
    return out


def _detection_step(loss: Callable[[], torch.Tensor], opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    loss().backward()
    opt.step()


FAST_FLAGS = ("channels_last", "compile", "bf16")
LR, WEIGHT_DECAY = 6e-5, 0.01  # AdamW of both sides (CMX's NYUDv2 learning rate)


def fast_flags(spec: str, device: torch.device) -> tuple[str, ...]:
    """``--fastest`` -> the flags of the fastest column (``()`` = no column).

    Raises:
        ValueError: an unknown flag (names the known ones).
    """
    if spec == "off":
        return ()
    if spec == "auto":
        return tuple(f for f in FAST_FLAGS if f != "bf16" or bf16_unsupported(device) is None)
    flags = tuple(f.strip() for f in spec.split(",") if f.strip())
    unknown = [f for f in flags if f not in FAST_FLAGS]
    if unknown or not flags:
        raise ValueError(f"--fastest {spec!r}: unknown flag(s) {unknown}; give auto, off or a comma list of {list(FAST_FLAGS)}")
    return flags


def fastest_variant(model: nn.Module, inputs: dict[str, torch.Tensor], flags: tuple[str, ...],
                    device: torch.device) -> tuple[nn.Module, Callable[..., Any]]:
    """``model`` prepared with ``flags`` (in place: channels_last) and ``call(*extra)``, its
    forward on ``inputs`` (plus ``extra`` arguments: a detector's targets in training) as train.py
    runs it with ``--channels-last --compile --amp bf16``: the model and the inputs in NHWC, the
    forward compiled, and run under bf16 autocast. The caller upcasts what its loss reads
    (``fusionzoo.losses`` computes in float32)."""
    run = model
    if "channels_last" in flags:
        model.to(memory_format=torch.channels_last)
        inputs = {m: x.contiguous(memory_format=torch.channels_last) for m, x in inputs.items()}
    if "compile" in flags:
        run = torch.compile(model)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16" in flags else contextlib.nullcontext

    def call(*extra: Any) -> Any:
        with autocast():
            return run(inputs, *extra)

    return model, call


def make_optimizer(model: nn.Module, mode: str, authors: bool) -> torch.optim.Optimizer:
    """The AdamW of one side (``--optimizer``): with ``mode="recipe"`` ours is ``train.py``'s
    (``build_optimizer``: fused kernel, no decay below 2 dims), the authors' ``torch.optim.AdamW``
    with PyTorch's defaults (their ``train.py``); with ``"plain"`` both are the latter.

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("recipe", "plain"):
        raise ValueError(f"--optimizer {mode!r}: choose 'recipe' or 'plain'")
    if mode == "recipe" and not authors:
        return build_optimizer(model, name="adamw", lr=LR, weight_decay=WEIGHT_DECAY)
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call. On a CPU shared with other
    jobs the process's CPU time is the steadier measure: it does not count the time the
    scheduler gives to others (with one torch thread it equals the wall time of an idle core)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", type=Path, required=True, help="checkout of the authors' repository")
    parser.add_argument("--method", required=True, help="tools/parity/<method>.py (e.g. cmx)")
    parser.add_argument("--model", help="our published entry (default: the method's first one)")
    parser.add_argument("--variant", help="the authors' variant (default: the entry's encoder, e.g. mit_b2)")
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model and mode")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fastest", default="auto",
                        help="flags of the 'fastest' column of ours: auto (channels_last, compile, and bf16 where the "
                             "device has it natively), off (no column), or a comma list of " + ", ".join(FAST_FLAGS))
    parser.add_argument("--optimizer", choices=("recipe", "plain"), default="recipe",
                        help="recipe: ours gets train.py's AdamW (fused kernel), the authors' "
                             "torch.optim.AdamW with PyTorch's defaults, as their train.py builds it; "
                             "plain: both the latter (the networks alone)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--steps and --batch must be >= 1, --warmup >= 0")
    if not args.ref.is_dir():
        parser.error(f"--ref {args.ref} is not a directory (a checkout of the authors' repository)")

    method = load_method(args.method)
    published = fz.list_models(method=args.method, published=True)
    if not published:
        parser.error(f"no published entry of method {args.method!r}; see fusionzoo.list_models(published=True)")
    name = args.model or published[0]
    if name not in published:
        parser.error(f"{name!r} is not a published {args.method} entry; choose one of {published}")
    entry = fz.model_entry(name)
    variant = args.variant or entry.encoder
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        flags = fast_flags(args.fastest, device)
    except ValueError as err:
        parser.error(str(err))
    if "compile" in flags and args.warmup < 1:
        parser.error("--fastest with compile needs --warmup >= 1 (the first step compiles)")

    torch.manual_seed(0)
    ours = fz.create_model(name, num_classes=args.num_classes).to(device)
    theirs = method.reference_model(args.ref, variant, args.num_classes).to(device)
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    inputs = {m: torch.randn(args.batch, ours.in_chans[m], h, w, generator=g).to(device) for m in ours.modalities}
    labels = torch.randint(0, args.num_classes, (args.batch, h, w), generator=g).to(device)
    their_args = method.reference_inputs(inputs)

    detection = entry.task == "detection"
    models: dict[str, nn.Module] = {"ours": ours, "authors": theirs}
    forwards = {"ours": lambda: ours(inputs), "authors": lambda: theirs(*their_args)}
    fast_call: Callable[..., Any] | None = None
    if flags:  # the same weights, run with the speed flags; alternates between ours and theirs
        fast = fz.create_model(name, num_classes=args.num_classes).to(device)
        fast.load_state_dict(ours.state_dict())
        fast, fast_call = fastest_variant(fast, inputs, flags, device)
        # a segmentation forward's logits in float32 for the loss; a detector's boxes as they come
        forwards["fastest"] = fast_call if detection else (lambda: fast_call().float())
        models = {"ours": ours, "fastest": fast, "authors": theirs}
    # Side outputs that the reference's loss also uses (GeminiFusion's per-modality logits): when
    # both models expose `side_logits` (ours in training mode; the parity module's wrapper of
    # theirs), both steps add their cross-entropy, so both train the whole network.
    with_sides = all(hasattr(m, "side_logits") for m in models.values())
    sides = {k: (lambda m=m: tuple(m.side_logits)) if with_sides else tuple for k, m in models.items()}
    if detection:
        if not hasattr(method, "reference_loss"):
            parser.error(f"tools/parity/{args.method}.py has no reference_loss() for a detector (tools/parity/README.md)")
        targets = [{k: v.to(device) for k, v in t.items()} for t in random_boxes(args.batch, h, w, args.num_classes, g)]
        post = getattr(method, "reference_postprocess", lambda out: out)
        losses = {"ours": lambda: sum(ours(inputs, targets).values()),
                  "authors": lambda: method.reference_loss(theirs, theirs(*their_args), targets)}
        if fast_call is not None:  # the loss terms upcast, as train.py's bf16 autocast step sums them
            losses["fastest"] = lambda: sum(v.float() for v in fast_call(targets).values())
        forwards["authors"] = lambda: post(theirs(*their_args))
    opts = {k: make_optimizer(m, args.optimizer, authors=k == "authors") for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(
        f"{name} vs the authors' {variant} ({entry.reference_repo} @ {entry.reference_commit[:10]}), "
        f"{args.batch}x{h}x{w}, {args.num_classes} classes, {device}, {torch.get_num_threads()} threads; "
        f"parameters ours {params['ours']:,} authors {params['authors']:,}; optimizer: {args.optimizer} "
        f"(ours {'fused' if opts['ours'].defaults.get('fused') else 'per-tensor'} AdamW)",
        flush=True,
    )
    if flags:
        print(f"fastest = ours with {', '.join(flags)} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"bf16: {bf16_unsupported(device) or 'native'})", flush=True)

    times: dict[tuple[str, str], list[float]] = {(k, mode): [] for k in models for mode in ("train", "infer")}
    cpu_times: dict[tuple[str, str], list[float]] = {key: [] for key in times}
    for step in range(args.warmup + args.steps):
        # Alternate, and reverse the order every other step: the model that runs first after the
        # others' step pays for the memory the process must grow into (on 2026-12-07, ACNet at
        # 480x640: ours first, 16.7 s wall for 10.9 s CPU in its first timed step, then equal).
        order = list(models.items())[:: -1 if step % 2 else 1]
        for key, model in order:
            model.train()
            if detection:
                dt, cpu = _timed(lambda m=key: _detection_step(losses[m], opts[m]), device)
            else:
                dt, cpu = _timed(lambda m=key: _train_step(forwards[m], labels, opts[m], sides[m]), device)
            if step >= args.warmup:
                times[(key, "train")].append(dt)
                cpu_times[(key, "train")].append(cpu)
        for key, model in order:
            model.eval()
            with torch.inference_mode():
                dt, cpu = _timed(forwards[key], device)
            if step >= args.warmup:
                times[(key, "infer")].append(dt)
                cpu_times[(key, "infer")].append(cpu)
        done = "warmup" if step < args.warmup else f"step {step - args.warmup + 1}/{args.steps}"
        print(f"  {done}: " + ", ".join(f"{k} {m} {v[-1]:.2f}s (cpu {cpu_times[(k, m)][-1]:.2f}s)"
                                       for (k, m), v in times.items() if v), flush=True)

    # Two ratios: of the median speeds, and the median of per-step ratios (ours and theirs run
    # back to back, so each pair saw nearly the same load; robust when the load drifts).
    columns = [k for k in models if k != "authors"]
    # A third: the same per-step ratio of CPU seconds (the steadier one on a shared machine).
    print("\n| mode | " + " | ".join(f"{k} img/s" for k in columns) + " | authors img/s | "
          + " | ".join(f"{k} / authors | {k} median per-step ratio | {k} per-step CPU-time ratio" for k in columns) + " |")
    print("|---|" + "---:|" * (1 + 4 * len(columns)))
    for mode in ("train", "infer"):
        ips = {k: args.batch / statistics.median(times[(k, mode)]) for k in models}
        cells = [f"{ips[k]:.3f}" for k in columns] + [f"{ips['authors']:.3f}"]
        for k in columns:
            paired = statistics.median(a / o for o, a in zip(times[(k, mode)], times[("authors", mode)]))
            paired_cpu = statistics.median(a / o for o, a in zip(cpu_times[(k, mode)], cpu_times[("authors", mode)]))
            cells += [f"{ips[k] / ips['authors']:.2f}", f"{paired:.2f}", f"{paired_cpu:.2f}"]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
