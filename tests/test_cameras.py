"""model/cameras.py: Plücker ray-maps of the release's cameras and their inverse (pose estimation from rays)."""

import math

import pytest
import torch

from model.cameras import (
    RAY_LATENT_SCALE,
    RELEASE_FOCAL,
    c2w_from_w2c,
    camera_centers_from_rays,
    camera_from_spherical,
    cameras_from_rays,
    intrinsics,
    latent_to_rays,
    opengl_to_opencv,
    pixel_directions,
    plucker_rays,
    ray_latents_from_spherical,
    rays_to_latent,
    relative_to_first,
    release_to_opencv_frame,
    rotation_geodesic_error,
)

FLIP_XY = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))


def random_rotations(n, generator):
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(n, 3, 3)


def random_cameras(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    c2w[:, :3, :3] = random_rotations(n, gen)
    c2w[:, :3, 3] = 2 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return c2w


def test_spherical_cameras_look_at_the_origin_from_a_z_up_sphere():
    c2w = camera_from_spherical([0, 90, 45, 200], [0, 0, 30, -20], 1.5)
    position = c2w[:, :3, 3]
    assert position.norm(dim=-1).tolist() == pytest.approx([1.5] * 4)
    torch.testing.assert_close(position[0], torch.tensor([1.5, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(position[1], torch.tensor([0, 1.5, 0], dtype=torch.float64), atol=1e-12, rtol=0)
    # OpenGL: the camera looks along −z, so −z points at the origin; x is horizontal (z-up world)
    torch.testing.assert_close(-c2w[:, :3, 2], -position / 1.5)
    assert c2w[:, 2, 0].abs().max() < 1e-12
    assert torch.linalg.det(c2w[:, :3, :3]).tolist() == pytest.approx([1.0] * 4)
    pole = camera_from_spherical(0, 90, 1.0)  # world up parallel to the view axis: falls back to +y
    assert torch.isfinite(pole).all() and torch.linalg.det(pole[:3, :3]).item() == pytest.approx(1.0)


def test_opengl_to_opencv_is_rigid_and_keeps_the_view_axis_on_the_origin():
    gl = camera_from_spherical([0, 30, 60, 90], [0, 10, 20, -30], 1.7)
    cv = opengl_to_opencv(gl)
    assert torch.linalg.det(cv[:, :3, :3]).tolist() == pytest.approx([1.0] * 4)
    # OpenCV looks along +z: the optical axis still passes through the (remapped) origin
    torch.testing.assert_close(cv[:, :3, 2], -cv[:, :3, 3] / 1.7)
    # the world remap: (x, y, z) -> (y, x, -z) on positions
    torch.testing.assert_close(cv[:, :3, 3], torch.stack([gl[:, 1, 3], gl[:, 0, 3], -gl[:, 2, 3]], dim=-1))


def test_relative_to_first_puts_camera_zero_at_the_origin_in_its_pytorch3d_view_frame():
    c2w = random_cameras(5)
    rel = relative_to_first(c2w)  # the release: world = camera 0's PyTorch3D view frame (x left, y up, z forward)
    torch.testing.assert_close(rel[0], FLIP_XY)
    # relative poses between cameras are unchanged
    torch.testing.assert_close(torch.linalg.inv(rel[1]) @ rel[2], torch.linalg.inv(c2w[1]) @ c2w[2])
    opencv = relative_to_first(c2w, frame="opencv")
    torch.testing.assert_close(opencv[0], torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(release_to_opencv_frame(rel), opencv)
    torch.testing.assert_close(release_to_opencv_frame(opencv), rel)
    rot_only = relative_to_first(c2w, rotation_only=True, frame="opencv")
    torch.testing.assert_close(rot_only[0, :3, :3], torch.eye(3, dtype=torch.float64))
    assert rot_only[0, :3, 3].norm().item() == pytest.approx(c2w[0, :3, 3].norm().item())
    with pytest.raises(ValueError, match="frame"):
        relative_to_first(c2w, frame="opengl")


def release_reference_ray_frames(c2w_opengl: torch.Tensor, n: int, focal: float = RELEASE_FOCAL) -> torch.Tensor:
    """The release's multiview ray frames (V, 16, n, n), recomputed independently in PyTorch3D's conventions:
    row vectors, X_view = X_world @ R + T, view frame x left / y up / z forward, NDC +1 at the top-left.

    release: OpenGL c2w -> OpenCV (opengl_to_opencv, checked against the release elsewhere) -> w2c = inverse ->
    PyTorch3D camera (R = R_cvᵀ with columns 0, 1 negated, T = T_cv with entries 0, 1 negated, NDC focal f / 0.5 on
    the unit image) -> first_camera_transform(rotation_only=False) -> unproject the half-pixel NDC grid at depth 1 ->
    Plücker (d, o × d) -> [r, r, r[:4]] × 1.658."""
    w2c = torch.linalg.inv(opengl_to_opencv(c2w_opengl))
    rotation = w2c[:, :3, :3].transpose(1, 2).clone()
    rotation[:, :, :2] *= -1
    translation = w2c[:, :3, 3].clone()
    translation[:, :2] *= -1
    views = len(c2w_opengl)
    world_to_view = torch.zeros(views, 4, 4, dtype=torch.float64)  # row-vector matrices [[R, 0], [T, 1]]
    world_to_view[:, :3, :3], world_to_view[:, 3, :3], world_to_view[:, 3, 3] = rotation, translation, 1
    # first_camera_transform: t = (Rotate(R0) then Translate(T0))^-1 composed before every camera's transform
    world_to_view = torch.linalg.inv(world_to_view[0]) @ world_to_view
    rotation, translation = world_to_view[:, :3, :3], world_to_view[:, 3:, :3]  # (V, 3, 3), (V, 1, 3)
    ndc = torch.linspace(1 - 1 / n, -1 + 1 / n, n, dtype=torch.float64)
    y, x = torch.meshgrid(ndc, ndc, indexing="ij")
    ndc_focal = focal / 0.5
    view_points = torch.stack([x / ndc_focal, y / ndc_focal, torch.ones_like(x)], dim=-1).reshape(1, -1, 3)
    world_points = (view_points - translation) @ rotation.transpose(1, 2)
    centres = (-translation @ rotation.transpose(1, 2)).expand_as(world_points)
    directions = torch.nn.functional.normalize(world_points - centres, dim=-1)
    rays = torch.cat([directions, torch.linalg.cross(centres, directions)], dim=-1).reshape(views, n, n, 6)
    return (torch.cat([rays, rays, rays[..., :4]], dim=-1) * 1.658).permute(0, 3, 1, 2)


def test_release_ray_frames_match_an_independent_pytorch3d_style_computation():
    azimuths, elevations, distances = [0, 30, -45, 120], [0, 10, 20, -15], [1.5, 1.5, 1.7, 2.0]
    frames = ray_latents_from_spherical(azimuths, elevations, distances, height=8, width=8, dtype=torch.float64)
    reference = release_reference_ray_frames(camera_from_spherical(azimuths, elevations, distances), 8)
    torch.testing.assert_close(frames, reference, rtol=0, atol=1e-12)
    # camera 0: the top-left ray points to +x, +y in its own PyTorch3D view frame (NDC (+1, +1)), moments vanish
    rays = latent_to_rays(frames)
    assert rays[0, 0, 0, 0] > 0 and rays[0, 0, 0, 1] > 0 and rays[0, ..., 3:].abs().max() < 1e-12


def test_pixel_grid_is_the_pytorch3d_half_pixel_ndc_grid():
    h = w = 4
    directions = pixel_directions(h, w, focal=1.0, principal=(0.5, 0.5))
    # PyTorch3D NDC x = 1 − 2u runs +1 − 1/w … −1 + 1/w; OpenCV x = −NDC x / (2f)
    ndc = torch.linspace(1 - 1 / w, -1 + 1 / w, w, dtype=torch.float64)
    torch.testing.assert_close(directions[0, :, 0], -ndc / 2)
    torch.testing.assert_close(directions[:, 0, 1], -ndc / 2)
    assert intrinsics().tolist() == [[RELEASE_FOCAL, 0, 0.5], [0, RELEASE_FOCAL, 0.5], [0, 0, 1]]


def test_plucker_rays_are_unit_directions_with_perpendicular_moments():
    c2w = random_cameras(3)
    rays = plucker_rays(c2w, 6, 6)
    assert rays.shape == (3, 6, 6, 6)
    d, m = rays[..., :3], rays[..., 3:]
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3, 6, 6, dtype=torch.float64))
    assert (d * m).sum(-1).abs().max() < 1e-12
    # moment = o × d with o the camera centre
    torch.testing.assert_close(m, torch.linalg.cross(c2w[:, None, None, :3, 3].expand_as(d), d))
    # the central ray of an even grid is symmetric around the optical axis
    axis = d.mean(dim=(1, 2))
    torch.testing.assert_close(axis / axis.norm(dim=-1, keepdim=True), c2w[:, :3, 2])


def test_ray_latent_tiling_and_its_inverse():
    rays = torch.randn(2, 5, 3, 6, dtype=torch.float64)
    latent = rays_to_latent(rays)
    assert latent.shape == (2, 16, 5, 3)
    order = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    torch.testing.assert_close(latent, rays[..., order].movedim(-1, -3) * RAY_LATENT_SCALE)
    torch.testing.assert_close(latent_to_rays(latent), rays)
    # replicas are averaged: noise on one copy moves the estimate by a third (r0..r3) or a half (r4, r5)
    bumped = latent.clone()
    bumped[:, 12] += 3 * RAY_LATENT_SCALE
    bumped[:, 10] += 2 * RAY_LATENT_SCALE
    delta = latent_to_rays(bumped) - rays
    assert delta[..., 0].mean().item() == pytest.approx(1.0) and delta[..., 4].mean().item() == pytest.approx(1.0)


def test_release_multiview_frames():
    frames = ray_latents_from_spherical([0, 30, 60], [0, 0, 15], 1.5, height=8, width=8)
    assert frames.shape == (3, 16, 8, 8) and frames.dtype == torch.float32
    rays = latent_to_rays(frames.double())
    # camera 0 sits at the origin: its moments vanish and its axis is +z
    assert rays[0, ..., 3:].abs().max() < 1e-6
    cams = cameras_from_rays(rays)
    # in the release's ray frame camera 0 is the PyTorch3D identity, i.e. OpenCV rotation diag(-1, -1, 1) ...
    assert rotation_geodesic_error(cams.c2w[0, :3, :3], FLIP_XY[:3, :3]).item() < 1e-5
    # ... and back in camera 0's OpenCV frame it is the identity, the others at their relative OpenCV poses
    opencv = release_to_opencv_frame(cams.c2w)
    assert rotation_geodesic_error(opencv[0, :3, :3], torch.eye(3, dtype=torch.float64)).item() < 1e-5
    truth = relative_to_first(opengl_to_opencv(camera_from_spherical([0, 30, 60], [0, 0, 15], 1.5)), frame="opencv")
    torch.testing.assert_close(opencv, truth, atol=1e-5, rtol=0)
    # the other cameras sit 2·1.5·sin(Δ/2) from camera 0 (chord of the sphere)
    assert cams.c2w[1, :3, 3].norm().item() == pytest.approx(2 * 1.5 * math.sin(math.radians(15)), abs=1e-5)


@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
def test_cameras_from_rays_recovers_random_cameras(grid):
    c2w = random_cameras(16, seed=1)
    rays = plucker_rays(c2w, *grid)
    cams = cameras_from_rays(rays)
    error = rotation_geodesic_error(cams.c2w[:, :3, :3], c2w[:, :3, :3])
    assert error.max().item() < 1e-9
    torch.testing.assert_close(cams.c2w[:, :3, 3], c2w[:, :3, 3], atol=1e-9, rtol=0)
    torch.testing.assert_close(camera_centers_from_rays(rays.flatten(-3, -2)), c2w[:, :3, 3], atol=1e-9, rtol=0)


def test_cameras_from_rays_estimates_the_focal_length():
    c2w = random_cameras(8, seed=2)
    rays = plucker_rays(c2w, 8, 8, focal=0.9)
    cams = cameras_from_rays(rays, focal=None)
    assert cams.focal.tolist() == pytest.approx([0.9] * 8, abs=1e-6)
    assert rotation_geodesic_error(cams.c2w[:, :3, :3], c2w[:, :3, :3]).max().item() < 1e-6


def test_cameras_from_rays_is_robust_to_small_noise_through_the_latent():
    c2w = random_cameras(16, seed=3)
    latent = rays_to_latent(plucker_rays(c2w, 16, 16))
    # 0.003 per latent channel ≈ 0.2 % of the ray-frame scale
    noisy = latent + 0.003 * torch.randn(latent.shape, generator=torch.Generator().manual_seed(0), dtype=latent.dtype)
    cams = cameras_from_rays(latent_to_rays(noisy))
    error = rotation_geodesic_error(cams.c2w[:, :3, :3], c2w[:, :3, :3])
    assert error.max().item() < 1e-3  # measured: max 6.4e-4 rad, median 1.7e-4 rad
    assert (cams.c2w[:, :3, 3] - c2w[:, :3, 3]).norm(dim=-1).max().item() < 0.01  # measured 1.6e-3


def test_w2c_round_trip():
    c2w = random_cameras(4, seed=4)
    w2c = torch.linalg.inv(c2w)
    torch.testing.assert_close(c2w_from_w2c(w2c[:, :3, :3], w2c[:, :3, 3]), c2w)
