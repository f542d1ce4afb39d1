"""File readers that fail loudly, naming the file.

Every reader returns a plain numpy array in the dataset's *raw* convention (documented in
``docs/data.md``), which the transforms turn into normalized tensors:

==========  ==============================  =============================================
modality    array                           meaning
==========  ==============================  =============================================
rgb / hha   uint8 ``(H, W, 3)``             8-bit colour (HHA is stored as an image)
depth       float32 ``(H, W)``              metres; ``0`` marks an invalid pixel
thermal     float32 ``(H, W)``              intensity scaled to ``[0, 1]`` (8 bit / 255,
                                            16 bit / 65535)
mask        uint8 ``(H, W)``                class index, ``255`` = ignore
==========  ==============================  =============================================

Invalid depth policy (the only place it is decided): a depth of 0 is the sensor's "no
measurement" and stays 0. NaN, +-inf and negative values (they appear in float depth maps
written by other tools) are corrupt; with ``nonfinite="invalid"`` (default) they become 0
as well, with ``nonfinite="raise"`` they raise :class:`DataError` naming the file. After
normalization invalid pixels are set to exactly 0 (see ``transforms.Normalize``), so a NaN
never reaches a model. Float thermal follows the same flag (NaN/inf become 0). A repair is
never silent: the first repaired file of each folder emits a :class:`DataWarning` with its
count of bad pixels (once per folder and process, so a dataset full of NaN does not flood the
log; ``nonfinite="raise"`` stops at the first bad file instead).

Encodings are checked against the prepared layout's declaration (``docs/data.md``): an 8-bit
depth image or an integer ``.npy`` depth is refused (they would read as 0-0.255 m, or as
millimetres taken for metres); 16-bit depth whose values all fit in 8 bits, float depth above
1000 m, and 16-bit thermal whose values fit in 12 or 14 bits (a 12/14-bit sensor divided by 65535
spans only [0, 0.06] / [0, 0.25]) warn once per folder, naming the file and the fix
(``thermal_bits`` for thermal).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "DataError",
    "DataWarning",
    "check_label_range",
    "clean_depth",
    "read_boxes",
    "read_depth",
    "read_image",
    "read_label",
    "read_rgb",
    "read_thermal",
]

IGNORE_INDEX = 255
# Float depth above this is not metres from any RGB-D sensor or stereo rig (Kinect ~10 m); it is
# almost surely millimetres written as float.
MAX_FLOAT_DEPTH_M = 1000.0


class DataError(ValueError):
    """A data file exists but its content is wrong (undecodable, wrong shape, bad values)."""


class DataWarning(UserWarning):
    """A data file was repaired or looks mis-encoded (``warnings.simplefilter("error", DataWarning)``
    turns every one into an error)."""


_WARNED: set[tuple[str, str]] = set()


def _warn_once(kind: str, path: Path, message: str) -> None:
    # Once per (problem, folder) and process: a prepared folder is written by one tool, so its
    # first file speaks for the rest, and a DataLoader worker must not print a line per sample.
    key = (kind, str(Path(path).parent))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"{message} (reported for the first such file of {key[1]} only)", DataWarning, stacklevel=3)


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every decoder failure into a DataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        img = Image.open(path)
        img.load()  # PIL decodes lazily; force it so a truncated file fails here, not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"{path}: cannot decode image ({err}); the file is truncated or not an image. "
            "Re-create it with the dataset's prepare.py or remove its id from the split file."
        ) from err
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Decode any image file to a numpy array without changing its values.

    Args:
        path: Image file.

    Returns:
        ``(H, W)`` or ``(H, W, C)`` array in the file's own dtype.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: The file cannot be decoded (truncated, not an image).
    """
    img = _open(Path(path))
    if img.mode == "I;16B":
        img = img.convert("I;16")
    return np.asarray(img)


def read_rgb(path: str | Path) -> np.ndarray:
    """Read a colour image.

    A grayscale file (one channel: PIL modes ``1``, ``L``, ``LA``, ``I``, ``I;16``, ``F``) is read
    as its channel copied to R, G and B, with a :class:`DataWarning` naming the file (once per
    folder): not an error, since some datasets hold a few grayscale photographs (SUN RGB-D), but
    never silent, since a folder of them means the wrong files (e.g. depth or thermal) were
    given as RGB.

    Returns:
        uint8 ``(H, W, 3)``.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in GRAYSCALE_MODES:
        _warn_once(
            "grayscale-rgb", path,
            f"{path} is a grayscale image (PIL mode {img.mode}) where a colour image is expected; it is read as its "
            "one channel copied to R, G and B",
        )
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})  # one-channel PIL modes


def clean_depth(depth: np.ndarray, path: str | Path, nonfinite: str = "invalid") -> np.ndarray:
    """Apply the invalid-depth policy (see module docstring).

    Args:
        depth: Depth in metres, ``(H, W)``.
        path: File it came from (named in errors).
        nonfinite: ``"invalid"`` turns NaN/inf/negative into 0; ``"raise"`` raises.

    Returns:
        float32 ``(H, W)`` with every value finite and ``>= 0``.
    """
    if nonfinite not in ("invalid", "raise"):
        raise ValueError(f"nonfinite must be 'invalid' or 'raise', got {nonfinite!r}")
    depth = np.asarray(depth, dtype=np.float32)
    bad = ~np.isfinite(depth) | (depth < 0)
    if bad.any():
        if nonfinite == "raise":
            raise DataError(
                f"{path}: depth has {int(bad.sum())} NaN/inf/negative pixels; expected metres >= 0 "
                "with 0 for invalid. Pass nonfinite='invalid' to treat them as invalid (0)."
            )
        depth = np.where(bad, np.float32(0), depth)
        _warn_once(
            "nonfinite", Path(path),
            f"{path}: {int(bad.sum())} NaN/inf/negative depth pixels set to 0 (invalid) by the invalid-depth "
            "policy nonfinite='invalid'; pass nonfinite='raise' to stop on them instead",
        )
    return depth


def read_depth(path: str | Path, *, scale: float = 1000.0, nonfinite: str = "invalid") -> np.ndarray:
    """Read a depth map in metres.

    16-bit PNG/TIFF files hold integer depth in ``1/scale`` metres (millimetres by default,
    the convention of NYUDv2 / SUN RGB-D prepared layouts); ``.npy`` files and 32-bit float
    TIFFs already hold metres. Encodings that contradict this are refused (8-bit images,
    integer ``.npy``) or warned about once per folder (16-bit values that fit in 8 bits, float
    depth above 1000 m).

    Args:
        path: Depth file (``.png``, ``.tif``, ``.npy``).
        scale: Integer units per metre.
        nonfinite: Invalid-depth policy for NaN/inf/negative (see :func:`clean_depth`).

    Returns:
        float32 ``(H, W)`` metres, 0 = invalid.

    Raises:
        DataError: Undecodable file, more than one channel, an 8-bit image or integer ``.npy``,
            or (``nonfinite="raise"``) corrupt values.
    """
    path = Path(path)
    if path.suffix == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{path}: cannot read .npy depth ({err}); the file is truncated") from err
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(
                f"{path}: .npy depth holds {arr.dtype}, but .npy depth is float metres; an integer array is "
                "usually millimetres: save (arr / 1000).astype('float32'), or a uint16 millimetre PNG"
            )
        metres = arr.astype(np.float32, copy=False)
    else:
        arr = read_image(path)
        if np.issubdtype(arr.dtype, np.floating):
            metres = arr.astype(np.float32)
        else:
            _check_depth_encoding(arr, path, scale)
            metres = arr.astype(np.float32) / np.float32(scale)
    if metres.ndim == 3 and metres.shape[2] == 1:
        metres = metres[..., 0]
    if metres.ndim != 2:
        raise DataError(f"{path}: depth must be one channel (H, W), got shape {tuple(arr.shape)}")
    depth = clean_depth(metres, path, nonfinite)
    if np.issubdtype(arr.dtype, np.floating) and depth.size and depth.max() > MAX_FLOAT_DEPTH_M:
        _warn_once(
            "depth_mm", path,
            f"{path}: float depth up to {depth.max():.0f} m; float depth is metres, and values above "
            f"{MAX_FLOAT_DEPTH_M:.0f} m look like millimetres: divide by 1000 when writing the file",
        )
    return depth


def _check_depth_encoding(arr: np.ndarray, path: Path, scale: float) -> None:
    """Integer depth must be 16-bit ``1/scale`` metres (the prepared layout's declaration)."""
    if arr.dtype in (np.uint8, np.int8, np.bool_):
        raise DataError(
            f"{path}: depth is an 8-bit image (values {int(arr.min())}..{int(arr.max())}), but depth PNGs "
            f"hold uint16 in 1/{scale:g} m (millimetres by default), so it would read as "
            f"0..{255 / scale:.3f} m. 8-bit depth is a visualisation that lost the metric scale: re-create "
            "the file with the dataset's prepare.py (fusionzoo.data.preparing.save_depth_mm) or save "
            "float metres as .npy"
        )
    top = int(arr.max()) if arr.size else 0
    if 0 < top <= 255:
        _warn_once(
            "depth8", path,
            f"{path}: 16-bit depth whose largest value is {top} ({top / scale:.3f} m at {scale:g} units per "
            "metre): this looks like 8-bit data stored in 16 bits, not millimetres; re-create it with the "
            "dataset's prepare.py",
        )


def read_thermal(path: str | Path, *, bits: int | None = None, nonfinite: str = "invalid") -> np.ndarray:
    """Read a thermal image as intensity in ``[0, 1]``.

    Thermal frames are often saved as 3-channel JPEGs with equal channels (KAIST, LLVIP); they
    are reduced to one channel. Integer files are divided by ``2**bits - 1``; by default
    ``bits`` is the file's own depth (8-bit / 255, 16-bit / 65535). Float files (TIFF) are
    kept as they are.

    Args:
        path: Thermal image.
        bits: Significant bits of the sensor (12 or 14 for radiometric cameras stored in 16-bit
            files); ``None``: the file's bit depth. A 16-bit file whose values all fit in 12 or
            14 bits warns once per folder, naming this option.
        nonfinite: Float thermal with NaN/inf: ``"invalid"`` sets them to 0 (warned once per
            folder, with the count), ``"raise"`` raises.

    Returns:
        float32 ``(H, W)``.

    Raises:
        DataError: Undecodable file, a value above ``2**bits - 1``, ``bits`` above the file's
            bit depth, or (``nonfinite="raise"``) NaN/inf.
    """
    path = Path(path)
    arr = read_image(path)
    if arr.ndim == 3:
        if arr.shape[2] == 4:  # drop alpha
            arr = arr[..., :3]
        arr = arr[..., 0] if arr.shape[2] == 1 else _to_gray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        return _clean_thermal(arr, path, nonfinite)
    file_bits = 8 if arr.dtype == np.uint8 else 16
    top = int(arr.max()) if arr.size else 0
    if bits is None:
        if file_bits == 16 and 0 < top < 1 << 14:
            fits = 12 if top < 1 << 12 else 14
            _warn_once(
                "thermal_bits", path,
                f"{path}: 16-bit thermal whose values (max {top}) fit in {fits} bits; divided by 65535 they "
                f"span only [0, {top / 65535:.3f}]. If the camera is a {fits}-bit sensor, pass "
                f"thermal_bits={fits} to the dataset (dataset_kwargs in training) so values are divided by "
                f"{(1 << fits) - 1}",
            )
        bits = file_bits
    if bits > file_bits:
        raise DataError(f"{path}: thermal_bits={bits} but the file is {file_bits}-bit")
    full = (1 << bits) - 1
    if top > full:
        raise DataError(
            f"{path}: thermal value {top} exceeds {full}, the largest {bits}-bit value (thermal_bits={bits}); "
            "set thermal_bits to the sensor's bit depth (None: the file's own)"
        )
    return arr.astype(np.float32) / np.float32(full)


def _clean_thermal(arr: np.ndarray, path: Path, nonfinite: str) -> np.ndarray:
    # Float thermal has no "invalid" value; NaN/inf become 0 (the bottom of the [0, 1] range).
    if nonfinite not in ("invalid", "raise"):
        raise ValueError(f"nonfinite must be 'invalid' or 'raise', got {nonfinite!r}")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr)
    if bad.any():
        if nonfinite == "raise":
            raise DataError(
                f"{path}: thermal has {int(bad.sum())} NaN/inf pixels. Pass nonfinite='invalid' to set them to 0."
            )
        arr[bad] = 0
        _warn_once(
            "nonfinite", path,
            f"{path}: {int(bad.sum())} NaN/inf thermal pixels set to 0 by the policy nonfinite='invalid'; "
            "pass nonfinite='raise' to stop on them instead",
        )
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        _warn_once(
            "thermal_range", path,
            f"{path}: float thermal spans [{arr.min():.4g}, {arr.max():.4g}], outside the declared [0, 1] "
            "(values kept); store intensity scaled to [0, 1], or 8/16-bit integers",
        )
    return arr


def _to_gray(arr: np.ndarray) -> np.ndarray:
    # Equal channels (the usual case) are returned exactly; otherwise ITU-R 601 luma.
    first = arr[..., 0]
    if np.array_equal(first, arr[..., 1]) and np.array_equal(first, arr[..., 2]):
        return first
    gray = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return gray.round().astype(arr.dtype)


def check_label_range(mask: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Raise if a mask holds a value that is neither a class index nor the ignore index.

    Args:
        mask: ``(H, W)`` integer mask.
        num_classes: Valid indices are ``0 .. num_classes - 1`` and 255.
        path: File named in the error.

    Raises:
        DataError: With the offending values and the valid range.
    """
    if mask.size == 0 or int(mask.max()) < num_classes:
        return  # fast path: one reduction
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"{path}: label values {bad.tolist()[:10]} out of range; expected 0..{num_classes - 1} "
            f"or {IGNORE_INDEX} (ignore). Is this the raw label file instead of the prepared one "
            "(see datasets/<name>/prepare.py)?"
        )


def read_label(path: str | Path, num_classes: int) -> np.ndarray:
    """Read a single-channel class-index PNG (palette or grayscale).

    Returns:
        uint8 ``(H, W)``; 255 = ignore.

    Raises:
        DataError: Undecodable file, a colour (RGB) mask, or out-of-range values.
    """
    path = Path(path)
    arr = read_image(path)
    if arr.ndim != 2:
        raise DataError(
            f"{path}: label must be a single-channel index image (mode L or P), got shape "
            f"{tuple(arr.shape)}; colour-coded masks must be converted by prepare.py"
        )
    check_label_range(arr, num_classes, path)
    return arr.astype(np.uint8, copy=False)


def read_boxes(
    path: str | Path, num_classes: int, image_size: tuple[int, int], *, flags: bool = False
) -> tuple[np.ndarray, ...]:
    """Read a prepared box file: one ``<class> <x1> <y1> <x2> <y2> [<ignore> [<occlusion>]]`` line per object.

    Coordinates are pixels, xyxy, in the image's own resolution; they are clipped to the image.
    An empty file means no objects. The two optional fields (written by
    ``datasets/kaist/prepare.py``) are ``ignore`` (1: an ignore region such as KAIST's
    ``people`` / ``cyclist`` / ``person?``, neither a positive nor a false positive) and
    ``occlusion`` (0 none, 1 partial, 2 heavy); absent fields read as 0 and -1 (unknown).

    Args:
        path: ``boxes/<id>.txt``.
        num_classes: Valid class indices are ``0 .. num_classes - 1``.
        image_size: ``(H, W)`` of the image, for clipping.
        flags: Also return the per-box ``ignore`` and ``occlusion`` arrays.

    Returns:
        ``boxes`` float32 ``(N, 4)`` and ``labels`` int64 ``(N,)``; with ``flags``, also
        ``ignore`` bool ``(N,)`` and ``occlusion`` int64 ``(N,)``.

    Raises:
        DataError: Malformed line, class out of range, or x2 <= x1 / y2 <= y1, naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: box file not found")
    boxes, labels, ignore, occlusion = [], [], [], []
    height, width = image_size
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if not 5 <= len(parts) <= 7:
                raise ValueError(f"{len(parts)} fields")
            cls = int(parts[0])
            x1, y1, x2, y2 = (float(p) for p in parts[1:5])
            ign = int(parts[5]) if len(parts) > 5 else 0
            occ = int(parts[6]) if len(parts) > 6 else -1
            if ign not in (0, 1) or occ not in (-1, 0, 1, 2):
                raise ValueError(f"ignore {ign} must be 0/1 and occlusion {occ} one of -1, 0, 1, 2")
        except ValueError as err:
            raise DataError(
                f"{path}:{lineno}: expected '<class> <x1> <y1> <x2> <y2> [<ignore> [<occlusion>]]' ({err}): {line!r}"
            ) from err
        if not 0 <= cls < num_classes:
            raise DataError(f"{path}:{lineno}: class {cls} out of range 0..{num_classes - 1}")
        if not (np.isfinite([x1, y1, x2, y2]).all() and x2 > x1 and y2 > y1):
            raise DataError(f"{path}:{lineno}: degenerate box {[x1, y1, x2, y2]}; need x2 > x1, y2 > y1")
        boxes.append(
            [
                min(max(x1, 0.0), width),
                min(max(y1, 0.0), height),
                min(max(x2, 0.0), width),
                min(max(y2, 0.0), height),
            ]
        )
        labels.append(cls)
        ignore.append(bool(ign))
        occlusion.append(occ)
    box_arr = np.asarray(boxes, np.float32).reshape(-1, 4)
    keep = (box_arr[:, 2] > box_arr[:, 0]) & (box_arr[:, 3] > box_arr[:, 1])  # fully outside -> dropped
    if flags:
        return (box_arr[keep], np.asarray(labels, np.int64)[keep], np.asarray(ignore, bool)[keep],
                np.asarray(occlusion, np.int64)[keep])
    return box_arr[keep], np.asarray(labels, np.int64)[keep]
