"""The optimizer engine: DeepSpeed ZeRO around a torch AdamW (INTERFACES §6: no JIT-compiled optimizer), a warm-up
and decay schedule DeepSpeed steps and checkpoints with the optimizer, gradient clipping by DeepSpeed.

    init_distributed()                                    # no-op under Ray Train / torchrun; one process otherwise
    engine = make_engine(model, cfg.train, total_steps=stage.steps, per_rank_batch=4)
    engine.backward(loss); engine.step()

Works without Ray (the step tests and the GPU bench use it on one process).
"""

from __future__ import annotations

import math
import os
import socket

import torch
import torch.distributed as dist

from onegen.train_config import OptimizerSection, TrainSection


class WarmupSchedule:
    """LR multiplier at a step: linear warm-up from 0, then constant, cosine or linear decay to `min_lr_ratio`.
    A class, not a lambda, so LambdaLR's state (inside DeepSpeed's checkpoint) pickles."""

    def __init__(self, opt: OptimizerSection, total_steps: int):
        self.warmup = int(opt.warmup_steps)
        self.kind = opt.schedule
        self.floor = float(opt.min_lr_ratio)
        self.total = int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.floor + (1 - self.floor) * decay


def deepspeed_config(train: TrainSection, per_rank_batch: int) -> dict:
    """The DeepSpeed config of a stage: ZeRO stage, precision, clipping; no accumulation (the global batch is split
    evenly over the ranks), DeepSpeed's own logging off (onegen logs to MLflow)."""
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(train.optimizer.grad_clip),
        "zero_optimization": {"stage": int(train.zero_stage),
                              **({"stage3_param_persistence_threshold": int(train.zero3_persistence_threshold)}
                                 if train.zero_stage == 3 else {})},
        "zero_allow_untested_optimizer": True,  # a client torch AdamW: DeepSpeed only knows its own by name
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None) -> None:
    """The process group DeepSpeed needs. Under Ray Train or torchrun it exists (or the env describes it) and
    DeepSpeed wraps it; a lone process gets a one-rank group on 127.0.0.1."""
    import deepspeed

    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)


def make_engine(model: torch.nn.Module, train: TrainSection, *, total_steps: int, per_rank_batch: int):
    """DeepSpeed engine over `model` with a torch AdamW and the warm-up schedule."""
    import deepspeed

    opt = train.optimizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opt.lr,
                                  betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(opt, total_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                      config=deepspeed_config(train, per_rank_batch))
    return engine


__all__ = ["WarmupSchedule", "deepspeed_config", "init_distributed", "make_engine"]
