"""Registry-driven: every tap of every registered model declares ``after_fusion`` as its data flow
behaves (issue 21, item 5).

A tap is after fusion when its value depends on more than its own stream's input: for a modality
stream (``rgb.stage2``), on another modality's input; for a shared stream (``fused``, ``decoder``,
``head``, ``fpn``), on more than one modality. The test measures that dependence: it perturbs one
modality's input at a time on a small real input (eval mode, so BatchNorm uses running statistics
and images stay independent) and records which taps move. Parameters get small random noise first,
so a dependence that the initialization hides (DFormer's layer scale 1e-6, zero-initialized
gates) still shows: the claim is about the architecture, for generic weights.

Ids are model names (``pytest -k esanet``). The default suite runs one entry per declaration code
path (:data:`DEFAULT`); ``pytest -m slow`` runs every other registered entry.
"""

from __future__ import annotations

import time

import pytest
import torch
from meta_build import meta_device
from torch import nn

import fusionzoo as fz
from fusionzoo import interpret

SIZE = 64  # small, but PVT-style attention keeps 2x2 key tokens (at 32 one key: constant attention)
IMAGES = 2  # base images; a dependence must show on one of them (a dead ReLU can hide it on one image)
NUM_CLASSES = 3
# Relative change of a tap (max |delta| / max |value|) that counts as a dependence. An unrelated
# computation repeats the same float ops on the same numbers: its change was exactly 0 on every
# registered model. A real dependence moved a tap by 2e-2 or more, except SA-Gate R101's stage-4
# gate (1.1e-6: a softmax of two large logits, nearly saturated).
MOVED = 1e-7
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

# One entry per declaration code path runs in the default suite: each family's model class and
# fusion operator on resnet18, each published network with a declaration code of its own at its
# lightest variant, each detector class under FCOS. Left to `pytest -m slow`: other encoders (same
# code), late_weighted (late_mean's class and taps), RetinaNet (FCOS's declare_levels), the other
# late box rules (late_wbf's class), and ACNet / SA-Gate's published networks (the family's stage
# loop; 40M / 73M parameters).
DEFAULT = {
    *(f"{m}_resnet18" for m in ("acnet", "cmx", "crossattn", "early_concat", "early_stem", "esanet", "fusenet",
                                "hybrid_gate", "late_gate", "late_mean", "sagate")),
    "cmnext_mit_b0", "cmx_mit_b0", "dformer_tiny", "esanet_r18", "fusenet_vgg16", "geminifusion_mit_b0",
    *(f"fcos_{m}_resnet18" for m in ("cmx", "crossattn", "early", "hybrid_wbf", "late_wbf", "sum")),
    "mlpd_vgg16",  # the published two-stream SSD: shared conv5-10 per stream, six fused levels
}
ALL = fz.list_models()
pytestmark = pytest.mark.usefixtures("one_thread")  # two threads on a shared CPU made this 20x slower
PARAMS = [pytest.param(n, id=n, marks=() if n in DEFAULT else pytest.mark.slow) for n in ALL]


def build(name: str) -> nn.Module:
    """The registered architecture with random weights, in eval mode.

    Built on the meta device (no initialization cost) and filled here: He-normal weights, norm scales
    N(1, 0.1), other vectors N(0, 0.5) (biases, layer scales, gates: DFormer's 1e-6 layer scale or a
    zero-initialized gate would hide a dependence the architecture has), BatchNorm statistics those of
    a random batch. The claim tested is
    about the data flow, for generic weights.
    """
    # Detectors: no score passes, so post-processing (not under test) costs nothing on random weights.
    entry = fz.model_entry(name)
    kwargs = {"score_thresh": 1.0} if entry.task == "detection" and "score_thresh" in (entry.accepts or ()) else {}
    with meta_device():
        model = fz.create_model(name, num_classes=NUM_CLASSES, **kwargs)
    # Buffers that are constants of the architecture (YOLO's anchors) keep the values a real build gives.
    stats = ("running_mean", "running_var", "num_batches_tracked")
    constants = {}
    if any(not k.endswith(stats) for k, _ in model.named_buffers()):
        constants = {k: v for k, v in fz.create_model(name, num_classes=NUM_CLASSES, **kwargs).named_buffers()
                     if not k.endswith(stats)}
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            for key, p in module.named_parameters(recurse=False):
                if p.dim() > 1:
                    p.copy_((2.0 / p[0].numel()) ** 0.5 * torch.randn(p.shape, generator=g))
                elif isinstance(module, NORMS) and key == "weight":  # keeps the scale of deep stacks
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for key, b in model.named_buffers():
            if key in constants:
                b.copy_(constants[key])
                continue
            if not key.endswith(stats):
                raise AssertionError(f"{name}: buffer {key!r} needs a value; extend build()")
            b.fill_(1 if key.endswith("running_var") else 0)
    # BatchNorm statistics of one random batch (only the BatchNorms in training mode, momentum 1), so
    # random ResNets keep unit-scale features: saturated sigmoid gates would hide a dependence.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
        m.train()
    with torch.no_grad():
        model(random_inputs(model, 4, torch.Generator().manual_seed(2)))
    return model.eval()


def random_inputs(model: nn.Module, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Noise images with a random offset and scale per image and channel: globally pooled features
    (squeeze-excitation, channel attention) then differ between images and draws, as they do
    between real images, instead of all pooling to about the same vector. At least the model's
    ``min_input_size`` where it has one (ICAFusion's fixed token grids need 320 px)."""
    h, w = (max(SIZE, s) for s in getattr(model, "min_input_size", (SIZE, SIZE)))

    def draw(c: int) -> torch.Tensor:
        scale = torch.exp(0.5 * torch.randn(batch, c, 1, 1, generator=g))
        return scale * torch.randn(batch, c, h, w, generator=g) + torch.randn(batch, c, 1, 1, generator=g)

    return {m: draw(model.in_chans[m]) for m in model.modalities}


def observed_dependence(model: nn.Module) -> dict[str, set[str]]:
    """Tap -> the modalities whose input, perturbed alone, moves the tap.

    One forward pass: the batch holds the base images, then per modality the same images with that
    modality's input redrawn (eval mode keeps the images independent).
    """
    g = torch.Generator().manual_seed(1)
    mods = model.modalities
    base, redrawn = random_inputs(model, IMAGES, g), random_inputs(model, IMAGES, g)
    batch = {m: torch.cat([base[m]] + [redrawn[m] if p == m else base[m] for p in mods]) for m in mods}
    with torch.no_grad(), fz.capture(model) as acts:
        model(batch)
    moved: dict[str, set[str]] = {}
    for t, value in acts.items():
        groups = value.unflatten(0, (1 + len(mods), IMAGES))  # (1 + M, IMAGES, ...)
        scale = groups[0].abs().max().item()
        moved[t] = {m for i, m in enumerate(mods, 1)
                    if (groups[i] - groups[0]).abs().max().item() > MOVED * max(scale, 1e-12)}
    return moved


def observed_after_fusion(stream: str, modalities: tuple[str, ...], moved: set[str]) -> bool:
    """After fusion as measured: another modality moves a modality's tap; two or more move a shared tap."""
    if stream in modalities:
        return bool(moved - {stream})
    return len(moved) >= 2


@pytest.mark.parametrize("name", PARAMS)
def test_after_fusion_is_declared_as_observed(name: str) -> None:
    start = time.perf_counter()
    model = build(name)
    info = model.tap_info()
    moved = observed_dependence(model)
    wrong = {
        t: f"declared {info[t].after_fusion}, moved by {sorted(ms)}"
        for t, ms in moved.items()
        if info[t].after_fusion != observed_after_fusion(info[t].stream, model.modalities, ms)
    }
    assert not wrong, f"{name}: after_fusion differs from the measured dependence: {wrong}"
    # Every tap moves with at least one input (else the check above proves nothing for it).
    assert all(moved.values()), [t for t, ms in moved.items() if not ms]
    # A modality's own tap always moves with its own input.
    assert all(info[t].stream in ms for t, ms in moved.items() if info[t].stream in model.modalities)
    assert time.perf_counter() - start < 60, "keep this check small"


def test_default_entries_are_registered() -> None:
    assert DEFAULT <= set(ALL), sorted(DEFAULT - set(ALL))


def test_known_architectures() -> None:
    """The flag on taps whose answer the issue states: ESANet's RGB stream reads the fused stage-1
    map (its depth stream never does), CMX feeds both streams back, early fusion is after fusion
    from the encoder on, late fusion's per-modality taps are not (declarations only: meta device)."""
    with torch.device("meta"):
        infos = [fz.create_model(n, num_classes=NUM_CLASSES).tap_info()
                 for n in ("esanet_r18", "cmx_resnet18", "early_stem_resnet18", "late_gate_resnet18")]
    esanet, cmx, early, late = infos
    assert not esanet["rgb.stem"].after_fusion and esanet["rgb.stage1"].after_fusion and esanet["rgb.stage2"].after_fusion
    assert not any(esanet[f"depth.{s}"].after_fusion for s in ("stem", "stage1", "stage2", "stage3", "stage4"))
    assert [cmx[f"{m}.stage{k}"].after_fusion for m in ("rgb", "depth") for k in (1, 2)] == [False, True, False, True]
    assert not early["rgb.stem"].after_fusion and early["fused.stem"].after_fusion and early["fused.stage1"].after_fusion
    assert not any(late[f"{m}.{s}"].after_fusion for m in ("rgb", "depth") for s in ("stage4", "head"))
    assert late["head.gate"].after_fusion and late["head.logits"].after_fusion


def test_flag_reaches_metrics_json(tmp_path) -> None:
    """A saved interpretation result carries the flag per tap (``result.taps[name]["after_fusion"]``)."""
    ds = fz.data.create_dataset("synthetic_rgbd", split="val", num_samples=2, image_size=(64, 64))
    torch.manual_seed(0)
    model = fz.create_model("esanet_resnet18", num_classes=ds.num_classes)
    result = interpret.run(model, ds, metrics=["health"], batch_size=2, replicates=0)
    loaded = interpret.load_result(result.save(tmp_path / "metrics.json"))
    flags = {t: v["after_fusion"] for t, v in loaded.taps.items()}
    assert flags == {t: v.after_fusion for t, v in model.tap_info().items()}
    assert flags["rgb.stage1"] and not flags["depth.stage2"] and not flags["rgb.stem"]  # ESANet fuses its stem
