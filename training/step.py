"""The training step without Ray: model, objective and optimizer engine (INTERFACES §3).

    trainer = StepRunner(engine, text_encoder, flow_cfg, channel_mask=...)    # engine: DeepSpeed's (training.engine)
    metrics = trainer.step(batch, generator, process_group=dist.group.WORLD)  # one optimizer step on a views.Batch

Ray Train only wraps this (training/loop.py); the GPU bench and the single-process tests call it directly. The loss is
model.flow's, normalised for DeepSpeed's gradient averaging: every rank's loss is world_size · (its masked sum) / (the
all-reduced global count), so each element of the global batch weighs the same whatever a rank's share holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from model.flow import FlowConfig, flow_matching_loss
from model.views import Batch


def step_seed(seed: int, stage: int, step: int, rank: int, stream: int = 0) -> int:
    """The seed of one rank's random draws at one step (noise, σ, dropout, posterior samples). Derived, not carried:
    a resumed run draws exactly what the uninterrupted one drew at that step, whatever happened before. `stream` > 0:
    an independent seed of the same step (torch's global generators), never the step generator's sequence again."""
    entropy = [seed & 0xFFFFFFFF, stage, step, rank] + ([stream] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def step_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class TextEncoding:
    """The frozen T5 as the step uses it: prompts -> (states, mask) on the training device, plus the encoding of ""
    that dropped captions get (what the sampler's unconditional branch sees)."""

    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
    uncond_states: torch.Tensor
    uncond_mask: torch.Tensor

    @classmethod
    def from_encoder(cls, text_encoder, device: torch.device) -> "TextEncoding":
        def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            states, mask = text_encoder.encode(prompts)
            return states.to(device), mask.to(device)

        uncond_states, uncond_mask = encode([""])
        return cls(encode, uncond_states, uncond_mask)


class StepRunner:
    """One optimizer step of the flow-matching objective on a views.Batch through an engine with DeepSpeed's
    interface (`engine(...)` forward, `engine.backward(loss)`, `engine.step()`: clipping, optimizer, LR schedule)."""

    def __init__(self, engine, text: TextEncoding, flow_cfg: FlowConfig, *, channel_mask: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", model_dtype: torch.dtype | None = None):
        self.engine = engine
        self.text = text
        self.flow_cfg = flow_cfg
        self.device = torch.device(device)
        self.channel_mask = None if channel_mask is None else channel_mask.to(self.device)
        self.model_dtype = model_dtype

    def loss(self, batch: Batch, generator: torch.Generator | None, process_group=None):
        """(loss, stats) of model.flow on the batch; process_group: the data-parallel group (None: one process)."""
        batch = batch.to(self.device)
        states, mask = self.text.encode(batch.prompts)
        return flow_matching_loss(
            self.engine, batch.latents, states, mask, batch.target_mask, self.flow_cfg, generator,
            uncond_text_states=self.text.uncond_states, uncond_text_mask=self.text.uncond_mask,
            channel_mask=self.channel_mask, view_mask=batch.view_mask, process_group=process_group,
            model_dtype=self.model_dtype)

    def step(self, batch: Batch, generator: torch.Generator | None, process_group=None) -> dict[str, float]:
        """Forward, backward and optimizer step. Returns the global mean loss of the step (the same on every rank),
        the learning rate it stepped with and the gradient norm before clipping."""
        lr = float(self.engine.get_lr()[0])
        loss, stats = self.loss(batch, generator, process_group)
        self.engine.backward(loss)
        self.engine.step()
        total = stats["loss_sum"].detach().clone().double()
        if process_group is not None and dist.is_initialized():
            dist.all_reduce(total, group=process_group)
        mean = float(total / stats["global_count"].clamp_min(1).double())
        grad_norm = self.engine.get_global_grad_norm()
        return {"loss": mean, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


__all__ = ["StepRunner", "TextEncoding", "step_generator", "step_seed"]
