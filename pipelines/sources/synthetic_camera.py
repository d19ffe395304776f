"""Pinhole cameras on a z-up sphere around the scene (ONEDIFFUSION_SPEC §2.3), for the synthetic world.

Conventions (all matrices float64, 4x4 homogeneous, column vectors: ``X_cam = w2c @ X_world``):

* World: metres, z up, the ground is the plane z = 0.
* ``camera_from_spherical(azimuth_deg, elevation_deg, distance, target)`` puts the camera at
  ``target + distance * (cos(el) cos(az), cos(el) sin(az), sin(el))`` looking at ``target`` with world z as up,
  exactly as the released pipeline's ``create_c2w_matrix``: azimuth 0 is on +x, azimuth 90 on +y.
* ``c2w_opengl``: camera axes x right, y up, z backward (the camera looks along -z). This is what the release builds.
* ``w2c_opencv``: camera axes x right, y down, z forward, in the *same* world frame, so a world point projects as
  ``K @ (w2c_opencv @ X)[:3]``. ``c2w_opencv = c2w_opengl @ diag(1, -1, -1, 1)``.
* The released pipeline additionally swaps world rows 0/1 and negates world row 2 before it computes rays
  (a fixed proper rotation of the world frame); ``release_opencv_c2w`` reproduces that exactly for code that must match
  the release's ray maps. Relative poses are unaffected by it.
* Intrinsics: ``f = 1.3887`` (``model.cameras.RELEASE_FOCAL``) on a unit image (NDC focal 2.777, about 39.6 degrees
  field of view), principal point at the image centre, square images. ``K`` is stored in pixels, the unit-image K of
  ``model.cameras.intrinsics`` with its rows scaled by (W, H, 1): ``[[f W, 0, W/2], [0, f H, H/2], [0, 0, 1]]``.
  Pixel (row i, column j) covers ``[j, j+1) x [i, i+1)`` in continuous image coordinates; its centre is
  ``(j + 0.5, i + 0.5)``.

Determinism: everything here uses only +, -, *, / and sqrt (IEEE-754 correctly rounded) plus a polynomial sine and
cosine (``sin_cos_deg``), never the platform's libm or BLAS (what it takes from model.cameras only flips signs,
permutes rows and builds constants), so camera matrices are bit-identical on every machine.

Two spherical cameras exist because model.cameras' torch one uses libm sin/cos (ulps apart across machines); the
tests hold them within a few ulps. model/ must not import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.cameras import RELEASE_FOCAL, intrinsics, opengl_to_opencv

FOCAL_UNIT = RELEASE_FOCAL  # the release's unit-image focal (spec §2.3), under the name this module's callers use
POLE_EPS = 1e-6  # |world up x backward| below this: looking (almost) straight up or down, use world y as up (as model/)

# 1/n! for the sine and cosine series; Python evaluates these divisions once, in IEEE double.
_SIN_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(9))
_COS_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(9))
_RAD_PER_DEG = math.pi / 180.0


def sin_cos_deg(angle_deg: float) -> tuple[float, float]:
    """(sin, cos) of an angle in degrees, bit-identical on every IEEE-754 machine.

    libm's sin/cos may differ by an ulp between platforms; that would make "same seed, same bytes" fail on another
    machine. Reduction is done in degrees (exact multiples of 90 give exact 0/±1), then a degree-17 Taylor series on
    [-45°, 45°] (truncation error < 5e-17).
    """
    a = float(angle_deg) % 360.0
    quadrant = int(math.floor(a / 90.0 + 0.5))
    r = (a - 90.0 * quadrant) * _RAD_PER_DEG
    r2 = r * r
    s = 0.0
    for coeff in reversed(_SIN_COEFFS):
        s = s * r2 + coeff
    s *= r
    c = 0.0
    for coeff in reversed(_COS_COEFFS):
        c = c * r2 + coeff
    quadrant %= 4
    if quadrant == 0:
        return s, c
    if quadrant == 1:
        return c, -s
    if quadrant == 2:
        return -s, -c
    return -c, s


def _normalised(v: tuple[float, float, float]) -> tuple[float, float, float]:
    n = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    return (v[0] / n, v[1] / n, v[2] / n)


def _cross(a, b) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def look_at_c2w_opengl(position, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """OpenGL camera-to-world (x right, y up, z backward) for a camera at `position` looking at `target`.

    Same construction as the release: backward = normalise(position - target), right = up x backward,
    camera up = backward x right; if |right| < POLE_EPS (looking along world z), world y is used as up.
    """
    position = tuple(float(x) for x in position)
    target = tuple(float(x) for x in target)
    back = _normalised((position[0] - target[0], position[1] - target[1], position[2] - target[2]))
    right = _cross(tuple(float(x) for x in up), back)
    if math.sqrt(right[0] * right[0] + right[1] * right[1] + right[2] * right[2]) < POLE_EPS:
        right = _cross((0.0, 1.0, 0.0), back)
    right = _normalised(right)
    cam_up = _cross(back, right)
    c2w = np.eye(4, dtype=np.float64)
    c2w[:3, 0] = right
    c2w[:3, 1] = cam_up
    c2w[:3, 2] = back
    c2w[:3, 3] = position
    return c2w


def opengl_to_opencv_c2w(c2w_opengl: np.ndarray) -> np.ndarray:
    """Flip the camera's y and z axes (same world frame): OpenGL (y up, -z forward) -> OpenCV (y down, z forward)."""
    c2w = np.array(c2w_opengl, dtype=np.float64, copy=True)
    c2w[:3, 1:3] *= -1.0
    return c2w


def rigid_inverse(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform [R t; 0 1] as [R^T, -R^T t; 0 1], written out (no LAPACK, bit-stable)."""
    t = np.asarray(transform, dtype=np.float64)
    out = np.eye(4, dtype=np.float64)
    for i in range(3):
        for j in range(3):
            out[i, j] = t[j, i]
        out[i, 3] = -(t[0, i] * t[0, 3] + t[1, i] * t[1, 3] + t[2, i] * t[2, 3])
    return out


def release_opencv_c2w(c2w_opengl: np.ndarray) -> np.ndarray:
    """The released pipeline's OpenGL -> "OpenCV" conversion (spec §2.3), `model.cameras.opengl_to_opencv` on numpy:

    negate rotation columns 1 and 2, swap world rows 0 and 1, negate world row 2. The last two steps re-express the
    camera in a rotated world frame (x' = y, y' = x, z' = -z); use this only to reproduce the release's ray maps.
    Sign flips and a row swap only, so exact in float64.
    """
    return opengl_to_opencv(torch.from_numpy(np.array(c2w_opengl, dtype=np.float64))).numpy()


def intrinsics_matrix(width: int, height: int, focal_unit: float = FOCAL_UNIT) -> np.ndarray:
    """K in pixels for a `width` x `height` image with focal `focal_unit` on a unit image (principal point centred):
    `model.cameras.intrinsics` with row x scaled by the width and row y by the height (exact in float64)."""
    k = intrinsics(float(focal_unit)).numpy()
    k[0] *= width
    k[1] *= height
    return k


@dataclass(frozen=True, eq=False)
class Camera:
    """A pinhole camera: pose (OpenGL c2w) + intrinsics in pixels, plus the spherical parameters it came from."""

    c2w_opengl: np.ndarray
    K: np.ndarray
    width: int
    height: int
    azimuth_deg: float = float("nan")
    elevation_deg: float = float("nan")
    distance: float = float("nan")
    target: tuple[float, float, float] = (0.0, 0.0, 0.0)
    _w2c: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "c2w_opengl", np.array(self.c2w_opengl, dtype=np.float64))
        object.__setattr__(self, "K", np.array(self.K, dtype=np.float64))
        object.__setattr__(self, "_w2c", rigid_inverse(opengl_to_opencv_c2w(self.c2w_opengl)))

    @property
    def c2w_opencv(self) -> np.ndarray:
        return opengl_to_opencv_c2w(self.c2w_opengl)

    @property
    def w2c_opencv(self) -> np.ndarray:
        return self._w2c.copy()

    @property
    def position(self) -> tuple[float, float, float]:
        return (float(self.c2w_opengl[0, 3]), float(self.c2w_opengl[1, 3]), float(self.c2w_opengl[2, 3]))

    def with_size(self, size: int) -> Camera:
        """The same pose with square intrinsics for a `size` x `size` image (focal scales with the image)."""
        focal_unit = float(self.K[0, 0]) / self.width
        return Camera(
            self.c2w_opengl, intrinsics_matrix(size, size, focal_unit), size, size,
            self.azimuth_deg, self.elevation_deg, self.distance, self.target,
        )

    def world_to_camera(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 3) OpenCV camera coordinates (z = depth along the optical axis)."""
        p = np.asarray(points, dtype=np.float64)
        w = self._w2c
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        return np.stack(
            [w[i, 0] * x + w[i, 1] * y + w[i, 2] * z + w[i, 3] for i in range(3)], axis=-1
        )

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(..., 3) world points -> ((..., 2) continuous pixel coordinates (x, y), (...) z-depth in metres)."""
        c = self.world_to_camera(points)
        z = c[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.K[0, 0] * (c[..., 0] / z) + self.K[0, 2]
            v = self.K[1, 1] * (c[..., 1] / z) + self.K[1, 2]
        return np.stack([u, v], axis=-1), z

    def pixel_directions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World-space ray directions through every pixel centre, three (H, W) arrays.

        Directions are scaled so their component along the optical axis is 1: a hit at ray parameter t has
        z-depth t. Ray distance = t * sqrt(x_n^2 + y_n^2 + 1) (see `z_depth_to_ray_distance`).
        """
        xn = ((np.arange(self.width, dtype=np.float64) + 0.5) - self.K[0, 2]) / self.K[0, 0]
        yn = ((np.arange(self.height, dtype=np.float64) + 0.5) - self.K[1, 2]) / self.K[1, 1]
        r = self.c2w_opencv[:3, :3]  # columns: right, down, forward
        return tuple(
            (r[i, 0] * xn)[None, :] + (r[i, 1] * yn)[:, None] + r[i, 2] for i in range(3)
        )  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """The `Sample.camera` form (see pipelines/record.py): arrays stay numpy, scalars plain."""
        def number(x: float) -> float | None:  # unknown spherical parameters (nan) become None (JSON null)
            return None if math.isnan(x) else float(x)

        return {
            "K": self.K.copy(),
            "c2w_opengl": self.c2w_opengl.copy(),
            "w2c_opencv": self.w2c_opencv,
            "azimuth": number(self.azimuth_deg),
            "elevation": number(self.elevation_deg),
            "distance": number(self.distance),
            "target": [float(x) for x in self.target],
            "width": int(self.width),
            "height": int(self.height),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Camera:
        return cls(
            np.asarray(d["c2w_opengl"], dtype=np.float64), np.asarray(d["K"], dtype=np.float64),
            int(d["width"]), int(d["height"]), _number_or_nan(d.get("azimuth")),
            _number_or_nan(d.get("elevation")), _number_or_nan(d.get("distance")),
            tuple(float(x) for x in d.get("target", (0.0, 0.0, 0.0))),
        )


def _number_or_nan(x) -> float:
    return float("nan") if x is None else float(x)


def camera_from_spherical(
    azimuth_deg: float,
    elevation_deg: float,
    distance: float,
    target=(0.0, 0.0, 0.0),
    size: int = 128,
    focal_unit: float = FOCAL_UNIT,
) -> Camera:
    """A square `size` x `size` camera on the z-up sphere of radius `distance` around `target`, looking at it."""
    if not distance > 0:
        raise ValueError(f"camera distance must be > 0 metres, got {distance!r}")
    if int(size) < 1:
        raise ValueError(f"camera size must be a positive number of pixels, got {size!r}")
    sa, ca = sin_cos_deg(azimuth_deg)
    se, ce = sin_cos_deg(elevation_deg)
    target = tuple(float(x) for x in target)
    position = (
        target[0] + distance * (ce * ca), target[1] + distance * (ce * sa), target[2] + distance * se,
    )
    c2w = look_at_c2w_opengl(position, target)
    return Camera(
        c2w, intrinsics_matrix(size, size, focal_unit), int(size), int(size),
        float(azimuth_deg), float(elevation_deg), float(distance), target,
    )


def _normalised_pixel_grid(K: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    xn = ((np.arange(width, dtype=np.float64) + 0.5) - K[0, 2]) / K[0, 0]
    yn = ((np.arange(height, dtype=np.float64) + 0.5) - K[1, 2]) / K[1, 1]
    return xn[None, :], yn[:, None]


def z_depth_to_ray_distance(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Convert z-depth (along the optical axis) to distance along each pixel-centre ray: d * sqrt(x_n²+y_n²+1)."""
    depth = np.asarray(depth)
    xn, yn = _normalised_pixel_grid(np.asarray(K, dtype=np.float64), depth.shape[0], depth.shape[1])
    return (depth * np.sqrt(xn * xn + yn * yn + 1.0)).astype(depth.dtype)


def ray_distance_to_z_depth(distance: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Inverse of `z_depth_to_ray_distance`."""
    distance = np.asarray(distance)
    xn, yn = _normalised_pixel_grid(np.asarray(K, dtype=np.float64), distance.shape[0], distance.shape[1])
    return (distance / np.sqrt(xn * xn + yn * yn + 1.0)).astype(distance.dtype)
