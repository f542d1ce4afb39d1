"""Registry-driven tests of every detection model (resnet18 variants), tiny inputs, no network.

Ids are model names, so ``pytest tests/test_detection.py -k cmx`` selects one method.
"""

from __future__ import annotations

import math

import pytest
import torch
from meta_build import meta_device
from safetensors.torch import load_file, save_file
from torch import nn

import fusionzoo as fz
from fusionzoo.data import collate, create_dataset
from fusionzoo.detection.models import HybridFusionDetector, MiddleFusionDetector
from fusionzoo.models.base import init_parameters

SIZE = 64
NUM_CLASSES = 3
SMALL = {"fpn_channels": 64, "score_thresh": 0.0, "detections_per_img": 10}  # small head; keep boxes at init
ALL = fz.list_models(task="detection")
VARIANTS = [n for n in ALL if n.endswith("_resnet18")]
# Detectors on heavier encoders share every line but the encoder with their resnet18 sibling; they are
# built on the meta device (no memory, no arithmetic) and checked for the same taps (issue 12: suite time).
# Published detectors (the authors' networks, no resnet18 sibling) are run by their parity tests.
HEAVY = [n for n in ALL if fz.model_entry(n).encoder_fixed and n not in VARIANTS and not fz.model_entry(n).published]


def make_inputs(modalities: tuple[str, ...] = ("rgb", "thermal"), batch: int = 2, size: int = SIZE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(batch, fz.DEFAULT_CHANNELS[m], size, size, generator=g) for m in modalities}


def make_targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 62.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0]]), "labels": torch.tensor([0])},
    ]


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return fz.create_model(name, **{"num_classes": NUM_CLASSES, **SMALL, **kwargs})


@pytest.fixture(scope="module", params=VARIANTS)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def built(name: str) -> nn.Module:
    return build(name)


def test_zoo_covers_every_family_on_two_encoders() -> None:
    for encoder in ("resnet18", "resnet50"):
        names = fz.list_models(f"*_{encoder}", task="detection")
        assert {fz.model_entry(n).fusion for n in names} == {"early", "middle", "late", "hybrid"}
        for head in ("fcos", "retinanet"):
            assert {f"{head}_cmx_{encoder}", f"{head}_crossattn_{encoder}", f"{head}_sum_{encoder}",
                    f"{head}_late_proben_{encoder}", f"{head}_hybrid_wbf_{encoder}"} <= set(names)
    for n in ALL:
        entry = fz.model_entry(n)
        assert entry.task == "detection" and entry.modalities == ("rgb", "thermal") and entry.paper
    assert not set(ALL) & set(fz.list_models(task="segmentation"))


def test_detectors_register_through_register_family() -> None:
    """One registrar: a constructor that forwards **kwargs accepts its base constructor's keywords too."""
    assert set(init_parameters(HybridFusionDetector)) == set(init_parameters(MiddleFusionDetector)) | {"box_fusion",
                                                                                                     "fusion_iou"}
    accepts = fz.model_entry("fcos_hybrid_wbf").accepts
    assert "fpn_channels" in accepts and "box_fusion" not in accepts and "kwargs" not in accepts
    with pytest.raises(ValueError, match="exactly 2 modalities.*fcos_sum"):
        fz.create_model("fcos_cmx_resnet18", modalities=("rgb", "thermal", "depth"))


@pytest.mark.parametrize("heavy", HEAVY)
def test_heavy_variant_builds_on_meta_with_its_siblings_taps(heavy: str) -> None:
    entry = fz.model_entry(heavy)
    sibling = heavy[: -len(entry.encoder)] + "resnet18"
    with meta_device():
        model = fz.create_model(heavy, num_classes=NUM_CLASSES)
        light = fz.create_model(sibling, num_classes=NUM_CLASSES)
    info, light_info = model.tap_info(), light.tap_info()
    assert list(info) == list(light_info)
    assert [t.reduction for t in info.values()] == [t.reduction for t in light_info.values()]
    widths = {t.channels for name, t in info.items() if name.endswith(".stage4")}
    assert widths and widths != {t.channels for name, t in light_info.items() if name.endswith(".stage4")}


def test_train_mode_returns_losses_and_every_parameter_learns(name: str, built: nn.Module) -> None:
    model = built.train()
    model.zero_grad(set_to_none=True)
    losses = model(make_inputs(), make_targets())
    assert isinstance(losses, dict) and losses
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    fusion = fz.model_entry(name).fusion
    if fusion == "late":
        assert {k.split(".")[0] for k in losses} == {"rgb", "thermal"}
    elif fusion == "hybrid":
        assert {k.split(".")[0] for k in losses} == {"fused", "rgb", "thermal"}
    else:
        assert "classification" in losses and "bbox_regression" in losses
    assert model.head_detections == {}  # eval-mode output only
    sum(losses.values()).backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"parameters without gradient (a dead branch?): {dead[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_eval_detections_and_taps(name: str, built: nn.Module) -> None:
    """Eval output follows torchvision's convention; taps declared = observed, in order."""
    model = built.eval()
    info = model.tap_info()
    with torch.no_grad(), fz.capture(model) as acts:
        out = model(make_inputs(), make_targets())  # targets are ignored in eval, as in torchvision
    assert isinstance(out, list) and len(out) == 2
    for d in out:
        n = d["boxes"].shape[0]
        assert 0 < n <= SMALL["detections_per_img"]
        assert d["boxes"].shape == (n, 4) and d["scores"].shape == (n,) and d["labels"].shape == (n,)
        assert d["labels"].dtype == torch.long and ((d["labels"] >= 0) & (d["labels"] < NUM_CLASSES)).all()
        assert ((d["scores"] >= 0) & (d["scores"] <= 1)).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
    assert list(acts) == list(info), "taps must fire in their declared (execution) order"
    for tap, value in acts.items():
        meta = info[tap]
        assert value.shape[1] == meta.channels, tap
        if meta.reduction:
            side = math.ceil(SIZE / meta.reduction)
            assert value.shape[-2:] == (side, side), tap
    fusion = fz.model_entry(name).fusion
    levels = [f"fpn.p{k}" for k in range(3, 8)]
    if fusion in ("early", "middle", "hybrid"):
        assert set(levels) <= set(info) and {"fused.stage2", "fused.stage3", "fused.stage4"} <= set(info)
    if fusion in ("middle", "late", "hybrid"):
        assert {"rgb.stage1", "thermal.stage4"} <= set(info)
    if fusion in ("late", "hybrid"):
        assert {"rgb.p3", "thermal.p7", "rgb.head.p3", "thermal.head.p7"} <= set(info)
    if fusion != "late":  # the fused box head's classification logits per level, as segmentation's head.logits
        assert {f"head.p{k}" for k in range(3, 8)} <= set(info) and info["head.p3"].kind == "logits"
    if fusion == "early":
        assert not any(t.startswith(("rgb.", "thermal.")) for t in info)
    assert not any(m._forward_hooks for m in model.modules())
    # per-head detections are model output (DetectorMixin.head_detections), heads in the order they ran
    heads = model.head_detections
    assert list(heads) == {"early": ["fused"], "middle": ["fused"], "late": ["rgb", "thermal"],
                           "hybrid": ["fused", "rgb", "thermal"]}[fusion]
    assert all(len(dets) == 2 and set(dets[0]) >= {"boxes", "scores", "labels"} for dets in heads.values())
    if fusion in ("early", "middle"):
        assert heads["fused"] is out
    assert model.size_divisible == 32


def test_bad_inputs_and_targets(built: nn.Module) -> None:
    model = built.train()
    good = make_inputs()
    with pytest.raises(ValueError, match="thermal"):
        model({"rgb": good["rgb"]}, make_targets())
    with pytest.raises(ValueError, match=r"rgb.*\(2, 4, 64, 64\).*\(B, 3, H, W\)"):
        model({**good, "rgb": torch.randn(2, 4, SIZE, SIZE)}, make_targets())
    with pytest.raises(ValueError, match="needs targets"):
        model(good)
    degenerate = make_targets()
    degenerate[1]["boxes"] = torch.tensor([[10.0, 10.0, 5.0, 30.0]])
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]\[0\].*degenerate"):
        model(good, degenerate)


@pytest.mark.parametrize("model_name", ["fcos_early_resnet18", "retinanet_late_nms_resnet18"])
def test_empty_and_out_of_image_targets(model_name: str) -> None:
    model = build(model_name).train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)]
    losses = model(make_inputs(), empty)
    assert all(torch.isfinite(v) for v in losses.values())
    # Boxes partly outside the image are clipped: the same losses as the clipped boxes.
    outside, clipped = make_targets(), make_targets()
    outside[0]["boxes"][1] = torch.tensor([30.0, 20.0, 90.0, 70.0])
    clipped[0]["boxes"][1] = torch.tensor([30.0, 20.0, 64.0, 64.0])
    a, b = model(make_inputs(), outside), model(make_inputs(), clipped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_modality_policy(name: str, built: nn.Module) -> None:
    model = built.eval()
    inputs = make_inputs()
    fusion = fz.model_entry(name).fusion
    if fusion in ("early", "middle"):
        # Documented policy: the absent stream is zeros (the normalized mean).
        with torch.no_grad():
            out = model({"rgb": inputs["rgb"]}, missing=("thermal",))
            zero_filled = model({**inputs, "thermal": torch.zeros_like(inputs["thermal"])})
        assert all(torch.equal(a[k], b[k]) for a, b in zip(out, zero_filled) for k in a)
        return
    # Late / hybrid: the absent modality's own boxes are left out of the box fusion.
    seen = []
    fuse = model.fuse_boxes

    def spy(per_detector: list, present: list[bool]) -> list:  # records what the model fuses
        seen.append((per_detector, present))
        return fuse(per_detector, present)

    model.fuse_boxes = spy
    try:
        with torch.no_grad():
            out = model({"rgb": inputs["rgb"]}, missing=("thermal",))
    finally:
        del model.fuse_boxes
    per_detector, present = seen[0]
    assert present == ([True, True, False] if fusion == "hybrid" else [True, False])
    kept = [d for d, p in zip(per_detector, present) if p]
    rule = fz.detection.BOX_FUSIONS[model.box_fusion]
    for i, d in enumerate(out):
        expected = rule([k[i] for k in kept], max_detections=model.detections_per_img)
        assert all(torch.equal(d[k], expected[k]) for k in d)


def test_safetensors_round_trip(built: nn.Module, tmp_path) -> None:
    model = built.eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(123)  # different init, so equality below proves the load
    clone = fz.create_model(**model.config).eval()
    clone.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        a, b = model(make_inputs()), clone(make_inputs())
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_any_input_size_batch_one_and_save_pretrained(tmp_path) -> None:
    model = build("fcos_early_resnet18").eval()
    x = {"rgb": torch.randn(1, 3, 70, 50), "thermal": torch.randn(1, 1, 70, 50)}
    with torch.no_grad(), fz.capture(model, "fpn.p3", "fpn.p7") as acts:
        out = model(x)
    # Zero-padded to 96x64 (multiples of 32) as torchvision does; boxes stay inside the 50x70 image.
    assert acts["fpn.p3"].shape[-2:] == (12, 8) and acts["fpn.p7"].shape[-2:] == (1, 1)
    assert (out[0]["boxes"][:, 0::2] <= 50).all() and (out[0]["boxes"][:, 1::2] <= 70).all()
    model.save_pretrained(tmp_path)
    clone = fz.from_pretrained(tmp_path)
    with torch.no_grad():
        again = clone(x)
    assert all(torch.equal(out[0][k], again[0][k]) for k in out[0])
    with pytest.raises(ValueError, match="fpn_channels must be a multiple of 32 and at least 64"):
        fz.create_model("fcos_early_resnet18", fpn_channels=32)


def test_modality_parameters() -> None:
    early, late = build("fcos_early_resnet18"), build("retinanet_late_nms_resnet18")
    assert list(early.modality_parameters("thermal")) == []
    own = {id(p) for p in late.modality_parameters("thermal")}
    assert own == {id(p) for p in late.encoders["thermal"].parameters()} | {id(p) for p in late.detectors["thermal"].parameters()}


def test_two_modality_methods_and_three_streams() -> None:
    three = ("rgb", "depth", "thermal")
    with pytest.raises(ValueError, match="exactly 2"):
        fz.create_model("fcos_cmx_resnet18", modalities=three)
    model = build("fcos_crossattn_resnet18", modalities=three).eval()
    with torch.no_grad():
        out = model(make_inputs(three))
    assert len(out) == 2
    with pytest.raises(TypeError, match="fusion_op"):
        fz.create_model("fcos_sum_resnet18", fusion_op="cmx")
    family = fz.create_model("retinanet_late_wbf", encoder="resnet18", num_classes=2, fpn_channels=64)
    assert family.config["encoder"] == "resnet18" and family.box_fusion == "wbf"


@pytest.mark.parametrize("model_name", ["fcos_sum_resnet18", "retinanet_late_proben_resnet18"])
def test_a_few_steps_on_synthetic_boxes_lower_the_loss(model_name: str) -> None:
    data = create_dataset("synthetic_rgbt", num_samples=2, image_size=(SIZE, SIZE), seed=0)
    batch = collate([data[0], data[1]])
    inputs = {m: batch[m] for m in data.modalities}
    targets = [{"boxes": b, "labels": l} for b, l in zip(batch["boxes"], batch["labels"])]
    model = build(model_name, num_classes=data.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sum(model(inputs, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name, builder", [("fcos_early_resnet50", "fcos_resnet50_fpn"),
                                           ("retinanet_early_resnet50", "retinanet_resnet50_fpn")])
def test_one_stream_early_detector_is_torchvisions_detector(name: str, builder: str) -> None:
    """With RGB only, early fusion is torchvision's FCOS / RetinaNet ResNet-50 FPN: the same
    parameter shapes in the same order, and with its weights the same losses and detections."""
    import torchvision.models.detection as tvd

    ours = fz.create_model(name, num_classes=5, modalities=("rgb",), score_thresh=0.0).eval()
    reference = getattr(tvd, builder)(weights=None, weights_backbone=None, num_classes=5, score_thresh=0.0,
                                      min_size=SIZE, max_size=SIZE, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert [v.shape for v in mine.values()] == [v.shape for v in theirs.values()]
    ours.load_state_dict(dict(zip(mine, theirs.values())))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = ours({"rgb": x}), reference(list(x))
    for d, e in zip(a, b):
        assert all(torch.allclose(d[k].float(), e[k].float(), atol=1e-5) for k in d)
    ours.train()
    reference.train()
    la, lb = ours({"rgb": x}, make_targets()), reference(list(x), make_targets())
    assert la.keys() == lb.keys() and all(torch.allclose(la[k], lb[k]) for k in la)
