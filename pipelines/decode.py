"""The build's decode + validate step: file bytes -> an upright (H, W, 3) uint8 RGB array, or a named refusal.

Every source (url lists, folders, tars) hands the build raw file bytes, so one function decides, the same way for
all of them, what a picture is and which files are skipped. A refused file raises `DropSample`, whose `reason` is one
of `DROP_REASONS` (the build counts drops by reason) and whose message names the file, what is wrong and the fix.

Checks, in order (the first that fails names the reason):

    empty_file     zero bytes
    not_an_image   PIL cannot identify the format (an HTML page saved as .jpg), or its pixels have no RGB reading
                   (negative or NaN values)
    too_large      the header's width * height > max_pixels, refused from the header alone: no pixel is decoded, so a
                   decompression bomb (a tiny file claiming 20000 x 20000) costs nothing. PIL's own bomb guard (an
                   error above 2 * Image.MAX_IMAGE_PIXELS, raised while reading the header) counts as too_large too,
                   so a max_pixels above that limit cannot take effect.
    too_small      min(H, W) < min_size
    bad_aspect     max(H / W, W / H) > max_aspect
    truncated      the pixel data cannot be decoded (cut short, corrupt)

too_small and bad_aspect are checked on the header's size before decoding, which is the same test as on the upright
image (EXIF orientation only swaps the axes; neither the shorter side nor the ratio changes), and skips decoding
pictures that would be dropped anyway; so a file that is both truncated and too small counts as too_small.

Conversion follows model/images.py, the one reading of a picture for inference and the build: EXIF orientation applied
(ImageOps.exif_transpose), the first frame of animated files, `model.images.pil_to_array` for every PIL mode (alpha
and palette transparency composited on white; CMYK, YCbCr, LAB, P, 1, L through PIL's convert), its 16-bit output
mapped to 8 bits by rounding v / 65535 * 255 and its float output by rounding v * 255, gray repeated to 3 channels.

PIL's ImageFile.LOAD_TRUNCATED_IMAGES makes PIL fill a cut-short file with grey instead of failing; a library that
turns it on would let truncated files through, so `decode_image` turns it off again (logging once) before decoding.

`pixels_sha256` is the build's duplicate key: the same picture gives the same key whatever lossless format carried
it, so exact duplicates are found across PNG, BMP, TIFF, lossless WebP and byte-identical copies.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.limits import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)

DROP_REASONS = ("empty_file", "not_an_image", "truncated", "too_large", "too_small", "bad_aspect")
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS  # PIL's own Image.MAX_IMAGE_PIXELS default (about 9459 x 9459)

# What PIL raises for corrupt or cut-short data while decoding (PIL itself uses all of these); anything else escapes
# to the build's stage wrapper, which drops the record as error_decode with the exception.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # the warning when it is made an error
_TRUNCATED_WARNED = False


class DropSample(Exception):
    """A sample the build skips and counts: `reason` is a short stable name, `str()` the detail."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps `reason` when pickled across Ray workers
        return type(self), (self.reason, str(self))


def decode_image(data: bytes, name: str, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 64,
                 max_aspect: float = 4.0) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright, from the bytes of an image file; `name` (a URI) is how errors name it.

    Raises `DropSample` (reason in DROP_REASONS) for a file the build skips; see the module docstring for the checks.
    The array may be read-only (it wraps PIL's pixel buffer without a copy): copy it before writing into it. No file
    handle stays open (the bytes are decoded from memory and the PIL image is closed)."""
    if not data:
        raise DropSample("empty_file", f"{name}: the file is empty (0 bytes); re-download or re-export it, or remove "
                                       "it from the source")
    _refuse_truncated_loading()
    try:
        image = Image.open(io.BytesIO(data))
    except _BOMB_ERRORS as err:
        raise DropSample("too_large", f"{name}: refused before decoding: {err} (PIL's decompression-bomb guard); "
                                      "downscale the image below build.decode.max_pixels") from None
    except UnidentifiedImageError:
        raise DropSample("not_an_image", f"{name}: not an image file PIL can read ({len(data)} bytes starting "
                                         f"{data[:16]!r}); give PNG, JPEG, WebP, BMP, TIFF or GIF, or remove it") \
            from None
    except _DECODE_ERRORS as err:
        raise DropSample("truncated", f"{name}: cannot read the image header ({type(err).__name__}: {err}); the file "
                                      "is corrupt or cut short: download or export it again") from None
    with image:
        width, height = image.size
        _check_size(name, height, width, max_pixels=max_pixels, min_size=min_size, max_aspect=max_aspect)
        try:
            image.load()  # the one decode; animated files open at their first frame
            ImageOps.exif_transpose(image, in_place=True)  # upright; no copy when the orientation is already 1
            return _to_rgb(image, name)
        except DropSample:
            raise
        except _DECODE_ERRORS as err:
            raise DropSample("truncated", f"{name}: cannot decode the {image.format or 'image'} pixel data "
                                          f"({type(err).__name__}: {err}); the file is cut short or corrupt: download "
                                          "or export it again") from None


def pixels_sha256(image: np.ndarray) -> str:
    """sha256 hex of the decoded pixels (dtype, shape and bytes): the build's duplicate key (exact duplicates are
    the same picture whatever file format carried it)."""
    digest = hashlib.sha256(f"{image.dtype.str}{tuple(image.shape)}".encode())
    digest.update(np.ascontiguousarray(image).data)  # hashes the buffer itself: no bytes copy
    return digest.hexdigest()


# --- internals -------------------------------------------------------------------------------------------------------

def _check_size(name: str, height: int, width: int, *, max_pixels: int, min_size: int, max_aspect: float) -> None:
    if width * height > max_pixels:
        raise DropSample("too_large", f"{name}: {width} x {height} = {width * height} pixels exceeds "
                                      f"build.decode.max_pixels = {max_pixels}; refused before decoding: downscale it, "
                                      "or raise build.decode.max_pixels")
    if min(height, width) < min_size:
        raise DropSample("too_small", f"{name}: {width} x {height} pixels, the shorter side is below "
                                      f"build.decode.min_size = {min_size}; use a larger image, or lower the limit")
    if width <= 0 or height <= 0 or max(height / width, width / height) > max_aspect:
        ratio = max(height, width) / max(1, min(height, width))
        raise DropSample("bad_aspect", f"{name}: {width} x {height} pixels has aspect ratio {ratio:.2f}:1, above "
                                       f"build.decode.max_aspect = {max_aspect:g}; crop it, or raise the limit")


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    from model.images import pil_to_array

    if image.mode == "RGB" and "transparency" not in image.info:
        return np.asarray(image)  # already RGB: skip pil_to_array's convert("RGB"), which copies
    try:
        array = pil_to_array(image, name=name)
    except ValueError as err:  # negative / NaN values or a mode without an RGB reading
        raise DropSample("not_an_image", f"{err}") from None
    if array.dtype == np.uint16:
        # round(v / 65535 * 255) in exact integer arithmetic (510 v is even, 65535 odd: never a tie to break)
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif array.dtype != np.uint8:  # float32 in [0, 1] (modes F and wide I)
        array = np.rint(array * np.float32(255)).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


def _refuse_truncated_loading() -> None:
    global _TRUNCATED_WARNED
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        if not _TRUNCATED_WARNED:
            _TRUNCATED_WARNED = True
            log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was turned on (by an imported library?); the build "
                        "turned it off so that cut-short images are dropped as truncated, not filled with grey")


__all__ = ["DEFAULT_MAX_PIXELS", "DROP_REASONS", "DropSample", "decode_image", "pixels_sha256"]
