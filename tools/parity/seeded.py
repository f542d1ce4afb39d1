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
from collections.abc import Callable, Iterable, Mapping
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


def tie_shared(state_dict: dict[str, torch.Tensor], tie: tuple[str, str] | None) -> dict[str, torch.Tensor]:
    """A module registered under two names (SA-Gate's shared shortcut projections) is one tensor
    in a real checkpoint: with ``tie = (alias, name)``, every key containing ``alias`` takes the
    tensor of the key with ``alias`` replaced by ``name``."""
    if tie is None:
        return state_dict
    alias, name = tie
    return {k: state_dict[k.replace(alias, name)] if alias in k else v for k, v in state_dict.items()}


def authors_state_dict(meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The fixture's authors'-format state dict: the rule over its key list, shared names tied."""
    return tie_shared(seeded_state_dict(meta["keys"], meta["state_seed"]), meta.get("tie"))


def key_shapes(state_dict: Mapping[str, torch.Tensor]) -> KeyShapes:
    """The key/shape/dtype list of a state dict, in its order."""
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def seeded_inputs(shapes: Mapping[str, Iterable[int]], seed: int) -> dict[str, torch.Tensor]:
    """``N(0, 1)`` inputs drawn in the order of ``shapes`` from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn([int(s) for s in shape], generator=g) for m, shape in shapes.items()}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def print_diffs(diffs: Mapping[str, float], note: str = "") -> None:
    """One line per compared output: ``key: max abs diff 1.2e-06`` (``note`` appended)."""
    for key, value in diffs.items():
        print(f"{key}: max abs diff {value:.3g}{note}")


def write_fixture(folder: Path, meta: dict[str, Any], outputs: Mapping[str, torch.Tensor]) -> None:
    """``reference.json`` (meta, with the key list) and ``outputs.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    save_file({k: v.detach().contiguous() for k, v in outputs.items()}, str(folder / "outputs.safetensors"))


def read_fixture(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return json.loads((folder / "reference.json").read_text()), load_file(str(folder / "outputs.safetensors"))


def calibrate_batchnorm(model: torch.nn.Module, run: Callable[[], Any]) -> None:
    """Set every BatchNorm's running statistics to the batch statistics of one train-mode call of
    ``run`` (momentum 1 for that call), then restore the momenta and leave ``model`` in eval mode.

    Deep residual networks with rule-filled running statistics blow up in eval mode (outputs
    ~1e7 for three ResNet-50 branches), where float32 rounding alone exceeds any useful tolerance;
    calibrated statistics keep eval outputs O(1). Both sides of a parity test apply it alike.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    model.train()
    try:
        with torch.no_grad():
            run()
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def run_modes(model: torch.nn.Module, run: Callable[[dict[str, torch.Tensor]], torch.Tensor], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Outputs of ``run(inputs)`` in eval and train mode as a fixture records them: BatchNorm
    calibrated first when the fixture names a ``calibration_seed``; ``torch.manual_seed(train_seed)``
    before the train-mode call when it names one (dropout masks)."""
    xs = seeded_inputs(meta["inputs"], meta["input_seed"])
    # The rule-filled CNNs' outputs reach ~10^3, where float32 summation order shows at 1e-1: the
    # same intra-op thread count as the fixture (2, the default when they were computed) makes the
    # comparison bit-exact on any machine and under pytest-xdist.
    threads = torch.get_num_threads()
    torch.set_num_threads(int(meta.get("threads", 2)))
    try:
        if "calibration_seed" in meta:
            calib = seeded_inputs(meta["inputs"], meta["calibration_seed"])
            calibrate_batchnorm(model, lambda: run(calib))
        with torch.no_grad():
            out_eval = run_in_mode(model, run, xs, train=False)
            if "train_seed" in meta:
                torch.manual_seed(meta["train_seed"])
            out_train = run_in_mode(model, run, xs, train=True)
    finally:
        torch.set_num_threads(threads)
    return {"eval": out_eval, "train": out_train}


def run_in_mode(model: torch.nn.Module, run: Callable[[dict[str, torch.Tensor]], torch.Tensor], xs: dict[str, torch.Tensor], *, train: bool) -> torch.Tensor:
    model.train(train)
    out = run(xs)
    return out[0] if isinstance(out, tuple) else out  # references return side outputs in train mode
