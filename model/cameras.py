"""Cameras as Plücker ray-maps on the latent grid, and back (ONEDIFFUSION_SPEC.md §2.3).

Conventions (all functions are pure torch and keep the input dtype; use float64 for geometry you want exact):

* Poses are 4×4 camera-to-world matrices `c2w`. Inside this module they are in the **OpenCV** camera convention
  (x right, y down, z forward). `camera_from_spherical` builds the release's **OpenGL** c2w (x right, y up, z back,
  z-up world, looking at the origin) and `opengl_to_opencv` converts it exactly as the release does, world-axis remap
  included.
* Reference camera ("relative to the first camera"): the release builds PyTorch3D cameras from the OpenCV poses and
  applies RayDiffusion's `first_camera_transform(rotation_only=False)`, which makes the world frame **camera 0's
  PyTorch3D view frame** (x left, y up, z forward), not its OpenCV frame. The two differ by a 180° turn about the
  optical axis, F = diag(−1, −1, 1): in the release's ray frame camera 0's OpenCV c2w is diag(−1, −1, 1, 1), and every
  ray's d and o × d have their x and y components negated relative to the OpenCV-identity frame. `relative_to_first`
  reproduces the release (frame="release", the default); frame="opencv" gives the OpenCV-identity frame, and
  `release_to_opencv_frame` converts poses from the former to the latter (e.g. cameras read back from generated rays).
  (Spec §2.3's "camera 0 … with identity rotation" holds for the PyTorch3D camera, not for its OpenCV c2w.)
* Intrinsics are for a **unit image** (width = height = 1): focal `f` in image widths, principal point (cx, cy) with
  (0.5, 0.5) the centre. The release uses f = 1.3887 (NDC focal 2f = 2.777, ≈ 39.6° FoV). Only square images are used
  by the release; non-square grids are accepted with the same unit-image intrinsics per axis.
* Ray grid: one ray per latent pixel. Pixel (i, j) of an (h, w) grid has unit-image centre u = (j + ½)/w,
  v = (i + ½)/h, i.e. PyTorch3D NDC x = 1 − 2u, y = 1 − 2v running from +1 − 1/w (left/top) to −1 + 1/w (right/bottom)
  with the half-pixel offset (RayDiffusion's `compute_ndc_coordinates`). Its camera-frame (OpenCV) direction is
  ((u − cx)/f, (v − cy)/f, 1): the same ray PyTorch3D unprojects at depth 1 from NDC (x, y) with NDC focal 2f.
* Plücker layout (d, o × d): unit direction d in world coordinates first, then the moment m = o × d with o the camera
  centre; last axis of size 6, grid (…, h, w, 6).
* Latent layout: the 6 channels tiled to 16 as [r0..r5, r0..r5, r0..r3], times 1.658, channels first (…, 16, h, w).
  `latent_to_rays` inverts it by **averaging the replicas** (r0..r3 have three copies, r4, r5 two) and dividing by
  1.658: for a denoised ray frame this is the least-squares reading (the release never reads rays back; spec marks
  the reduction UNVERIFIED).
* Poses from rays (`cameras_from_rays`, RayDiffusion-style least squares): the centre is the point nearest to all
  rays, the rotation the Procrustes (SVD) fit of the pixel grid's camera-frame directions to the ray directions, and
  optionally the focal length by least squares given that rotation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

RELEASE_FOCAL = 1.3887  # unit-image focal of the release pipeline's multiview cameras (spec §2.3)
RELEASE_DISTANCE = 1.7  # default camera distance of the release's `img2img` signature (its example uses 1.5)
RAY_LATENT_SCALE = 1.658  # ray-maps are multiplied by this before entering the sequence (spec §2.3)
RAY_CHANNELS = 6
LATENT_CHANNELS = 16
# Latent channel k holds Plücker channel _TILE[k]
_TILE = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------------
# Poses
# ----------------------------------------------------------------------------------------------------------------------


def camera_from_spherical(azimuth_deg, elevation_deg, distance=RELEASE_DISTANCE,
                          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """OpenGL c2w (…, 4, 4) of a camera on a z-up sphere looking at the origin, as the release builds them.

    Position = distance·(cos e cos a, cos e sin a, sin e); camera z = position/|position| (it looks along −z);
    x = normalize(world_up × z) with world_up = +z (or +y at the poles); y = z × x."""
    azimuth, elevation, distance = torch.broadcast_tensors(
        torch.as_tensor(azimuth_deg, dtype=dtype), torch.as_tensor(elevation_deg, dtype=dtype),
        torch.as_tensor(distance, dtype=dtype))
    az, el = torch.deg2rad(azimuth), torch.deg2rad(elevation)
    position = torch.stack([distance * torch.cos(el) * torch.cos(az), distance * torch.cos(el) * torch.sin(az),
                            distance * torch.sin(el)], dim=-1)
    back = position / position.norm(dim=-1, keepdim=True)
    up_z = torch.zeros_like(back)
    up_z[..., 2] = 1
    up_y = torch.zeros_like(back)
    up_y[..., 1] = 1
    right = torch.linalg.cross(up_z, back)
    at_pole = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(at_pole, torch.linalg.cross(up_y, back), right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(back, right)
    c2w = torch.zeros(*back.shape[:-1], 4, 4, dtype=dtype)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = right, up, back, position
    c2w[..., 3, 3] = 1
    return c2w


def opengl_to_opencv(c2w: torch.Tensor) -> torch.Tensor:
    """The release's OpenGL → OpenCV conversion of c2w (…, 4, 4): negate camera axes y and z (rotation columns 1, 2),
    then remap the world (swap rows 0 and 1, negate row 2), as nerfstudio-style loaders do. A proper rigid transform."""
    out = c2w.clone()
    out[..., :3, 1:3] *= -1
    out = out[..., [1, 0, 2, 3], :]
    out[..., 2, :] *= -1
    return out


def _flip_xy_world(dtype, device) -> torch.Tensor:
    """F4 = diag(−1, −1, 1, 1): OpenCV camera-0 frame ↔ PyTorch3D camera-0 view frame (its own inverse)."""
    return torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=dtype, device=device))


def relative_to_first(c2w: torch.Tensor, rotation_only: bool = False, frame: str = "release") -> torch.Tensor:
    """Re-express OpenCV poses (V, 4, 4) relative to camera 0, as the release's ray computation does.

    frame="release" (default): the world becomes camera 0's PyTorch3D view frame (x left, y up, z forward), what
    RayDiffusion's `first_camera_transform` gives when the release applies it to its PyTorch3D cameras. Camera 0 is
    then at the origin with OpenCV c2w diag(−1, −1, 1, 1) (identity as a PyTorch3D camera).
    frame="opencv": the world becomes camera 0's OpenCV frame (camera 0 = the identity).
    rotation_only=True only rotates the world (camera 0 keeps its distance from the origin), the transform's other
    variant; the release uses the full one (rotation_only=False)."""
    if frame not in ("release", "opencv"):
        raise ValueError(f"frame={frame!r}; expected 'release' (PyTorch3D view frame of camera 0) or 'opencv'.")
    first = c2w[0]
    if rotation_only:
        world = torch.eye(4, dtype=c2w.dtype, device=c2w.device)
        world[:3, :3] = first[:3, :3].transpose(0, 1)
    else:
        world = torch.linalg.inv(first)
    if frame == "release":
        world = _flip_xy_world(c2w.dtype, c2w.device) @ world
    return world @ c2w


def release_to_opencv_frame(c2w: torch.Tensor) -> torch.Tensor:
    """Poses (…, 4, 4) expressed in the release's ray frame (camera 0's PyTorch3D view frame, see
    `relative_to_first`) → the same poses in camera 0's OpenCV frame, where camera 0 is the identity. The map is its
    own inverse."""
    return _flip_xy_world(c2w.dtype, c2w.device) @ c2w


def c2w_from_w2c(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """c2w (…, 4, 4) from an OpenCV world-to-camera (R (…, 3, 3), T (…, 3)), X_cam = R X_world + T."""
    c2w = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rotation.dtype, device=rotation.device)
    c2w[..., :3, :3] = rotation.transpose(-1, -2)
    c2w[..., :3, 3] = -(rotation.transpose(-1, -2) @ translation[..., None])[..., 0]
    c2w[..., 3, 3] = 1
    return c2w


def intrinsics(focal: float = RELEASE_FOCAL, principal: tuple[float, float] = (0.5, 0.5),
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """K (3, 3) of the unit image, the release's [[f, 0, 0.5], [0, f, 0.5], [0, 0, 1]]."""
    return torch.tensor([[focal, 0, principal[0]], [0, focal, principal[1]], [0, 0, 1]], dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Rays
# ----------------------------------------------------------------------------------------------------------------------


def pixel_directions(height: int, width: int, focal=RELEASE_FOCAL, principal=(0.5, 0.5),
                     dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Camera-frame (OpenCV) direction of every pixel centre, (h, w, 3), not normalised (z = 1).

    focal: a number or (fx, fy), in unit-image widths/heights."""
    fx, fy = (focal, focal) if not isinstance(focal, (tuple, list)) else focal
    u = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    v = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([(uu - principal[0]) / fx, (vv - principal[1]) / fy, torch.ones_like(uu)], dim=-1)


def plucker_rays(c2w: torch.Tensor, height: int, width: int, focal=RELEASE_FOCAL,
                 principal=(0.5, 0.5)) -> torch.Tensor:
    """Plücker rays (…, h, w, 6) = (d, o × d) of OpenCV cameras c2w (…, 4, 4) on an (h, w) latent grid."""
    directions = pixel_directions(height, width, focal, principal, dtype=c2w.dtype, device=c2w.device)
    rotation = c2w[..., None, None, :3, :3]  # (…, 1, 1, 3, 3)
    world = (rotation @ directions[..., None])[..., 0]  # (…, h, w, 3)
    world = world / world.norm(dim=-1, keepdim=True)
    origin = c2w[..., None, None, :3, 3].expand_as(world)
    return torch.cat([world, torch.linalg.cross(origin, world)], dim=-1)


def rays_to_latent(rays: torch.Tensor, scale: float = RAY_LATENT_SCALE) -> torch.Tensor:
    """(…, h, w, 6) rays → (…, 16, h, w) ray frame: tiled [r0..r5, r0..r5, r0..r3], times `scale`."""
    if rays.shape[-1] != RAY_CHANNELS:
        raise ValueError(f"rays must end in {RAY_CHANNELS} channels (d, o x d); got shape {tuple(rays.shape)}.")
    tiled = rays[..., _TILE] * scale
    return tiled.movedim(-1, -3)


def latent_to_rays(latent: torch.Tensor, scale: float = RAY_LATENT_SCALE) -> torch.Tensor:
    """(…, 16, h, w) ray frame → (…, h, w, 6) rays: the mean of each channel's replicas, divided by `scale`."""
    if latent.shape[-3] != LATENT_CHANNELS:
        raise ValueError(f"ray latent must have {LATENT_CHANNELS} channels at dim -3; got shape {tuple(latent.shape)}.")
    channels_last = latent.movedim(-3, -1)
    tile = torch.tensor(_TILE, device=latent.device)
    rays = torch.stack([channels_last[..., tile == k].mean(dim=-1) for k in range(RAY_CHANNELS)], dim=-1)
    return rays / scale


def ray_latents_from_spherical(azimuths_deg, elevations_deg, distances=RELEASE_DISTANCE, height: int = 64,
                               width: int = 64, focal: float = RELEASE_FOCAL, dtype: torch.dtype = torch.float32,
                               rotation_only: bool = False) -> torch.Tensor:
    """The release's multiview camera frames (V, 16, h, w): spherical poses → OpenGL c2w → OpenCV → relative to view 0
    (in its PyTorch3D view frame, as the release) → Plücker rays on the (h, w) latent grid → tiled ×1.658. Geometry is
    computed in float64, returned in `dtype`."""
    c2w = relative_to_first(opengl_to_opencv(camera_from_spherical(azimuths_deg, elevations_deg, distances)),
                            rotation_only=rotation_only)
    return rays_to_latent(plucker_rays(c2w, height, width, focal)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Rays → cameras
# ----------------------------------------------------------------------------------------------------------------------


class RayCameras(NamedTuple):
    c2w: torch.Tensor  # (…, 4, 4) OpenCV camera-to-world
    focal: torch.Tensor  # (…,) unit-image focal (the given one when not estimated)


def camera_centers_from_rays(rays: torch.Tensor) -> torch.Tensor:
    """Least-squares point nearest to all rays of each camera: rays (…, P, 6) → (…, 3) (flatten an (h, w) grid first).

    Each line's point nearest the origin is p = d × m / |d|²; the centre c solves Σ(I − d̂d̂ᵀ) c = Σ(I − d̂d̂ᵀ) p."""
    direction, moment = rays[..., :3], rays[..., 3:]
    norm_sq = (direction * direction).sum(dim=-1, keepdim=True)
    points = torch.linalg.cross(direction, moment) / norm_sq
    unit = direction / norm_sq.sqrt()
    eye = torch.eye(3, dtype=rays.dtype, device=rays.device)
    projector = eye - unit[..., :, None] * unit[..., None, :]  # (…, P, 3, 3)
    lhs = projector.sum(dim=-3)
    rhs = (projector @ points[..., None]).sum(dim=-3)
    return torch.linalg.solve(lhs, rhs)[..., 0]


def _procrustes_rotation(world: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """Rotation R (…, 3, 3) minimising Σ‖R camera_k − world_k‖², for (…, P, 3) unit vectors."""
    covariance = world.transpose(-1, -2) @ camera  # Σ world cameraᵀ
    u, _, vh = torch.linalg.svd(covariance)
    sign = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.ones(*sign.shape, 3, dtype=world.dtype, device=world.device)
    fix[..., 2] = sign
    return u @ torch.diag_embed(fix) @ vh


def cameras_from_rays(rays: torch.Tensor, focal: float | None = RELEASE_FOCAL, principal=(0.5, 0.5),
                      iterations: int = 5) -> RayCameras:
    """Cameras (OpenCV c2w and focal) from Plücker rays (…, h, w, 6), e.g. `latent_to_rays` of denoised ray frames.

    focal=None estimates the focal length too: alternate the Procrustes rotation and the 1-D least-squares focal fit
    of the camera-frame ray slopes against the pixel offsets, starting from the release focal."""
    height, width = rays.shape[-3], rays.shape[-2]
    flat = rays.flatten(-3, -2)  # (…, P, 6)
    direction = flat[..., :3] / flat[..., :3].norm(dim=-1, keepdim=True)
    center = camera_centers_from_rays(flat)
    grid = pixel_directions(height, width, 1.0, principal, dtype=rays.dtype, device=rays.device).reshape(-1, 3)
    offsets = grid[:, :2]  # (u − cx, v − cy), pixel offsets at focal 1

    def fit_rotation(f):
        f = torch.as_tensor(f, dtype=rays.dtype, device=rays.device)
        camera = torch.cat([offsets / f[..., None, None], grid[:, 2:].expand(*f.shape, -1, 1)], dim=-1)
        camera = camera / camera.norm(dim=-1, keepdim=True)
        return _procrustes_rotation(direction, camera)

    estimate = focal is None
    f = torch.full(direction.shape[:-2], RELEASE_FOCAL if estimate else focal, dtype=rays.dtype, device=rays.device)
    rotation = fit_rotation(f)
    for _ in range(iterations if estimate else 0):
        local = (rotation.transpose(-1, -2)[..., None, :, :] @ direction[..., None])[..., 0]  # camera-frame rays
        slopes = local[..., :2] / local[..., 2:]  # = offsets / f
        f = (offsets * slopes).sum(dim=(-1, -2)) / (slopes * slopes).sum(dim=(-1, -2))
        rotation = fit_rotation(f)

    c2w = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rays.dtype, device=rays.device)
    c2w[..., :3, :3] = rotation
    c2w[..., :3, 3] = center
    c2w[..., 3, 3] = 1
    return RayCameras(c2w=c2w, focal=f)


def rotation_geodesic_error(rotation_a: torch.Tensor, rotation_b: torch.Tensor) -> torch.Tensor:
    """Angle (radians) of R_aᵀ R_b, (…,)."""
    relative = rotation_a.transpose(-1, -2) @ rotation_b
    cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    # acos is ill-conditioned near 0: use atan2 of the skew part for small angles
    skew = relative - relative.transpose(-1, -2)
    sin = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], dim=-1).norm(dim=-1) / 2
    return torch.atan2(sin, cos)


__all__ = [
    "LATENT_CHANNELS",
    "RAY_CHANNELS",
    "RAY_LATENT_SCALE",
    "RELEASE_DISTANCE",
    "RELEASE_FOCAL",
    "RayCameras",
    "c2w_from_w2c",
    "camera_centers_from_rays",
    "camera_from_spherical",
    "cameras_from_rays",
    "intrinsics",
    "latent_to_rays",
    "opengl_to_opencv",
    "pixel_directions",
    "plucker_rays",
    "ray_latents_from_spherical",
    "relative_to_first",
    "release_to_opencv_frame",
    "rays_to_latent",
    "rotation_geodesic_error",
]
