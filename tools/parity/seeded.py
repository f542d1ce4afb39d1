"""The deterministic rule that fills an authors' state dict, the seeded inputs, and the fixture
format shared by the CNN parity scripts (fusenet, acnet, sagate) and their tests.

Rule (per key, independent of dict order): a CPU ``torch.Generator`` seeded with
``seed * 1_000_003 + crc32(key)`` draws

- ``*.running_var``: ``0.5 + U(0, 1)``;
- ``*.running_mean``: ``0.1 * N(0, 1)``;
- ``*.num_batches_tracked``: 0;
- tensors of rank >= 2 (conv / linear weights): ``N(0, 1) * sqrt(2 / fan_in)`` (He scale, so
  activations keep their size through deep networks);
- rank-1 ``*.weight`` (norm scales): ``1 + 0.1 * N(0, 1)``;
- any other rank-1 or scalar tensor (biases): ``0.1 * N(0, 1)``.

Nothing here imports fusionzoo or the authors' code, so tests and regeneration scripts share it.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

KeyShapes = list[tuple[str, list[int], str]]


def seeded_tensor(key: str, shape: Iterable[int], dtype: str, seed: int) -> torch.Tensor:
    """The value of ``key`` under the rule in the module docstring."""
    shape = [int(s) for s in shape]
    if dtype != "float32":
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) * math.sqrt(2.0 / max(1, math.prod(shape[1:])))
    if key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)


def seeded_state_dict(keys: KeyShapes, seed: int) -> dict[str, torch.Tensor]:
    """An authors'-format state dict from its key/shape/dtype list."""
    return {k: seeded_tensor(k, shape, dtype, seed) for k, shape, dtype in keys}


def key_shapes(state_dict: Mapping[str, torch.Tensor]) -> KeyShapes:
    """The key/shape/dtype list of a state dict, in its order."""
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def seeded_inputs(shapes: Mapping[str, Iterable[int]], seed: int) -> dict[str, torch.Tensor]:
    """``N(0, 1)`` inputs drawn in the order of ``shapes`` from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn([int(s) for s in shape], generator=g) for m, shape in shapes.items()}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_fixture(folder: Path, meta: dict[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
    """``reference.json`` (meta, with the key list) and ``outputs.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file({k: v.detach().contiguous() for k, v in outputs.items()}, str(folder / "outputs.safetensors"))


def read_fixture(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((folder / "reference.json").read_text()), load_file(str(folder / "outputs.safetensors"))
