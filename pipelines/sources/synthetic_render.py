"""Vectorised ray caster for the synthetic world: RGB + exact labels from one ray per pixel centre.

For every pixel the renderer casts exactly one ray, through the pixel centre, and derives the colour *and* every label
(depth, instance, semantic) from that same ray's first hit; there is no anti-aliasing, so labels are exact per pixel
and consistent with the image.

Outputs per view (`ViewRender`):

* ``image``: (H, W, 3) uint8. Lambert diffuse from one directional sun + ambient, hard shadows (a shadow ray per lit
  pixel against all primitives), a checkered ground, a sky gradient for rays that hit nothing. Shading is computed in
  float64 and quantised by ``floor(255 x + 0.5)``; a gamma of 2 is applied as ``albedo * sqrt(irradiance)``.
* ``depth``: (H, W) float32 **z-depth in metres along the camera's optical axis** (OpenCV z), not the distance along
  the ray. Sky pixels have depth 0; the valid mask is ``depth > 0``. Convert with
  ``synthetic_camera.z_depth_to_ray_distance(depth, K)``.
* ``instance``: (H, W) int32, 0 = background (sky and ground), entity ids 1..N as in the scene spec.
* ``semantic``: (H, W) int32 ids into ``synthetic_scene.CLASSES`` (0 sky, 1 ground, 2 sphere, ...).
* ``keypoints``: (P, 17, 3) float32 COCO-17 (x, y, v) per figure, in continuous pixel coordinates (pixel (row i,
  column j) spans [j, j+1) x [i, i+1)). v = 2: in the image and visible; v = 1: in the image but hidden (by another
  entity or by the figure itself); v = 0: outside the image or behind the camera, with x = y = 0 (COCO convention).
  A joint is visible when the first surface that the camera ray through the joint reaches belongs to a body part
  meeting at that joint (e.g. upper arm or forearm for an elbow) and lies within 3 limb radii in front of the joint;
  face keypoints lie on the head surface and must be the head's first hit (not its far side).

Speed: primitives are culled per pixel rectangle (the screen-space box of their bounding sphere) and shadow rays per
bounding sphere; culling is conservative, so outputs are bit-identical with it on or off (`cull=False`).
Determinism: float64 +, -, *, /, sqrt only, elementwise, no BLAS and no threads: the same scene and camera give the
same bytes on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from model.conditions import mask_box
from pipelines.sources.synthetic_camera import Camera, camera_from_spherical
from pipelines.sources.synthetic_scene import Scene

SKY_HORIZON = np.array([0.86, 0.91, 0.97])
SKY_ZENITH = np.array([0.42, 0.60, 0.88])
GROUND_TINT = np.array([1.0, 0.98, 0.94])
GROUND_TILE_M = 0.5
_SHADOW_OFFSET_M = 1e-6


@dataclass(frozen=True, eq=False)
class ViewRender:
    """One camera's image and labels (see module docstring for conventions)."""

    camera: Camera
    image: np.ndarray
    depth: np.ndarray
    instance: np.ndarray
    semantic: np.ndarray
    keypoints: np.ndarray
    entity_pixels: dict[int, int]
    entity_bboxes: dict[int, tuple[int, int, int, int] | None]  # [x0, y0, x1, y1), pixels; None if not visible

    @property
    def valid_depth(self) -> np.ndarray:
        return self.depth > 0


def _screen_rect(centre, radius: float, camera: Camera) -> tuple[int, int, int, int] | None:
    """Conservative pixel rectangle (r0, r1, c0, c1) whose pixel centres can see a sphere; None if off-screen."""
    w = camera._w2c
    x, y, z = centre
    X = w[0, 0] * x + w[0, 1] * y + w[0, 2] * z + w[0, 3]
    Y = w[1, 0] * x + w[1, 1] * y + w[1, 2] * z + w[1, 3]
    Z = w[2, 0] * x + w[2, 1] * y + w[2, 2] * z + w[2, 3]
    H, W = camera.height, camera.width
    if Z + radius <= 0.0:
        return None  # entirely behind the camera
    if Z - radius <= 1e-9:
        return (0, H, 0, W)
    near, far = Z - radius, Z + radius
    # the sphere lies in the box [X±r] x [Y±r] x [Z±r]; x/z over that box is extreme at its corners
    xs = ((X - radius) / near, (X - radius) / far, (X + radius) / near, (X + radius) / far)
    ys = ((Y - radius) / near, (Y - radius) / far, (Y + radius) / near, (Y + radius) / far)
    K = camera.K
    u_lo, u_hi = K[0, 0] * min(xs) + K[0, 2], K[0, 0] * max(xs) + K[0, 2]
    v_lo, v_hi = K[1, 1] * min(ys) + K[1, 2], K[1, 1] * max(ys) + K[1, 2]
    # pixel j can see it only if its centre j + 0.5 lies in [u_lo, u_hi]; one pixel of margin for rounding
    c0, c1 = max(0, math.floor(u_lo - 0.5)), min(W, math.floor(u_hi - 0.5) + 2)
    r0, r1 = max(0, math.floor(v_lo - 0.5)), min(H, math.floor(v_hi - 0.5) + 2)
    if c0 >= c1 or r0 >= r1:
        return None
    return (r0, r1, c0, c1)


def primary_hits(scene: Scene, camera: Camera, cull: bool = True):
    """First hit of every pixel-centre ray: (t (H, W) z-depth or inf, buffer id (H, W) int32, rects, directions).

    Buffer id 0 = sky, 1 = ground, k + 2 = primitive k. `rects[k]` is the pixel rectangle primitive k was tested in
    (None if culled away).
    """
    H, W = camera.height, camera.width
    ox, oy, oz = camera.position
    if scene.spec.ground and oz <= 0.0:
        raise ValueError(
            f"camera at height {oz:.3f} m is below the ground plane; raise its elevation (scene has a ground)"
        )
    dx, dy, dz = camera.pixel_directions()
    ids = np.zeros((H, W), dtype=np.int32)
    if scene.spec.ground:
        down = dz < 0.0
        t = np.where(down, -oz / np.where(down, dz, -1.0), np.inf)
        ids[down] = 1
    else:
        t = np.full((H, W), np.inf)
    full = (0, H, 0, W)
    rects: list[tuple[int, int, int, int] | None] = []
    for k, prim in enumerate(scene.primitives):
        rect = _screen_rect(prim.bound_centre, prim.bound_radius, camera) if cull else full
        rects.append(rect)
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        tk = prim.intersect(ox, oy, oz, dx[r0:r1, c0:c1], dy[r0:r1, c0:c1], dz[r0:r1, c0:c1])
        t_view = t[r0:r1, c0:c1]
        closer = tk < t_view  # strict: on an exact tie the earlier primitive keeps the pixel
        np.copyto(t_view, tk, where=closer)
        ids[r0:r1, c0:c1][closer] = k + 2
    return t, ids, rects, (dx, dy, dz)


def first_hit_along(scene: Scene, ox, oy, oz, dx, dy, dz) -> tuple[np.ndarray, np.ndarray]:
    """First hit of arbitrary ray bundles, no culling: (t or inf, what was hit: primitive index, -1 ground, -2 none)."""
    dz = np.asarray(dz, dtype=np.float64)
    shape = np.broadcast(ox, oy, oz, dx, dy, dz).shape
    t = np.full(shape, np.inf)
    what = np.full(shape, -2, dtype=np.int64)
    if scene.spec.ground:
        down = dz < 0.0
        t = np.where(down, -oz / np.where(down, dz, -1.0), t)
        what = np.where(down, -1, what)
    for k, prim in enumerate(scene.primitives):
        tk = prim.intersect(ox, oy, oz, dx, dy, dz)
        closer = tk < t
        t = np.where(closer, tk, t)
        what = np.where(closer, k, what)
    return t, what


def _occluded_towards(scene: Scene, sx, sy, sz, light) -> np.ndarray:
    """Boolean per ray: does a ray from (sx, sy, sz) towards the unit direction `light` hit any primitive?"""
    lx, ly, lz = light
    occluded = np.zeros(sx.shape, dtype=bool)

    def candidates(centre, radius, index):
        # rays passing within `radius` of `centre` ahead of (or around) their origin
        wx, wy, wz = centre[0] - sx[index], centre[1] - sy[index], centre[2] - sz[index]
        proj = wx * lx + wy * ly + wz * lz
        d2 = wx * wx + wy * wy + wz * wz - proj * proj
        keep = (proj > -radius) & (d2 <= radius * radius)
        return index[keep]

    everyone = np.arange(sx.shape[0])
    for centre, radius, members in scene.groups:
        idx = candidates(centre, radius, everyone[~occluded])
        if idx.size == 0:
            continue
        for k in members:
            prim = scene.primitives[k]
            sub = candidates(prim.bound_centre, prim.bound_radius, idx) if len(members) > 1 else idx
            if sub.size == 0:
                continue
            t = prim.intersect(sx[sub], sy[sub], sz[sub], lx, ly, lz)
            occluded[sub[t < np.inf]] = True
    return occluded


def _keypoints(scene: Scene, camera: Camera) -> np.ndarray:
    P = scene.figure_joints.shape[0]
    out = np.zeros((P, 17, 3), dtype=np.float32)
    if P == 0:
        return out
    joints = scene.figure_joints
    uv, z = camera.project(joints)
    H, W = camera.height, camera.width
    ox, oy, oz = camera.position
    in_front = z > 0.0
    z_safe = np.where(in_front, z, 1.0)
    # rays scaled so t is z-depth: the joint itself sits at t = z
    djx, djy, djz = (joints[..., 0] - ox) / z_safe, (joints[..., 1] - oy) / z_safe, (joints[..., 2] - oz) / z_safe
    t_first, first_part = first_hit_along(scene, ox, oy, oz, djx, djy, djz)
    ray_len = np.sqrt(djx * djx + djy * djy + djz * djz)
    radii = scene.figure_joint_radii
    # what the camera sees at the joint must be one of the parts meeting there, at most 3 limb radii in front of the
    # joint (rays oblique to a limb enter it r / sin(angle) before the axis); face points lie on the head surface
    near_enough = t_first >= z - (3.0 * radii + 1e-7 * np.abs(z)) / ray_len
    own_part = np.array(
        [[int(first_part[p, j]) in scene.figure_joint_parts[p][j] for j in range(17)] for p in range(P)], dtype=bool
    )
    reaches_joint = own_part & near_enough
    u, v = uv[..., 0], uv[..., 1]
    inside = in_front & (u >= 0.0) & (u < W) & (v >= 0.0) & (v < H)
    vis = np.where(inside, np.where(reaches_joint, 2, 1), 0)
    out[..., 0] = np.where(inside, u, 0.0)
    out[..., 1] = np.where(inside, v, 0.0)
    out[..., 2] = vis
    return out


def render_view(scene: Scene, camera: Camera, *, shadows: bool | None = None, cull: bool = True) -> ViewRender:
    """Render one camera. `shadows=False` skips the shadow rays (default: on); `cull=False` tests every primitive
    at every pixel (same output, slower; for checks and benchmarks)."""
    spec = scene.spec
    shadows = True if shadows is None else shadows
    t, ids, rects, (dx, dy, dz) = primary_hits(scene, camera, cull=cull)
    H, W = ids.shape
    ox, oy, oz = camera.position
    hit = ids > 0
    t_hit = np.where(hit, t, 0.0)
    px, py, pz = ox + t_hit * dx, oy + t_hit * dy, oz + t_hit * dz

    nx, ny, nz = np.zeros((H, W)), np.zeros((H, W)), np.zeros((H, W))
    nz[ids == 1] = 1.0
    for k, (prim, rect) in enumerate(zip(scene.primitives, rects)):
        if rect is None:
            continue
        r0, r1, c0, c1 = rect
        mine = ids[r0:r1, c0:c1] == k + 2
        if not mine.any():
            continue
        n = prim.normals(px[r0:r1, c0:c1][mine], py[r0:r1, c0:c1][mine], pz[r0:r1, c0:c1][mine])
        for buf, comp in zip((nx, ny, nz), n):
            buf[r0:r1, c0:c1][mine] = comp

    light = spec.sun_direction
    n_dot_l = nx * light[0] + ny * light[1] + nz * light[2]
    lit = hit & (n_dot_l > 0.0)
    if shadows and scene.primitives:
        flat = np.flatnonzero(lit)
        offset = _SHADOW_OFFSET_M + 1e-9 * t_hit.ravel()[flat]
        sx = px.ravel()[flat] + nx.ravel()[flat] * offset
        sy = py.ravel()[flat] + ny.ravel()[flat] * offset
        sz = pz.ravel()[flat] + nz.ravel()[flat] * offset
        blocked = _occluded_towards(scene, sx, sy, sz, light)
        lit_flat = lit.ravel().copy()
        lit_flat[flat[blocked]] = False
        lit = lit_flat.reshape(H, W)
    irradiance = spec.ambient + (1.0 - spec.ambient) * np.where(lit, n_dot_l, 0.0)

    albedo = scene.buffer_albedo[ids]  # (H, W, 3)
    on_ground = ids == 1
    if on_ground.any():
        gx, gy, gt = px[on_ground], py[on_ground], t_hit[on_ground]
        parity = (np.floor(gx / GROUND_TILE_M) + np.floor(gy / GROUND_TILE_M)) % 2.0
        contrast = 0.045 * np.clip(1.0 - gt / 25.0, 0.0, 1.0)  # fade the checker before it aliases at the horizon
        value = 0.76 + (2.0 * parity - 1.0) * contrast
        albedo[on_ground] = value[:, None] * GROUND_TINT
    rgb = albedo * np.sqrt(irradiance)[..., None]
    sky = ~hit
    if sky.any():
        sdx, sdy, sdz = dx[sky], dy[sky], dz[sky]
        up = np.clip(3.0 * sdz / np.sqrt(sdx * sdx + sdy * sdy + sdz * sdz), 0.0, 1.0)[:, None]
        rgb[sky] = SKY_HORIZON * (1.0 - up) + SKY_ZENITH * up
    image = np.clip(np.floor(rgb * 255.0 + 0.5), 0, 255).astype(np.uint8)

    instance = scene.buffer_instance[ids]
    semantic = scene.buffer_class[ids]
    depth = np.where(hit, t, 0.0).astype(np.float32)

    counts = np.bincount(instance.ravel(), minlength=max(scene.entity_ids, default=0) + 1)
    pixels: dict[int, int] = {}
    bboxes: dict[int, tuple[int, int, int, int] | None] = {}
    for eid in scene.entity_ids:
        pixels[eid] = int(counts[eid])
        if counts[eid] == 0:
            bboxes[eid] = None
            continue
        bboxes[eid] = mask_box(instance == eid)

    return ViewRender(camera, image, depth, instance, semantic, _keypoints(scene, camera), pixels, bboxes)


def render(
    scene: Scene,
    cameras: Sequence[Camera | tuple[float, float, float]],
    size: int | None = None,
    *,
    shadows: bool | None = None,
    cull: bool = True,
) -> list[ViewRender]:
    """Render `scene` from each camera. Cameras may be `Camera`s or (azimuth°, elevation°, distance) triples around
    the scene's target; `size` (pixels, square) overrides the cameras' own resolution (default 128 for triples)."""
    out = []
    for cam in cameras:
        if not isinstance(cam, Camera):
            az, el, dist = cam
            cam = camera_from_spherical(az, el, dist, scene.spec.target, size or 128)
        elif size is not None and (cam.width != size or cam.height != size):
            cam = cam.with_size(size)
        out.append(render_view(scene, cam, shadows=shadows, cull=cull))
    return out
