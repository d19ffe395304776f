"""Aspect-ratio bucketing of a whole `Sample`: the image and every label cut and resized to one bucket size together.

The model trains on the release's aspect-ratio buckets (model.images.ASPECT_RATIO_{256,512,1024}); an image is
brought to its bucket by the release's centre crop + bilinear resize (model.images.center_crop_resize, the path the
inference pipeline takes, recomputed here in float64 for bytes that do not depend on the machine). Its labels must
follow the same geometry or they stop describing the picture, so `bucket_sample` applies the one crop box
(model.images.center_crop_box) to everything:

* image: the same crop and bilinear resize in float64 numpy, rounded to uint8: within one level of
  center_crop_resize, and byte-identical on every machine and thread count (torch's float32 kernel is not);
* depth, instance, semantic: the same box, nearest-neighbour resize (pixel-centre sampling, the `nearest-exact` rule),
  so ids stay ids that existed and invalid depth (0) stays 0;
* keypoints: continuous pixel coordinates moved by the crop offset and scaled by the resize factors (the mapping
  bilinear resizing with align_corners=False applies to pixel centres); a point that leaves the crop gets
  visibility 0 and coordinates (0, 0), as absent COCO points have;
* entities' bbox_2d: the box of the entity's pixels in the resized instance map (model.conditions.mask_box), so a
  box map always equals its masks' boxes; a sample without an instance map (or an entity not in it) maps the box the
  same way as keypoints, widened to whole pixels and clipped; None when nothing is left;
* faces' bbox_2d: mapped as an entity's box without a mask; a face the crop cut away is left out;
* camera: K's principal point shifted by the crop offset, focal lengths and principal point scaled by the resize
  factors, width / height updated; the pose (c2w_opengl, w2c_opencv) is untouched, a crop does not move the camera.

Everything else (key, source, captions, classes, group, meta, depth_kind, the other entity fields) is copied as is.
Entity fields measured on the old pixels (e.g. the synthetic source's `pixels` count and `visible` flag) are not
recomputed: they describe the full-frame render.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from model.images import center_crop_box, closest_aspect_bucket
from pipelines.record import Sample

# Box edges mapped into the new image land on fractional pixels; this much float error is not taken as a pixel more
# when they are widened to whole pixels (floor / ceil).
_EDGE_TOLERANCE = 1e-6


def bucket_for(sample_or_hw: Sample | tuple[int, int], resolution: int = 512) -> tuple[int, int]:
    """(height, width) of the release's aspect-ratio bucket at `resolution` (256, 512 or 1024) nearest to a
    sample's image or to a (height, width) pair: model.images.closest_aspect_bucket."""
    if isinstance(sample_or_hw, Sample):
        height, width = sample_or_hw.image.shape[:2]
    else:
        try:
            height, width = (int(v) for v in sample_or_hw)
        except (TypeError, ValueError):
            raise ValueError(f"bucket_for: give a Sample or a (height, width) pair, got {sample_or_hw!r}.") from None
    return closest_aspect_bucket(int(height), int(width), resolution)


def bucket_sample(sample: Sample, height: int, width: int) -> Sample:
    """A new `Sample` at exactly height × width: the release's centre crop + resize applied to the image and,
    with the identical crop box, to every label (see the module docstring). The input is validated first and left
    unchanged; the result passes `Sample.validate()`."""
    sample.validate()
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"bucket_sample {sample.key!r}: target size must be positive, got {height}x{width} (HxW); "
                         "take it from bucket_for(sample, resolution).")
    in_h, in_w = sample.image.shape[:2]
    box = center_crop_box(in_h, in_w, height, width)
    top, left, crop_h, crop_w = box
    scale_x, scale_y = width / crop_w, height / crop_h

    def labels(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else _nearest_resize(array, box, height, width)

    instance = labels(sample.instance)
    return Sample(
        key=sample.key,
        source=sample.source,
        image=_resize_image(sample.image, height, width),
        captions=dict(sample.captions),
        depth=labels(sample.depth),
        depth_kind=sample.depth_kind,
        instance=instance,
        semantic=labels(sample.semantic),
        classes=list(sample.classes) if sample.classes is not None else None,
        entities=_map_entities(sample.entities, left, top, scale_x, scale_y, height, width, instance,
                               None if sample.instance is None else set(np.unique(sample.instance).tolist())),
        keypoints=_map_keypoints(sample.keypoints, box, scale_x, scale_y),
        faces=_map_faces(sample.faces, left, top, scale_x, scale_y, height, width),
        camera=_map_camera(sample.camera, left, top, scale_x, scale_y, height, width),
        group=sample.group,
        meta=copy.deepcopy(sample.meta),
    ).validate()


def _resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The pipeline's centre crop + bilinear resize (align_corners=False, no antialiasing) of a uint8 image, rounded
    back to uint8, computed in float64 numpy rather than through torch: torch's float32 kernel changes its
    vectorised/scalar split with the thread count, which moved a few pixels by one level between a Ray worker (one
    thread) and a two-thread process, so a rebuild was not byte-identical. Each float64 numpy operation is rounded
    on its own (no fused multiply-add), so these bytes are the same on every machine and thread count; they are
    within one level of `center_crop_resize` (tests/test_bucket.py)."""
    top, left, crop_h, crop_w = center_crop_box(*image.shape[:2], height, width)
    rows0, rows1, row_weight = _bilinear_taps(crop_h, height)
    cols0, cols1, col_weight = _bilinear_taps(crop_w, width)
    crop = image[top:top + crop_h, left:left + crop_w]
    upper, lower = crop[rows0].astype(np.float64), crop[rows1].astype(np.float64)  # only the rows the output reads
    rows = upper + (lower - upper) * row_weight[:, None, None]
    left_taps = rows[:, cols0]
    resized = left_taps + (rows[:, cols1] - left_taps) * col_weight[None, :, None]
    return np.ascontiguousarray(np.clip(np.round(resized), 0, 255).astype(np.uint8))


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source index, second, weight of the second) of each output index: PyTorch's align_corners=False rule,
    source = (i + 0.5) * size_in / size_out - 0.5 clamped at 0."""
    source = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    first = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    return first, np.minimum(first + 1, size_in - 1), source - first


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output index for a nearest resize of size_in -> size_out, sampled at pixel centres:
    floor((i + 0.5) * size_in / size_out), in exact integer arithmetic."""
    i = np.arange(size_out, dtype=np.int64)
    return np.minimum((2 * i + 1) * size_in // (2 * size_out), size_in - 1)


def _nearest_resize(array: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    top, left, crop_h, crop_w = box
    rows = top + _nearest_indices(crop_h, height)
    cols = left + _nearest_indices(crop_w, width)
    return np.ascontiguousarray(array[rows[:, None], cols[None, :]])


def _map_keypoints(keypoints: np.ndarray | None, box: tuple[int, int, int, int], scale_x: float,
                   scale_y: float) -> np.ndarray | None:
    if keypoints is None:
        return None
    top, left, crop_h, crop_w = box
    points = keypoints.astype(np.float64)
    x, y = points[..., 0] - left, points[..., 1] - top
    inside = (points[..., 2] > 0) & (x >= 0) & (x < crop_w) & (y >= 0) & (y < crop_h)
    out = np.zeros(keypoints.shape, dtype=np.float32)
    out[..., 0] = np.where(inside, x * scale_x, 0.0)
    out[..., 1] = np.where(inside, y * scale_y, 0.0)
    out[..., 2] = np.where(inside, points[..., 2], 0.0)
    return out


def _map_box(box: Any, left: int, top: int, scale_x: float, scale_y: float, height: int,
             width: int) -> list[int] | None:
    """[x0, y0, x1, y1) in the old image -> the smallest whole-pixel box covering it in the new one, clipped; None
    when the crop cut it away."""
    if box is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    nx0 = max(math.floor((x0 - left) * scale_x + _EDGE_TOLERANCE), 0)
    ny0 = max(math.floor((y0 - top) * scale_y + _EDGE_TOLERANCE), 0)
    nx1 = min(math.ceil((x1 - left) * scale_x - _EDGE_TOLERANCE), width)
    ny1 = min(math.ceil((y1 - top) * scale_y - _EDGE_TOLERANCE), height)
    return [nx0, ny0, nx1, ny1] if nx1 > nx0 and ny1 > ny0 else None


def _map_entities(entities: list[dict[str, Any]] | None, left: int, top: int, scale_x: float, scale_y: float,
                  height: int, width: int, instance: np.ndarray | None = None,
                  ids: set[int] | None = None) -> list[dict[str, Any]] | None:
    """`ids`: the entity ids of the original instance map; an entity among them takes the box of its resized mask."""
    if entities is None:
        return None
    from model.conditions import mask_box

    out = []
    for entity in entities:
        entity = copy.deepcopy(entity)
        if "bbox_2d" in entity and entity["bbox_2d"] is not None and ids and entity["id"] in ids:
            box = mask_box(instance == entity["id"])
            entity["bbox_2d"] = None if box is None else list(box)
        elif "bbox_2d" in entity:
            entity["bbox_2d"] = _map_box(entity["bbox_2d"], left, top, scale_x, scale_y, height, width)
        out.append(entity)
    return out


def kept_share(box: Any, image_hw: tuple[int, int], bucket_hw: tuple[int, int]) -> float:
    """The share of a box's area [x0, y0, x1, y1) in an image of `image_hw` that the centre crop to `bucket_hw`
    keeps (the faces stage's check that a group's bucket leaves a picture's face whole)."""
    top, left, crop_h, crop_w = center_crop_box(*image_hw, *bucket_hw)
    x0, y0, x1, y1 = (float(v) for v in box)
    inside_w = max(0.0, min(x1, left + crop_w) - max(x0, left))
    inside_h = max(0.0, min(y1, top + crop_h) - max(y0, top))
    area = (x1 - x0) * (y1 - y0)
    return inside_w * inside_h / area if area > 0 else 0.0


def _map_faces(faces: list[dict[str, Any]] | None, left: int, top: int, scale_x: float, scale_y: float,
               height: int, width: int) -> list[dict[str, Any]] | None:
    """Face boxes mapped as entity boxes are; a face the crop cut away is left out."""
    if faces is None:
        return None
    mapped = [{**face, "bbox_2d": _map_box(face["bbox_2d"], left, top, scale_x, scale_y, height, width)}
              for face in faces]
    return [face for face in mapped if face["bbox_2d"] is not None]


def _map_camera(camera: dict[str, Any] | None, left: int, top: int, scale_x: float, scale_y: float, height: int,
                width: int) -> dict[str, Any] | None:
    """K' = diag(sx, sy, 1) · [[1, 0, -left], [0, 1, -top], [0, 0, 1]] · K, written out row by row (elementwise,
    no BLAS, so the same bits on every machine, like pipelines/sources/synthetic_camera.py's matrices)."""
    if camera is None:
        return None
    out = copy.deepcopy(camera)
    k = np.array(camera["K"], dtype=np.float64)
    new_k = k.copy()
    new_k[0] = scale_x * (k[0] - left * k[2])
    new_k[1] = scale_y * (k[1] - top * k[2])
    out["K"] = new_k
    out["width"], out["height"] = width, height
    return out


__all__ = ["bucket_for", "bucket_sample"]
