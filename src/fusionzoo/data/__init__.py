"""Datasets, synthetic data and joint transforms for RGB-D / RGB-T fusion.

>>> from fusionzoo import data
>>> data.list_datasets("synthetic_*")
['synthetic_rgbd', 'synthetic_rgbt']
>>> ds = data.create_dataset("synthetic_rgbd", num_samples=8, image_size=(64, 80))
>>> batch = data.collate([ds[0], ds[1]])
>>> batch["rgb"].shape, batch["depth"].shape, batch["mask"].shape
(torch.Size([2, 3, 64, 80]), torch.Size([2, 1, 64, 80]), torch.Size([2, 64, 80]))

See ``docs/data.md`` for the sample format, prepared layouts and policies.
"""

from ._registry import DatasetEntry, create_dataset, dataset_entry, list_datasets, register_dataset
from .base import DetectionDataset, PreparedDataset, SegmentationDataset
from .benchmarks import KAIST, LLVIP, M3FD, PST900, SUNRGBD, FLIRAligned, MFNet, NYUv2
from .collate import collate
from .folder import FolderDataset, FolderSpec, FolderSpecError, load_folder_spec
from .io import DataError, DataWarning
from .synthetic import SyntheticConfig, SyntheticDataset, SyntheticGenerator, SyntheticRGBD, SyntheticRGBT
from .transforms import (
    JointTransform,
    ModalityStats,
    Normalize,
    compute_stats,
    eval_transforms,
    train_transforms,
)

__all__ = [
    "KAIST",
    "LLVIP",
    "M3FD",
    "PST900",
    "SUNRGBD",
    "DataError",
    "DataWarning",
    "DatasetEntry",
    "DetectionDataset",
    "FLIRAligned",
    "FolderDataset",
    "FolderSpec",
    "FolderSpecError",
    "JointTransform",
    "MFNet",
    "ModalityStats",
    "NYUv2",
    "Normalize",
    "PreparedDataset",
    "SegmentationDataset",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticGenerator",
    "SyntheticRGBD",
    "SyntheticRGBT",
    "collate",
    "compute_stats",
    "create_dataset",
    "dataset_entry",
    "eval_transforms",
    "list_datasets",
    "load_folder_spec",
    "register_dataset",
    "train_transforms",
]
