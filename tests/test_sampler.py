"""model/sampler.py: Euler sampling through diffusers' scheduler with clean condition views and text CFG."""

import pytest
import torch

from model.schedule import RELEASE_SCHEDULER_CONFIG, load_scheduler, set_release_timesteps
from model.sampler import sample
from stand_in_denoisers import ConstantVelocity, OracleDenoiser, TinyDenoiser, text_with_id

STATIC_SCHEDULER = load_scheduler({**RELEASE_SCHEDULER_CONFIG, "use_dynamic_shifting": False})


# ----------------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [True, False])
def test_euler_with_the_exact_velocity_lands_on_the_data(dynamic):
    x0 = torch.randn(1, 1, 16, 8, 8)
    states, mask = text_with_id([0])
    scheduler = load_scheduler() if dynamic else STATIC_SCHEDULER
    out = sample(OracleDenoiser(x0), text_states=states, text_mask=mask, latents_shape=(1, 1, 16, 8, 8),
                 num_steps=12, scheduler=scheduler, seed=3)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_condition_views_are_clean_at_sigma_min_and_reimposed_every_step():
    x0 = torch.randn(2, 3, 16, 4, 4)
    cond_mask = torch.tensor([True, False, True])
    states, mask = text_with_id([0, 0])
    model = OracleDenoiser(x0[:1])
    seen = []
    out = sample(model, text_states=states, text_mask=mask, condition_latents=x0[:1].expand(2, -1, -1, -1, -1),
                 condition_mask=cond_mask, num_steps=6, seed=0,
                 callback=lambda step, n, sigma, latents: seen.append(latents.clone()))
    reference = load_scheduler()
    set_release_timesteps(reference, 6, num_tokens=1 * 2 * 2)  # 1 target view of (4/2)(4/2) tokens
    assert len(model.calls) == 6 and len(seen) == 6
    for step, call in enumerate(model.calls):
        t = call["timesteps"]  # per view (B, T), exactly the scheduler's values
        assert t.shape == (2, 3)
        assert torch.equal(t[:, 0], reference.timesteps[-1].expand(2)) and torch.equal(t[:, 2], t[:, 0])
        assert torch.equal(t[:, 1], reference.timesteps[step].expand(2))
        torch.testing.assert_close(call["samples"][:, cond_mask], x0[:1, cond_mask].expand(2, -1, -1, -1, -1))
        torch.testing.assert_close(seen[step][:, cond_mask], x0[:1, cond_mask].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(out, x0[:1].expand(2, -1, -1, -1, -1), atol=1e-4, rtol=1e-4)


def test_cfg_combines_both_branches_in_one_call():
    model = ConstantVelocity(a=2.0, b=-1.0)
    pos_states, pos_mask = text_with_id([1])
    neg_states, neg_mask = text_with_id([0], length=6)  # a longer negative prompt is padded, not rejected
    noise = torch.randn(1, 1, 16, 4, 4)
    out = sample(model, text_states=pos_states, text_mask=pos_mask, negative_text_states=neg_states,
                 negative_text_mask=neg_mask, noise=noise, guidance_scale=4.0, num_steps=5,
                 scheduler=STATIC_SCHEDULER)
    # constant v integrated from σ=1 to σ=0: x = noise − v, v = b + w (a − b)
    torch.testing.assert_close(out, noise - (-1.0 + 4.0 * 3.0), atol=1e-5, rtol=1e-5)
    assert model.batch_sizes == [2] * 5
    no_cfg = sample(model, text_states=pos_states, text_mask=pos_mask, noise=noise, guidance_scale=1.0, num_steps=5)
    torch.testing.assert_close(no_cfg, noise - 2.0)
    with pytest.raises(ValueError, match="negative_text_states"):
        sample(model, text_states=pos_states, text_mask=pos_mask, noise=noise, guidance_scale=3.0, num_steps=2)


def test_sampler_is_deterministic_for_a_seed():
    model = TinyDenoiser()
    states, mask = text_with_id([0, 1])
    kwargs = dict(text_states=states, text_mask=mask, latents_shape=(2, 2, 16, 4, 4), num_steps=4)
    a = sample(model, seed=11, **kwargs)
    b = sample(model, seed=11, **kwargs)
    c = sample(model, seed=12, **kwargs)
    d = sample(model, generator=torch.Generator().manual_seed(11), **kwargs)
    assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)


def test_sampler_steps_exactly_as_the_scheduler_and_leaves_the_given_scheduler_unchanged():
    """The Euler updates are diffusers' own: a hand loop over `scheduler.step` with the same model lands on the
    same latents bit for bit, and the caller's scheduler is not advanced."""
    model = TinyDenoiser()
    states, mask = text_with_id([0])
    noise = torch.randn(1, 1, 16, 4, 4)
    scheduler = load_scheduler()
    before = scheduler.timesteps.clone()
    out = sample(model, text_states=states, text_mask=mask, noise=noise, num_steps=7, scheduler=scheduler)
    assert torch.equal(scheduler.timesteps, before) and scheduler.step_index is None

    manual = load_scheduler()
    set_release_timesteps(manual, 7, num_tokens=4)
    latents = noise.clone()
    for t in manual.timesteps:
        v = model(samples=latents, timesteps=t.expand(1), encoder_hidden_states=states, encoder_attention_mask=mask)
        latents = manual.step(v, t, latents).prev_sample
    assert torch.equal(out, latents)


def test_sampler_rejects_unequal_target_counts():
    states, mask = text_with_id([0, 0])
    with pytest.raises(ValueError, match="same number of views"):
        sample(TinyDenoiser(), text_states=states, text_mask=mask, condition_latents=torch.zeros(2, 2, 16, 4, 4),
               condition_mask=torch.tensor([[True, False], [False, False]]), num_steps=2)
