"""Euler sampling of a view sequence with clean condition views and text CFG, as the release pipeline does it.

Convention (ONEDIFFUSION_SPEC.md §4.2): σ = 1 is noise, σ = 0 data; the network sees time 1000·σ and predicts
v ≈ ε − x0. The schedule and every Euler update come from diffusers' `FlowMatchEulerDiscreteScheduler`
(model.schedule), so the arithmetic is diffusers' own:

  * `set_release_timesteps`: sigmas = linspace(1, 1/N, N), μ from L = #target views × (h/2)(w/2) (× noise_scale);
  * target views get time t = scheduler.timesteps[i]; condition views are clean and get `scheduler.timesteps[-1]`
    (σ_min, what training gives them too: model.schedule.condition_sigmas), and are overwritten with their clean
    values after every step (their velocities are computed and discarded);
  * the network gets (B,) times for a single view (the release's text-to-image call) and per-view (B, T) times
    otherwise (NextDiT averages them per patch as the release's dense img2img call does);
  * text CFG with a negative prompt: v = v_u + w·(v_c − v_u) when w > 1, both branches in one batched call, in the
    release's batch order [negative, prompt];
  * `scheduler.step` does x ← x + (σ_next − σ)·v in float32.

Deterministic: initial noise comes from `noise`, or `generator`, or `seed` (default 0), drawn on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.schedule import release_num_tokens, release_schedule


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


def _view_mask(mask, batch: int, num_views: int, device) -> torch.Tensor:
    mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
    if mask.dim() == 1:
        mask = mask.expand(batch, -1)
    if tuple(mask.shape) != (batch, num_views):
        raise ValueError(f"condition_mask has shape {tuple(mask.shape)}; expected ({num_views},) or "
                         f"({batch}, {num_views}).")
    return mask


def _network_times(view_times: torch.Tensor) -> torch.Tensor:
    """(B, T) per-view times → what the release passes: (B,) for one view, else (B, T)."""
    return view_times[:, 0] if view_times.shape[1] == 1 else view_times


def _cfg_text(text_states, text_mask, negative_text_states, negative_text_mask, batch: int, guidance_scale: float):
    text_states = _expand_batch(text_states, batch, "text_states")
    text_mask = _expand_batch(text_mask, batch, "text_mask")
    if guidance_scale <= 1.0:
        return text_states, text_mask
    if negative_text_states is None or negative_text_mask is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} > 1 needs negative_text_states/mask; pass the text encoding of the "
            f"negative prompt, or of \"\" for the release's default."
        )
    neg_states = _expand_batch(negative_text_states.to(text_states), batch, "negative_text_states")
    neg_mask = _expand_batch(negative_text_mask.to(text_mask.device), batch, "negative_text_mask").to(text_mask.dtype)
    length = max(text_states.shape[1], neg_states.shape[1])
    neg_states, neg_mask = _pad_text_to(neg_states, neg_mask, length)
    pos_states, pos_mask = _pad_text_to(text_states, text_mask, length)
    return torch.cat([neg_states, pos_states]), torch.cat([neg_mask, pos_mask])


@torch.no_grad()
def sample(model: Callable, *, text_states: torch.Tensor, text_mask: torch.Tensor,
           latents_shape: tuple[int, ...] | None = None, noise: torch.Tensor | None = None,
           condition_latents: torch.Tensor | None = None, condition_mask=None,
           negative_text_states: torch.Tensor | None = None, negative_text_mask: torch.Tensor | None = None,
           guidance_scale: float = 1.0, num_steps: int = 50, scheduler=None,
           generator: torch.Generator | None = None, seed: int = 0, num_tokens=None, noise_scale: float = 1.0,
           patch_size: int = 2, model_dtype: torch.dtype | None = None,
           callback: Callable[[int, int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Euler sampling of a (B, T, 16, h, w) view sequence; returns float32 latents with the condition views equal to
    `condition_latents` and the target views denoised.

    Shape: from `noise` (explicit initial noise), else `latents_shape`, else `condition_latents`.
    condition_latents (B or 1, T, 16, h, w): clean values of the condition views (other views are ignored).
    condition_mask: (T,) or (B, T) bool, True = condition view held clean; None = every view is denoised. Every sample
        must have the same number of target views (the schedule is shared).
    text_states/mask: conditional text (B or 1, L, C)/(B or 1, L). For guidance_scale > 1 the negative text is
        required: pass the encoding of "" for the release's default.
    scheduler: a diffusers FlowMatchEulerDiscreteScheduler (None = the release's config); it is copied, not changed.
    num_tokens: L for the dynamic shift; default: noise_scale × #target views × (h/p)(w/p), in the release's
        arithmetic (model.schedule.release_num_tokens).
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
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    latents = noise.to(device=device, dtype=torch.float32).clone()

    cond = (torch.zeros(batch, num_views, dtype=torch.bool, device=device) if condition_mask is None
            else _view_mask(condition_mask, batch, num_views, device))
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
        num_tokens = release_num_tokens(int(num_targets[0]), height, width, patch_size, noise_scale, num_views)

    scheduler = release_schedule(scheduler, num_steps, num_tokens, device=device)
    condition_time = scheduler.timesteps[-1]

    do_cfg = guidance_scale > 1.0
    model_states, model_mask = _cfg_text(text_states, text_mask, negative_text_states, negative_text_mask, batch,
                                         guidance_scale)
    if model_dtype is not None:
        model_states = model_states.to(model_dtype)
    model_cond = torch.cat([cond, cond]) if do_cfg else cond

    for step, t in enumerate(scheduler.timesteps):
        model_input = latents if model_dtype is None else latents.to(model_dtype)
        if do_cfg:
            model_input = torch.cat([model_input, model_input])
        view_times = torch.where(model_cond, condition_time, t)
        velocity = model(samples=model_input, timesteps=_network_times(view_times),
                         encoder_hidden_states=model_states, encoder_attention_mask=model_mask)
        velocity = velocity.reshape(model_input.shape).float()
        if do_cfg:
            v_uncond, v_text = velocity.chunk(2)
            velocity = v_uncond + guidance_scale * (v_text - v_uncond)
        latents = scheduler.step(velocity, t, latents).prev_sample
        if has_conditions:
            latents = torch.where(cond5, clean, latents)
        if callback is not None:
            callback(step, num_steps, float(scheduler.sigmas[step]), latents)
    return latents


__all__ = ["sample"]
