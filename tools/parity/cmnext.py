#!/usr/bin/env python
"""Regenerate tests/fixtures/parity/cmnext/ from a checkout of the authors' CMNeXt repository.

    python tools/parity/cmnext.py --ref /path/to/DELIVER
    python tools/parity/cmnext.py --check     # ours against the committed fixture, max abs diffs

Reference: https://github.com/jamycheung/DELIVER (the commit is read from the checkout and must
equal ``fusionzoo.models.published.cmnext.REFERENCE_COMMIT``). Their code is imported from the
checkout at run time; none of it is in this project. Their modules import ``fvcore`` (FLOP
counting), ``mmcv`` (``build_norm_layer``, here only BatchNorm), ``tabulate`` and ``einops``
through package ``__init__`` files that CMNeXt does not use; :func:`_import_authors` stands in
for that glue at run time (a BatchNorm for ``build_norm_layer``, empty names for the rest) and
imports only ``semseg.models.cmnext`` and what it needs.

Their ``cmnext_settings`` holds B2, B4 and B5; its B0, B1 and B3 rows are commented out. The
script reinstates those rows (the widths and depths written in those comments) in the imported
module, so their ``CMNeXt`` builds MiT-B0 for the reduced fixture and all six for the counts.

What it writes (numbers only):

- ``fixture.json``: the reference commit; two reduced configurations, RGB + HHA and RGB + HHA +
  event (MiT-B0, decoder embedding 256, 3 classes, 2x3x64x48 inputs, drop path and dropout off),
  each with the authors' key/shape list; the fill rule and seeds; the authors' parameter counts
  of CMNeXt-B0..B5 for RGB-D at 40 classes and of the DeLiVER RGB-D-E-L network (B2, 25
  classes); and their per-block drop-path rates of B2;
- ``outputs.safetensors``: per configuration the eval-mode and train-mode logits, and in train
  mode the gradients of ``mean(logits ** 2)`` with respect to every input, in float64 (the rule's
  float32 weights and inputs cast); ``fixture.json`` also records ``float32_drift``, how far a
  float32 run of theirs moves each (``seeded.float32_drift``; the test's bound is ``seeded.tolerance``).

The module also gives ``bench/parity.py`` the authors' model: :func:`reference_model` and
:func:`reference_inputs`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published import cmnext as ours
from fusionzoo.models.published.parity import (
    RULE,
    fill_state_dict,
    key_shapes,
    read_fixture,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import loaded_in_both_precisions, parity_errors, print_errors, to_float64

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "cmnext"
SEED_WEIGHTS = 4321
SEED_INPUTS = 8765
NUM_CLASSES = 3
BATCH, HEIGHT, WIDTH = 2, 64, 48  # not square, so the authors' (h, w) reshape of the hub features is exercised
FULL_CLASSES = 40  # NYUDv2
# The rows commented out in the authors' cmnext_settings (widths, depths).
COMMENTED_SETTINGS = {
    "B0": [[32, 64, 160, 256], [2, 2, 2, 2]],
    "B1": [[64, 128, 320, 512], [2, 2, 2, 2]],
    "B3": [[64, 128, 320, 512], [3, 4, 18, 3]],
}
# Our modality names -> the authors' MODALS names (their first is 'img').
AUTHORS_MODALS = {"rgb": "img", "hha": "depth", "depth": "depth", "event": "event", "lidar": "lidar", "thermal": "thermal"}
CONFIGS = {"rgbd": ("rgb", "hha"), "rgbde": ("rgb", "hha", "event")}


def _import_authors(checkout: Path) -> SimpleNamespace:
    """``semseg.models.cmnext`` and its backbone, imported from ``checkout`` without running
    their package ``__init__`` files (see the module docstring for the stand-ins)."""
    checkout = checkout.resolve()
    semseg = checkout / "semseg"
    if not (semseg / "models" / "cmnext.py").is_file():
        raise SystemExit(f"error: {checkout} is not a checkout of jamycheung/DELIVER (no semseg/models/cmnext.py)")
    if "semseg.models.cmnext" in sys.modules:
        return SimpleNamespace(model=sys.modules["semseg.models.cmnext"], backbone=sys.modules["semseg.models.backbones.cmnext"])

    def module(name: str, path: Path | None = None, **attrs: object) -> types.ModuleType:
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = [str(path)]  # a package whose __init__ is not run
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def build_norm_layer(cfg: dict, channels: int) -> tuple[str, nn.Module]:
        if cfg.get("type") != "BN":
            raise ValueError(f"stand-in build_norm_layer only builds BN, got {cfg}")
        return "bn", nn.BatchNorm2d(channels)

    module("fvcore")
    module("fvcore.nn", flop_count_table=None, FlopCountAnalysis=None)
    module("mmcv")
    module("mmcv.cnn", build_norm_layer=build_norm_layer)
    module("semseg", semseg)
    module("semseg.utils", semseg / "utils")
    module("semseg.utils.utils", nchw_to_nlc=None, nlc_to_nchw=None)  # imported, unused by CMNeXt
    module("semseg.models", semseg / "models")
    backbones = module("semseg.models.backbones", semseg / "models" / "backbones")
    backbone = importlib.import_module("semseg.models.backbones.cmnext")
    backbones.CMNeXt = backbone.CMNeXt
    heads = module("semseg.models.heads", semseg / "models" / "heads")
    heads.SegFormerHead = importlib.import_module("semseg.models.heads.segformer").SegFormerHead
    heads.LightHamHead = heads.UPerHead = None  # imported, unused by CMNeXt
    for name, setting in COMMENTED_SETTINGS.items():
        backbone.cmnext_settings.setdefault(name, setting)
    model = importlib.import_module("semseg.models.cmnext")
    return SimpleNamespace(model=model, backbone=backbone)


def _commit(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def _authors_model(checkout: Path, variant: str, num_classes: int, modalities: tuple[str, ...]) -> nn.Module:
    authors = _import_authors(Path(checkout))
    modals = [AUTHORS_MODALS[m] for m in modalities]
    return authors.model.CMNeXt(f"CMNeXt-{variant.upper()}", num_classes, modals)


def reference_model(checkout: Path, variant: str, num_classes: int) -> nn.Module:
    """The authors' ``CMNeXt`` for ``variant`` (``b2`` or ``mit_b2``) on RGB + depth (HHA), as
    their ``train_mm.py`` builds it (B0, B1, B3 from their commented-out settings rows)."""
    return _authors_model(checkout, variant.removeprefix("mit_"), num_classes, ("rgb", "hha"))


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor]]:
    """Their ``forward(x)`` takes one list of tensors, RGB first, in their ``MODALS`` order."""
    return (list(model_inputs.values()),)


def authors_drop_path(checkout: Path, variant: str) -> dict[str, list[list[float]]]:
    """Stochastic-depth rate of every block of their ``CMNeXt-<variant>`` backbone (RGB
    ``block1..4``, auxiliary ``extra_block1..4``), 0 where they put an Identity."""
    backbone = _authors_model(checkout, variant, FULL_CLASSES, ("rgb", "hha")).backbone

    def rate(block: nn.Module) -> float:
        dp = block.drop_path
        return float(getattr(dp, "p", getattr(dp, "drop_prob", 0.0)) or 0.0)

    def rates(prefix: str) -> list[list[float]]:
        return [[rate(b) for b in getattr(backbone, f"{prefix}{k}")] for k in range(1, 5)]

    return {"rgb": rates("block"), "auxiliary": rates("extra_block")}


def _no_drop(model: nn.Module) -> None:
    """Drop path and dropout off (their backbone hard-codes drop_path_rate=0.1)."""
    for module in model.modules():
        for name, child in module.named_children():
            if type(child).__name__ == "DropPath":  # theirs (semseg.models.layers) and timm's (PPX)
                setattr(module, name, nn.Identity())
            elif isinstance(child, (nn.Dropout, nn.Dropout2d)):
                child.p = 0.0


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(model: nn.Module, inputs: dict[str, torch.Tensor], forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Eval logits, then train logits and input gradients of ``mean(logits ** 2)``."""
    model.eval()
    with torch.no_grad():
        out = {"eval_logits": forward(inputs).contiguous()}
    model.train()
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    train = forward(leaves)
    train.square().mean().backward()
    out["train_logits"] = train.detach().contiguous()
    out.update({f"train_grad_{m}": leaf.grad.contiguous() for m, leaf in leaves.items()})
    return out


def to_float(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in inputs.items()}


def check(folder: Path) -> dict[str, tuple[float, float]]:
    """Ours against the committed fixture in float64 (no authors' code needed): eval and train
    logits and train-mode input gradients, each ``seeded.parity_errors`` (relative error, bound)."""
    fixture = read_fixture(folder)
    golden = load_file(folder / "outputs.safetensors")
    errors: dict[str, tuple[float, float]] = {}
    for key, cfg in fixture["configs"].items():
        model = fz.create_model(fixture["model"], **cfg["config"])
        authors = fill_state_dict(cfg["authors_state_dict"], fixture["seed_weights"])
        model.load_state_dict(convert_state_dict(fixture["model"], authors, model))
        ours = _run(model.double(), to_float64(seeded_inputs(cfg["inputs"], fixture["seed_inputs"])), model)
        ours = {f"{key}.{name}": value for name, value in ours.items()}
        errors.update(parity_errors(ours, {k: golden[k] for k in ours}, fixture["float32_drift"]))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", type=Path, help="checkout of jamycheung/DELIVER")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    parser.add_argument("--check", action="store_true", help="only print ours vs the committed fixture")
    args = parser.parse_args()
    if args.check:
        return print_errors(check(args.out))
    if args.ref is None:
        parser.error("--ref is required to regenerate the fixture (or use --check)")

    commit = _commit(args.ref)
    if commit != ours.REFERENCE_COMMIT:
        print(f"warning: checkout is at {commit}, the entries name {ours.REFERENCE_COMMIT}", file=sys.stderr)

    outputs: dict[str, torch.Tensor] = {}
    drifts: dict[str, float] = {}
    configs = {}
    for key, modalities in CONFIGS.items():
        torch.manual_seed(0)
        model = _authors_model(args.ref, "b0", NUM_CLASSES, modalities)
        _no_drop(model)
        shapes = key_shapes(model.state_dict())
        input_shapes = {m: [BATCH, 3, HEIGHT, WIDTH] for m in modalities}
        inputs = seeded_inputs(input_shapes, SEED_INPUTS)
        # In float64 (written) and float32 (its drift, which sets the test's bound).
        run, drift = loaded_in_both_precisions(
            model, fill_state_dict(shapes, SEED_WEIGHTS),
            lambda dtype, model=model, inputs=inputs: _run(model, to_float(inputs, dtype), lambda xs: model(*reference_inputs(xs))))
        outputs.update({f"{key}.{name}": value for name, value in run.items()})
        drifts.update({f"{key}.{name}": value for name, value in drift.items()})
        configs[key] = {
            "config": {"num_classes": NUM_CLASSES, "modalities": list(modalities), "dropout": 0.0, "drop_path_rate": 0.0},
            "authors_config": {"backbone": "CMNeXt-B0", "num_classes": NUM_CLASSES,
                               "modals": [AUTHORS_MODALS[m] for m in modalities], "drop_path": "off", "dropout": "off"},
            "inputs": input_shapes,
            "authors_state_dict": shapes,
        }

    counts = {f"cmnext_mit_{v}": _count(_authors_model(args.ref, v, FULL_CLASSES, ("rgb", "hha"))) for v in ("b0", "b1", "b2", "b3", "b4", "b5")}
    deliver = _count(_authors_model(args.ref, "b2", 25, ("rgb", "hha", "event", "lidar")))
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(outputs, args.out / "outputs.safetensors")
    fixture = {
        "reference_repo": ours.REFERENCE_REPO,
        "reference_commit": commit,
        "regenerate": "python tools/parity/cmnext.py --ref <checkout of the reference repository>",
        "model": "cmnext_mit_b0",
        "rule": RULE,
        "seed_weights": SEED_WEIGHTS,
        "seed_inputs": SEED_INPUTS,
        "train_loss": "mean(logits ** 2), gradients w.r.t. every input",
        "dtype": "float64",
        "float32_drift": drifts,
        "authors_param_counts_rgbd_40_classes": counts,
        "authors_param_count_b2_rgbdel_25_classes": deliver,
        "authors_drop_path_b2": authors_drop_path(args.ref, "b2"),
        "configs": configs,
    }
    (args.out / "fixture.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}: configurations {list(configs)}; parameter counts {counts}, DeLiVER RGB-D-E-L B2 {deliver}")


if __name__ == "__main__":
    main()
