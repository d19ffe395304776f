"""model/flow.py: the training objective. Training σ settings are independent of the sampling scheduler; condition
views get the sampler's condition time by construction; float32 objective; per-view (B, T) times; no host
synchronisation; masks and the global normalisation (two-rank check in test_flow_distributed.py)."""

import math
import pickle

import pytest
import torch

import model.flow as flow
import model.schedule as schedule
from model.flow import (
    FlowConfig,
    add_noise,
    drop_text,
    flow_matching_loss,
    sample_view_sigmas,
    shift_sigmas,
    training_shift_mu,
)
from model.nextdit import NextDiT
from model.sampler import sample
from model.schedule import RELEASE_SCHEDULER_CONFIG, load_scheduler

from host_sync import HostSyncRecorder  # noqa: E402
from stand_in_denoisers import OracleDenoiser, RecordingZero, TinyDenoiser, text_with_id  # noqa: E402

STATIC_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def exponential_shift(mu, sigma):
    return math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)


# ----------------------------------------------------------------------------------------------------------------------
# Training σ and the config
# ----------------------------------------------------------------------------------------------------------------------


def test_add_noise_interpolates_data_and_noise():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    sigmas = torch.tensor([[0.0, 1.0, 0.25]]).expand(2, -1)
    out = add_noise(x0, noise, sigmas)
    assert torch.equal(out[:, 0], x0[:, 0])
    torch.testing.assert_close(out[:, 1], noise[:, 1])
    torch.testing.assert_close(out[:, 2], 0.75 * x0[:, 2] + 0.25 * noise[:, 2])


def test_training_sigma_stays_static_whatever_scheduler_is_used_for_sampling(tmp_path):
    """Loading the release's (dynamic-shift) scheduler must not switch training to the dynamic shift."""
    assert not hasattr(FlowConfig, "from_scheduler_config")
    with pytest.raises(TypeError):  # no field takes a scheduler config's keys
        FlowConfig(**RELEASE_SCHEDULER_CONFIG)
    (tmp_path / "scheduler_config.json").write_text(__import__("json").dumps(RELEASE_SCHEDULER_CONFIG))
    for sampling in (RELEASE_SCHEDULER_CONFIG, tmp_path, load_scheduler(RELEASE_SCHEDULER_CONFIG),
                     STATIC_SCHEDULER_CONFIG):
        cfg = FlowConfig(sampling_schedule=sampling)
        assert not cfg.dynamic_shift and cfg.shift == 3.0
        # static shift 3 (the paper) for any token count: median sigmoid(N(0,1)) = 0.5 → 3·0.5/(1 + 2·0.5) = 0.75
        sig = sample_view_sigmas(20000, 1, cfg, torch.Generator().manual_seed(0), num_tokens=8 * 4096)
        assert sig.median().item() == pytest.approx(0.75, abs=0.01)
    assert FlowConfig(sampling_schedule=tmp_path).sampling_schedule == FlowConfig().sampling_schedule


def test_dynamic_shift_mu_is_the_schedule_formula_clipped_to_base_and_max_shift():
    assert flow.dynamic_shift_mu is schedule.dynamic_shift_mu  # one formula, one place
    cfg = FlowConfig(dynamic_shift=True)
    assert training_shift_mu(cfg, 1024) == pytest.approx(schedule.dynamic_shift_mu(1024))  # inside: unchanged
    assert training_shift_mu(cfg, 16) == 0.5 and training_shift_mu(cfg, 8 * 4096) == 1.15
    # 8 views at 1024² (L = 32768): the unclipped μ ≈ 6 would put nearly every σ near 1
    for tokens, mu in ((16, 0.5), (1024, schedule.dynamic_shift_mu(1024)), (8 * 4096, 1.15)):
        sig = sample_view_sigmas(20000, 1, cfg, torch.Generator().manual_seed(0), num_tokens=tokens)
        assert sig.median().item() == pytest.approx(exponential_shift(mu, 0.5), abs=0.01)
    per_sample = sample_view_sigmas(3, 2, cfg, torch.Generator().manual_seed(0),
                                    num_tokens=torch.tensor([16, 1024, 32768]))
    normal = torch.randn((3, 2), generator=torch.Generator().manual_seed(0))
    expected = torch.stack([torch.tensor([exponential_shift(mu, s) for s in torch.sigmoid(row).tolist()])
                            for mu, row in zip((0.5, schedule.dynamic_shift_mu(1024), 1.15), normal)])
    torch.testing.assert_close(per_sample, expected.float(), rtol=1e-5, atol=1e-6)


def test_view_sigmas_are_logit_normal_shifted_and_independent():
    sigmas = sample_view_sigmas(20000, 2, FlowConfig(shift=3.0), torch.Generator().manual_seed(0))
    assert sigmas.shape == (20000, 2) and sigmas.dtype == torch.float32
    assert bool(((sigmas > 0) & (sigmas < 1)).all())
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.01)
    assert abs(torch.corrcoef(sigmas.T)[0, 1].item()) < 0.03
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))


def test_config_is_frozen_hashable_picklable_and_validated():
    cfg = FlowConfig(sampling_schedule={**RELEASE_SCHEDULER_CONFIG, "_class_name": "FlowMatchEulerDiscreteScheduler"})
    assert cfg == FlowConfig() and hash(cfg) == hash(FlowConfig())  # diffusers metadata keys are dropped
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(dataclasses_frozen_error()):
        cfg.shift = 1.0
    with pytest.raises(TypeError):
        cfg.sampling_schedule["shift"] = 1.0
    assert cfg.num_train_timesteps == 1000 and cfg.to_dict()["sampling_schedule"]["max_shift"] == 1.15
    assert cfg.replace(condition_steps=28).condition_steps == 28
    assert hash(cfg.replace(sampling_schedule=STATIC_SCHEDULER_CONFIG)) != hash(cfg)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowConfig(sampling_schedule={**RELEASE_SCHEDULER_CONFIG, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="condition_steps"):
        FlowConfig(condition_steps=0)
    with pytest.raises(ValueError, match="loss_on"):
        FlowConfig(loss_on="conditions")


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ----------------------------------------------------------------------------------------------------------------------
# Condition views: the sampler's time by construction
# ----------------------------------------------------------------------------------------------------------------------


def sampler_condition_times(scheduler_config, num_steps, condition_mask, shape):
    """What model.sampler.sample feeds the condition views (first step), (B, #conditions)."""
    spy = RecordingZero()
    states, mask = text_with_id([0] * shape[0])
    sample(spy, text_states=states, text_mask=mask, latents_shape=shape, condition_latents=torch.zeros(shape),
           condition_mask=condition_mask, num_steps=num_steps, scheduler=load_scheduler(scheduler_config))
    times = torch.stack([call["timesteps"] for call in spy.calls])  # (steps, B, T)
    assert bool((times[:, :, condition_mask] == times[:1, :, condition_mask]).all())  # constant over the steps
    return times[0][:, condition_mask]


@pytest.mark.parametrize("scheduler_config", [RELEASE_SCHEDULER_CONFIG, STATIC_SCHEDULER_CONFIG],
                         ids=["release-dynamic", "static-3"])
@pytest.mark.parametrize("num_targets", [1, 2])
@pytest.mark.parametrize("num_steps, size", [(50, 16), (28, 12), (7, 6)])
def test_clean_condition_views_get_exactly_the_time_the_sampler_gives_them(scheduler_config, num_targets, num_steps,
                                                                            size):
    condition_mask = torch.tensor([True] + [False] * num_targets)
    shape = (2, 1 + num_targets, 16, size, size)
    expected = sampler_condition_times(scheduler_config, num_steps, condition_mask, shape)

    spy = RecordingZero()
    states, mask = text_with_id([0, 0])
    cfg = FlowConfig(clean_condition_prob=1.0, sampling_schedule=scheduler_config, condition_steps=num_steps)
    _, stats = flow_matching_loss(spy, torch.randn(shape), states, mask, ~condition_mask, cfg,
                                  torch.Generator().manual_seed(0))
    got = spy.calls[0]["timesteps"][:, condition_mask]
    assert got.dtype == torch.float32 and torch.equal(got, expected), (got, expected)
    assert torch.equal(stats["sigmas"][:, condition_mask] * 1000, expected)


def test_condition_time_follows_each_samples_target_count_in_a_mixed_batch():
    shape = (2, 3, 16, 8, 8)
    targets = torch.tensor([[False, True, False], [False, True, True]])  # 1 and 2 target views
    spy = RecordingZero()
    states, mask = text_with_id([0, 0])
    flow_matching_loss(spy, torch.randn(shape), states, mask, targets, FlowConfig(clean_condition_prob=1.0),
                       torch.Generator().manual_seed(0))
    got = spy.calls[0]["timesteps"]
    one = sampler_condition_times(RELEASE_SCHEDULER_CONFIG, 50, torch.tensor([True, False, True]), shape)
    two = sampler_condition_times(RELEASE_SCHEDULER_CONFIG, 50, torch.tensor([True, False, False]), shape)
    assert torch.equal(got[0, [0, 2]], one[0]) and torch.equal(got[1, 0], two[1, 0])
    assert not torch.equal(one[0, 0], two[0, 0])


def test_clean_condition_views_are_exact_data_and_excluded_from_the_loss():
    x0 = torch.randn(4, 2, 16, 4, 4)
    states, mask = text_with_id([0, 0, 0, 0])
    target = torch.tensor([False, True])  # image -> depth: view 1 is generated
    cfg = FlowConfig(clean_condition_prob=1.0, text_dropout_prob=0.0)
    model = RecordingZero()
    loss, stats = flow_matching_loss(model, x0, states, mask, target, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(model.calls[0]["samples"][:, 0], x0[:, 0])  # content exactly clean
    assert bool(stats["clean_views"][:, 0].all()) and not bool(stats["clean_views"][:, 1].any())
    assert stats["noise_sigmas"][:, 0].eq(0).all()
    assert stats["in_loss"].tolist() == [[False, True]] * 4
    torch.testing.assert_close(loss, stats["per_view_loss"][:, 1].mean())

    never = flow_matching_loss(model, x0, states, mask, target, cfg.replace(clean_condition_prob=0.0),
                               torch.Generator().manual_seed(0))[1]
    assert not bool(never["clean_views"].any()) and bool(never["in_loss"].all())  # loss_on="all": conditions count
    # non-clean samples: every view noised with its own σ
    assert bool((never["noise_sigmas"] > 0).all()) and bool((never["sigmas"][:, 0] != never["sigmas"][:, 1]).all())


# ----------------------------------------------------------------------------------------------------------------------
# Float32 objective, per-view times, draws
# ----------------------------------------------------------------------------------------------------------------------


def test_bf16_latents_give_float32_noise_samples_and_target():
    x0 = torch.randn(3, 2, 16, 4, 4).bfloat16()
    states, mask = text_with_id([0, 0, 0])
    model = RecordingZero()
    cfg = FlowConfig(text_dropout_prob=0.0)
    loss, stats = flow_matching_loss(model, x0, states, mask, cfg=cfg, generator=torch.Generator().manual_seed(5))
    # the draws of a float32 run with the same generator: coin (B), σ normals (B, T), noise (B, T, C, h, w)
    g = torch.Generator().manual_seed(5)
    torch.rand(3, generator=g)
    torch.randn(3, 2, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    samples = model.calls[0]["samples"]
    assert samples.dtype == torch.float32
    assert torch.equal(samples, add_noise(x0.float(), noise, stats["noise_sigmas"]))
    target = noise - x0.float()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-6, atol=0)  # v = 0: loss = mean (ε − x0)²
    # the same values given as float32 give the same samples
    flow_matching_loss(model, x0.float(), states, mask, cfg=cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.calls[1]["samples"], samples)


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_the_model_gets_per_view_float32_timesteps_for_every_view_count(num_views):
    model = RecordingZero()
    states, mask = text_with_id([0, 0])
    _, stats = flow_matching_loss(model, torch.randn(2, num_views, 16, 4, 4), states, mask,
                                  generator=torch.Generator().manual_seed(0))
    t = model.calls[0]["timesteps"]
    assert t.shape == (2, num_views) and t.dtype == torch.float32
    assert torch.equal(t, stats["sigmas"] * 1000) and torch.equal(t, stats["timesteps"])


def test_random_draws_follow_the_documented_order_and_overrides_replace_them():
    x0 = torch.randn(2, 2, 16, 4, 4)
    states, mask = text_with_id([0, 0])
    cfg = FlowConfig(clean_condition_prob=0.5, text_dropout_prob=0.5)
    model = RecordingZero()
    _, stats = flow_matching_loss(model, x0, states, mask, torch.tensor([False, True]), cfg,
                                  torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    clean = torch.rand(2, generator=g) < 0.5
    sig = shift_sigmas(torch.sigmoid(torch.randn(2, 2, generator=g)), 3.0)
    noise = torch.randn(x0.shape, generator=g)
    dropped = torch.rand(2, generator=g) < 0.5
    assert torch.equal(stats["clean_views"][:, 0], clean) and torch.equal(stats["text_dropped"], dropped)
    torch.testing.assert_close(stats["noise_sigmas"], torch.where(stats["clean_views"], 0.0, sig))
    torch.testing.assert_close(model.calls[0]["samples"], add_noise(x0, noise, stats["noise_sigmas"]))

    # explicit σ and noise replace draws 2 and 3
    sigmas, noise = torch.full((2, 2), 0.25), torch.randn(x0.shape)
    _, stats = flow_matching_loss(model, x0, states, mask, cfg=cfg.replace(clean_condition_prob=0.0),
                                  generator=torch.Generator().manual_seed(0), noise=noise, sigmas=sigmas)
    assert torch.equal(stats["noise_sigmas"], sigmas)
    assert torch.equal(model.calls[-1]["samples"], add_noise(x0, noise, sigmas))


def test_loss_feeds_the_network_the_release_convention():
    x0 = torch.randn(1, 2, 16, 4, 4).expand(3, -1, -1, -1, -1)
    model = OracleDenoiser(x0[:1])
    states, mask = text_with_id([0, 0, 0])
    cfg = FlowConfig(text_dropout_prob=0.0)
    loss, stats = flow_matching_loss(model, x0, states, mask, cfg=cfg, generator=torch.Generator().manual_seed(1))
    assert loss.item() < 1e-8  # the oracle's exact velocity ε − x0 makes the loss vanish
    _, again = flow_matching_loss(model, x0, states, mask, cfg=cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again["sigmas"], stats["sigmas"])
    assert torch.equal(model.calls[1]["samples"], model.calls[0]["samples"])


def test_loss_on_targets_only_counts_target_views():
    x0 = torch.randn(2, 3, 16, 4, 4)
    states, mask = text_with_id([0, 0])
    model = TinyDenoiser()
    target = torch.tensor([[True, False, False], [True, True, False]])
    loss, stats = flow_matching_loss(model, x0, states, mask, target, FlowConfig(loss_on="targets"),
                                     torch.Generator().manual_seed(0))
    assert stats["in_loss"].equal(target)
    torch.testing.assert_close(loss.detach(), stats["per_view_loss"][target].mean())
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
    assert bool(stats["text_dropped"].all())
    assert (model.calls[-1]["text"] == 7.0).all() and model.calls[-1]["mask"].tolist() == [[1, 1, 0, 0]] * 3

    flow_matching_loss(model, x0, states, mask, cfg=FlowConfig(text_dropout_prob=1.0),
                       generator=torch.Generator().manual_seed(0))
    assert (model.calls[-1]["text"] == 0).all() and model.calls[-1]["mask"].tolist() == [[1, 0, 0, 0]] * 3

    _, kept = flow_matching_loss(model, x0, states, mask, cfg=FlowConfig(text_dropout_prob=0.0),
                                 generator=torch.Generator().manual_seed(0))
    assert not bool(kept["text_dropped"].any()) and torch.equal(model.calls[-1]["text"], states)

    some, _ = drop_text(states, mask, torch.tensor([True, False, True]), uncond_states, uncond_mask)
    assert torch.equal(some[1], states[1]) and (some[0] == 7).all()


# ----------------------------------------------------------------------------------------------------------------------
# Masks and normalisation
# ----------------------------------------------------------------------------------------------------------------------


def test_channel_and_view_masks_exclude_pad_channels_and_padded_views():
    x0 = torch.randn(2, 3, 16, 4, 4)
    states, mask = text_with_id([0, 0])
    channels = torch.ones(16, dtype=torch.bool)
    channels[12:] = False  # a PixelTokenizer's always-zero pad channels
    views = torch.tensor([[True, True, True], [True, True, False]])  # sample 1 has a padded third view
    noise, sigmas = torch.randn(x0.shape), torch.rand(2, 3) * 0.9 + 0.05

    class Garbage(torch.nn.Module):  # exact velocity, except huge errors where the masks say "ignore"
        def forward(self, samples, timesteps, encoder_hidden_states, encoder_attention_mask):
            v = (noise - x0).clone()
            v[:, :, 12:] += 1e3
            v[1, 2] += 1e3
            return v + 0.5

    loss, stats = flow_matching_loss(Garbage(), x0, states, mask, cfg=FlowConfig(text_dropout_prob=0.0),
                                     channel_mask=channels, view_mask=views, noise=noise, sigmas=sigmas)
    assert stats["in_loss"].equal(views)
    count = 5 * 12 * 4 * 4  # 5 real views × 12 real channels × 4 × 4
    assert stats["loss_count"].item() == count and stats["global_count"].item() == count
    torch.testing.assert_close(loss, torch.tensor(0.25))  # only the 0.5 offset in the masked-in elements
    torch.testing.assert_close(stats["loss_sum"], torch.tensor(0.25 * count))
    torch.testing.assert_close(stats["per_sample_loss"], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(stats["per_view_loss"][0], torch.full((3,), 0.25))

    # (B, C) channel masks: per-sample channel counts
    per_sample_channels = torch.stack([channels, torch.ones(16, dtype=torch.bool)])
    _, stats = flow_matching_loss(RecordingZero(), x0, states, mask, cfg=FlowConfig(), channel_mask=per_sample_channels,
                                  view_mask=views, noise=noise, sigmas=sigmas)
    assert stats["loss_count"].item() == (3 * 12 + 2 * 16) * 16
    sq = (noise - x0).pow(2)
    expected = (sq[0, :, :12].sum() + sq[1, :2].sum()) / ((3 * 12 + 2 * 16) * 16)
    torch.testing.assert_close(stats["loss_sum"] / stats["loss_count"], expected)


def test_loss_is_the_mean_over_masked_elements_without_a_process_group():
    x0 = torch.randn(3, 2, 16, 4, 4)
    states, mask = text_with_id([0, 0, 0])
    model = TinyDenoiser()
    loss, stats = flow_matching_loss(model, x0, states, mask, torch.tensor([[False, True]] * 3),
                                     FlowConfig(clean_condition_prob=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(stats["global_count"], stats["loss_count"])
    torch.testing.assert_close(loss, stats["loss_sum"] / stats["loss_count"])
    with pytest.raises(ValueError, match="world_size"):
        flow_matching_loss(model, x0, states, mask, world_size=2)


# ----------------------------------------------------------------------------------------------------------------------
# No host synchronisation, no host<->device copies, draws on the latents' device
# ----------------------------------------------------------------------------------------------------------------------

def training_batch(model, device):
    """A bf16 batch with every optional input, built on `device` (outside the recorded region)."""
    text_dim = getattr(model, "caption_channels", 8)
    x0 = torch.randn(2, 3, 16, 4, 4, device=device).bfloat16()
    states = torch.randn(2, 4, text_dim, device=device)
    mask = torch.ones(2, 4, dtype=torch.long, device=device)
    target = torch.tensor([[False, True, True], [False, True, False]], device=device)
    return dict(x0=x0, text_states=states, text_mask=mask, target_mask=target,
                uncond_text_states=torch.zeros(4, text_dim, device=device),
                uncond_text_mask=torch.tensor([1, 0, 0, 0], device=device),
                channel_mask=torch.arange(16, device=device) < 12,
                view_mask=torch.tensor([[True, True, True], [True, True, False]], device=device))


def loss_and_backward(model, batch, cfg, generator):
    loss, stats = flow_matching_loss(model, cfg=cfg, generator=generator, **batch)
    loss.backward()
    return loss, stats


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_loss_and_backward_make_no_host_synchronisation(dynamic_shift):
    cfg = FlowConfig(clean_condition_prob=0.5, text_dropout_prob=0.5, dynamic_shift=dynamic_shift)
    model = TinyDenoiser()
    batch = training_batch(model, "cpu")
    loss_and_backward(model, batch, cfg, torch.Generator().manual_seed(0))  # warm-up: builds the cached time table
    with HostSyncRecorder() as recorder:
        loss_and_backward(model, batch, cfg, torch.Generator().manual_seed(1))
    assert recorder.syncs == [] and recorder.copies == []


def test_tiny_nextdit_loss_and_backward_make_no_host_synchronisation():
    torch.manual_seed(0)
    model = NextDiT.from_preset("nextdit-tiny")
    cfg = FlowConfig(clean_condition_prob=0.5, text_dropout_prob=0.5)
    batch = training_batch(model, "cpu")
    loss_and_backward(model, batch, cfg, torch.Generator().manual_seed(0))
    with HostSyncRecorder() as recorder:
        loss_and_backward(model, batch, cfg, torch.Generator().manual_seed(1))
    assert recorder.syncs == [], recorder.syncs


def test_everything_is_drawn_and_computed_on_the_latents_device(monkeypatch):
    """On the meta device a CPU tensor mixed in (a CPU draw, a CPU mask, a host-built table) shows as a copy; tensors
    built from Python data (torch.tensor/as_tensor, a host->device copy on an accelerator) are counted apart."""
    model = TinyDenoiser().to("meta")
    cfg = FlowConfig(clean_condition_prob=0.5, text_dropout_prob=0.5, dynamic_shift=True)
    batch = training_batch(model, "meta")
    loss_and_backward(model, batch, cfg, None)  # warm-up: the cached condition-time table moves to meta once
    built = []
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=original, _n=name, **k: built.append(_n) or _f(*a, **k))
    with HostSyncRecorder() as recorder:
        loss, stats = loss_and_backward(model, batch, cfg, None)
    monkeypatch.undo()
    assert recorder.copies == [] and recorder.syncs == [] and built == []
    assert loss.device.type == "meta" and stats["sigmas"].device.type == "meta"
    x0 = torch.randn(1, 1, 16, 4, 4, device="meta")
    states, mask = torch.zeros(1, 4, 8, device="meta"), torch.ones(1, 4, device="meta")
    with pytest.raises(ValueError, match=r"torch\.Generator\(device=x0\.device\)"):
        flow_matching_loss(model, x0, states, mask, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="target_mask is on cpu"):
        flow_matching_loss(model, x0, states, mask, torch.tensor([True]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_loss_makes_no_synchronising_call():
    model = TinyDenoiser().cuda()
    cfg = FlowConfig(clean_condition_prob=0.5, text_dropout_prob=0.5)
    generator = torch.Generator(device="cuda").manual_seed(0)
    loss_and_backward(model, training_batch(model, "cuda"), cfg, generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = flow_matching_loss(model, torch.randn(2, 2, 16, 4, 4, device="cuda"),
                                         torch.randn(2, 4, 8, device="cuda"),
                                         torch.ones(2, 4, dtype=torch.long, device="cuda"), cfg=cfg,
                                         generator=generator)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert loss.dtype == torch.float32
