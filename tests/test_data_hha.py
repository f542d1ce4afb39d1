"""HHA encoding on analytic scenes: a floor and a wall seen by a level and a tilted camera."""

from __future__ import annotations

import numpy as np
import pytest

from fusionzoo.data.hha import backproject, compute_hha, estimate_gravity, surface_normals

H, W = 120, 160
K = (130.0, 130.0, 80.0, 60.0)


def room(tilt_deg: float, camera_height: float = 1.2, wall: float = 4.0):
    """Depth of a camera ``camera_height`` above a floor facing a wall, pitched down by
    ``tilt_deg``; returns depth and the true up direction in camera coordinates."""
    fx, fy, cx, cy = K
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    a = np.deg2rad(tilt_deg)
    rot = np.array(
        [[1, 0, 0], [0, np.cos(a), np.sin(a)], [0, -np.sin(a), np.cos(a)]]
    )  # camera -> level frame
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1) @ rot.T
    t_floor = np.where(rays[..., 1] > 1e-6, camera_height / np.maximum(rays[..., 1], 1e-6), np.inf)
    t_wall = np.where(rays[..., 2] > 1e-6, wall / np.maximum(rays[..., 2], 1e-6), np.inf)
    depth = np.minimum(t_floor, t_wall).astype(np.float32)  # camera z of t * (u', v', 1) is t
    up = rot.T @ np.array([0.0, -1.0, 0.0])
    return depth, up, t_floor < t_wall


@pytest.mark.parametrize("tilt", [0.0, 10.0, 20.0])
def test_gravity_recovered(tilt):
    depth, up, _ = room(tilt)
    valid = depth > 0
    g = estimate_gravity(surface_normals(backproject(depth, K), valid), valid)
    assert np.degrees(np.arccos(np.clip(g @ up, -1, 1))) < 2.0


def test_channels_mean_what_they_say():
    depth, _, floor = room(10.0)
    depth[:5, :5] = 0  # invalid corner
    hha = compute_hha(depth, K).astype(float)
    inner = np.zeros_like(floor)
    inner[8:-8, 8:-8] = True
    flat_floor = floor & inner & (depth < 3.0)
    wall = ~floor & inner
    assert abs(np.median(hha[..., 2][flat_floor]) - 38) <= 2  # floor normal parallel to gravity
    assert abs(np.median(hha[..., 2][wall]) - 128) <= 2  # wall perpendicular
    assert np.median(hha[..., 1][flat_floor]) <= 3  # floor is the lowest surface
    col = W // 2
    wall_rows = np.nonzero(wall[:, col])[0]
    assert hha[wall_rows[0], col, 1] > hha[wall_rows[-1], col, 1]  # higher on the wall = taller
    assert np.allclose(hha[..., 0][inner], np.clip(np.round(100 / depth[inner]), 0, 255), atol=1)
    assert (hha[:5, :5] == 0).all()


def test_bad_shape():
    with pytest.raises(ValueError, match="depth must be"):
        compute_hha(np.zeros((4, 4, 1), np.float32), K)
