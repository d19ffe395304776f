"""Rectified-flow training objective, in the convention of the released checkpoint, fit for distributed bf16 training.

Sampling lives in model/sampler.py and its schedule in model/schedule.py (diffusers' FlowMatchEulerDiscreteScheduler);
this module holds only the training objective.

Convention (ONEDIFFUSION_SPEC.md §4.2; the paper's t = 1 − σ with the opposite sign is the same field):

    σ = 1 is pure noise, σ = 0 is data;     x_σ = (1 − σ)·x0 + σ·ε,   ε ~ N(0, I)
    the network sees time 1000·σ;           it predicts v ≈ ε − x0

`flow_matching_loss(model, x0 (B, T, C, h, w), text, ...)`:

  * Per-view σ (the paper's eq. 5): every view of a sample gets its own σ = sigmoid(n), n ~ N(logit_mean, logit_std),
    then shifted. Default: the static SD3 shift σ' = sσ/(1 + (s − 1)σ) with s = `shift` = 3 (the paper). Optional
    `dynamic_shift`: σ' = e^μ/(e^μ + 1/σ − 1) with μ = model.schedule.dynamic_shift_mu(L), L = the sample's noised
    tokens (real views only), CLIPPED to [base_shift, max_shift] (unclipped, many views at 1024² put nearly every σ
    near 1). The training σ distribution is its own setting: the scheduler the model is sampled with never switches it.
  * Clean condition views (spec §4.3 caveat): with probability `clean_condition_prob` a sample is "clean": all its
    non-target views keep x_σ = x0 exactly and get the network time the sampler gives condition views,
    1000·model.schedule.condition_sigmas(sampling_schedule, condition_steps, L) with L = #target views of that sample
    (real views) × tokens_per_view(h, w, patch_size): the same σ_min = scheduler.timesteps[-1]/1000 as
    model/sampler.py, by construction. Clean views never enter the loss (their target ε − x0 cannot be predicted
    from a clean input).
  * Float32 objective: noise, noised latents and the velocity target ε − x0 are float32 whatever x0's dtype; the
    model input is float32 (cast by autocast, or by `model_dtype`); the squared error is float32.
  * The model gets per-view timesteps (B, T), float32 1000·σ, for every T.
  * Loss: `loss_on="all"`: every noised view (the paper's eq. 5, conditions included); `"targets"`: only the views in
    `target_mask`. `view_mask` (B, T) drops padded views, `channel_mask` (C,)/(B, C) drops always-zero pad channels.
    loss = world_size · Σ(masked squared errors) / (global count of masked elements), the count all-reduced over
    `process_group` (INTERFACES.md §3: DDP/DeepSpeed average gradients over ranks, so every element of the global
    batch weighs the same). The count needs only the masks, so its all-reduce (detached, async) is started before the
    forward and waited for after it. process_group=None (explicit, no implicit collective) or torch.distributed not
    initialised: Σ/count, the mean over the elements in the loss.
  * Text dropout for CFG (rate `text_dropout_prob`), with torch.where: a dropped sample's text is the *encoding of the
    empty prompt* `uncond_text_states/uncond_text_mask` (what the sampler's unconditional branch sees; recommended),
    or, when not passed, all-zero states with only the first token valid (one attendable key, no division by zero).
  * No host synchronisation: no .item()/bool(tensor)/nonzero/data-dependent shapes and no CPU↔device copies. Random
    numbers are drawn on x0's device from `generator` (a generator on that device; None = that device's default).
    The condition-time table (one value per possible #target views) is computed on the CPU once per (schedule, steps,
    view size, T, device), moved to the device once and cached.

Random draws, in this order, all from `generator`, all float32 on x0's device:
  1. clean-condition coin u (B,) uniform; sample b is clean if u_b < clean_condition_prob;
  2. σ normals n (B, T) (skipped when `sigmas` is given);
  3. noise ε (B, T, C, h, w) standard normal (skipped when `noise` is given);
  4. text-dropout coin u (B,) uniform; sample b's text is dropped if u_b < text_dropout_prob.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.schedule import (
    RELEASE_SCHEDULER_CONFIG,
    check_condition_sigma_support,
    condition_sigmas,
    dynamic_shift_mu,
    read_scheduler_config,
    release_num_tokens,
    tokens_per_view,
)

LOSS_ON_CHOICES = ("all", "targets")


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


def _freeze(value):
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class FrozenSchedulerConfig(Mapping):
    """A scheduler config as an immutable, hashable, picklable mapping (keys starting with "_", the diffusers
    metadata such as "_class_name", are dropped; lists become tuples)."""

    def __init__(self, config: Mapping):
        self._items = tuple(sorted((str(k), _freeze(v)) for k, v in config.items() if not str(k).startswith("_")))
        self._lookup = dict(self._items)

    def __getitem__(self, key):
        return self._lookup[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._lookup)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other) -> bool:
        if isinstance(other, FrozenSchedulerConfig):
            return self._items == other._items
        return isinstance(other, Mapping) and self._lookup == dict(other)

    def __repr__(self) -> str:
        return f"FrozenSchedulerConfig({self._lookup!r})"


def _as_scheduler_config(value) -> FrozenSchedulerConfig:
    if isinstance(value, FrozenSchedulerConfig):
        return value
    if not isinstance(value, Mapping) and isinstance(getattr(value, "config", None), Mapping):
        value = value.config  # a diffusers scheduler object
    return FrozenSchedulerConfig(read_scheduler_config(value))


@dataclass(frozen=True)
class FlowConfig:
    """Training settings of the objective (frozen, hashable, picklable). Nothing here is read from a scheduler:
    the training σ distribution is static shift 3 (the paper) unless `dynamic_shift=True` is asked for.

    sampling_schedule: the scheduler config (dict, scheduler_config.json / its folder, or a diffusers scheduler) the
        model will be sampled with; only used for the time of clean condition views (and the 1000 of 1000·σ), so
        that they see in training exactly what model/sampler.py gives them. Stored as a FrozenSchedulerConfig.
    condition_steps: the inference step count the condition time is taken from (the pipeline default is 50)."""

    # training σ: logit-normal, then shifted
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    dynamic_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch_size: int = 2  # tokens per view = (h / patch_size) * (w / patch_size)
    # clean condition views, seen at the sampler's condition time
    clean_condition_prob: float = 0.0
    sampling_schedule: Mapping = field(default=FrozenSchedulerConfig(RELEASE_SCHEDULER_CONFIG))
    condition_steps: int = 50
    # loss and text
    loss_on: str = "all"
    text_dropout_prob: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "sampling_schedule", _as_scheduler_config(self.sampling_schedule))
        check_condition_sigma_support(self.sampling_schedule)
        if self.loss_on not in LOSS_ON_CHOICES:
            raise ValueError(f"FlowConfig.loss_on={self.loss_on!r}; expected one of {LOSS_ON_CHOICES}.")
        for name in ("clean_condition_prob", "text_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"FlowConfig.{name}={value} must lie in [0, 1].")
        if self.shift <= 0:
            raise ValueError(f"FlowConfig.shift={self.shift} must be > 0 (1 means no shift).")
        if self.logit_std <= 0:
            raise ValueError(f"FlowConfig.logit_std={self.logit_std} must be > 0.")
        if self.max_seq_len == self.base_seq_len:
            raise ValueError("FlowConfig.max_seq_len must differ from base_seq_len (they define the mu line).")
        if self.base_shift > self.max_shift:
            raise ValueError(f"FlowConfig.base_shift={self.base_shift} > max_shift={self.max_shift}: mu is clipped "
                             "to [base_shift, max_shift].")
        if int(self.condition_steps) != self.condition_steps or self.condition_steps < 1:
            raise ValueError(f"FlowConfig.condition_steps={self.condition_steps} must be an integer >= 1.")
        if self.patch_size < 1:
            raise ValueError(f"FlowConfig.patch_size={self.patch_size} must be >= 1.")

    @property
    def num_train_timesteps(self) -> int:
        """The network time scale (1000): the sampling schedule's, so training and sampling agree."""
        return int(self.sampling_schedule.get("num_train_timesteps", 1000))

    def replace(self, **changes) -> "FlowConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict (JSON-able), the sampling schedule as a dict."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["sampling_schedule"] = dict(self.sampling_schedule)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Training σ
# ----------------------------------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static SD3 shift σ' = sσ / (1 + (s − 1)σ) (= the exponential shift with μ = log s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def training_shift_mu(cfg: FlowConfig, num_tokens):
    """μ of the training dynamic shift: model.schedule.dynamic_shift_mu(L), clipped to [base_shift, max_shift].
    num_tokens: an int/float or a tensor (float32 result on its device)."""
    if isinstance(num_tokens, torch.Tensor):
        mu = dynamic_shift_mu(num_tokens.to(torch.float32), cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift,
                              cfg.max_shift)
        return mu.clamp(cfg.base_shift, cfg.max_shift)
    mu = dynamic_shift_mu(num_tokens, cfg.base_seq_len, cfg.max_seq_len, cfg.base_shift, cfg.max_shift)
    return min(max(mu, cfg.base_shift), cfg.max_shift)


def shift_training_sigmas(sigmas: torch.Tensor, cfg: FlowConfig, num_tokens=None) -> torch.Tensor:
    """The shift `cfg` asks for. Dynamic needs num_tokens: an int, or a (B,) tensor (one L per row of `sigmas`)."""
    if not cfg.dynamic_shift:
        return shift_sigmas(sigmas, cfg.shift)
    if num_tokens is None:
        raise ValueError("FlowConfig.dynamic_shift=True needs num_tokens (#noised views x tokens per view).")
    mu = training_shift_mu(cfg, num_tokens)
    if isinstance(mu, torch.Tensor):
        exp_mu = torch.exp(mu).reshape(-1, *([1] * (sigmas.dim() - 1))) if mu.dim() == 1 else torch.exp(mu)
    else:
        exp_mu = math.exp(mu)
    return exp_mu / (exp_mu + (1 / sigmas - 1))


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and torch.device(generator.device) != torch.device(device):
        raise ValueError(
            f"the generator is on {generator.device} but the latents are on {device}: random numbers are drawn on the "
            f"latents' device, so create the generator there, torch.Generator(device=x0.device) (None = that "
            f"device's default generator)."
        )


def sample_view_sigmas(batch: int, num_views: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                       num_tokens=None, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-view training σ of the noised views, (B, T) float32 on `device` (default: the generator's, else CPU):
    logit-normal, then shifted as `cfg` says. num_tokens: int or (B,) tensor, required when cfg.dynamic_shift."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    _check_generator(generator, device)
    normal = torch.randn((batch, num_views), generator=generator, device=device, dtype=torch.float32)
    sigmas = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    return shift_training_sigmas(sigmas, cfg, num_tokens)


@functools.lru_cache(maxsize=64)
def _condition_sigma_table(schedule: FrozenSchedulerConfig, num_steps: int, height: int, width: int, patch_size: int,
                           num_views: int, device: torch.device) -> torch.Tensor:
    """(num_views + 1,) float32 on `device`: entry k = the sampler's condition σ for k target views of (h, w) in a
    sequence of `num_views` views (the release's L, and so μ, is float32 for several views: release_num_tokens).

    Built on the CPU (as diffusers builds the schedule, in numpy) and moved once; cached, so the training step makes
    no host→device copy. Read only."""
    counts = torch.arange(num_views + 1, dtype=torch.int64)
    tokens = release_num_tokens(counts, height, width, patch_size, num_views=num_views)
    return condition_sigmas(schedule, num_steps, torch.as_tensor(tokens)).to(device)


def condition_view_sigmas(cfg: FlowConfig, num_targets: torch.Tensor, height: int, width: int,
                          num_views: int) -> torch.Tensor:
    """The σ model/sampler.py gives condition views, per sample: num_targets (B,) int64 target views (≤ num_views)
    of (h, w) latents in sequences of `num_views` views. Float32 on num_targets' device."""
    table = _condition_sigma_table(cfg.sampling_schedule, int(cfg.condition_steps), int(height), int(width),
                                   int(cfg.patch_size), int(num_views), num_targets.device)
    return table[num_targets]


# ----------------------------------------------------------------------------------------------------------------------
# Training objective
# ----------------------------------------------------------------------------------------------------------------------


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε. x0, noise: (B, T, C, h, w); sigmas: (B, T) (or anything broadcasting after adding
    trailing dims). σ = 0 gives x0 exactly."""
    sigmas = sigmas.to(x0.dtype)
    while sigmas.dim() < x0.dim():
        sigmas = sigmas.unsqueeze(-1)
    return (1 - sigmas) * x0 + sigmas * noise


def _on_device(value, device: torch.device, name: str, dtype=None) -> torch.Tensor:
    """`value` as a tensor on `device` without a host↔device copy: a tensor elsewhere is refused; a Python sequence is
    accepted only for CPU latents (building it on an accelerator would be a host→device copy)."""
    if isinstance(value, torch.Tensor):
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the latents are on {device}; create it on x0.device "
                             "once, outside the training step (no host<->device copies in the loss).")
        return value if dtype is None else value.to(dtype)
    if device.type != "cpu":
        raise ValueError(f"{name} must be a tensor on {device} (the latents' device), not a {type(value).__name__}.")
    return torch.as_tensor(value, dtype=dtype)


def _view_mask(mask, batch: int, num_views: int, device, name: str) -> torch.Tensor:
    mask = _on_device(mask, device, name, torch.bool)
    if mask.dim() == 1:
        mask = mask.expand(batch, -1)
    if tuple(mask.shape) != (batch, num_views):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected ({num_views},) or ({batch}, {num_views}).")
    return mask


def _channel_mask(mask, batch: int, channels: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, channels, dtype=torch.bool, device=device)
    mask = _on_device(mask, device, "channel_mask", torch.bool)
    if mask.dim() == 1:
        mask = mask.expand(batch, -1)
    if tuple(mask.shape) != (batch, channels):
        raise ValueError(f"channel_mask has shape {tuple(mask.shape)}; expected ({channels},) or "
                         f"({batch}, {channels}).")
    return mask


def empty_text_like(text_states: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback "empty prompt" when no encoding of "" is available: zero states, only token 0 valid."""
    states = torch.zeros_like(text_states)
    mask = torch.zeros_like(text_mask)
    mask[:, 0] = 1
    return states, mask


def drop_text(text_states: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor,
              uncond_text_states: torch.Tensor | None = None, uncond_text_mask: torch.Tensor | None = None):
    """Replace the text of the samples where `drop` (B,) is True by the unconditional text (see module docstring).
    Always a torch.where (no branch on `drop`). uncond_text_states: (L, C), (1, L, C) or (B, L, C) on the text's
    device, with the captions' padding length."""
    if uncond_text_states is None:
        uncond_text_states, uncond_text_mask = empty_text_like(text_states, text_mask)
    elif uncond_text_mask is None:
        raise ValueError("uncond_text_states was given without uncond_text_mask; pass both (the encoding of \"\").")
    for name, value in (("uncond_text_states", uncond_text_states), ("uncond_text_mask", uncond_text_mask)):
        if value.device != text_states.device:
            raise ValueError(f"{name} is on {value.device} but the text states are on {text_states.device}; move the "
                             "empty-prompt encoding to the training device once, outside the step.")
    batch, length = text_mask.shape
    if uncond_text_states.dim() == 2:
        uncond_text_states, uncond_text_mask = uncond_text_states[None], uncond_text_mask.reshape(1, -1)
    if uncond_text_states.shape[1] != length or uncond_text_states.shape[-1] != text_states.shape[-1]:
        raise ValueError(
            f"uncond text states {tuple(uncond_text_states.shape)} do not match text states "
            f"{tuple(text_states.shape)}; encode \"\" with the same padding length as the captions."
        )
    uncond_states = uncond_text_states.to(text_states.dtype).expand(batch, -1, -1)
    uncond_mask = uncond_text_mask.to(text_mask.dtype).expand(batch, -1)
    states = torch.where(drop[:, None, None], uncond_states, text_states)
    mask = torch.where(drop[:, None], uncond_mask, text_mask)
    return states, mask


def _resolve_group(process_group, world_size: int | None):
    """(group, world size) for the loss normalisation; (None, 1) without a process group or torch.distributed."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        if world_size not in (None, 1):
            raise ValueError(f"world_size={world_size} without an initialised process group: the global element "
                             "count needs process_group (e.g. torch.distributed.group.WORLD).")
        return None, 1
    return process_group, int(world_size) if world_size is not None else dist.get_world_size(process_group)


def flow_matching_loss(model: Callable, x0: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                       target_mask: torch.Tensor | None = None, cfg: FlowConfig = FlowConfig(),
                       generator: torch.Generator | None = None, *,
                       uncond_text_states: torch.Tensor | None = None,
                       uncond_text_mask: torch.Tensor | None = None,
                       channel_mask: torch.Tensor | None = None,
                       view_mask: torch.Tensor | None = None,
                       process_group=None,
                       world_size: int | None = None,
                       noise: torch.Tensor | None = None,
                       sigmas: torch.Tensor | None = None,
                       model_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rectified-flow loss of one batch of view sequences (see the module docstring for the method and the order of
    the random draws).

    x0: (B, T, C, h, w) clean latents, any float dtype (the objective is computed in float32).
    text_states (B, L, D), text_mask (B, L); uncond_text_states/mask: the encoding of "" for text dropout.
    target_mask: (T,) or (B, T) bool, the views the sample's task generates (None: all; then no view is held clean).
    generator: a torch.Generator on x0's device (None: that device's default generator).
    channel_mask: (C,) or (B, C) bool, channels in the loss (e.g. False for a tokenizer's always-zero pad channels).
    view_mask: (T,) or (B, T) bool, real views (False: padding, never in the loss nor in the token counts).
    process_group: the data-parallel group gradients are averaged over (e.g. torch.distributed.group.WORLD); the
        element count is all-reduced over it and the loss is world_size · local sum / global count. None (or
        torch.distributed not initialised): local sum / local count.
    world_size: the number of ranks gradients are averaged over (default: the size of process_group). With gradient
        accumulation (DeepSpeed also divides by the accumulation steps) each micro-batch is normalised by its own
        global count, so micro-batches weigh the same and, within one, every element of the global batch does.
    noise: (B, T, C, h, w) replaces draw 3; sigmas: (B, T) replaces draw 2 (σ of the noised views, already shifted).
    model_dtype: dtype the samples and text states are cast to for the model call (None: float32 / as given).
    All tensor arguments must be on x0's device (no host↔device copies in the step).

    Returns (loss, stats). stats are detached: "sigmas" (B, T) network σ, "timesteps" (B, T) what the model got,
    "noise_sigmas" (B, T) σ of the content, "clean_views", "in_loss" (B, T) bool, "per_view_loss" (B, T) mean squared
    error over each view's masked channels (every view), "per_sample_loss" (B,) mean over the sample's elements in the
    loss (0 where none), "loss_sum" () local masked sum, "loss_count" () int64 local element count, "global_count" ()
    int64 all-reduced count, "text_dropped" (B,)."""
    if x0.dim() != 5:
        raise ValueError(f"x0 must be (B, T, C, h, w); got shape {tuple(x0.shape)}.")
    batch, num_views, channels, height, width = x0.shape
    device = x0.device
    _check_generator(generator, device)
    targets = (torch.ones(batch, num_views, dtype=torch.bool, device=device) if target_mask is None
               else _view_mask(target_mask, batch, num_views, device, "target_mask"))
    valid = (torch.ones(batch, num_views, dtype=torch.bool, device=device) if view_mask is None
             else _view_mask(view_mask, batch, num_views, device, "view_mask"))
    channel_in_loss = _channel_mask(channel_mask, batch, channels, device)
    group, ranks = _resolve_group(process_group, world_size)

    # 1. clean-condition coin: a clean sample keeps all its non-target views exact
    clean_sample = torch.rand((batch,), generator=generator, device=device) < cfg.clean_condition_prob
    clean_views = clean_sample[:, None] & ~targets

    # the loss mask and element count are known before the forward: start the count all-reduce now
    in_loss = ~clean_views & valid
    if cfg.loss_on == "targets":
        in_loss = in_loss & targets
    view_elements = channel_in_loss.sum(dim=1) * (height * width)  # (B,) int64
    local_count = (in_loss.sum(dim=1) * view_elements).sum()
    global_count, work = local_count.clone(), None
    if group is not None:
        work = dist.all_reduce(global_count, group=group, async_op=True)

    # 2. σ of the noised views (per view, eq. 5); clean views get the sampler's condition time
    if sigmas is None:
        noised_tokens = None
        if cfg.dynamic_shift:
            noised_tokens = (~clean_views & valid).sum(dim=1) * tokens_per_view(height, width, cfg.patch_size)
        drawn = sample_view_sigmas(batch, num_views, cfg, generator, num_tokens=noised_tokens, device=device)
    else:
        drawn = _sigmas_override(sigmas, batch, num_views, device)
    cond_sigmas = condition_view_sigmas(cfg, (targets & valid).sum(dim=1), height, width, num_views)  # (B,)
    net_sigmas = torch.where(clean_views, cond_sigmas[:, None], drawn)
    noise_sigmas = torch.where(clean_views, torch.zeros_like(drawn), drawn)

    # 3. noise, noised latents and target in float32
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
    else:
        noise = _on_device(noise, device, "noise", torch.float32)
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {tuple(x0.shape)}.")
    clean = x0.float()
    samples = add_noise(clean, noise, noise_sigmas)
    target = noise - clean

    # 4. text dropout coin
    dropped = torch.rand((batch,), generator=generator, device=device) < cfg.text_dropout_prob
    text_states, text_mask = drop_text(text_states, text_mask, dropped, uncond_text_states, uncond_text_mask)

    timesteps = net_sigmas * cfg.num_train_timesteps  # (B, T) float32
    model_samples = samples if model_dtype is None else samples.to(model_dtype)
    model_text = text_states if model_dtype is None else text_states.to(model_dtype)
    velocity = model(samples=model_samples, timesteps=timesteps, encoder_hidden_states=model_text,
                     encoder_attention_mask=text_mask)
    velocity = velocity.reshape(x0.shape).float()

    per_channel = (velocity - target).pow(2).sum(dim=(3, 4))  # (B, T, C) float32
    per_view_sum = torch.where(channel_in_loss[:, None, :], per_channel, 0.0).sum(dim=2)  # (B, T)
    per_view_loss = per_view_sum / view_elements.clamp_min(1)[:, None]
    in_loss_sum = torch.where(in_loss, per_view_sum, 0.0)
    local_sum = in_loss_sum.sum()
    if work is not None:
        work.wait()
    loss = local_sum * ranks / global_count.clamp_min(1).to(torch.float32)

    sample_count = in_loss.sum(dim=1) * view_elements
    stats = {
        "sigmas": net_sigmas.detach(),
        "timesteps": timesteps.detach(),
        "noise_sigmas": noise_sigmas.detach(),
        "clean_views": clean_views,
        "in_loss": in_loss,
        "per_view_loss": per_view_loss.detach(),
        "per_sample_loss": (in_loss_sum.sum(dim=1) / sample_count.clamp_min(1)).detach(),
        "loss_sum": local_sum.detach(),
        "loss_count": local_count,
        "global_count": global_count,
        "text_dropped": dropped,
    }
    return loss, stats


def _sigmas_override(sigmas, batch: int, num_views: int, device) -> torch.Tensor:
    sigmas = _on_device(sigmas, device, "sigmas", torch.float32)
    if tuple(sigmas.shape) != (batch, num_views):
        raise ValueError(f"sigmas has shape {tuple(sigmas.shape)}; expected ({batch}, {num_views}).")
    return sigmas


__all__ = [
    "FlowConfig",
    "FrozenSchedulerConfig",
    "LOSS_ON_CHOICES",
    "add_noise",
    "condition_view_sigmas",
    "drop_text",
    "empty_text_like",
    "flow_matching_loss",
    "sample_view_sigmas",
    "shift_sigmas",
    "shift_training_sigmas",
    "training_shift_mu",
]
