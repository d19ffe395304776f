"""The EMA of the transformer's weights (diffusers' EMAModel, with its warm-up) and its export as a release-layout
folder, the `pipeline/` of every checkpoint (INTERFACES §3):

    ema = EmaWeights(model, cfg.train.ema, keep=rank == 0, masters=zero3 or bf16)   # before DeepSpeed
    ...; engine.step(); ema.step(engine.module)          # every rank (collectives under ZeRO-3 / bf16)
    ema.export(folder / "pipeline", image_tokenizer, text_encoder)                          # rank 0

The average is of the optimizer's float32 master weights. Under ZeRO-3 each rank holds a shard of every parameter,
and under bf16 the module holds rounded copies, so the step assembles each full float32 master, one parameter at a
time (deepspeed.utils.safe_get_full_fp32_param, a collective every rank enters in the same order: one parameter's
memory at a time, not the whole model), and only rank 0, which keeps the average and writes the export, updates it:
never an average of empty shards or of bf16 roundings. Under fp32 ZeRO-1/2 every rank's module already holds the full
masters. The average is float32 on the training device; `pipeline/transformer` holds it exactly, so a resume reads it
back from there (no second copy).

The update is EMAModel.step's (s -= (1 - decay)(s - p)), as one lerp per parameter (s.lerp_(p, 1 - decay): the same
value, without temporaries; with the module's own weights one fused lerp over all of them), with EMAModel's decay and
step count: EMAModel.step takes all parameters at once, which would need every master assembled at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onegen.train_config import EmaSection


class EmaWeights:
    def __init__(self, model: torch.nn.Module, cfg: EmaSection, *, keep: bool, masters: bool):
        from diffusers.training_utils import EMAModel

        self.masters = masters
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
        """Move the average towards the current float32 master weights (call on every rank after each optimizer
        step: assembling a partitioned master is a collective)."""
        import deepspeed  # imported once per step, not per parameter

        if self.ema is None:
            if self.masters:  # the other ranks' part of assembling each partitioned master
                for param in module.parameters():
                    self.full_master(param, deepspeed)
            return
        self.ema.optimization_step += 1
        keep = 1 - self.ema.get_decay(self.ema.optimization_step)
        shadows = self.ema.shadow_params
        if not self.masters:  # the module's own float32 weights: one fused pass over all of them, no temporaries
            torch._foreach_lerp_(shadows, [p.detach().to(s) for p, s in zip(module.parameters(), shadows,
                                                                               strict=True)], keep)
            return
        for param, shadow in zip(module.parameters(), shadows, strict=True):  # one full master at a time
            shadow.lerp_(self.full_master(param, deepspeed).to(shadow), keep)

    @staticmethod
    def full_master(param: torch.nn.Parameter, deepspeed) -> torch.Tensor:
        """The parameter's full float32 master weight (a collective under ZeRO-3 and bf16: every rank calls it)."""
        full = deepspeed.utils.safe_get_full_fp32_param(param)
        if full is not None:
            return full
        if hasattr(param, "ds_id"):  # a frozen ZeRO-3 parameter has no master: gather the module's copy
            with deepspeed.zero.GatheredParameters([param]):
                return param.detach().clone()
        return param.detach()

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
        saved = dict(self.model_class.from_pretrained(Path(pipeline_folder) / "transformer").named_parameters())
        with torch.no_grad():  # in place: no second copy of the average on the device
            for name, shadow in zip(self.names, self.ema.shadow_params, strict=True):
                shadow.copy_(saved[name])
        self.ema.optimization_step = int(state["optimization_step"])

    def export(self, target: str | Path, image_tokenizer, text_encoder) -> Path:
        """Write the average as a release-layout folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
        model_index.json) that OneDiffusionPipeline.from_pretrained loads: into a scratch folder renamed into
        place, so `target` (which must not exist yet) is either absent or complete."""
        from model.pipeline import OneDiffusionPipeline
        from onegen.storage import folder_into_place

        with folder_into_place(target) as scratch:
            OneDiffusionPipeline(self.transformer(), image_tokenizer, text_encoder).save_pretrained(scratch)
        return Path(target)


__all__ = ["EmaWeights"]
