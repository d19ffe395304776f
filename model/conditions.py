"""Condition maps: one renderer per condition format, each an (H, W, 3) uint8 RGB picture (or a bool mask).

These maps are what the data build writes as PNG next to each image, what the labelers (models that estimate a
condition from a picture) must produce, and what evaluation compares a generated condition with. Keeping one function
per format in one module means the three can never disagree about what, say, a "pose" map looks like: a map the model
is trained on, a labeler's output and the evaluator's reference come from the same code. Everything is deterministic:
the same inputs (and the same seeded `np.random.Generator` where there is randomness) give the same bytes.

    view role (model/tasks.py)  renderer               map
    canny                       canny_map              white (255) edges on black, cv2.Canny on the grayscale image
    blurred_image               blur_image             the image under a Gaussian blur, sigma (and the kernel size)
                                                       drawn from ranges
    masked_image                inpaint_mask +         the image with the hole painted grey (128, 128, 128) exactly
                                masked_image
    depth                       depth_condition        grayscale inverse depth, near = white, sky 0 (model/depth.py);
                                inverse_depth_         the same from a depth network's relative inverse depth
                                condition
    semantic_map                semantic_condition     each class in its prompt colour, unprompted classes black
    instance                    instance_condition     each entity id in its colour, others black (not a task view)
    bounding_boxes              box_condition          box outlines in the prompt colours on black (mask_box: the
                                                       box of an entity's mask, as every source and labeller draws)
    pose                        pose_condition         OpenPose-style COCO-17 skeleton on black

Conventions shared with pipelines/record.py: images are (H, W, 3) uint8 RGB; boxes are half-open pixel boxes
[x0, y0, x1, y1) (the `bbox_2d` of an entity), drawn inside their bounds; keypoints are (P, 17, 3) COCO-17 (x, y, v)
in continuous pixel coordinates (pixel (row i, column j) covers [j, j+1) x [i, i+1)), visibility 0 = absent;
colours are '#RRGGBB' hex (the prompt palette, model.tasks.PALETTE), a palette name, or an (r, g, b) tuple.

Pure numpy + PIL; OpenCV (opencv-python-headless) is imported only by the functions that need it (Canny, Gaussian
blur, thick mask strokes), so importing this module stays cheap. model/ never imports pipelines/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from model.depth import depth_map_to_uint8, depth_to_map, inverse_depth_to_map
from model.tasks import PALETTE

MASK_FILL = (128, 128, 128)  # the release's inpainting convention: the hole is grey, not black

# COCO's 19 limbs between the 17 keypoints, 0-based (the same list as pipelines/sources/synthetic_scene.COCO_SKELETON,
# copied because model/ must not import pipelines/; a test holds them equal).
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9), (8, 10),
    (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)
# OpenPose's 18 body colours (what ControlNet-style pose maps use), one per limb in COCO_SKELETON order plus a grey for
# the 19th limb; the contact sheet draws its skeletons with the same colours.
LIMB_COLOURS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (200, 200, 200),
)
# Joint j is drawn in OpenPose colour j (the first 17 of the 18).
JOINT_COLOURS: tuple[tuple[int, int, int], ...] = LIMB_COLOURS[:17]
NUM_KEYPOINTS = 17

Colour = Any  # '#RRGGBB' | palette name | (r, g, b) | {"hex": '#RRGGBB', ...} (Sample.meta's prompt colours)


# ----------------------------------------------------------------------------------------------------------------------
# Colours and input checks
# ----------------------------------------------------------------------------------------------------------------------


def hex_to_rgb(hex_colour: str) -> tuple[int, int, int]:
    """'#RRGGBB' (or 'RRGGBB', any case) -> (r, g, b) in 0..255."""
    text = hex_colour[1:] if isinstance(hex_colour, str) and hex_colour.startswith("#") else hex_colour
    if not isinstance(text, str) or len(text) != 6 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ValueError(f"colour {hex_colour!r} is not a hex colour; write it as '#RRGGBB', e.g. '#00FFFF'.")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def colour_rgb(colour: Colour) -> tuple[int, int, int]:
    """Any colour form this module takes -> (r, g, b): '#RRGGBB', a prompt palette name ('cyan'), an (r, g, b)
    tuple of 0..255 integers, or a {"hex": ...} dict as `Sample.meta["prompts"]["class_colours"]` stores them."""
    if isinstance(colour, Mapping) and "hex" in colour:
        return hex_to_rgb(colour["hex"])
    if isinstance(colour, str):
        return hex_to_rgb(PALETTE[colour]) if colour in PALETTE else hex_to_rgb(colour)
    try:
        rgb = tuple(int(c) for c in colour)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"colour {colour!r}: give '#RRGGBB', a palette name ({', '.join(PALETTE)}) or an "
                         "(r, g, b) tuple of 0..255 integers.")
    return rgb  # type: ignore[return-value]


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"{name}: expected a non-empty (H, W, 3) uint8 RGB array, got {image.dtype} of shape "
                         f"{image.shape}; convert with np.asarray(PIL_image.convert('RGB')).")
    return image


def _check_shape(shape_hw: Sequence[int], name: str = "shape_hw") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in tuple(shape_hw)[:2])
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected (height, width), got {shape_hw!r}.") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name}: height and width must be positive, got {shape_hw!r}.")
    return h, w


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)) or an int seed, got "
                    f"{type(rng).__name__}.")


def _blank(shape_hw: Sequence[int]) -> np.ndarray:
    h, w = _check_shape(shape_hw)
    return np.zeros((h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------------
# Image-derived conditions: canny, blur, inpainting
# ----------------------------------------------------------------------------------------------------------------------


def canny_map(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """Canny edges of `image` (cv2.Canny with its defaults, aperture 3, L1 gradient, on the RGB2GRAY image) as white
    (255, 255, 255) on black, (H, W, 3) uint8: the canny2image condition."""
    import cv2

    image = _check_image(image)
    if not 0 <= low <= high:
        raise ValueError(f"canny_map: need 0 <= low <= high, got low={low}, high={high}.")
    edges = cv2.Canny(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY), float(low), float(high))
    return np.repeat(edges[..., None], 3, axis=2)


def blur_image(image: np.ndarray, rng: np.random.Generator | int, sigma_range: tuple[float, float] = (1.0, 3.0),
               kernel_range: tuple[int, int] | None = None) -> tuple[np.ndarray, float, int]:
    """(blurred uint8 image, sigma, kernel size): a Gaussian blur with sigma drawn uniformly from `sigma_range` (one
    `rng.uniform` call), then an odd kernel size drawn uniformly among the odd sizes in `kernel_range` (one
    `rng.integers` call; the Real-ESRGAN degradation recipe: a kernel smaller than 6 sigma truncates the Gaussian,
    which is part of the variety), or derived by OpenCV from sigma when `kernel_range` is None (ksize (0, 0));
    reflected borders. The deblurring task's condition; sigma and size are returned so the build can record them."""
    import cv2

    image = _check_image(image)
    lo, hi = (float(v) for v in sigma_range)
    if not 0 < lo <= hi:
        raise ValueError(f"blur_image: sigma_range must be (low, high) with 0 < low <= high, got {sigma_range!r}.")
    rng = _as_rng(rng)
    sigma = float(rng.uniform(lo, hi))
    ksize = 0
    if kernel_range is not None:
        k_lo, k_hi = (int(v) for v in kernel_range)
        if not (1 <= k_lo <= k_hi and k_lo % 2 == 1 and k_hi % 2 == 1):
            raise ValueError(f"blur_image: kernel_range must be odd sizes (low, high) with 1 <= low <= high, got "
                             f"{kernel_range!r}.")
        ksize = k_lo + 2 * int(rng.integers(0, (k_hi - k_lo) // 2 + 1))
    blurred = cv2.GaussianBlur(np.ascontiguousarray(image), (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                               borderType=cv2.BORDER_REFLECT)
    if not ksize:  # what OpenCV derived for uint8 images: round(sigma * 3 * 2 + 1) | 1
        ksize = int(round(sigma * 6 + 1)) | 1
    return blurred, sigma, ksize


MASK_SHAPES = ("rectangle", "rectangles", "strokes")


def inpaint_mask(shape_hw: Sequence[int], rng: np.random.Generator | int, min_fraction: float = 0.1,
                 max_fraction: float = 0.5, shapes: Sequence[str] = MASK_SHAPES) -> np.ndarray:
    """A seeded random hole, (H, W) bool (True = masked), covering a fraction of the pixels in
    [min_fraction, max_fraction] (exactly: counted in whole pixels).

    The shape is drawn first among `shapes`: "rectangle" (one), "rectangles" (2-4), or "strokes" (one or two
    rectangles plus thick random strokes: the free-form holes of inpainting training). Shapes aim at a coverage drawn
    uniformly in the range; overlaps or clipping that leave it short grow the mask by one-pixel dilations, and a mask
    over the top is trimmed from its last pixels in raster order, so the fraction always lands in range whatever the
    image size."""
    h, w = _check_shape(shape_hw)
    if not 0 < min_fraction <= max_fraction <= 1:
        raise ValueError(f"inpaint_mask: need 0 < min_fraction <= max_fraction <= 1, got {min_fraction}, "
                         f"{max_fraction}.")
    total = h * w
    lo_px, hi_px = math.ceil(min_fraction * total - 1e-9), math.floor(max_fraction * total + 1e-9)
    if lo_px > hi_px:
        raise ValueError(f"inpaint_mask: a {h}x{w} image has no whole pixel count in [{min_fraction}, {max_fraction}] "
                         "of its area; widen the range or use a larger image.")
    unknown = sorted(set(shapes) - set(MASK_SHAPES))
    if unknown or not shapes:
        raise ValueError(f"inpaint_mask: shapes must be a non-empty list of {list(MASK_SHAPES)}, got {list(shapes)}.")
    shapes = sorted(set(shapes), key=MASK_SHAPES.index)  # the draw depends on the set, not on how it was listed
    rng = _as_rng(rng)
    target_px = min(max(round(float(rng.uniform(min_fraction, max_fraction)) * total), lo_px), hi_px)
    style = shapes[int(rng.integers(len(shapes)))]
    mask = np.zeros((h, w), dtype=bool)
    if style == "rectangle":
        _add_rectangle(mask, rng, target_px)
    elif style == "rectangles":
        count = int(rng.integers(2, 5))
        for _ in range(count):
            _add_rectangle(mask, rng, target_px / count)
    else:
        for _ in range(int(rng.integers(1, 3))):
            _add_rectangle(mask, rng, target_px / 4)
        _add_strokes(mask, rng, target_px)
    while int(mask.sum()) < target_px:
        mask = _dilate(mask)
    excess = int(mask.sum()) - hi_px
    if excess > 0:
        flat = mask.reshape(-1)  # a view: trimming writes into mask
        flat[np.flatnonzero(flat)[-excess:]] = False
    return mask


def _add_rectangle(mask: np.ndarray, rng: np.random.Generator, area: float) -> None:
    h, w = mask.shape
    aspect = math.exp(float(rng.uniform(math.log(0.5), math.log(2.0))))  # height / width in [1/2, 2]
    rect_h = min(max(int(round(math.sqrt(max(area, 1.0) * aspect))), 1), h)
    rect_w = min(max(int(round(max(area, 1.0) / rect_h)), 1), w)
    top, left = int(rng.integers(0, h - rect_h + 1)), int(rng.integers(0, w - rect_w + 1))
    mask[top:top + rect_h, left:left + rect_w] = True


def _add_strokes(mask: np.ndarray, rng: np.random.Generator, target_px: int, max_strokes: int = 8) -> None:
    """Thick random polylines (cv2.line, 8-connected, integer vertices: deterministic) until the target is reached."""
    import cv2

    h, w = mask.shape
    canvas = mask.astype(np.uint8)
    for _ in range(max_strokes):
        if int(canvas.sum()) >= target_px:
            break
        thickness = max(1, int(round(min(h, w) * float(rng.uniform(0.03, 0.08)))))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        for _ in range(int(rng.integers(2, 6))):
            angle = float(rng.uniform(0.0, 2.0 * math.pi))
            length = float(rng.uniform(0.1, 0.4)) * max(h, w)
            nx = min(max(int(round(x + length * math.cos(angle))), 0), w - 1)
            ny = min(max(int(round(y + length * math.sin(angle))), 0), h - 1)
            cv2.line(canvas, (x, y), (nx, ny), 1, thickness)
            x, y = nx, ny
    mask |= canvas.astype(bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One step of 4-neighbour dilation; grows any non-empty, non-full mask by at least one pixel."""
    if not mask.any():
        mask = mask.copy()
        mask[mask.shape[0] // 2, mask.shape[1] // 2] = True
        return mask
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of `image` with the `mask` pixels (True) set to exactly (128, 128, 128): the inpainting condition."""
    image = _check_image(image)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != image.shape[:2]:
        raise ValueError(f"masked_image: mask must be bool of shape {image.shape[:2]} (the image's H, W), got "
                         f"{mask.dtype} of shape {mask.shape}; build it with inpaint_mask(image.shape[:2], rng).")
    out = image.copy()
    out[mask] = MASK_FILL
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Label-derived conditions: depth, semantic, instance, boxes, pose
# ----------------------------------------------------------------------------------------------------------------------


def depth_condition(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth (0 = sky) -> (H, W, 3) uint8: model.depth's 8-bit condition map (inverse depth min-max
    normalised, near = white, sky 0) repeated to three channels. model/depth.py owns the maths."""
    depth = np.asarray(depth)
    if depth.ndim != 2 or 0 in depth.shape:
        raise ValueError(f"depth_condition: expected a non-empty (H, W) depth array, got shape {depth.shape}.")
    return np.repeat(depth_map_to_uint8(depth_to_map(depth))[..., None], 3, axis=2)


def inverse_depth_condition(inverse: np.ndarray) -> np.ndarray:
    """(H, W) inverse depth of any scale (a depth labeller's relative disparity; <= 0 = sky) -> the same (H, W, 3)
    uint8 map as `depth_condition` draws from true depth: one drawing whatever made the label."""
    inverse = np.asarray(inverse)
    if inverse.ndim != 2 or 0 in inverse.shape:
        raise ValueError(f"inverse_depth_condition: expected a non-empty (H, W) array, got shape {inverse.shape}.")
    return np.repeat(depth_map_to_uint8(inverse_depth_to_map(inverse))[..., None], 3, axis=2)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The half-open pixel box [x0, y0, x1, y1) of a (H, W) bool mask's True pixels (None when it has none): an
    entity's `bbox_2d`, whether a renderer, the bucket resize or a segmentation labeller made its mask."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def semantic_condition(semantic: np.ndarray, classes: Sequence[str],
                       class_colours: Mapping[str, Colour]) -> np.ndarray:
    """(H, W) class ids (indices into `classes`) -> (H, W, 3) uint8 with each class painted in
    `class_colours[class]` ('#00FFFF', ...); classes without a colour are black. The semanticmap2image condition:
    the prompt names the coloured classes (`<#00FFFF cyan mask: dragon>`), everything else stays black."""
    semantic = np.asarray(semantic)
    if semantic.ndim != 2 or not np.issubdtype(semantic.dtype, np.integer):
        raise ValueError(f"semantic_condition: expected an (H, W) integer id map, got {semantic.dtype} of shape "
                         f"{semantic.shape}.")
    if semantic.size and (int(semantic.min()) < 0 or int(semantic.max()) >= len(classes)):
        raise ValueError(f"semantic_condition: ids must index `classes` (0..{len(classes) - 1}); got ids in "
                         f"[{int(semantic.min())}, {int(semantic.max())}]. Pass the sample's full class list.")
    table = np.zeros((max(len(classes), 1), 3), dtype=np.uint8)
    for index, name in enumerate(classes):
        if name in class_colours:
            table[index] = colour_rgb(class_colours[name])
    return table[semantic]


def instance_condition(instance: np.ndarray, entity_colours: Mapping[int, Colour]) -> np.ndarray:
    """(H, W) instance ids (0 = background) -> (H, W, 3) uint8, entity id `i` in `entity_colours[i]`, ids without a
    colour (and the background, unless given one) black."""
    instance = np.asarray(instance)
    if instance.ndim != 2 or not np.issubdtype(instance.dtype, np.integer):
        raise ValueError(f"instance_condition: expected an (H, W) integer id map, got {instance.dtype} of shape "
                         f"{instance.shape}.")
    out = np.zeros(instance.shape + (3,), dtype=np.uint8)
    for entity_id, colour in entity_colours.items():
        out[instance == int(entity_id)] = colour_rgb(colour)
    return out


def draw_box_outlines(canvas: np.ndarray, boxes: Sequence[Sequence[float]], colours: Sequence[Colour],
                      width: int = 2) -> np.ndarray:
    """A copy of `canvas` ((H, W, 3) uint8) with each [x0, y0, x1, y1) box outlined `width` pixels thick inside its
    bounds (a box thinner than 2 * width is filled), later boxes over earlier ones, clipped to the canvas.

    Coordinates are rounded to whole pixels (box edges lie on pixel edges). For width 1 this is exactly PIL's
    `ImageDraw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=..., width=1)` on boxes at least 2 pixels tall; on a
    1-pixel-tall box PIL also paints the row below it, outside the box, which this does not."""
    out = _check_image(canvas, "canvas").copy()
    if len(boxes) != len(colours):
        raise ValueError(f"draw_box_outlines: {len(boxes)} boxes but {len(colours)} colours; give one colour per box.")
    if int(width) < 1:
        raise ValueError(f"draw_box_outlines: width must be >= 1 pixel, got {width}.")
    h, w = out.shape[:2]
    for box, colour in zip(boxes, colours):
        if len(box) != 4:
            raise ValueError(f"draw_box_outlines: box {box!r} must be [x0, y0, x1, y1).")
        x0, y0, x1, y1 = (math.floor(float(v) + 0.5) for v in box)
        if x1 <= x0 or y1 <= y0:
            continue  # empty box: nothing to outline
        rgb = colour_rgb(colour)
        t = int(width)
        bands = ((y0, min(y0 + t, y1), x0, x1), (max(y1 - t, y0), y1, x0, x1),
                 (y0, y1, x0, min(x0 + t, x1)), (y0, y1, max(x1 - t, x0), x1))
        for r0, r1, c0, c1 in bands:
            r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
            if r1 > r0 and c1 > c0:
                out[r0:r1, c0:c1] = rgb
    return out


def box_condition(shape_hw: Sequence[int], boxes: Sequence[Sequence[float]], colours: Sequence[Colour],
                  width: int = 2) -> np.ndarray:
    """Outlined [x0, y0, x1, y1) boxes on black, (H, W, 3) uint8, one colour per box, later boxes over earlier
    ones (`draw_box_outlines`): the boundingbox2image condition (`<#00FFFF cyan boundingbox: head>`)."""
    return draw_box_outlines(_blank(shape_hw), boxes, colours, width)


def pose_line_width(shape_hw: Sequence[int]) -> int:
    """The default limb width and joint radius of `pose_condition`: max(1, round(min(H, W) / 128)), so a skeleton
    looks the same at every resolution (4 pixels at 512, as OpenPose maps for ControlNet)."""
    h, w = _check_shape(shape_hw)
    return max(1, int(min(h, w) / 128 + 0.5))


def pose_condition(shape_hw: Sequence[int], keypoints: np.ndarray, line_width: int | None = None,
                   joint_radius: int | None = None) -> np.ndarray:
    """OpenPose/ControlNet-style skeletons of (P, 17, 3) COCO-17 keypoints on black, (H, W, 3) uint8: the
    pose2image condition.

    Every limb of `COCO_SKELETON` whose two joints are visible (v > 0) is a `line_width` line in `LIMB_COLOURS`; then
    every visible joint is a filled disc of `joint_radius` in `JOINT_COLOURS` (all people's limbs first, then all
    joints, so joints sit on top). Joints with v = 0 draw nothing. Keypoints are continuous pixel coordinates and
    drawn at the pixel they fall in (floor), so the output is a pure function of the integer pixels (PIL ImageDraw)."""
    from PIL import Image, ImageDraw

    h, w = _check_shape(shape_hw)
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"pose_condition: keypoints must be (P, 17, 3) COCO-17 (x, y, visibility), got shape "
                         f"{keypoints.shape}.")
    visible = keypoints[..., 2] > 0
    if not np.isfinite(keypoints[..., :2][visible]).all():
        raise ValueError("pose_condition: a visible keypoint (v > 0) has a NaN/inf coordinate; set its visibility "
                         "to 0 or fix the coordinate.")
    lw = pose_line_width((h, w)) if line_width is None else int(line_width)
    radius = lw if joint_radius is None else int(joint_radius)
    if lw < 1 or radius < 0:
        raise ValueError(f"pose_condition: line_width must be >= 1 and joint_radius >= 0, got {lw}, {radius}.")
    pixels = np.floor(np.where(visible[..., None], keypoints[..., :2], 0.0)).astype(np.int64)
    canvas = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for person, seen in zip(pixels, visible):
        for (a, b), colour in zip(COCO_SKELETON, LIMB_COLOURS):
            if seen[a] and seen[b]:
                draw.line([(int(person[a, 0]), int(person[a, 1])), (int(person[b, 0]), int(person[b, 1]))],
                          fill=colour, width=lw)
    for person, seen in zip(pixels, visible):
        for j in np.flatnonzero(seen):
            x, y = int(person[j, 0]), int(person[j, 1])
            if radius:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=JOINT_COLOURS[j])
            else:  # PIL draws no ellipse of a zero-size box
                draw.point((x, y), fill=JOINT_COLOURS[j])
    return np.asarray(canvas).copy()


# The renderer of each condition format, by the view role it fills in model/tasks.py ("instance" is no task view, kept
# for labelers and evaluation). Signatures differ by what a format is made from; see the module docstring's table.
CONDITION_RENDERERS: Mapping[str, Callable[..., Any]] = MappingProxyType({
    "canny": canny_map,
    "blurred_image": blur_image,
    "masked_image": masked_image,
    "depth": depth_condition,
    "semantic_map": semantic_condition,
    "instance": instance_condition,
    "bounding_boxes": box_condition,
    "pose": pose_condition,
})

__all__ = [
    "COCO_SKELETON", "CONDITION_RENDERERS", "JOINT_COLOURS", "LIMB_COLOURS", "MASK_FILL", "MASK_SHAPES", "blur_image",
    "box_condition", "canny_map", "colour_rgb", "depth_condition", "draw_box_outlines", "hex_to_rgb", "inpaint_mask",
    "instance_condition", "masked_image", "pose_condition", "pose_line_width", "semantic_condition",
]
