#!/usr/bin/env python
"""Our published entry against the authors' network, side by side: training and inference
images/s, measured in one process with alternating steps (ours, theirs, ours, ...), so both see
the same machine load.

    python bench/parity.py --ref /path/to/RGBX_Semantic_Segmentation --method cmx --model cmx_mit_b2
    python bench/parity.py --ref ... --method cmx --model cmx_mit_b0 --steps 3 --size 240 320

The authors' model comes from ``tools/parity/<method>.py`` (``reference_model(checkout, variant,
num_classes)`` and ``reference_inputs(inputs)``; see tools/parity/README.md), so every published
method plugs in. Both networks get the same inputs, the same loss (cross-entropy on the same
random labels, on logits at input size, plus on the side logits where both models expose
``side_logits``, as GeminiFusion's loss) and the same optimizer (AdamW); a training step is
forward + backward + optimizer step in train mode, an inference step one forward in eval mode
under ``torch.inference_mode``. Reported: median seconds per step -> images/s, ours/theirs, and
the median of the per-step ratios (robust to a load that drifts during the run).

Detectors (``task="detection"``): both train on the same random boxes with their own loss, ours
``sum(model(inputs, targets).values())``, theirs ``reference_loss(model, output, targets)`` of the
parity module; inference includes the box post-processing (ours in the forward, theirs through
the module's ``reference_postprocess(output)`` when it has one).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

import fusionzoo as fz

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
        loss = loss + F.cross_entropy(logits, labels, ignore_index=255)
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


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


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

    torch.manual_seed(0)
    ours = fz.create_model(name, num_classes=args.num_classes).to(device)
    theirs = method.reference_model(args.ref, variant, args.num_classes).to(device)
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    inputs = {m: torch.randn(args.batch, ours.in_chans[m], h, w, generator=g).to(device) for m in ours.modalities}
    labels = torch.randint(0, args.num_classes, (args.batch, h, w), generator=g).to(device)
    their_args = method.reference_inputs(inputs)

    models: dict[str, nn.Module] = {"ours": ours, "authors": theirs}
    forwards = {"ours": lambda: ours(inputs), "authors": lambda: theirs(*their_args)}
    # Side outputs that the reference's loss also uses (GeminiFusion's per-modality logits): when
    # both models expose `side_logits` (ours in training mode; the parity module's wrapper of
    # theirs), both steps add their cross-entropy, so both train the whole network.
    with_sides = all(hasattr(m, "side_logits") for m in models.values())
    sides = {k: (lambda m=m: tuple(m.side_logits)) if with_sides else tuple for k, m in models.items()}
    detection = entry.task == "detection"
    if detection:
        if not hasattr(method, "reference_loss"):
            parser.error(f"tools/parity/{args.method}.py has no reference_loss() for a detector (tools/parity/README.md)")
        targets = [{k: v.to(device) for k, v in t.items()} for t in random_boxes(args.batch, h, w, args.num_classes, g)]
        post = getattr(method, "reference_postprocess", lambda out: out)
        losses = {"ours": lambda: sum(ours(inputs, targets).values()),
                  "authors": lambda: method.reference_loss(theirs, theirs(*their_args), targets)}
        forwards["authors"] = lambda: post(theirs(*their_args))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=6e-5, weight_decay=0.01) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    print(
        f"{name} vs the authors' {variant} ({entry.reference_repo} @ {entry.reference_commit[:10]}), "
        f"{args.batch}x{h}x{w}, {args.num_classes} classes, {device}, {torch.get_num_threads()} threads; "
        f"parameters ours {params['ours']:,} authors {params['authors']:,}",
        flush=True,
    )

    times: dict[tuple[str, str], list[float]] = {(k, mode): [] for k in models for mode in ("train", "infer")}
    for step in range(args.warmup + args.steps):
        for key, model in models.items():  # alternate: ours, theirs, ours, ...
            model.train()
            if detection:
                dt = _timed(lambda m=key: _detection_step(losses[m], opts[m]), device)
            else:
                dt = _timed(lambda m=key: _train_step(forwards[m], labels, opts[m], sides[m]), device)
            if step >= args.warmup:
                times[(key, "train")].append(dt)
        for key, model in models.items():
            model.eval()
            with torch.inference_mode():
                dt = _timed(forwards[key], device)
            if step >= args.warmup:
                times[(key, "infer")].append(dt)
        done = "warmup" if step < args.warmup else f"step {step - args.warmup + 1}/{args.steps}"
        print(f"  {done}: " + ", ".join(f"{k} {m} {v[-1]:.2f}s" for (k, m), v in times.items() if v), flush=True)

    # Two ratios: of the median speeds, and the median of per-step ratios (ours and theirs run
    # back to back, so each pair saw nearly the same load; robust when the load drifts).
    print("\n| mode | ours img/s | authors img/s | ours / authors | median per-step ratio |\n|---|---:|---:|---:|---:|")
    for mode in ("train", "infer"):
        ips = {k: args.batch / statistics.median(times[(k, mode)]) for k in models}
        paired = statistics.median(a / o for o, a in zip(times[("ours", mode)], times[("authors", mode)]))
        print(f"| {mode} | {ips['ours']:.3f} | {ips['authors']:.3f} | {ips['ours'] / ips['authors']:.2f} | {paired:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
