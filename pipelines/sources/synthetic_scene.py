"""Scene graph of the synthetic world: palette, classes, articulated figures, seeded scene generation.

A scene is a few primitives (sphere, cube, cylinder, cone) in palette colours plus optional articulated human figures
standing on the ground plane z = 0 (metres, z up) under a sky, lit by one directional sun. `SceneSpec` is the
semantic description (what a caption talks about, JSON-able); `Scene` compiles it into render primitives and lookup
tables (primitive -> instance id / class id / albedo) and the figures' 3D COCO-17 joints.

Randomness: only `Generator.random/uniform/integers` are used (bit-reproducible across platforms, no libm), and all
angles go through `sin_cos_deg`, so a seed gives the same scene everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from model.tasks import PALETTE as PROMPT_PALETTE
from pipelines.sources.synthetic_camera import sin_cos_deg
from pipelines.sources.synthetic_geometry import Box, Capsule, Cone, Cylinder, Sphere

# ---------------------------------------------------------------------------------------------------------------------
# Palette (ONEDIFFUSION_SPEC §5.1: the 20 colours allowed in semantic-map / bounding-box prompts, in spec order),
# owned by model.tasks; here as (name, hex) pairs and a name -> hex dict

PALETTE: tuple[tuple[str, str], ...] = tuple(PROMPT_PALETTE.items())  # the one palette, model.tasks
PALETTE_HEX: dict[str, str] = dict(PALETTE)
# how a palette name reads in a caption
COLOUR_WORDS: dict[str, str] = {
    name: {"darkorange": "dark orange", "blueviolet": "blue violet", "darkgreen": "dark green",
           "orangered": "orange red"}.get(name, name)
    for name, _ in PALETTE
}
# Object colours by default: palette entries that stay distinguishable from each other once shaded (drops the
# near-duplicates darkorange/orange, orangered/red, gold/yellow, turquoise/cyan, darkgreen/green, blueviolet/purple,
# orchid/pink). Any palette names may be configured.
DEFAULT_OBJECT_COLOURS: tuple[str, ...] = (
    "red", "lime", "blue", "yellow", "magenta", "cyan", "orange", "purple", "brown", "green", "pink", "teal", "navy",
)


def hex_to_rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))


def palette_rgb(name: str) -> tuple[int, int, int]:
    """RGB (0..255) of a palette colour name."""
    try:
        return hex_to_rgb(PALETTE_HEX[name])
    except KeyError:
        raise ValueError(f"unknown palette colour {name!r}; choose from {sorted(PALETTE_HEX)}") from None


# ---------------------------------------------------------------------------------------------------------------------
# Classes and keypoints

CLASSES: tuple[str, ...] = ("sky", "ground", "sphere", "cube", "cylinder", "cone", "person")
CLASS_ID: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
SIZES: tuple[str, ...] = ("small", "medium", "large")

COCO_KEYPOINTS: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
# COCO's 19 limbs, 0-based
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)

# Shape dimensions in metres per size class (each jittered by a factor in [0.9, 1.1]).
_SHAPE_DIMENSIONS: dict[str, dict[str, dict[str, float]]] = {
    "sphere": {"small": {"radius": 0.22}, "medium": {"radius": 0.32}, "large": {"radius": 0.45}},
    "cube": {"small": {"side": 0.40}, "medium": {"side": 0.58}, "large": {"side": 0.80}},
    "cylinder": {"small": {"radius": 0.18, "height": 0.45}, "medium": {"radius": 0.25, "height": 0.70},
                 "large": {"radius": 0.33, "height": 1.00}},
    "cone": {"small": {"radius": 0.22, "height": 0.50}, "medium": {"radius": 0.30, "height": 0.75},
             "large": {"radius": 0.40, "height": 1.05}},
}

# ---------------------------------------------------------------------------------------------------------------------
# Figures: capsule limbs + sphere head, posed by a few joint angles (degrees)

# arm: (raise sideways, swing forward, elbow bend, bend towards "forward"|"up"); leg: (abduct, swing forward, knee)
POSES: dict[str, dict[str, tuple]] = {
    "standing": {"left_arm": (10, 0, 8, "forward"), "right_arm": (10, 0, 8, "forward"),
                 "left_leg": (3, 0, 0), "right_leg": (3, 0, 0)},
    "walking": {"left_arm": (8, -25, 15, "forward"), "right_arm": (8, 25, 25, "forward"),
                "left_leg": (2, 25, 8), "right_leg": (2, -18, 35)},
    "waving": {"left_arm": (10, 0, 8, "forward"), "right_arm": (85, 10, 95, "up"),
               "left_leg": (3, 0, 0), "right_leg": (3, 0, 0)},
    "arms_up": {"left_arm": (165, 10, 5, "forward"), "right_arm": (165, 10, 5, "forward"),
                "left_leg": (4, 0, 0), "right_leg": (4, 0, 0)},
    "arms_out": {"left_arm": (90, 0, 0, "forward"), "right_arm": (90, 0, 0, "forward"),
                 "left_leg": (5, 0, 0), "right_leg": (5, 0, 0)},
}
POSE_PHRASES: dict[str, str] = {
    "standing": "standing", "walking": "walking", "waving": "waving", "arms_up": "raising both arms",
    "arms_out": "holding both arms out",
}
SKIN_RGB = (0.90, 0.74, 0.62)
TROUSERS_RGB = (0.22, 0.24, 0.32)

# body proportions for a 1.75 m figure (metres); a figure of height H is scaled by H / 1.75
_BODY = {
    "hip_half_width": 0.10, "hip_z": 0.95, "shoulder_half_width": 0.19, "shoulder_z": 1.42, "neck_z": 1.45,
    "head_z": 1.62, "head_radius": 0.115, "upper_arm": 0.30, "forearm": 0.27, "thigh": 0.45, "shin": 0.44,
    "r_upper_arm": 0.05, "r_forearm": 0.042, "r_thigh": 0.07, "r_shin": 0.055, "r_torso": 0.13, "r_shoulders": 0.06,
    "r_hips": 0.085, "r_neck": 0.045,
}
_REFERENCE_HEIGHT = 1.75
# body parts that meet at each joint (keypoint name without its side prefix); a keypoint is visible when the first
# surface its camera ray reaches belongs to one of them (see synthetic_render)
_JOINT_PARTS = {
    "nose": "head", "eye": "head", "ear": "head",
    "shoulder": "shoulders {side}_upper_arm", "elbow": "{side}_upper_arm {side}_forearm", "wrist": "{side}_forearm",
    "hip": "hips {side}_thigh", "knee": "{side}_thigh {side}_shin", "ankle": "{side}_shin",
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the synthetic world. Lengths in metres, angles in degrees, (lo, hi) = uniform range."""

    image_size: int = 128
    views_per_scene: int = 4
    num_objects: tuple[int, int] = (2, 5)
    with_figures: bool = True
    num_figures: tuple[int, int] = (1, 2)
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = DEFAULT_OBJECT_COLOURS
    poses: tuple[str, ...] = tuple(POSES)
    placement_radius: float = 1.4
    figure_height: tuple[float, float] = (1.55, 1.85)
    camera_distance: tuple[float, float] = (4.8, 6.2)
    camera_elevation_deg: tuple[float, float] = (12.0, 40.0)
    azimuth_jitter_deg: float = 15.0
    target_height: float = 0.5
    sun_elevation_deg: tuple[float, float] = (35.0, 65.0)
    ambient: float = 0.35
    ground: bool = True
    shadows: bool = True
    min_visible_fraction: float = 0.0015  # an entity is "visible" (captioned, prompted) above this image fraction

    def __post_init__(self) -> None:
        def fail(name: str, problem: str) -> None:
            raise ValueError(f"SyntheticConfig.{name}: {problem} (got {getattr(self, name)!r})")

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # accept lists from YAML/JSON
                object.__setattr__(self, f.name, tuple(value))
        if int(self.image_size) < 8:
            fail("image_size", "must be at least 8 pixels")
        if int(self.views_per_scene) < 1:
            fail("views_per_scene", "must be at least 1")
        for name in ("num_objects", "num_figures"):
            lo, hi = getattr(self, name)
            if not (0 <= lo <= hi):
                fail(name, "must be (lo, hi) with 0 <= lo <= hi")
        for name in ("figure_height", "camera_distance", "camera_elevation_deg", "sun_elevation_deg"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                fail(name, "must be (lo, hi) with lo <= hi")
        if not self.shapes or any(s not in SHAPES for s in self.shapes):
            fail("shapes", f"must be a non-empty subset of {SHAPES}")
        if not self.colours or any(c not in PALETTE_HEX for c in self.colours):
            fail("colours", f"must be non-empty palette names from {tuple(PALETTE_HEX)}")
        if not self.poses or any(p not in POSES for p in self.poses):
            fail("poses", f"must be a non-empty subset of {tuple(POSES)}")
        if self.camera_distance[0] <= 0:
            fail("camera_distance", "must be positive")
        if not (-90.0 <= self.camera_elevation_deg[0] and self.camera_elevation_deg[1] <= 90.0):
            fail("camera_elevation_deg", "must lie in [-90, 90]")
        if not 0.0 < self.sun_elevation_deg[0] <= self.sun_elevation_deg[1] <= 90.0:
            fail("sun_elevation_deg", "must lie in (0, 90] (the sun is above the ground)")
        if not 0.0 <= self.ambient <= 1.0:
            fail("ambient", "must lie in [0, 1]")
        if not 0.0 <= self.min_visible_fraction < 1.0:
            fail("min_visible_fraction", "must lie in [0, 1)")
        if self.placement_radius <= 0:
            fail("placement_radius", "must be positive")


@dataclass(frozen=True)
class SceneObject:
    """One primitive object standing on the ground. `position` is the footprint centre (x, y) in metres."""

    id: int
    shape: str
    colour: str
    size: str
    position: tuple[float, float]
    dimensions: dict[str, float]
    yaw_deg: float = 0.0

    @property
    def height(self) -> float:
        d = self.dimensions
        return 2.0 * d["radius"] if self.shape == "sphere" else d["side"] if self.shape == "cube" else d["height"]

    @property
    def footprint_radius(self) -> float:
        d = self.dimensions
        return d["side"] * math.sqrt(0.5) if self.shape == "cube" else d["radius"]

    @property
    def centre(self) -> tuple[float, float, float]:
        return (self.position[0], self.position[1], 0.5 * self.height)

    def primitive(self):
        x, y = self.position
        d = self.dimensions
        if self.shape == "sphere":
            return Sphere((x, y, d["radius"]), d["radius"])
        if self.shape == "cube":
            h = 0.5 * d["side"]
            return Box((x, y, h), (h, h, h), self.yaw_deg)
        if self.shape == "cylinder":
            return Cylinder((x, y, 0.0), d["radius"], d["height"])
        if self.shape == "cone":
            return Cone((x, y, 0.0), d["radius"], d["height"])
        raise ValueError(f"unknown shape {self.shape!r}")


@dataclass(frozen=True)
class Figure:
    """An articulated person: root (x, y) on the ground, heading (the way the body faces), height and a named pose.

    `angles` holds the jittered joint angles actually used (degrees), so a figure is fully reproducible from its spec.
    """

    id: int
    colour: str  # shirt colour (palette name)
    position: tuple[float, float]
    heading_deg: float
    height: float
    pose: str
    angles: dict[str, tuple] = field(default_factory=dict)
    head_yaw_deg: float = 0.0


@dataclass(frozen=True)
class SceneSpec:
    """Everything that defines a scene. Sun direction is given by azimuth/elevation (degrees), like cameras."""

    objects: tuple[SceneObject, ...]
    figures: tuple[Figure, ...] = ()
    sun_azimuth_deg: float = 45.0
    sun_elevation_deg: float = 50.0
    ground: bool = True
    ambient: float = 0.35
    target: tuple[float, float, float] = (0.0, 0.0, 0.5)

    @property
    def sun_direction(self) -> tuple[float, float, float]:
        """Unit vector pointing towards the sun."""
        sa, ca = sin_cos_deg(self.sun_azimuth_deg)
        se, ce = sin_cos_deg(self.sun_elevation_deg)
        return (ce * ca, ce * sa, se)


# ---------------------------------------------------------------------------------------------------------------------
# Figure geometry


def _unit3(v) -> tuple[float, float, float]:
    n = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    return (v[0] / n, v[1] / n, v[2] / n)


def _limb_direction(side: float, raise_deg: float, swing_deg: float) -> tuple[float, float, float]:
    """Local (forward, left, up) unit direction: hanging down, raised sideways, then swung forward."""
    sa, ca = sin_cos_deg(raise_deg)
    sb, cb = sin_cos_deg(swing_deg)
    return (ca * sb, side * sa, -ca * cb)


def _bend(d, towards, angle_deg: float) -> tuple[float, float, float]:
    """Rotate unit direction d by angle_deg towards the part of `towards` orthogonal to d."""
    dot = d[0] * towards[0] + d[1] * towards[1] + d[2] * towards[2]
    n = (towards[0] - dot * d[0], towards[1] - dot * d[1], towards[2] - dot * d[2])
    if n[0] * n[0] + n[1] * n[1] + n[2] * n[2] < 1e-12:
        n = (0.0, 0.0, 1.0) if abs(d[2]) < 0.9 else (1.0, 0.0, 0.0)
        dot = d[0] * n[0] + d[1] * n[1] + d[2] * n[2]
        n = (n[0] - dot * d[0], n[1] - dot * d[1], n[2] - dot * d[2])
    n = _unit3(n)
    s, c = sin_cos_deg(angle_deg)
    return _unit3((d[0] * c + n[0] * s, d[1] * c + n[1] * s, d[2] * c + n[2] * s))


def _joint_part_names(keypoint: str) -> list[str]:
    side, _, joint = keypoint.rpartition("_")  # "left_eye" -> ("left", "eye"); "nose" -> ("", "nose")
    return _JOINT_PARTS[joint].format(side=side).split()


@dataclass(frozen=True)
class FigureGeometry:
    """World-space geometry of one figure: render parts and the 17 COCO joints."""

    parts: tuple[tuple[str, Any], ...]  # (part name, primitive)
    joints: np.ndarray  # (17, 3) world coordinates, COCO order
    joint_radii: np.ndarray  # (17,) radius of the body around each joint (0 for face points on the head surface)
    joint_parts: tuple[tuple[int, ...], ...]  # per joint: indices into `parts` of the parts meeting at the joint
    footprint_radius: float  # horizontal reach from the root position (metres)
    top: float  # height of the highest surface point above the ground (metres)


def figure_geometry(fig: Figure) -> FigureGeometry:
    """Pose the figure: build joints in the body frame (forward, left, up), rest it on the ground, place it."""
    s = fig.height / _REFERENCE_HEIGHT
    b = {k: v * s for k, v in _BODY.items()}
    pose = fig.angles or POSES[fig.pose]
    local: dict[str, tuple[float, float, float]] = {}
    radius: dict[str, float] = {}
    for side_name, side in (("left", 1.0), ("right", -1.0)):
        raise_deg, swing_deg, elbow_deg, towards = pose[f"{side_name}_arm"]
        shoulder = (0.0, side * b["shoulder_half_width"], b["shoulder_z"])
        d_upper = _limb_direction(side, raise_deg, swing_deg)
        elbow = tuple(shoulder[i] + b["upper_arm"] * d_upper[i] for i in range(3))
        d_fore = _bend(d_upper, (1.0, 0.0, 0.0) if towards == "forward" else (0.0, 0.0, 1.0), elbow_deg)
        wrist = tuple(elbow[i] + b["forearm"] * d_fore[i] for i in range(3))
        abduct_deg, hip_swing_deg, knee_deg = pose[f"{side_name}_leg"]
        hip = (0.0, side * b["hip_half_width"], b["hip_z"])
        d_thigh = _limb_direction(side, abduct_deg, hip_swing_deg)
        knee = tuple(hip[i] + b["thigh"] * d_thigh[i] for i in range(3))
        d_shin = _bend(d_thigh, (-1.0, 0.0, 0.0), knee_deg)
        ankle = tuple(knee[i] + b["shin"] * d_shin[i] for i in range(3))
        for name, point in (("shoulder", shoulder), ("elbow", elbow), ("wrist", wrist), ("hip", hip),
                            ("knee", knee), ("ankle", ankle)):
            local[f"{side_name}_{name}"] = point
        # ball around the joint = the thickest part meeting there; keypoint visibility allows 3 such radii
        radius[f"{side_name}_shoulder"] = max(b["r_shoulders"], b["r_upper_arm"])
        radius[f"{side_name}_elbow"] = max(b["r_upper_arm"], b["r_forearm"])
        radius[f"{side_name}_wrist"] = b["r_forearm"]
        radius[f"{side_name}_hip"] = max(b["r_hips"], b["r_thigh"])
        radius[f"{side_name}_knee"] = max(b["r_thigh"], b["r_shin"])
        radius[f"{side_name}_ankle"] = b["r_shin"]

    head = (0.0, 0.0, b["head_z"])
    rh = b["head_radius"]
    sy, cy = sin_cos_deg(fig.head_yaw_deg)
    face_f, face_l = (cy, sy, 0.0), (-sy, cy, 0.0)

    def on_head(f: float, l: float, u: float) -> tuple[float, float, float]:
        v = _unit3((f * face_f[0] + l * face_l[0], f * face_f[1] + l * face_l[1], u))
        return (head[0] + rh * v[0], head[1] + rh * v[1], head[2] + rh * v[2])

    local["nose"] = on_head(1.0, 0.0, -0.15)
    local["left_eye"], local["right_eye"] = on_head(0.82, 0.38, 0.22), on_head(0.82, -0.38, 0.22)
    local["left_ear"], local["right_ear"] = on_head(-0.15, 1.0, 0.05), on_head(-0.15, -1.0, 0.05)
    for name in ("nose", "left_eye", "right_eye", "left_ear", "right_ear"):
        radius[name] = 0.0

    # torso ends far enough from the hip and shoulder joints that they are not buried inside it
    pelvis = (0.0, 0.0, b["hip_z"] + 0.12 * s)
    chest = (0.0, 0.0, b["shoulder_z"] - 0.06 * s)
    neck_base, neck_top = (0.0, 0.0, b["shoulder_z"] - 0.02 * s), (0.0, 0.0, b["head_z"] - 0.6 * rh)
    local_parts: list[tuple[str, str, tuple, tuple, float]] = [
        ("torso", "shirt", pelvis, chest, b["r_torso"]),
        ("shoulders", "shirt", local["left_shoulder"], local["right_shoulder"], b["r_shoulders"]),
        ("hips", "trousers", local["left_hip"], local["right_hip"], b["r_hips"]),
        ("neck", "skin", neck_base, neck_top, b["r_neck"]),
    ]
    for side in ("left", "right"):
        shoulder, elbow, wrist, hip, knee, ankle = (
            local[f"{side}_{n}"] for n in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle"))
        local_parts += [
            (f"{side}_upper_arm", "shirt", shoulder, elbow, b["r_upper_arm"]),
            (f"{side}_forearm", "skin", elbow, wrist, b["r_forearm"]),
            (f"{side}_thigh", "trousers", hip, knee, b["r_thigh"]),
            (f"{side}_shin", "trousers", knee, ankle, b["r_shin"]),
        ]

    # rest on the ground: the lowest surface point of any part is at z = 0
    lowest = min(head[2] - rh, *(min(p0[2], p1[2]) - r for _, _, p0, p1, r in local_parts))
    sh, ch = sin_cos_deg(fig.heading_deg)
    x0, y0 = fig.position

    def to_world(p) -> tuple[float, float, float]:
        # body frame: forward = (cos h, sin h), left = (-sin h, cos h)
        return (x0 + p[0] * ch - p[1] * sh, y0 + p[0] * sh + p[1] * ch, p[2] - lowest)

    parts: list[tuple[str, Any]] = [("head:skin", Sphere(to_world(head), rh))]
    part_names = ["head"] + [name for name, _, _, _, _ in local_parts]
    footprint = 0.0
    for name, material, p0, p1, r in local_parts:
        parts.append((f"{name}:{material}", Capsule(to_world(p0), to_world(p1), r)))
        for p in (p0, p1):
            footprint = max(footprint, math.sqrt(p[0] * p[0] + p[1] * p[1]) + r)
    joints = np.array([to_world(local[name]) for name in COCO_KEYPOINTS], dtype=np.float64)
    radii = np.array([radius[name] for name in COCO_KEYPOINTS], dtype=np.float64)
    joint_parts = tuple(tuple(part_names.index(p) for p in _joint_part_names(name)) for name in COCO_KEYPOINTS)
    top = max(head[2] + rh, *(max(p0[2], p1[2]) + r for _, _, p0, p1, r in local_parts)) - lowest
    return FigureGeometry(tuple(parts), joints, radii, joint_parts, max(footprint, rh), top)


def figure_footprint_radius(fig: Figure) -> float:
    return figure_geometry(fig).footprint_radius


# ---------------------------------------------------------------------------------------------------------------------
# Compiled scene


@dataclass(frozen=True, eq=False)
class Scene:
    """A SceneSpec compiled for rendering.

    Primitive k (0-based) is drawn with buffer id k + 2 (0 = sky, 1 = ground); the tables below are indexed by buffer
    id. `groups` lists (bound centre, bound radius, primitive indices) so whole figures can be culled at once.
    """

    spec: SceneSpec
    primitives: tuple
    buffer_instance: np.ndarray  # (n + 2,) int32 instance id per buffer id (0 for sky and ground)
    buffer_class: np.ndarray  # (n + 2,) int32 class id per buffer id
    buffer_albedo: np.ndarray  # (n + 2, 3) float64 albedo in [0, 1] (sRGB-encoded)
    groups: tuple
    figure_joints: np.ndarray  # (P, 17, 3) world coordinates
    figure_joint_radii: np.ndarray  # (P, 17)
    figure_joint_parts: tuple  # (P, 17) tuples of primitive indices meeting at each joint
    figure_ids: tuple[int, ...]

    @classmethod
    def from_spec(cls, spec: SceneSpec) -> Scene:
        prims: list = []
        inst: list[int] = [0, 0]
        cls_ids: list[int] = [CLASS_ID["sky"], CLASS_ID["ground"]]
        albedo: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0)]
        groups: list = []
        for obj in spec.objects:
            p = obj.primitive()
            groups.append((p.bound_centre, p.bound_radius, (len(prims),)))
            prims.append(p)
            inst.append(obj.id)
            cls_ids.append(CLASS_ID[obj.shape])
            albedo.append(tuple(c / 255.0 for c in palette_rgb(obj.colour)))
        joints, radii, joint_parts = [], [], []
        shirt = None
        for fig in spec.figures:
            geo = figure_geometry(fig)
            shirt = tuple(c / 255.0 for c in palette_rgb(fig.colour))
            materials = {"shirt": shirt, "skin": SKIN_RGB, "trousers": TROUSERS_RGB}
            first = len(prims)
            for name, p in geo.parts:
                prims.append(p)
                inst.append(fig.id)
                cls_ids.append(CLASS_ID["person"])
                albedo.append(materials[name.split(":")[1]])
            members = tuple(range(first, len(prims)))
            centre, rad = _enclosing_sphere([prims[k] for k in members])
            groups.append((centre, rad, members))
            joints.append(geo.joints)
            radii.append(geo.joint_radii)
            joint_parts.append(tuple(tuple(first + k for k in ks) for ks in geo.joint_parts))
        return cls(
            spec=spec,
            primitives=tuple(prims),
            buffer_instance=np.array(inst, dtype=np.int32),
            buffer_class=np.array(cls_ids, dtype=np.int32),
            buffer_albedo=np.array(albedo, dtype=np.float64),
            groups=tuple(groups),
            figure_joints=np.array(joints, dtype=np.float64).reshape(len(spec.figures), 17, 3),
            figure_joint_radii=np.array(radii, dtype=np.float64).reshape(len(spec.figures), 17),
            figure_joint_parts=tuple(joint_parts),
            figure_ids=tuple(f.id for f in spec.figures),
        )

    @property
    def entity_ids(self) -> tuple[int, ...]:
        return tuple(o.id for o in self.spec.objects) + self.figure_ids


def _enclosing_sphere(prims) -> tuple[tuple[float, float, float], float]:
    """A (not minimal) sphere containing the bounding spheres of `prims`: centred on the mean of their centres."""
    n = float(len(prims))
    c = tuple(sum(p.bound_centre[i] for p in prims) / n for i in range(3))
    r = 0.0
    for p in prims:
        d = [p.bound_centre[i] - c[i] for i in range(3)]
        r = max(r, math.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) + p.bound_radius)
    return c, r


# ---------------------------------------------------------------------------------------------------------------------
# Seeded generation


def scene_seed_sequence(seed: int, index: int) -> np.random.SeedSequence:
    """Scene `index` of a run with seed `seed` draws from SeedSequence([seed, index]) (independent of other scenes)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and scene index must be non-negative integers, got seed={seed}, index={index}")
    return np.random.SeedSequence([int(seed), int(index)])


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer, np.random.SeedSequence)):
        return np.random.default_rng(rng_or_seed)
    raise TypeError(f"expected a numpy Generator, SeedSequence or int seed, got {type(rng_or_seed).__name__}")


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    # lo + (hi - lo) * U[0, 1): basic arithmetic on a bit-reproducible double
    return float(lo) + (float(hi) - float(lo)) * float(rng.random())


def _jittered_pose(rng: np.random.Generator, pose: str, jitter_deg: float = 6.0) -> dict[str, tuple]:
    out = {}
    for limb, params in POSES[pose].items():
        nums = [p + _uniform(rng, -jitter_deg, jitter_deg) for p in params if not isinstance(p, str)]
        out[limb] = tuple(nums) + tuple(p for p in params if isinstance(p, str))
    return out


def generate_scene_spec(rng_or_seed, config: SyntheticConfig | None = None) -> SceneSpec:
    """Sample objects and figures with distinct (colour, shape) pairs on non-overlapping footprints."""
    config = config or SyntheticConfig()
    rng = _as_rng(rng_or_seed)
    n_obj = int(rng.integers(config.num_objects[0], config.num_objects[1] + 1))
    n_fig = int(rng.integers(config.num_figures[0], config.num_figures[1] + 1)) if config.with_figures else 0

    # (shape, colour) pairs are unique, and figure shirt colours are unique, so "the red cube" / "the person in a
    # red shirt" always refers to exactly one entity
    pairs = [(s, c) for s in config.shapes for c in config.colours]
    order = rng.permutation(len(pairs))
    chosen_pairs = [pairs[int(i)] for i in order[:n_obj]]
    shirt_order = rng.permutation(len(config.colours))
    shirts = [config.colours[int(i)] for i in shirt_order[: min(n_fig, len(config.colours))]]

    candidates: list[tuple[str, Any, float]] = []  # (kind, unplaced entity data, footprint radius)
    for shape, colour in chosen_pairs:
        size = SIZES[int(rng.integers(0, len(SIZES)))]
        dims = {k: v * _uniform(rng, 0.9, 1.1) for k, v in _SHAPE_DIMENSIONS[shape][size].items()}
        yaw = _uniform(rng, 0.0, 90.0) if shape == "cube" else 0.0
        obj = SceneObject(0, shape, colour, size, (0.0, 0.0), dims, yaw)
        candidates.append(("object", obj, obj.footprint_radius))
    for colour in shirts:
        pose = config.poses[int(rng.integers(0, len(config.poses)))]
        fig = Figure(
            0, colour, (0.0, 0.0), _uniform(rng, 0.0, 360.0), _uniform(rng, *config.figure_height), pose,
            _jittered_pose(rng, pose), _uniform(rng, -25.0, 25.0),
        )
        candidates.append(("figure", fig, figure_footprint_radius(fig)))

    placed: list[tuple[str, Any, tuple[float, float], float]] = []
    # big footprints first, so the small ones fill the gaps; stable sort keeps sampling order among equals
    for kind, item, rad in sorted(candidates, key=lambda c: -c[2]):
        for _ in range(60):
            r = config.placement_radius * math.sqrt(float(rng.random()))
            sa, ca = sin_cos_deg(_uniform(rng, 0.0, 360.0))
            x, y = r * ca, r * sa
            if all(
                (x - px) * (x - px) + (y - py) * (y - py) >= (rad + prad + 0.08) * (rad + prad + 0.08)
                for _, _, (px, py), prad in placed
            ):
                placed.append((kind, item, (x, y), rad))
                break

    objects, figures = [], []
    next_id = 1
    for kind, item, pos, _ in placed:  # ids: objects first (in placement order), then figures
        if kind == "object":
            objects.append(SceneObject(next_id, item.shape, item.colour, item.size, pos, item.dimensions,
                                       item.yaw_deg))
            next_id += 1
    for kind, item, pos, _ in placed:
        if kind == "figure":
            figures.append(Figure(next_id, item.colour, pos, item.heading_deg, item.height, item.pose,
                                  item.angles, item.head_yaw_deg))
            next_id += 1

    xs = [o.position[0] for o in objects] + [f.position[0] for f in figures]
    ys = [o.position[1] for o in objects] + [f.position[1] for f in figures]
    target = (sum(xs) / len(xs) if xs else 0.0, sum(ys) / len(ys) if ys else 0.0, float(config.target_height))
    return SceneSpec(
        objects=tuple(objects),
        figures=tuple(figures),
        sun_azimuth_deg=_uniform(rng, 0.0, 360.0),
        sun_elevation_deg=_uniform(rng, *config.sun_elevation_deg),
        ground=config.ground,
        ambient=config.ambient,
        target=target,
    )


def generate_scene(rng_or_seed, config: SyntheticConfig | None = None) -> Scene:
    """A random scene (seeded): `generate_scene(SeedSequence([seed, i]))` is scene i of a run with seed `seed`."""
    return Scene.from_spec(generate_scene_spec(rng_or_seed, config))


def sample_camera_params(
    rng_or_seed, num_views: int, config: SyntheticConfig | None = None
) -> list[tuple[float, float, float]]:
    """(azimuth°, elevation°, distance) per view: azimuths evenly spaced from a random start, jittered (not view 0)."""
    config = config or SyntheticConfig()
    rng = _as_rng(rng_or_seed)
    start = _uniform(rng, 0.0, 360.0)
    out = []
    for v in range(num_views):
        jitter = _uniform(rng, -config.azimuth_jitter_deg, config.azimuth_jitter_deg) if v else 0.0
        azimuth = (start + 360.0 * v / num_views + jitter) % 360.0
        out.append((azimuth, _uniform(rng, *config.camera_elevation_deg), _uniform(rng, *config.camera_distance)))
    return out
