"""model/flow.py: the release's flow convention, its time schedule (checked against diffusers), the per-view training
objective and the Euler sampler with clean condition views and text CFG."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from model.flow import (
    FlowConfig,
    FlowMatchEulerSampler,
    add_noise,
    drop_text,
    dynamic_shift_mu,
    flow_matching_loss,
    inference_sigmas,
    inference_timesteps,
    network_timesteps,
    sample,
    sample_view_sigmas,
    shift_sigmas,
    time_shift,
)

# The release's scheduler/scheduler_config.json as captured in the spec (§4.4, bf16 mirror).
RELEASE_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


# ----------------------------------------------------------------------------------------------------------------------
# Stand-in denoisers (the real NextDiT is exercised in test_overfit.py)
# ----------------------------------------------------------------------------------------------------------------------


class OracleDenoiser(torch.nn.Module):
    """Knows the data x0 (one per text id) and returns the exact flow velocity (x_σ − x0)/σ = ε − x0.

    The text states carry the id of the x0 to aim for in channel 0 of token 0."""

    def __init__(self, targets: torch.Tensor):
        super().__init__()
        self.register_buffer("targets", targets)  # (K, T, C, h, w)
        self.calls = []

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        self.calls.append(dict(samples=samples.clone(), timesteps=timesteps.clone(),
                               text=encoder_hidden_states.clone(), mask=encoder_attention_mask.clone()))
        ids = encoder_hidden_states[:, 0, 0].round().long()
        x0 = self.targets[ids]
        sigma = timesteps / 1000.0
        if sigma.dim() == 1:
            sigma = sigma[:, None, None, None, None]
        return (samples - x0) / sigma.clamp_min(1e-6)


class ConstantVelocity(torch.nn.Module):
    """v = a for text id 1, b for text id 0 (lets CFG be checked in closed form)."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b
        self.batch_sizes = []

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        self.batch_sizes.append(samples.shape[0])
        ids = encoder_hidden_states[:, 0, 0].reshape(-1, *([1] * (samples.dim() - 1)))
        return torch.where(ids > 0.5, torch.full_like(samples, self.a), torch.full_like(samples, self.b))


class TinyDenoiser(torch.nn.Module):
    """A small trainable per-view network: enough to check the loss has gradients and can be minimised."""

    def __init__(self, channels=16, text_dim=8):
        super().__init__()
        self.time = torch.nn.Linear(1, channels)
        self.text = torch.nn.Linear(text_dim, channels)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
        b, t, c, h, w = samples.shape
        if timesteps.dim() == 1:
            timesteps = timesteps[:, None, None, None, None].expand(samples.shape)
        time = self.time(timesteps[:, :, :1, 0, 0] / 1000.0)  # (B, T, C)
        mask = encoder_attention_mask.float()[..., None]
        pooled = (encoder_hidden_states * mask).sum(1) / mask.sum(1).clamp_min(1)
        text = self.text(pooled)[:, None]  # (B, 1, C)
        x = self.conv(samples.reshape(b * t, c, h, w)).reshape(b, t, c, h, w)
        return x + (time + text)[..., None, None]


def text_with_id(ids, length=4, dim=8):
    states = torch.zeros(len(ids), length, dim)
    states[:, 0, 0] = torch.tensor(ids, dtype=torch.float32)
    mask = torch.ones(len(ids), length, dtype=torch.long)
    return states, mask


# ----------------------------------------------------------------------------------------------------------------------
# Time shift and schedule
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, mu, exp_mu",
    [(1024, 0.630, 1.88), (4096, 1.150, 3.16), (3072, 0.977, 2.66)],  # spec §4.4 table
)
def test_dynamic_shift_mu_reproduces_the_spec_table(num_tokens, mu, exp_mu):
    value = dynamic_shift_mu(num_tokens)
    assert round(value, 3) == pytest.approx(mu)
    assert round(math.exp(value), 2) == pytest.approx(exp_mu)


def test_condition_time_is_the_smallest_scheduled_timestep_spec_examples():
    cfg = FlowConfig.from_scheduler_config(RELEASE_SCHEDULER_CONFIG)
    # spec §4.3: ≈ 36.9/1000 for 50 steps at 512² (L = 1024), ≈ 60.6/1000 at 1024² (L = 4096)
    assert inference_timesteps(50, cfg, 1024)[-1].item() == pytest.approx(36.9, abs=0.05)
    assert inference_timesteps(50, cfg, 4096)[-1].item() == pytest.approx(60.6, abs=0.05)


def test_static_shift_is_the_exponential_time_shift_with_mu_log_s():
    sigmas = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), time_shift(math.log(3.0), sigmas))
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert time_shift(0.7, torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("num_steps, num_tokens", [(50, 1024), (50, 4096), (28, 3072), (10, 16), (1, 256)])
def test_dynamic_schedule_equals_diffusers_flow_match_euler(num_steps, num_tokens):
    cfg = FlowConfig.from_scheduler_config(RELEASE_SCHEDULER_CONFIG)
    reference = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in RELEASE_SCHEDULER_CONFIG.items() if k[0] != "_"})
    # exactly how the release pipeline calls it (spec §4.4)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=dynamic_shift_mu(num_tokens))
    torch.testing.assert_close(inference_sigmas(num_steps, cfg, num_tokens), reference.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close(inference_timesteps(num_steps, cfg, num_tokens), reference.timesteps, atol=1e-3, rtol=0)
    assert inference_sigmas(num_steps, cfg, num_tokens)[-1].item() == 0.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_schedule_equals_diffusers_flow_match_euler(shift):
    cfg = FlowConfig(shift=shift, dynamic_shift=False)
    reference = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20))
    torch.testing.assert_close(inference_sigmas(20, cfg), reference.sigmas, atol=1e-6, rtol=0)


def test_from_scheduler_config_reads_files_and_rejects_unsupported_options(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(__import__("json").dumps(RELEASE_SCHEDULER_CONFIG))
    cfg = FlowConfig.from_scheduler_config(tmp_path, clean_condition_prob=0.3)
    assert cfg.dynamic_shift and cfg.shift == 3.0 and cfg.max_shift == 1.15 and cfg.clean_condition_prob == 0.3
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowConfig.from_scheduler_config({**RELEASE_SCHEDULER_CONFIG, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="num_tokens"):
        inference_sigmas(10, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# Training objective
# ----------------------------------------------------------------------------------------------------------------------


def test_add_noise_interpolates_data_and_noise():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    sigmas = torch.tensor([[0.0, 1.0, 0.25]]).expand(2, -1)
    out = add_noise(x0, noise, sigmas)
    torch.testing.assert_close(out[:, 0], x0[:, 0])
    torch.testing.assert_close(out[:, 1], noise[:, 1])
    torch.testing.assert_close(out[:, 2], 0.75 * x0[:, 2] + 0.25 * noise[:, 2])


def test_view_sigmas_are_logit_normal_shifted_and_conditions_clean():
    cfg = FlowConfig(shift=3.0)
    sigmas = sample_view_sigmas(20000, 2, cfg, torch.Generator().manual_seed(0))
    assert sigmas.shape == (20000, 2) and bool(((sigmas > 0) & (sigmas < 1)).all())
    # median of sigmoid(N(0,1)) is 0.5; shift 3 maps it to 3·0.5/(1+2·0.5) = 0.75
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.01)
    # views are independent
    assert abs(torch.corrcoef(sigmas.T)[0, 1].item()) < 0.03
    cond = torch.tensor([[True, False]]).expand(4, -1)
    held = sample_view_sigmas(4, 2, cfg.replace(clean_condition_sigma=0.05), torch.Generator().manual_seed(0),
                              condition_mask=cond)
    assert held[:, 0].tolist() == pytest.approx([0.05] * 4)


def test_dynamic_shift_in_training_uses_the_token_count():
    cfg = FlowConfig(dynamic_shift=True)
    small = sample_view_sigmas(5000, 1, cfg, torch.Generator().manual_seed(0), num_tokens=256)
    large = sample_view_sigmas(5000, 1, cfg, torch.Generator().manual_seed(0), num_tokens=4096)
    assert small.median().item() == pytest.approx(time_shift(0.5, torch.tensor(0.5)).item(), abs=0.02)
    assert large.median().item() == pytest.approx(time_shift(1.15, torch.tensor(0.5)).item(), abs=0.02)
    per_sample = sample_view_sigmas(2, 3, cfg, torch.Generator().manual_seed(0), num_tokens=torch.tensor([256, 4096]))
    assert per_sample.shape == (2, 3)


def test_network_timesteps_shape_follows_the_release_calls():
    sig = torch.tensor([[0.5], [0.25]])
    assert network_timesteps(sig, (2, 1, 16, 4, 4)).tolist() == [500.0, 250.0]
    many = network_timesteps(torch.tensor([[0.5, 0.1]]), (1, 2, 16, 4, 4))
    assert many.shape == (1, 2, 16, 4, 4) and many[0, 1].unique().tolist() == pytest.approx([100.0])


def test_loss_feeds_the_network_the_release_convention():
    x0 = torch.randn(3, 2, 16, 4, 4)
    model = OracleDenoiser(x0[:1])
    states, mask = text_with_id([0, 0, 0])
    cfg = FlowConfig(text_dropout_prob=0.0)
    loss, stats = flow_matching_loss(model, x0[:1].expand(3, -1, -1, -1, -1), states, mask, cfg=cfg,
                                     generator=torch.Generator().manual_seed(1))
    call = model.calls[0]
    sig = stats["sigmas"]
    torch.testing.assert_close(call["timesteps"], (1000 * sig)[:, :, None, None, None].expand(3, 2, 16, 4, 4))
    # the oracle's exact velocity ε − x0 makes the loss vanish
    assert loss.item() < 1e-8
    # same generator → same draws
    _, again = flow_matching_loss(model, x0[:1].expand(3, -1, -1, -1, -1), states, mask, cfg=cfg,
                                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again["sigmas"], sig)
    torch.testing.assert_close(model.calls[1]["samples"], call["samples"])


def test_loss_target_is_noise_minus_data():
    class Zero(torch.nn.Module):
        def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
            self.samples, self.t = samples, timesteps
            return torch.zeros_like(samples)

    x0 = torch.randn(2, 1, 16, 4, 4)
    states, mask = text_with_id([0, 0])
    model = Zero()
    loss, stats = flow_matching_loss(model, x0, states, mask, cfg=FlowConfig(text_dropout_prob=0),
                                     generator=torch.Generator().manual_seed(3))
    assert model.t.shape == (2,)  # single-view samples get per-sample timesteps, as in the release's T2I call
    sigma = stats["sigmas"][:, :, None, None, None]
    noise = (model.samples - (1 - sigma) * x0) / sigma
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean(), rtol=1e-4, atol=1e-5)


def test_clean_condition_views_are_exact_data_and_excluded_from_the_loss():
    x0 = torch.randn(4, 2, 16, 4, 4)
    states, mask = text_with_id([0, 0, 0, 0])
    target = torch.tensor([False, True])  # image -> depth: view 1 is generated
    cfg = FlowConfig(clean_condition_prob=1.0, clean_condition_sigma=0.04, text_dropout_prob=0.0)

    class Recorder(torch.nn.Module):
        def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
            self.samples, self.t = samples, timesteps
            return torch.zeros_like(samples)

    model = Recorder()
    loss, stats = flow_matching_loss(model, x0, states, mask, target, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.samples[:, 0], x0[:, 0])  # content exactly clean
    assert model.t[:, 0].unique().tolist() == pytest.approx([40.0])  # network time 1000·clean_condition_sigma
    assert stats["clean_views"][:, 0].all() and not stats["clean_views"][:, 1].any()
    assert stats["in_loss"].tolist() == [[False, True]] * 4
    torch.testing.assert_close(loss, stats["per_view_loss"][:, 1].mean())

    never = flow_matching_loss(model, x0, states, mask, target, cfg.replace(clean_condition_prob=0.0),
                               torch.Generator().manual_seed(0))[1]
    assert not never["clean_views"].any() and never["in_loss"].all()  # loss_on="all": conditions count too


def test_loss_on_targets_only_counts_target_views():
    x0 = torch.randn(2, 3, 16, 4, 4)
    states, mask = text_with_id([0, 0])
    model = TinyDenoiser()
    target = torch.tensor([[True, False, False], [True, True, False]])
    loss, stats = flow_matching_loss(model, x0, states, mask, target, FlowConfig(loss_on="targets"),
                                     torch.Generator().manual_seed(0))
    assert stats["in_loss"].equal(target)
    expected = stats["per_view_loss"][target].mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert model.conv.weight.grad.abs().sum() > 0 and model.time.weight.grad.abs().sum() > 0


def test_text_dropout_uses_the_empty_prompt_encoding_or_the_zero_fallback():
    x0 = torch.randn(3, 1, 16, 4, 4)
    states, mask = text_with_id([1, 1, 1])
    states = states + 0.5
    uncond_states, uncond_mask = torch.full((4, 8), 7.0), torch.tensor([1, 1, 0, 0])
    model = OracleDenoiser(torch.zeros(8, 1, 16, 4, 4))
    _, stats = flow_matching_loss(model, x0, states, mask, cfg=FlowConfig(text_dropout_prob=1.0),
                                  generator=torch.Generator().manual_seed(0),
                                  uncond_text_states=uncond_states, uncond_text_mask=uncond_mask)
    assert stats["text_dropped"].all()
    assert (model.calls[-1]["text"] == 7.0).all() and model.calls[-1]["mask"].tolist() == [[1, 1, 0, 0]] * 3

    flow_matching_loss(model, x0, states, mask, cfg=FlowConfig(text_dropout_prob=1.0),
                       generator=torch.Generator().manual_seed(0))
    assert (model.calls[-1]["text"] == 0).all() and model.calls[-1]["mask"].tolist() == [[1, 0, 0, 0]] * 3

    _, kept = flow_matching_loss(model, x0, states, mask, cfg=FlowConfig(text_dropout_prob=0.0),
                                 generator=torch.Generator().manual_seed(0))
    assert not kept["text_dropped"].any() and torch.equal(model.calls[-1]["text"], states)

    some, _ = drop_text(states, mask, torch.tensor([True, False, True]), uncond_states, uncond_mask)
    assert torch.equal(some[1], states[1]) and (some[0] == 7).all()


# ----------------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [True, False])
def test_euler_with_the_exact_velocity_lands_on_the_data(dynamic):
    x0 = torch.randn(1, 1, 16, 8, 8)
    states, mask = text_with_id([0])
    cfg = FlowConfig(dynamic_shift=dynamic)
    out = sample(OracleDenoiser(x0), text_states=states, text_mask=mask, latents_shape=(1, 1, 16, 8, 8),
                 num_steps=12, cfg=cfg, seed=3)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_condition_views_are_clean_at_sigma_min_and_reimposed_every_step():
    x0 = torch.randn(2, 3, 16, 4, 4)
    cond_mask = torch.tensor([True, False, True])
    states, mask = text_with_id([0, 0])
    model = OracleDenoiser(x0[:1])
    cfg = FlowConfig.from_scheduler_config(RELEASE_SCHEDULER_CONFIG)
    seen = []
    out = sample(model, text_states=states, text_mask=mask, condition_latents=x0[:1].expand(2, -1, -1, -1, -1),
                 condition_mask=cond_mask, num_steps=6, cfg=cfg, seed=0,
                 callback=lambda step, n, sigma, latents: seen.append(latents.clone()))
    sigmas = inference_sigmas(6, cfg, num_tokens=1 * 2 * 2)  # 1 target view of (4/2)(4/2) tokens
    assert len(model.calls) == 6 and len(seen) == 6
    for step, call in enumerate(model.calls):
        t = call["timesteps"][:, :, 0, 0, 0]
        assert t[:, 0].tolist() == pytest.approx([1000 * sigmas[-2].item()] * 2)
        assert t[:, 1].tolist() == pytest.approx([1000 * sigmas[step].item()] * 2)
        torch.testing.assert_close(call["samples"][:, cond_mask], x0[:1, cond_mask].expand(2, -1, -1, -1, -1))
        torch.testing.assert_close(seen[step][:, cond_mask], x0[:1, cond_mask].expand(2, -1, -1, -1, -1))
    torch.testing.assert_close(out, x0[:1].expand(2, -1, -1, -1, -1), atol=1e-4, rtol=1e-4)


def test_cfg_combines_both_branches_in_one_call():
    model = ConstantVelocity(a=2.0, b=-1.0)
    pos_states, pos_mask = text_with_id([1])
    neg_states, neg_mask = text_with_id([0], length=6)  # a longer negative prompt is padded, not rejected
    noise = torch.randn(1, 1, 16, 4, 4)
    out = sample(model, text_states=pos_states, text_mask=pos_mask, negative_text_states=neg_states,
                 negative_text_mask=neg_mask, noise=noise, guidance_scale=4.0, num_steps=5, cfg=FlowConfig())
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
    bound = FlowMatchEulerSampler.from_scheduler_config(RELEASE_SCHEDULER_CONFIG, num_steps=4)
    assert bound.sigmas(num_tokens=8).shape == (5,)
    assert bound(model, seed=11, **{k: v for k, v in kwargs.items() if k != "num_steps"}).shape == a.shape


def test_sampler_rejects_unequal_target_counts():
    states, mask = text_with_id([0, 0])
    with pytest.raises(ValueError, match="same number of views"):
        sample(TinyDenoiser(), text_states=states, text_mask=mask, condition_latents=torch.zeros(2, 2, 16, 4, 4),
               condition_mask=torch.tensor([[True, False], [False, False]]), num_steps=2)
