"""What a training worker loads before its first step besides the NextDiT (training/weights.py): the frozen T5, the
objective's settings, the loss channel mask of the builds' image tokenizer, and that tokenizer for the export."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from model.flow import FlowConfig
from onegen.train_config import TINY_T5, FlowSection, TrainConfig


def tiny_t5_folder(cfg: TrainConfig, d_model: int, *, build: bool = True) -> Path:
    """The seeded tiny T5 (model.tokenizers.build_tiny_t5) under run.work_dir/models, built once by a process that is
    not one rank of several (transformers' save_pretrained writes weights only on rank 0 of an initialised process
    group; the driver builds it before workers start): into a temporary folder renamed into place, so a reader never
    sees a half-written one. build=False: FileNotFoundError naming the fix when it is missing."""
    from model.tokenizers import build_tiny_t5

    target = Path(cfg.run.work_dir) / "models" / f"{TINY_T5}-d{d_model}-seed{cfg.run.seed}"
    if (target / "text_encoder" / "config.json").is_file():
        return target
    if not build:
        raise FileNotFoundError(f"model.text_encoder={TINY_T5}: {target} is missing on this node (the driver builds "
                                "it under run.work_dir); on a multi-node cluster give a text encoder every node can "
                                "load (a hub id or a shared folder)")
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-t5-", dir=target.parent))
    try:
        build_tiny_t5(scratch, d_model=d_model, seed=cfg.run.seed)
        if not (scratch / "text_encoder" / "config.json").is_file():
            raise RuntimeError(f"building the tiny T5 in {scratch} wrote no weights (built by a rank other than 0?)")
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "text_encoder" / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_text_encoder(cfg: TrainConfig, caption_channels: int, device: torch.device, sources: dict | None = None):
    """The frozen T5 (model.text_encoder, or model.init's); its width must be the model's caption_channels (the
    driver checked it from the config: training.weights). The tiny T5 is built here only by a lone process (one
    rank): several ranks expect the driver to have built it."""
    import torch.distributed as dist

    from model.tokenizers import T5TextEncoder
    from training.weights import text_encoder_folder

    source = cfg.model.text_encoder_source
    if source == TINY_T5:
        lone = not dist.is_initialized() or dist.get_world_size() == 1
        folder = tiny_t5_folder(cfg, caption_channels, build=lone)
    else:
        folder = text_encoder_folder(cfg, sources or {})
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" and device.type == "cuda" else None
    encoder = T5TextEncoder.from_pretrained(folder, torch_dtype=dtype, max_length=cfg.model.text_max_length)
    if encoder.hidden_size != caption_channels:
        raise ValueError(f"model.text_encoder={source}: T5 width {encoder.hidden_size} but model.preset="
                         f"{cfg.model.preset} reads captions of width {caption_channels}; pick a matching pair")
    return encoder.to(device)


def export_image_tokenizer(identity: str):
    """The image tokenizer a build recorded (`pixel`, a folder, or a hub id as `owner/name@commit`), loaded for the
    checkpoints' pipeline/ (the VAE is part of the release layout)."""
    from model.tokenizers import load_image_tokenizer

    spec, revision = identity, None
    if identity != "pixel" and not Path(identity).exists() and "@" in identity:
        spec, revision = identity.rsplit("@", 1)
    return load_image_tokenizer(spec, revision=revision)


def flow_config(flow: FlowSection) -> FlowConfig:
    """model.flow's settings from the config's train.flow."""
    return FlowConfig(shift=flow.shift, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
                      clean_condition_prob=flow.clean_condition_prob, text_dropout_prob=flow.text_dropout_prob,
                      loss_on=flow.loss_on)


def loss_channel_mask(image_tokenizer: str) -> torch.Tensor | None:
    """Channels in the loss for latents of the build's tokenizer: the pixel tokenizer's zero pad channels are left
    out (their target is trivially the noise); a VAE's are all in (None)."""
    if image_tokenizer != "pixel":  # the id the build records (model.tokenizers: "pixel", or a VAE id)
        return None
    from model.tokenizers import PixelTokenizer

    return PixelTokenizer().loss_channel_mask


__all__ = ["export_image_tokenizer", "flow_config", "load_text_encoder", "loss_channel_mask", "tiny_t5_folder"]
