"""Readers for the benchmark datasets (prepared layouts; see ``datasets/<name>/README.md``).

Each class only states what differs: class names, palette, modalities, splits. Reading,
checks and errors live in :mod:`fusionzoo.data.base`.
"""

from __future__ import annotations

from typing import ClassVar

from ..classes import NYU40_CLASSES
from ._registry import register_dataset
from .base import DetectionDataset, SegmentationDataset

__all__ = [
    "KAIST",
    "LLVIP",
    "M3FD",
    "NYU40_CLASSES",
    "PST900",
    "SUNRGBD",
    "FLIRAligned",
    "MFNet",
    "NYUv2",
    "voc_palette",
]


def voc_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bits of the class index spread over R, G, B), ``n`` colours."""
    palette: ClassVar[list[tuple[int, int, int]]] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


@register_dataset(
    "nyuv2",
    task="segmentation",
    modalities=("rgb", "depth"),
    num_classes=40,
    splits=("train", "test"),
    paper="Silberman et al., Indoor Segmentation and Support Inference from RGBD Images, ECCV 2012",
)
class NYUv2(SegmentationDataset):
    """NYU Depth v2 labeled set: 1449 RGB-D frames, 480x640, 40 classes, 795 train / 654 test.

    Modalities ``rgb``, ``depth`` (metres, from the labeled .mat's in-painted depth) and optionally
    ``hha`` (if prepare.py was run with ``--hha``).
    """

    name = "nyuv2"
    classes: ClassVar[list[str]] = NYU40_CLASSES
    palette: ClassVar[list[tuple[int, int, int]]] = voc_palette(41)[1:]
    default_modalities = ("rgb", "depth")
    available_modalities = ("rgb", "depth", "hha")


@register_dataset(
    "sunrgbd",
    task="segmentation",
    modalities=("rgb", "depth"),
    num_classes=37,
    splits=("train", "test"),
    paper="Song et al., SUN RGB-D: A RGB-D Scene Understanding Benchmark Suite, CVPR 2015",
)
class SUNRGBD(SegmentationDataset):
    """SUN RGB-D: 10335 RGB-D frames of four sensors (various sizes), 37 classes, 5285 / 5050."""

    name = "sunrgbd"
    classes: ClassVar[list[str]] = NYU40_CLASSES[:37]
    palette: ClassVar[list[tuple[int, int, int]]] = voc_palette(38)[1:]
    default_modalities = ("rgb", "depth")
    available_modalities = ("rgb", "depth", "hha")


@register_dataset(
    "mfnet",
    task="segmentation",
    modalities=("rgb", "thermal"),
    num_classes=9,
    splits=("train", "val", "test", "test_day", "test_night"),
    paper="Ha et al., MFNet: Towards Real-Time Semantic Segmentation for Autonomous Vehicles "
    "with Multi-Spectral Scenes, IROS 2017",
)
class MFNet(SegmentationDataset):
    """MFNet RGB-T urban scenes: 1569 pairs (820 day, 749 night), 480x640, 9 classes.

    Class 0 ``unlabeled`` is a real training class in the benchmark protocol (RTFNet et al.
    report mIoU over all 9); ids ending in ``D``/``N`` are day/night, and the ``test_day`` /
    ``test_night`` splits hold the two halves of ``test``.
    """

    name = "mfnet"
    classes: ClassVar[list[str]] = [
        "unlabeled",
        "car",
        "person",
        "bike",
        "curve",
        "car_stop",
        "guardrail",
        "color_cone",
        "bump",
    ]
    # Colours of RTFNet's visualisation (Sun et al. 2019), so figures match the literature.
    palette: ClassVar[list[tuple[int, int, int]]] = [
        (0, 0, 0),
        (64, 0, 128),
        (64, 64, 0),
        (0, 128, 192),
        (0, 0, 192),
        (128, 128, 0),
        (64, 64, 128),
        (192, 128, 128),
        (192, 64, 0),
    ]
    default_modalities = ("rgb", "thermal")
    available_modalities = ("rgb", "thermal")


@register_dataset(
    "pst900",
    task="segmentation",
    modalities=("rgb", "thermal"),
    num_classes=5,
    splits=("train", "test"),
    paper="Shivakumar et al., PST900: RGB-Thermal Calibration, Dataset and Segmentation Network, ICRA 2020",
)
class PST900(SegmentationDataset):
    """PST900 subterranean RGB-T: about 900 aligned pairs, 720x1280, 5 classes, official train/test folders."""

    name = "pst900"
    classes: ClassVar[list[str]] = ["background", "fire_extinguisher", "backpack", "hand_drill", "survivor"]
    palette: ClassVar[list[tuple[int, int, int]]] = [
        (0, 0, 0),
        (0, 0, 255),
        (0, 255, 0),
        (255, 0, 0),
        (255, 255, 255),
    ]
    default_modalities = ("rgb", "thermal")
    available_modalities = ("rgb", "thermal")


@register_dataset(
    "llvip",
    task="detection",
    modalities=("rgb", "thermal"),
    num_classes=1,
    splits=("train", "test"),
    paper="Jia et al., LLVIP: A Visible-infrared Paired Dataset for Low-light Vision, ICCV-W 2021",
)
class LLVIP(DetectionDataset):
    """LLVIP: 15488 aligned visible/infrared pairs, 1024x1280, pedestrians, 12025 / 3463."""

    name = "llvip"
    classes: ClassVar[list[str]] = ["person"]
    palette: ClassVar[list[tuple[int, int, int]]] = [(220, 20, 60)]
    default_modalities = ("rgb", "thermal")
    available_modalities = ("rgb", "thermal")


@register_dataset(
    "flir_aligned",
    task="detection",
    modalities=("rgb", "thermal"),
    num_classes=3,
    splits=("train", "test"),
    paper="Zhang et al., Multispectral Fusion for Object Detection with Cyclic Fuse-and-Refine "
    "Blocks, ICIP 2020 (aligned subset of the FLIR ADAS v1 dataset)",
)
class FLIRAligned(DetectionDataset):
    """FLIR ADAS, aligned subset: 5142 pairs (4129 train / 1013 test), 512x640, 3 classes."""

    name = "flir_aligned"
    classes: ClassVar[list[str]] = ["person", "bicycle", "car"]
    palette: ClassVar[list[tuple[int, int, int]]] = [(220, 20, 60), (119, 11, 32), (0, 0, 142)]
    default_modalities = ("rgb", "thermal")
    available_modalities = ("rgb", "thermal")


@register_dataset(
    "kaist",
    task="detection",
    modalities=("rgb", "thermal"),
    num_classes=1,
    splits=("train", "test"),
    paper="Hwang et al., Multispectral Pedestrian Detection: Benchmark Dataset and Baseline, CVPR 2015",
)
class KAIST(DetectionDataset):
    """KAIST multispectral pedestrians, 512x640; the prepared split follows the common
    ``train-all-02`` (every 2nd frame, 25076 ids) / ``test-all-20`` (2252 ids) lists."""

    name = "kaist"
    classes: ClassVar[list[str]] = ["person"]
    palette: ClassVar[list[tuple[int, int, int]]] = [(220, 20, 60)]
    default_modalities = ("rgb", "thermal")
    available_modalities = ("rgb", "thermal")


@register_dataset(
    "m3fd",
    task="detection",
    modalities=("rgb", "thermal"),
    num_classes=6,
    splits=("train", "test"),
    paper="Liu et al., Target-aware Dual Adversarial Learning and a Multi-scenario "
    "Multi-Modality Benchmark to Fuse Infrared and Visible for Object Detection, CVPR 2022",
)
class M3FD(DetectionDataset):
    """M3FD detection: 4200 aligned pairs, 768x1024, 6 classes (no official split; prepare.py
    writes a seeded 80/20 split and says so)."""

    name = "m3fd"
    classes: ClassVar[list[str]] = ["people", "car", "bus", "motorcycle", "lamp", "truck"]
    palette: ClassVar[list[tuple[int, int, int]]] = voc_palette(7)[1:]
    default_modalities = ("rgb", "thermal")
    available_modalities = ("rgb", "thermal")
