"""model/schedule.py: the release's schedule is diffusers' own, and the training condition time equals the
sampler's σ_min bit for bit."""

import json

import numpy as np
import pytest
import torch

from model.schedule import (
    RELEASE_SCHEDULER_CONFIG,
    condition_sigmas,
    dynamic_shift_mu,
    load_scheduler,
    release_num_tokens,
    set_release_timesteps,
)

STATIC = {**RELEASE_SCHEDULER_CONFIG, "use_dynamic_shifting": False, "shift": 3.0}


@pytest.mark.parametrize("num_tokens, mu", [(1024, 0.630), (4096, 1.150), (3072, 0.977)])  # spec §4.4 table
def test_mu_reproduces_the_spec_table(num_tokens, mu):
    assert dynamic_shift_mu(num_tokens) == pytest.approx(mu, abs=1e-3)


def test_release_timesteps_are_the_schedulers_float32_arithmetic():
    """The release calls set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ): the float32 rounding before the shift
    makes the schedule differ from a float64 recomputation, which is why the scheduler itself is used."""
    scheduler = load_scheduler()
    set_release_timesteps(scheduler, 28, num_tokens=4096)
    base = np.linspace(1.0, 1 / 28, 28)
    mu = dynamic_shift_mu(4096)
    float64 = torch.from_numpy(np.exp(mu) / (np.exp(mu) + (1 / base - 1))).float()
    assert scheduler.sigmas.dtype == torch.float32 and scheduler.sigmas[-1] == 0
    torch.testing.assert_close(scheduler.sigmas[:-1], float64, rtol=0, atol=1e-6)
    assert torch.equal(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    mismatches = sum(int(not torch.equal(_release(n, t)[1], _float64(n, t))) for n in (10, 28, 50) for t in
                     (256, 1024, 4096, 12288))
    assert mismatches > 0  # the float64 copy really differs somewhere: the scheduler is not optional


def _release(steps, tokens, config=None):
    scheduler = load_scheduler(config)
    set_release_timesteps(scheduler, steps, tokens)
    return scheduler.timesteps, scheduler.sigmas[:-1]


def _float64(steps, tokens):
    base = np.linspace(1.0, 1 / steps, steps)
    mu = dynamic_shift_mu(tokens)
    return torch.from_numpy(np.exp(mu) / (np.exp(mu) + (1 / base - 1))).float()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["text2image-mu", "img2img-float32-mu"])
@pytest.mark.parametrize("config", [RELEASE_SCHEDULER_CONFIG, STATIC], ids=["dynamic", "static"])
def test_condition_sigmas_equal_the_schedulers_smallest_sigma_exactly(config, dtype):
    """Float64 L stands for the release's text-to-image μ (Python floats), float32 L for its img2img μ (computed
    from a tensor): either way the vector form equals what the scheduler itself gives."""
    tokens = torch.tensor([16, 64, 256, 1000, 1024, 2 * 1024, 4096, 3 * 4096, 6 * 16384, 512.5], dtype=dtype)
    for steps in (1, 2, 7, 20, 28, 50, 100):
        vector = condition_sigmas(config, steps, tokens)
        assert vector.dtype == torch.float32 and vector.shape == tokens.shape
        for value, count in zip(vector, tokens):
            timesteps, sigmas = _release(steps, count if dtype == torch.float32 else count.item(), config)
            assert torch.equal(value, sigmas[-1]) and torch.equal(value * 1000, timesteps[-1]), (steps, count)


def test_the_release_token_count_is_a_float_for_one_view_and_float32_for_several():
    """The release's img2img sums a denoise-mask tensor: L = noise_scale * sum(mask) * w * h / p / p in float32."""
    assert release_num_tokens(1, 96, 64) == 96 * 64 / 4 and isinstance(release_num_tokens(1, 96, 64), float)
    several = release_num_tokens(2, 64, 48, noise_scale=1.3, num_views=4)
    release = 1.3 * sum(torch.tensor([0, 1, 1, 0])) * 48 * 64 / 2 / 2
    assert several.dtype == torch.float32 and torch.equal(several, release)
    assert torch.equal(release_num_tokens(torch.tensor([0, 2]), 64, 48, noise_scale=1.3, num_views=4)[1], release)


def test_schedulers_load_from_a_dict_a_file_or_a_folder_and_unsupported_condition_options_are_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(STATIC))
    for source in (STATIC, tmp_path, tmp_path / "scheduler_config.json"):
        assert load_scheduler(source).config.use_dynamic_shifting is False
    assert load_scheduler().config.use_dynamic_shifting is True
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_scheduler(tmp_path / "missing")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        condition_sigmas({**STATIC, "use_karras_sigmas": True}, 10, torch.tensor([64.0]))
