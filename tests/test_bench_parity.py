"""bench/parity.py's 'fastest' column (issue 23): which flags ``--fastest`` selects, and that the
fastest variant runs the same weights (channels_last keeps float32 outputs to rounding; bf16
autocast is applied where asked and its logits come back in float32 for the loss); whose AdamW
each side gets (``--optimizer``)."""

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
            assert low.dtype == torch.bfloat16  # computed under autocast; bench/parity.py upcasts for the loss
            assert (low.float() - ref).abs().max() <= 0.1 * ref.abs().max()


def test_fastest_variant_of_a_detector_trains_on_its_losses_and_infers_boxes():
    """The fastest column of a detector: with targets the call returns the loss terms (what
    bench/parity.py sums), without them in eval mode the boxes, from the same weights."""
    torch.manual_seed(0)
    eager = fz.create_model("fcos_early_resnet18", num_classes=2)
    fast = fz.create_model("fcos_early_resnet18", num_classes=2)
    fast.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(0)
    inputs = {"rgb": torch.randn(2, 3, 64, 64, generator=g), "thermal": torch.randn(2, 1, 64, 64, generator=g)}
    targets = parity.random_boxes(2, 64, 64, 2, g)
    _, call = parity.fastest_variant(fast, inputs, ("channels_last",), CPU)
    losses, ref = call(targets), eager(inputs, targets)
    assert losses.keys() == ref.keys() and losses
    for k in ref:
        torch.testing.assert_close(losses[k], ref[k], rtol=1e-4, atol=1e-5)
    eager.eval(), fast.eval()
    with torch.no_grad():
        boxes, ref_boxes = call(), eager(inputs)
    assert len(boxes) == len(ref_boxes) == 2 and all(b.keys() == r.keys() for b, r in zip(boxes, ref_boxes))


def test_optimizer_recipe_gives_ours_train_py_adamw_and_the_authors_pytorch_defaults():
    model = fz.create_model("early_concat_resnet18", num_classes=3)
    ours = parity.make_optimizer(model, "recipe", authors=False)
    theirs = parity.make_optimizer(model, "recipe", authors=True)
    plain = parity.make_optimizer(model, "plain", authors=False)
    assert ours.defaults["fused"] and [g["weight_decay"] for g in ours.param_groups] == [parity.WEIGHT_DECAY, 0.0]
    for opt in (theirs, plain):  # torch.optim.AdamW(params, lr, weight_decay) as CMX's and DFormer's train.py
        assert not opt.defaults["fused"] and len(opt.param_groups) == 1
        assert opt.param_groups[0]["weight_decay"] == parity.WEIGHT_DECAY and opt.param_groups[0]["lr"] == parity.LR
    with pytest.raises(ValueError, match="'recipe' or 'plain'"):
        parity.make_optimizer(model, "sgd", authors=False)


def _parity_module(method: str):
    spec = importlib.util.spec_from_file_location(f"parity_{method}", ROOT / "tools" / "parity" / f"{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports the authors' code only when a reference_* function runs
    return module


def test_detector_targets_reach_the_authors_losses_as_their_loaders_make_them():
    """bench/parity.py's boxes (xyxy pixels) as the rows YOLOv5's ComputeLoss reads (CFT, ICAFusion)
    and as MLPD's KAISTPed yields them (placeholder box, code 3, ignore flags on the 640x512 frame)."""
    seeded = _parity_module("seeded")
    targets = [{"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0], [60.0, 0.0, 80.0, 8.0]]), "labels": torch.tensor([2, 0])},
               {"boxes": torch.tensor([[0.0, 32.0, 20.0, 64.0]]), "labels": torch.tensor([1])}]
    rows = seeded.yolo_target_rows(targets, 64, 80)  # H 64, W 80: x by 80, y by 64
    torch.testing.assert_close(rows, torch.tensor([[0, 2, 0.3, 0.5, 0.4, 0.5], [0, 0, 0.875, 0.0625, 0.25, 0.125],
                                                   [1, 1, 0.125, 0.75, 0.25, 0.5]]))
    mlpd = _parity_module("mlpd")
    # 256x320 input = half the frame: their 5-pixel margin is 2.5 px here, the 12-pixel height 6 px
    boxes, labels = mlpd.loader_targets(
        [{"boxes": torch.tensor([[40.0, 20.0, 80.0, 120.0], [2.0, 20.0, 40.0, 120.0], [100.0, 100.0, 140.0, 105.0],
                                 [200.0, 200.0, 300.0, 254.0]]), "labels": torch.zeros(4, dtype=torch.long)}], 256, 320)
    torch.testing.assert_close(labels[0], torch.tensor([-1.0, 3.0, -1.0, -1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(boxes[0][0], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(boxes[0][1], torch.tensor([0.125, 20 / 256, 0.25, 120 / 256], dtype=torch.float64))
