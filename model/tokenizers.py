"""Image and text tokenizers: the encoders that turn views and prompts into what NextDiT reads.

Image tokenizers map images (B, 3, H, W) in [-1, 1] to 16-channel latents (B, 16, H/f, W/f) and back:

* `VAETokenizer`: a diffusers `AutoencoderKL` with 16 latent channels (the release uses an SD3-class VAE, f = 8).
  Latents are `latent_dist.sample() * scaling_factor`, decoding divides by `scaling_factor`. The VAE config's
  `shift_factor` is deliberately NOT applied: the released pipeline never applies it, so the released denoiser was
  trained on unshifted latents (ONEDIFFUSION_SPEC.md §3). Applying it would feed the weights off-distribution latents.
* `PixelTokenizer`: an exact, invertible space-to-depth "tokenizer" for CPU-scale work, f = 2. RGB is padded with one
  zero channel to 4 channels, each 2x2 pixel block is folded into channels (4 x 2 x 2 = 16), and the result is
  multiplied by a power-of-two scale so `decode(encode(x)) == x` bit for bit.

Text encoder: `T5TextEncoder` wraps a transformers `T5EncoderModel` + tokenizer; prompts are padded to, and truncated
at, 300 tokens as in the released pipeline, and the mask is returned with the states. `build_tiny_t5` writes a tiny
random-weight T5 encoder and an offline-trained sentencepiece tokenizer in the release layout (`text_encoder/`,
`tokenizer/`) for tests, the demo and CI-scale training.
"""

from __future__ import annotations

import abc
import io
import json
import math
import string
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.hub import named_load_errors, resolve_pretrained_folder

LATENT_CHANNELS = 16
TEXT_MAX_LENGTH = 300  # the released pipeline truncates prompts at 300 tokens (spec §1.7)
PIXEL_TOKENIZER_CONFIG = "config.json"


# ----------------------------------------------------------------------------------------------------------------------
# Image tokenizers
# ----------------------------------------------------------------------------------------------------------------------


class ImageTokenizer(nn.Module, abc.ABC):
    """Maps images (B, 3, H, W) in [-1, 1] to latents (B, latent_channels, H/f, W/f) and back."""

    name: str
    latent_channels: int = LATENT_CHANNELS
    downsample_factor: int

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 16, H/f, W/f) float32."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, h, w) -> (B, 3, h*f, w*f) float32, nominally in [-1, 1] (not clamped)."""

    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, std) of the latent posterior, in the same scaled units as `encode`: what a data build stores so
        the trainer can sample mean + std * eps with its own generator. std is None for a point posterior."""
        return self.encode(images), None

    @abc.abstractmethod
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the tokenizer so that `load_image_tokenizer(save_directory)` restores it."""

    # latent channels that carry no image content (always 0 after encode, ignored by decode)
    pad_latent_channels: tuple[int, ...] = ()

    @property
    def loss_channel_mask(self) -> torch.Tensor:
        """(latent_channels,) bool: the channels a training loss should count (False for the pad channels, whose
        trivially predictable target would otherwise dilute the loss)."""
        mask = torch.ones(self.latent_channels, dtype=torch.bool)
        mask[list(self.pad_latent_channels)] = False
        return mask

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def check_image_size(self, height: int, width: int) -> None:
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(
                f"{self.name}: image size {height}x{width} is not a multiple of the downsample factor "
                f"{self.downsample_factor}; resize or crop the images first."
            )


class PixelTokenizer(ImageTokenizer):
    """Exact pixel space-to-depth: pad RGB with a zero channel, fold 2x2 blocks into channels, scale.

    Channel layout of the latent: channel 4*c + 2*i + j holds input channel c (R, G, B, pad) at offset (i, j) of
    each 2x2 block (`F.pixel_unshuffle` order). Channels 12..15 (the pad) are always 0 after `encode` and ignored by
    `decode`, so a denoiser output there has no effect on the image.

    `scale` multiplies each input channel. Natural images in [-1, 1] have a per-channel std of about 0.45-0.7
    (ImageNet 0.45; measured 0.26-0.75 on the scikit-learn sample photos), so the default 2.0 brings latents to about
    unit variance. Scales must be powers of two: multiplying/dividing a float32 by 2^k is exact (barring
    over/underflow), which is what makes `decode(encode(x)) == x` bit-exact.
    """

    name = "pixel"
    downsample_factor = 2
    latent_channels = LATENT_CHANNELS
    input_channels = 3
    padded_channels = 4
    # latent channels that hold the zero pad (always 0 after encode, ignored by decode); a trainer may drop them
    # from the loss, where their trivially predictable target (v = noise) would otherwise be a quarter of the MSE
    pad_latent_channels = (12, 13, 14, 15)

    def __init__(self, scale: float | tuple[float, float, float] = 2.0):
        super().__init__()
        scales = (float(scale),) * 3 if isinstance(scale, (int, float)) else tuple(float(s) for s in scale)
        if len(scales) != 3:
            raise ValueError(f"PixelTokenizer scale must be one number or one per RGB channel, got {scale!r}")
        for value in scales:
            mantissa, _ = math.frexp(value)
            if value <= 0 or mantissa != 0.5:
                raise ValueError(
                    f"PixelTokenizer scale {value} is not a positive power of two; only powers of two keep "
                    "decode(encode(x)) == x bit-exact (e.g. 1.0, 2.0, 4.0)."
                )
        self.scale = scales
        # (1, 4, 1, 1); the pad channel's scale is irrelevant (it is always zero), keep it at 1.
        self.register_buffer("_channel_scale", torch.tensor([*scales, 1.0]).view(1, 4, 1, 1), persistent=False)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        del generator  # deterministic
        if images.ndim != 4 or images.shape[1] != self.input_channels:
            raise ValueError(f"PixelTokenizer.encode expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        self.check_image_size(images.shape[-2], images.shape[-1])
        images = images.float()
        padded = F.pad(images, (0, 0, 0, 0, 0, 1))  # (B, 4, H, W), zero pad channel last
        padded = padded * self._channel_scale.to(images.device)
        return F.pixel_unshuffle(padded, self.downsample_factor)  # (B, 16, H/2, W/2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"PixelTokenizer.decode expects (B, 16, h, w) latents, got shape {tuple(latents.shape)}")
        padded = F.pixel_shuffle(latents.float(), self.downsample_factor)  # (B, 4, H, W)
        padded = padded / self._channel_scale.to(latents.device)
        return padded[:, : self.input_channels]

    def save_pretrained(self, save_directory: str | Path) -> None:
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "PixelTokenizer", "scale": list(self.scale), "latent_channels": self.latent_channels,
                  "downsample_factor": self.downsample_factor}
        (save_directory / PIXEL_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None) -> "PixelTokenizer":
        folder = Path(path) / subfolder if subfolder else Path(path)
        config_path = folder / PIXEL_TOKENIZER_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"PixelTokenizer config not found: {config_path} (expected a JSON file with "
                                    '{"_class_name": "PixelTokenizer", "scale": [...]})')
        config = json.loads(config_path.read_text())
        if config.get("_class_name") != "PixelTokenizer":
            raise ValueError(f"{config_path} describes {config.get('_class_name')!r}, not a PixelTokenizer")
        return cls(scale=tuple(config.get("scale", (2.0, 2.0, 2.0))))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, downsample_factor={self.downsample_factor}"


class VAETokenizer(ImageTokenizer):
    """diffusers `AutoencoderKL` (16 latent channels), scaled by `scaling_factor` only, as the release does.

    `shift_factor` in the VAE config is ignored on purpose (see the module docstring). `sample=True` (default, as the
    release) draws from the posterior with `generator`; `sample=False` returns the posterior mean, which is
    deterministic and what data pipelines precomputing latents usually want.
    """

    name = "vae"

    def __init__(self, vae, sample: bool = True):
        super().__init__()
        latent_channels = int(vae.config.latent_channels)
        if latent_channels != LATENT_CHANNELS:
            raise ValueError(
                f"VAE has latent_channels={latent_channels}, but NextDiT reads {LATENT_CHANNELS}-channel latents; "
                "use a 16-channel AutoencoderKL (e.g. the SD3/FLUX VAE or the release's vae/ folder)."
            )
        self.vae = vae
        self.sample = sample
        self.scaling_factor = float(vae.config.scaling_factor)
        self.downsample_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = latent_channels

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, subfolder: str | None = "vae",
                        torch_dtype: torch.dtype | None = None, sample: bool = True,
                        revision: str | None = None) -> "VAETokenizer":
        """Load an AutoencoderKL from a hub id or a local folder.

        For a local folder, `subfolder` is used when `path/subfolder` exists, otherwise the folder itself is read
        (so both a release root and a bare `vae/` folder work). `revision` pins a hub id's commit.
        """
        from diffusers import AutoencoderKL

        root = resolve_pretrained_folder(path_or_hub_id, allow_patterns=[f"{subfolder}/*"] if subfolder else None,
                                         revision=revision)
        subfolder = _resolve_local_subfolder(root, subfolder)
        kwargs = {"subfolder": subfolder} if subfolder else {}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        with named_load_errors(root / (subfolder or ""), "the VAE (AutoencoderKL)"):
            vae = AutoencoderKL.from_pretrained(str(root), **kwargs)
        vae.eval().requires_grad_(False)
        return cls(vae, sample=sample)

    def _posterior(self, images: torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"VAETokenizer.encode expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        self.check_image_size(images.shape[-2], images.shape[-1])
        return self.vae.encode(images.to(device=self.device, dtype=self.vae.dtype)).latent_dist

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool | None = None) -> torch.Tensor:
        posterior = self._posterior(images)
        use_sample = self.sample if sample is None else sample
        latents = posterior.sample(generator) if use_sample else posterior.mean
        return latents.float() * self.scaling_factor  # no shift_factor: the release never applies it

    @torch.no_grad()
    def encode_posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self._posterior(images)
        return posterior.mean.float() * self.scaling_factor, posterior.std.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"VAETokenizer.decode expects (B, 16, h, w) latents, got shape {tuple(latents.shape)}")
        latents = latents.float() / self.scaling_factor
        return self.vae.decode(latents.to(device=self.device, dtype=self.vae.dtype)).sample.float()

    def save_pretrained(self, save_directory: str | Path) -> None:
        self.vae.save_pretrained(str(save_directory))

    def extra_repr(self) -> str:
        return f"scaling_factor={self.scaling_factor}, downsample_factor={self.downsample_factor}, sample={self.sample}"


def load_image_tokenizer(spec: str | Path, subfolder: str | None = "vae",
                         torch_dtype: torch.dtype | None = None, revision: str | None = None) -> ImageTokenizer:
    """Resolve "pixel", a saved PixelTokenizer folder, or an AutoencoderKL (local folder or hub id).

    A local folder may be the tokenizer folder itself or a release root holding it in `subfolder`; `revision` pins a
    hub id's commit.
    """
    if str(spec) == "pixel":
        return PixelTokenizer()
    local = Path(spec)
    if local.exists():
        folder = local / subfolder if subfolder and (local / subfolder).is_dir() else local
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"No image tokenizer at {local}: expected {config_path} (an AutoencoderKL or PixelTokenizer "
                f"config), or pass 'pixel'."
            )
        class_name = json.loads(config_path.read_text()).get("_class_name")
        if class_name == "PixelTokenizer":
            return PixelTokenizer.from_pretrained(folder)
        if class_name not in (None, "AutoencoderKL"):
            raise ValueError(f"{config_path} describes {class_name!r}; onegen reads AutoencoderKL or PixelTokenizer.")
        return VAETokenizer.from_pretrained(folder, subfolder=None, torch_dtype=torch_dtype)
    return VAETokenizer.from_pretrained(str(spec), subfolder=subfolder, torch_dtype=torch_dtype, revision=revision)


def _resolve_local_subfolder(folder: Path, subfolder: str | None) -> str | None:
    """Keep `subfolder` only if it exists under `folder` (so a bare component folder works too)."""
    return subfolder if subfolder and (folder / subfolder).is_dir() else None


# ----------------------------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------------------------


class T5TextEncoder(nn.Module):
    """Frozen T5 encoder + tokenizer: prompts -> (states (B, 300, C) float32, mask (B, 300) long)."""

    def __init__(self, model, tokenizer, max_length: int = TEXT_MAX_LENGTH):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_size = int(model.config.d_model)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, text_encoder_subfolder: str | None = "text_encoder",
                        tokenizer_subfolder: str | None = "tokenizer", torch_dtype: torch.dtype | None = None,
                        max_length: int = TEXT_MAX_LENGTH) -> "T5TextEncoder":
        """Load from a release-layout root (text_encoder/ + tokenizer/), a hub id, or a folder holding both."""
        from transformers import AutoTokenizer, T5EncoderModel

        patterns = [f"{sub}/*" for sub in (text_encoder_subfolder, tokenizer_subfolder) if sub]
        root = resolve_pretrained_folder(path_or_hub_id, allow_patterns=patterns or None)
        encoder_sub = _resolve_local_subfolder(root, text_encoder_subfolder)
        tokenizer_sub = _resolve_local_subfolder(root, tokenizer_subfolder)
        model_kwargs = {"subfolder": encoder_sub} if encoder_sub else {}
        if torch_dtype is not None:
            model_kwargs["dtype"] = torch_dtype
        with named_load_errors(root / (encoder_sub or ""), "the T5 text encoder"):
            model = T5EncoderModel.from_pretrained(str(root), **model_kwargs)
        model.eval().requires_grad_(False)
        tokenizer_kwargs = {"subfolder": tokenizer_sub} if tokenizer_sub else {}
        with named_load_errors(root / (tokenizer_sub or ""), "the T5 tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(root), **tokenizer_kwargs)
        return cls(model, tokenizer, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask (B, max_length): padded to max_length, truncated there (EOS may be cut, as released)."""
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        return batch.input_ids, batch.attention_mask.long()

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids, mask = self.tokenize(prompts)
        states = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))[0]
        return states.float(), mask.to(self.device)

    def save_pretrained(self, save_directory: str | Path, text_encoder_subfolder: str = "text_encoder",
                        tokenizer_subfolder: str = "tokenizer") -> None:
        save_directory = Path(save_directory)
        self.model.save_pretrained(str(save_directory / text_encoder_subfolder))
        self.tokenizer.save_pretrained(str(save_directory / tokenizer_subfolder))


# A small built-in corpus for the tiny sentencepiece model: every task token of the release (spec §5.1), common
# caption words, and every printable ASCII character (so no ASCII prompt maps to <unk>).
_TINY_CORPUS = [
    "[[text2image]] a photo of a cat sitting on a red sofa in a bright living room",
    "[[text2image]] a painting of a mountain lake at sunset with trees and clouds",
    "[[depth2image]] a depth map of a kitchen with a table and two chairs",
    "[[canny2image]] [[hed2img]] [[pose2image]] [[semanticmap2image]] [[boundingbox2image]]",
    "[[deblurring]] [[image_inpainting]] [[image_editing]] make the sky blue",
    "[[faceid]] [[img0]] a woman with long hair smiling [[img1]] a portrait of a woman [[img2]] [[img3]]",
    "[[subject_driven]] <item: cartoon dog> [[img0]] a dog on the beach [[img1]] a cartoon dog",
    "[[multiview]] a wooden chair on a white background, seen from the front and the side",
    "<#00FFFF cyan mask: dragon> <#FF0000 red boundingbox: head> the man and the woman walk in the street",
    "monochrome, greyscale, low-res, bad anatomy, blurry, worst quality, low quality, jpeg artifacts",
    "a dog, a bird, a car, a house, a tree, a person, a flower, the sea, the sky, a city at night",
    string.ascii_letters + " " + string.digits + " " + string.punctuation,
]


def train_tiny_sentencepiece(vocab_size: int = 256, seed_corpus: list[str] | None = None) -> bytes:
    """Train a tiny unigram sentencepiece model offline; T5 id layout (pad 0, eos 1, unk 2, no bos). Deterministic."""
    import sentencepiece as spm

    corpus = (seed_corpus or _TINY_CORPUS) * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def build_tiny_t5(out_dir: str | Path, d_model: int = 32, num_layers: int = 2, num_heads: int = 2, d_kv: int = 16,
                  d_ff: int = 64, vocab_size: int = 256, seed: int = 0) -> Path:
    """Write a tiny random T5 encoder to out_dir/text_encoder and a tokenizer to out_dir/tokenizer (release layout).

    The tokenizer is a unigram sentencepiece model trained offline on a built-in corpus, saved as `spiece.model`
    (what a stock T5 tokenizer folder holds) plus `tokenizer.json`/`tokenizer_config.json`; it loads with
    `AutoTokenizer.from_pretrained(out_dir / "tokenizer")`. Same arguments -> same files (weights seeded).
    Returns out_dir.
    """
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "spiece.model").write_bytes(train_tiny_sentencepiece(vocab_size))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512,
         "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # converts spiece.model
    tokenizer.save_pretrained(str(tokenizer_dir))  # adds tokenizer.json, keeps spiece.model

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_heads=num_heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(str(out_dir / "text_encoder"))
    return out_dir


__all__ = [
    "LATENT_CHANNELS",
    "TEXT_MAX_LENGTH",
    "ImageTokenizer",
    "PixelTokenizer",
    "VAETokenizer",
    "load_image_tokenizer",
    "T5TextEncoder",
    "build_tiny_t5",
    "train_tiny_sentencepiece",
]
