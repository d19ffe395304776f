"""Analytic ray–primitive intersection kernels for the synthetic world (vectorised numpy, float64).

Every primitive answers two questions for a bundle of rays ``o + t d`` (arrays of any broadcastable shape; the origin
may be a scalar triple for camera rays):

* ``intersect(ox, oy, oz, dx, dy, dz) -> t``: the ray parameter of the first entry into the solid, ``inf`` on a miss.
  Only entries with ``t > 0`` count, which is correct for rays that start outside the solid (camera rays; shadow rays
  start on a surface, nudged outwards along the normal).
* ``normals(px, py, pz) -> (nx, ny, nz)``: the outward unit normal at surface points (used for shading only).

``bound_centre``/``bound_radius`` is a sphere containing the solid, used to cull pixels and shadow rays; it must be
conservative, since culling never changes a label (tests render with and without culling and compare bytes).

Only +, -, *, /, sqrt, comparisons and selections are used, all of them IEEE-754 correctly rounded, so results are
bit-identical on every machine and independent of how the pixel grid is tiled.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.sources.synthetic_camera import sin_cos_deg

INF = np.inf


def _safe_divisor(d):
    """Replace exact zeros by a tiny positive number so slab/plane divisions give huge finite values, never NaN."""
    return np.where(d == 0.0, 1e-300, d)


def _unit(nx, ny, nz):
    n = np.sqrt(nx * nx + ny * ny + nz * nz)
    n = np.where(n > 0.0, n, 1.0)
    return nx / n, ny / n, nz / n


class Sphere:
    """Sphere with centre (cx, cy, cz) and radius r."""

    kind = "sphere"
    __slots__ = ("centre", "radius", "bound_centre", "bound_radius")

    def __init__(self, centre, radius: float):
        self.centre = tuple(float(x) for x in centre)
        self.radius = float(radius)
        self.bound_centre = self.centre
        self.bound_radius = self.radius

    def intersect(self, ox, oy, oz, dx, dy, dz):
        cx, cy, cz = self.centre
        px, py, pz = ox - cx, oy - cy, oz - cz
        a = dx * dx + dy * dy + dz * dz
        b = px * dx + py * dy + pz * dz
        c = px * px + py * py + pz * pz - self.radius * self.radius
        disc = b * b - a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        return np.where((disc >= 0.0) & (t > 0.0), t, INF)

    def normals(self, px, py, pz):
        cx, cy, cz = self.centre
        return _unit(px - cx, py - cy, pz - cz)


class Box:
    """Box with centre, half extents (hx, hy, hz) and a rotation of `yaw_deg` about the vertical axis."""

    kind = "box"
    __slots__ = ("centre", "half", "yaw_deg", "_cos", "_sin", "bound_centre", "bound_radius")

    def __init__(self, centre, half_extents, yaw_deg: float = 0.0):
        self.centre = tuple(float(x) for x in centre)
        self.half = tuple(float(x) for x in half_extents)
        self.yaw_deg = float(yaw_deg)
        self._sin, self._cos = sin_cos_deg(self.yaw_deg)
        self.bound_centre = self.centre
        hx, hy, hz = self.half
        self.bound_radius = math.sqrt(hx * hx + hy * hy + hz * hz)

    def _to_local(self, x, y, z):
        co, si = self._cos, self._sin
        return x * co + y * si, y * co - x * si, z

    def intersect(self, ox, oy, oz, dx, dy, dz):
        cx, cy, cz = self.centre
        lx, ly, lz = self._to_local(ox - cx, oy - cy, oz - cz)
        ex, ey, ez = self._to_local(dx, dy, dz)
        t_near = None
        t_far = None
        for l, e, h in ((lx, ex, self.half[0]), (ly, ey, self.half[1]), (lz, ez, self.half[2])):
            e = _safe_divisor(e)
            t1 = (-h - l) / e
            t2 = (h - l) / e
            lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
            t_near = lo if t_near is None else np.maximum(t_near, lo)
            t_far = hi if t_far is None else np.minimum(t_far, hi)
        return np.where((t_near <= t_far) & (t_near > 0.0), t_near, INF)

    def normals(self, px, py, pz):
        cx, cy, cz = self.centre
        lx, ly, lz = self._to_local(px - cx, py - cy, pz - cz)
        qx, qy, qz = np.abs(lx) / self.half[0], np.abs(ly) / self.half[1], np.abs(lz) / self.half[2]
        on_x = (qx >= qy) & (qx >= qz)
        on_y = ~on_x & (qy >= qz)
        on_z = ~on_x & ~on_y
        nlx = np.where(on_x, np.sign(lx), 0.0)
        nly = np.where(on_y, np.sign(ly), 0.0)
        nlz = np.where(on_z, np.sign(lz), 0.0)
        co, si = self._cos, self._sin
        return nlx * co - nly * si, nlx * si + nly * co, nlz


class Cylinder:
    """Vertical capped cylinder: axis through (cx, cy), from z0 to z1, radius r."""

    kind = "cylinder"
    __slots__ = ("cx", "cy", "z0", "z1", "radius", "bound_centre", "bound_radius")

    def __init__(self, base_centre, radius: float, height: float):
        self.cx, self.cy, self.z0 = (float(x) for x in base_centre)
        self.radius = float(radius)
        self.z1 = self.z0 + float(height)
        half_h = 0.5 * float(height)
        self.bound_centre = (self.cx, self.cy, self.z0 + half_h)
        self.bound_radius = math.sqrt(self.radius * self.radius + half_h * half_h)

    def intersect(self, ox, oy, oz, dx, dy, dz):
        px, py = ox - self.cx, oy - self.cy
        r2 = self.radius * self.radius
        a = dx * dx + dy * dy
        b = px * dx + py * dy
        c = px * px + py * py - r2
        disc = b * b - a * c
        a_safe = np.where(a > 0.0, a, 1.0)
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a_safe
        z_side = oz + t_side * dz
        side_ok = (a > 0.0) & (disc >= 0.0) & (t_side > 0.0) & (z_side >= self.z0) & (z_side <= self.z1)
        t = np.where(side_ok, t_side, INF)
        dz_safe = _safe_divisor(dz)
        for z_cap in (self.z0, self.z1):
            t_cap = (z_cap - oz) / dz_safe
            qx, qy = px + t_cap * dx, py + t_cap * dy
            cap_ok = (t_cap > 0.0) & (qx * qx + qy * qy <= r2)
            t = np.where(cap_ok & (t_cap < t), t_cap, t)
        return t

    def normals(self, px, py, pz):
        qx, qy = px - self.cx, py - self.cy
        radial = np.sqrt(qx * qx + qy * qy)
        # distance (in metres) to the side wall vs to the nearest cap: the smaller one is the face that was hit
        to_side = np.abs(radial - self.radius)
        to_top, to_bottom = np.abs(pz - self.z1), np.abs(pz - self.z0)
        on_top = (to_top < to_side) & (to_top <= to_bottom)
        on_bottom = (to_bottom < to_side) & ~on_top
        nx, ny, nz = _unit(qx, qy, np.zeros_like(qx))
        nz = np.where(on_top, 1.0, np.where(on_bottom, -1.0, nz))
        nx = np.where(on_top | on_bottom, 0.0, nx)
        ny = np.where(on_top | on_bottom, 0.0, ny)
        return nx, ny, nz


class Cone:
    """Vertical capped cone: base disc of radius r centred at (cx, cy, z0), apex at height z0 + h above it."""

    kind = "cone"
    __slots__ = ("cx", "cy", "z0", "z1", "radius", "_k2", "bound_centre", "bound_radius")

    def __init__(self, base_centre, radius: float, height: float):
        self.cx, self.cy, self.z0 = (float(x) for x in base_centre)
        self.radius = float(radius)
        self.z1 = self.z0 + float(height)
        k = self.radius / float(height)
        self._k2 = k * k
        half_h = 0.5 * float(height)
        self.bound_centre = (self.cx, self.cy, self.z0 + half_h)
        self.bound_radius = math.sqrt(self.radius * self.radius + half_h * half_h)

    def intersect(self, ox, oy, oz, dx, dy, dz):
        # points with x² + y² = k² (z1 - z)², z0 <= z <= z1 (the lower nappe), relative to the axis
        px, py, q0 = ox - self.cx, oy - self.cy, self.z1 - oz
        k2 = self._k2
        a = dx * dx + dy * dy - k2 * dz * dz
        b = px * dx + py * dy + k2 * q0 * dz
        c = px * px + py * py - k2 * q0 * q0
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        linear = np.abs(a) < 1e-12
        a_safe = np.where(linear, 1.0, a)
        b_safe = _safe_divisor(b)
        t = INF
        for root in ((-b - sq) / a_safe, (-b + sq) / a_safe):
            root = np.where(linear, -c / (2.0 * b_safe), root)
            z = oz + root * dz
            ok = (disc >= 0.0) & (root > 0.0) & (z >= self.z0) & (z <= self.z1)
            t = np.where(ok & (root < t), root, t)
        t_base = (self.z0 - oz) / _safe_divisor(dz)
        qx, qy = px + t_base * dx, py + t_base * dy
        base_ok = (t_base > 0.0) & (qx * qx + qy * qy <= self.radius * self.radius)
        return np.where(base_ok & (t_base < t), t_base, t)

    def normals(self, px, py, pz):
        qx, qy = px - self.cx, py - self.cy
        on_base = np.abs(pz - self.z0) < 1e-9 * max(1.0, abs(self.z1))
        nx, ny, nz = _unit(qx, qy, self._k2 * (self.z1 - pz))
        nz = np.where(on_base, -1.0, nz)
        nx = np.where(on_base, 0.0, nx)
        ny = np.where(on_base, 0.0, ny)
        return nx, ny, nz


class Capsule:
    """All points within `radius` of the segment a–b (limbs and torso of the figures)."""

    kind = "capsule"
    __slots__ = ("a", "b", "radius", "_ba", "_baba", "bound_centre", "bound_radius")

    def __init__(self, a, b, radius: float):
        self.a = tuple(float(x) for x in a)
        self.b = tuple(float(x) for x in b)
        self.radius = float(radius)
        self._ba = tuple(self.b[i] - self.a[i] for i in range(3))
        self._baba = self._ba[0] * self._ba[0] + self._ba[1] * self._ba[1] + self._ba[2] * self._ba[2]
        self.bound_centre = tuple(0.5 * (self.a[i] + self.b[i]) for i in range(3))
        self.bound_radius = 0.5 * math.sqrt(self._baba) + self.radius

    def _sphere_entry(self, cx, cy, cz, ox, oy, oz, dx, dy, dz, dd):
        px, py, pz = ox - cx, oy - cy, oz - cz
        b = px * dx + py * dy + pz * dz
        c = px * px + py * py + pz * pz - self.radius * self.radius
        disc = b * b - dd * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / dd
        return np.where((disc >= 0.0) & (t > 0.0), t, INF)

    def intersect(self, ox, oy, oz, dx, dy, dz):
        # union of three convex parts (open cylinder body + two end spheres): first entry = min of the entries
        bax, bay, baz = self._ba
        baba = self._baba
        ax, ay, az = self.a
        oax, oay, oaz = ox - ax, oy - ay, oz - az
        dd = dx * dx + dy * dy + dz * dz
        bard = bax * dx + bay * dy + baz * dz
        baoa = bax * oax + bay * oay + baz * oaz
        rdoa = dx * oax + dy * oay + dz * oaz
        oaoa = oax * oax + oay * oay + oaz * oaz
        qa = baba * dd - bard * bard
        qb = baba * rdoa - baoa * bard
        qc = baba * oaoa - baoa * baoa - self.radius * self.radius * baba
        disc = qb * qb - qa * qc
        qa_safe = np.where(qa > 0.0, qa, 1.0)
        t_body = (-qb - np.sqrt(np.maximum(disc, 0.0))) / qa_safe
        y = baoa + t_body * bard
        body_ok = (qa > 0.0) & (disc >= 0.0) & (t_body > 0.0) & (y > 0.0) & (y < baba)
        t = np.where(body_ok, t_body, INF)
        t = np.minimum(t, self._sphere_entry(*self.a, ox, oy, oz, dx, dy, dz, dd))
        return np.minimum(t, self._sphere_entry(*self.b, ox, oy, oz, dx, dy, dz, dd))

    def normals(self, px, py, pz):
        bax, bay, baz = self._ba
        ax, ay, az = self.a
        s = ((px - ax) * bax + (py - ay) * bay + (pz - az) * baz) / self._baba
        s = np.clip(s, 0.0, 1.0)
        return _unit(px - (ax + s * bax), py - (ay + s * bay), pz - (az + s * baz))
