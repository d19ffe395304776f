"""Rectified-flow training objective and Euler sampler, in the convention of the released checkpoint.

Convention (ONEDIFFUSION_SPEC.md §4.2; the paper's t = 1 − σ with the opposite sign is the same field):

    σ = 1 is pure noise, σ = 0 is data;     x_σ = (1 − σ)·x0 + σ·ε,   ε ~ N(0, I)
    the network sees time 1000·σ;           it predicts v ≈ ε − x0;   Euler: x ← x + (σ_next − σ)·v

Every view of a sample (B, T, 16, h, w) carries its own σ (per-view adaLN in the denoiser).

Training (`flow_matching_loss`)
  * σ per view is logit-normal (σ = sigmoid(n), n ~ N(logit_mean, logit_std)), then shifted: either the static SD3
    shift σ' = sσ/(1 + (s−1)σ) (paper: s = 3), or the resolution-dependent "dynamic" shift of the release's scheduler,
    σ' = e^μ/(e^μ + 1/σ − 1), with μ from the number of noised tokens (`dynamic_shift_mu`).
  * Clean condition views (spec §4.3 caveat): with probability `clean_condition_prob` per sample, every non-target view
    of that sample is left exactly clean (x_σ = x0) and is given network time 1000·`clean_condition_sigma`
    (default 0). Set `clean_condition_sigma` to the smallest σ of the inference schedule (≈ 0.04–0.06) to reproduce
    exactly what the release's sampler feeds its condition views. Clean views never enter the loss: their target
    ε − x0 cannot be predicted from a clean input.
  * `loss_on="all"`: MSE over every noised view (the paper's eq. 5, conditions included); `"targets"`: only the views
    marked in `target_mask`. The loss is the mean over the elements of the views in the loss, pooled over the batch.
  * Text dropout for CFG (rate `text_dropout_prob`): a dropped sample's text is replaced by the *encoding of the empty
    prompt* `uncond_text_states/uncond_text_mask` when the caller passes it (recommended: this is exactly what the
    sampler's unconditional branch sees, the release's empty negative prompt). model/ has no text encoder, so when it
    is not passed the fallback is all-zero states with only the first token valid in the mask (an "empty" sequence
    that still has one attendable key, so masked softmax/pooling never divide by zero).

Sampling (`sample`)
  * σ_k = linspace(1, 1/N, N), shifted (dynamic μ from L = #target views × (h/2)(w/2), or static shift), then a
    terminal σ = 0 is appended: identical to diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...,
    mu=...)` as called by the release pipeline (`inference_sigmas`).
  * Condition views are clean, fed at time 1000·σ_min with σ_min the smallest non-zero σ of the schedule
    (= `scheduler.timesteps[-1]` in the release), and overwritten with their clean values after every step; their
    velocities are computed and discarded.
  * Text CFG with a negative prompt: v = v_u + w·(v_c − v_u) when w > 1, both branches in one batched call.
  * Deterministic: initial noise comes from `noise`, or `generator`, or `seed` (default 0), drawn on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

LOSS_ON_CHOICES = ("all", "targets")

# Scheduler-config options that change the schedule and that this module does not implement, with their neutral value.
_UNSUPPORTED_SCHEDULER_OPTIONS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class FlowConfig:
    """Noise-level distribution (training) and time schedule (sampling). Defaults follow the paper for training
    (static shift 3); use `from_scheduler_config` to read the release's scheduler (dynamic shift)."""

    # time shift, shared by training and sampling
    shift: float = 3.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    num_train_timesteps: int = 1000
    patch_size: int = 2  # tokens per view = (h / patch_size) * (w / patch_size), for the dynamic shift
    # training only
    logit_mean: float = 0.0
    logit_std: float = 1.0
    clean_condition_prob: float = 0.0
    clean_condition_sigma: float = 0.0
    loss_on: str = "all"
    text_dropout_prob: float = 0.1

    def __post_init__(self):
        if self.loss_on not in LOSS_ON_CHOICES:
            raise ValueError(f"FlowConfig.loss_on={self.loss_on!r}; expected one of {LOSS_ON_CHOICES}.")
        for name in ("clean_condition_prob", "text_dropout_prob", "clean_condition_sigma"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FlowConfig.{name}={value} must lie in [0, 1].")
        if self.shift <= 0:
            raise ValueError(f"FlowConfig.shift={self.shift} must be > 0 (1 means no shift).")
        if self.logit_std <= 0:
            raise ValueError(f"FlowConfig.logit_std={self.logit_std} must be > 0.")
        if self.max_seq_len == self.base_seq_len:
            raise ValueError("FlowConfig.max_seq_len must differ from base_seq_len (they define the mu line).")

    @classmethod
    def from_scheduler_config(cls, config: Mapping | str | os.PathLike, **overrides) -> "FlowConfig":
        """Settings from a diffusers `FlowMatchEulerDiscreteScheduler` config: a dict, a `scheduler_config.json`, or a
        folder holding one (e.g. `<release>/scheduler`). Training-only fields come from `overrides` or the defaults.

        Raises ValueError for scheduler options that change the schedule but are not implemented here
        (karras/exponential/beta sigmas, invert_sigmas, shift_terminal, linear time shift)."""
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "scheduler_config.json"
            config = json.loads(path.read_text())
        for key, neutral in _UNSUPPORTED_SCHEDULER_OPTIONS.items():
            if config.get(key) not in (neutral, None, False, 0):
                raise ValueError(
                    f"scheduler config sets {key}={config[key]!r}, which model/flow.py does not implement; "
                    f"only the plain/dynamic-shift FlowMatchEuler schedule is supported."
                )
        fields = dict(
            shift=float(config.get("shift", 1.0)),
            dynamic_shift=bool(config.get("use_dynamic_shifting", False)),
            base_shift=float(config.get("base_shift", 0.5)),
            max_shift=float(config.get("max_shift", 1.15)),
            base_seq_len=int(config.get("base_image_seq_len", 256)),
            max_seq_len=int(config.get("max_image_seq_len", 4096)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes) -> "FlowConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------------------
# Time shifts
# ----------------------------------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static SD3 shift σ' = sσ / (1 + (s − 1)σ). Equals `time_shift(log s, σ)`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(num_tokens, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15):
    """μ on the line through (base_seq_len, base_shift) and (max_seq_len, max_shift), not clipped (as the release).

    num_tokens: the number of tokens being denoised, L = #denoised views × (h/2)(w/2); an int/float or a tensor."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (num_tokens - base_seq_len)


def time_shift(mu, sigmas: torch.Tensor) -> torch.Tensor:
    """Resolution-dependent shift σ' = e^μ / (e^μ + (1/σ − 1)); σ = 0 ↦ 0 and σ = 1 ↦ 1. μ may be a tensor that
    broadcasts against `sigmas` (e.g. (B, 1) per sample)."""
    exp_mu = torch.exp(mu) if isinstance(mu, torch.Tensor) else math.exp(mu)
    return exp_mu / (exp_mu + (1 / sigmas - 1))


def _mu_for(cfg: FlowConfig, num_tokens):
    return dynamic_shift_mu(num_tokens, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)


def apply_shift(sigmas: torch.Tensor, cfg: FlowConfig, num_tokens=None) -> torch.Tensor:
    """The shift `cfg` asks for: dynamic (needs `num_tokens`, an int or a tensor broadcasting against `sigmas`) or
    static `cfg.shift`."""
    if cfg.dynamic_shift:
        if num_tokens is None:
            raise ValueError("FlowConfig.dynamic_shift=True needs num_tokens (#denoised views x (h/2)(w/2)).")
        if isinstance(num_tokens, torch.Tensor):
            num_tokens = num_tokens.to(device=sigmas.device, dtype=sigmas.dtype)
        return time_shift(_mu_for(cfg, num_tokens), sigmas)
    return shift_sigmas(sigmas, cfg.shift)


def tokens_per_view(height: int, width: int, patch_size: int = 2) -> int:
    """Tokens one (16, h, w) latent view becomes after 2×2 patchify."""
    return (height // patch_size) * (width // patch_size)


# ----------------------------------------------------------------------------------------------------------------------
# Training objective
# ----------------------------------------------------------------------------------------------------------------------


def _draw(kind: str, shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Random numbers drawn on the generator's device (CPU by default) and moved, so results do not depend on where
    the model runs."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device=device, dtype=dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε. x0, noise: (B, T, C, h, w); sigmas: (B, T) (or anything broadcasting after adding
    trailing dims)."""
    sigmas = sigmas.to(x0.dtype)
    while sigmas.dim() < x0.dim():
        sigmas = sigmas.unsqueeze(-1)
    return (1 - sigmas) * x0 + sigmas * noise


def sample_view_sigmas(batch: int, num_views: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                       condition_mask: torch.Tensor | None = None, num_tokens=None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Per-view training σ, (B, T) float32: logit-normal, then shifted as `cfg` says.

    condition_mask: (B, T) bool, views held clean; they get σ = cfg.clean_condition_sigma (their network time).
    num_tokens: int or (B,) tensor, the denoised tokens per sample; required when cfg.dynamic_shift."""
    device = device if device is not None else (condition_mask.device if condition_mask is not None else "cpu")
    normal = _draw("normal", (batch, num_views), generator, device)
    sigmas = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() == 1:
        num_tokens = num_tokens[:, None]
    sigmas = apply_shift(sigmas, cfg, num_tokens)
    if condition_mask is not None:
        sigmas = torch.where(condition_mask.to(device), torch.full_like(sigmas, cfg.clean_condition_sigma), sigmas)
    return sigmas


def _broadcast_view_mask(mask, batch: int, num_views: int, device, name: str) -> torch.Tensor:
    mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
    if mask.dim() == 1:
        mask = mask.expand(batch, -1)
    if tuple(mask.shape) != (batch, num_views):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected ({num_views},) or ({batch}, {num_views}).")
    return mask


def network_timesteps(sigmas: torch.Tensor, latent_shape, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Per-view σ (B, T) → the denoiser's `timesteps`: (B,) when T = 1 (the release's T2I call), else broadcast to
    the latent shape (B, T, C, h, w) (the release's img2img call)."""
    timesteps = sigmas * num_train_timesteps
    if latent_shape[1] == 1:
        return timesteps[:, 0]
    return timesteps[:, :, None, None, None].expand(latent_shape)


def _call_denoiser(model: Callable, samples: torch.Tensor, sigmas: torch.Tensor, text_states, text_mask,
                   num_train_timesteps: int) -> torch.Tensor:
    out = model(
        samples=samples,
        timesteps=network_timesteps(sigmas, samples.shape, num_train_timesteps),
        encoder_hidden_states=text_states,
        encoder_attention_mask=text_mask,
    )
    return out.reshape(samples.shape)


def empty_text_like(text_states: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback "empty prompt" when no encoding of "" is available: zero states, only token 0 valid."""
    states = torch.zeros_like(text_states)
    mask = torch.zeros_like(text_mask)
    mask[:, 0] = 1
    return states, mask


def drop_text(text_states: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor,
              uncond_text_states: torch.Tensor | None = None, uncond_text_mask: torch.Tensor | None = None):
    """Replace the text of the samples where `drop` (B,) is True by the unconditional text (see module docstring)."""
    if uncond_text_states is None:
        uncond_text_states, uncond_text_mask = empty_text_like(text_states, text_mask)
    elif uncond_text_mask is None:
        raise ValueError("uncond_text_states was given without uncond_text_mask; pass both (the encoding of \"\").")
    batch, length = text_mask.shape
    if uncond_text_states.dim() == 2:
        uncond_text_states, uncond_text_mask = uncond_text_states[None], uncond_text_mask.reshape(1, -1)
    if uncond_text_states.shape[1] != length or uncond_text_states.shape[-1] != text_states.shape[-1]:
        raise ValueError(
            f"uncond text states {tuple(uncond_text_states.shape)} do not match text states "
            f"{tuple(text_states.shape)}; encode \"\" with the same padding length as the captions."
        )
    uncond_states = uncond_text_states.to(text_states).expand(batch, -1, -1)
    uncond_mask = uncond_text_mask.to(device=text_mask.device, dtype=text_mask.dtype).expand(batch, -1)
    states = torch.where(drop[:, None, None], uncond_states, text_states)
    mask = torch.where(drop[:, None], uncond_mask, text_mask)
    return states, mask


def flow_matching_loss(model: Callable, x0: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                       target_mask: torch.Tensor | None = None, cfg: FlowConfig = FlowConfig(),
                       generator: torch.Generator | None = None, *,
                       uncond_text_states: torch.Tensor | None = None,
                       uncond_text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rectified-flow loss of one batch of view sequences.

    x0: (B, T, 16, h, w) clean latents; text_states (B, L, C), text_mask (B, L); target_mask (B, T) or (T,) bool, the
    views the sample's task generates (None: every view is a target, so no view can be held clean).

    Random draws, in this order, all from `generator`: clean-condition coin (B), σ (B, T), noise (B, T, C, h, w), text
    dropout coin (B).

    Returns (loss, stats); stats are detached: "sigmas" (B, T) network σ, "noise_sigmas" (B, T) σ of the content,
    "clean_views" (B, T), "in_loss" (B, T), "per_view_loss" (B, T) MSE per view, "per_sample_loss" (B,) mean over the
    views in the loss (0 where none), "text_dropped" (B,)."""
    if x0.dim() != 5:
        raise ValueError(f"x0 must be (B, T, C, h, w); got shape {tuple(x0.shape)}.")
    batch, num_views, _, height, width = x0.shape
    device = x0.device
    targets = (torch.ones(batch, num_views, dtype=torch.bool, device=device) if target_mask is None
               else _broadcast_view_mask(target_mask, batch, num_views, device, "target_mask"))

    clean_sample = _draw("uniform", (batch,), generator, device) < cfg.clean_condition_prob
    clean_views = clean_sample[:, None] & ~targets

    num_tokens = None
    if cfg.dynamic_shift:
        noised_views = (~clean_views).sum(dim=1)
        num_tokens = noised_views * tokens_per_view(height, width, cfg.patch_size)
    sigmas = sample_view_sigmas(batch, num_views, cfg, generator, condition_mask=clean_views, num_tokens=num_tokens,
                                device=device)
    noise = _draw("normal", x0.shape, generator, device, x0.dtype)
    noise_sigmas = torch.where(clean_views, torch.zeros_like(sigmas), sigmas)
    samples = add_noise(x0, noise, noise_sigmas)

    dropped = _draw("uniform", (batch,), generator, device) < cfg.text_dropout_prob
    if dropped.any():
        text_states, text_mask = drop_text(text_states, text_mask, dropped, uncond_text_states, uncond_text_mask)

    velocity = _call_denoiser(model, samples, sigmas, text_states, text_mask, cfg.num_train_timesteps)
    per_view_loss = (velocity.float() - (noise - x0).float()).pow(2).mean(dim=(2, 3, 4))

    in_loss = ~clean_views
    if cfg.loss_on == "targets":
        in_loss = in_loss & targets
    weights = in_loss.float()
    loss = (per_view_loss * weights).sum() / weights.sum().clamp_min(1.0)
    per_sample = (per_view_loss * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    stats = {
        "sigmas": sigmas.detach(),
        "noise_sigmas": noise_sigmas.detach(),
        "clean_views": clean_views,
        "in_loss": in_loss,
        "per_view_loss": per_view_loss.detach(),
        "per_sample_loss": per_sample.detach(),
        "text_dropped": dropped,
    }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


def inference_sigmas(num_steps: int, cfg: FlowConfig, num_tokens: int | None = None) -> torch.Tensor:
    """The Euler schedule, (num_steps + 1,) float32 ending in 0: linspace(1, 1/N, N) shifted, then a terminal 0.

    Equal to diffusers `FlowMatchEulerDiscreteScheduler(...).set_timesteps(sigmas=linspace(1, 1/N, N), mu=μ)` as the
    release pipeline calls it; the scheduler's timesteps are `1000 * sigmas[:-1]`. num_tokens (L = #target views ×
    (h/2)(w/2)) is required when cfg.dynamic_shift."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = apply_shift(base, cfg, float(num_tokens) if num_tokens is not None else None)
    return torch.cat([shifted.float(), torch.zeros(1)])


def inference_timesteps(num_steps: int, cfg: FlowConfig, num_tokens: int | None = None) -> torch.Tensor:
    """The scheduler's `timesteps` (num_steps,): num_train_timesteps · σ_k without the terminal 0."""
    return inference_sigmas(num_steps, cfg, num_tokens)[:-1] * cfg.num_train_timesteps


def _pad_text_to(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = length - states.shape[1]
    if missing <= 0:
        return states, mask
    states = torch.cat([states, states.new_zeros(states.shape[0], missing, states.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], missing)], dim=1)
    return states, mask


def _expand_batch(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name} has batch size {tensor.shape[0]}; expected 1 or {batch}.")


@torch.no_grad()
def sample(model: Callable, *, text_states: torch.Tensor, text_mask: torch.Tensor,
           latents_shape: tuple[int, ...] | None = None, noise: torch.Tensor | None = None,
           condition_latents: torch.Tensor | None = None, condition_mask=None,
           negative_text_states: torch.Tensor | None = None, negative_text_mask: torch.Tensor | None = None,
           guidance_scale: float = 1.0, num_steps: int = 50, cfg: FlowConfig = FlowConfig(),
           generator: torch.Generator | None = None, seed: int = 0, num_tokens: int | None = None,
           condition_sigma: float | None = None, model_dtype: torch.dtype | None = None,
           callback: Callable[[int, int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler sampling of a (B, T, 16, h, w) view sequence; returns float32 latents with the condition views equal to
    `condition_latents` and the target views denoised.

    Shape: from `noise` (explicit initial noise), else `latents_shape`, else `condition_latents`.
    condition_latents (B or 1, T, 16, h, w): clean values of the condition views (other views are ignored).
    condition_mask: (T,) or (B, T) bool, True = condition view held clean; None = every view is denoised. Every sample
        must have the same number of target views (the schedule is shared).
    text_states/mask: conditional text (B or 1, L, C)/(B or 1, L). For guidance_scale > 1 the negative text is
        required: pass the encoding of "" for the release's default.
    num_tokens: override of L for the dynamic shift (default: #target views × (h/2)(w/2)); ignored for a static shift.
    condition_sigma: network σ of condition views; None = the schedule's smallest non-zero σ (the release).
    model_dtype: dtype the denoiser's inputs are cast to (e.g. torch.bfloat16); the Euler update stays float32.
    callback(step, num_steps, sigma, latents) is called after every step."""
    if noise is not None:
        shape = tuple(noise.shape)
    elif latents_shape is not None:
        shape = tuple(latents_shape)
    elif condition_latents is not None:
        shape = tuple(condition_latents.shape)
    else:
        raise ValueError("sample() needs noise, latents_shape or condition_latents to know the output shape.")
    if len(shape) != 5:
        raise ValueError(f"latent shape must be (B, T, C, h, w); got {shape}.")
    batch, num_views, _, height, width = shape
    device = text_states.device

    if noise is None:
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        noise = _draw("normal", shape, generator, device)
    latents = noise.to(device=device, dtype=torch.float32).clone()

    if condition_mask is None:
        cond = torch.zeros(batch, num_views, dtype=torch.bool, device=device)
    else:
        cond = _broadcast_view_mask(condition_mask, batch, num_views, device, "condition_mask")
    has_conditions = bool(cond.any())
    if has_conditions:
        if condition_latents is None:
            raise ValueError("condition_mask marks condition views but condition_latents was not given.")
        clean = _expand_batch(condition_latents.to(device=device, dtype=torch.float32), batch, "condition_latents")
        cond5 = cond[:, :, None, None, None]
        latents = torch.where(cond5, clean, latents)
    num_targets = (~cond).sum(dim=1)
    if bool((num_targets != num_targets[0]).any()):
        raise ValueError(f"every sample must denoise the same number of views; got {num_targets.tolist()}.")
    if num_tokens is None:
        num_tokens = int(num_targets[0]) * tokens_per_view(height, width, cfg.patch_size)

    sigmas = inference_sigmas(num_steps, cfg, num_tokens if cfg.dynamic_shift else None).tolist()
    sigma_min = sigmas[-2] if condition_sigma is None else condition_sigma

    do_cfg = guidance_scale > 1.0
    text_states = _expand_batch(text_states, batch, "text_states")
    text_mask = _expand_batch(text_mask, batch, "text_mask")
    if do_cfg:
        if negative_text_states is None or negative_text_mask is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} > 1 needs negative_text_states/mask; pass the text encoding of the "
                f"negative prompt, or of \"\" for the release's default."
            )
        neg_states = _expand_batch(negative_text_states.to(text_states), batch, "negative_text_states")
        neg_mask = _expand_batch(negative_text_mask.to(device), batch, "negative_text_mask").to(text_mask.dtype)
        length = max(text_states.shape[1], neg_states.shape[1])
        neg_states, neg_mask = _pad_text_to(neg_states, neg_mask, length)
        pos_states, pos_mask = _pad_text_to(text_states, text_mask, length)
        model_states = torch.cat([neg_states, pos_states])
        model_mask = torch.cat([neg_mask, pos_mask])
    else:
        model_states, model_mask = text_states, text_mask
    if model_dtype is not None:
        model_states = model_states.to(model_dtype)

    for step in range(num_steps):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        view_sigmas = torch.where(cond, torch.full((batch, num_views), sigma_min, device=device),
                                  torch.full((batch, num_views), sigma, device=device))
        model_input = latents if model_dtype is None else latents.to(model_dtype)
        if do_cfg:
            model_input = torch.cat([model_input, model_input])
            view_sigmas = torch.cat([view_sigmas, view_sigmas])
        velocity = _call_denoiser(model, model_input, view_sigmas, model_states, model_mask,
                                  cfg.num_train_timesteps).float()
        if do_cfg:
            v_uncond, v_text = velocity.chunk(2)
            velocity = v_uncond + guidance_scale * (v_text - v_uncond)
        latents = latents + (sigma_next - sigma) * velocity
        if has_conditions:
            latents = torch.where(cond5, clean, latents)
        if callback is not None:
            callback(step, num_steps, sigma, latents)
    return latents


class FlowMatchEulerSampler:
    """`sample` with its settings bound: `FlowMatchEulerSampler(cfg, num_steps=50, guidance_scale=4)(model, ...)`."""

    def __init__(self, cfg: FlowConfig = FlowConfig(), num_steps: int = 50, guidance_scale: float = 1.0):
        self.cfg = cfg
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale

    @classmethod
    def from_scheduler_config(cls, config: Mapping | str | os.PathLike, **kwargs) -> "FlowMatchEulerSampler":
        return cls(FlowConfig.from_scheduler_config(config), **kwargs)

    def sigmas(self, num_tokens: int | None = None) -> torch.Tensor:
        return inference_sigmas(self.num_steps, self.cfg, num_tokens)

    def __call__(self, model: nn.Module | Callable, **kwargs) -> torch.Tensor:
        kwargs.setdefault("num_steps", self.num_steps)
        kwargs.setdefault("guidance_scale", self.guidance_scale)
        kwargs.setdefault("cfg", self.cfg)
        return sample(model, **kwargs)
