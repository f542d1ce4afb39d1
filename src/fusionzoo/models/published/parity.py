"""Golden-parity helpers shared by ``tools/parity/<method>.py`` (which runs the authors' code)
and ``tests/test_parity_<method>.py`` (which runs ours): the deterministic rule that fills an
authors'-format state dict from its key/shape list, and the fixture layout.

The rule (:func:`fill_state_dict`) depends only on a key, its shape and a seed, so the test can
rebuild the authors' state dict from the committed key/shape list alone, without their code.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..._registry import create_model
from ..convert import convert_state_dict

RULE = (
    "per key: torch.Generator seeded with seed + crc32(key); U = torch.rand (float32), S = sqrt(3) * (2U - 1) "
    "(zero mean, unit variance, computed in float64); num_batches_tracked = 0; running_mean = 0.1 * S; "
    "running_var = 0.5 + U; other 1-D '*.weight' (norm scales) = 1 + 0.1 * S; 1-D '*.bias' = 0.1 * S; "
    "tensors of 2+ dims = S / sqrt(fan_in), fan_in = product of all dims but the first; cast to float32"
)


def unit_uniform(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """``sqrt(3) * (2U - 1)`` in float64 (zero mean, unit variance), ``U = torch.rand`` (float32).

    Uniform, not ``torch.randn``: torch's normal sampler has a vectorised AVX2 kernel and a scalar one
    that round differently, so its draws depend on the CPU (issue 22); ``torch.rand`` is exact
    integer arithmetic, and the float64 steps here are correctly rounded on any CPU.
    """
    return (2 * torch.rand(tuple(shape), generator=generator).double() - 1) * math.sqrt(3)


def fill_tensor(key: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """One tensor of the rule :data:`RULE`."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    g = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    shape = tuple(int(s) for s in shape)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    s = unit_uniform(shape, g)
    if key.endswith("running_mean"):
        return (0.1 * s).float()
    if len(shape) <= 1:
        return (1.0 + 0.1 * s if key.endswith("weight") else 0.1 * s).float()
    fan_in = math.prod(shape[1:])
    return (s / math.sqrt(fan_in)).float()


def fill_state_dict(shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, torch.Tensor]:
    """An authors'-format state dict filled by :data:`RULE` (``shapes``: key -> shape)."""
    return {k: fill_tensor(k, s, seed) for k, s in shapes.items()}


def key_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """The key/shape list committed in a fixture (the authors' order)."""
    return {k: list(v.shape) for k, v in state_dict.items()}


def seeded_inputs(shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, torch.Tensor]:
    """float32 inputs :func:`unit_uniform` drawn in the order of ``shapes`` from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {k: unit_uniform(s, g).float() for k, s in shapes.items()}


def read_fixture(folder: Path) -> dict[str, Any]:
    """``fixture.json`` of a parity fixture folder (``tests/fixtures/parity/<method>/``)."""
    path = folder / "fixture.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; regenerate it with tools/parity/<method>.py --ref <authors checkout>")
    return json.loads(path.read_text())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` (shapes must agree)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def eval_and_train_outputs(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """The outputs a fixture records, from either side: ``eval_logits`` (eval mode, no grad),
    ``train_logits`` (train mode) and ``train_grad_<m>`` (gradient of ``mean(logits ** 2)`` with
    respect to input ``m``). ``forward(inputs)`` calls ``model`` (the authors' take positional
    arguments); ``seed``: ``torch.manual_seed(seed)`` right before each forward (a network that
    draws random numbers in its forward, e.g. DFormer's NMF bases)."""
    model.eval()
    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        eval_out = forward(dict(inputs))
    model.train()
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    if seed is not None:
        torch.manual_seed(seed)
    out = forward(leaves)
    out.square().mean().backward()
    grads = {f"train_grad_{m}": leaf.grad.contiguous() for m, leaf in leaves.items()}
    return {"eval_logits": eval_out.contiguous(), "train_logits": out.detach().contiguous(), **grads}


def fixture_diffs(outputs: Mapping[str, torch.Tensor], golden: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Max abs differences of :func:`eval_and_train_outputs` against a fixture's: logits
    absolute, input gradients relative to the fixture's largest (a mean over many logits makes
    them ~1e-3)."""
    diffs = {}
    for key, value in outputs.items():
        reference = golden[key]
        if key.startswith("train_grad_"):
            diffs[f"{key} (relative)"] = max_abs_diff(value, reference) / float(reference.abs().max())
        else:
            diffs[key] = max_abs_diff(value, reference)
    return diffs


def fixture_model(fixture: Mapping[str, Any]) -> torch.nn.Module:
    """The fixture's entry at its config, holding the authors' state dict (rebuilt from the key
    list by the rule) converted into ours."""
    model = create_model(fixture["model"], **fixture["config"])
    authors = fill_state_dict(fixture["authors_state_dict"], fixture["seed_weights"])
    model.load_state_dict(convert_state_dict(fixture["model"], authors, model), strict=True)
    return model


def check_fixture(folder: Path) -> dict[str, float]:
    """Ours against a committed fixture, no authors' code needed: the fixture's entry and config,
    its authors' state dict rebuilt by the rule and converted, the seeded inputs (and
    ``seed_forward`` before each forward where the fixture names one) -> :func:`fixture_diffs`."""
    fixture = read_fixture(folder)
    model = fixture_model(fixture)
    inputs = seeded_inputs(fixture["inputs"], fixture["seed_inputs"])
    if fixture.get("dtype") == "float64":  # issue 22: float64 fixtures are compared in float64
        model, inputs = model.double(), {k: v.double() for k, v in inputs.items()}
    outputs = eval_and_train_outputs(model, model, inputs, seed=fixture.get("seed_forward"))
    return fixture_diffs(outputs, load_file(folder / "outputs.safetensors"))


def regeneration_args(description: str, default_out: Path, reference: str, reference_commit: str) -> Any:
    """The command line of a ``tools/parity/<method>.py`` script: ``--check`` prints
    :func:`check_fixture` of ``--out`` and returns ``None``; otherwise ``--ref`` is required and the
    parsed arguments are returned for the regeneration (``ref``, ``out``, and ``commit``: the
    checkout's HEAD, with a warning on stderr when it is not ``reference_commit``, the entries')."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", type=Path, help=f"checkout of {reference}")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--check", action="store_true", help="only print ours vs the committed fixture")
    args = parser.parse_args()
    if args.check:
        for key, value in check_fixture(args.out).items():
            print(f"{key}: max abs diff {value:.3g}")
        return None
    if args.ref is None:
        parser.error("--ref is required to regenerate the fixture (or use --check)")
    git = ["git", "-C", str(args.ref), "rev-parse", "HEAD"]
    args.commit = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
    if args.commit != reference_commit:
        print(f"warning: checkout is at {args.commit}, the entries name {reference_commit}", file=sys.stderr)
    return args
