"""The synthetic world's labels are exact: each test recomputes a label independently of the renderer.

Independent oracles used here: analytic ray–sphere solutions and silhouette cones, projected convex hulls of boxes,
and, for every primitive type, root finding on a convex "inside" function along each pixel ray (no shared code with
the renderer's intersection kernels).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from model import cameras as model_cameras
from pipelines.record import samples_from_wds_tar
from pipelines.sources.synthetic import render_shard_bytes, resolve_config, shard_name, synthetic_samples
from pipelines.sources.synthetic_camera import (
    FOCAL_UNIT, POLE_EPS, camera_from_spherical, intrinsics_matrix, opengl_to_opencv_c2w, ray_distance_to_z_depth,
    release_opencv_c2w, rigid_inverse, sin_cos_deg, z_depth_to_ray_distance,
)
from pipelines.sources.synthetic_caption import RELATION_MARGIN_M, RELATION_WORDS
from pipelines.sources.synthetic_render import render, render_view
from pipelines.sources.synthetic_scene import (
    CLASS_ID, CLASSES, COLOUR_WORDS, COCO_KEYPOINTS, Figure, PALETTE_HEX, Scene, SceneObject, SceneSpec,
    SyntheticConfig, figure_geometry, generate_scene, palette_rgb,
)

# ---------------------------------------------------------------------------------------------------------------------
# independent ray helpers (numpy linear algebra from K and the OpenCV w2c, nothing from the renderer)


def pixel_rays(camera):
    """Unit world directions through pixel centres and the camera centre, from K and w2c_opencv."""
    K, w2c = camera.K, camera.w2c_opencv
    H, W = camera.height, camera.width
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    pix = np.stack([jj, ii, np.ones_like(jj)], axis=-1)
    d_cam = pix @ np.linalg.inv(K).T
    R, t = w2c[:3, :3], w2c[:3, 3]
    d_world = d_cam @ R  # R^T d for row vectors
    d_world /= np.linalg.norm(d_world, axis=-1, keepdims=True)
    return -R.T @ t, d_world


def camera_z(camera, points):
    w2c = camera.w2c_opencv
    return points @ w2c[2, :3] + w2c[2, 3]


def sphere_only(radius=0.5, position=(0.3, -0.2)):
    obj = SceneObject(1, "sphere", "red", "large", position, {"radius": radius})
    return Scene.from_spec(SceneSpec(objects=(obj,), ground=False)), obj


# ---------------------------------------------------------------------------------------------------------------------
# cameras (spec §2.3)


def test_sin_cos_deg_matches_libm_and_is_exact_on_quadrants():
    for a in np.linspace(-720, 720, 2881):
        s, c = sin_cos_deg(a)
        assert abs(s - math.sin(math.radians(a))) < 2e-15 and abs(c - math.cos(math.radians(a))) < 2e-15
    assert sin_cos_deg(0) == (0.0, 1.0) and sin_cos_deg(90) == (1.0, 0.0) and sin_cos_deg(180) == (0.0, -1.0)


def test_spherical_camera_looks_at_target_from_the_sphere():
    target = (0.4, -0.3, 0.5)
    cam = camera_from_spherical(30.0, 20.0, 2.5, target, size=64)
    pos = np.array(cam.position)
    expected = np.array(target) + 2.5 * np.array(
        [math.cos(math.radians(20)) * math.cos(math.radians(30)),
         math.cos(math.radians(20)) * math.sin(math.radians(30)), math.sin(math.radians(20))])
    np.testing.assert_allclose(pos, expected, atol=1e-12)
    uv, z = cam.project(np.array(target))
    np.testing.assert_allclose(uv, [32.0, 32.0], atol=1e-9)  # the target is at the image centre
    assert z == pytest.approx(2.5)
    R = cam.c2w_opengl[:3, :3]
    np.testing.assert_allclose(R.T @ R, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)
    assert R[2, 0] == pytest.approx(0.0, abs=1e-12)  # no roll: the camera's right vector is horizontal
    np.testing.assert_allclose(cam.w2c_opencv @ opengl_to_opencv_c2w(cam.c2w_opengl), np.eye(4), atol=1e-12)
    # OpenCV: a point above the target appears higher in the image (smaller row index)
    uv_up, _ = cam.project(np.array(target) + [0, 0, 0.3])
    assert uv_up[1] < 32.0
    # intrinsics of spec §2.3: f = 1.3887 on a unit image, principal point at the centre, ~39.6 degree FoV
    np.testing.assert_allclose(cam.K, [[FOCAL_UNIT * 64, 0, 32], [0, FOCAL_UNIT * 64, 32], [0, 0, 1]])
    assert 2 * math.degrees(math.atan(0.5 / FOCAL_UNIT)) == pytest.approx(39.6, abs=0.05)


def test_release_conversion_is_the_spec_recipe():
    c2w = camera_from_spherical(47.0, 12.0, 1.5).c2w_opengl
    expected = c2w.copy()
    expected[:3, 1:3] *= -1
    expected = expected[[1, 0, 2, 3]]
    expected[2, :] *= -1
    np.testing.assert_array_equal(release_opencv_c2w(c2w), expected)
    np.testing.assert_allclose(rigid_inverse(c2w) @ c2w, np.eye(4), atol=1e-12)


def test_cameras_agree_with_the_models_camera_module():
    for az, el, dist in ((0.0, 0.0, 1.5), (47.0, 12.0, 1.7), (-120.0, -30.0, 3.0), (200.0, 89.0, 2.0)):
        mine = camera_from_spherical(az, el, dist).c2w_opengl
        theirs = model_cameras.camera_from_spherical(az, el, dist).numpy()
        np.testing.assert_allclose(mine, theirs, atol=1e-12)
        np.testing.assert_array_equal(release_opencv_c2w(mine),
                                      model_cameras.opengl_to_opencv(torch.from_numpy(mine)).numpy())


def test_bit_stable_cameras_are_within_a_few_ulps_of_the_models_and_share_its_constants():
    # the data's pure-Python cameras and model.cameras' torch ones differ only by libm rounding (a few ulps)
    rng = np.random.default_rng(0)
    az, el, dist = rng.uniform(-360, 720, 500), rng.uniform(-90, 90, 500), rng.uniform(0.2, 10, 500)
    # at, just inside and just outside the near-pole fallback (|horizontal| = dist * cos(el) vs POLE_EPS * dist)
    az = np.append(az, [30.0] * 6)
    el = np.append(el, [90.0, -90.0, 89.99999, -89.99999, 89.9999, -89.9999])
    dist = np.append(dist, [2.0] * 6)
    mine = np.stack([camera_from_spherical(a, e, d).c2w_opengl for a, e, d in zip(az, el, dist)])
    theirs = model_cameras.camera_from_spherical(torch.from_numpy(az), torch.from_numpy(el),
                                                 torch.from_numpy(dist)).numpy()
    ulps = 10 * np.finfo(np.float64).eps
    np.testing.assert_allclose(mine[:, :3, :3], theirs[:, :3, :3], rtol=0, atol=ulps)
    np.testing.assert_allclose(mine[:, :3, 3], theirs[:, :3, 3], rtol=0, atol=ulps * dist.max())
    np.testing.assert_array_equal(mine[:, 3], theirs[:, 3])
    assert POLE_EPS == 1e-6  # the threshold model.cameras.camera_from_spherical uses
    assert FOCAL_UNIT == model_cameras.RELEASE_FOCAL
    for w, h in ((64, 64), (48, 80)):
        unit = model_cameras.intrinsics(FOCAL_UNIT).numpy()
        np.testing.assert_array_equal(intrinsics_matrix(w, h), np.diag([w, h, 1.0]) @ unit)
        np.testing.assert_array_equal(intrinsics_matrix(w, h),
                                      [[FOCAL_UNIT * w, 0, w / 2], [0, FOCAL_UNIT * h, h / 2], [0, 0, 1]])


def test_z_depth_and_ray_distance_convert_both_ways():
    cam = camera_from_spherical(0, 30, 3.0, size=16)
    depth = np.random.default_rng(0).uniform(1, 5, (16, 16)).astype(np.float64)
    dist = z_depth_to_ray_distance(depth, cam.K)
    assert (dist >= depth).all()
    np.testing.assert_allclose(ray_distance_to_z_depth(dist, cam.K), depth, rtol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# (1) depth and silhouette of a sphere are analytic


@pytest.mark.parametrize("azimuth, elevation, distance", [(20.0, 15.0, 3.0), (200.0, -35.0, 2.2), (95.0, 70.0, 4.0)])
def test_sphere_depth_is_the_analytic_z_depth_and_its_mask_is_the_silhouette(azimuth, elevation, distance):
    scene, obj = sphere_only()
    cam = camera_from_spherical(azimuth, elevation, distance, (0.1, 0.0, 0.4), size=80)
    view = render_view(scene, cam)
    o, d = pixel_rays(cam)
    c, r = np.array(obj.centre), obj.dimensions["radius"]
    oc = o - c
    b = d @ oc
    disc = b * b - (oc @ oc - r * r)
    hit = disc >= 0
    s = -b - np.sqrt(np.where(hit, disc, 0))  # distance along the unit ray
    z_analytic = camera_z(cam, o + s[..., None] * d)

    # silhouette cone: angle between ray and centre direction below asin(r / |c - o|)
    to_c = (c - o) / np.linalg.norm(c - o)
    in_cone = d @ to_c >= math.sqrt(1 - (r / np.linalg.norm(c - o)) ** 2)
    mask = view.instance == obj.id
    assert mask.sum() > 50
    np.testing.assert_array_equal(mask, hit)
    np.testing.assert_array_equal(mask, in_cone)
    np.testing.assert_allclose(view.depth[mask], z_analytic[mask], rtol=1e-6)
    assert (view.depth[~mask] == 0).all() and (view.semantic[mask] == CLASS_ID["sphere"]).all()
    assert view.entity_pixels[obj.id] == int(hit.sum())
    ys, xs = np.nonzero(hit)
    assert view.entity_bboxes[obj.id] == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


# ---------------------------------------------------------------------------------------------------------------------
# (2) segmentation = projected silhouettes minus occlusion


def _convex_hull(points):
    pts = sorted(map(tuple, points))

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return np.array(lower[:-1] + upper[:-1])


def _inside_convex(poly, x, y):
    inside = np.ones(x.shape, bool)
    for i in range(len(poly)):
        (x0, y0), (x1, y1) = poly[i], poly[(i + 1) % len(poly)]
        inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    return inside


def test_box_and_occluding_sphere_pixel_counts_match_projected_silhouettes():
    yaw, half = 25.0, 0.4
    box = SceneObject(1, "cube", "blue", "large", (0.0, 0.0), {"side": 2 * half}, yaw)
    ball = SceneObject(2, "sphere", "red", "small", (1.1, 0.35), {"radius": 0.3})
    scene = Scene.from_spec(SceneSpec(objects=(box, ball), ground=True))
    cam = camera_from_spherical(10.0, 25.0, 4.5, (0.0, 0.0, 0.4), size=96)
    view = render_view(scene, cam)

    co, si = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    corners = np.array([(x * co - y * si, x * si + y * co, half + z)
                        for x in (-half, half) for y in (-half, half) for z in (-half, half)])
    uv, z_corners = cam.project(corners)
    o, d = pixel_rays(cam)
    c, r = np.array(ball.centre), 0.3
    in_ball = d @ ((c - o) / np.linalg.norm(c - o)) >= math.sqrt(1 - (r / np.linalg.norm(c - o)) ** 2)
    assert camera_z(cam, c) + r < z_corners.min()  # the ball is wholly in front of the box

    jj, ii = np.meshgrid(np.arange(96) + 0.5, np.arange(96) + 0.5)
    in_box = _inside_convex(_convex_hull(uv), jj, ii)
    expected_box = in_box & ~in_ball
    assert 0 < (in_box & in_ball).sum() < in_ball.sum()  # partial occlusion really happens
    np.testing.assert_array_equal(view.instance == 1, expected_box)
    np.testing.assert_array_equal(view.instance == 2, in_ball)
    assert (view.semantic == CLASS_ID["cube"]).sum() == expected_box.sum()
    assert (view.semantic == CLASS_ID["sphere"]).sum() == in_ball.sum()
    assert ((view.semantic == CLASS_ID["ground"]) | (view.semantic == CLASS_ID["sky"]))[~(in_box | in_ball)].all()


# generic oracle: first root of a convex function that is <= 0 exactly inside the solid, along each pixel ray


def _convex_inside_function(kind, params):
    if kind == "sphere":
        c, r = params
        return lambda p: np.linalg.norm(p - c, axis=-1) - r
    if kind == "cylinder":
        (cx, cy, z0), r, h = params
        return lambda p: np.maximum.reduce([np.hypot(p[..., 0] - cx, p[..., 1] - cy) - r, z0 - p[..., 2],
                                            p[..., 2] - z0 - h])
    if kind == "cone":
        (cx, cy, z0), r, h = params
        return lambda p: np.maximum(np.hypot(p[..., 0] - cx, p[..., 1] - cy) - r / h * (z0 + h - p[..., 2]),
                                    z0 - p[..., 2])
    if kind == "box":
        c, hx, yaw = params
        co, si = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))

        def f(p):
            q = p - c
            lx, ly = q[..., 0] * co + q[..., 1] * si, -q[..., 0] * si + q[..., 1] * co
            return np.maximum.reduce([np.abs(lx) - hx, np.abs(ly) - hx, np.abs(q[..., 2]) - hx])
        return f
    if kind == "capsule":
        a, b, r = params

        def f(p):
            ba = b - a
            s = np.clip(((p - a) @ ba) / (ba @ ba), 0, 1)
            return np.linalg.norm(p - (a + s[..., None] * ba), axis=-1) - r
        return f
    raise ValueError(kind)


def _oracle_first_hit(f, o, d, s_max):
    """Distance to the first zero of convex f along unit rays (nan: miss, inf: too close to call)."""
    lo, hi = np.zeros(d.shape[:-1]), np.full(d.shape[:-1], s_max)
    for _ in range(90):  # ternary search for the minimum of a convex function
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        left = f(o + m1[..., None] * d) < f(o + m2[..., None] * d)
        hi, lo = np.where(left, m2, hi), np.where(left, lo, m1)
    s_min = 0.5 * (lo + hi)
    f_min = f(o + s_min[..., None] * d)
    a, b = np.zeros_like(s_min), s_min.copy()
    for _ in range(80):  # bisection between outside (a) and inside (b)
        m = 0.5 * (a + b)
        inside = f(o + m[..., None] * d) <= 0
        a, b = np.where(inside, a, m), np.where(inside, m, b)
    s = np.where(f_min < -1e-9, 0.5 * (a + b), np.nan)
    return np.where(np.abs(f_min) <= 1e-9, np.inf, s)


def _check_against_oracle(scene, parts, cam, entity_id):
    view = render_view(scene, cam)
    o, d = pixel_rays(cam)
    s = np.full(d.shape[:-1], np.nan)
    for kind, params in parts:
        sk = _oracle_first_hit(_convex_inside_function(kind, params), o, d, 20.0)
        s = np.where(np.isnan(s) | (sk < s), sk, s)
    decided = ~np.isinf(s)
    hit = ~np.isnan(s) & decided
    assert decided.mean() > 0.995
    mask = view.instance == entity_id
    assert hit.sum() > 20
    np.testing.assert_array_equal(mask[decided], hit[decided])
    z = camera_z(cam, o + np.where(hit, s, 0)[..., None] * d)
    np.testing.assert_allclose(view.depth[hit], z[hit], rtol=1e-6)


@pytest.mark.parametrize("shape, dims", [
    ("cylinder", {"radius": 0.3, "height": 0.9}), ("cone", {"radius": 0.4, "height": 0.8}),
    ("cube", {"side": 0.7}), ("sphere", {"radius": 0.35}),
])
def test_every_shape_matches_an_independent_root_finder(shape, dims):
    obj = SceneObject(1, shape, "green", "medium", (0.2, -0.1), dims, 33.0 if shape == "cube" else 0.0)
    scene = Scene.from_spec(SceneSpec(objects=(obj,), ground=False))
    x, y = obj.position
    part = {
        "sphere": ("sphere", (np.array(obj.centre), dims.get("radius"))),
        "cylinder": ("cylinder", ((x, y, 0.0), dims.get("radius"), dims.get("height"))),
        "cone": ("cone", ((x, y, 0.0), dims.get("radius"), dims.get("height"))),
        "cube": ("box", (np.array(obj.centre), dims.get("side", 0) / 2, 33.0)),
    }[shape]
    for az, el in ((15.0, 25.0), (130.0, -20.0), (250.0, 80.0)):
        _check_against_oracle(scene, [part], camera_from_spherical(az, el, 2.5, (0.2, -0.1, 0.4), size=40), 1)


def test_figure_limbs_match_an_independent_root_finder():
    fig = Figure(1, "orange", (0.0, 0.0), 30.0, 1.75, "waving")
    scene = Scene.from_spec(SceneSpec(objects=(), figures=(fig,), ground=False))
    parts = []
    for _, p in figure_geometry(fig).parts:
        if p.kind == "sphere":
            parts.append(("sphere", (np.array(p.centre), p.radius)))
        else:
            parts.append(("capsule", (np.array(p.a), np.array(p.b), p.radius)))
    _check_against_oracle(scene, parts, camera_from_spherical(40.0, 10.0, 3.0, (0, 0, 0.9), size=64), 1)


def test_culling_changes_no_byte():
    scene = generate_scene(np.random.default_rng(3), SyntheticConfig())
    cam = camera_from_spherical(70.0, 25.0, 5.5, scene.spec.target, size=64)
    a, b = render_view(scene, cam, cull=True), render_view(scene, cam, cull=False)
    for name in ("image", "depth", "instance", "semantic", "keypoints"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


# ---------------------------------------------------------------------------------------------------------------------
# (3) keypoints


def test_visible_keypoints_lie_on_the_figures_limbs_at_the_joint_depth():
    config = SyntheticConfig(num_objects=(1, 3), num_figures=(2, 2))
    checked = 0
    for seed in range(3):
        scene = generate_scene(np.random.default_rng(seed), config)
        cams = [camera_from_spherical(az, 20.0, 5.0, scene.spec.target, size=192) for az in (0.0, 120.0, 240.0)]
        for view in render(scene, cams):
            cam = view.camera
            for p, fid in enumerate(scene.figure_ids):
                joints, radii = scene.figure_joints[p], scene.figure_joint_radii[p]
                head_radius = figure_geometry(scene.spec.figures[p]).parts[0][1].radius
                uv, z = cam.project(joints)
                for j in range(17):
                    x, y, v = view.keypoints[p, j]
                    if v == 0:
                        assert x == 0 and y == 0
                        assert not (0 <= uv[j, 0] < cam.width and 0 <= uv[j, 1] < cam.height and z[j] > 0)
                        continue
                    np.testing.assert_allclose((x, y), uv[j], atol=1e-3)
                    if v == 1:
                        continue
                    c, r = int(x), int(y)
                    win = (slice(max(r - 1, 0), r + 2), slice(max(c - 1, 0), c + 2))
                    own = view.instance[win] == fid
                    assert own.any(), (COCO_KEYPOINTS[j], "no pixel of the figure at its keypoint")
                    pixel_m = z[j] / cam.K[0, 0]
                    err = np.abs(view.depth[win][own] - z[j]).min()
                    # limb joints: within 3 limb radii (the visibility rule); face points sit on the head surface
                    limb = 3 * radii[j] if radii[j] > 0 else head_radius
                    assert err <= limb + 2 * pixel_m, (COCO_KEYPOINTS[j], err)
                    checked += 1
    assert checked > 100


def test_keypoint_visibility_flags_follow_coco():
    fig = Figure(2, "red", (0.0, 0.0), 0.0, 1.75, "standing")  # faces +x
    wall = SceneObject(1, "cube", "blue", "large", (1.3, 0.0), {"side": 1.2}, 0.0)
    facing = Scene.from_spec(SceneSpec(objects=(), figures=(fig,), ground=True))
    names = {n: i for i, n in enumerate(COCO_KEYPOINTS)}

    front = render_view(facing, camera_from_spherical(0.0, 10.0, 5.0, (0, 0, 0.9), size=160)).keypoints[0]
    back = render_view(facing, camera_from_spherical(180.0, 10.0, 5.0, (0, 0, 0.9), size=160)).keypoints[0]
    assert front[names["nose"], 2] == 2 and front[names["left_eye"], 2] == 2
    assert back[names["nose"], 2] == 1 and back[names["right_eye"], 2] == 1  # behind the head: labelled, not visible

    hidden = Scene.from_spec(SceneSpec(objects=(wall,), figures=(fig,), ground=True))
    view = render_view(hidden, camera_from_spherical(0.0, 5.0, 5.0, (0, 0, 0.9), size=160))
    for name in ("left_knee", "right_knee", "left_ankle", "right_ankle"):
        x, y, v = view.keypoints[0, names[name]]
        assert v == 1 and view.instance[int(y), int(x)] == wall.id, name
    assert view.keypoints[0, names["nose"], 2] == 2

    away = render_view(facing, camera_from_spherical(0.0, 10.0, 5.0, (0, 4.0, 0.9), size=64))  # looks past it
    outside = away.keypoints[0][away.keypoints[0, :, 2] == 0]
    assert len(outside) > 0 and (outside[:, :2] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# (4) multiview consistency through the stored K and w2c


def test_points_seen_in_one_view_reproject_onto_the_same_surface_in_the_others():
    samples = list(synthetic_samples(seed=11, num_scenes=1, views_per_scene=4, size=96))
    cams = [(s.camera["K"], s.camera["w2c_opencv"]) for s in samples]
    ref = samples[0]
    K0, w2c0 = cams[0]
    c2w0 = np.linalg.inv(w2c0)
    inst = ref.instance
    H, W = inst.shape
    interior = np.zeros_like(inst, bool)
    interior[1:-1, 1:-1] = inst[1:-1, 1:-1] > 0
    for dr in (-1, 0, 1):  # keep pixels whose 3x3 neighbourhood is all the same entity
        for dc in (-1, 0, 1):
            interior[1:-1, 1:-1] &= inst[1 + dr:H - 1 + dr, 1 + dc:W - 1 + dc] == inst[1:-1, 1:-1]
    rows, cols = np.nonzero(interior)
    pick = np.random.default_rng(0).choice(len(rows), size=min(150, len(rows)), replace=False)
    checked_per_view = [0] * 4
    for i in pick:
        r, c = rows[i], cols[i]
        ray = np.linalg.inv(K0) @ np.array([c + 0.5, r + 0.5, 1.0])
        X = c2w0 @ np.append(ray * ref.depth[r, c], 1.0)  # surface point seen by view 0
        for v, (K, w2c) in enumerate(cams[1:], start=1):
            Xc = w2c @ X
            u, w = (K @ Xc[:3])[:2] / Xc[2]
            cc, rr = int(math.floor(u)), int(math.floor(w))
            if not (1 <= cc < 95 and 1 <= rr < 95):
                continue
            depth = samples[v].depth
            if samples[v].instance[rr, cc] != inst[r, c] or depth[rr, cc] < Xc[2] - 0.05:
                continue  # occluded in that view
            local = np.abs(depth[rr - 1:rr + 2, cc - 1:cc + 2] - depth[rr, cc]).max()
            assert abs(depth[rr, cc] - Xc[2]) <= local + 1e-5 * Xc[2], (v, r, c)
            checked_per_view[v] += 1
    assert sum(1 for n in checked_per_view[1:] if n >= 10) >= 3


# ---------------------------------------------------------------------------------------------------------------------
# (5) captions name exactly the visible entities with their true colours

_COLOUR_RE = "|".join(sorted((re.escape(w) for w in COLOUR_WORDS.values()), key=len, reverse=True))
_WORD_TO_COLOUR = {w: n for n, w in COLOUR_WORDS.items()}
_OBJECT_RE = re.compile(rf"\b(?:a|an|the) (?:(?:small|medium|large) )?({_COLOUR_RE}) (sphere|cube|cylinder|cone)\b",
                        re.I)
_PERSON_RE = re.compile(rf"\bperson in an? ({_COLOUR_RE}) shirt\b")


def _mentions(text):
    found = {(_WORD_TO_COLOUR[c.lower()], s) for c, s in _OBJECT_RE.findall(text)}
    return found | {(_WORD_TO_COLOUR[c], "person") for c in _PERSON_RE.findall(text)}


def test_captions_name_exactly_the_visible_entities_with_their_true_colours():
    n_views = 0
    for s in synthetic_samples(seed=5, num_scenes=4, views_per_scene=2, size=64):
        visible = [e for e in s.entities if e["visible"]]
        truth = {(e["colour"], e["class"]) for e in visible}
        assert _mentions(s.captions["short"]) == truth
        assert _mentions(s.captions["long"]) == truth
        assert len(_OBJECT_RE.findall(s.captions["short"])) + len(_PERSON_RE.findall(s.captions["short"])) == len(
            visible)
        for e in s.entities:
            assert e["visible"] == (e["pixels"] >= math.ceil(0.0015 * 64 * 64))
            if e["class"] == "person" or not e["visible"]:
                continue
            # the named colour is what is drawn: every pixel of the object is a shade of the palette colour
            rgb = s.image[s.instance == e["id"]].astype(float)
            pal = np.array(palette_rgb(e["colour"]), float)
            assert PALETTE_HEX[e["colour"]] == e["colour_hex"]
            shade = rgb.max(axis=1) / pal.max()
            assert np.abs(rgb - shade[:, None] * pal).max() <= 1.5
        n_views += 1
    assert n_views == 8


def test_caption_relations_are_true_in_the_views_camera_frame():
    for s in synthetic_samples(seed=9, num_scenes=3, views_per_scene=2, size=64):
        R = s.camera["c2w_opengl"][:3, :3]
        right = R[:2, 0] / np.linalg.norm(R[:2, 0])
        forward = -R[:2, 2] / np.linalg.norm(R[:2, 2])  # horizontal viewing direction
        by_id = {e["id"]: e for e in s.entities}
        name = {e["id"]: (f"person in" if e["class"] == "person" else f"{COLOUR_WORDS[e['colour']]} {e['class']}")
                for e in s.entities}
        for rel in s.meta["relations"]:
            a, b = by_id[rel["subject"]], by_id[rel["object"]]
            delta = np.array(a["centre"][:2]) - np.array(b["centre"][:2])
            lateral, depthwise = delta @ right, delta @ forward
            for atom in rel["relation"]:
                assert {"left_of": lateral < -RELATION_MARGIN_M, "right_of": lateral > RELATION_MARGIN_M,
                        "behind": depthwise > RELATION_MARGIN_M, "in_front_of": depthwise < -RELATION_MARGIN_M,
                        "next_to": abs(lateral) <= RELATION_MARGIN_M and abs(depthwise) <= RELATION_MARGIN_M,
                        }[atom], (atom, lateral, depthwise)
            phrase = " and ".join(RELATION_WORDS[x] for x in rel["relation"])
            assert f"{phrase} the {name[b['id']]}" in s.captions["long"]


def test_prompt_fields_use_the_spec_palette_syntax():
    s = next(synthetic_samples(seed=2, num_scenes=1, views_per_scene=1, size=64))
    prompts = s.meta["prompts"]
    tags = re.findall(r"<(#[0-9A-F]{6}) (\w+) mask: (\w+)>", prompts["semantic"])
    visible_classes = {e["class"] for e in s.entities if e["visible"]}
    assert {t[2] for t in tags} == visible_classes
    for hex_, name, cls in tags:
        assert PALETTE_HEX[name] == hex_ == prompts["class_colours"][cls]["hex"]
    assert prompts["boundingbox"] == prompts["semantic"].replace(" mask: ", " boundingbox: ")
    assert s.classes == list(CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# (6) determinism


def test_same_seed_same_bytes_and_scenes_are_independent_of_the_run():
    def encoded(**kw):
        return [s.to_wds() for s in synthetic_samples(size=48, views_per_scene=2, **kw)]

    a, b = encoded(seed=7, num_scenes=2), encoded(seed=7, num_scenes=2)
    assert a == b
    assert encoded(seed=7, num_scenes=1, first_scene=1) == a[2:]  # scene 1 alone == scene 1 of a longer run
    c = encoded(seed=8, num_scenes=2)
    assert all(x["png"] != y["png"] for x, y in zip(a, c))
    assert [x["__key__"] for x in a] == [
        "synthetic-7-000000-v00", "synthetic-7-000000-v01", "synthetic-7-000001-v00", "synthetic-7-000001-v01"]


def test_shard_bytes_are_deterministic_and_read_back_as_the_samples():
    config = resolve_config(views_per_scene=2, size=32)
    shard = render_shard_bytes(3, 1, 2, config)
    assert render_shard_bytes(3, 1, 2, config) == shard  # same scenes, same bytes (member mtimes are 0)
    back = samples_from_wds_tar(shard)
    expected = list(synthetic_samples(3, 2, config=config, first_scene=1))
    assert [s.key for s in back] == [s.key for s in expected] == [
        "synthetic-3-000001-v00", "synthetic-3-000001-v01", "synthetic-3-000002-v00", "synthetic-3-000002-v01"]
    assert all(b.differences(e) == [] for b, e in zip(back, expected))
    assert shard_name(3, 1) == "synthetic-3-000001.tar"
    jpg = samples_from_wds_tar(render_shard_bytes(3, 1, 1, config, image_format="jpg"))
    assert [b.differences(e) for b, e in zip(jpg, expected[:2])] == [["image"], ["image"]]  # JPEG is lossy


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="SyntheticConfig.colours"):
        SyntheticConfig(colours=("red", "not-a-colour"))
    with pytest.raises(ValueError, match="SyntheticConfig.num_objects"):
        SyntheticConfig(num_objects=(3, 1))
    with pytest.raises(ValueError, match="below the ground"):
        scene, _ = sphere_only()
        grounded = Scene.from_spec(SceneSpec(objects=scene.spec.objects, ground=True))
        render_view(grounded, camera_from_spherical(0.0, -30.0, 3.0, (0, 0, 0.5), size=16))
