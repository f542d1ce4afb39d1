#!/usr/bin/env python
"""Regenerate tests/fixtures/parity/cmx/ from a checkout of the authors' CMX repository.

    python tools/parity/cmx.py --ref /path/to/RGBX_Semantic_Segmentation
    python tools/parity/cmx.py --check     # ours against the committed fixture (parity.check_fixture)

Reference: https://github.com/huaaaliu/RGBX_Semantic_Segmentation (the commit is read from the
checkout and must equal ``fusionzoo.models.published.cmx.REFERENCE_COMMIT``). Their code is
imported from the checkout at run time; none of it is in this project.

What it writes (numbers only):

- ``fixture.json``: the reference commit, the reduced configuration (MiT-B0 backbones, MLP
  decoder with embedding 512, 3 classes, 2x3x64x64 inputs, drop path and dropout off), the
  authors' key/shape list, the fill rule and seeds, and the authors' parameter counts of
  CMX-B0..B5 at 40 classes (their backbone classes ``mit_b0..mit_b5`` plus their ``DecoderHead``
  with embedding 512, as ``models/builder.py`` composes them);
- ``outputs.safetensors``: the inputs' eval-mode and train-mode logits, and in train mode the
  gradients of ``mean(logits ** 2)`` with respect to both inputs, in float64 (the rule's float32
  weights and inputs cast); ``fixture.json`` also records ``float32_drift``, how far a float32
  run of theirs moves each (``seeded.float32_drift``; the test's bound is ``seeded.tolerance``).

The module also gives ``bench/parity.py`` the authors' model: :func:`reference_model` and
:func:`reference_inputs`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import nn

from fusionzoo.models.published import cmx as ours
from fusionzoo.models.published.parity import (
    RULE,
    eval_and_train_outputs,
    fill_state_dict,
    key_shapes,
    regeneration_args,
    seeded_inputs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeded import loaded_in_both_precisions

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "cmx"
SEED_WEIGHTS = 1234
SEED_INPUTS = 5678
NUM_CLASSES = 3
BATCH, SIZE = 2, 64
EMBED_DIM = 512  # the authors' config.decoder_embed_dim
FULL_CLASSES = 40  # NYUDv2
# The authors' builder (models/builder.py) builds these backbones by name; 'mit_b1' there
# constructs mit_b0 and 'mit_b3' falls back to mit_b2, so only these build what they name.
BUILDER_VARIANTS = ("b0", "b2", "b4", "b5")


def _import_authors(checkout: Path) -> SimpleNamespace:
    """The authors' modules, imported from ``checkout`` (their packages are ``models``, ``utils``,
    ``engine``; they need timm's ``timm.models.layers``, which timm 1.x still provides)."""
    checkout = checkout.resolve()
    if not (checkout / "models" / "builder.py").is_file():
        raise SystemExit(f"error: {checkout} is not a checkout of RGBX_Semantic_Segmentation (no models/builder.py)")
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    from models import builder  # type: ignore[import-not-found]
    from models.decoders.MLPDecoder import DecoderHead  # type: ignore[import-not-found]
    from models.encoders import dual_segformer  # type: ignore[import-not-found]

    return SimpleNamespace(builder=builder, DecoderHead=DecoderHead, dual_segformer=dual_segformer)


def _cfg(variant: str, num_classes: int) -> SimpleNamespace:
    # The fields models/builder.py reads from config.py (NYUDv2 settings), pretrained off.
    return SimpleNamespace(
        backbone=f"mit_{variant}", decoder="MLPDecoder", decoder_embed_dim=EMBED_DIM, num_classes=num_classes,
        pretrained_model=None, bn_eps=1e-3, bn_momentum=0.1,
    )


def reference_model(checkout: Path, variant: str, num_classes: int) -> nn.Module:
    """The authors' training network ``EncoderDecoder`` for ``variant`` (``b2`` or ``mit_b2``;
    MLP decoder, embedding 512), built as
    their ``train.py`` does (with a criterion, so ``init_weights`` sets the decoder's BN eps 1e-3).

    Raises:
        ValueError: a variant their builder does not build (``b1``, ``b3``).
    """
    variant = variant.removeprefix("mit_")  # our entries' encoder names are mit_b0 .. mit_b5
    if variant not in BUILDER_VARIANTS:
        raise ValueError(f"the authors' builder does not build mit_{variant} (it builds {BUILDER_VARIANTS})")
    authors = _import_authors(Path(checkout))
    return authors.builder.EncoderDecoder(cfg=_cfg(variant, num_classes), criterion=nn.CrossEntropyLoss(ignore_index=255))


def reference_inputs(model_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Their ``forward(rgb, modal_x)`` arguments from our input dict (RGB first, then X)."""
    return tuple(model_inputs.values())


def authors_param_count(checkout: Path, variant: str, num_classes: int = FULL_CLASSES) -> int:
    """Parameters of their ``mit_<variant>`` dual backbone plus their ``DecoderHead`` (embedding
    512), composed as ``EncoderDecoder`` does (their classes directly, so B1 and B3 count too)."""
    authors = _import_authors(Path(checkout))
    backbone = getattr(authors.dual_segformer, f"mit_{variant}")(norm_fuse=nn.BatchNorm2d)
    channels = [32, 64, 160, 256] if variant == "b0" else [64, 128, 320, 512]
    head = authors.DecoderHead(in_channels=channels, num_classes=num_classes, norm_layer=nn.BatchNorm2d, embed_dim=EMBED_DIM)
    return sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in head.parameters())


def authors_drop_path(checkout: Path, variant: str) -> dict[str, list[list[float]]]:
    """Stochastic-depth rate of every block of their ``mit_<variant>`` (RGB ``block1..4``, X
    ``extra_block1..4``), 0 where they put an Identity."""
    authors = _import_authors(Path(checkout))
    backbone = getattr(authors.dual_segformer, f"mit_{variant}")(norm_fuse=nn.BatchNorm2d)

    def rates(prefix: str) -> list[list[float]]:
        return [[float(getattr(b.drop_path, "drop_prob", 0.0)) for b in getattr(backbone, f"{prefix}{k}")] for k in range(1, 5)]

    return {"rgb": rates("block"), "x": rates("extra_block")}


def _no_drop(model: nn.Module) -> None:
    """Drop path and dropout off (their mit_b* hard-code drop_path_rate=0.1)."""
    from timm.layers import DropPath as NewDropPath

    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewDropPath) or type(child).__name__ == "DropPath":
                setattr(module, name, nn.Identity())
            elif isinstance(child, (nn.Dropout, nn.Dropout2d)):
                child.p = 0.0


def main() -> None:
    args = regeneration_args(__doc__, FIXTURE, "huaaaliu/RGBX_Semantic_Segmentation", ours.REFERENCE_COMMIT)
    if args is None:  # --check
        return

    torch.manual_seed(0)
    model = reference_model(args.ref, "b0", NUM_CLASSES)
    _no_drop(model)
    shapes = key_shapes(model.state_dict())
    input_shapes = {"rgb": [BATCH, 3, SIZE, SIZE], "hha": [BATCH, 3, SIZE, SIZE]}
    inputs = seeded_inputs(input_shapes, SEED_INPUTS)
    # Eval, then train mode (batch statistics) with the input gradients of mean(logits ** 2): in
    # float64 (written) and float32 (its drift, which sets the test's bound).
    outputs, drift = loaded_in_both_precisions(
        model, fill_state_dict(shapes, SEED_WEIGHTS),
        lambda dtype: eval_and_train_outputs(lambda xs: model(*reference_inputs(xs)), model, {k: v.to(dtype) for k, v in inputs.items()}))

    counts = {f"cmx_mit_{v}": authors_param_count(args.ref, v) for v in ("b0", "b1", "b2", "b3", "b4", "b5")}
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(outputs, args.out / "outputs.safetensors")
    fixture = {
        "reference_repo": ours.REFERENCE_REPO,
        "reference_commit": args.commit,
        "regenerate": "python tools/parity/cmx.py --ref <checkout of the reference repository>",
        "model": "cmx_mit_b0",
        "config": {"num_classes": NUM_CLASSES, "modalities": ["rgb", "hha"], "decoder_channels": EMBED_DIM,
                   "dropout": 0.0, "drop_path_rate": 0.0},
        "authors_config": {"backbone": "mit_b0", "decoder": "MLPDecoder", "decoder_embed_dim": EMBED_DIM,
                           "num_classes": NUM_CLASSES, "bn_eps": 1e-3, "drop_path": "off", "dropout": "off"},
        "rule": RULE,
        "seed_weights": SEED_WEIGHTS,
        "seed_inputs": SEED_INPUTS,
        "inputs": input_shapes,
        "train_loss": "mean(logits ** 2), gradients w.r.t. both inputs",
        "dtype": "float64",
        "float32_drift": drift,
        "authors_param_counts_40_classes": counts,
        "authors_drop_path_b2": authors_drop_path(args.ref, "b2"),
        "authors_state_dict": shapes,
    }
    (args.out / "fixture.json").write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}: {len(shapes)} authors' tensors; parameter counts {counts}")


if __name__ == "__main__":
    main()
