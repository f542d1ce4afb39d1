"""fusionzoo.losses (deep supervision, class weights), data.statistics (class pixel counts) and
their wiring into the trainer (engine.builders.build_task / class_weights_for, train_one_epoch)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fusionzoo as fz
from fusionzoo.data import collate, create_dataset
from fusionzoo.data import statistics as stats
from fusionzoo.engine.builders import build_task, check_side_loss, class_weights_for
from fusionzoo.engine.config import ConfigError, TrainConfig, config_from_dict
from fusionzoo.engine.loop import Callback, EpochState, train_one_epoch
from fusionzoo.engine.optim import build_optimizer
from fusionzoo.losses import median_frequency_weights, segmentation_loss

IGNORE = 255


def nll(logits: torch.Tensor, b: int, y: int, x: int, c: int) -> float:
    """-log softmax of class c at pixel (y, x) of sample b, written out."""
    z = [float(v) for v in logits[b, :, y, x]]
    return -(z[c] - math.log(sum(math.exp(v) for v in z)))


def hand_term(logits: torch.Tensor, target: torch.Tensor, w: list[float], average: str) -> float:
    """One scale's weighted cross-entropy by a loop over pixels."""
    num = den = 0.0
    for b in range(target.shape[0]):
        for y in range(target.shape[1]):
            for x in range(target.shape[2]):
                c = int(target[b, y, x])
                if c == IGNORE:
                    continue
                num += w[c] * nll(logits, b, y, x, c)
                den += w[c] if average == "weighted" else 1.0
    return num / den


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    side = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[0, 0, 0] = IGNORE  # sampled by "nearest" (top-left of each 2x2 block)
    target[1, 1, 1] = IGNORE  # sampled by "nearest-exact" (centre of each 2x2 block)
    target[1, 2, 3] = IGNORE  # sampled by neither
    return logits, side, target


@pytest.mark.parametrize("average", ["weighted", "pixels"])
@pytest.mark.parametrize(("resize", "offset"), [("nearest", 0), ("nearest-exact", 1)])
def test_side_loss_equals_hand_computation(tensors, average, resize, offset):
    logits, side, target = tensors
    w = [0.5, 2.0, 1.5]
    got = segmentation_loss(logits, target, side_logits=[side], side_weights=[0.4], side_resize=resize,
                            class_weights=torch.tensor(w), average=average)
    # ESANet (cv2 INTER_NEAREST): label pixel 2i of each 2x2 block; ACNet (pixel centre): 2i + 1.
    small = target[:, offset::2, offset::2]
    want = hand_term(logits, target, w, average) + 0.4 * hand_term(side, small, w, average)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_bilinear_side_output_is_upsampled_to_the_label(tensors):
    logits, side, target = tensors
    got = segmentation_loss(logits, target, side_logits=[side], side_weights=[0.2], side_resize="bilinear")
    up = torch.nn.functional.interpolate(side, size=(4, 4), mode="bilinear", align_corners=True)
    ones = [1.0, 1.0, 1.0]
    want = hand_term(logits, target, ones, "weighted") + 0.2 * hand_term(up, target, ones, "weighted")
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_plain_loss_and_deep_supervision_off(tensors):
    logits, side, target = tensors
    side.requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE)
    off = segmentation_loss(logits, target, side_logits=[side])
    assert off.item() == plain.item()
    off.backward()
    assert side.grad is not None and not side.grad.any()  # in the graph, exactly zero gradient


def test_loss_argument_errors(tensors):
    logits, side, target = tensors
    with pytest.raises(ValueError, match="side_weights has 2 entries but the model gave 1"):
        segmentation_loss(logits, target, side_logits=[side], side_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"class_weights must have shape \(3,\)"):
        segmentation_loss(logits, target, class_weights=torch.ones(4))
    with pytest.raises(ValueError, match="side_resize must be one of"):
        segmentation_loss(logits, target, side_logits=[side], side_weights=[1.0], side_resize="area")


def test_median_frequency_weights_hand_table():
    # freq = pixels / pixels of the images containing the class: 0.1, 0.2, 0.4, 0.8; median
    # (even count: mean of the middle two, numpy.median) 0.3 -> weights 3, 1.5, 0.75, 0.375.
    w = median_frequency_weights(torch.tensor([10, 40, 40, 80]), torch.tensor([100, 200, 100, 100]))
    assert w.tolist() == pytest.approx([3.0, 1.5, 0.75, 0.375])
    # An absent class (index 2): weight 0, out of the median (0.1, 0.3, 0.1 -> 0.1), with a warning.
    with pytest.warns(UserWarning, match=r"classes \[2\] have no pixel"):
        w = median_frequency_weights(torch.tensor([10, 30, 0, 5]), torch.tensor([100, 100, 0, 50]))
    assert w.tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1.0])
    with pytest.raises(ValueError, match="no class has any pixel"):
        median_frequency_weights(torch.zeros(3), torch.zeros(3))


def test_class_pixel_counts_are_cached(tmp_path, monkeypatch, capsys):
    ds = create_dataset("synthetic_rgbd", num_samples=3, image_size=(32, 40))
    cache = tmp_path / "class_pixel_counts.json"
    counts = stats.class_pixel_counts(ds, ds.num_classes, cache=cache)
    masks = [torch.as_tensor(ds.raw(i)["mask"]).long() for i in range(3)]
    want = sum(torch.bincount(m[m != IGNORE], minlength=5) for m in masks)
    assert list(counts.class_pixels) == want.tolist()
    present = sum((torch.bincount(m[m != IGNORE], minlength=5) > 0).long() * m.numel() for m in masks)
    assert list(counts.image_pixels) == present.tolist()
    assert json.loads(cache.read_text())["class_pixels"] == want.tolist()
    assert "counting class pixels over the 3 training labels" in capsys.readouterr().err

    def fail(*_):
        raise AssertionError("a cached count read the labels again")

    monkeypatch.setattr(stats, "_label", fail)
    assert stats.class_pixel_counts(ds, ds.num_classes, cache=cache) == counts  # a resume reads the cache


def test_config_keys_are_checked():
    with pytest.raises(ConfigError, match="key 'class_weighting' must be one of"):
        config_from_dict({"class_weighting": "inverse"})
    with pytest.raises(ConfigError, match="key 'side_loss_weights' must be weights >= 0"):
        config_from_dict({"side_loss_weights": [1.0, -1.0]})


def tiny_esanet() -> torch.nn.Module:
    return fz.create_model("esanet_r18", num_classes=5, decoder_channels=(32, 16, 8), decoder_blocks=(1, 1, 1))


def test_side_loss_weights_must_fit_the_model():
    with torch.device("meta"):
        model = tiny_esanet()
    with pytest.raises(ConfigError, match=r"side_loss_weights has 2 weight\(s\) .* 3 side outputs \(strides \[8, 16, 32\]\)"):
        check_side_loss(TrainConfig(model="esanet_r18", side_loss_weights=(1.0, 1.0)), model)
    with pytest.warns(UserWarning, match="side_loss_weights is null"):
        check_side_loss(TrainConfig(model="esanet_r18"), model)
    with pytest.raises(ConfigError, match="has no side outputs"):
        check_side_loss(TrainConfig(side_loss_weights=(1.0,)), torch.nn.Conv2d(1, 1, 1))


class Grads(Callback):
    def on_after_backward(self, model, step, epoch):
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_two_training_steps_supervise_the_side_outputs(tmp_path):
    """Step 1 with deep supervision off, step 2 on (same model): median-frequency weights from the
    cached counts, every parameter gets a gradient, the side classifier's only when on."""
    torch.manual_seed(0)
    ds = create_dataset("synthetic_rgbd", num_samples=4, image_size=(32, 32))
    model = tiny_esanet()
    optimizer = build_optimizer(model, name="sgd", lr=1e-3, weight_decay=0.0)
    state, grads = EpochState(), Grads()
    for step, side_loss_weights in enumerate([None, (1.0, 1.0, 1.0)]):
        cfg = TrainConfig(model="esanet_r18", class_weighting="median_frequency", side_loss_weights=side_loss_weights)
        task = build_task(cfg, model, class_weights_for(cfg, ds, 5, tmp_path, torch.device("cpu")))
        assert task.class_weights.shape == (5,) and model.side_logits_resize == "nearest"
        batch = collate([ds[2 * step], ds[2 * step + 1]])
        out = train_one_epoch(model, [batch], optimizer, None, modalities=("rgb", "depth"), device=torch.device("cpu"),
                              state=state, num_batches=step + 1, callbacks=grads, task=task)
        assert math.isfinite(out["loss"])
        assert [n for n, g in grads.grads.items() if g is None] == []  # every parameter gets a gradient
        side = grads.grads["decoder.stages.0.side.weight"]  # the stride-32 side classifier
        assert side.abs().sum() > 0 if side_loss_weights else not side.any(), step
    assert (tmp_path / "class_pixel_counts.json").is_file()


def test_a_detector_refuses_segmentation_loss_settings():
    with torch.device("meta"):
        detector = fz.create_model("fcos_sum_resnet18", num_classes=2)
    for key, value in (("class_weighting", "median_frequency"), ("label_smoothing", 0.1), ("side_loss_weights", (1.0,))):
        with pytest.raises(ConfigError, match=key.replace("side_loss_weights", "side_weights")):
            build_task(TrainConfig(model="fcos_sum_resnet18", **{key: value}), detector)
