"""model.images: every way a user hands over a picture ends as the [-1, 1] tensor they meant, or a clear error.

Images are real files written to tmp_path (PNG, JPEG with EXIF, GIF, TIFF) or built with PIL/numpy; URLs are served by
a real http.server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from model.images import (
    ASPECT_RATIO_512,
    as_image_list,
    bucket_size,
    center_crop_resize,
    closest_aspect_bucket,
    image_to_tensor,
    load_image,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _expected_8bit(array: np.ndarray) -> torch.Tensor:
    """The convention for 8-bit pictures: v / 255 * 2 - 1, channels first."""
    return torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1) * 2 - 1


def _rgb_at(tensor: torch.Tensor, row: int, col: int) -> tuple[int, ...]:
    """The pixel back in 0..255 (rounded), to compare with the colour that was drawn."""
    return tuple(int(round(v)) for v in ((tensor[:, row, col] + 1) / 2 * 255).tolist())


def _close(rgb: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, expected))


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """(folder, base URL): files written to the folder are served on 127.0.0.1 while the test runs."""
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------------------------------------------------
# 8-bit RGB: exactly v / 255 * 2 - 1, whatever the container
# ----------------------------------------------------------------------------------------------------------------------


def test_opaque_rgb_uint8_maps_exactly_to_minus_one_one(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    expected = _expected_8bit(array)
    path = tmp_path / "rgb.png"
    Image.fromarray(array).save(path)

    for source in (array, Image.fromarray(array), path, str(path)):
        tensor = image_to_tensor(source)
        assert tensor.dtype == torch.float32 and tensor.shape == (3, 13, 21)
        assert torch.equal(tensor, expected), type(source).__name__


def test_path_input_closes_the_file(tmp_path):
    path = tmp_path / "opened.png"
    Image.new("RGB", (8, 6), GREEN).save(path)
    image = load_image(path)
    assert image.size == (8, 6) and image.getpixel((0, 0)) == GREEN
    assert str(path) not in {f.path for f in psutil.Process().open_files()}


def test_url_input_reads_the_served_file(http_root):
    root, base = http_root
    array = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(array).save(root / "photo.png")
    assert torch.equal(image_to_tensor(f"{base}/photo.png"), _expected_8bit(array))


def test_url_errors_name_the_url_and_the_reason(http_root):
    root, base = http_root
    with pytest.raises(ValueError, match=rf"{base}/missing\.png: HTTP 404"):
        load_image(f"{base}/missing.png")
    (root / "page.png").write_text("<html>not a picture</html>")
    with pytest.raises(ValueError, match=rf"{base}/page\.png: cannot identify image file; give a PNG/JPEG/WebP"):
        load_image(f"{base}/page.png")


# ----------------------------------------------------------------------------------------------------------------------
# PIL modes
# ----------------------------------------------------------------------------------------------------------------------


def test_16_bit_grayscale_png_keeps_its_full_range_and_precision(tmp_path):
    gradient = np.linspace(0, 65535, 32 * 64).round().astype(np.uint16).reshape(32, 64)
    path = tmp_path / "depth16.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # what PIL hands over for 16-bit PNGs

    tensor = image_to_tensor(path)
    expected = torch.from_numpy(gradient / 65535 * 2 - 1).float()
    assert tensor.shape == (3, 32, 64)
    for channel in tensor:
        assert torch.allclose(channel, expected, atol=1e-6, rtol=0)
    assert tensor.min() == -1 and tensor.max() == 1
    assert (tensor[0] >= 1 - 1e-6).float().mean() < 0.01  # convert("RGB") would saturate ~99.6% at white
    # neighbouring 16-bit values stay distinct (no trip through 8 bits)
    assert len(torch.unique(tensor[0])) == len(np.unique(gradient))


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")])
def test_16_bit_byte_orders_read_the_same_values(mode, dtype):
    values = np.array([[0, 1, 256, 65535], [1000, 30000, 50000, 65534]], dtype=np.uint16)
    image = Image.frombytes(mode, (4, 2), values.astype(dtype).tobytes())
    expected = torch.from_numpy(values / 65535 * 2 - 1).float()
    assert torch.allclose(image_to_tensor(image)[1], expected, atol=1e-6, rtol=0)


def test_mode_i_is_16_bit_when_it_fits_else_int32_range_and_refuses_negatives():
    small = np.array([[0, 65535], [12345, 40000]], dtype=np.int32)
    assert Image.fromarray(small).mode == "I"
    assert torch.allclose(image_to_tensor(Image.fromarray(small))[0], torch.from_numpy(small / 65535 * 2 - 1).float(),
                          atol=1e-6, rtol=0)
    large = np.array([[0, 2**31 - 1], [2**30, 70000]], dtype=np.int32)
    out = image_to_tensor(Image.fromarray(large))[0]
    assert torch.allclose(out, torch.from_numpy(large / (2**31 - 1) * 2 - 1).float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"sensor: mode I image has negative values \(min -5\)"):
        image_to_tensor(Image.fromarray(np.array([[-5, 3]], dtype=np.int32)), name="sensor")


def test_cmyk_uses_pils_conversion():
    image = Image.new("CMYK", (4, 3), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 3, 4)
    assert torch.equal(tensor[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_ycbcr_and_bilevel_modes():
    ycbcr = Image.new("RGB", (2, 2), (40, 160, 220)).convert("YCbCr")
    assert _close(_rgb_at(image_to_tensor(ycbcr), 0, 0), (40, 160, 220), tolerance=3)

    bilevel = Image.new("1", (3, 2), 0)
    bilevel.putpixel((2, 1), 1)
    tensor = image_to_tensor(bilevel)
    assert tensor[:, 1, 2].tolist() == [1.0, 1.0, 1.0]
    assert tensor[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([*RED, *BLUE])
    for x in range(2):
        for y in range(2):
            image.putpixel((x, y), 1)  # left half: palette entry 1 (blue), declared transparent
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info

    tensor = image_to_tensor(path)
    assert _rgb_at(tensor, 0, 0) == WHITE and _rgb_at(tensor, 1, 1) == WHITE  # stored blue, but transparent
    assert _rgb_at(tensor, 0, 3) == RED


def test_rgba_and_la_alpha_composite_on_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent red
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    for source in (Image.fromarray(rgba, "RGBA"), rgba):
        tensor = image_to_tensor(source)
        assert _rgb_at(tensor, 0, 0) == BLUE
        assert _rgb_at(tensor, 0, 1) == WHITE
        assert _close(_rgb_at(tensor, 0, 2), (127, 127, 127), tolerance=1)

    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA")
    tensor = image_to_tensor(la)
    assert _rgb_at(tensor, 0, 0) == WHITE  # transparent black -> white
    assert _rgb_at(tensor, 0, 1) == (50, 50, 50)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 48 wide x 32 tall with a red top-left block; Orientation 6 means "rotate 90° clockwise to display".
    stored = Image.new("RGB", (48, 32), WHITE)
    stored.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    tensor = image_to_tensor(path)
    assert tensor.shape == (3, 48, 32)  # upright: 32 wide x 48 tall
    assert _close(_rgb_at(tensor, 4, 27), RED)  # stored top-left lands top-right after a clockwise turn
    assert _close(_rgb_at(tensor, 43, 4), WHITE)  # (a counter-clockwise turn would put red bottom-left)
    assert _close(_rgb_at(tensor, 4, 4), WHITE)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 4), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3

    tensor = image_to_tensor(path)
    assert tensor.shape == (3, 4, 6)
    assert _rgb_at(tensor, 2, 3) == RED


def test_mode_f_is_unit_range_clipped_and_refuses_nan(tmp_path):
    depth = np.array([[0.0, 0.25, 1.0, 1.5, -0.2]], dtype=np.float32)
    assert image_to_tensor(Image.fromarray(depth, "F"))[0, 0].tolist() == pytest.approx([-1.0, -0.5, 1.0, 1.0, -1.0])

    depth[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"depth 0: 1 of 5 values are NaN or inf; replace NaN/inf"):
        image_to_tensor(Image.fromarray(depth, "F"), name="depth 0")
    path = tmp_path / "depth.tiff"
    Image.fromarray(depth, "F").save(path)
    with pytest.raises(ValueError, match=rf"{path}: 1 of 5 values are NaN or inf"):
        image_to_tensor(path)


# ----------------------------------------------------------------------------------------------------------------------
# numpy and tensors: ranges and non-finite values are checked, not guessed
# ----------------------------------------------------------------------------------------------------------------------


def test_numpy_uint16_bool_and_unit_float_arrays():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    assert torch.allclose(image_to_tensor(values)[2], torch.from_numpy(values / 65535 * 2 - 1).float(), atol=1e-6)
    assert image_to_tensor(np.array([[True, False]]))[0].tolist() == [[1.0, -1.0]]
    floats = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float64)
    assert image_to_tensor(floats)[:, 0, 0].tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_numpy_non_finite_is_refused_naming_the_input(bad):
    array = np.full((4, 4, 3), 0.5, dtype=np.float32)
    array[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"image 2: 1 of 48 values are NaN or inf; replace NaN/inf .* before passing"):
        image_to_tensor(array, name="image 2")


def test_float_array_outside_unit_range_is_refused_with_the_observed_range():
    array = np.linspace(0, 255, 12, dtype=np.float32).reshape(2, 2, 3)  # a 0..255 float image
    with pytest.raises(ValueError, match=r"image 1: float image arrays must be in \[0, 1\]; got values in \[0, 255\]"):
        image_to_tensor(array, name="image 1")
    slightly_over = np.full((2, 2), 1 + 1e-5, dtype=np.float32)  # float rounding is let through
    assert image_to_tensor(slightly_over).max() == pytest.approx(1.0, abs=1e-4)


def test_tensors_are_taken_as_is_but_checked():
    tensor = torch.rand(1, 3, 5, 7) * 2 - 1
    assert torch.equal(image_to_tensor(tensor), tensor[0])
    with pytest.raises(ValueError, match=r"cond: image tensors must be in \[-1, 1\]; got values in \[0, 255\]"):
        image_to_tensor(torch.linspace(0, 255, 3 * 4).reshape(3, 2, 2), name="cond")
    nan = torch.zeros(3, 2, 2)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cond: 1 of 12 values are NaN or inf"):
        image_to_tensor(nan, name="cond")
    with pytest.raises(TypeError, match=r"cond: image tensors must be floating point"):
        image_to_tensor(torch.zeros(3, 2, 2, dtype=torch.uint8), name="cond")
    with pytest.raises(ValueError, match=r"cond: image tensors must be \(3, H, W\) or \(1, 3, H, W\).*\(4, 2, 2\)"):
        image_to_tensor(torch.zeros(4, 2, 2), name="cond")


def test_wrong_shapes_and_types_are_named():
    with pytest.raises(ValueError, match=r"image 0: image arrays must be .*got shape \(2, 2, 2\)"):
        image_to_tensor(np.zeros((2, 2, 2), dtype=np.uint8), name="image 0")
    with pytest.raises(TypeError, match=r"image 0: image arrays must be uint8 .* got dtype int64"):
        image_to_tensor(np.zeros((2, 2), dtype=np.int64), name="image 0")
    with pytest.raises(TypeError, match=r"image 0: images must be paths, URLs, PIL images, numpy arrays or torch"):
        image_to_tensor([[0, 1]], name="image 0")


def test_missing_and_corrupt_files_are_named(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: no such image file"):
        image_to_tensor(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match=rf"{corrupt}: cannot identify image file; give a PNG/JPEG/WebP"):
        image_to_tensor(corrupt)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match=rf"{truncated}: cannot decode image"):
        image_to_tensor(truncated)


# ----------------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------------


def test_center_crop_resize_same_size_is_the_centre_crop():
    image = torch.arange(3 * 4 * 8, dtype=torch.float32).reshape(3, 4, 8)
    assert torch.equal(center_crop_resize(image, 4, 4), image[:, :, 2:6])  # 8 wide -> centred 4 columns


def test_center_crop_resize_downsamples_bilinearly_without_antialiasing():
    image = torch.rand(3, 8, 12)
    out = center_crop_resize(image, 2, 2)
    crop = image[:, :, 2:10]  # square centre crop of the 8 x 12 image
    # scale 4, align_corners=False: output pixel d samples source 4d + 1.5, the mean of pixels 4d+1 and 4d+2
    # (an antialiased resize would average the whole 4 x 4 block instead)
    expected = torch.stack([torch.stack([crop[:, 4 * i + 1:4 * i + 3, 4 * j + 1:4 * j + 3].mean(dim=(1, 2))
                                         for j in range(2)], dim=-1) for i in range(2)], dim=-2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_center_crop_resize_truncates_the_box_to_whole_pixels():
    image = torch.rand(3, 5, 10)
    # target 3:2 -> crop 5 x 7.5 at left 1.25: truncated to 7 columns starting at column 1
    expected = torch.nn.functional.interpolate(image[None, :, :, 1:8], size=(2, 3), mode="bilinear",
                                               align_corners=False)[0]
    assert torch.equal(center_crop_resize(image, 2, 3), expected)
    odd = torch.rand(3, 4, 7)
    assert torch.equal(center_crop_resize(odd, 4, 4), odd[:, :, 1:5])  # left 1.5 -> 1 (not rounded to 2)


def test_closest_aspect_bucket_and_its_ties():
    assert closest_aspect_bucket(512, 512) == (512, 512)
    assert closest_aspect_bucket(1080, 1920) == (384, 672)  # 0.5625 -> "0.57"
    assert closest_aspect_bucket(10, 10000) == ASPECT_RATIO_512["0.25"]
    assert closest_aspect_bucket(5000, 100) == ASPECT_RATIO_512["4.0"]
    # exact float ties go to the first (smaller) key, as the release's min over the keys
    assert abs(0.72 - 768 / 1024) == abs(0.78 - 768 / 1024)
    assert closest_aspect_bucket(768, 1024) == ASPECT_RATIO_512["0.72"] == (416, 576)
    assert abs(1.75 - 600 / 320) == abs(2.0 - 600 / 320)
    assert closest_aspect_bucket(600, 320) == ASPECT_RATIO_512["1.75"] == (672, 384)


def test_bucket_size_keeps_the_latent_grid_for_other_tokenizers():
    assert bucket_size(768, 1024) == (416, 576)
    assert bucket_size(768, 1024, 16) == (832, 1152)
    assert bucket_size(1080, 1920, 1) == (48, 84)


def test_as_image_list():
    batch = torch.zeros(2, 3, 4, 4)
    assert as_image_list(None) == []
    assert [t.shape for t in as_image_list(batch)] == [(3, 4, 4), (3, 4, 4)]
    single = torch.zeros(3, 4, 4)
    assert len(as_image_list(single)) == 1 and as_image_list(single)[0] is single
    assert as_image_list(("a.png", "b.png")) == ["a.png", "b.png"]
    assert as_image_list("a.png") == ["a.png"]
