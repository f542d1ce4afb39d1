#!/usr/bin/env python
"""Regenerate tests/fixtures/parity/geminifusion/ from a checkout of the authors' GeminiFusion.

    python tools/parity/geminifusion.py --ref /path/to/GeminiFusion
    python tools/parity/geminifusion.py --check     # ours against the committed fixture, max abs diffs
    python tools/parity/geminifusion.py --ref /path/to/GeminiFusion --float64   # both in float64

Reference: https://github.com/JiaDingCN/GeminiFusion (branch main: NYUDv2 / SUN RGB-D; the commit
is read from the checkout and should equal ``fusionzoo.models.published.geminifusion.REFERENCE_COMMIT``).
Their ``models/segformer.py`` (``WeTr``) is imported from the checkout at run time; none of it
is in this project. It imports mmcv (``ConvModule``) and, through ``swin_transformer.py``,
mmdet and their ``mmcv_custom``: this script puts stand-ins into ``sys.modules`` first. The
``ConvModule`` stand-in is what mmcv builds for ``ConvModule(c_in, c_out, 1,
norm_cfg=dict(type="BN"))``: ``conv`` (1x1, no bias, as mmcv's ``bias="auto"`` with a norm),
``bn`` (BatchNorm2d, eps 1e-5), ReLU. ``WeTr.__init__`` loads ``pretrained/mit_bX.pth``
(SegFormer's ImageNet MiT); ``torch.load`` is replaced during construction so that nothing is
read (the network is then filled by the rule).

What it writes (numbers only), with the fill rule of ``fusionzoo.models.published.parity`` (as
``tools/parity/cmx.py``; ``seeded.py``'s He-scale weights sharpen the attention and amplify
rounding), in float64 (the rule's float32 weights and inputs cast), plus ``float32_drift`` in
``fixture.json``: how far a float32 run of theirs moves each output (``seeded.float32_drift``;
the test's bound is ``seeded.tolerance``). ``--float64`` runs theirs and ours side by side:

- ``fixture.json``: the reference commit, the reduced configuration (MiT-B0, 3 classes,
  2x3x64x64 RGB and 2x1x64x64 depth, tiled to 3 channels for theirs as their loader does; drop
  path and dropout off), the authors' key/shape list, the rule and seeds, and their parameter
  counts of ``WeTr`` on MiT-B0..B5 at 40 classes (NYUDv2) and 37 (SUN RGB-D);
- ``outputs.safetensors``: eval mode, then train mode (batch statistics): their three outputs at
  stride 4 (``{mode}_rgb``, ``{mode}_depth``, ``{mode}_ens``: their ``forward`` returns
  ``[rgb, depth, ens]``), ``{mode}_logits`` the ensemble upsampled bilinearly to the input size
  (as their training loss does; our model's output), and in train mode the gradients of
  ``sum(mean(out ** 2))`` over the three outputs w.r.t. both inputs and ``alpha``.

The module also gives ``bench/parity.py`` the authors' model: :func:`reference_model` (their
``WeTr``, returning the ensemble; in training mode with ``side_logits`` = their per-modality
outputs, which their loss also uses) and :func:`reference_inputs`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published import geminifusion as ours
from fusionzoo.models.published.parity import (
    RULE,
    fill_state_dict,
    key_shapes,
    read_fixture,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import (
    count_parameters,
    loaded_in_both_precisions,
    parity_errors,
    print_diffs,
    print_errors,
    to_float64,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "geminifusion"
VARIANT, NUM_CLASSES, BATCH, SIZE = "b0", 3, 2, 64
SEED_WEIGHTS, SEED_INPUTS = 1234, 5678
N_HEADS = 8  # their --n_heads default
CLASS_COUNTS = {"nyuv2": 40, "sunrgbd": 37}


class _ConvModule(nn.Module):
    """mmcv's ConvModule as ``SegFormerHead.linear_fuse`` builds it (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_cfg: dict | None = None, **_: object) -> None:
        super().__init__()
        if norm_cfg != {"type": "BN", "requires_grad": True}:
            raise ValueError(f"stand-in ConvModule covers norm_cfg=BN only, got {norm_cfg}")
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


def _stub(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _import_reference(checkout: Path) -> types.ModuleType:
    checkout = Path(checkout).resolve()
    if not (checkout / "models" / "segformer.py").is_file():
        raise SystemExit(f"error: {checkout} is not a checkout of JiaDingCN/GeminiFusion (no models/segformer.py)")
    _stub("mmcv")
    _stub("mmcv.cnn", ConvModule=_ConvModule)
    _stub("mmdet")
    _stub("mmdet.utils", get_root_logger=lambda *a, **k: None)
    _stub("mmcv_custom", load_checkpoint=lambda *a, **k: None)
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from models import segformer  # type: ignore[import-not-found]

    return segformer


@contextlib.contextmanager
def _no_pretrained_file() -> Iterator[None]:
    """``WeTr.__init__`` reads ``pretrained/<backbone>.pth``: hand it an empty ImageNet file
    (only ``head.*``), so its ``expand_state_dict`` keeps the encoder's own initialization."""
    original = torch.load
    torch.load = lambda *a, **k: {"head.weight": torch.zeros(1), "head.bias": torch.zeros(1)}
    try:
        yield
    finally:
        torch.load = original


def _wetr(checkout: Path, variant: str, num_classes: int, dpr: float) -> nn.Module:
    segformer = _import_reference(checkout)
    with _no_pretrained_file(), contextlib.redirect_stdout(sys.stderr):  # WeTr prints its settings
        return segformer.WeTr(f"mit_{variant}", num_classes, N_HEADS, dpr, 0.0)


def _no_dropout(net: nn.Module) -> nn.Module:
    """Dropout off (their decoder's Dropout2d 0.1; the rest is 0 already)."""
    for module in net.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d)):
            module.p = 0.0
    return net


class _Ensemble(nn.Module):
    """Their ``WeTr`` returning the ensemble (the output they report); in training mode
    ``side_logits`` holds their per-modality outputs, which their loss also uses."""

    def __init__(self, wetr: nn.Module) -> None:
        super().__init__()
        self.wetr = wetr
        self.side_logits: tuple[torch.Tensor, ...] = ()

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        (*sides, ens), _ = self.wetr([rgb, depth])
        self.side_logits = tuple(sides) if self.training else ()
        return ens


def reference_model(checkout: Path, variant: str = VARIANT, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The authors' ``WeTr`` on ``mit_<variant>`` (``b3`` or ``mit_b3``), drop path as their
    README trains it (0.4; 0.35 for B5), no weights loaded, wrapped to return the ensemble."""
    variant = variant.removeprefix("mit_")
    return _Ensemble(_wetr(checkout, variant, num_classes, 0.35 if variant == "b5" else 0.4))


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rgb, depth)``; their loader tiles gray depth to 3 channels, so a 1-channel depth is repeated."""
    rgb, depth = model_inputs.values()
    return rgb, depth.expand(-1, 3, -1, -1)


def input_shapes() -> dict[str, list[int]]:
    return {"rgb": [BATCH, 3, SIZE, SIZE], "depth": [BATCH, 1, SIZE, SIZE]}


def _counts(checkout: Path) -> dict[str, dict[str, int]]:
    """Their ``WeTr`` parameters on MiT-B0..B5 at NYUDv2's 40 and SUN RGB-D's 37 classes."""
    return {
        tag: {f"geminifusion_mit_{v}": count_parameters(_wetr(checkout, v, classes, 0.0)) for v in ("b0", "b1", "b2", "b3", "b4", "b5")}
        for tag, classes in CLASS_COUNTS.items()
    }


def converted(fixture: dict) -> nn.Module:
    """Our entry of the fixture, built on the meta device (no initialization) and given the
    converted authors' state dict that the rule rebuilds from the fixture's key/shape list."""

    with torch.device("meta"):
        model = fz.create_model(fixture["model"], **fixture["config"])
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    model.load_state_dict(convert_state_dict(fixture["model"], authors, model), strict=True, assign=True)
    return model


def check(folder: Path) -> dict[str, tuple[float, float]]:
    """Ours against the committed fixture in float64 (no authors' code needed): eval and train
    outputs (ensemble at input size, their three stride-4 outputs), and train-mode gradients w.r.t.
    both inputs and alpha; each ``seeded.parity_errors`` (relative error, bound from the drift)."""
    fixture = read_fixture(folder)
    golden = load_file(folder / "outputs.safetensors")
    model = converted(fixture).double()
    inputs = to_float64(seeded_inputs(fixture["inputs"], fixture["seed_inputs"]))
    taps = ("rgb.head", "depth.head", "head.logits")
    ours: dict[str, torch.Tensor] = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        leaves = {k: v.clone().requires_grad_(mode == "train") for k, v in inputs.items()}
        with fz.capture(model, *taps) as acts:
            out = model(leaves)
        ours[f"{mode}_logits"] = out.detach()
        for tap, theirs in zip(taps, ("rgb", "depth", "ens")):
            ours[f"{mode}_{theirs}"] = acts[tap]
    ensemble = model.forward_logits(model.check_inputs(leaves), ())
    sum(z.square().mean() for z in (*model.side_logits, ensemble)).backward()
    ours.update({f"train_grad_{m}": leaf.grad for m, leaf in leaves.items()})
    ours["alpha_grad"] = model.alpha.grad
    return parity_errors(ours, golden, fixture["float32_drift"])


def float64_diffs(checkout: Path) -> dict[str, float]:
    """Theirs and ours side by side in float64 on the fixture's configuration (same rule-filled
    weights, same input): max abs differences of the three outputs, eval and train mode."""

    net = _no_dropout(_wetr(checkout, VARIANT, NUM_CLASSES, 0.0))
    authors = fill_state_dict(key_shapes(net.state_dict()), SEED_WEIGHTS)
    net.load_state_dict(authors)
    mine = fz.create_model(f"geminifusion_mit_{VARIANT}", num_classes=NUM_CLASSES, dropout=0.0, drop_path_rate=0.0)
    mine.load_state_dict(convert_state_dict(f"geminifusion_mit_{VARIANT}", authors, mine))
    net, mine = net.double(), mine.double()
    inputs = {k: v.double() for k, v in seeded_inputs(input_shapes(), SEED_INPUTS).items()}
    taps = ("rgb.head", "depth.head", "head.logits")
    diffs: dict[str, float] = {}
    for mode in ("eval", "train"):
        net.train(mode == "train")
        mine.train(mode == "train")
        with torch.no_grad(), fz.capture(mine, *taps) as acts:
            theirs = net(list(reference_inputs(inputs)))[0]
            mine(inputs)
        for tap, their, name in zip(taps, theirs, ("rgb", "depth", "ens")):
            diffs[f"{mode}_{name}"] = float((acts[tap] - their).abs().max())
    return diffs


def reference_outputs(net: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their ``WeTr`` in eval mode, then train mode (batch statistics) with the gradients of
    ``sum(mean(out ** 2))`` over the three outputs: the fixture's eleven tensors."""
    outputs: dict[str, torch.Tensor] = {}
    net.eval()
    with torch.no_grad():
        rgb, depth, ens = net(list(reference_inputs(inputs)))[0]
    outputs.update({"eval_rgb": rgb, "eval_depth": depth, "eval_ens": ens})
    outputs["eval_logits"] = F.interpolate(ens, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    net.train()  # BatchNorm on batch statistics
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    rgb, depth, ens = net(list(reference_inputs(leaves)))[0]
    sum(out.square().mean() for out in (rgb, depth, ens)).backward()
    outputs.update({"train_rgb": rgb, "train_depth": depth, "train_ens": ens, "alpha_grad": net.alpha.grad.clone()})
    outputs["train_logits"] = F.interpolate(ens, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    outputs.update({f"train_grad_{m}": leaf.grad for m, leaf in leaves.items()})
    net.zero_grad(set_to_none=True)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, help="checkout of JiaDingCN/GeminiFusion")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    parser.add_argument("--check", action="store_true", help="only print ours vs the committed fixture")
    parser.add_argument("--float64", action="store_true", help="with --ref: theirs vs ours in float64, no fixture written")
    args = parser.parse_args()
    if args.check:
        return print_errors(check(args.out))
    if args.ref is None:
        parser.error("--ref is required to regenerate the fixture (or use --check)")
    if args.float64:
        return print_diffs(float64_diffs(args.ref), " (float64)")

    commit = subprocess.run(["git", "-C", str(args.ref), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    if commit != ours.REFERENCE_COMMIT:
        print(f"warning: checkout is at {commit}, the entries name {ours.REFERENCE_COMMIT}", file=sys.stderr)
    torch.manual_seed(0)
    net = _no_dropout(_wetr(args.ref, VARIANT, NUM_CLASSES, 0.0))  # drop path off
    shapes = key_shapes(net.state_dict())
    inputs = seeded_inputs(input_shapes(), SEED_INPUTS)
    # In float64 (written) and float32 (its drift, which sets the test's bound).
    outputs, drift = loaded_in_both_precisions(
        net, fill_state_dict(shapes, SEED_WEIGHTS), lambda dtype: reference_outputs(net, {k: v.to(dtype) for k, v in inputs.items()}))
    fixture = {
        "reference_repo": ours.REFERENCE_REPO,
        "reference_commit": commit,
        "regenerate": "python tools/parity/geminifusion.py --ref <checkout of the reference repository>",
        "network": f"models/segformer.py WeTr('mit_{VARIANT}', {NUM_CLASSES}, n_heads={N_HEADS}, dpr=0, drop_rate=0), decoder dropout off",
        "model": f"geminifusion_mit_{VARIANT}",
        "config": {"num_classes": NUM_CLASSES, "modalities": ["rgb", "depth"], "dropout": 0.0, "drop_path_rate": 0.0},
        "rule": RULE,
        "seed_weights": SEED_WEIGHTS,
        "seed_inputs": SEED_INPUTS,
        "inputs": input_shapes(),
        "outputs": "{mode}_rgb / _depth / _ens: their three outputs at stride 4; {mode}_logits: ens upsampled "
                   "bilinearly to the input size (our output); train: eval first, then train mode",
        "train_loss": "sum of mean(out ** 2) over their three outputs; gradients w.r.t. both inputs and alpha",
        "dtype": "float64",
        "float32_drift": drift,
        "authors_param_counts": _counts(args.ref),
        "authors_state_dict": shapes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in outputs.items()}, str(args.out / "outputs.safetensors"))
    (args.out / "fixture.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}: {len(shapes)} authors' tensors; parameter counts {fixture['authors_param_counts']}")


if __name__ == "__main__":
    main()
