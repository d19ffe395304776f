"""Training runs for the tests: the step loop in a fresh process (DeepSpeed's process group and its globals stay out
of the pytest process), and `onegen train` as a user runs it, joined to the session's Ray head."""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/train/tiny.yaml"
FINETUNE_LORA = REPO / "configs/train/finetune_lora.yaml"
TRAIN_TIMEOUT_S = 420


def train_overrides(build: dict, work: Path, *extra: str) -> list[str]:
    """--set items that point configs/train/tiny.yaml at the shared synthetic build (by its full URI) and keep
    everything the run writes (runs/, MLflow, the tiny T5) in a private work dir: the shared build's root stays
    untouched."""
    return [f"storage.root={work / 'data'}", f"run.work_dir={work}", f"train.data.builds[0].uri={build['uri']}",
            *extra]


def in_fresh_process(fn, *args, timeout: float = TRAIN_TIMEOUT_S):
    """fn(*args) in a spawned process (fn importable by name); its return value or its exception."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result(timeout=timeout)


def single_process_stage(overrides: list[str], restore: str | None = None, save_to: str | None = None,
                         config: Path = TINY) -> dict:
    """The config's (configs/train/tiny.yaml) first stage on one process (no Ray): {"losses": [(step, task label,
    loss)], "checkpoints": [step, ...]}; with save_to, each checkpoint folder is copied to save_to/checkpoint_STEP."""
    import shutil

    import torch

    from onegen.config import load_config
    from onegen.train_config import TrainConfig
    from training.engine import init_distributed
    from training.loop import run_stage

    cfg = load_config(config, ["train.num_workers=1", *overrides], TrainConfig)
    init_distributed()
    losses, checkpoints = [], []

    def save(folder: str, metrics: dict, step: int) -> None:
        checkpoints.append(step)
        if save_to:
            shutil.copytree(folder, Path(save_to) / f"checkpoint_{step:06d}")

    def log(metrics: dict, step: int) -> None:
        label = next(k for k in metrics if k.startswith("train/loss/"))[len("train/loss/"):]
        losses.append((step, label, metrics["train/loss"]))

    run_stage(cfg, 0, rank=0, world_size=1, device=torch.device("cpu"), restore=restore, save=save, log=log)
    return {"losses": losses, "checkpoints": checkpoints}


def single_process_stage_counting_recomputes(overrides: list[str]) -> dict:
    """single_process_stage, plus how many times torch.utils.checkpoint.checkpoint ran (activation checkpointing
    wraps each block's forward in it)."""
    import torch.utils.checkpoint as checkpointing

    calls, original = [0], checkpointing.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    checkpointing.checkpoint = counted
    try:
        return dict(single_process_stage(overrides), recomputed_blocks=calls[0])
    finally:
        checkpointing.checkpoint = original


def make_release_folder(folder: Path, *, seed: int = 99, vae: bool = False, **preset_overrides) -> Path:
    """A release-layout folder: a perturbed `nextdit-tiny` transformer, the pixel tokenizer (vae: a tiny
    AutoencoderKL), a tiny T5 (d_model = the transformer's caption width), the release's scheduler."""
    from model.nextdit import NextDiT
    from model.pipeline import OneDiffusionPipeline
    from model.tokenizers import PixelTokenizer, T5TextEncoder, VAETokenizer, build_tiny_t5
    from release_reference.tiny_release import tiny_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = NextDiT.from_preset("nextdit-tiny", **preset_overrides)
        with torch.no_grad():
            for parameter in transformer.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    t5 = build_tiny_t5(folder.parent / f"{folder.name}-t5", d_model=transformer.config.caption_channels, seed=seed)
    tokenizer = VAETokenizer(tiny_vae(), sample=False) if vae else PixelTokenizer()
    OneDiffusionPipeline(transformer, tokenizer, T5TextEncoder.from_pretrained(t5)).save_pretrained(folder)
    return folder


def train_command(*overrides: str, config: Path = TINY, stages: list[Path] | None = None) -> list[str]:
    """`python -m training.launch --config CONFIG`, or with `stages` `--stages FILE ...`, and --set items."""
    cmd = [sys.executable, "-m", "training.launch", *(["--stages", *map(str, stages)] if stages else
                                                      ["--config", str(config)])]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def run_train(ray_head, *overrides: str, timeout: float = TRAIN_TIMEOUT_S, extra_args: list[str] | None = None,
              stages: list[Path] | None = None, config: Path = TINY) -> subprocess.CompletedProcess:
    env = dict(ray_head["env"], RAY_ADDRESS=ray_head["gcs"])
    return subprocess.run(train_command(*overrides, config=config, stages=stages) + list(extra_args or ()), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def raw_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trained (not averaged) weights of a checkpoint, consolidated from its DeepSpeed shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="ds")
    return {name: value.detach().float() for name, value in weights.items()}


def ema_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return safetensors_weights(checkpoint / "pipeline" / "transformer")


def check_ema_follows_the_decay(checkpoints: list[Path], moved_at_least: float = 1e-5) -> None:
    """EMA_1 = raw_1 (the warm-up's decay is 0 at the first step), then EMA_k = d_k EMA_(k-1) + (1 - d_k) raw_k with
    d_k = diffusers' EMAModel.get_decay(k) for train.ema's defaults; and the average differs from the raw weights."""
    from diffusers.training_utils import EMAModel

    from onegen.train_config import EmaSection

    ema = EmaSection()
    decay_of = EMAModel([torch.zeros(1)], decay=ema.decay, use_ema_warmup=ema.use_warmup, power=ema.power).get_decay
    previous = None
    for checkpoint in checkpoints:
        state = json.loads((checkpoint / "state.json").read_text())
        step = state["ema"]["optimization_step"]
        assert step == state["step"]
        raw, ema = raw_weights(checkpoint), ema_weights(checkpoint)
        assert set(raw) == set(ema) and len(raw) > 10
        decay = decay_of(step)
        assert state["ema"]["decay"] == pytest.approx(decay)
        for name, value in ema.items():
            expected = raw[name] if previous is None else decay * previous[name] + (1 - decay) * raw[name]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"{checkpoint.name} {name}")
        previous = ema
    assert decay > 0.2
    moved = max(float((ema[n] - raw[n]).abs().max()) for n in raw)
    assert moved > moved_at_least, "after a few steps the average should lag the raw weights"
