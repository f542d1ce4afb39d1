"""bench/parity.py's 'fastest' column (issue 23): which flags ``--fastest`` selects, and that the
fastest variant runs the same weights (channels_last keeps float32 outputs to rounding; bf16
autocast is applied where asked and its logits come back in float32 for the loss)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fusionzoo as fz
from fusionzoo.benchmark import bf16_unsupported

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_parity", ROOT / "bench" / "parity.py")
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)
CPU = torch.device("cpu")


def test_fastest_flags_follow_the_device():
    auto = parity.fast_flags("auto", CPU)
    assert auto[:2] == ("channels_last", "compile")
    assert ("bf16" in auto) == (bf16_unsupported(CPU) is None)
    assert parity.fast_flags("off", CPU) == ()
    assert parity.fast_flags("bf16, channels_last", CPU) == ("bf16", "channels_last")
    with pytest.raises(ValueError, match="unknown flag.*'fp8'"):
        parity.fast_flags("channels_last,fp8", CPU)


def test_fastest_variant_runs_the_same_weights():
    torch.manual_seed(0)
    eager = fz.create_model("early_concat_resnet18", num_classes=3).eval()
    fast = fz.create_model("early_concat_resnet18", num_classes=3).eval()
    fast.load_state_dict(eager.state_dict())
    inputs = {"rgb": torch.randn(1, 3, 32, 32), "depth": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        ref = eager(inputs)
        _, forward = parity.fastest_variant(fast, inputs, ("channels_last",), CPU)
        out = forward()
        kernels = [p for p in fast.parameters() if p.ndim == 4 and p.shape[-1] > 1]
        assert kernels and all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        if bf16_unsupported(CPU) is None:
            _, forward = parity.fastest_variant(fast, inputs, ("bf16",), CPU)
            low = forward()
            assert low.dtype == torch.float32 and not torch.equal(low, out)  # computed in bf16, returned as float32
            assert (low - ref).abs().max() <= 0.1 * ref.abs().max()
