"""fusionzoo.stream_memo: a stream's stage outputs reused across the forwards of one batch
(interpretation's passes) only where they are exactly what a forward would compute.

The registry-wide check (every middle and late fusion model, plain forwards against reused ones
in float64) is tests/test_models.py::test_stream_reuse_equals_plain_forwards.
"""

from __future__ import annotations

import pytest
import torch

import fusionzoo as fz
from fusionzoo.stream_memo import StreamMemo, reusing_streams


def counting(fn, seen: list[int]):
    def run(x):
        seen.append(x.shape[0] if isinstance(x, torch.Tensor) else x[0].shape[0])
        return fn(x)
    return run


def test_equal_fingerprints_with_other_content_are_not_reused() -> None:
    """The fingerprint (an integer sum of the bits) is the same for an image with two pixels
    swapped; torch.equal tells them apart, so the second image is computed."""
    memo = StreamMemo()
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 2, 2)
    swapped = x.clone()
    swapped[0, 0, 0, 0], swapped[0, 0, 0, 1] = x[0, 0, 0, 1], x[0, 0, 0, 0]
    seen: list[int] = []
    double = counting(lambda v: 2 * v, seen)
    first = memo.rows("s", x).stage(0, double, x)
    again = memo.rows("s", torch.cat([x, swapped]))
    out = again.stage(0, double, torch.cat([x, swapped]))
    assert seen == [1, 1] and again.new.tolist() == [1]
    assert torch.equal(out, 2 * torch.cat([x, swapped])) and torch.equal(first, 2 * x)


def test_duplicate_images_in_one_batch_are_computed_once() -> None:
    memo = StreamMemo()
    x = torch.zeros(4, 2, 3, 3)  # the empty coalition under `zero`: one constant image
    seen: list[int] = []
    out = memo.rows("s", x).stage(0, counting(lambda v: v + 1, seen), x)
    assert seen == [1] and out.shape == x.shape and torch.equal(out, x + 1)


def test_an_output_changed_in_place_is_not_reused() -> None:
    """The first forward returns the stored tensor itself (no copy); a caller that then changes
    it in place must not make later forwards reuse the changed values."""
    memo = StreamMemo()
    x = torch.randn(2, 3, 4, 4)
    seen: list[int] = []
    out = memo.rows("s", x).stage(0, counting(lambda v: v * 3, seen), x)
    out.add_(1.0)
    again = memo.rows("s", x)
    assert torch.equal(again.stage(0, counting(lambda v: v * 3, seen), x), x * 3)
    assert seen == [2, 2] and not again.active


def test_a_stage_not_recorded_for_every_image_is_computed() -> None:
    """A forward that stopped reusing after stage 0 left stage 1 unrecorded for its images: a
    later forward computes stage 1 on its whole batch rather than gather rows that do not exist."""
    memo = StreamMemo()
    x = torch.randn(2, 3, 4, 4)
    rows = memo.rows("s", x)
    rows.stage(0, lambda v: v, x)
    rows.stop()
    seen: list[int] = []
    again = memo.rows("s", x)
    h = again.stage(0, counting(lambda v: v, seen), x)
    again.stage(1, counting(lambda v: v - 1, seen), h)
    assert seen == [2] and not again.active


def _esanet() -> torch.nn.Module:
    torch.manual_seed(0)
    return fz.create_model("esanet_resnet18", num_classes=3).double().eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64),
            "depth": torch.randn(2, 1, 64, 64, generator=g, dtype=torch.float64)}


def test_a_tap_listener_that_replaces_a_feature_stops_reuse() -> None:
    """A forward hook on the depth stream's stage-1 tap that changes the feature in the second
    forward: the depth stream's later stages must be computed from the changed feature."""
    model, x = _esanet(), _inputs()
    tap = model.taps.get("depth.stage1")
    with torch.no_grad():
        handle = tap.register_forward_hook(lambda _m, _a, out: out * 0.5)
        expected = model(x)
        handle.remove()
        with reusing_streams(model):
            model(x)
            handle = tap.register_forward_hook(lambda _m, _a, out: out * 0.5)
            got = model(x)
            handle.remove()
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "grad"])
def test_training_and_autograd_forwards_compute_everything(mode: str) -> None:
    model, x = _esanet(), _inputs()
    seen: list[int] = []
    hook = model.encoders["depth"].segments[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    with reusing_streams(model):
        with torch.no_grad():
            model(x)
        if mode == "train":
            model.train()
            with torch.no_grad():
                model(x)
        else:
            out = model(x)
            out.sum().backward()  # the graph reaches the encoder: nothing was gathered from the memo
            assert model.encoders["depth"].segments[0][0].weight.grad is not None
    hook.remove()
    assert seen == [2, 2]


def test_the_memo_is_dropped_when_the_block_ends_even_on_error() -> None:
    model = _esanet()
    with pytest.raises(RuntimeError, match="boom"), reusing_streams(model):
        assert model.stream_memo is not None
        raise RuntimeError("boom")
    assert model.stream_memo is None and type(model).stream_memo is None
