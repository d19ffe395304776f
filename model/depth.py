"""Depth, one module for the renderer, the labelers and the evaluator (docs INTERFACES.md §4). Pure numpy.

Condition maps (what the model is trained on and generates) are relative inverse depth:

* `normalised_inverse_depth`: 1 / depth min–max normalised to [0, 1] over the valid pixels of one image (near = 1).
  Valid = finite and > 0; z-depth 0 is the renderer's "no surface" (sky).
* `depth_to_map`: the condition map in [0, 1]: valid pixels in [0.1, 1] (near = white), invalid pixels 0. The 0.1
  floor keeps the farthest surface apart from the sky, so a generated map still says where the sky is; the
  evaluator never looks at invalid pixels, so the floor costs nothing there (the affine fit absorbs it).
* `inverse_depth_to_map`: the same map from an inverse depth (a depth network's relative disparity, any scale);
  `depth_to_map` is it applied to 1 / depth, so a labeller's map and the exact renderer's are drawn by one function.
* `depth_map_to_uint8` / `depth_map_to_png8`: the 8-bit form a labeler writes (grayscale PNG).

Evaluation (`score_depth`) is affine-invariant, the protocol of Marigold-style relative depth evaluation: the
predicted map is fitted to the true inverse depth by least squares (scale and shift) on the valid pixels, turned into
depth, and scored with AbsRel and δ1 against the true depth. Every model and every baseline goes through it, so
their numbers compare like with like (a constant map scores as the best constant inverse depth, see `score_depth`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAP_FLOOR = 0.1  # the farthest valid pixel of a condition map; invalid pixels (sky) are 0
DELTA1_THRESHOLD = 1.25


def valid_depth(depth: np.ndarray) -> np.ndarray:
    """Pixels with a surface: finite depth > 0 (the renderer writes 0 for sky)."""
    depth = np.asarray(depth)
    return np.isfinite(depth) & (depth > 0)


def normalised_inverse_depth(depth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) depth -> inverse depth min–max normalised over `valid` to [0, 1] (near = 1), float64, 0 elsewhere.

    Independent of the depth's scale (metres or anything else). An image whose valid pixels all lie at one depth
    maps them to 1 (no near/far to tell apart: drawn as "near")."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = valid_depth(depth) if valid is None else np.asarray(valid, dtype=bool)
    out = np.zeros(depth.shape, dtype=np.float64)
    if not valid.any():
        return out
    inverse = 1.0 / depth[valid]
    lo, hi = inverse.min(), inverse.max()
    out[valid] = (inverse - lo) / (hi - lo) if hi > lo else 1.0
    return out


def depth_to_map(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth (0 = sky) -> condition map in [0, 1]: valid pixels in [MAP_FLOOR, 1] (near = white), sky 0."""
    return inverse_depth_to_map(inverse_depth(depth))


def inverse_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> 1 / depth (float64) where valid (finite, > 0), 0 elsewhere (no surface)."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = valid_depth(depth)
    inverse = np.zeros(depth.shape, dtype=np.float64)
    inverse[valid] = 1.0 / depth[valid]
    return inverse


def inverse_depth_to_map(inverse: np.ndarray) -> np.ndarray:
    """(H, W) inverse depth of any scale (a relative-depth network's disparity; 0 or less = no surface, sky) ->
    condition map in [0, 1]: min-max normalised over the valid (finite, > 0) pixels into [MAP_FLOOR, 1], near =
    white, invalid pixels 0."""
    inverse = np.asarray(inverse, dtype=np.float64)
    valid = np.isfinite(inverse) & (inverse > 0)
    out = np.zeros(inverse.shape, dtype=np.float64)
    if valid.any():
        lo, hi = inverse[valid].min(), inverse[valid].max()
        out[valid] = MAP_FLOOR + (1.0 - MAP_FLOOR) * ((inverse[valid] - lo) / (hi - lo) if hi > lo else 1.0)
    return out


def depth_map_to_uint8(depth_map: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> (H, W) uint8 (rounded, clipped): the 8-bit condition map."""
    return np.clip(np.round(np.asarray(depth_map, dtype=np.float64) * 255), 0, 255).astype(np.uint8)


def depth_map_to_png8(depth_map: np.ndarray) -> bytes:
    """A map in [0, 1] -> 8-bit grayscale PNG bytes, as labelers write condition maps."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(depth_map_to_uint8(depth_map), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DepthScore:
    """One image's score. abs_rel = mean |d̂ − d| / d; delta1 = fraction of pixels with max(d̂/d, d/d̂) < 1.25;
    scale, shift: the fit inverse depth ≈ scale · map + shift (scale 0 for a constant map)."""

    abs_rel: float
    delta1: float
    scale: float
    shift: float


def fit_scale_shift(predicted: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Least-squares (scale, shift) with scale · predicted + shift ≈ target (1-D arrays).

    A constant prediction carries no relative information: scale 0 and shift = mean(target), the best constant (a
    plain lstsq would return the same fitted values with an arbitrary minimum-norm split of scale and shift)."""
    predicted = predicted.astype(np.float64)
    centred = predicted - predicted.mean()
    spread = float(centred @ centred)
    if spread <= 1e-12 * max(1.0, float(predicted @ predicted)):
        return 0.0, float(target.mean())
    scale = float(centred @ (target - target.mean())) / spread
    return scale, float(target.mean() - scale * predicted.mean())


def score_depth(predicted_map: np.ndarray, true_depth: np.ndarray) -> DepthScore:
    """Score a predicted relative-inverse-depth map (any affine form of inverse depth: a condition map, a
    network's disparity, a baseline) against the true depth, on the pixels where that depth is valid.

    1. fit scale and shift so that scale · map + shift ≈ 1 / true depth (least squares, inverse-depth space);
    2. clip the fitted inverse depth from below at the image's smallest true inverse depth: a poor fit can go to 0 or
       negative, i.e. infinite or negative depth; clipped, a predicted depth is at most the farthest true depth of
       the image (the usual "max eval depth" cap, taken per image). Nearer-than-true errors need no clip: AbsRel of
       a too-near pixel is below 1;
    3. AbsRel and δ1 on depth (1 / fitted inverse depth) against the true depth.
    """
    true_depth = np.asarray(true_depth, dtype=np.float64)
    predicted_map = np.asarray(predicted_map, dtype=np.float64)
    if predicted_map.shape != true_depth.shape:
        raise ValueError(f"predicted map {predicted_map.shape} and true depth {true_depth.shape} differ in shape")
    valid = valid_depth(true_depth) & np.isfinite(predicted_map)
    if not valid.any():
        raise ValueError("score_depth: no pixel has a valid true depth (finite, > 0)")
    depth = true_depth[valid]
    inverse = 1.0 / depth
    scale, shift = fit_scale_shift(predicted_map[valid], inverse)
    fitted = np.maximum(scale * predicted_map[valid] + shift, inverse.min())
    estimate = 1.0 / fitted
    ratio = np.maximum(estimate / depth, depth / estimate)
    return DepthScore(abs_rel=float(np.mean(np.abs(estimate - depth) / depth)),
                      delta1=float(np.mean(ratio < DELTA1_THRESHOLD)), scale=scale, shift=shift)


# ---------------------------------------------------------------------------------------------------------------------
# Baselines: maps that know nothing (constant) or only the layout of a ground-plane scene (vertical ramp)
# ---------------------------------------------------------------------------------------------------------------------

def constant_map(shape: tuple[int, int]) -> np.ndarray:
    """No depth knowledge: after the fit, every pixel at the least-squares constant inverse depth."""
    return np.zeros(shape, dtype=np.float64)


def vertical_ramp_map(shape: tuple[int, int]) -> np.ndarray:
    """"Closer at the bottom": 0 at the top row to 1 at the bottom row. Seen by a pinhole camera without roll, the
    inverse depth of a ground plane is affine in the image row, so after the fit this is the exact depth of the bare
    ground: what a model must beat to show it sees the objects, not only the floor."""
    height, width = shape
    return np.repeat(np.linspace(0.0, 1.0, height)[:, None], width, axis=1)
