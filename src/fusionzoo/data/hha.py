"""HHA encoding of depth (Gupta, Girshick, Arbelaez and Malik, ECCV 2014), our implementation.

HHA turns one depth channel into three image-like channels: horizontal **d**isparity, **h**eight
above the lowest visible point along gravity, and the **a**ngle between the surface normal and
gravity. Steps (paper section 3.1):

1. back-project depth to camera-frame points with the intrinsics;
2. surface normals from the cross product of the image-space tangents of the (box-smoothed)
   point cloud, oriented towards the camera;
3. gravity: start from the camera's "up" (-y) and twice (thresholds 45 then 15 degrees) take
   the normals nearly parallel (floors, table tops) and nearly perpendicular (walls) to the
   current estimate, and pick the direction ``g`` minimising
   ``sum_par (1 - (n.g)^2) + sum_perp (n.g)^2``, i.e. the eigenvector of
   ``sum_perp n n^T - sum_par n n^T`` with the smallest eigenvalue;
4. height = ``p . g`` minus its 1st percentile; angle = ``acos(n . g)``.

Channel scaling (our own choice, documented, all clipped to uint8): disparity ``100 / Z``
(Z in metres: 1 m -> 100), height in centimetres (0-2.55 m), angle in degrees ``+ 38``
(so walls at 90 degrees land at 128). Invalid depth (0) gives 0 in all three channels.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["NYU_INTRINSICS", "backproject", "compute_hha", "estimate_gravity", "surface_normals"]

#: NYUDv2 Kinect colour-camera intrinsics (fx, fy, cx, cy) from the dataset toolbox
#: (camera_params.m), for the 480x640 labeled frames.
NYU_INTRINSICS = (518.857901, 519.469611, 325.582449, 253.736166)


def backproject(depth: np.ndarray, intrinsics: tuple[float, float, float, float]) -> np.ndarray:
    """Camera-frame points (x right, y down, z forward) in metres.

    Args:
        depth: ``(H, W)`` metres.
        intrinsics: ``(fx, fy, cx, cy)`` in pixels.

    Returns:
        float32 ``(H, W, 3)``.
    """
    fx, fy, cx, cy = intrinsics
    h, w = depth.shape
    u = (np.arange(w, dtype=np.float32) - np.float32(cx)) / np.float32(fx)
    v = (np.arange(h, dtype=np.float32) - np.float32(cy)) / np.float32(fy)
    z = depth.astype(np.float32)
    return np.stack([z * u[None, :], z * v[:, None], z], -1)


def surface_normals(points: np.ndarray, valid: np.ndarray, smooth: int = 5) -> np.ndarray:
    """Unit normals from image-space tangents of the smoothed point cloud.

    Args:
        points: ``(H, W, 3)``.
        valid: ``(H, W)`` bool.
        smooth: Box-filter size; invalid pixels are excluded by normalized convolution.

    Returns:
        float32 ``(H, W, 3)``, zero where invalid, oriented towards the camera.
    """
    w = valid.astype(np.float32)
    norm = cv2.boxFilter(w, -1, (smooth, smooth), normalize=False)
    p = np.stack(
        [cv2.boxFilter(points[..., i] * w, -1, (smooth, smooth), normalize=False) for i in range(3)], -1
    )
    p /= np.maximum(norm, 1e-6)[..., None]
    du = np.zeros_like(p)
    dv = np.zeros_like(p)
    du[:, 1:-1] = p[:, 2:] - p[:, :-2]
    dv[1:-1] = p[2:] - p[:-2]
    n = np.cross(du, dv)
    length = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.where(length > 1e-9, n / np.maximum(length, 1e-9), 0).astype(np.float32)
    flip = (n * points).sum(-1) > 0  # normals face the camera: n . p < 0
    n[flip] *= -1
    n[~valid] = 0
    return n


def estimate_gravity(normals: np.ndarray, valid: np.ndarray, init=(0.0, -1.0, 0.0)) -> np.ndarray:
    """Gravity ("up") direction from surface normals (see module docstring, step 3).

    Returns:
        float ``(3,)`` unit vector pointing up (camera frame, so roughly ``(0, -1, 0)`` for a
        level camera).
    """
    n = normals[valid & (np.abs(normals).sum(-1) > 0)].astype(np.float64)
    g = np.asarray(init, np.float64)
    if len(n) < 10:
        return g
    for thr in (45.0, 15.0):
        cos = n @ g
        par = np.abs(cos) > np.cos(np.deg2rad(thr))
        perp = np.abs(cos) < np.sin(np.deg2rad(thr))
        if par.sum() + perp.sum() < 10:
            break
        m = n[perp].T @ n[perp] - n[par].T @ n[par]
        _, vecs = np.linalg.eigh(m)
        new = vecs[:, 0]
        new = new if new @ g > 0 else -new
        if new @ g < np.cos(np.deg2rad(thr)):
            # A scene with only walls (no horizontal surface) leaves gravity free to rotate
            # about the wall normal; keep the estimate rather than jump outside the cone.
            break
        g = new
    return g / np.linalg.norm(g)


def compute_hha(
    depth: np.ndarray, intrinsics: tuple[float, float, float, float] = NYU_INTRINSICS
) -> np.ndarray:
    """HHA image of a depth map.

    Args:
        depth: ``(H, W)`` metres, 0 = invalid.
        intrinsics: ``(fx, fy, cx, cy)``.

    Returns:
        uint8 ``(H, W, 3)``: disparity, height, angle (scaling in the module docstring).

    Example:
        >>> hha = compute_hha(np.full((48, 64), 2.0, np.float32), (60.0, 60.0, 32.0, 24.0))
        >>> hha.shape, hha.dtype
        ((48, 64, 3), dtype('uint8'))
    """
    depth = np.asarray(depth, np.float32)
    if depth.ndim != 2:
        raise ValueError(f"compute_hha: depth must be (H, W) metres, got shape {depth.shape}")
    valid = np.isfinite(depth) & (depth > 0)
    depth = np.where(valid, depth, 0).astype(np.float32)
    points = backproject(depth, intrinsics)
    normals = surface_normals(points, valid)
    g = estimate_gravity(normals, valid)
    height = points @ g.astype(np.float32)
    floor = np.percentile(height[valid], 1) if valid.any() else 0.0
    height = height - floor
    angle = np.degrees(np.arccos(np.clip(normals @ g.astype(np.float32), -1, 1)))
    disparity = np.where(valid, 100.0 / np.maximum(depth, 1e-6), 0)
    hha = np.stack([disparity, height * 100.0, angle + 38.0], -1)
    hha = np.clip(np.round(hha), 0, 255).astype(np.uint8)
    hha[~valid] = 0
    return hha
