#!/usr/bin/env python
"""Regenerate tests/fixtures/parity/dformer/ from a checkout of the authors' DFormer repository.

    python tools/parity/dformer.py --ref /path/to/DFormer
    python tools/parity/dformer.py --check     # ours against the committed fixture, max abs diffs
                                               # (fusionzoo.models.published.parity.check_fixture)

Reference: https://github.com/VCIP-RGBD/DFormer (the commit is read from the checkout and must
equal ``fusionzoo.models.published.dformer.REFERENCE_COMMIT``). Their code is imported from the
checkout at run time; none of it is in this project. It needs OpenMMLab's ``mmcv`` (their layers
use ``ConvModule``, ``build_norm_layer``, ``build_dropout``) and ``mmengine`` (``BaseModule``):
the pure-Python builds do, e.g. ``pip install --target /tmp/mm --no-deps mmcv-lite==2.1.0
mmengine addict yapf termcolor`` and ``PYTHONPATH=/tmp/mm``. Two pieces of their glue are
replaced at run time, in this script:

- ``mmseg.ops.resize`` (mmsegmentation 0.x's wrapper of ``F.interpolate``; their repository's
  ``mmseg/`` folder holds only configs): ``F.interpolate`` with the same arguments;
- ``NMF2D._build_bases`` moves the bases to CUDA unconditionally (``torch.rand(...).cuda()``);
  here the same draw from the global CPU generator stays on the CPU when CUDA is absent, and is
  cast to the network's dtype before it is normalized in the float64 run (ours does the same).

What it writes (numbers only):

- ``fixture.json``: the reference commit, the reduced configuration (DFormer-Tiny with the Ham
  decoder, 3 classes, 2x3x64x96 RGB and 2x1x64x96 depth, drop path and dropout off), the
  authors' key/shape list, the fill rule and seeds, the NMF seed (``torch.manual_seed`` right
  before every forward, so both networks start the NMF from the same bases), and the authors'
  parameter counts of DFormer-T/S/B/L at 40 classes (``EncoderDecoder`` with ``C.decoder =
  "ham"``, ``C.aux_rate = 0`` as their NYUDepthv2 configs) and their per-block drop-path rates
  of DFormer-L (``C.drop_path_rate = 0.15``); and ours against theirs for Small, Base and Large at
  full size and 40 classes on the same seeded inputs, both in float64 (relative errors, eval and
  train), so the variants the fixture does not run are compared too;
- ``outputs.safetensors``: eval-mode and train-mode logits, and in train mode the gradients of
  ``mean(logits ** 2)`` with respect to both inputs, in float64 (the rule's float32 weights and
  inputs cast); ``fixture.json`` also records ``float32_drift``, how far a float32 run of theirs
  moves each (``seeded.float32_drift``; the test's bound is ``seeded.tolerance``).

The module also gives ``bench/parity.py`` the authors' model: :func:`reference_model` and
:func:`reference_inputs`.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import fusionzoo as fz
from fusionzoo.models.convert import convert_state_dict
from fusionzoo.models.published import dformer as ours
from fusionzoo.models.published.parity import (
    RULE,
    eval_and_train_outputs,
    fill_state_dict,
    key_shapes,
    regeneration_args,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import loaded_in_both_precisions, relative_error, to_float64

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "dformer"
SEED_WEIGHTS = 1234
SEED_INPUTS = 5678
SEED_NMF = 91011
NUM_CLASSES = 3
BATCH, HEIGHT, WIDTH = 2, 64, 96  # stage 2 is 8x12, so GAA pools a grid larger than its 7x7
FULL_CLASSES = 40  # NYUDv2
BACKBONES = {"tiny": "DFormer-Tiny", "small": "DFormer-Small", "base": "DFormer-Base", "large": "DFormer-Large"}
# C.drop_path_rate of local_configs/NYUDepthv2/DFormer_*.py
CONFIG_DROP_PATH = {"tiny": 0.1, "small": 0.1, "base": 0.1, "large": 0.15}


def _resize(input, size=None, scale_factor=None, mode="nearest", align_corners=None, warning=True):
    return F.interpolate(input, size, scale_factor, mode, align_corners)


# The dtype the NMF bases are cast to before normalizing (set per run by main: float64 or float32).
BASES_DTYPE = [torch.float32]


def _cpu_bases(self, B, S, D, R, cuda=False):
    bases = torch.rand((B * S, D, R))  # their draw, from the global CPU generator
    if cuda and torch.cuda.is_available():
        bases = bases.cuda()
    # Their bases are always float32 (torch.rand's default), which torch.bmm refuses to multiply
    # with a float64 network: in the float64 run the same draw is cast before normalizing.
    return F.normalize(bases.to(BASES_DTYPE[0]), dim=1)


def _import_authors(checkout: Path) -> SimpleNamespace:
    """The authors' modules from ``checkout`` (packages ``models``, ``utils``), with the two
    replacements of the module docstring."""
    checkout = checkout.resolve()
    if not (checkout / "models" / "encoders" / "DFormer.py").is_file():
        raise SystemExit(f"error: {checkout} is not a checkout of VCIP-RGBD/DFormer (no models/encoders/DFormer.py)")
    try:
        import mmcv.cnn  # noqa: F401
        import mmengine.model  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: the authors' DFormer code needs mmcv and mmengine ({e}); see this script's docstring") from None
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    ops = types.ModuleType("mmseg.ops")
    ops.resize = _resize  # type: ignore[attr-defined]
    sys.modules.setdefault("mmseg.ops", ops)
    with contextlib.redirect_stdout(io.StringIO()):  # their constructors print their settings
        from models import builder  # type: ignore[import-not-found]
        from models.decoders import ham_head  # type: ignore[import-not-found]
    ham_head.NMF2D._build_bases = _cpu_bases
    return SimpleNamespace(builder=builder)


def _cfg(variant: str, num_classes: int, drop_path_rate: float) -> SimpleNamespace:
    # The fields models/builder.py reads from local_configs/NYUDepthv2/DFormer_*.py, pretrained off.
    return SimpleNamespace(
        backbone=BACKBONES[variant], decoder="ham", decoder_embed_dim=512, num_classes=num_classes,
        pretrained_model=None, bn_eps=1e-3, bn_momentum=0.1, drop_path_rate=drop_path_rate, aux_rate=0.0, background=255,
    )


def reference_model(checkout: Path, variant: str, num_classes: int, drop_path_rate: float | None = None) -> nn.Module:
    """The authors' training network ``EncoderDecoder`` for ``variant`` (``tiny`` .. ``large``),
    built as their ``train.py`` does (with a criterion, so ``init_weight`` sets the decoder's BN
    eps 1e-3); drop path from the variant's NYUDepthv2 config unless given."""
    if variant not in BACKBONES:
        raise ValueError(f"unknown DFormer variant {variant!r}; choose one of {sorted(BACKBONES)}")
    authors = _import_authors(Path(checkout))
    rate = CONFIG_DROP_PATH[variant] if drop_path_rate is None else drop_path_rate
    with contextlib.redirect_stdout(io.StringIO()):
        return authors.builder.EncoderDecoder(
            cfg=_cfg(variant, num_classes, rate), criterion=nn.CrossEntropyLoss(reduction="none", ignore_index=255)
        )


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Their ``forward(rgb, modal_x)`` arguments from our input dict (RGB first, then depth; their
    backbone uses the first channel of ``modal_x``, so a 1-channel depth goes in as it is)."""
    return tuple(model_inputs.values())


def authors_drop_path(checkout: Path, variant: str) -> list[list[float]]:
    """Stochastic-depth rate of every block of their ``variant`` at its NYUDepthv2 config's rate."""
    model = reference_model(checkout, variant, FULL_CLASSES)
    return [[float(getattr(b.dropout_layer, "drop_prob", 0.0)) for b in stage] for stage in model.backbone.stages]


def full_size_diffs(checkout: Path, variant: str) -> dict[str, float]:
    """Ours against theirs for ``variant`` at full size and 40 classes, both in float64 (drop path
    and dropout off, weights by the rule, the fixture's input shapes and seeds): per output of
    :func:`eval_and_train_outputs`, ``seeded.relative_error``."""
    theirs = reference_model(checkout, variant, FULL_CLASSES, drop_path_rate=0.0)
    _no_dropout(theirs)
    authors = fill_state_dict(key_shapes(theirs.state_dict()), SEED_WEIGHTS)
    theirs.load_state_dict(authors)
    name = f"dformer_{variant}"
    mine = fz.create_model(name, num_classes=FULL_CLASSES, drop_path_rate=0.0, dropout=0.0, nmf_eval_seed=None)
    mine.load_state_dict(convert_state_dict(name, authors, mine))
    theirs, mine = theirs.double(), mine.double()
    inputs = to_float64(seeded_inputs({"rgb": [BATCH, 3, HEIGHT, WIDTH], "depth": [BATCH, 1, HEIGHT, WIDTH]}, SEED_INPUTS))
    BASES_DTYPE[0] = torch.float64
    try:
        golden = eval_and_train_outputs(lambda xs: theirs(*reference_inputs(xs)), theirs, inputs, seed=SEED_NMF)
    finally:
        BASES_DTYPE[0] = torch.float32
    ours = eval_and_train_outputs(mine, mine, inputs, seed=SEED_NMF)
    return {k: relative_error(ours[k], v) for k, v in golden.items()}


def _no_dropout(model: nn.Module) -> None:
    """The classifier's Dropout2d off (drop path is off through drop_path_rate=0)."""
    for module in model.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout2d)):
            module.p = 0.0


def main() -> None:
    args = regeneration_args(__doc__, FIXTURE, "VCIP-RGBD/DFormer", ours.REFERENCE_COMMIT)
    if args is None:  # --check
        return

    torch.manual_seed(0)
    model = reference_model(args.ref, "tiny", NUM_CLASSES, drop_path_rate=0.0)
    _no_dropout(model)
    shapes = key_shapes(model.state_dict())
    input_shapes = {"rgb": [BATCH, 3, HEIGHT, WIDTH], "depth": [BATCH, 1, HEIGHT, WIDTH]}
    inputs = seeded_inputs(input_shapes, SEED_INPUTS)

    def record(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        BASES_DTYPE[0] = dtype
        xs = {k: v.to(dtype) for k, v in inputs.items()}
        return eval_and_train_outputs(lambda xs: model(*reference_inputs(xs)), model, xs, seed=SEED_NMF)

    # In float64 (written) and float32 (its drift, which sets the test's bound).
    outputs, drift = loaded_in_both_precisions(model, fill_state_dict(shapes, SEED_WEIGHTS), record)
    BASES_DTYPE[0] = torch.float32

    counts = {}
    for variant in BACKBONES:
        full = reference_model(args.ref, variant, FULL_CLASSES)
        counts[f"dformer_{variant}"] = sum(p.numel() for p in full.parameters())
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(outputs, args.out / "outputs.safetensors")
    fixture = {
        "reference_repo": ours.REFERENCE_REPO,
        "reference_commit": args.commit,
        "regenerate": "python tools/parity/dformer.py --ref <checkout of the reference repository>",
        "model": "dformer_tiny",
        "config": {"num_classes": NUM_CLASSES, "modalities": ["rgb", "depth"], "dropout": 0.0, "drop_path_rate": 0.0,
                   "nmf_eval_seed": None},
        "authors_config": {"backbone": "DFormer-Tiny", "decoder": "ham", "decoder_embed_dim": 512,
                           "num_classes": NUM_CLASSES, "bn_eps": 1e-3, "aux_rate": 0.0, "drop_path_rate": 0.0,
                           "dropout": "off"},
        "rule": RULE,
        "seed_weights": SEED_WEIGHTS,
        "seed_inputs": SEED_INPUTS,
        "seed_forward": SEED_NMF,
        "nmf": "torch.manual_seed(seed_forward) right before each forward (eval, then train): the NMF bases are "
               "the forward's first draw from the global CPU generator on both sides",
        "inputs": input_shapes,
        "train_loss": "mean(logits ** 2), gradients w.r.t. both inputs",
        "dtype": "float64",
        "float32_drift": drift,
        "authors_param_counts_40_classes": counts,
        "authors_drop_path_large": authors_drop_path(args.ref, "large"),
        "full_size_40_classes_float64_relative_errors": {f"dformer_{v}": full_size_diffs(args.ref, v) for v in ("small", "base", "large")},
        "authors_state_dict": shapes,
    }
    (args.out / "fixture.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}: {len(shapes)} authors' tensors; parameter counts {counts}")


if __name__ == "__main__":
    main()
