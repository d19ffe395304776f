"""Image inputs -> (3, H, W) float32 tensors in [-1, 1], centre-crop-resize, and the release's aspect-ratio buckets.

One preprocessing path for the inference pipeline and the data build, so a picture is read the same way wherever it
enters (pure PyTorch + PIL + numpy):

    load_image             path / http(s) URL / PIL image -> PIL image (EXIF orientation applied, first frame)
    image_to_tensor        path / URL / PIL / numpy / tensor -> (3, H, W) float32 in [-1, 1]
    center_crop_box        the integer crop box (top, left, crop_h, crop_w) center_crop_resize cuts
    center_crop_resize     the release's CenterCropResizeImage on (3, H, W)
    closest_aspect_bucket  the release's ASPECT_RATIO_{256,512,1024} bucket nearest an image's height / width
    bucket_size            that bucket in pixels for an image tokenizer with downsample factor f
    as_image_list          the pipeline's `images=` argument -> a list of single images

Value conventions, per input kind (every 8-bit input maps v -> v / 255 * 2 - 1 exactly, as before this module):

    PIL 8-bit modes (RGB, L, P, 1, CMYK, YCbCr, HSV, LAB, RGBX)   PIL's own convert("RGB")
    PIL with alpha (RGBA, LA, PA, RGBa, La, or a `transparency` key)  composited on white
    PIL I;16 / I;16B / I;16L / I;16N                               v / 65535
    PIL I (int32)                                                  v / 65535 if 0 <= v <= 65535 everywhere, else
                                                                   v / (2**31 - 1); negative values are refused
    PIL F (float32)                                                taken as [0, 1], clipped
    numpy uint8 / uint16 / bool / float                            v / 255, v / 65535, 0 or 1, float in [0, 1]
    torch float tensor (3, H, W) or (1, 3, H, W)                   already in [-1, 1], taken as is

Grayscale is repeated to three channels. NaN / inf anywhere, float arrays outside [0, 1] and tensors outside
[-1, 1] (beyond FLOAT_RANGE_TOLERANCE) are refused with a ValueError naming the input, since silently clipping
them would feed the VAE a picture the caller never meant.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.limits import BUCKET_MULTIPLE, MAX_IMAGE_PIXELS, resolution_problem

if TYPE_CHECKING:  # annotations only: the build's workers use this module without importing torch
    import torch

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor


def _is_tensor(value) -> bool:
    """isinstance(value, torch.Tensor) without importing torch: the data build's decode and bucket stages use this
    module's numpy/PIL half, and importing torch costs each of the build's worker processes ~1.5 s of CPU."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)

# The release's ASPECT_RATIO_512 buckets (onediffusion/dataset/utils.py): ratio key height/width -> (height, width) in
# pixels at VAE factor 8. Ties go to the first key in this (ascending) order, as the release's `min` over the keys.
ASPECT_RATIO_512 = {
    "0.25": (256, 1024), "0.26": (256, 992), "0.27": (256, 960), "0.28": (256, 928), "0.32": (288, 896),
    "0.33": (288, 864), "0.35": (288, 832), "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736),
    "0.5": (352, 704), "0.52": (352, 672), "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608),
    "0.72": (416, 576), "0.78": (448, 576), "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512),
    "1.0": (512, 512), "1.07": (512, 480), "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448),
    "1.38": (576, 416), "1.46": (608, 416), "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352),
    "2.09": (736, 352), "2.4": (768, 320), "2.5": (800, 320), "2.89": (832, 288), "3.0": (864, 288),
    "3.11": (896, 288), "3.62": (928, 256), "3.75": (960, 256), "3.88": (992, 256), "4.0": (1024, 256),
}
# The release's ASPECT_RATIO_256 and ASPECT_RATIO_1024 (same file) are exactly ASPECT_RATIO_512 with every size halved
# / doubled, same keys in the same order (tests/test_bucket.py spot-checks release values); derived here so the three
# tables cannot drift apart.
ASPECT_RATIO_256 = {key: (h // 2, w // 2) for key, (h, w) in ASPECT_RATIO_512.items()}
ASPECT_RATIO_1024 = {key: (h * 2, w * 2) for key, (h, w) in ASPECT_RATIO_512.items()}
ASPECT_RATIO_TABLES = {256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024}
ASPECT_RATIO_VAE_FACTOR = 8  # the buckets are pixel sizes for f = 8; other tokenizers keep the same latent grid

# Float inputs may overshoot their range by float rounding (colour conversions, resampling); a quarter of an 8-bit
# step is let through unchanged, anything beyond is a scaling mistake (0..255 floats, [-1, 1] passed as [0, 1]).
FLOAT_RANGE_TOLERANCE = 1e-3
IMAGE_DOWNLOAD_TIMEOUT_S = 30.0
MAX_IMAGE_DOWNLOAD_BYTES = 256 << 20
WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_TRANSPARENCY_KEY_MODES = ("P", "L", "RGB")  # modes whose `transparency` info PIL applies when converting to RGBA
_DECODE_HINT = "give a PNG/JPEG/WebP (or another format PIL reads) image"


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def load_image(source: str | os.PathLike | Image.Image, *, timeout_s: float = IMAGE_DOWNLOAD_TIMEOUT_S) -> Image.Image:
    """A PIL image from a local path, an http(s) URL or a PIL image (diffusers' `load_image` convention).

    EXIF orientation is applied (phone photos store pixels sideways plus a tag; the model must see them upright),
    animated files (GIF/WebP/APNG) give their first frame, and the pixels are fully loaded into a copy so no file
    handle stays open. A PIL image is passed through with its EXIF orientation applied, at its current frame."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, "the PIL image")  # may be lazy (Image.open without load): checked before decoding
        return _upright(source)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _decode(io.BytesIO(_download(source, timeout_s)), source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_image takes a path, an http(s) URL or a PIL image; got {type(source).__name__}.")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file (give an existing local path or an http(s) URL).")
    return _decode(path, str(path))


def _download(url: str, timeout_s: float) -> bytes:
    import requests  # imported here: only URL inputs need it

    try:
        with requests.get(url, timeout=timeout_s, stream=True) as response:
            if not response.ok:
                raise ValueError(f"{url}: HTTP {response.status_code} {response.reason}; check the URL (it must serve "
                                 "the image file itself).")
            body = bytearray()
            for chunk in response.iter_content(1 << 20):
                body += chunk
                if len(body) > MAX_IMAGE_DOWNLOAD_BYTES:
                    raise ValueError(f"{url}: the response is larger than {MAX_IMAGE_DOWNLOAD_BYTES >> 20} MiB, more "
                                     "than any image this model takes; download and downscale it, then pass the file.")
    except requests.RequestException as err:
        raise ConnectionError(f"{url}: download failed ({err}); check the URL and the network, or pass a local "
                              "path.") from err
    return bytes(body)


def _check_pixels(size: tuple[int, int], label: str) -> None:
    """Refuse an image whose header claims more than MAX_IMAGE_PIXELS, before a pixel is decoded (a decompression
    bomb: a small file that claims 30000 x 30000 pixels would otherwise allocate gigabytes)."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{label}: the image claims {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} "
                         "allowed (a decompression-bomb guard); downscale it first.")


def _decode(file: Path | io.BytesIO, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():  # PIL warns between 1x and 2x its limit; _check_pixels refuses that itself
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(file)
        with opened:
            _check_pixels(opened.size, label)
            opened.seek(0)  # animated files: the first frame, whatever frame PIL opened at
            opened.load()
            return _upright(opened)
    except PermissionError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own guard fires in open() above 2 x its limit
        raise ValueError(f"{label}: refused before decoding: {err}; downscale it first.") from err
    except UnidentifiedImageError as err:
        raise ValueError(f"{label}: cannot identify image file; {_DECODE_HINT}.") from err
    except (OSError, SyntaxError) as err:  # truncated or corrupt data (PIL raises both)
        raise ValueError(f"{label}: cannot decode image ({err}); the file may be truncated or corrupt, "
                         f"{_DECODE_HINT}.") from err


def _upright(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, as a copy independent of any open file (exif_transpose copies either way)."""
    upright = ImageOps.exif_transpose(image)
    return upright if upright is not image else image.copy()


# ----------------------------------------------------------------------------------------------------------------------
# Conversion to [-1, 1]
# ----------------------------------------------------------------------------------------------------------------------


def image_to_tensor(image: ImageInput, *, name: str | None = None) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from a path, an http(s) URL, a PIL image, a numpy array or a torch tensor.

    See the module docstring for the value convention of each input kind. `name` (e.g. "image 2") is how errors
    refer to the input; paths and URLs are named by themselves too. Tensors are the image tokenizer's own
    convention, so they come back as float32 on the CPU without rescaling (the same tensor if it already is)."""
    label = _label(image, name)
    if _is_tensor(image):
        return _checked_tensor(image, label)
    if isinstance(image, (str, os.PathLike, Image.Image)):
        image = pil_to_array(load_image(image), name=label)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{label}: images must be paths, URLs, PIL images, numpy arrays or torch tensors; got "
                        f"{type(image).__name__}.")
    return _array_to_tensor(image, label)


def pil_to_array(image: Image.Image, *, name: str | None = None) -> np.ndarray:
    """A numpy array `image_to_tensor` reads exactly: (H, W, 3) uint8 for 8-bit modes (alpha composited on white),
    (H, W) uint16 for 16-bit grayscale, (H, W) float32 in [0, 1] for mode F and 32-bit mode I.

    Why white: the release drops alpha (`convert("RGB")`), which shows whatever colour the transparent pixels happen
    to store; white is what its multiview training loader composites on, and opaque pixels are unchanged.
    Why 16-bit scaling: PIL's convert("RGB") clips I;16 / I at 255, saturating nearly all of a 16-bit image."""
    label = name or "image"
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)  # native byte order; values unchanged
    if mode == "I":
        return _int32_to_unit(np.asarray(image), label)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        _refuse_non_finite(values, label)
        return np.clip(values, 0.0, 1.0)
    if mode in _ALPHA_MODES or (mode in _TRANSPARENCY_KEY_MODES and "transparency" in image.info):
        return np.asarray(_composite_on_white(image).convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as err:
        raise ValueError(f"{label}: PIL mode {mode!r} cannot be converted to RGB ({err}); convert it first.") from err


def _composite_on_white(image: Image.Image) -> Image.Image:
    # La (premultiplied) has no direct RGBA conversion in PIL; LA un-premultiplies it first.
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba)


def _int32_to_unit(values: np.ndarray, label: str) -> np.ndarray:
    """Mode I (int32) is how PIL opens some 16-bit grayscale files and what I;16 becomes after many PIL operations:
    values that fit 16 bits are read as 16-bit (exactly as I;16), larger ones on the non-negative int32 range."""
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise ValueError(f"{label}: mode I image has negative values (min {low}); give non-negative grayscale "
                         "(0..65535 for 16-bit) or a float image in [0, 1].")
    if high <= 65535:
        return values.astype(np.uint16)
    return (values.astype(np.float64) / (2**31 - 1)).astype(np.float32)


def _array_to_tensor(array: np.ndarray, label: str) -> torch.Tensor:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{label}: image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape "
                         f"{array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{label}: empty image (shape {array.shape}).")
    values = _unit_values(array, label)
    if values.shape[-1] == 4:  # straight alpha, composited on white as for PIL images
        alpha = values[..., 3:]
        values = values[..., :3] * alpha + (1 - alpha)
    if values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    import torch

    return torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1) * 2 - 1


def _unit_values(array: np.ndarray, label: str) -> np.ndarray:
    """float32 in [0, 1]; 16-bit data goes to float directly, keeping all 16 bits (float32 holds them exactly)."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        _refuse_non_finite(array, label)
        _refuse_out_of_range(array, 0.0, 1.0, label, "float image arrays")
        return array.astype(np.float32)
    raise TypeError(f"{label}: image arrays must be uint8 (0..255), uint16 (0..65535), bool or float in [0, 1]; got "
                    f"dtype {array.dtype} (e.g. .astype(np.uint8) for 0..255 integers).")


def _checked_tensor(image: torch.Tensor, label: str) -> torch.Tensor:
    tensor = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"{label}: image tensors must be (3, H, W) or (1, 3, H, W) in [-1, 1]; got shape "
                         f"{tuple(image.shape)}.")
    if not tensor.is_floating_point():
        raise TypeError(f"{label}: image tensors must be floating point in [-1, 1]; got {tensor.dtype} (for 0..255 "
                        "values use t.float() / 127.5 - 1).")
    tensor = tensor.detach().float().cpu()
    _refuse_non_finite(tensor, label)
    _refuse_out_of_range(tensor, -1.0, 1.0, label, "image tensors")
    return tensor


def _refuse_non_finite(values: np.ndarray | torch.Tensor, label: str) -> None:
    finite = sys.modules["torch"].isfinite(values) if _is_tensor(values) else np.isfinite(values)
    if not bool(finite.all()):
        bad, total = int((~finite).sum()), finite.numel() if _is_tensor(finite) else finite.size
        raise ValueError(f"{label}: {bad} of {total} values are NaN or inf; replace NaN/inf (e.g. np.nan_to_num / "
                         "torch.nan_to_num) before passing the image.")


def _refuse_out_of_range(values, low: float, high: float, label: str, what: str) -> None:
    observed_low, observed_high = float(values.min()), float(values.max())
    if observed_low < low - FLOAT_RANGE_TOLERANCE or observed_high > high + FLOAT_RANGE_TOLERANCE:
        raise ValueError(f"{label}: {what} must be in [{low:g}, {high:g}]; got values in [{observed_low:.6g}, "
                         f"{observed_high:.6g}]. Rescale first (uint8 arrays are divided by 255 for you; tensors "
                         "are taken as is, so map [0, 1] with x * 2 - 1).")


def _label(image: ImageInput, name: str | None) -> str:
    source = str(image) if isinstance(image, (str, os.PathLike)) else None
    if name and source:
        return f"{name} ({source})"
    return name or source or "image"


# ----------------------------------------------------------------------------------------------------------------------
# Geometry: centre crop + resize, aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------------------


def center_crop_box(in_h: int, in_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): the centred box of aspect width / height that `center_crop_resize` cuts from an
    in_h × in_w image, corner and size truncated to whole pixels as the release does.

    Public so that label maps, keypoints and intrinsics (pipelines/bucket.py) are cropped with the very box the image
    is, never a recomputed one that could differ by a pixel."""
    if min(in_h, in_w, height, width) <= 0:
        raise ValueError(f"center_crop_box: sizes must be positive; got image {in_h}x{in_w} (HxW) and target "
                         f"{height}x{width}.")
    in_h, in_w = float(in_h), float(in_w)
    target_aspect = width / height
    if in_w / in_h > target_aspect:
        crop_h, crop_w = in_h, in_h * target_aspect
    else:
        crop_h, crop_w = in_w / target_aspect, in_w
    return int((in_h - crop_h) / 2), int((in_w - crop_w) / 2), int(crop_h), int(crop_w)


def center_crop_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The release's CenterCropResizeImage on (3, H, W): crop the centred box of the target aspect ratio (box corner
    and size truncated to whole pixels, `center_crop_box`), then resize it bilinearly (align_corners=False, no
    antialiasing) to height × width. Bilinear weights sum to 1, so resizing the [-1, 1] tensor equals resizing
    [0, 1] then normalising, as the release does."""
    import torch.nn.functional as F

    top, left, crop_h, crop_w = center_crop_box(image.shape[-2], image.shape[-1], height, width)
    cropped = image[:, top:top + crop_h, left:left + crop_w]
    return F.interpolate(cropped[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def aspect_ratio_table(resolution: int = 512) -> dict[str, tuple[int, int]]:
    """The bucket table for `resolution`: ratio key height/width -> (height, width). 256, 512 and 1024 are the
    release's tables; another resolution R (model.limits.resolution_problem says which, e.g. 64 for small test
    builds) is the 512 table scaled by R/512 with each side rounded to BUCKET_MULTIPLE (docs/
    INTERFACES.md §6), the same keys in the same order (neighbouring keys may then share a size)."""
    if resolution in ASPECT_RATIO_TABLES:
        return ASPECT_RATIO_TABLES[resolution]
    problem = resolution_problem(resolution)
    if problem:
        raise ValueError(problem)
    scale = resolution / 512

    def side(pixels: int) -> int:
        return max(BUCKET_MULTIPLE, round(pixels * scale / BUCKET_MULTIPLE) * BUCKET_MULTIPLE)

    return {key: (side(h), side(w)) for key, (h, w) in ASPECT_RATIO_512.items()}


def closest_aspect_bucket(height: int, width: int, resolution: int = 512) -> tuple[int, int]:
    """(bucket height, bucket width) in pixels at f = 8: the ASPECT_RATIO_{resolution} bucket whose ratio key is
    closest to height / width, ties to the first key in ascending order (the release's `min` over the dict keys)."""
    table = aspect_ratio_table(resolution)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive; got height={height}, width={width}.")
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]


def bucket_size(height: int, width: int, downsample_factor: int = ASPECT_RATIO_VAE_FACTOR,
                resolution: int = 512) -> tuple[int, int]:
    """The closest bucket at `resolution` as a pixel size for an image tokenizer with `downsample_factor` f: the
    bucket's latent grid (pixels / 8) kept, times f, so every tokenizer sees the release's token count."""
    bucket_h, bucket_w = closest_aspect_bucket(height, width, resolution)
    return (bucket_h // ASPECT_RATIO_VAE_FACTOR * downsample_factor,
            bucket_w // ASPECT_RATIO_VAE_FACTOR * downsample_factor)


def as_image_list(images) -> list:
    """The pipeline's `images=` argument as a list of single images: None -> [], a list / tuple as is, a
    (N, 3, H, W) tensor -> its N (3, H, W) tensors, anything else (one path, PIL image, array, tensor) -> [it]."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    if _is_tensor(images) and images.ndim == 4:
        return list(images)
    return [images]


__all__ = [
    "ASPECT_RATIO_1024",
    "ASPECT_RATIO_256",
    "ASPECT_RATIO_512",
    "ASPECT_RATIO_TABLES",
    "ASPECT_RATIO_VAE_FACTOR",
    "FLOAT_RANGE_TOLERANCE",
    "ImageInput",
    "as_image_list",
    "aspect_ratio_table",
    "bucket_size",
    "center_crop_box",
    "center_crop_resize",
    "closest_aspect_bucket",
    "image_to_tensor",
    "load_image",
    "pil_to_array",
]
