"""The sampling schedule: diffusers' `FlowMatchEulerDiscreteScheduler`, configured from a folder's
`scheduler_config.json` and called exactly as the release pipeline calls it (ONEDIFFUSION_SPEC.md §4.4).

The release sets, for N steps and L denoised tokens (L = noise_scale × #target views × (h/2)(w/2)),

    sigmas = np.linspace(1.0, 1 / N, N);  mu = calculate_shift(L, ...);  scheduler.set_timesteps(sigmas=sigmas, mu=mu)

and feeds condition views the time `scheduler.timesteps[-1]`. The scheduler rounds the linspace to float32 and
shifts in float32; this module calls the scheduler itself (`set_release_timesteps`) instead of a copy of its
arithmetic, so every schedule option diffusers supports behaves as in diffusers.

Training needs the condition time of many samples at once, on the device, without a host round trip:
`condition_sigmas` reproduces σ_min = scheduler.sigmas[-2] of the plain and dynamic (exponential) shift in float32
torch ops, bit for bit (tests/test_schedule.py checks it against the scheduler); configs with other options (karras,
exponential/beta sigmas, shift_terminal, linear time shift, inverted sigmas) are refused there with a clear error.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SCHEDULER_CLASS_NAME = "FlowMatchEulerDiscreteScheduler"
# The release's scheduler/scheduler_config.json (spec §4.4, from the bf16 mirror): dynamic shift on.
RELEASE_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# Options that change σ_min in ways `condition_sigmas` does not reproduce, with their neutral values.
_OPTIONS_WITHOUT_VECTOR_FORM = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "time_shift_type": "exponential",
}


def load_scheduler(config: Mapping | str | os.PathLike | None = None):
    """A `FlowMatchEulerDiscreteScheduler` from a config dict, a `scheduler_config.json`, or a folder holding one
    (e.g. `<release>/scheduler`); None = the release's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(read_scheduler_config(config))


def read_scheduler_config(config: Mapping | str | os.PathLike | None = None) -> dict:
    """The scheduler config as a plain dict (see `load_scheduler` for what `config` may be)."""
    if config is None:
        return dict(RELEASE_SCHEDULER_CONFIG)
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(config)
    if path.is_dir():
        path = path / SCHEDULER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scheduler config; expected the {SCHEDULER_CONFIG_NAME} of a diffusers "
                                f"{SCHEDULER_CLASS_NAME} (a release folder's scheduler/).")
    return json.loads(path.read_text())


def tokens_per_view(height: int, width: int, patch_size: int = 2) -> int:
    """Tokens one (16, h, w) latent view becomes after 2×2 patchify."""
    return (height // patch_size) * (width // patch_size)


def dynamic_shift_mu(num_tokens, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15):
    """μ = L·m + b on the line through (base_seq_len, base_shift) and (max_seq_len, max_shift), not clipped: the
    release's `calculate_shift`, in its order of operations (a float, or a float64 tensor for tensor input)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return num_tokens * m + b


def release_num_tokens(num_targets, height: int, width: int, patch_size: int = 2, noise_scale: float = 1.0,
                       num_views: int = 1):
    """L for μ, as the release computes it for `num_targets` denoised views of (h, w) latents.

    Text-to-image (one view) computes it from Python ints: a float. The img2img path (several views) multiplies
    `noise_scale` by `sum(denoise_mask)` of a tensor, so L, and then μ, are float32 tensors there; this keeps that
    order of operations (`noise_scale * targets * w * h / p / p`). `num_targets` may be a tensor of counts."""
    if num_views == 1:
        return noise_scale * num_targets * width * height / patch_size / patch_size
    targets = torch.as_tensor(num_targets, dtype=torch.int64)
    return noise_scale * targets * width * height / patch_size / patch_size


def schedule_mu(scheduler_config: Mapping, num_tokens):
    """μ the release passes to `set_timesteps` for `num_tokens` denoised tokens (a float, or a tensor computed in
    its dtype, as the release's img2img does in float32); None without dynamic shifting."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return None
    return dynamic_shift_mu(num_tokens, scheduler_config.get("base_image_seq_len", 256),
                            scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                            scheduler_config.get("max_shift", 1.15))


def set_release_timesteps(scheduler, num_steps: int, num_tokens: float, device=None) -> None:
    """`scheduler.set_timesteps` as the release calls it: sigmas = linspace(1, 1/N, N), μ from `num_tokens`.

    Afterwards `scheduler.timesteps` (N,) are the network times, `scheduler.sigmas` (N + 1,) ends in 0 and
    `scheduler.timesteps[-1]` is the time the release gives condition views."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps={num_steps} must be >= 1.")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=schedule_mu(scheduler.config, num_tokens))


def release_schedule(scheduler, num_steps: int, num_tokens, device=None):
    """A copy of `scheduler` (None = the release's config) set by `set_release_timesteps`; the given one is left
    untouched, so a pipeline's scheduler can serve any number of calls."""
    scheduler = copy.deepcopy(scheduler) if scheduler is not None else load_scheduler()
    set_release_timesteps(scheduler, num_steps, num_tokens, device=device)
    return scheduler


def check_condition_sigma_support(scheduler_config: Mapping) -> None:
    """Refuse scheduler options whose σ_min `condition_sigmas` does not reproduce."""
    for key, neutral in _OPTIONS_WITHOUT_VECTOR_FORM.items():
        if scheduler_config.get(key) not in (neutral, None, False, 0):
            raise ValueError(
                f"scheduler config sets {key}={scheduler_config[key]!r}: the training condition time "
                "(model.schedule.condition_sigmas) reproduces only the plain and dynamic exponential shift; "
                "train with a scheduler config without it."
            )


def condition_sigmas(scheduler_config: Mapping, num_steps: int, num_tokens: torch.Tensor) -> torch.Tensor:
    """σ_min = scheduler.sigmas[-2] after `set_release_timesteps(num_steps, L)`, for a tensor of L (any shape, any
    device), float32, computed on L's device with no host synchronisation. The sampler feeds condition views the
    network time 1000·σ_min (`scheduler.timesteps[-1]`), so training gives them the same. Pass L as
    `release_num_tokens` gives it: float32 L (img2img) gives a float32 μ, any other dtype a float64 μ.

    Float32 steps in diffusers' order: t = float32(1/N); dynamic: e^μ (in float64, as `math.exp`) rounded to
    float32, then e^μ / (e^μ + (1/t − 1)); static: s·t / (1 + (s − 1)·t)."""
    check_condition_sigma_support(scheduler_config)
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    device = num_tokens.device
    t = torch.tensor(np.float32(np.linspace(1.0, 1 / num_steps, num_steps)[-1]), device=device)
    if scheduler_config.get("use_dynamic_shifting", False):
        tokens = num_tokens if num_tokens.dtype == torch.float32 else num_tokens.to(torch.float64)
        exp_mu = torch.exp(schedule_mu(scheduler_config, tokens).to(torch.float64)).to(torch.float32)
        return exp_mu / (exp_mu + (1 / t - 1))
    shift = float(scheduler_config.get("shift", 1.0))
    sigma = shift * t / (1 + (shift - 1) * t)
    return sigma.expand(num_tokens.shape).clone()


__all__ = [
    "RELEASE_SCHEDULER_CONFIG",
    "SCHEDULER_CONFIG_NAME",
    "condition_sigmas",
    "dynamic_shift_mu",
    "load_scheduler",
    "read_scheduler_config",
    "release_num_tokens",
    "release_schedule",
    "schedule_mu",
    "set_release_timesteps",
    "tokens_per_view",
]
