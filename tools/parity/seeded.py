"""The deterministic rule that fills an authors' state dict, the seeded inputs, and the fixture
format shared by the CNN parity scripts (fusenet, acnet, sagate) and their tests.

Rule (per key, independent of dict order): a CPU ``torch.Generator`` seeded with
``seed * 1_000_003 + crc32(key)`` draws ``U = torch.rand`` (float32), and ``S = sqrt(3) * (2U - 1)``
(:func:`unit_uniform`: zero mean, unit variance; uniform because ``torch.randn``'s draws differ
between CPUs with and without AVX2), cast to float32 at the end:

- ``*.running_var``: ``0.5 + U``;
- ``*.running_mean``: ``0.1 * S``;
- ``*.num_batches_tracked``: 0;
- tensors of rank >= 2 (conv / linear weights): ``S * sqrt(2 / fan_in)`` (He scale, so
  activations keep their size through deep networks);
- rank-1 ``*.weight`` (norm scales): ``1 + 0.1 * S``;
- any other rank-1 or scalar tensor (biases): ``0.1 * S``.

Precision (issue 22): fixtures hold float64 outputs, and both sides run in float64 (the rule's
float32 draws, cast exactly). float32 rounding depends on the CPU's vector instructions (AVX2 vs
AVX-512 sum in other orders), and the rule-filled networks magnify it (train-mode BatchNorm over
2x2 maps, outputs ~80 after calibration): float32 fixtures missed by up to 0.5 from one CPU to the
next. Each script also runs the reference in float32 and records, per output, how far that moves
it (``float32_drift``, relative to the output's largest magnitude): the output's sensitivity to
rounding. :func:`tolerance` scales it down to float64 rounding, so a set-up that magnifies
rounding gets a proportionally wider, measured bound instead of a flaky one.

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

# float64 unit roundoff over float32's (2**-29): how much smaller float64 rounding perturbs an output.
EPS_RATIO = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
# Headroom over the one measured float32 drift (another CPU, thread count or summation order
# rounds differently; the drift is one sample of it).
SAFETY = 100.0
# Relative bound for outputs that float32 hardly moves: float64 reductions over ~1e5 terms. Any
# wrong weight, layer or mode misses by more than 1e-6 relative.
RTOL_FLOOR = 1e-10


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |ours - reference| / max |reference|`` in float64 (shapes must agree)."""
    if ours.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(ours.shape)} vs {tuple(reference.shape)}")
    scale = float(reference.double().abs().max())
    return float((ours.double() - reference.double()).abs().max()) / (scale if scale > 0 else 1.0)


def float32_drift(out32: Mapping[str, torch.Tensor], out64: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per output, :func:`relative_error` of the reference's float32 run to its float64 run."""
    return {k: relative_error(out32[k], v) for k, v in out64.items()}


def tolerance(drift: float) -> float:
    """The relative bound of a float64 comparison for an output whose float32 drift is ``drift``:
    ``max(RTOL_FLOOR, SAFETY * drift * EPS_RATIO)``."""
    return max(RTOL_FLOOR, SAFETY * drift * EPS_RATIO)


def parity_errors(ours: Mapping[str, torch.Tensor], golden: Mapping[str, torch.Tensor], drift: Mapping[str, float]) -> dict[str, tuple[float, float]]:
    """Per fixture output: (:func:`relative_error` of ours, :func:`tolerance` from its drift).

    Raises:
        KeyError: an output of the fixture that ``ours`` lacks (or one without a recorded drift).
    """
    missing = sorted(set(golden) - set(ours))
    if missing:
        raise KeyError(f"outputs {missing} of the fixture were not computed (computed: {sorted(ours)})")
    return {k: (relative_error(ours[k], golden[k]), tolerance(drift[k])) for k in golden}


def assert_parity(ours: Mapping[str, torch.Tensor], golden: Mapping[str, torch.Tensor], drift: Mapping[str, float]) -> None:
    """Every fixture output within its :func:`tolerance` (the message lists every miss)."""
    errors = parity_errors(ours, golden, drift)
    misses = {k: f"relative error {e:.3g} > {t:.3g}" for k, (e, t) in errors.items() if not e <= t}
    assert not misses, misses


def to_float64(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors cast to float64 (exact from float32); others unchanged."""
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


def in_both_precisions(outputs: Callable[[torch.dtype], Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``outputs(dtype)`` (a fresh reference network and inputs in that dtype) in float64 and in
    float32 -> (the float64 outputs, their :func:`float32_drift`), what a fixture records."""
    out64 = {k: v.detach().contiguous() for k, v in outputs(torch.float64).items()}
    out32 = outputs(torch.float32)
    return out64, float32_drift(out32, out64)


def unit_uniform(shape: Iterable[int], generator: torch.Generator) -> torch.Tensor:
    """``sqrt(3) * (2U - 1)`` in float64 (zero mean, unit variance), ``U = torch.rand`` (float32).

    Uniform, not ``torch.randn``: torch's normal sampler has a vectorised AVX2 kernel and a scalar one
    that round differently, so its draws depend on the CPU (issue 22); ``torch.rand`` is exact
    integer arithmetic, and the float64 steps here are correctly rounded on any CPU.
    """
    return (2 * torch.rand([int(s) for s in shape], generator=generator).double() - 1) * math.sqrt(3)


def seeded_tensor(key: str, shape: Iterable[int], dtype: str, seed: int) -> torch.Tensor:
    """The value of ``key`` under the rule in the module docstring."""
    shape = [int(s) for s in shape]
    if dtype != "float32":
        return torch.zeros(shape, dtype=getattr(torch, dtype))
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    s = unit_uniform(shape, g)
    if key.endswith("running_mean"):
        return (0.1 * s).float()
    if len(shape) >= 2:
        return (s * math.sqrt(2.0 / max(1, math.prod(shape[1:])))).float()
    if key.endswith("weight"):
        return (1.0 + 0.1 * s).float()
    return (0.1 * s).float()


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
    """float32 inputs :func:`unit_uniform` drawn in the order of ``shapes`` from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {m: unit_uniform(shape, g).float() for m, shape in shapes.items()}


def yolo_target_rows(targets: list[dict[str, torch.Tensor]], height: int, width: int) -> torch.Tensor:
    """YOLOv5's training targets ``(n, 6)``: image index, class, centre x, centre y, width, height
    normalised by the input size, from per-image ``boxes`` (xyxy pixels) and ``labels`` (the zoo's
    detection targets, as ``bench/parity.py`` draws them)."""
    rows = []
    for i, t in enumerate(targets):
        b = t["boxes"].float()
        xywh = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1) / b.new_tensor([width, height, width, height])
        rows.append(torch.cat((torch.full_like(b[:, :1], i), t["labels"].float()[:, None], xywh), 1))
    return torch.cat(rows)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def print_diffs(diffs: Mapping[str, float], note: str = "") -> None:
    """One line per compared output: ``key: max abs diff 1.2e-06`` (``note`` appended)."""
    for key, value in diffs.items():
        print(f"{key}: max abs diff {value:.3g}{note}")


def print_errors(errors: Mapping[str, tuple[float, float]]) -> None:
    """One line per output of :func:`parity_errors`: relative error and its tolerance."""
    for key, (error, bound) in errors.items():
        print(f"{key}: relative error {error:.3g} (tolerance {bound:.3g}){'' if error <= bound else '  FAIL'}")


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


def run_modes(model: torch.nn.Module, run: Callable[[dict[str, torch.Tensor]], torch.Tensor], meta: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Outputs of ``run(inputs)`` in eval and train mode as a fixture records them, ``model`` and the
    seeded inputs cast to ``dtype`` first: BatchNorm calibrated first when the fixture names a
    ``calibration_seed``; ``torch.manual_seed(train_seed)`` before the train-mode call when it names
    one (dropout masks). ``model`` must hold the freshly loaded state dict (calibration and train
    mode move its running statistics)."""
    model.to(dtype)
    xs = {k: v.to(dtype) for k, v in seeded_inputs(meta["inputs"], meta["input_seed"]).items()}
    if "calibration_seed" in meta:
        calib = {k: v.to(dtype) for k, v in seeded_inputs(meta["inputs"], meta["calibration_seed"]).items()}
        calibrate_batchnorm(model, lambda: run(calib))
    with torch.no_grad():
        out_eval = run_in_mode(model, run, xs, train=False)
        if "train_seed" in meta:
            torch.manual_seed(meta["train_seed"])
        out_train = run_in_mode(model, run, xs, train=True)
    return {"eval": out_eval, "train": out_train}


def loaded_in_both_precisions(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], record: Callable[[torch.dtype], Mapping[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """:func:`in_both_precisions` of ``record(dtype)``, run right after ``model`` is cast to
    ``dtype`` and ``state_dict`` loaded afresh (train mode and calibration move BatchNorm statistics)."""

    def outputs(dtype: torch.dtype) -> Mapping[str, torch.Tensor]:
        model.to(dtype).load_state_dict(state_dict)
        return record(dtype)

    return in_both_precisions(outputs)


def reference_runs(model: torch.nn.Module, run: Callable[[dict[str, torch.Tensor]], torch.Tensor], meta: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """What a CNN fixture records: :func:`run_modes` of the reference with ``state_dict`` freshly
    loaded, in float64 and in float32 -> (float64 outputs, their :func:`float32_drift`)."""
    return loaded_in_both_precisions(model, state_dict, lambda dtype: run_modes(model, run, meta, dtype))


def run_in_mode(model: torch.nn.Module, run: Callable[[dict[str, torch.Tensor]], torch.Tensor], xs: dict[str, torch.Tensor], *, train: bool) -> torch.Tensor:
    model.train(train)
    out = run(xs)
    return out[0] if isinstance(out, tuple) else out  # references return side outputs in train mode
