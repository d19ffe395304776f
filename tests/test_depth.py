"""model.depth: condition maps (relative inverse depth, near = white) and the one affine-invariant depth score."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model.depth import (
    MAP_FLOOR, constant_map, depth_map_to_png8, depth_map_to_uint8, depth_to_map, normalised_inverse_depth,
    score_depth, vertical_ramp_map,
)


@pytest.fixture
def depth():
    """A 24x32 depth image from 1.5 to 9 m with a sky band (0) at the top."""
    rng = np.random.default_rng(0)
    d = rng.uniform(1.5, 9.0, size=(24, 32))
    d[:4] = 0.0
    return d


def test_exact_depth_scores_zero_abs_rel_and_full_delta1(depth):
    score = score_depth(1.0 / np.where(depth > 0, depth, 1.0), depth)  # the true inverse depth itself
    assert score.abs_rel == pytest.approx(0.0, abs=1e-12) and score.delta1 == 1.0
    assert score.scale == pytest.approx(1.0) and score.shift == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("scale, shift", [(3.0, 0.0), (0.2, 5.0), (-4.0, 1.0)])
def test_any_affine_transform_of_the_inverse_depth_scores_like_the_exact_one(depth, scale, shift):
    inverse = np.where(depth > 0, 1.0 / np.where(depth > 0, depth, 1.0), 0.0)
    score = score_depth(scale * inverse + shift, depth)
    assert score.abs_rel == pytest.approx(0.0, abs=1e-9) and score.delta1 == 1.0
    assert score.scale == pytest.approx(1 / scale) and score.shift == pytest.approx(-shift / scale)
    # the condition map is such an affine transform on valid pixels: it scores perfectly too
    assert score_depth(depth_to_map(depth), depth).abs_rel == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, 255.0])
def test_a_constant_map_scores_exactly_like_the_least_squares_constant_inverse_depth(depth, value):
    true = depth[depth > 0]
    best_constant_depth = 1.0 / np.mean(1.0 / true)  # least squares in inverse depth: the mean inverse depth
    expected_abs_rel = np.mean(np.abs(best_constant_depth - true) / true)
    ratio = np.maximum(best_constant_depth / true, true / best_constant_depth)
    score = score_depth(np.full(depth.shape, value), depth)
    assert score.abs_rel == pytest.approx(expected_abs_rel, rel=1e-12)
    assert score.delta1 == pytest.approx(np.mean(ratio < 1.25))
    assert score.scale == 0.0
    assert score_depth(constant_map(depth.shape), depth) == score


def test_the_old_median_baseline_is_not_what_the_constant_map_scores(depth):
    """The demo used to report the median true depth, unfitted, as its constant baseline: a different number."""
    true = depth[depth > 0]
    median_abs_rel = np.mean(np.abs(np.median(true) - true) / true)
    assert score_depth(constant_map(depth.shape), depth).abs_rel != pytest.approx(median_abs_rel, rel=1e-3)


def test_a_poor_fit_is_clipped_to_finite_positive_depth():
    depth = np.array([[1.0, 2.0, 4.0, 8.0]])
    score = score_depth(np.array([[0.0, 0.0, 0.0, 10.0]]), depth)  # fitted inverse depth goes negative
    assert np.isfinite(score.abs_rel) and 0 <= score.delta1 <= 1
    # clipped at the smallest true inverse depth: no predicted depth beyond the farthest true depth (8 m)
    assert score.abs_rel <= np.mean(np.abs(8.0 - depth) / depth)


def test_invalid_true_depth_is_ignored_and_no_valid_pixel_is_an_error(depth):
    perturbed = depth_to_map(depth)
    perturbed[depth == 0] = 123.0  # whatever a model draws in the sky does not count
    assert score_depth(perturbed, depth) == score_depth(depth_to_map(depth), depth)
    with pytest.raises(ValueError, match="no pixel"):
        score_depth(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        score_depth(np.zeros((2, 3)), np.ones((2, 2)))


def test_depth_to_map_near_is_brighter_sky_is_black_and_scale_does_not_matter(depth):
    m = depth_to_map(depth)
    valid = depth > 0
    assert np.all(m[~valid] == 0.0)
    assert m[valid].min() == pytest.approx(MAP_FLOOR) and m[valid].max() == pytest.approx(1.0)
    near, far = np.unravel_index(np.argmin(np.where(valid, depth, np.inf)), depth.shape), \
        np.unravel_index(np.argmax(depth), depth.shape)
    assert m[near] == pytest.approx(1.0) and m[far] == pytest.approx(MAP_FLOOR)
    order = np.argsort(depth[valid])
    assert np.all(np.diff(m[valid][order]) <= 0)  # farther, never brighter
    np.testing.assert_allclose(depth_to_map(depth * 37.0), m, rtol=0, atol=1e-12)  # metres or millimetres
    np.testing.assert_allclose(normalised_inverse_depth(depth * 0.01), normalised_inverse_depth(depth), atol=1e-12)


def test_depth_to_map_of_a_flat_or_empty_image():
    assert np.all(depth_to_map(np.full((3, 3), 4.0)) == 1.0)  # one depth: all "near"
    assert np.all(depth_to_map(np.zeros((3, 3))) == 0.0)  # all sky
    assert np.all(depth_to_map(np.array([[np.inf, np.nan, -1.0]])) == 0.0)  # not finite or not positive: invalid


def test_eight_bit_map_and_png(depth):
    m = depth_to_map(depth)
    eight = depth_map_to_uint8(m)
    assert eight.dtype == np.uint8 and eight.max() == 255 and eight[depth == 0].max() == 0
    back = np.asarray(Image.open(io.BytesIO(depth_map_to_png8(m))))
    assert back.dtype == np.uint8 and back.shape == depth.shape and np.array_equal(back, eight)


def test_vertical_ramp_is_the_exact_depth_of_a_bare_ground_plane():
    """The second baseline's premise, on the renderer: ground and sky only -> the ramp, fitted, is exact."""
    from pipelines.sources.synthetic import resolve_config, synthetic_samples
    from pipelines.sources.synthetic_scene import SyntheticConfig

    config = resolve_config(SyntheticConfig(num_objects=(0, 0), with_figures=False), views_per_scene=2, size=32)
    for sample in synthetic_samples(5, 1, config=config):
        score = score_depth(vertical_ramp_map(sample.depth.shape), sample.depth)
        assert score.abs_rel < 1e-4 and score.delta1 == 1.0
        assert score_depth(constant_map(sample.depth.shape), sample.depth).abs_rel > 100 * score.abs_rel


def test_importing_the_module_does_not_import_torch():
    code = "import sys, model.depth; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_contact_sheet_colours_the_same_normalised_inverse_depth(depth):
    """The contact sheet's colour map sits on model.depth's normalisation: near red, far blue, sky black."""
    from pipelines.contact_sheet import colourise_depth

    rgb = colourise_depth(depth)
    valid = depth > 0
    near = np.unravel_index(np.argmin(np.where(valid, depth, np.inf)), depth.shape)
    far = np.unravel_index(np.argmax(depth), depth.shape)
    assert tuple(rgb[near]) == (0x9E, 0x01, 0x42) and tuple(rgb[far]) == (0x5E, 0x4F, 0xA2)
    assert np.all(rgb[~valid] == 0)
    np.testing.assert_array_equal(colourise_depth(depth * 1000.0), rgb)  # scale-free, like the condition map
