"""A folder of the odd files a real image folder holds, and what the build must make of each: `write_odd_folder`.

    expected = write_odd_folder(tmp_path / "odd")   # {input name: outcome}, names as the folder source sees them

Inputs (relative paths; a multiview group is one input named by its folder):

    alpha_rgba.png            RGBA with a gradient alpha (composited on white)          kept
    anim.gif                  animated GIF, 2 frames (the first is kept)                kept
    aspect_1x10.png           64 x 640                                                  bad_aspect
    cmyk.jpg                  CMYK JPEG                                                 kept
    coffee.png + coffee.json  PNG, json sidecar: caption + extra keys (-> meta)         kept
    copy_a.png                a photo                                                   kept
    copy_b.png                byte-identical copy of copy_a.png                         kept, duplicate of copy_a.png
    copy_c.bmp                copy_a.png's pixels re-encoded losslessly as BMP          kept, duplicate of copy_a.png
    empty.png                 zero bytes                                                empty_file
    exif_rotated.jpg          stored 96 x 144 (H x W), EXIF orientation 6: upright 144 x 96   kept
    gray16.png                16-bit grayscale (I;16), values 0..65535                  kept
    huge_30000.png            a valid PNG claiming 30000 x 30000 with one row of data   too_large (never decoded)
    not_really.jpg            a text file named .jpg                                    not_an_image
    palette_transparent.png   palette PNG with a transparent index                      kept
    photo.jpg + photo.txt     JPEG, text sidecar caption                                kept
    scene_bad/                cameras.json with a 3x4 c2w matrix                        bad_cameras
    scene_good/               cameras.json, 3 views with c2w + K, a caption; an unlisted thumb.jpg is ignored   kept
    sub/nested.webp + .json   lossless WebP in a subfolder, json sidecar with "captions"   kept
    tiny_32.png               32 x 32                                                   too_small
    truncated.jpg             the first half of a JPEG                                  truncated

Ignored (no image extension, not a sidecar): notes.md, readme.txt.

Pictures are scikit-image's bundled photographs (inside the wheel: nothing downloads), downscaled so a build over
the folder stays fast on 2 cores, and so no picture here equals one tests/http_images.py serves at full size (the
build's duplicate pass would pair them across sources). Every file's bytes are the same on every call.

Each outcome: {"kind": "image" | "group", "dropped": reason | None, "size": (H, W) upright or None, "mode": the PIL
mode the file opens in, "views": count, "captions": {...}, "sidecar": {...} (extra sidecar keys -> meta["sidecar"]),
"duplicate_of": the name of the first copy (sorted order) or None}.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HUGE_SIDE = 30000
JPEG_QUALITY = 92


def _photo(name: str, height: int, width: int) -> np.ndarray:
    """skimage.data.<name>() centre-cropped to the aspect of height x width and resized to it (uint8 RGB)."""
    import skimage.data
    from PIL import Image

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    in_h, in_w = image.shape[:2]
    if in_w * height > in_h * width:  # too wide: crop the width
        crop_w = in_h * width // height
        image = image[:, (in_w - crop_w) // 2:(in_w - crop_w) // 2 + crop_w]
    else:
        crop_h = in_w * height // width
        image = image[(in_h - crop_h) // 2:(in_h - crop_h) // 2 + crop_h]
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _encode(image, fmt: str, **options) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def huge_png(width: int = HUGE_SIDE, height: int = HUGE_SIDE) -> bytes:
    """A valid PNG (signature, IHDR, IDAT, IEND, correct CRCs) claiming width x height 8-bit grayscale pixels whose
    IDAT holds only the first row: a few hundred bytes standing in for a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # bit depth 8, grayscale, deflate, no interlace
    first_row = b"\x00" + bytes(width)  # filter byte + one row of black
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(first_row, 9))
            + chunk(b"IEND", b""))


def look_at_c2w(azimuth_deg: float, elevation_deg: float = 20.0, distance: float = 3.0) -> list[list[float]]:
    """Camera-to-world 4x4 (OpenGL: x right, y up, camera looks down -z) on a sphere around the origin."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    eye = distance * np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    z = eye / np.linalg.norm(eye)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w.tolist()


def intrinsics(size: int, fov_deg: float = 50.0) -> list[list[float]]:
    focal = size / 2 / np.tan(np.radians(fov_deg) / 2)
    return [[float(focal), 0.0, size / 2], [0.0, float(focal), size / 2], [0.0, 0.0, 1.0]]


def write_odd_folder(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Write the odd folder (see the module docstring) under `folder` (created) and return {input: outcome}."""
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, dict[str, Any]] = {}

    def put(rel: str, data: bytes | str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)

    def image(rel: str, data: bytes, *, dropped: str | None = None, size: tuple[int, int] | None = None,
              mode: str | None = None, captions: dict | None = None, sidecar: dict | None = None,
              duplicate_of: str | None = None) -> None:
        put(rel, data)
        outcomes[rel] = {"kind": "image", "dropped": dropped, "size": None if dropped else size, "mode": mode,
                         "views": 1, "captions": captions or {}, "sidecar": sidecar or {}, "duplicate_of": duplicate_of}

    # Colour modes -------------------------------------------------------------------------------------------------
    rgba = np.dstack([_photo("chelsea", 96, 128), np.tile(np.linspace(0, 255, 128).astype(np.uint8), (96, 1))])
    image("alpha_rgba.png", _encode(rgba, "PNG"), size=(96, 128), mode="RGBA")

    palette = Image.fromarray(_photo("coffee", 96, 128)).quantize(colors=32)
    palette.paste(31, (0, 0, 32, 32))  # a corner of palette index 31, the transparent one: composited on white
    image("palette_transparent.png", _encode(palette, "PNG", transparency=31), size=(96, 128), mode="P")

    cmyk = Image.fromarray(_photo("astronaut", 112, 112)).convert("CMYK")
    image("cmyk.jpg", _encode(cmyk, "JPEG", quality=JPEG_QUALITY), size=(112, 112), mode="CMYK")

    ramp = np.linspace(0, 65535, 128 * 128).round().astype(np.uint16).reshape(128, 128)
    image("gray16.png", _encode(Image.fromarray(ramp), "PNG"), size=(128, 128), mode="I;16")

    frames = [Image.fromarray(_photo(name, 80, 80)).quantize(colors=64) for name in ("rocket", "chelsea")]
    image("anim.gif", _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
          size=(80, 80), mode="P")

    # Orientation: pixels stored 96 x 144 (H x W), EXIF says "rotate 90 degrees clockwise to view" -----------------
    exif = Image.Exif()
    exif[0x0112] = 6
    image("exif_rotated.jpg", _encode(_photo("rocket", 96, 144), "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes()),
          size=(144, 96), mode="RGB")

    # Refusals -----------------------------------------------------------------------------------------------------
    image("empty.png", b"", dropped="empty_file")
    image("not_really.jpg", b"These are my holiday notes, not a picture.\n", dropped="not_an_image")
    image("huge_30000.png", huge_png(), dropped="too_large", mode="L")
    whole = _encode(_photo("chelsea", 128, 160), "JPEG", quality=JPEG_QUALITY)
    image("truncated.jpg", whole[: len(whole) // 2], dropped="truncated", mode="RGB")
    image("tiny_32.png", _encode(_photo("coffee", 32, 32), "PNG"), dropped="too_small", mode="RGB")
    image("aspect_1x10.png", _encode(_photo("rocket", 64, 640), "PNG"), dropped="bad_aspect", mode="RGB")

    # Duplicates: byte-identical, and the same pixels in another lossless format ----------------------------------
    original = _photo("astronaut", 120, 100)
    copy = _encode(original, "PNG")
    image("copy_a.png", copy, size=(120, 100), mode="RGB")
    image("copy_b.png", copy, size=(120, 100), mode="RGB", duplicate_of="copy_a.png")
    image("copy_c.bmp", _encode(original, "BMP"), size=(120, 100), mode="RGB", duplicate_of="copy_a.png")

    # Plain photos with sidecars -------------------------------------------------------------------------------------
    image("photo.jpg", _encode(_photo("astronaut", 128, 128), "JPEG", quality=JPEG_QUALITY), size=(128, 128),
          mode="RGB", captions={"original": "an astronaut in front of a flag"})
    put("photo.txt", "  an astronaut in front of a flag \n")
    image("coffee.png", _encode(_photo("coffee", 100, 150), "PNG"), size=(100, 150), mode="RGB",
          captions={"original": "a cup of coffee on a saucer"}, sidecar={"license": "cc0", "author": "skimage"})
    put("coffee.json", json.dumps({"caption": "a cup of coffee on a saucer", "license": "cc0", "author": "skimage"}))
    nested_captions = {"short": "a rocket", "long": "a rocket on its launch pad under a blue sky"}
    image("sub/nested.webp", _encode(_photo("rocket", 90, 120), "WEBP", lossless=True), size=(90, 120), mode="RGB",
          captions=nested_captions, sidecar={"source_url": "https://example.invalid/rocket"})
    put("sub/nested.json", json.dumps({"captions": nested_captions, "source_url": "https://example.invalid/rocket"}))

    # Not inputs -----------------------------------------------------------------------------------------------------
    put("notes.md", "# notes\nnothing to see here\n")
    put("readme.txt", "a text file with no image of the same stem: not a sidecar\n")

    # Multiview groups -----------------------------------------------------------------------------------------------
    views = [_photo(name, 96, 96) for name in ("astronaut", "coffee", "chelsea")]
    frames_json = []
    for v, view in enumerate(views):
        put(f"scene_good/{v:03d}.png", _encode(np.ascontiguousarray(view[::-1]) if v == 0 else view, "PNG"))  # flipped: not copy_a
        frames_json.append({"file": f"{v:03d}.png", "c2w_opengl": look_at_c2w(120.0 * v), "K": intrinsics(96)})
    put("scene_good/thumb.jpg", _encode(views[0], "JPEG", quality=80))  # not listed in cameras.json: ignored
    put("scene_good/cameras.json", json.dumps({"frames": frames_json, "caption": "three views of a table"}, indent=1))
    outcomes["scene_good"] = {"kind": "group", "dropped": None, "size": (96, 96), "mode": "RGB", "views": 3,
                              "captions": {"original": "three views of a table"}, "sidecar": {},
                              "duplicate_of": None}

    for v in range(2):
        put(f"scene_bad/{v:03d}.png", _encode(_photo("rocket", 96, 96), "PNG"))
    bad_frames = [{"file": "000.png", "c2w_opengl": look_at_c2w(0.0)},
                  {"file": "001.png", "c2w_opengl": look_at_c2w(90.0)[:3]}]  # 3x4: not a camera-to-world matrix
    put("scene_bad/cameras.json", json.dumps({"frames": bad_frames}))
    outcomes["scene_bad"] = {"kind": "group", "dropped": "bad_cameras", "size": None, "mode": None, "views": 2,
                             "captions": {}, "sidecar": {}, "duplicate_of": None}
    return dict(sorted(outcomes.items()))


__all__ = ["HUGE_SIDE", "huge_png", "intrinsics", "look_at_c2w", "write_odd_folder"]
