"""Aspect-ratio buckets at 256 / 512 / 1024 (model.images) and bucketing a whole Sample with its labels
(pipelines.bucket): the image takes the inference pipeline's exact path, every label follows the same crop box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.images import (
    ASPECT_RATIO_256,
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    ASPECT_RATIO_TABLES,
    bucket_size,
    center_crop_box,
    center_crop_resize,
    closest_aspect_bucket,
    image_to_tensor,
)
from pipelines.bucket import bucket_for, bucket_sample
from pipelines.record import Sample


@pytest.fixture(scope="module")
def synthetic_sample() -> Sample:
    from pipelines.sources.synthetic import synthetic_samples

    return next(iter(synthetic_samples(seed=0, num_scenes=1, views_per_scene=1, size=64)))


# ----------------------------------------------------------------------------------------------------------------------
# bucket tables


def test_tables_are_the_releases():
    # values copied from the release's onediffusion/dataset/utils.py
    assert ASPECT_RATIO_256["0.25"] == (128, 512) and ASPECT_RATIO_256["0.48"] == (176, 368)
    assert ASPECT_RATIO_256["1.0"] == (256, 256) and ASPECT_RATIO_256["4.0"] == (512, 128)
    assert ASPECT_RATIO_1024["0.25"] == (512, 2048) and ASPECT_RATIO_1024["0.57"] == (768, 1344)
    assert ASPECT_RATIO_1024["1.0"] == (1024, 1024) and ASPECT_RATIO_1024["3.62"] == (1856, 512)
    assert list(ASPECT_RATIO_256) == list(ASPECT_RATIO_512) == list(ASPECT_RATIO_1024)  # same keys, same order
    assert ASPECT_RATIO_TABLES == {256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024}
    for table in ASPECT_RATIO_TABLES.values():
        assert all(h % 8 == 0 and w % 8 == 0 for h, w in table.values())


def test_closest_bucket_and_bucket_size_per_resolution():
    assert closest_aspect_bucket(1080, 1920) == closest_aspect_bucket(1080, 1920, 512) == (384, 672)
    assert closest_aspect_bucket(1080, 1920, resolution=256) == (192, 336)
    assert closest_aspect_bucket(1080, 1920, resolution=1024) == (768, 1344)
    assert closest_aspect_bucket(10, 10000, 1024) == ASPECT_RATIO_1024["0.25"]
    assert bucket_size(768, 1024) == bucket_size(768, 1024, 8, 512) == (416, 576)
    assert bucket_size(768, 1024, resolution=256) == (208, 288)
    assert bucket_size(768, 1024, 16, resolution=1024) == (1664, 2304)  # the latent grid of f = 8, times 16


@pytest.mark.parametrize("resolution", [0, 48, 300, 4096, "512", True, 96.5])
def test_unknown_resolutions_are_refused_with_the_supported_ones(resolution):
    with pytest.raises(ValueError, match=r"256, 512 or 1024, or a multiple of 16 from 64 to 2048"):
        closest_aspect_bucket(100, 100, resolution)
    with pytest.raises(ValueError, match=r"256, 512 or 1024"):
        bucket_size(100, 100, resolution=resolution)


def test_other_resolutions_scale_the_512_table_to_whole_tokens():
    from model.images import aspect_ratio_table

    for resolution in (64, 128, 384, 768, 2048):
        table = aspect_ratio_table(resolution)
        assert list(table) == list(ASPECT_RATIO_512)
        for key, (h, w) in table.items():
            assert h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16
            h512, w512 = ASPECT_RATIO_512[key]
            assert abs(h - h512 * resolution / 512) <= 8 and abs(w - w512 * resolution / 512) <= 8
    assert closest_aspect_bucket(64, 64, 64) == (64, 64) and closest_aspect_bucket(64, 128, 64) == (48, 96)
    assert aspect_ratio_table(128)["1.0"] == (128, 128) and aspect_ratio_table(768)["0.5"] == (528, 1056)


def test_bucket_for_samples_and_sizes(synthetic_sample):
    assert bucket_for(synthetic_sample, 256) == (256, 256) == closest_aspect_bucket(64, 64, 256)
    assert bucket_for((480, 640), 1024) == closest_aspect_bucket(480, 640, 1024) == (832, 1152)
    assert bucket_for((480, 640)) == (416, 576)
    with pytest.raises(ValueError, match="height, width"):
        bucket_for("480x640", 512)


# ----------------------------------------------------------------------------------------------------------------------
# the crop box


def _release_center_crop_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """center_crop_resize as it was written before center_crop_box was factored out."""
    in_h, in_w = float(image.shape[-2]), float(image.shape[-1])
    target_aspect = width / height
    if in_w / in_h > target_aspect:
        crop_h, crop_w = in_h, in_h * target_aspect
    else:
        crop_h, crop_w = in_w / target_aspect, in_w
    top, left = int((in_h - crop_h) / 2), int((in_w - crop_w) / 2)
    cropped = image[:, top:top + int(crop_h), left:left + int(crop_w)]
    return F.interpolate(cropped[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def test_center_crop_resize_is_bit_identical_to_before():
    generator = torch.Generator().manual_seed(0)
    for in_h, in_w, h, w in [(64, 64, 48, 64), (37, 91, 16, 24), (91, 37, 40, 8), (100, 100, 100, 100),
                             (33, 65, 352, 736), (7, 5, 3, 11)]:
        image = torch.rand(3, in_h, in_w, generator=generator) * 2 - 1
        assert torch.equal(center_crop_resize(image, h, w), _release_center_crop_resize(image, h, w))


def test_center_crop_box():
    assert center_crop_box(64, 64, 48, 64) == (8, 0, 48, 64)
    assert center_crop_box(64, 64, 64, 48) == (0, 8, 64, 48)
    assert center_crop_box(5, 8, 4, 4) == (0, 1, 5, 5)  # left 1.5 truncated to 1
    with pytest.raises(ValueError, match="positive"):
        center_crop_box(0, 10, 4, 4)


# ----------------------------------------------------------------------------------------------------------------------
# bucketing a sample


def _pipeline_path(image: np.ndarray, h: int, w: int) -> np.ndarray:
    expected = center_crop_resize(image_to_tensor(image), h, w)
    return ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_image_takes_the_pipelines_path_within_one_level(synthetic_sample):
    for h, w in [(48, 64), (32, 32), (96, 128), (40, 24)]:
        out = bucket_sample(synthetic_sample, h, w)
        expected = _pipeline_path(synthetic_sample.image, h, w)
        assert out.image.dtype == np.uint8 and out.image.shape == (h, w, 3)
        difference = np.abs(out.image.astype(int) - expected)
        # Off by one only where the exact value is (near) a .5 tie: an exact 2:1 halving makes many, which the
        # float32 path resolves by its rounding noise and the float64 one half to even.
        assert difference.max() <= 1 and (difference > 0).mean() < 0.1, (h, w)
    same = bucket_sample(synthetic_sample, 64, 64)
    assert np.array_equal(same.image, synthetic_sample.image)  # the same size is the identity
    assert same.differences(synthetic_sample) == []


def test_bucketed_pixels_do_not_depend_on_the_thread_count():
    """torch's float32 bilinear kernel moves pixels by one level between 1 and 2 threads (a Ray worker and a
    two-thread process built different bytes); the build's resize is the same whatever torch is set to."""
    from pipelines.bucket import _resize_image

    image = np.cumsum(np.random.default_rng(0).integers(0, 256, (480, 640, 3)), axis=1).astype(np.uint8)
    threads = torch.get_num_threads()
    try:
        outputs, torch_outputs = [], []
        for count in (1, 2):
            torch.set_num_threads(count)
            outputs.append(_resize_image(image, 208, 288))
            torch_outputs.append(_pipeline_path(image, 208, 288))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(outputs[0], outputs[1])
    assert np.abs(outputs[0].astype(int) - torch_outputs[0]).max() <= 1


@pytest.mark.parametrize("size", [(48, 64), (64, 48), (32, 32), (40, 40), (96, 128), (24, 56)])
def test_bucketed_synthetic_sample_stays_valid(synthetic_sample, size):
    digest = synthetic_sample.content_digest()
    out = bucket_sample(synthetic_sample, *size)
    assert synthetic_sample.content_digest() == digest  # the input is left alone
    out.validate()
    assert out.image.shape == (*size, 3)
    for name in ("depth", "instance", "semantic"):
        assert getattr(out, name).shape == size and getattr(out, name).dtype == getattr(synthetic_sample, name).dtype
    # labels keep only ids (and depths) that existed; sky stays 0
    assert set(np.unique(out.instance)) <= set(np.unique(synthetic_sample.instance))
    assert set(np.unique(out.semantic)) <= set(np.unique(synthetic_sample.semantic))
    assert set(np.unique(out.depth)) <= set(np.unique(synthetic_sample.depth))
    sky = synthetic_sample.classes.index("sky")
    assert np.array_equal(out.depth == 0, out.semantic == sky)
    assert (out.key, out.source, out.group, out.classes) == (synthetic_sample.key, synthetic_sample.source,
                                                             synthetic_sample.group, synthetic_sample.classes)
    assert out.captions == synthetic_sample.captions and out.meta == synthetic_sample.meta
    assert out.camera["width"] == size[1] and out.camera["height"] == size[0]
    for name in ("c2w_opengl", "w2c_opencv"):
        assert np.array_equal(out.camera[name], synthetic_sample.camera[name])
    assert Sample.from_wds(out.to_wds()).differences(out) == []  # still writes and reads back exactly


def _project(camera: dict, points: np.ndarray) -> np.ndarray:
    cam = (np.asarray(camera["w2c_opencv"]) @ np.c_[points, np.ones(len(points))].T)[:3]
    uvw = np.asarray(camera["K"]) @ cam
    return (uvw[:2] / uvw[2]).T


@pytest.mark.parametrize("size", [(48, 64), (64, 48), (24, 56), (96, 128)])
def test_new_intrinsics_project_where_the_crop_and_scale_move_old_projections(synthetic_sample, size):
    out = bucket_sample(synthetic_sample, *size)
    top, left, crop_h, crop_w = center_crop_box(64, 64, *size)
    scale = np.array([size[1] / crop_w, size[0] / crop_h])
    centres = np.array([e["centre"] for e in synthetic_sample.entities], dtype=np.float64)
    old = _project(synthetic_sample.camera, centres)
    np.testing.assert_allclose(_project(out.camera, centres), (old - [left, top]) * scale, rtol=0, atol=1e-9)


@pytest.mark.parametrize("size", [(48, 64), (24, 56), (96, 128), (20, 20)])
def test_keypoints_move_with_the_crop_and_scale(synthetic_sample, size):
    out = bucket_sample(synthetic_sample, *size)
    top, left, crop_h, crop_w = center_crop_box(64, 64, *size)
    old = synthetic_sample.keypoints.astype(np.float64)
    inside = (old[..., 2] > 0) & (old[..., 0] >= left) & (old[..., 0] < left + crop_w) & (old[..., 1] >= top) \
        & (old[..., 1] < top + crop_h)
    assert out.keypoints.dtype == np.float32 and out.keypoints.shape == old.shape
    np.testing.assert_array_equal(out.keypoints[..., 2], np.where(inside, old[..., 2], 0))
    expected = (old[..., :2] - [left, top]) * [size[1] / crop_w, size[0] / crop_h]
    np.testing.assert_allclose(out.keypoints[inside][:, :2], expected[inside], atol=1e-4)
    assert not out.keypoints[~inside].any()  # dropped points read as absent COCO points (0, 0, 0)
    new = out.keypoints[inside]
    assert (new[:, 0] >= 0).all() and (new[:, 0] < size[1]).all() and (new[:, 1] >= 0).all() \
        and (new[:, 1] < size[0]).all()


def test_a_crop_that_cuts_keypoints_off_hides_them(synthetic_sample):
    out = bucket_sample(synthetic_sample, 16, 64)  # keeps rows 24..39 only
    kept = synthetic_sample.keypoints[..., 1]
    hidden = (kept < 24) | (kept >= 40)
    assert hidden[synthetic_sample.keypoints[..., 2] > 0].any()  # the test exercises a cut
    assert (out.keypoints[..., 2][hidden] == 0).all()


def _grid_sample(h: int, w: int) -> Sample:
    """A sample whose instance id names its pixel (row * w + col + 1), with a depth, keypoints and boxes."""
    ids = (np.arange(h * w, dtype=np.int32) + 1).reshape(h, w)
    keypoints = np.zeros((1, 17, 3), np.float32)
    keypoints[0, :4] = [(0.5, 0.5, 2), (w - 0.5, h - 0.5, 1), (w / 2, h / 2, 2), (1.0, h / 2, 2)]
    return Sample(
        key="grid", source="test", image=np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8),
        depth=np.where(ids % 5 == 0, 0, ids).astype(np.float32), depth_kind="z", instance=ids,
        semantic=(ids % 3).astype(np.int32), classes=["a", "b", "c"],
        # entity ids outside the instance map's: boxes without a mask, mapped geometrically
        entities=[{"id": -1, "class": "a", "bbox_2d": [0, 0, 4, 4]},  # in the left corner
                  {"id": -2, "class": "b", "bbox_2d": [w // 2 - 2, 0, w // 2 + 2, h]},  # straddles the centre
                  {"id": -3, "class": "c", "bbox_2d": None}, {"id": -4, "class": "a"}],
        keypoints=keypoints,
    ).validate()


@pytest.mark.parametrize("size", [(10, 10), (13, 31), (40, 20), (7, 7), (64, 16)])
def test_labels_sample_the_pixel_each_output_centre_maps_back_to(size):
    h, w = 20, 30
    sample = _grid_sample(h, w)
    out = bucket_sample(sample, *size)
    top, left, crop_h, crop_w = center_crop_box(h, w, *size)
    rows = np.floor(top + (np.arange(size[0]) + 0.5) * crop_h / size[0]).astype(int)
    cols = np.floor(left + (np.arange(size[1]) + 0.5) * crop_w / size[1]).astype(int)
    np.testing.assert_array_equal(out.instance, sample.instance[rows[:, None], cols[None, :]])
    np.testing.assert_array_equal(out.semantic, sample.semantic[rows[:, None], cols[None, :]])
    np.testing.assert_array_equal(out.depth, sample.depth[rows[:, None], cols[None, :]])
    # a keypoint still sits on the pixel (instance id) it sat on: same geometry for points and maps
    for point_old, point_new in zip(sample.keypoints[0], out.keypoints[0]):
        if point_new[2] > 0:
            old_id = sample.instance[int(point_old[1]), int(point_old[0])]
            new_row, new_col = int(point_new[1]), int(point_new[0])
            back = (int(top + (new_row + 0.5) * crop_h / size[0]), int(left + (new_col + 0.5) * crop_w / size[1]))
            assert abs(sample.instance[back] - old_id) <= w + 1  # within one pixel of where it was


def test_boxes_are_mapped_clipped_and_dropped():
    sample = _grid_sample(20, 30)
    out = bucket_sample(sample, 20, 20)  # keeps columns 5..24
    boxes = {e["id"]: e.get("bbox_2d", "absent") for e in out.entities}
    assert boxes[-1] is None  # [0, 4) lies left of the crop
    assert boxes[-2] == [8, 0, 12, 20]  # [13, 17) - 5
    assert boxes[-3] is None and boxes[-4] == "absent"  # no box stays no box; no field gets none added
    scaled = bucket_sample(sample, 10, 10)  # crop 20 x 20 at column 5, then half size
    assert {e["id"]: e.get("bbox_2d") for e in scaled.entities}[-2] == [4, 0, 6, 10]


def test_boxes_are_their_resized_instance_masks_boxes(synthetic_sample):
    seen = 0
    for size in [(48, 64), (24, 56), (96, 128), (20, 20), (64, 24)]:
        out = bucket_sample(synthetic_sample, *size)
        for entity in out.entities:
            rows, cols = np.nonzero(out.instance == entity["id"])
            if entity["bbox_2d"] is None:
                assert rows.size == 0
                continue
            seen += 1
            assert entity["bbox_2d"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert seen >= 5


def test_an_image_only_sample_and_bad_sizes():
    sample = Sample(key="plain", source="test", image=np.zeros((30, 50, 3), np.uint8), captions={"original": "x"})
    out = bucket_sample(sample, *bucket_for(sample, 256))
    assert out.image.shape == (*closest_aspect_bucket(30, 50, 256), 3) and out.captions == {"original": "x"}
    assert out.depth is None and out.keypoints is None and out.camera is None and out.entities is None
    with pytest.raises(ValueError, match="positive"):
        bucket_sample(sample, 0, 16)
