"""Contact sheets: a grid of samples with their labels drawn as pictures (RGB | depth | segmentation | pose).

Also the small drawing helpers behind it, usable on any `Sample`:

* `colourise_depth`: inverse depth, min–max normalised over valid pixels, reversed Spectral colour map (near = red,
  far = blue), invalid pixels black: a display for looking at labels. The normalisation is
  `model.depth.normalised_inverse_depth`, shared with the grayscale condition maps (`model.depth.depth_to_map`).
* `render_semantic_rgb`: a semantic id map painted in palette colours per class (spec §5.1 semantic-map condition),
  through `model.conditions.semantic_condition`, with sky / ground drawn too so the panel shows the whole frame.
* `draw_bboxes`: class-coloured boxes over an image, the outlines of `model.conditions.box_condition`.
* `draw_keypoints`: COCO skeleton over an image (the limb colours of `model.conditions.pose_condition`); visible
  joints filled, occluded joints (v = 1) hollow. A display, unlike the pose condition map, so drawn here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.conditions import COCO_SKELETON, LIMB_COLOURS, draw_box_outlines, hex_to_rgb, semantic_condition
from model.depth import normalised_inverse_depth, valid_depth
from pipelines.record import Sample, as_storage, encode_png, storage_location

# ColorBrewer "Spectral" (11 classes), reversed: index 0 (far) blue ... index 10 (near) red
_SPECTRAL_R = np.array([hex_to_rgb(h) for h in (
    "#5e4fa2", "#3288bd", "#66c2a5", "#abdda4", "#e6f598", "#ffffbf", "#fee08b", "#fdae61", "#f46d43", "#d53e4f",
    "#9e0142")], dtype=np.float64)
STUFF_COLOURS = {"sky": (0, 0, 0), "ground": (96, 96, 96), "background": (0, 0, 0)}


def colourise_depth(depth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8. Valid pixels default to depth > 0 and finite; invalid ones are black.

    The normalised inverse depth is model.depth's (the one the condition maps use), only the colours differ."""
    valid = valid_depth(depth) if valid is None else np.asarray(valid, dtype=bool)
    out = np.zeros(np.shape(depth) + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    pos = normalised_inverse_depth(depth, valid)[valid] * (len(_SPECTRAL_R) - 1)
    anchors = np.arange(len(_SPECTRAL_R), dtype=np.float64)
    rgb = np.stack([np.interp(pos, anchors, _SPECTRAL_R[:, c]) for c in range(3)], axis=-1)
    out[valid] = np.floor(rgb + 0.5).astype(np.uint8)
    return out


def render_semantic_rgb(
    semantic: np.ndarray, classes: Sequence[str], class_colours: dict[str, object] | None = None,
    default=(0, 0, 0),
) -> np.ndarray:
    """Paint semantic ids in colours per class name (palette names, '#RRGGBB' or RGB tuples).

    Classes without a colour fall back to `STUFF_COLOURS` (sky black, ground grey) and then to `default`.
    """
    class_colours = class_colours or {}
    colours = {c: class_colours[c] if c in class_colours else STUFF_COLOURS.get(c, tuple(default)) for c in classes}
    return semantic_condition(np.asarray(semantic), list(classes), colours)


def draw_bboxes(image: np.ndarray, entities: Iterable[dict], class_colours: dict[str, object], width: int = 1):
    """Class-coloured rectangles for entities with a `bbox_2d` [x0, y0, x1, y1) on a copy of `image`."""
    drawn = [e for e in entities if e.get("bbox_2d") is not None and e["class"] in class_colours]
    return draw_box_outlines(image, [e["bbox_2d"] for e in drawn], [class_colours[e["class"]] for e in drawn], width)


def draw_keypoints(image: np.ndarray, keypoints: np.ndarray, scale: int = 1, radius: float = 1.5) -> np.ndarray:
    """COCO-17 skeletons over `image` (upscaled by `scale`, nearest). Keypoints are (P, 17, 3) (x, y, v)."""
    img = Image.fromarray(image)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    r = radius * scale
    for person in np.asarray(keypoints):
        xy = person[:, :2] * scale
        vis = person[:, 2]
        for (a, b), colour in zip(COCO_SKELETON, LIMB_COLOURS):
            if vis[a] > 0 and vis[b] > 0:
                draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=max(1, scale))
        for j in range(len(person)):
            if vis[j] == 0:
                continue
            box = [xy[j, 0] - r, xy[j, 1] - r, xy[j, 0] + r, xy[j, 1] + r]
            if vis[j] == 2:
                draw.ellipse(box, fill=(255, 255, 255), outline=(0, 0, 0))
            else:
                draw.ellipse(box, outline=(255, 255, 255))
    return np.asarray(img)


def _sample_class_colours(sample: Sample) -> dict[str, object]:
    prompts = sample.meta.get("prompts", {}) if isinstance(sample.meta, dict) else {}
    return {c: v["hex"] for c, v in prompts.get("class_colours", {}).items()}


def sample_panels(sample: Sample, scale: int = 1) -> dict[str, np.ndarray]:
    """The sheet's panels for one sample, each (H * scale, W * scale, 3) uint8; missing labels are grey."""
    h, w = sample.image.shape[:2]

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1) if scale != 1 else a

    blank = np.full((h, w, 3), 64, dtype=np.uint8)
    panels = {"rgb": up(sample.image)}
    panels["depth"] = up(colourise_depth(sample.depth)) if sample.depth is not None else up(blank)
    if sample.semantic is not None:
        panels["segmentation"] = up(render_semantic_rgb(sample.semantic, sample.classes or [],
                                                        _sample_class_colours(sample)))
    else:
        panels["segmentation"] = up(blank)
    kp = sample.keypoints if sample.keypoints is not None else np.zeros((0, 17, 3), np.float32)
    panels["pose"] = draw_keypoints(sample.image, kp, scale=scale)
    return panels


def contact_sheet(samples: Sequence[Sample], scale: int = 1, gap: int = 2) -> Image.Image:
    """One row per sample: RGB | depth | segmentation | keypoints; a title row on top."""
    if not samples:
        raise ValueError("contact_sheet needs at least one sample")
    if int(scale) != scale or scale < 1:
        raise ValueError(f"contact_sheet: scale must be a positive integer, got {scale!r}")
    rows = [sample_panels(s, scale) for s in samples]
    names = list(rows[0])
    ph, pw = rows[0]["rgb"].shape[:2]
    title_h = 14
    sheet_w = len(names) * pw + (len(names) - 1) * gap
    sheet_h = title_h + len(rows) * ph + (len(rows) - 1) * gap
    sheet = Image.new("RGB", (sheet_w, sheet_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for c, name in enumerate(names):
        draw.text((c * (pw + gap) + 3, 1), name, fill=(0, 0, 0), font=font)
    for r, panels in enumerate(rows):
        for c, name in enumerate(names):
            sheet.paste(Image.fromarray(panels[name]), (c * (pw + gap), title_h + r * (ph + gap)))
    return sheet


def write_contact_sheet(
    out: str | os.PathLike,
    seed: int = 0,
    scenes: int = 3,
    views: int = 4,
    size: int = 128,
    scale: int = 1,
    with_figures: bool = True,
) -> Path | str:
    """Render `scenes` x `views` synthetic samples and write their contact sheet PNG to `out`: a local path,
    file:///path.png or s3://bucket/key.png, written atomically by `Storage.write_bytes`. Returns where it went (a
    `Path` locally, the s3:// URI on S3)."""
    from pipelines.sources.synthetic import synthetic_samples  # the sheet itself works for any source

    folder, name = _split_file_location(out)
    storage = as_storage(folder)  # a bad location fails before the rendering
    samples = list(synthetic_samples(seed, scenes, views, size, with_figures=with_figures))
    sheet = np.asarray(contact_sheet(samples, scale=scale))
    storage.write_bytes(name, encode_png(sheet))
    return storage_location(storage, name)


def _split_file_location(out: str | os.PathLike) -> tuple[str, str]:
    """'s3://bucket/dir/x.png' -> ('s3://bucket/dir', 'x.png'); a local path -> (its folder, its name)."""
    text = os.fspath(out)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        folder, _, name = rest.rpartition("/")
        if not name or (scheme == "s3" and not folder):
            raise ValueError(f"{text}: expected a file location, e.g. s3://bucket/sheet.png")
        return f"{scheme}://{folder or '/'}", name
    path = Path(text).expanduser()
    if not path.name:
        raise ValueError(f"{text}: expected a file path")
    return str(path.parent), path.name
