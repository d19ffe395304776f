"""model.conditions: each condition map has exactly the format the build writes, labelers produce and evaluation reads.

Inputs are small synthetic pictures built in numpy, so every expected pixel is known.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from model import conditions
from model.conditions import (
    COCO_SKELETON,
    CONDITION_RENDERERS,
    JOINT_COLOURS,
    LIMB_COLOURS,
    MASK_FILL,
    blur_image,
    box_condition,
    canny_map,
    colour_rgb,
    depth_condition,
    draw_box_outlines,
    hex_to_rgb,
    inpaint_mask,
    instance_condition,
    masked_image,
    pose_condition,
    pose_line_width,
    semantic_condition,
)
from model.depth import depth_map_to_uint8, depth_to_map
from model.tasks import PALETTE, TASKS


def _is_rgb_map(a: np.ndarray, shape_hw) -> bool:
    return a.dtype == np.uint8 and a.shape == (*shape_hw, 3)


def _square(size=32, lo=8, hi=24, value=255) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[lo:hi, lo:hi] = value
    return image


# ----------------------------------------------------------------------------------------------------------------------
# colours


def test_hex_to_rgb_and_colour_forms():
    assert hex_to_rgb("#00FFFF") == (0, 255, 255) == hex_to_rgb("00ffff")
    assert colour_rgb("cyan") == colour_rgb(PALETTE["cyan"]) == colour_rgb((0, 255, 255)) == (0, 255, 255)
    assert colour_rgb({"name": "navy", "hex": "#000080"}) == (0, 0, 128)  # Sample.meta's prompt colour entries
    for bad in ("#12345", "#GGGGGG", "notacolour", (1, 2), (0, 0, 256)):
        with pytest.raises(ValueError, match="colour"):
            colour_rgb(bad)


def test_skeleton_is_the_synthetic_sources_one():
    from pipelines.sources.synthetic_scene import COCO_SKELETON as SOURCE_SKELETON

    assert COCO_SKELETON == SOURCE_SKELETON
    assert len(LIMB_COLOURS) == len(COCO_SKELETON) and len(JOINT_COLOURS) == 17


def test_every_condition_view_role_has_a_renderer():
    roles = {role for task in TASKS.values() for role in task.view_roles}
    drawable = roles - {"image", "hed", "source_image", "reference", "rays"}  # no renderer: models or real pictures
    assert drawable <= set(CONDITION_RENDERERS), drawable - set(CONDITION_RENDERERS)
    assert CONDITION_RENDERERS["pose"] is pose_condition and CONDITION_RENDERERS["depth"] is depth_condition


# ----------------------------------------------------------------------------------------------------------------------
# canny, blur, inpainting


def test_canny_marks_the_square_border_and_nothing_inside_or_outside():
    edges = canny_map(_square())
    assert _is_rgb_map(edges, (32, 32))
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    on = edges[..., 0] > 0
    assert not on[10:22, 10:22].any()  # flat inside
    assert not on[:6].any() and not on[26:].any() and not on[:, :6].any() and not on[:, 26:].any()  # flat outside
    for side in (on[6:10, 8:24], on[22:26, 8:24], on[8:24, 6:10], on[8:24, 22:26]):  # each side has its edge
        assert side.any(axis=0 if side.shape[0] < side.shape[1] else 1).all()


def test_canny_of_a_flat_image_is_black():
    assert not canny_map(np.full((16, 20, 3), 77, dtype=np.uint8)).any()


def test_blur_is_seeded_and_sigma_in_range():
    image = _square()
    blurred, sigma, ksize = blur_image(image, np.random.default_rng(7))
    again, sigma_again, _ = blur_image(image, np.random.default_rng(7))
    assert sigma == sigma_again and np.array_equal(blurred, again) and ksize == int(round(sigma * 6 + 1)) | 1
    assert 1.0 <= sigma <= 3.0 and _is_rgb_map(blurred, (32, 32))
    assert sigma == np.random.default_rng(7).uniform(1.0, 3.0)  # one uniform draw: the build can replay it
    assert 0 < blurred[8, 16, 0] < 255 and not np.array_equal(blurred, image)  # the edge is smeared
    for seed in range(20):
        assert 0.5 <= blur_image(image, seed, sigma_range=(0.5, 0.6))[1] <= 0.6
    with pytest.raises(ValueError, match="sigma_range"):
        blur_image(image, 0, sigma_range=(2.0, 1.0))


def test_blur_reflects_at_the_border():
    import cv2

    image = _square(value=200)
    blurred, sigma, ksize = blur_image(image, np.random.default_rng(3))
    expected = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    assert np.array_equal(blurred, expected)
    # the kernel size reported for ksize (0, 0) is the one OpenCV derived: the same pixels when given explicitly
    assert np.array_equal(blurred, cv2.GaussianBlur(image, (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                                                    borderType=cv2.BORDER_REFLECT))


def test_blur_kernel_size_is_drawn_odd_from_its_range():
    import cv2

    image = _square()
    sizes = set()
    for seed in range(40):
        blurred, sigma, ksize = blur_image(image, seed, sigma_range=(1.0, 3.0), kernel_range=(3, 11))
        assert ksize in (3, 5, 7, 9, 11)
        sizes.add(ksize)
        assert np.array_equal(blurred, cv2.GaussianBlur(image, (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                                                        borderType=cv2.BORDER_REFLECT))
    assert sizes == {3, 5, 7, 9, 11}
    assert blur_image(image, 0, kernel_range=(5, 5))[2] == 5
    for bad in ((4, 9), (3, 8), (9, 3), (-1, 3)):
        with pytest.raises(ValueError, match="kernel_range"):
            blur_image(image, 0, kernel_range=bad)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (17, 9), (3, 4)])
def test_inpaint_mask_fraction_seed_and_masked_pixels(shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    holes = set()
    for seed in range(40):
        mask = inpaint_mask(shape, np.random.default_rng(seed))
        assert mask.dtype == np.bool_ and mask.shape == shape
        assert 0.1 <= mask.mean() <= 0.5, (seed, mask.mean())
        assert np.array_equal(mask, inpaint_mask(shape, np.random.default_rng(seed)))
        holes.add(mask.tobytes())
        out = masked_image(image, mask)
        assert _is_rgb_map(out, shape)
        assert (out[mask] == MASK_FILL).all()
        assert np.array_equal(out[~mask], image[~mask])
    assert len(holes) > (30 if min(shape) >= 9 else 3)  # different seeds, different holes


def test_inpaint_mask_other_ranges_and_refusals():
    for seed in range(20):
        mask = inpaint_mask((40, 50), seed, min_fraction=0.3, max_fraction=0.35)
        assert 0.3 <= mask.mean() <= 0.35
        assert inpaint_mask((40, 50), seed, 0.5, 0.5).sum() == 1000
    with pytest.raises(ValueError, match="whole pixel"):
        inpaint_mask((2, 2), 0, 0.1, 0.2)
    with pytest.raises(ValueError, match="min_fraction"):
        inpaint_mask((8, 8), 0, 0.6, 0.5)
    with pytest.raises(ValueError, match="mask must be bool"):
        masked_image(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), bool))


def test_inpaint_mask_shapes_are_chosen_by_the_caller():
    from scipy import ndimage

    full = [inpaint_mask((64, 64), seed) for seed in range(30)]
    assert all(np.array_equal(m, inpaint_mask((64, 64), seed, shapes=("strokes", "rectangle", "rectangles")))
               for seed, m in enumerate(full))  # the order a config lists them in changes nothing
    single = [inpaint_mask((64, 64), seed, 0.1, 0.3, shapes=["rectangle"]) for seed in range(30)]
    assert all(ndimage.label(one)[1] == 1 and 0.1 <= one.mean() <= 0.3 for one in single)
    stroked = [inpaint_mask((64, 64), seed, 0.1, 0.3, shapes=["strokes"]) for seed in range(30)]
    assert all(not np.array_equal(a, b) for a, b in zip(stroked, single))
    for bad in ([], ["circle"]):
        with pytest.raises(ValueError, match="shapes must be"):
            inpaint_mask((64, 64), 0, shapes=bad)


# ----------------------------------------------------------------------------------------------------------------------
# depth, semantic, instance


def test_depth_condition_is_model_depths_map_on_three_channels():
    depth = np.linspace(1.0, 9.0, 12 * 10, dtype=np.float32).reshape(12, 10)
    depth[0, :4] = 0.0  # sky
    out = depth_condition(depth)
    assert _is_rgb_map(out, (12, 10))
    expected = depth_map_to_uint8(depth_to_map(depth))
    for c in range(3):
        assert np.array_equal(out[..., c], expected)
    assert (out[0, :4] == 0).all() and (out[-1, -1] == round(255 * 0.1)).all() and (out[0, 4] == 255).all()


def test_semantic_condition_paints_exact_colours_and_leaves_the_rest_black():
    classes = ["sky", "ground", "sphere", "cube"]
    semantic = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.int32)
    out = semantic_condition(semantic, classes, {"sphere": "#00FFFF", "cube": "#FF8C00", "unused": "#123456"})
    assert _is_rgb_map(out, (2, 4))
    assert out[0, 2].tolist() == [0, 255, 255] and out[1, 1].tolist() == [0, 255, 255]
    assert out[0, 3].tolist() == [255, 140, 0] and out[1, 0].tolist() == [255, 140, 0]
    assert not out[0, :2].any() and not out[1, 2:].any()
    with pytest.raises(ValueError, match="index `classes`"):
        semantic_condition(semantic, classes[:2], {})


def test_semantic_condition_reads_a_synthetic_samples_prompt_colours():
    from pipelines.sources.synthetic import synthetic_samples

    sample = next(iter(synthetic_samples(seed=0, num_scenes=1, views_per_scene=1, size=32)))
    colours = {c: v["hex"] for c, v in sample.meta["prompts"]["class_colours"].items()}
    out = semantic_condition(sample.semantic, sample.classes, colours)
    for index, name in enumerate(sample.classes):
        pixels = out[sample.semantic == index]
        expected = hex_to_rgb(colours[name]) if name in colours else (0, 0, 0)
        assert (pixels == expected).all(), name


def test_instance_condition():
    instance = np.array([[0, 1, 2], [2, 7, 0]], dtype=np.int32)
    out = instance_condition(instance, {1: "#FF0000", 2: "lime"})
    assert _is_rgb_map(out, (2, 3))
    assert out[0, 1].tolist() == [255, 0, 0] and out[0, 2].tolist() == out[1, 0].tolist() == [0, 255, 0]
    assert not out[0, 0].any() and not out[1, 1].any() and not out[1, 2].any()


# ----------------------------------------------------------------------------------------------------------------------
# boxes


def test_box_condition_outline_pixels_are_exact():
    out = box_condition((20, 30), [(2, 3, 12, 15)], ["#00FFFF"], width=2)
    assert _is_rgb_map(out, (20, 30))
    cyan = (out == (0, 255, 255)).all(axis=2)
    expected = np.zeros((20, 30), bool)
    expected[3:15, 2:12] = True
    expected[5:13, 4:10] = False  # the inside, 2 pixels in from each edge
    assert np.array_equal(cyan, expected)
    assert not out[~expected].any()  # black elsewhere


def test_later_boxes_are_drawn_over_earlier_ones_and_clipped():
    out = box_condition((16, 16), [(0, 0, 10, 10), (5, 5, 30, 30)], ["red", "blue"], width=1)
    assert out[5, 9].tolist() == [0, 0, 255]  # the blue box's top edge crosses the red box's right edge
    assert out[9, 0].tolist() == [255, 0, 0] and out[15, 10].tolist() == [0, 0, 0]  # blue's bottom lies outside
    assert out[15, 5].tolist() == [0, 0, 255]  # blue's left edge runs to the image border
    with pytest.raises(ValueError, match="one colour per box"):
        box_condition((8, 8), [(0, 0, 4, 4)], [])


def test_box_outlines_match_pil_rectangles():
    """The contact sheet used PIL's rectangle; the shared outline draws the same pixels (boxes >= 2 px tall)."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(5, 40, 2))
        width = int(rng.integers(1, 4))
        canvas = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = int(rng.integers(-5, w)), int(rng.integers(-5, h))
            least = 1 if width == 1 else 2 * width
            boxes.append((x0, y0, x0 + int(rng.integers(least, 20)), y0 + int(rng.integers(max(least, 2), 20))))
        colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in boxes]
        pil = Image.fromarray(canvas)
        draw = ImageDraw.Draw(pil)
        for (x0, y0, x1, y1), colour in zip(boxes, colours):
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=width)
        assert np.array_equal(draw_box_outlines(canvas, boxes, colours, width), np.asarray(pil))


# ----------------------------------------------------------------------------------------------------------------------
# pose


def _person(points: dict[int, tuple[float, float, float]]) -> np.ndarray:
    keypoints = np.zeros((1, 17, 3), dtype=np.float32)
    for joint, xyv in points.items():
        keypoints[0, joint] = xyv
    return keypoints


def test_pose_visible_limb_draws_its_colour_and_joints_sit_on_top():
    # limb 7 of COCO_SKELETON is (5, 6): the shoulders
    assert COCO_SKELETON[7] == (5, 6)
    keypoints = _person({5: (10.5, 20.5, 2), 6: (50.5, 20.5, 1)})
    out = pose_condition((64, 64), keypoints)
    assert _is_rgb_map(out, (64, 64))
    assert out[20, 30].tolist() == list(LIMB_COLOURS[7])  # the middle of the limb
    assert out[20, 10].tolist() == list(JOINT_COLOURS[5]) and out[20, 50].tolist() == list(JOINT_COLOURS[6])
    colours = {tuple(c) for c in out.reshape(-1, 3).tolist()}
    assert colours == {(0, 0, 0), LIMB_COLOURS[7], JOINT_COLOURS[5], JOINT_COLOURS[6]}
    assert np.array_equal(out, pose_condition((64, 64), keypoints.copy()))  # deterministic


def test_pose_invisible_joint_draws_nothing():
    visible_one = pose_condition((32, 32), _person({5: (10, 10, 2), 6: (20, 10, 0)}))
    lone = pose_condition((32, 32), _person({5: (10, 10, 2)}))
    assert np.array_equal(visible_one, lone)  # the v = 0 joint and its limb add nothing
    assert not pose_condition((32, 32), _person({5: (10, 10, 0), 6: (20, 10, 0)})).any()
    assert not pose_condition((32, 32), np.zeros((0, 17, 3), np.float32)).any()


def test_pose_line_width_scales_with_the_image():
    assert pose_line_width((64, 64)) == 1 and pose_line_width((512, 768)) == 4 and pose_line_width((1024, 1024)) == 8
    keypoints = _person({11: (40.5, 100.5, 2), 12: (200.5, 100.5, 2)})  # the hips, limb (11, 12)
    out = pose_condition((256, 256), keypoints, joint_radius=0)
    limb = (out == LIMB_COLOURS[COCO_SKELETON.index((11, 12))]).all(axis=2)
    assert limb[:, 120].sum() == pose_line_width((256, 256)) == 2
    with pytest.raises(ValueError, match=r"\(P, 17, 3\)"):
        pose_condition((8, 8), np.zeros((17, 3), np.float32))


def test_renderers_take_only_uint8_rgb_images():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        canny_map(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        blur_image(np.zeros((8, 8, 3), np.float32), 0)
    assert conditions.__all__  # the module documents its public names
