"""A tiny, seeded "release folder" shared by make_release_reference.py (which runs the official pipeline on it) and
tests/test_release_reference.py (which runs onegen's pipeline on it): the same function builds it on both sides.

Layout: onegen's `OneDiffusionPipeline(...).save_pretrained`, i.e. the release's (model_index.json naming the
release's transformer module, transformer/, vae/, text_encoder/, tokenizer/, scheduler/ with the release's
dynamic-shift scheduler config). Components, all float32 and seeded:

* transformer: `nextdit-tiny` (hidden 96, 2 blocks, 4 heads / 2 KV heads, head_dim 24, QK-norm, caption width 32),
  rotary_max_length 16 (the official module precomputes a rotary_max_length³ table). NextDiT zero-initialises its
  adaLN, text gates and output layer, which would make the velocity identically 0, so every parameter is perturbed
  with seeded Gaussian noise, the per-head text gates are drawn at scale 1 (so the prompt, hence CFG, matters) and
  the QK-norm weights are scaled up so attention logits reach the softcap's range (30·tanh(s/30) differs visibly
  from s), which makes the comparison sensitive to the softcap.
* vae: diffusers AutoencoderKL, 4 blocks (f = 8), widths 8/8/16/16, 16 latent channels, SD3's scaling/shift
  factors (the shift factor is applied by neither pipeline).
* text encoder: `model.tokenizers.build_tiny_t5` (d_model 32) with every weight rounded to float16 and stored as
  float32, so the official loader's float16 load followed by a cast back to float32 gives the very same weights.

`weights_fingerprint` hashes the tensors (names, dtypes, shapes, bytes) of the three weight folders, so a change
of seeded initialisation (torch, diffusers, transformers) shows up as a fingerprint mismatch rather than as a
mysterious latent mismatch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

# Settings of both reference calls (recorded in the npz too).
HEIGHT = WIDTH = 48  # pixels: 6x6 latents at f = 8, 3x3 tokens per view
NUM_STEPS = 8
GUIDANCE_SCALE = 4.0
NEGATIVE_PROMPT = ""
T2I_PROMPT = "[[text2image]] a red cube"
DEPTH_PROMPT = "[[depth2image]] a red cube on a table"
DEPTH_DENOISE_MASK = (0, 1)  # frame 0 = the RGB condition, frame 1 = the depth map to estimate (inference.py)
CONDITION_IMAGE_SIZE = (56, 64)  # (height, width) of the condition photo: centre-cropped and resized to 48x48
LATENT_CHANNELS = 16
VAE_FACTOR = 8

TRANSFORMER_SEED = 1234
VAE_SEED = 5678
T5_SEED = 0
NOISE_SEED = 42
IMAGE_SEED = 7

WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder")


def latent_size() -> tuple[int, int]:
    return HEIGHT // VAE_FACTOR, WIDTH // VAE_FACTOR


def tiny_transformer():
    from model.nextdit import NextDiT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRANSFORMER_SEED)
        model = NextDiT.from_preset("nextdit-tiny", caption_channels=32, rotary_max_length=16)
    generator = torch.Generator().manual_seed(TRANSFORMER_SEED + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            if name.endswith("attention.gate"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
            elif name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
                parameter.mul_(3.0)
    if model.attn_softcap != 30.0:
        raise AssertionError(f"onegen's NextDiT softcap is {model.attn_softcap}, the release's kernel uses 30")
    return model.eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VAE_SEED)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=HEIGHT,
            scaling_factor=1.5305, shift_factor=0.0609,
        )
    return vae.eval().requires_grad_(False)


def tiny_text_encoder(staging: Path):
    """build_tiny_t5 in `staging`, weights rounded to float16 values (kept float32)."""
    from transformers import AutoTokenizer, T5EncoderModel

    from model.tokenizers import T5TextEncoder, build_tiny_t5

    build_tiny_t5(staging, seed=T5_SEED)
    model = T5EncoderModel.from_pretrained(str(staging / "text_encoder"), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(str(staging / "tokenizer"))
    return T5TextEncoder(model, tokenizer)


def build_tiny_release(folder: str | Path) -> Path:
    """Write the tiny release folder to `folder` (created); same code and library versions -> same weights."""
    from model.pipeline import OneDiffusionPipeline
    from model.tokenizers import VAETokenizer

    folder = Path(folder)
    staging = folder.parent / (folder.name + ".t5-staging")
    text_encoder = tiny_text_encoder(staging)
    pipe = OneDiffusionPipeline(tiny_transformer(), VAETokenizer(tiny_vae(), sample=False), text_encoder)
    pipe.save_pretrained(folder)
    for path in sorted(staging.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    staging.rmdir()
    return folder


def condition_image():
    """The depth-estimation input: a seeded random RGB photo, CONDITION_IMAGE_SIZE, with dark and bright pixels
    (the release's preprocessing normalises a second time when no pixel is below 128/255, see the test)."""
    from PIL import Image

    height, width = CONDITION_IMAGE_SIZE
    pixels = np.random.RandomState(IMAGE_SEED).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def initial_noise() -> dict[str, torch.Tensor]:
    """Fixed initial noise for both calls, (B, T, 16, h, w) float32 (T = 1 for text-to-image). Condition views get
    zeros: both pipelines overwrite them with the clean condition before the first step."""
    h, w = latent_size()
    generator = torch.Generator().manual_seed(NOISE_SEED)
    t2i = torch.randn(1, 1, LATENT_CHANNELS, h, w, generator=generator)
    depth = torch.zeros(1, len(DEPTH_DENOISE_MASK), LATENT_CHANNELS, h, w)
    for view, target in enumerate(DEPTH_DENOISE_MASK):
        if target:
            depth[:, view] = torch.randn(1, LATENT_CHANNELS, h, w, generator=generator)
    return {"t2i": t2i, "depth": depth}


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 over every tensor (component, name, dtype, shape, bytes) of the weight folders."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for component in WEIGHT_FOLDERS:
        files = sorted((Path(folder) / component).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {Path(folder) / component}")
        for file in files:
            tensors = load_file(file)
            for name in sorted(tensors):
                tensor = tensors[name].contiguous()
                digest.update(json.dumps([component, name, str(tensor.dtype), list(tensor.shape)]).encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (to check that two builds are byte-identical)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
