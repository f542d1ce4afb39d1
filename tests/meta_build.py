"""Models on the meta device at a fraction of the cost of torch's Python meta kernels.

:func:`meta_device` builds without the initialisation kernels; :class:`MetaKernelCache` runs a
forward or backward with each distinct op signature's meta kernel once.

Under ``torch.device("meta")`` a model's ``__init__`` still dispatches every in-place initialisation
op (``uniform_``, ``erfinv_``, ``mul_``, ``clamp_`` ... of timm's ``trunc_normal_``), each through
torch's Python meta kernels: ~75% of building a MiT-B5 CMX on meta (8.6k ops, 1 s of CPU). On a
meta tensor such an op computes nothing and returns its input; its meta kernel can only fail on
the dtype. :func:`meta_device` answers exactly those ops (floating tensor, scalar operands) with
their input and dispatches every other op (shape-checked ``copy_``, ``empty``, factories,
forward and backward ops) as before, so a meta test fails wherever it failed before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from numbers import Number

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# In-place initialisation ops whose result is their own (floating) input tensor: the random fills,
# fills with a scalar, and the elementwise steps of trunc_normal_ with scalar operands.
_SELF_ONLY = {
    _aten.uniform_.default, _aten.normal_.default, _aten.zero_.default, _aten.fill_.Scalar,
    _aten.erfinv_.default, _aten.clamp_.default, _aten.mul_.Scalar, _aten.add_.Scalar,
    _aten.div_.Scalar, _aten.sub_.Scalar,
}
_SCALAR_OPERAND = {_aten.mul_.Tensor, _aten.add_.Tensor, _aten.div_.Tensor, _aten.sub_.Tensor, _aten.fill_.Tensor}


def _scalar(x: object) -> bool:
    """A Python number (not complex) or a 0-dim real tensor: it cannot change a floating tensor's shape or dtype."""
    if isinstance(x, torch.Tensor):
        return x.dim() == 0 and not x.is_complex()
    return isinstance(x, Number) and not isinstance(x, complex)


class _SkipInitKernels(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.is_meta and first.is_floating_point():
            if func in _SELF_ONLY and all(_scalar(a) or a is None for a in (*args[1:], *kwargs.values())
                                          if not isinstance(a, torch.Generator)):
                return first
            if func in _SCALAR_OPERAND and all(_scalar(a) for a in (*args[1:], *kwargs.values())):
                return first
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for building models, with the initialisation kernels skipped (see above)."""
    with torch.device("meta"), _SkipInitKernels():
        yield


def _meta_key(x: object) -> object:
    """What a meta kernel can read of an argument: a tensor's layout (never values), other arguments as
    they are. Raises TypeError for an argument that cannot be part of a key (then nothing is cached)."""
    if isinstance(x, torch.Tensor):
        if not x.is_meta:
            raise TypeError("a tensor with values")
        return ("T", tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, x.layout, x.is_conj(), x.is_neg())
    if isinstance(x, (list, tuple)):
        return tuple(_meta_key(v) for v in x)
    hash(x)
    return x


def _is_functional(func: torch._ops.OpOverload) -> bool:
    """No argument written to and no result aliasing an argument: the results are new tensors."""
    schema = func._schema
    return not any(a.alias_info is not None for a in (*schema.arguments, *schema.returns)) and all(
        r.type.kind() in ("TensorType", "OptionalType") for r in schema.returns) and bool(schema.returns)


class MetaKernelCache(TorchDispatchMode):
    """Reuse the result layout of a functional op's meta kernel for a repeated call with the same layouts.

    On the meta device an op's result (shapes, strides, dtypes) and its checks are a function of its
    arguments' layouts and non-tensor arguments alone; the first call of each distinct signature runs
    the real kernel (checks included) and later identical calls get new tensors of the same layouts.
    A deep model repeats its blocks (MiT-B5: 40 identical stage-3 blocks), and torch's Python meta
    kernels (LayerNorm, BatchNorm and their backward: ~40% of a heavy variant's forward and backward)
    run once per distinct shape. Ops with a mutated or aliased argument, and factories, always dispatch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._results: dict[tuple, tuple] = {}
        self._functional: dict[torch._ops.OpOverload, bool] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        functional = self._functional.get(func)
        if functional is None:
            functional = self._functional[func] = _is_functional(func)
        if not functional or not any(isinstance(a, torch.Tensor) for a in args):
            return func(*args, **kwargs)
        try:
            key = (func, _meta_key(args), _meta_key(tuple(sorted(kwargs.items()))))
        except TypeError:
            return func(*args, **kwargs)
        layouts = self._results.get(key)
        if layouts is None:
            out = func(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            if all(o is None or (isinstance(o, torch.Tensor) and o.is_meta) for o in outs):
                self._results[key] = (isinstance(out, tuple), tuple(
                    None if o is None else (tuple(o.shape), o.stride(), o.dtype) for o in outs))
            return out
        is_tuple, specs = layouts
        outs = tuple(None if s is None else torch.empty_strided(s[0], s[1], dtype=s[2], device="meta") for s in specs)
        return outs if is_tuple else outs[0]
