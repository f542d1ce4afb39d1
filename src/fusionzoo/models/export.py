"""Export a fusion model to ONNX or a ``torch.export`` program, and check it against eager.

The exported graph takes one named input per modality, ``(B, C_m, H, W)`` in the model's
modality order (ONNX input names are the modality names), at a fixed ``H, W`` and a batch
dimension that stays dynamic where the model allows it (``torch.export.Dim.AUTO``: a model that
specialises on the batch gets a static one, and :attr:`Exported.dynamic_batch` says so).

- Segmentation models export whole: the output ``logits`` ``(B, K, H, W)``.
- Detectors export up to their box heads' raw outputs
  (:meth:`~fusionzoo.detection.models.DetectorMixin.raw_head_outputs`: per head
  ``{head}.cls_logits``, ``{head}.bbox_regression`` and, for FCOS, ``{head}.bbox_ctrness``);
  anchor decoding, score threshold, NMS and box fusion stay outside the graph (data-dependent
  output sizes; docs/export.md).

The detector contract (any detector, e.g. the published ones in ``fusionzoo.detection.published``):
``model.task == "detection"``, ``model.modalities``, and ``model.raw_head_outputs(inputs)`` taking
the input dict of ``forward`` and returning a non-empty ``dict`` of named tensors, each with the
batch first and shapes that depend on the input size only (not on the data); the exported graph
has exactly those outputs, in that order (docs/export.md "Detectors: the contract").

ONNX goes through torch's exporter from the ``torch.export`` program (``torch.onnx.export(...,
dynamo=True)``, which needs ``onnxscript`` and ``onnx``); the check runs the file with ONNX
Runtime when it is installed, else the reloaded ``ExportedProgram`` (``pip install
'fusionzoo[export]'`` installs all three).

>>> model = fz.create_model("esanet_r18", num_classes=40).eval()
>>> exported = export_model(model, "esanet.onnx", "onnx", size=(480, 640))
>>> check = check_export(model, exported)            # CheckResult(max_abs=..., max_rel=..., ...)
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..modalities import DEFAULT_CHANNELS

try:  # optional ([export] extra): the check runs the ONNX file with it when present
    import onnxruntime
except ImportError:  # pragma: no cover - depends on the environment
    onnxruntime = None

__all__ = ["FORMATS", "CheckResult", "ExportError", "Exported", "check_export", "example_inputs", "export_model",
           "output_names"]

FORMATS = ("onnx", "torch-export")
DEFAULT_TOLERANCE = 1e-3  # max |exported - eager| relative to max |eager|, per output (float32 kernels differ)
EXPORT_BATCH = 2  # example batch: torch.export specialises a size-1 dimension to a constant (0/1 specialisation)


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names the model, the format and why."""


@dataclass
class Exported:
    """What :func:`export_model` wrote.

    Attributes:
        path: the file (``.onnx`` or ``.pt2``).
        format: ``"onnx"`` or ``"torch-export"``.
        input_names: the modalities, in the graph's input order.
        output_names: ``["logits"]`` (segmentation) or the detector's raw head outputs.
        size: ``(H, W)`` the graph was exported at.
        in_chans: channels per modality.
        dynamic_batch: whether the batch dimension stayed symbolic.
        program: the ``ExportedProgram`` (also behind an ONNX file).
    """

    path: Path
    format: str
    input_names: list[str]
    output_names: list[str]
    size: tuple[int, int]
    in_chans: dict[str, int]
    dynamic_batch: bool
    program: torch.export.ExportedProgram = field(repr=False)


@dataclass
class CheckResult:
    """Exported vs eager on the same inputs.

    Attributes:
        runtime: what ran the export (``"onnxruntime"`` or ``"torch.export"``).
        batch: batch size of the check inputs (differs from the export's example batch when
            the batch is dynamic, so the check also proves it).
        per_output: ``{output: (max abs difference, max abs difference / max |eager|)}``.
        tolerance: the relative tolerance checked.
    """

    runtime: str
    batch: int
    per_output: dict[str, tuple[float, float]]
    tolerance: float

    @property
    def max_abs(self) -> float:
        return max(a for a, _ in self.per_output.values())

    @property
    def max_rel(self) -> float:
        return max(r for _, r in self.per_output.values())

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def worst(self) -> str:
        """Name of the output with the largest relative difference."""
        return max(self.per_output, key=lambda k: self.per_output[k][1])


class _Graph(nn.Module):
    """The traced function: modality tensors as positional inputs -> a tuple of output tensors.

    Segmentation: ``(logits,)``. Detection: the raw head outputs in :func:`output_names` order.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.modalities = tuple(model.modalities)
        self.detection = getattr(model, "task", "segmentation") == "detection"

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.modalities, xs))
        if self.detection:
            return tuple(self.model.raw_head_outputs(inputs).values())
        return (self.model(inputs),)


def _task(model: nn.Module) -> str:
    return getattr(model, "task", "segmentation")


def _name(model: nn.Module) -> str:
    return (getattr(model, "config", None) or {}).get("name", type(model).__name__)


def example_inputs(model: nn.Module, size: tuple[int, int], batch: int = EXPORT_BATCH, seed: int = 0
                   ) -> dict[str, torch.Tensor]:
    """Seeded standard-normal inputs ``(batch, C_m, H, W)`` per modality, on the model's device
    (inputs are normalised per modality, so unit scale is the data's scale)."""
    g = torch.Generator().manual_seed(seed)
    chans = {**DEFAULT_CHANNELS, **dict(getattr(model, "in_chans", {}) or {})}
    device = next(model.parameters()).device
    return {m: torch.randn(batch, chans[m], *size, generator=g).to(device) for m in model.modalities}


def output_names(model: nn.Module, size: tuple[int, int]) -> list[str]:
    """The exported graph's output names: ``["logits"]``, or a detector's raw head outputs
    (``fused.cls_logits``, ...; found by running them once at ``size``)."""
    if _task(model) != "detection":
        return ["logits"]
    with torch.no_grad():
        raw = model.raw_head_outputs(example_inputs(model, size, batch=1))
    bad = None if isinstance(raw, Mapping) and raw else f"returned {type(raw).__name__} {'(empty)' if not raw else ''}"
    if bad is None:
        wrong = {k: type(v).__name__ if not isinstance(v, torch.Tensor) else tuple(v.shape)
                 for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.dim() < 1 or v.shape[0] != 1}
        bad = f"gave {wrong} at batch 1" if wrong else None
    if bad is not None:
        raise ExportError(f"{_name(model)}: raw_head_outputs() {bad}; the export contract is a non-empty dict of "
                          "named tensors, batch first (docs/export.md)")
    return list(raw)


def _check_request(model: nn.Module, fmt: str, size: Sequence[int], opset: int | None) -> tuple[int, int]:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ExportError(f"size must be two positive integers (H, W), got {tuple(size)}")
    if opset is not None and fmt != "onnx":
        raise ExportError(f"--opset applies to --format onnx only, not {fmt}")
    if _task(model) == "detection" and not hasattr(model, "raw_head_outputs"):
        raise ExportError(f"{_name(model)}: a detector exports through raw_head_outputs(inputs) -> dict of named "
                          "tensors (its heads' outputs before decoding and NMS, which stay outside the graph), "
                          "and this one has none (docs/export.md)")
    if fmt == "onnx":
        missing = [p for p in ("onnxscript", "onnx") if importlib.util.find_spec(p) is None]
        if missing:
            raise ExportError(f"--format onnx needs {' and '.join(missing)} (torch's ONNX exporter): "
                              "pip install 'fusionzoo[export]'")
    return int(size[0]), int(size[1])


def _reason(err: BaseException) -> str:
    """One line on why an export failed: the innermost cause's first line (the exporters wrap it in
    generic "step 2/3" / "pass failed" errors), and the graph operation it happened at."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    reason = f"{type(root).__name__}: {lines[0] if lines else ''}"
    node = next((line for e in (root, err) for line in str(e).splitlines() if line.startswith("While executing")), None)
    if node is not None and "target=" in node:
        reason += f"; at {node.split('target=', 1)[1].split('](', 1)[0].split(']', 1)[0]}"
    return reason


def _trace(model: nn.Module, name: str, inputs: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """``torch.export`` of :class:`_Graph`, batch ``Dim.AUTO``; a failure becomes one ExportError
    naming the first line of torch's reason."""
    graph = _Graph(model).eval()
    xs = tuple(inputs.values())
    shapes = {"xs": tuple({0: torch.export.Dim.AUTO} for _ in xs)}
    try:
        return torch.export.export(graph, xs, dynamic_shapes=shapes)
    except Exception as e:  # torch raises many types (UserError, Unsupported, RuntimeError...)
        raise ExportError(f"{name}: torch.export cannot trace the model ({_reason(e)})") from e


def export_model(
    model: nn.Module,
    path: str | Path,
    fmt: str = "onnx",
    *,
    size: Sequence[int] = (512, 512),
    opset: int | None = None,
) -> Exported:
    """Export ``model`` (put in eval mode) to ``path``.

    Args:
        model: a registered fusion model (segmentation, or a detector with ``raw_head_outputs``).
        path: output file; ``.onnx`` for ONNX, ``.pt2`` (``torch.export.save``) for torch-export.
        fmt: ``"onnx"`` or ``"torch-export"``.
        size: ``(H, W)`` of the exported graph (detectors: zero-padding to a multiple of 32
            happens inside the graph).
        opset: ONNX opset (default: torch's exporter's).

    Returns:
        :class:`Exported`.

    Raises:
        ExportError: unknown format, bad size, missing exporter packages, or a model that
            ``torch.export`` / the ONNX exporter cannot handle (the message names it and why).
    """
    h, w = _check_request(model, fmt, size, opset)
    name = _name(model)
    model.eval()
    inputs = example_inputs(model, (h, w))
    names = output_names(model, (h, w))
    program = _trace(model, name, inputs)
    user = set(program.graph_signature.user_inputs)
    first = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name in user)
    # A specialised Dim.AUTO can stay a SymInt whose expression is the constant: ask for free symbols.
    dynamic = not is_concrete_int(first.meta["val"].shape[0])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch-export":
        torch.export.save(program, path)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's deprecation and fallback chatter
                # optimize=False: onnxscript's constant folding crashes on GeminiFusion's
                # SplitToSequence (onnxscript 0.7.2); ONNX Runtime optimises the graph when it loads it.
                torch.onnx.export(program, tuple(inputs.values()), path, input_names=list(model.modalities),
                                  output_names=names, opset_version=opset, dynamo=True, verbose=False, optimize=False,
                                  external_data=False)
        except Exception as e:
            raise ExportError(f"{name}: the ONNX exporter failed ({_reason(e)})") from e
    in_chans = {m: int(x.shape[1]) for m, x in inputs.items()}
    return Exported(path, fmt, list(model.modalities), names, (h, w), in_chans, dynamic, program)


def _run_exported(exported: Exported, inputs: Mapping[str, torch.Tensor]) -> tuple[str, list[torch.Tensor]]:
    """Run the written file: ONNX Runtime for an ONNX file when installed, else the program
    reloaded from disk (``.pt2``) or the one behind the ONNX file."""
    if exported.format == "onnx" and onnxruntime is not None:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: constant-folding notices are not findings
        session = onnxruntime.InferenceSession(str(exported.path), options, providers=["CPUExecutionProvider"])
        feeds = {m: x.detach().cpu().numpy() for m, x in inputs.items()}
        outs = session.run(exported.output_names, feeds)
        return "onnxruntime", [torch.from_numpy(o) for o in outs]
    program = torch.export.load(exported.path) if exported.format == "torch-export" else exported.program
    with torch.no_grad():
        outs = program.module()(*inputs.values())
    return "torch.export", [o.detach().cpu() for o in outs]


def check_export(model: nn.Module, exported: Exported, tolerance: float = DEFAULT_TOLERANCE, seed: int = 1
                 ) -> CheckResult:
    """Run the export and the eager model on fresh seeded inputs and compare every output.

    The check batch is 1 when the batch is dynamic (the example batch was 2, so this also proves
    the batch dimension), else the exported batch.

    Args:
        model: the eager model that was exported.
        exported: :func:`export_model`'s result.
        tolerance: the largest accepted ``max |exported - eager| / max |eager|`` of any output.
    """
    batch = 1 if exported.dynamic_batch else EXPORT_BATCH
    inputs = example_inputs(model, exported.size, batch=batch, seed=seed)
    model.eval()
    with torch.no_grad():
        eager = [t.detach().cpu() for t in _Graph(model)(*inputs.values())]
    runtime, outs = _run_exported(exported, inputs)
    per_output = {}
    for name, ref, out in zip(exported.output_names, eager, outs):
        if out.shape != ref.shape:
            raise ExportError(f"{exported.path}: output {name!r} has shape {tuple(out.shape)}, "
                              f"eager gives {tuple(ref.shape)}")
        diff = float((out.double() - ref.double()).abs().max()) if ref.numel() else 0.0
        scale = float(ref.double().abs().max()) if ref.numel() else 0.0
        per_output[name] = (diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return CheckResult(runtime, batch, per_output, tolerance)
