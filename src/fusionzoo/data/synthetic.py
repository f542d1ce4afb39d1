"""A procedural RGB-D / RGB-T world whose modality dependence is known by construction.

Each scene is a textured background (a tilted plane in depth, a smooth temperature field in
thermal) with 3-7 objects of four foreground classes. The classes differ in *which modality
carries them*; everything else (shape distribution, size, position) is shared, so the only
way to tell two classes apart is the modality that differs:

=====  ==============================  ===============================================  ==============
index  RGB-D name / RGB-T name         what it is                                       visible in
=====  ==============================  ===============================================  ==============
0      background                      grey textured plane; depth = plane, thermal =    rgb, x
                                       smooth field
1      poster_rgb_only /               saturated warm-coloured block that changes       rgb
       sign_rgb_only                   colour only: depth/thermal equal to what lies
                                       below it (a poster on the wall, paint on a road)
2      box_depth_only /                block that changes depth (flat face 0.3-0.9 m in  x
       heater_thermal_only             front of the plane) or temperature only; its RGB
                                       is exactly what lies behind it (camouflaged)
3      ball_either / animal_either     disk with a saturated *cool* colour and a dome    rgb, x
                                       in depth (or a warm dome in thermal); either
                                       modality alone identifies it
4      crate_needs_both /              block with the poster's colour distribution AND  rgb, x
       engine_needs_both               the box's depth/thermal distribution: RGB alone
                                       confuses it with class 1, depth/thermal alone
                                       with class 2; only the conjunction separates it
=====  ==============================  ===============================================  ==============

("x" is the second modality, ``depth`` or ``thermal``.) Consequences, which the
interpretability tests rely on (:attr:`SyntheticConfig.class_visibility` and
:attr:`SyntheticConfig.class_dependence` give the table as data):

* an RGB-only model cannot find class 2 (its pixels are RGB-identical to whatever is behind
  them) and confuses classes 1 and 4;
* a depth- (thermal-) only model cannot find class 1 and confuses classes 2 and 4;
* a fusion model can separate all five, so fusion beats either modality in mIoU;
* dropping depth should hurt class 2 and 4 IoU, and leave class 1 unchanged; dropping RGB the
  reverse.

Sensor effects: RGB has a random lighting gradient and Gaussian noise; depth follows the
Kinect axial noise model ``sigma(d) = 0.0012 + 0.0019 (d - 0.4)^2`` metres (Nguyen, Izadi and
Lovell, 3DIMPVT 2012), has invalid (0) speckles (0-3% of pixels), a shadow band of invalid
pixels beside raised objects (the projector/camera baseline of structured light), and 0
beyond ``max_depth``; thermal has a temperature gradient, Gaussian and column
(fixed-pattern) noise. Objects occlude each other (painter's order; for depth far to near)
with limited overlap so the known answer stays clean; boxes are the extents of the
*visible* pixels of each object, xyxy pixels, labelled with the mask class index (1-4).

Speed: everything is vectorized numpy on object windows, and the random noise and texture
fields are crops at random offsets of banks generated once per (image size, seed), so a
480x640 RGB-D sample costs a few milliseconds on one core (``python bench/data.py``).
Determinism: sample ``i`` of split ``s`` with seed ``k`` is a pure function of
``(k, s, i)``; train/val/test use different seed streams.
"""

from __future__ import annotations

import colorsys
import threading
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from ._registry import register_dataset
from .transforms import eval_transforms

__all__ = [
    "SyntheticClass",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticGenerator",
    "SyntheticRGBD",
    "SyntheticRGBT",
]


@dataclass(frozen=True)
class SyntheticClass:
    """One class of the synthetic world.

    Attributes:
        name: Class name.
        visible_in: Modalities in which the class's pixels differ from what lies behind them.
        dependence: ``"background"``, ``"rgb_only"``, ``"depth_only"`` / ``"thermal_only"``,
            ``"either"`` (each modality alone suffices) or ``"both_required"`` (only the
            conjunction of both modalities identifies it).
        description: One line for docs and reports.
    """

    name: str
    visible_in: tuple[str, ...]
    dependence: str
    description: str


_NAMES = {
    "depth": ("background", "poster_rgb_only", "box_depth_only", "ball_either", "crate_needs_both"),
    "thermal": ("background", "sign_rgb_only", "heater_thermal_only", "animal_either", "engine_needs_both"),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic world (defaults are the documented benchmark setting).

    Attributes:
        second: Second modality, ``"depth"`` or ``"thermal"``.
        image_size: ``(H, W)``.
        num_objects: Inclusive range of objects per scene.
        object_size: Range of object height as a fraction of image height.
        max_overlap: Largest allowed intersection of two object boxes, as a fraction of the
            smaller box (occlusion happens, but no object is hidden entirely).
        rgb_noise: Range of RGB noise std (RGB in [0, 1]).
        invalid_fraction: Range of the fraction of random invalid depth pixels.
        shadow_px: Range of the invalid shadow band width in pixels at 640 px image width.
        max_depth: Depth beyond this (metres) is invalid (0), like a sensor's range limit.
        height_range: Range of how far raised objects stand in front of the plane (metres).
        heat_range: Range of the temperature rise of warm objects (thermal in [0, 1]).
        thermal_noise: Range of thermal noise std.
        impurity: Planted impurity (0 = off, the documented world): stripes of false signal in the
            second modality over the visible pixels of the RGB-only class 1, this many metres
            nearer (depth: the lift of a class-2 box face) or warmer (thermal); see
            :meth:`SyntheticGenerator.plant_impurity`. The known answer of MIM's purification
            gates (docs/mim.md): a gate that learns to drop it closes there and nowhere else.
    """

    second: str = "depth"
    image_size: tuple[int, int] = (240, 320)
    num_objects: tuple[int, int] = (3, 7)
    object_size: tuple[float, float] = (0.15, 0.4)
    max_overlap: float = 0.3
    rgb_noise: tuple[float, float] = (0.01, 0.04)
    invalid_fraction: tuple[float, float] = (0.0, 0.03)
    shadow_px: tuple[int, int] = (2, 8)
    max_depth: float = 8.0
    height_range: tuple[float, float] = (0.3, 0.9)
    heat_range: tuple[float, float] = (0.2, 0.4)
    thermal_noise: tuple[float, float] = (0.005, 0.02)
    impurity: float = 0.0

    def __post_init__(self) -> None:
        if self.second not in _NAMES:
            raise ValueError(f"SyntheticConfig.second must be 'depth' or 'thermal', got {self.second!r}")
        h, w = self.image_size
        if h < 16 or w < 16:
            raise ValueError(f"SyntheticConfig.image_size must be at least (16, 16), got {self.image_size}")
        if not self.impurity >= 0:
            raise ValueError(f"SyntheticConfig.impurity must be >= 0 (0 = off), got {self.impurity!r}")
        lo, hi = self.num_objects
        if not 0 <= lo <= hi:
            raise ValueError(
                f"SyntheticConfig.num_objects must be (min, max) with 0 <= min <= max, got {self.num_objects}"
            )

    @property
    def modalities(self) -> tuple[str, str]:
        """``("rgb", "depth")`` or ``("rgb", "thermal")``."""
        return ("rgb", self.second)

    @property
    def classes(self) -> tuple[SyntheticClass, ...]:
        """The five classes in label order."""
        x = self.second
        n = _NAMES[x]
        return (
            SyntheticClass(n[0], ("rgb", x), "background", f"grey textured background, smooth {x}"),
            SyntheticClass(
                n[1], ("rgb",), "rgb_only", f"warm-coloured block, {x} equal to what is behind it"
            ),
            SyntheticClass(
                n[2], (x,), f"{x}_only", f"block visible only in {x}; RGB equal to what is behind it"
            ),
            SyntheticClass(
                n[3], ("rgb", x), "either", f"cool-coloured disk with a {x} dome; either modality suffices"
            ),
            SyntheticClass(
                n[4],
                ("rgb", x),
                "both_required",
                f"colour of class 1 and {x} of class 2: needs both modalities",
            ),
        )

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return [c.name for c in self.classes]

    @property
    def class_visibility(self) -> dict[str, tuple[str, ...]]:
        """Class name -> modalities in which it is visible, e.g. ``{"box_depth_only": ("depth",)}``."""
        return {c.name: c.visible_in for c in self.classes}

    @property
    def class_dependence(self) -> dict[str, str]:
        """Class name -> ``"rgb_only"``, ``"depth_only"``/``"thermal_only"``, ``"either"``,
        ``"both_required"`` or ``"background"``."""
        return {c.name: c.dependence for c in self.classes}


# Object families: classes 1, 2, 4 share the "block" family (rectangle or ellipse), class 3 is
# a disk. Appearance: "warm" / "cool" colour or None (camouflaged in RGB). Signal in the second
# modality: "flat", "dome" or None (invisible there).
_KINDS = {
    1: ("block", "warm", None),
    2: ("block", None, "flat"),
    3: ("disk", "cool", "dome"),
    4: ("block", "warm", "flat"),
}

_PALETTE = [(40, 40, 40), (230, 120, 30), (60, 160, 220), (120, 60, 200), (200, 40, 60)]


class _Banks:
    """Random fields generated once per (size, seed); samples take crops at random offsets."""

    PAD = 64

    def __init__(self, height: int, width: int, seed: int) -> None:
        rng = np.random.default_rng([seed, 0x5EED])
        p = self.PAD
        self.gauss3 = rng.standard_normal((3, height + p, width + p), dtype=np.float32)
        self.gauss = rng.standard_normal((height + p, width + p), dtype=np.float32)
        self.gauss_b = rng.standard_normal((height + p, width + p), dtype=np.float32)
        self.texture = self._texture(rng, 2 * height, 2 * width)
        self.texture_b = self._texture(rng, 2 * height, 2 * width)
        self.zeros = np.zeros((height, width), np.float32)
        self.yy = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
        self.xx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]

    @staticmethod
    def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        # Sum of upsampled noise octaves (cell sizes 4..64 px): smooth, unit-std texture.
        out = np.zeros((height, width), np.float32)
        for cell, weight in ((4, 0.25), (12, 0.5), (32, 0.8), (64, 1.0)):
            small = rng.standard_normal((height // cell + 2, width // cell + 2)).astype(np.float32)
            out += weight * cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        out /= out.std()
        return out

    def crop(self, bank: np.ndarray, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        oy = int(rng.integers(0, bank.shape[-2] - height + 1))
        ox = int(rng.integers(0, bank.shape[-1] - width + 1))
        return bank[..., oy : oy + height, ox : ox + width]


_BANK_CACHE: dict[tuple[int, int, int], _Banks] = {}

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _split_code(split: str) -> int:
    return _SPLIT_CODES.get(split, zlib.crc32(split.encode()) + 3)


def _colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    # Warm hues 0-55 deg, cool hues 190-250 deg, both saturated; the background is low-saturation
    # grey, so hue and saturation separate the three appearance groups.
    hue = rng.uniform(0, 55) if kind == "warm" else rng.uniform(190, 250)
    rgb = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    return np.asarray(rgb, np.float32)


def _put(dst: np.ndarray, value: np.ndarray | float, m: np.ndarray | None) -> None:
    """``dst[m] = value`` in place; ``m`` is a uint8 0/1 window mask or None (all of ``dst``).
    cv2.copyTo is used because numpy's masked assignment is 10-20x slower."""
    if m is None:
        dst[...] = value
        return
    if not isinstance(value, np.ndarray) or value.shape != dst.shape:
        value = np.full(dst.shape, value, dst.dtype)
    cv2.copyTo(value, m, dst)


class SyntheticGenerator:
    """Callable producing raw synthetic samples.

    Args:
        config: World parameters.
        seed: Base seed.

    Example:
        >>> gen = SyntheticGenerator(SyntheticConfig(image_size=(64, 80)), seed=0)
        >>> s = gen(0, "train")
        >>> s["rgb"].shape, s["depth"].dtype, int(s["mask"].max()) <= 4
        ((64, 80, 3), dtype('float32'), True)
    """

    def __init__(self, config: SyntheticConfig | None = None, seed: int = 0) -> None:
        self.config = config or SyntheticConfig()
        self.seed = int(seed)
        self._local = threading.local()

    def _buffers(self) -> dict[str, Any]:
        """Work arrays of this thread (DataLoader workers are processes, each with its own)."""
        bufs = getattr(self._local, "bufs", None)
        h, w = self.config.image_size
        if bufs is None or bufs["shade"].shape != (h, w):
            f32 = lambda: np.empty((h, w), np.float32)
            bufs = {
                "shade": f32(),
                "planes": [f32() for _ in range(3)],
                "second_bg": f32(),
                "tmp": f32(),
                "inst": np.empty((h, w), np.uint8),
                "invalid": np.empty((h, w), np.uint8),
                "flag": np.empty((h, w), bool),
            }
            self._local.bufs = bufs
        return bufs

    def __getstate__(self) -> dict[str, Any]:  # thread-local buffers do not pickle (DataLoader workers)
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def banks(self) -> _Banks:
        h, w = self.config.image_size
        key = (h, w, self.seed)
        if key not in _BANK_CACHE:
            _BANK_CACHE[key] = _Banks(h, w, self.seed)
        return _BANK_CACHE[key]

    def __call__(self, index: int, split: str = "train", hide: Collection[int | str] = ()) -> dict[str, Any]:
        """Generate sample ``index`` of ``split``.

        Args:
            index: Sample index.
            split: Split name (selects the seed stream).
            hide: Classes (indices or names) whose objects are not drawn, with every random
                draw unchanged: the counterfactual scene without them. Comparing it with the
                full scene shows in which modality a class is visible (used by the tests and
                usable for interventions in interpretability studies).

        Returns:
            Raw sample: ``rgb`` float32 ``(H, W, 3)`` in [0, 1]; ``depth`` float32 ``(H, W)``
            metres with 0 = invalid (or ``thermal`` float32 ``(H, W)`` in [0, 1]); ``mask`` uint8
            ``(H, W)``; ``boxes`` float32 ``(N, 4)`` xyxy; ``labels`` int64 ``(N,)``; ``meta``.
        """
        cfg = self.config
        h, w = cfg.image_size
        banks = self.banks
        rng = np.random.default_rng([self.seed, _split_code(split), int(index)])

        # --- background -------------------------------------------------------------------
        # RGB is built as three contiguous planes and merged at the end: numpy ops on a
        # trailing axis of 3 and np.copyto(where=) are 10-20x slower than plane-wise ops and
        # cv2.copyTo. Intermediates live in per-thread work buffers: fresh multi-megabyte
        # temporaries cost thousands of page faults per sample, as much as the arithmetic.
        buf = self._buffers()
        grey = rng.uniform(0.35, 0.7)
        base = np.float32(grey) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
        shade = buf["shade"]
        np.add(
            np.float32(1) + np.float32(rng.uniform(-0.3, 0.3)) * banks.yy,
            np.float32(rng.uniform(-0.3, 0.3)) * banks.xx,
            out=shade,
        )
        cv2.scaleAdd(banks.crop(banks.texture, rng, h, w), float(rng.uniform(0.08, 0.2)), shade, dst=shade)
        planes = buf["planes"]
        for c in range(3):
            np.multiply(shade, base[c], out=planes[c])
        mask = np.zeros((h, w), np.uint8)
        inst = buf["inst"]
        inst.fill(0)

        thermal_mode = cfg.second == "thermal"
        second_bg = buf["second_bg"]
        if thermal_mode:
            np.add(
                np.float32(rng.uniform(0.3, 0.55)) + np.float32(rng.uniform(-0.1, 0.1)) * banks.yy,
                np.float32(rng.uniform(-0.1, 0.1)) * banks.xx,
                out=second_bg,
            )
            cv2.scaleAdd(banks.crop(banks.texture_b, rng, h, w), 0.03, second_bg, dst=second_bg)
        else:
            # A tilted wall/floor plane 0.8-7 m away.
            np.add(
                np.float32(rng.uniform(2.0, 5.0)) + np.float32(rng.uniform(-1.2, 1.2)) * banks.yy,
                np.float32(rng.uniform(-0.8, 0.8)) * banks.xx,
                out=second_bg,
            )
            np.maximum(second_bg, np.float32(0.8), out=second_bg)
        second = second_bg.copy()  # an output: fresh memory
        invalid = None
        if not thermal_mode:
            invalid = buf["invalid"]
            invalid.fill(0)

        # --- objects ----------------------------------------------------------------------
        objects = self._place_objects(rng)
        if not thermal_mode:  # painter's order far -> near keeps occlusion consistent with depth
            objects.sort(key=lambda o: o["lift"])
        shadow_scale = w / 640.0
        hidden = self._class_indices(hide)
        for k, obj in enumerate(objects, start=1):
            if obj["cls"] in hidden:
                continue
            y0, y1, x0, x1 = obj["win"]
            win = (slice(y0, y1), slice(x0, x1))
            m, r2 = self._shape(obj, y0, y1, x0, x1)  # m is None for a rectangle: it fills its window
            _, appearance, signal = _KINDS[obj["cls"]]
            _put(mask[win], obj["cls"], m)
            _put(inst[win], k, m)
            if appearance is not None:
                sh = shade[win]
                for c in range(3):
                    _put(planes[c][win], sh * obj["colour"][c], m)
            if signal is None:
                continue
            bg = second_bg[win]
            if signal == "flat":
                profile = np.float32(obj["lift"])
            else:
                profile = np.sqrt(np.maximum(1 - r2, 0)) * np.float32(0.5 * obj["lift"]) + np.float32(
                    0.5 * obj["lift"]
                )
            _put(second[win], bg + profile if thermal_mode else bg - profile, m)
            if not thermal_mode:
                _put(invalid[win], 0, m)
                self._shadow(invalid, m, y0, y1, x0, round(obj["shadow"] * shadow_scale))

        if cfg.impurity > 0:
            self.plant_impurity(second, mask, split, index)

        # --- sensor noise ------------------------------------------------------------------
        sigma_rgb = float(rng.uniform(*cfg.rgb_noise))
        noise = banks.crop(banks.gauss3, rng, h, w)
        for c in range(3):
            cv2.scaleAdd(noise[c], sigma_rgb, planes[c], dst=planes[c])
        rgb = cv2.merge(planes)  # an output: fresh memory
        np.clip(rgb, 0, 1, out=rgb)
        if thermal_mode:
            cv2.scaleAdd(
                banks.crop(banks.gauss, rng, h, w), float(rng.uniform(*cfg.thermal_noise)), second, dst=second
            )
            second += (rng.standard_normal(w).astype(np.float32) * np.float32(0.004))[None, :]  # column noise
            np.clip(second, 0, 1, out=second)
        else:
            sigma = buf["tmp"]
            np.subtract(second, np.float32(0.4), out=sigma)
            np.multiply(sigma, sigma, out=sigma)
            np.multiply(sigma, np.float32(0.0019), out=sigma)
            np.add(sigma, np.float32(0.0012), out=sigma)
            cv2.multiply(sigma, banks.crop(banks.gauss, rng, h, w), dst=sigma)
            np.add(second, sigma, out=second)
            flag = buf["flag"]
            frac = rng.uniform(*cfg.invalid_fraction)
            if frac > 0:
                z = np.float32(NormalDist().inv_cdf(1.0 - frac))
                np.greater(banks.crop(banks.gauss_b, rng, h, w), z, out=flag)
                invalid |= flag.view(np.uint8)
            np.greater(second, np.float32(cfg.max_depth), out=flag)
            invalid |= flag.view(np.uint8)
            cv2.copyTo(banks.zeros, invalid, second)

        boxes, labels = self._boxes(objects, inst)
        return {
            "rgb": rgb,
            cfg.second: second,
            "mask": mask,
            "boxes": boxes,
            "labels": labels,
            "meta": {
                "id": f"{split}-{index:06d}",
                "index": int(index),
                "split": split,
                "seed": self.seed,
                "orig_size": (h, w),
                "dataset": f"synthetic_rgb{cfg.second[0]}",
            },
        }

    def plant_impurity(self, second: np.ndarray, mask: np.ndarray, split: str, index: int) -> None:
        """Add the planted impurity to ``second`` ``(H, W)`` in place: over the visible pixels of class 1
        (``mask == 1``), stripes of random orientation, phase and period (1/8 to 1/4 of the image
        height) that are ``impurity`` nearer (depth) or warmer (thermal) on every other band. A
        poster then partly looks like a raised box face in depth, the cue of classes 2 and 4: false
        signal in the modality that should carry nothing there. Its random draws come from a
        stream of their own, so the scene is otherwise the same as without it."""
        region = mask == 1
        if not region.any():
            return
        rng = np.random.default_rng([self.seed, _split_code(split), int(index), 0x1A1])
        h, w = mask.shape
        theta, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        period = rng.uniform(h / 8, h / 4)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        bands = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + phase) > 0
        lift = np.float32(self.config.impurity) * (bands & region)
        if self.config.second == "thermal":
            second += lift
        else:
            second -= lift

    def _class_indices(self, classes: Collection[int | str]) -> set[int]:
        names = self.config.class_names
        out = set()
        for c in classes:
            if isinstance(c, str):
                if c not in names:
                    raise KeyError(f"unknown synthetic class {c!r}; classes are {names}")
                out.add(names.index(c))
            else:
                if not 0 <= int(c) < len(names):
                    raise KeyError(f"synthetic class index {c} out of range 0..{len(names) - 1}")
                out.add(int(c))
        return out

    def _place_objects(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        cfg = self.config
        h, w = cfg.image_size
        n = int(rng.integers(cfg.num_objects[0], cfg.num_objects[1], endpoint=True))
        objects: list[dict[str, Any]] = []
        for _ in range(n):
            cls = int(rng.integers(1, 5))
            family, appearance, signal = _KINDS[cls]
            for _attempt in range(10):  # rejection sampling keeps overlaps partial
                oh = rng.uniform(*cfg.object_size) * h
                ow = oh if family == "disk" else oh * rng.uniform(0.6, 1.8)
                cy, cx = rng.uniform(0.05, 0.95) * h, rng.uniform(0.05, 0.95) * w
                box = (cy - oh / 2, cy + oh / 2, cx - ow / 2, cx + ow / 2)
                if all(self._overlap(box, o["box"]) <= cfg.max_overlap for o in objects):
                    break
            else:
                continue
            win = (
                max(0, int(box[0])),
                min(h, int(np.ceil(box[1]))),
                max(0, int(box[2])),
                min(w, int(np.ceil(box[3]))),
            )
            if win[1] - win[0] < 2 or win[3] - win[2] < 2:
                continue
            objects.append(
                {
                    "cls": cls,
                    "box": box,
                    "win": win,
                    "ellipse": family == "disk" or rng.random() < 0.5,
                    "colour": _colour(rng, appearance) if appearance else None,
                    "lift": (
                        rng.uniform(*(cfg.heat_range if cfg.second == "thermal" else cfg.height_range))
                        if signal
                        else 0.0
                    ),
                    "shadow": int(rng.integers(cfg.shadow_px[0], cfg.shadow_px[1], endpoint=True)),
                }
            )
        return objects

    @staticmethod
    def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        ih = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        iw = max(0.0, min(a[3], b[3]) - max(a[2], b[2]))
        smaller = min((a[1] - a[0]) * (a[3] - a[2]), (b[1] - b[0]) * (b[3] - b[2]))
        return ih * iw / smaller

    @staticmethod
    def _shape(
        obj: dict[str, Any], y0: int, y1: int, x0: int, x1: int
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Window mask (uint8 0/1, or None for a rectangle filling the window) and the squared
        normalized radius ``r2`` (None for a rectangle)."""
        if not obj["ellipse"]:
            return None, None
        by0, by1, bx0, bx1 = obj["box"]
        cy, cx = (by0 + by1) / 2, (bx0 + bx1) / 2
        ry, rx = (by1 - by0) / 2, (bx1 - bx0) / 2
        dy = ((np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy)) / np.float32(ry))[:, None]
        dx = ((np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx)) / np.float32(rx))[None, :]
        r2 = dy * dy + dx * dx
        return (r2 <= 1).view(np.uint8), r2

    @staticmethod
    def _shadow(invalid: np.ndarray, m: np.ndarray | None, y0: int, y1: int, x0: int, width: int) -> None:
        """Mark (uint8 0/1 ``invalid``) a band of ``width`` px left of the window mask ``m``
        (``None``: the whole window)."""
        # Structured-light shadow: pixels just left of a raised object see the background but
        # not the projector, so they have no depth.
        if width <= 0:
            return
        xs = max(0, x0 - width)
        if m is None:
            invalid[y0:y1, xs:x0] = 1
            return
        m = m.view(bool)
        ext = np.zeros((m.shape[0], m.shape[1] + x0 - xs), bool)
        ext[:, x0 - xs :] = m
        shifted = np.zeros_like(ext)
        shifted[:, : ext.shape[1] - width] = ext[:, width:]
        invalid[y0:y1, xs : xs + ext.shape[1]] |= (shifted & ~ext).view(np.uint8)

    def _boxes(self, objects: list[dict[str, Any]], inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.config.image_size
        min_pixels = max(16, int(0.001 * h * w))
        boxes, labels = [], []
        for k, obj in enumerate(objects, start=1):
            y0, y1, x0, x1 = obj["win"]
            vis = inst[y0:y1, x0:x1] == k
            if np.count_nonzero(vis) < min_pixels:
                continue
            rows = np.flatnonzero(vis.any(1))
            cols = np.flatnonzero(vis.any(0))
            boxes.append((x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1))
            labels.append(obj["cls"])
        return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


class SyntheticDataset(Dataset):
    """Random-access dataset over :class:`SyntheticGenerator`.

    Args:
        split: Split name; changes the seed stream, so train and val never share a scene.
        transforms: Callable on the raw sample; ``None`` uses
            ``eval_transforms(stats="synthetic_rgbd"/"synthetic_rgbt")`` (normalized tensors).
        num_samples: Dataset length.
        image_size: ``(H, W)``.
        seed: Base seed.
        second: ``"depth"`` or ``"thermal"``.
        config: Full :class:`SyntheticConfig` (its ``image_size`` and ``second`` are replaced by
            the arguments above).
        impurity: When given, replaces ``config.impurity`` (the planted impurity of MIM's known
            answer; ``--dataset-kwargs "{impurity: 0.6}"`` in train.py).
    """

    ignore_index = 255

    def __init__(
        self,
        split: str = "train",
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        num_samples: int = 1000,
        image_size: tuple[int, int] = (240, 320),
        seed: int = 0,
        second: str = "depth",
        config: SyntheticConfig | None = None,
        impurity: float | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        config = replace(
            config or SyntheticConfig(), image_size=tuple(int(v) for v in image_size), second=second
        )
        if impurity is not None:
            config = replace(config, impurity=float(impurity))
        self.config = config
        self.split = split
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.generator = SyntheticGenerator(config, seed)
        self.name = f"synthetic_rgb{second[0]}"
        self.transforms = (
            transforms if transforms is not None else eval_transforms(config.modalities, stats=self.name)
        )

    classes = property(lambda self: self.config.class_names, doc="Class names in label order.")
    modalities = property(lambda self: self.config.modalities, doc='``("rgb", second)``.')
    num_classes = property(lambda self: len(self.config.class_names), doc="Number of classes (5).")
    palette = property(lambda self: list(_PALETTE), doc="RGB colour per class.")
    class_visibility = property(lambda self: self.config.class_visibility, doc="See SyntheticConfig.")
    class_dependence = property(lambda self: self.config.class_dependence, doc="See SyntheticConfig.")

    def __len__(self) -> int:
        return self.num_samples

    def raw(self, index: int) -> dict[str, Any]:
        """Raw numpy sample ``index`` (see :meth:`SyntheticGenerator.__call__`)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(
                f"index {index} out of range for {self.name} {self.split} ({self.num_samples} samples)"
            )
        return self.generator(index, self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transforms(self.raw(index))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_samples={self.num_samples}, "
            f"image_size={self.config.image_size}, seed={self.seed})"
        )


@register_dataset(
    "synthetic_rgbd",
    task="segmentation+detection",
    modalities=("rgb", "depth"),
    num_classes=5,
    needs_root=False,
    splits=("train", "val", "test"),
    paper="fusionzoo synthetic world (docs/data.md)",
)
class SyntheticRGBD(SyntheticDataset):
    """Synthetic RGB-D scenes (see module docstring)."""

    def __init__(
        self,
        split: str = "train",
        transforms: Callable | None = None,
        num_samples: int = 1000,
        image_size: tuple[int, int] = (240, 320),
        seed: int = 0,
        config: SyntheticConfig | None = None,
        impurity: float | None = None,
    ) -> None:
        super().__init__(split, transforms, num_samples, image_size, seed, "depth", config, impurity)


@register_dataset(
    "synthetic_rgbt",
    task="segmentation+detection",
    modalities=("rgb", "thermal"),
    num_classes=5,
    needs_root=False,
    splits=("train", "val", "test"),
    paper="fusionzoo synthetic world (docs/data.md)",
)
class SyntheticRGBT(SyntheticDataset):
    """Synthetic RGB-T scenes (see module docstring)."""

    def __init__(
        self,
        split: str = "train",
        transforms: Callable | None = None,
        num_samples: int = 1000,
        image_size: tuple[int, int] = (240, 320),
        seed: int = 0,
        config: SyntheticConfig | None = None,
        impurity: float | None = None,
    ) -> None:
        super().__init__(split, transforms, num_samples, image_size, seed, "thermal", config, impurity)
