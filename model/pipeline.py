"""One inference pipeline for every OneDiffusion task: prompts + input views in, images / depth / cameras out.

`OneDiffusionPipeline` only orchestrates; the pieces live elsewhere in model/:

    text      T5TextEncoder (model.tokenizers)       prompt with the task token -> (B, 300, C) states + mask
    images    model.images                           paths / URLs / PIL / arrays -> (3, H, W) in [-1, 1], crop-resize
    latents   ImageTokenizer (model.tokenizers)      condition images -> 16-channel latents (VAE or exact pixel)
    views     model.views (+ model.tasks)            frame order, targets, prompt syntax, ray frames: the same
                                                     layer the trainer builds its batches with
    schedule  model.schedule                         diffusers' FlowMatchEulerDiscreteScheduler, set as the release
    sampler   model.sampler.sample                   Euler, clean condition views, text CFG
    denoiser  model.nextdit.NextDiT

On disk it reads and writes the release layout (ONEDIFFUSION_SPEC.md §9):

    model_index.json   {"_class_name": "OneDiffusionPipeline", "transformer": [module, "NextDiT"], "vae": [...], ...}
    transformer/       config.json + safetensors (NextDiT; whatever module model_index names, onegen's NextDiT loads it)
    vae/               diffusers AutoencoderKL, or onegen's PixelTokenizer ("vae": ["onegen", "PixelTokenizer"])
    text_encoder/      transformers T5EncoderModel
    tokenizer/         T5 tokenizer
    scheduler/         scheduler_config.json (diffusers FlowMatchEulerDiscreteScheduler) -> the sampler's schedule

Reproducibility: the initial noise is `latents` when given, else drawn on the CPU from `generator`, else from
`torch.Generator().manual_seed(seed)`; a run without either draws a fresh seed and reports it (`result.seed`).
The noise has the shape of the whole view sequence (B, T, 16, h, w), condition views included (they are overwritten
by their clean values), so `latents=result.noise` with the same seed repeats a run bit for bit. With a seed, VAE
posterior sampling of condition images uses its own generator (seeded seed + 1), so it does not depend on whether the
noise was drawn or given; with an explicit `generator`, it continues that generator after the noise.

Behaviour of the release's pipeline (onediffusion/diffusion/pipelines/onediffusion.py) that this one reproduces:
text-to-image is `__call__`, every other task `img2img` with a `denoise_mask`; the schedule, condition time
`timesteps[-1]`, CFG batch order [negative, prompt] and default negative prompt "" are model.sampler's; condition
images are centre-cropped to the target aspect and resized bilinearly (model.images.center_crop_resize), mapped to
[-1, 1] and VAE encoded (sample × scaling_factor); image-conditioned sizes default to the ASPECT_RATIO_512 bucket of the first image;
`noise_scale` scales the dynamic-shift token count; multiview ray frames are built from the given poses relative to
the first of them (model.cameras); the outputs are the decoded target frames (`/ scaling_factor`, `x / 2 + 0.5`,
clamped), an image→X estimate (e.g. depth) being the decoded condition map.

Intentional deviations (interface or robustness, not the model's inputs for valid calls):
* Inputs with alpha are composited on white; the release's `convert("RGB")` drops alpha. White is what the release's
  multiview training loader composites on, and opaque images are unaffected. 16-bit images are scaled by their range
  (`convert("RGB")` clips them to white), EXIF orientation is applied, and non-finite arrays are refused
  (model.images).
* The Euler update (diffusers' `scheduler.step`) runs on float32 latents whatever the transformer dtype; the release
  keeps bf16 latents between steps.
* Ray frames are never decoded by the VAE (the release decodes every denoised frame, rays included) and
  `result.latents` keeps them ×1.658 as sampled (the release returns all latents / 1.658); poses are read back
  from generated rays instead (`result.cameras`).
* Multiview defaults to a square size (the release asserts height == width); a lone `height` or `width` is kept
  (the release's `img2img` then replaces both by the bucket); task tokens are added to prompts that lack one;
  `guidance_scale` defaults to 4 (the README's value; the release signature says 5).
* The initial noise is drawn on the CPU (float32), so runs match across devices but not the release's CUDA draws.
* Condition images are normalised to [-1, 1] once. The release's image processor normalises a second time when
  the stacked images have no value below 0 after its first normalisation (every pixel >= 128), stretching bright
  images; that is a bug, not the trained input distribution.
* tests/test_release_reference.py: with the same noise and condition latent, this pipeline
  lands ~1e-6 relative from the official code's final latents (text→image and image→depth).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model import cameras as camera_utils
from model.hub import read_json_file, resolve_pretrained_folder
from model.images import ImageInput, as_image_list, bucket_size, center_crop_resize, image_to_tensor
from model.limits import MAX_IMAGE_SIDE
from model.nextdit import NextDiT
from model.sampler import sample
from model.schedule import (
    RELEASE_SCHEDULER_CONFIG,
    SCHEDULER_CONFIG_NAME,
    load_scheduler,
    release_num_tokens,
    release_schedule,
)
from model.tasks import Task, get_task
from model.tokenizers import (
    ImageTokenizer,
    PixelTokenizer,
    T5TextEncoder,
    VAETokenizer,
    load_image_tokenizer,
)
from model.views import DEPTH_ROLE, RAY_ROLE, ViewLayout, build_sample, full_prompt, stack, view_layout

MODEL_INDEX_NAME = "model_index.json"
PIPELINE_CLASS_NAME = "OneDiffusionPipeline"
# The release's model_index names its own module for the transformer; onegen's NextDiT replaces it, whatever it names.
RELEASE_TRANSFORMER_ENTRY = ["onediffusion.models.denoiser.nextdit.modeling_nextdit", "NextDiT"]
COMPONENT_ENTRIES = {
    "vae": ["diffusers", "AutoencoderKL"],
    "pixel_vae": ["onegen", "PixelTokenizer"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}
REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# Reading a generated depth map as the release demo does (PIL "L"): ITU-R 601-2 luma weights.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)



@dataclass
class EstimatedCameras:
    """Cameras recovered from the denoised ray frames of one sample (model.cameras.cameras_from_rays).

    Poses are OpenCV camera-to-world matrices in the OpenCV frame of the reference camera (camera 0, or the first
    camera whose rays were given; it is the identity there): the rays live in its PyTorch3D view frame, as the
    release builds them (model.cameras), and are converted back. `camera_indices` are the cameras (not frames)
    whose rays were generated."""

    camera_indices: list[int]
    c2w: np.ndarray  # (V, 4, 4) float64
    rotation: np.ndarray  # (V, 3, 3) camera-to-world rotation
    centre: np.ndarray  # (V, 3) camera centre in world coordinates
    focal: np.ndarray  # (V,) unit-image focal (the given one unless estimated)


@dataclass
class OneDiffusionOutput:
    """What a pipeline call returns.

    images: decoded target views that are pictures (everything but ray frames), sample-major then frame order:
        PIL images (output_type "pil") or (H, W, 3) float32 arrays in [0, 1] ("np"); empty for "latent".
    image_views: the frame index of each entry of `images` within its sample.
    depth: for depth estimation, one (H, W) float32 array in [0, 1] per sample (luma of the generated map, ITU-R 601
        weights as PIL "L", like the release demo).
    cameras: for generated ray frames (pose estimation), one EstimatedCameras per sample.
    latents: the final view sequence (B, T, 16, h, w) float32 (condition views included, rays ×1.658 as sampled).
    noise: the initial noise (B, T, 16, h, w) used; pass it back as `latents=` to repeat the run.
    seed: the seed of the run (None when a `generator` was given).
    sigmas: the Euler schedule used, (num_inference_steps + 1,) ending in 0.
    prompts / target_mask: the prompts as sent to the text encoder and the target views (True = generated)."""

    images: list
    image_views: list[int]
    depth: list[np.ndarray] | None
    cameras: list[EstimatedCameras] | None
    latents: torch.Tensor
    noise: torch.Tensor
    seed: int | None
    sigmas: torch.Tensor
    prompts: list[str]
    target_mask: tuple[bool, ...]
    task: str = ""


class OneDiffusionPipeline:
    """transformer (NextDiT) + image tokenizer + T5 text encoder + flow sampler settings, run for any task."""

    def __init__(self, transformer: NextDiT, image_tokenizer: ImageTokenizer, text_encoder: T5TextEncoder,
                 scheduler=None):
        caption_channels = int(transformer.config.caption_channels)
        if text_encoder.hidden_size != caption_channels:
            raise ValueError(
                f"text encoder width {text_encoder.hidden_size} != transformer caption_channels {caption_channels}; "
                "pair the transformer with the text encoder it was trained with."
            )
        if int(transformer.config.in_channels) != image_tokenizer.latent_channels:
            raise ValueError(f"transformer in_channels {transformer.config.in_channels} != image tokenizer "
                             f"latent_channels {image_tokenizer.latent_channels}.")
        self.transformer = transformer.eval()
        self.image_tokenizer = image_tokenizer.eval()
        self.text_encoder = text_encoder.eval()
        # diffusers' FlowMatchEulerDiscreteScheduler (or a config / folder for one); None = the release's config
        self.scheduler = scheduler if hasattr(scheduler, "set_timesteps") else load_scheduler(scheduler)

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, torch_dtype: torch.dtype | None = None, *,
                        transformer: NextDiT | str | Path | None = None,
                        image_tokenizer: ImageTokenizer | str | Path | None = None,
                        text_encoder: T5TextEncoder | str | Path | None = None,
                        scheduler=None, device: str | torch.device = "cpu",
                        **hub_kwargs) -> "OneDiffusionPipeline":
        """Load a folder (or hub repo) in the release layout, or a bare NextDiT checkpoint folder.

        Components given as objects or paths/specs replace what the folder holds; a bare transformer folder
        (config.json + safetensors, e.g. a training checkpoint) needs `image_tokenizer` and `text_encoder`.
        `torch_dtype` applies to the transformer and the text encoder; the VAE stays float32 (its decode is
        sensitive to bf16 and it is small). hub_kwargs (revision, cache_dir, token, local_files_only) go to
        huggingface_hub.snapshot_download for hub ids."""
        root = resolve_pretrained_folder(path_or_hub_id, **hub_kwargs)
        index_path = root / MODEL_INDEX_NAME
        if not index_path.is_file():
            if (root / "config.json").is_file() and transformer is None:
                return cls._from_transformer_folder(root, torch_dtype, image_tokenizer, text_encoder, scheduler,
                                                    device)
            raise FileNotFoundError(
                f"{index_path} not found: expected a OneDiffusion folder with {MODEL_INDEX_NAME} and the subfolders "
                f"{', '.join(c + '/' for c in REQUIRED_COMPONENTS)} (the release layout), or a NextDiT folder "
                "(config.json + safetensors) together with image_tokenizer= and text_encoder=."
            )
        index = read_json_file(index_path, "the pipeline index")
        needed = [c for c in REQUIRED_COMPONENTS
                  if not ((c == "transformer" and transformer is not None)
                          or (c == "vae" and image_tokenizer is not None)
                          or (c in ("text_encoder", "tokenizer") and text_encoder is not None)
                          or (c == "scheduler" and scheduler is not None))]
        for component in needed:
            if component not in index:
                raise ValueError(f"{index_path} has no {component!r} entry; expected one per component: "
                                 f"{', '.join(REQUIRED_COMPONENTS)}.")
            if not (root / component).is_dir():
                raise FileNotFoundError(f"missing component folder {root / component} (named in {index_path}); "
                                        f"expected {_EXPECTED_CONTENT[component]}.")

        if transformer is None:
            # Whatever module the index names (the release names its own), onegen's NextDiT reads the folder.
            transformer = NextDiT.from_pretrained(root, subfolder="transformer", torch_dtype=torch_dtype,
                                                  device=device)
        elif not isinstance(transformer, NextDiT):
            transformer = NextDiT.from_pretrained(transformer, torch_dtype=torch_dtype, device=device)

        if image_tokenizer is None:
            image_tokenizer = _load_vae_component(root, index["vae"])
        elif not isinstance(image_tokenizer, ImageTokenizer):
            image_tokenizer = load_image_tokenizer(image_tokenizer)

        if text_encoder is None:
            text_encoder = T5TextEncoder.from_pretrained(root, torch_dtype=torch_dtype)
        elif not isinstance(text_encoder, T5TextEncoder):
            text_encoder = T5TextEncoder.from_pretrained(text_encoder, torch_dtype=torch_dtype)

        if scheduler is None:
            scheduler = load_scheduler(root / "scheduler")
        return cls(transformer, image_tokenizer, text_encoder, scheduler).to(device)

    @classmethod
    def _from_transformer_folder(cls, folder: Path, torch_dtype, image_tokenizer, text_encoder, scheduler, device):
        missing = [name for name, value in (("image_tokenizer", image_tokenizer), ("text_encoder", text_encoder))
                   if value is None]
        if missing:
            raise ValueError(f"{folder} holds only a transformer (no {MODEL_INDEX_NAME}); pass "
                             f"{' and '.join(n + '=' for n in missing)} to build a pipeline around it.")
        transformer = NextDiT.from_pretrained(folder, torch_dtype=torch_dtype, device=device)
        if not isinstance(image_tokenizer, ImageTokenizer):
            image_tokenizer = load_image_tokenizer(image_tokenizer)
        if not isinstance(text_encoder, T5TextEncoder):
            text_encoder = T5TextEncoder.from_pretrained(text_encoder, torch_dtype=torch_dtype)
        return cls(transformer, image_tokenizer, text_encoder, scheduler).to(device)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the release layout; `from_pretrained(save_directory)` restores the pipeline.

        The transformer entry names the release's module (the weights are state-dict compatible with it), so the
        folder reads like the release; a PixelTokenizer is recorded as ["onegen", "PixelTokenizer"]."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(root / "transformer")
        self.image_tokenizer.save_pretrained(root / "vae")
        self.text_encoder.save_pretrained(root)
        self.scheduler.save_pretrained(root / "scheduler")
        vae_entry = COMPONENT_ENTRIES["pixel_vae"] if isinstance(self.image_tokenizer, PixelTokenizer) \
            else COMPONENT_ENTRIES["vae"]
        index = {
            "_class_name": PIPELINE_CLASS_NAME,
            "_diffusers_version": _diffusers_version(),
            "scheduler": COMPONENT_ENTRIES["scheduler"],
            "text_encoder": COMPONENT_ENTRIES["text_encoder"],
            "tokenizer": COMPONENT_ENTRIES["tokenizer"],
            "transformer": RELEASE_TRANSFORMER_ENTRY,
            "vae": vae_entry,
        }
        (root / MODEL_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return root

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "OneDiffusionPipeline":
        """Move every component to `device`; `dtype` casts the transformer only."""
        if dtype is not None:
            self.transformer.to(dtype=dtype)
        if device is not None:
            self.transformer.to(device)
            self.image_tokenizer.to(device)
            self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    # ------------------------------------------------------------------ inference

    def default_size(self, task: Task, first_image: torch.Tensor | None) -> tuple[int, int]:
        """(height, width) when the caller gives none.

        Text-only image generation: the transformer's `input_size` in latent pixels × the tokenizer factor (the
        release: 96 × 8 = 768). Otherwise the release's ASPECT_RATIO_512 bucket closest to the first image's
        height/width ratio (square without an image), as latent sizes (bucket / 8) × the tokenizer factor
        (model.images.bucket_size). Multiview is always square (the release asserts height == width)."""
        f = self.image_tokenizer.downsample_factor
        if first_image is None and task.view_layout != "camera_pairs":
            size = self.transformer.config.input_size
            return int(size[-2]) * f, int(size[-1]) * f
        if first_image is None or task.view_layout == "camera_pairs":
            return bucket_size(1, 1, f)
        return bucket_size(first_image.shape[-2], first_image.shape[-1], f)

    def size_multiple(self) -> int:
        """H and W must be multiples of this: tokenizer factor × transformer patch (16 px for the release)."""
        return self.image_tokenizer.downsample_factor * self.patch_size

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size[-1])

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = self.text_encoder.encode(prompts)
        return states.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        task: str,
        prompt: str | list[str] = "",
        images: Sequence[ImageInput] | ImageInput | None = None,
        direction: str | None = None,
        denoise_mask: Sequence[int] | None = None,
        cameras: Sequence[Sequence[float]] | torch.Tensor | np.ndarray | None = None,
        negative_prompt: str | list[str] = "",
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        progress: bool = True,
        prompt_kwargs: dict | None = None,
        focal_length: float = camera_utils.RELEASE_FOCAL,
        estimate_focal: bool = False,
        noise_scale: float = 1.0,
    ) -> OneDiffusionOutput:
        """Run `task` (a name from model.tasks, e.g. "text2image", "depth2image", "multiview").

        prompt: caption(s); the task token (and task syntax, via `prompt_kwargs` for Task.build_prompt) is added
            unless the prompt already starts with a task token. A list runs a batch (condition views are shared).
        images: the condition images, in frame order of the condition views that are pictures (e.g. the depth map
            for depth2image "generate", the RGB image for "estimate", the references for faceid, the known images of
            a multiview sequence): paths, http(s) URLs, PIL images (any mode: 16-bit, CMYK, palette, alpha on white,
            EXIF orientation applied, first frame of animations), (H, W[, 3|4]) uint8/uint16 arrays or float arrays
            in [0, 1], or (3, H, W) tensors in [-1, 1] (model.images). Each is center-crop-resized to (height, width).
        direction: one of the task's directions (default: its first, "generate" / "novel_view_synthesis");
            denoise_mask: an explicit 0/1 per frame (1 = generated) instead, e.g. [0, 1] for estimation.
        cameras: multiview cameras, one per camera in order: (azimuth°, elevation°[, distance]) tuples on the
            release's z-up sphere (distance default 1.7, the release's), or (V, 4, 4) OpenGL camera-to-world matrices
            (the release's `multiview_c2ws`). Entries of cameras whose ray frames are generated may be None and are
            ignored. As in the release (which is given only the known poses), the rays are made relative to the
            first camera whose ray frame is a condition (the reference camera, camera 0 in the usual case). Needed
            when ray frames are conditions; pose estimation needs none.
        negative_prompt: the unconditional text of CFG (default "", as the release); CFG runs when
            guidance_scale > 1.
        height, width: output size, multiples of `size_multiple()`; defaults per `default_size`.
        generator / seed / latents: see the module docstring. latents: (B, T, 16, h, w) or (T, 16, h, w).
        output_type: "pil", "np" or "latent" (no decoding).
        focal_length / estimate_focal: intrinsics of the ray frames; estimate_focal fits the focal of recovered
            cameras instead of assuming `focal_length`.
        noise_scale: multiplies the token count L of the dynamic time shift, as the release's `img2img` does (the
            release's text-to-image `__call__` ignores it; here it applies to every task). 1.0 = no change.
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type={output_type!r}; expected 'pil', 'np' or 'latent'.")
        spec = get_task(task)
        captions = _prompt_list(prompt, "prompt")
        _check_call_numbers(height=height, width=width, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, noise_scale=noise_scale)
        condition_images = as_image_list(images)
        layout = view_layout(spec, direction=direction, denoise_mask=denoise_mask, num_images=len(condition_images),
                             num_cameras=None if cameras is None else len(cameras))
        layout.check_images(len(condition_images))
        tensors = [image_to_tensor(image, name=f"images[{i}]") for i, image in enumerate(condition_images)]

        height, width = self._output_size(spec, tensors, height, width)
        f = self.image_tokenizer.downsample_factor
        h, w = height // f, width // f
        batch, num_views = len(captions), layout.num_views
        shape = (batch, num_views, self.image_tokenizer.latent_channels, h, w)

        # randomness: noise generator and, separately, the VAE posterior generator (see module docstring)
        if generator is None:
            seed = seed if seed is not None else random.SystemRandom().randrange(2**63)
            generator = torch.Generator().manual_seed(seed)
            encode_generator = torch.Generator().manual_seed((seed + 1) % 2**63)
        else:
            seed = None
            encode_generator = generator
        noise = self._initial_noise(latents, shape, generator)

        # the view sequence: clean condition latents (pictures encoded, rays from cameras), prompts with task syntax
        picture_latents = self._encode_conditions(layout, tensors, height, width, encode_generator)
        views = stack([build_sample(layout, full_prompt(spec, caption, prompt_kwargs), size=(h, w),
                                    channels=shape[2], picture_latents=picture_latents, cameras=cameras,
                                    focal=focal_length) for caption in captions]).to(self.device)

        states, mask = self.encode_prompts(views.prompts)
        negative_states = negative_mask = None
        if guidance_scale > 1.0:
            negatives = _prompt_list(negative_prompt, "negative_prompt")
            negatives = negatives * batch if isinstance(negative_prompt, str) else negatives
            if len(negatives) != batch:
                raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts; give one or one per prompt.")
            negative_states, negative_mask = self.encode_prompts(negatives)

        num_tokens = release_num_tokens(sum(layout.target_mask), h, w, self.patch_size, noise_scale, num_views)
        from tqdm.auto import tqdm

        with tqdm(total=num_inference_steps, disable=not progress, desc=spec.name) as bar:
            final = sample(
                self.transformer, text_states=states, text_mask=mask, noise=noise,
                condition_latents=views.latents, condition_mask=views.condition_mask,
                negative_text_states=negative_states, negative_text_mask=negative_mask,
                guidance_scale=guidance_scale, num_steps=num_inference_steps, scheduler=self.scheduler,
                num_tokens=num_tokens, patch_size=self.patch_size,
                model_dtype=self.dtype if self.dtype != torch.float32 else None,
                callback=lambda *_: bar.update(1),
            )

        result = OneDiffusionOutput(images=[], image_views=[], depth=None, cameras=None, latents=final,
                                    noise=noise, seed=seed, sigmas=self.sigmas(num_inference_steps, num_tokens),
                                    prompts=views.prompts, target_mask=layout.target_mask, task=spec.name)
        if output_type != "latent":
            self._decode_targets(result, layout.roles, output_type)
        self._estimate_cameras(result, layout.roles, focal_length, estimate_focal)
        return result

    # ------------------------------------------------------------------ helpers of __call__

    def sigmas(self, num_inference_steps: int, num_tokens) -> torch.Tensor:
        """The schedule a call with `num_tokens` denoised tokens uses, (N + 1,) ending in 0 (the scheduler's)."""
        return release_schedule(self.scheduler, num_inference_steps, num_tokens).sigmas

    def _output_size(self, spec: Task, tensors: list[torch.Tensor], height, width) -> tuple[int, int]:
        if height is None or width is None:
            default_h, default_w = self.default_size(spec, tensors[0] if tensors else None)
            height = default_h if height is None else height
            width = default_w if width is None else width
        multiple = self.size_multiple()
        if height % multiple or width % multiple:
            raise ValueError(f"height={height}, width={width} must be multiples of {multiple} "
                             f"(image tokenizer factor {self.image_tokenizer.downsample_factor} × patch "
                             f"{self.patch_size}).")
        return height, width

    def _encode_conditions(self, layout: ViewLayout, tensors: list[torch.Tensor], height: int, width: int,
                           generator: torch.Generator) -> dict[int, torch.Tensor]:
        """Frame index -> latent (16, h, w) of every picture condition, as the release: centre-crop-resize, encode."""
        if not tensors:
            return {}
        pixels = torch.stack([center_crop_resize(t, height, width) for t in tensors]).to(self.device)
        encoded = self.image_tokenizer.encode(pixels, generator=generator).float().cpu()
        return dict(zip(layout.picture_conditions, encoded))

    @staticmethod
    def _initial_noise(latents, shape, generator) -> torch.Tensor:
        if latents is None:
            # drawn on the CPU (generator's device) as model.sampler does, so runs match across devices
            return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        noise = torch.as_tensor(latents, dtype=torch.float32).cpu()
        if noise.ndim == 4:
            noise = noise[None].expand(shape[0], *noise.shape)
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {tuple(shape)} "
                             "(batch, views, 16, height/f, width/f).")
        return noise.clone()

    def _decode_targets(self, result: OneDiffusionOutput, roles, output_type: str) -> None:
        views = [i for i, (role, target) in enumerate(zip(roles, result.target_mask)) if target and role != RAY_ROLE]
        if not views:
            return
        batch = result.latents.shape[0]
        flat = result.latents[:, views].flatten(0, 1).to(self.device)  # (B * V, 16, h, w)
        pixels = ((self.image_tokenizer.decode(flat).float() / 2 + 0.5).clamp(0, 1)).cpu()  # (B * V, 3, H, W)
        arrays = pixels.permute(0, 2, 3, 1).numpy()
        result.image_views = views * batch
        if output_type == "pil":
            from PIL import Image

            result.images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
        else:
            result.images = list(arrays)
        depth_views = [k for k, i in enumerate(views) if roles[i] == DEPTH_ROLE]
        if depth_views:
            per_sample = arrays.reshape(batch, len(views), *arrays.shape[1:])
            luma = np.asarray(LUMA_WEIGHTS, dtype=np.float32)
            result.depth = [(per_sample[b, depth_views[0]] @ luma).astype(np.float32) for b in range(batch)]

    def _estimate_cameras(self, result: OneDiffusionOutput, roles, focal_length: float, estimate_focal: bool) -> None:
        ray_views = [i for i, (role, target) in enumerate(zip(roles, result.target_mask))
                     if target and role == RAY_ROLE]
        if not ray_views:
            return
        estimates = []
        for latents in result.latents[:, ray_views].double().cpu():
            rays = camera_utils.latent_to_rays(latents)  # (V, h, w, 6)
            found = camera_utils.cameras_from_rays(rays, focal=None if estimate_focal else focal_length)
            c2w = camera_utils.release_to_opencv_frame(found.c2w).numpy()
            estimates.append(EstimatedCameras(camera_indices=[i // 2 for i in ray_views], c2w=c2w,
                                              rotation=c2w[:, :3, :3].copy(), centre=c2w[:, :3, 3].copy(),
                                              focal=found.focal.numpy()))
        result.cameras = estimates


# ----------------------------------------------------------------------------------------------------------------------
# Loading helpers
# ----------------------------------------------------------------------------------------------------------------------

_EXPECTED_CONTENT = {
    "transformer": "config.json + diffusion_pytorch_model*.safetensors of a NextDiT",
    "vae": "config.json (+ safetensors) of a 16-channel diffusers AutoencoderKL, or a PixelTokenizer config.json",
    "text_encoder": "config.json + safetensors of a transformers T5EncoderModel",
    "tokenizer": "a T5 tokenizer (spiece.model and/or tokenizer.json + tokenizer_config.json)",
    "scheduler": f"{SCHEDULER_CONFIG_NAME} of a diffusers FlowMatchEulerDiscreteScheduler",
}


def _load_vae_component(root: Path, entry) -> ImageTokenizer:
    library, class_name = (list(entry) + [None, None])[:2]
    if class_name == "PixelTokenizer":
        return PixelTokenizer.from_pretrained(root / "vae")
    if class_name not in ("AutoencoderKL", None):
        raise ValueError(f"{root / MODEL_INDEX_NAME}: vae entry {entry!r} is not supported; onegen reads "
                         f"{COMPONENT_ENTRIES['vae']} or {COMPONENT_ENTRIES['pixel_vae']}.")
    return VAETokenizer.from_pretrained(root, subfolder="vae")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__



def _prompt_list(prompt, name: str) -> list[str]:
    """`prompt` as a non-empty list of strings, or a ValueError naming the argument."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a list of strings (\"\" for none), got "
                         f"{type(prompt).__name__}.")
    if not prompts:
        raise ValueError(f"{name} is an empty list; pass a string or at least one prompt.")
    return list(prompts)


def _check_call_numbers(*, height, width, num_inference_steps, guidance_scale, noise_scale) -> None:
    """ValueErrors naming the argument for sizes, steps and scales no run can use (before anything is allocated)."""
    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if not is_int(value):
            raise ValueError(f"{name} must be an integer number of pixels, got {value!r}.")
        if not 0 < value <= MAX_IMAGE_SIDE:
            raise ValueError(f"{name}={value} is out of range; expected 1..{MAX_IMAGE_SIDE} pixels (a multiple of "
                             "size_multiple()), or None for the default size.")
    if not is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
    for name, value, expected, in_range in (("guidance_scale", guidance_scale, ">= 0", lambda v: v >= 0),
                                            ("noise_scale", noise_scale, "> 0", lambda v: v > 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) \
                or not in_range(value):
            raise ValueError(f"{name} must be a finite number {expected}, got {value!r}.")

__all__ = [
    "OneDiffusionPipeline",
    "OneDiffusionOutput",
    "EstimatedCameras",
    "RELEASE_SCHEDULER_CONFIG",
    "RELEASE_TRANSFORMER_ENTRY",
]
