"""The EMA of the transformer's weights (diffusers' EMAModel, with its warm-up) and its export as a release-layout
folder, the `pipeline/` of every checkpoint (INTERFACES §3):

    ema = EmaWeights(model, cfg.train.ema, keep=rank == 0, zero3=cfg.train.zero_stage == 3)   # before DeepSpeed
    ...; engine.step(); ema.step(engine.module)          # every rank (a collective under ZeRO-3)
    ema.export(folder / "pipeline", image_tokenizer, text_encoder)                          # rank 0

Under ZeRO-3 each rank holds a shard of every parameter, so the step gathers the full parameters first
(deepspeed.zero.GatheredParameters, a collective every rank enters) and only rank 0, which keeps the average and
writes the export, updates it: never an average of empty shards. The average is float32 on the training device;
`pipeline/transformer` holds it exactly, so a resume reads the average back from there (no second copy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from onegen.train_config import EmaSection


class EmaWeights:
    def __init__(self, model: torch.nn.Module, cfg: EmaSection, *, keep: bool, zero3: bool):
        from diffusers.training_utils import EMAModel

        self.zero3 = zero3
        self.names = [name for name, _ in model.named_parameters()]
        self.config = dict(model.config)
        self.model_class = type(model)
        # made from the full parameters, before DeepSpeed partitions them; float32 whatever the training precision
        self.ema = EMAModel([p.detach().float() for p in model.parameters()], decay=cfg.decay,
                            min_decay=cfg.min_decay, update_after_step=cfg.update_after_step,
                            use_ema_warmup=cfg.use_warmup, inv_gamma=cfg.inv_gamma, power=cfg.power) if keep else None

    def to(self, device: torch.device) -> "EmaWeights":
        if self.ema is not None:
            self.ema.to(device=device)
        return self

    @torch.no_grad()
    def step(self, module: torch.nn.Module) -> None:
        """Move the average towards the module's current weights (call on every rank after each optimizer step)."""
        params = list(module.parameters())
        gathered = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gathered:
            if self.ema is not None:
                self.ema.step(params)

    @property
    def optimization_step(self) -> int:
        return int(self.ema.optimization_step) if self.ema is not None else 0

    def decay(self) -> float:
        """The decay of the last step (EMAModel.get_decay of its step count)."""
        return float(self.ema.get_decay(self.ema.optimization_step)) if self.ema is not None else 0.0

    def state(self) -> dict:
        """What state.json keeps of the average besides its weights (those are pipeline/transformer)."""
        return {"optimization_step": self.optimization_step, "decay": self.decay()}

    def transformer(self):
        """A NextDiT holding the average (its tensors, not a copy)."""
        with torch.device("meta"):
            model = self.model_class(**{k: v for k, v in self.config.items() if not k.startswith("_")})
        model.load_state_dict(dict(zip(self.names, self.ema.shadow_params, strict=True)), strict=True, assign=True)
        return model.eval()

    def restore(self, pipeline_folder: str | Path, state: dict) -> None:
        """Continue the average of a checkpoint: its pipeline/transformer weights and step count."""
        if self.ema is None:
            return
        saved = self.model_class.from_pretrained(Path(pipeline_folder) / "transformer")
        weights = dict(saved.named_parameters())
        device = self.ema.shadow_params[0].device
        snapshot = self.ema.state_dict()
        snapshot.update(optimization_step=int(state["optimization_step"]),
                        shadow_params=[weights[name].detach().to(device) for name in self.names])
        self.ema.load_state_dict(snapshot)

    def export(self, target: str | Path, image_tokenizer, text_encoder) -> Path:
        """Write the average as a release-layout folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
        model_index.json) that OneDiffusionPipeline.from_pretrained loads: into a scratch folder renamed into
        place, so `target` is either absent or complete."""
        from model.pipeline import OneDiffusionPipeline

        target = Path(target)
        scratch = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            OneDiffusionPipeline(self.transformer(), image_tokenizer, text_encoder).save_pretrained(scratch)
            os.rename(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target


__all__ = ["EmaWeights"]
