"""Regenerate tests/fixtures/parity/esanet/ from a checkout of the ESANet authors' code.

    python tools/parity/esanet.py --ref /path/to/TUI-NICR/ESANet

Builds the reference ESANet (its ``src/models/model.py``) in reduced configurations (few
classes, small decoder, a 64x64 input) for each encoder block type, fills its state dict by the
shared rule (``fusionzoo.models.published.parity.fill_state_dict``), and records its outputs in eval mode and in train mode (the
network output plus the three side outputs) for a seeded input. Also records the key/shape list
and the parameter count of every full-size variant at 40 classes (the reference configuration:
decoder channels 512/256/128, three NBt1D blocks per decoder module, "ppm" context module,
"learned-3x3-zeropad" upsampling). Only numbers are written; none of the authors' code.

The module also exposes :func:`reference_model` and :func:`reference_inputs` for
``bench/parity.py`` (speed side by side).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import sys
import types
import warnings
from pathlib import Path

import torch
from torch import nn

from fusionzoo.models.published.parity import (
    RULE,
    fill_state_dict,
    key_shapes,
    max_abs_diff,
    read_fixture,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import loaded_in_both_precisions, parity_errors, print_errors, to_float64

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "parity" / "esanet"
WEIGHT_SEED = 0
INPUT_SEED = 1
INPUT_SHAPE = (2, 64, 64)  # batch, H, W (batch 2: train-mode BatchNorm after 1x1 pooling needs > 1 value)
NUM_CLASSES = 3
FULL_NUM_CLASSES = 40

# Our entry suffix -> the reference's (encoder, encoder_block).
VARIANTS = {
    "r18": ("resnet18", "BasicBlock"),
    "r18_nbt1d": ("resnet18", "NonBottleneck1D"),
    "r34": ("resnet34", "BasicBlock"),
    "r34_nbt1d": ("resnet34", "NonBottleneck1D"),
    "r50": ("resnet50", "BasicBlock"),  # the reference ignores the block for ResNet-50 (Bottleneck)
}
FULL = {"decoder_channels": (512, 256, 128), "decoder_blocks": (3, 3, 3)}
# Reduced cases: one per encoder block type; decoder channels chosen so that skips of both kinds
# occur (a 1x1 ConvBNAct where encoder and decoder channels differ, the identity where equal).
CASES = {
    "r18_nbt1d": {"variant": "r18_nbt1d", "decoder_channels": (256, 128, 32), "decoder_blocks": (2, 1, 1)},
    "r18": {"variant": "r18", "decoder_channels": (64, 32, 16), "decoder_blocks": (1, 1, 1)},
    "r50": {"variant": "r50", "decoder_channels": (64, 32, 16), "decoder_blocks": (1, 1, 1)},
}


def make_inputs(seed: int = INPUT_SEED) -> dict[str, torch.Tensor]:
    """The seeded RGB-D input: rgb ``(2, 3, 64, 64)`` then depth ``(2, 1, 64, 64)``, both N(0, 1)."""
    b, h, w = INPUT_SHAPE
    return seeded_inputs({"rgb": (b, 3, h, w), "depth": (b, 1, h, w)}, seed)


def _import_reference(checkout: Path) -> type[nn.Module]:
    """The reference ``ESANet`` class; ``pandas`` (imported by their resnet.py only to pick an
    ImageNet checkpoint from a CSV log, unused here) is stubbed when absent."""
    checkout = Path(checkout).resolve()
    if not (checkout / "src" / "models" / "model.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of TUI-NICR/ESANet (no src/models/model.py)")
    try:
        import pandas  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        sys.modules["pandas"] = stub
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from src.models.model import ESANet  # type: ignore[import-not-found]

    return ESANet


def reference_model(
    checkout: Path,
    variant: str,
    num_classes: int,
    decoder_channels: tuple[int, int, int] = FULL["decoder_channels"],
    decoder_blocks: tuple[int, int, int] = FULL["decoder_blocks"],
) -> nn.Module:
    """The authors' ESANet for our entry ``esanet_{variant}`` (``"r34_nbt1d"`` or the full entry
    name), reference configuration unless the decoder is given; random init, no downloads."""
    esanet = _import_reference(checkout)
    variant = variant.removeprefix("esanet_")
    if variant not in VARIANTS:
        raise SystemExit(f"unknown ESANet variant {variant!r}; one of {sorted(VARIANTS)}")
    encoder, block = VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # their constructor warns about ignored/defaulted options
        return esanet(
            height=480, width=640, num_classes=num_classes, encoder_rgb=encoder, encoder_depth=encoder,
            encoder_block=block, channels_decoder=list(decoder_channels), pretrained_on_imagenet=False,
            activation="relu", encoder_decoder_fusion="add", context_module="ppm",
            nr_decoder_blocks=list(decoder_blocks), fuse_depth_in_rgb_encoder="SE-add",
            upsampling="learned-3x3-zeropad",
        )


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """How the reference forward is called: ``model(rgb, depth)``."""
    return model_inputs["rgb"], model_inputs["depth"]


def check_convert(checkout: Path, workdir: Path) -> float:
    """End to end at full size: the authors' ESANet-R34-NBt1D (40 classes, filled by the rule) saved
    as they release it (``{"state_dict": ...}`` in ``nyuv2/r34_NBt1D.pth`` inside a ``.tar.gz``),
    converted by ``fusionzoo.convert_checkpoint``, reloaded by ``fusionzoo.from_pretrained``;
    returns the max abs difference of the eval outputs on the seeded input."""
    import io
    import tarfile

    import fusionzoo as fz

    model = reference_model(checkout, "r34_nbt1d", FULL_NUM_CLASSES)
    model.load_state_dict(fill_state_dict(key_shapes(model.state_dict()), WEIGHT_SEED), strict=True)
    workdir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"epoch": 0, "state_dict": model.state_dict()}, buf)
    archive = workdir / "nyuv2_r34_NBt1D.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("nyuv2/r34_NBt1D.pth")
        info.size = buf.tell()
        buf.seek(0)
        tar.addfile(info, buf)
    ours = fz.from_pretrained(fz.convert_checkpoint("esanet_r34_nbt1d", archive, workdir / "converted"))
    inputs = make_inputs()
    with torch.no_grad():
        return max_abs_diff(model.eval()(*reference_inputs(inputs)), ours.eval()(inputs))


def measure_errors(fixtures: Path = FIXTURES, cases: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Our entries (converted authors' state dict) against the fixture outputs, per case and mode,
    both in float64: ``seeded.parity_errors`` (relative error, tolerance from the reference's
    float32 drift); what tests/test_parity_esanet.py bounds. Needs no checkout."""
    from safetensors.torch import load_file

    import fusionzoo as fz
    from fusionzoo.models.convert import convert_state_dict

    meta = read_fixture(fixtures)
    golden = load_file(str(fixtures / "outputs.safetensors"))
    errors = {}
    for case, cfg in meta["cases"].items():
        if cases is not None and case not in cases:
            continue
        name = f"esanet_{cfg['variant']}"
        with torch.device("meta"):
            model = fz.create_model(name, num_classes=meta["num_classes"], decoder_channels=cfg["decoder_channels"],
                                    decoder_blocks=cfg["decoder_blocks"])
        authors = fill_state_dict(cfg["keys"], meta["weight_seed"])
        model.load_state_dict(convert_state_dict(name, authors, model), strict=True, assign=True)
        model.double()
        inputs = to_float64(make_inputs(meta["input_seed"]))
        with torch.no_grad():
            ours = {f"{case}.eval": model.eval()(inputs), f"{case}.train": model.train()(inputs)}
            ours.update({f"{case}.train.side{stride}": side for stride, side in zip((8, 16, 32), model.side_logits)})
        errors.update(parity_errors(ours, {k: golden[k] for k in ours}, meta["float32_drift"]))
    return errors


def reference_outputs(model: nn.Module, case: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The reference's eval output, then its train output and three side outputs, in ``dtype``."""
    inputs = {k: v.to(dtype) for k, v in make_inputs().items()}
    with torch.no_grad():
        out = {f"{case}.eval": model.eval()(*reference_inputs(inputs))}
        train, side8, side16, side32 = model.train()(*reference_inputs(inputs))
    out[f"{case}.train"] = train
    out.update({f"{case}.train.side{stride}": side for stride, side in ((8, side8), (16, side16), (32, side32))})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, help="checkout of https://github.com/TUI-NICR/ESANet")
    parser.add_argument("--out", type=Path, default=FIXTURES)
    parser.add_argument("--check-convert", type=Path, metavar="DIR",
                        help="instead: convert a full-size authors'-format release file in DIR end to end and print the max abs diff")
    parser.add_argument("--diffs", action="store_true",
                        help="instead: print our relative errors to the committed fixtures and their tolerances (no checkout needed)")
    args = parser.parse_args(argv)
    if args.diffs:
        print_errors(measure_errors(args.out))
        return 0
    if args.ref is None:
        parser.error("--ref is required (a checkout of https://github.com/TUI-NICR/ESANet)")
    if args.check_convert is not None:
        print(f"esanet_r34_nbt1d convert end to end: max abs diff {check_convert(args.ref, args.check_convert):.3g}")
        return 0
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict = {
        "reference_repo": "https://github.com/TUI-NICR/ESANet",
        "weight_seed": WEIGHT_SEED, "input_seed": INPUT_SEED, "input_shape": list(INPUT_SHAPE),
        "num_classes": NUM_CLASSES, "rule": RULE, "dtype": "float64",
        "float32_drift": {}, "cases": {}, "full": {},
    }
    tensors: dict[str, torch.Tensor] = {}
    for case, cfg in CASES.items():
        model = reference_model(args.ref, cfg["variant"], NUM_CLASSES, cfg["decoder_channels"], cfg["decoder_blocks"])
        keys = key_shapes(model.state_dict())
        state = fill_state_dict(keys, WEIGHT_SEED)
        outputs, drift = loaded_in_both_precisions(model, state, lambda dtype, model=model, case=case: reference_outputs(model, case, dtype))
        tensors.update(outputs)
        meta["float32_drift"].update(drift)
        meta["cases"][case] = {
            "variant": cfg["variant"], "decoder_channels": list(cfg["decoder_channels"]),
            "decoder_blocks": list(cfg["decoder_blocks"]), "keys": keys,
        }
        print(f"{case}: {len(keys)} tensors, eval output max |x| {tensors[f'{case}.eval'].abs().max():.3g}, float32 drift {drift}")
    for variant in VARIANTS:
        with torch.device("meta"):
            model = reference_model(args.ref, variant, FULL_NUM_CLASSES)
        params = sum(p.numel() for p in model.parameters())
        meta["full"][variant] = {"num_classes": FULL_NUM_CLASSES, "parameters": params, "keys": key_shapes(model.state_dict())}
        print(f"full {variant}: {params} parameters")
    (args.out / "fixture.json").write_text(json.dumps(meta, separators=(",", ":")) + "\n")
    save_file(tensors, str(args.out / "outputs.safetensors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
