"""Run the OFFICIAL OneDiffusion pipeline on the tiny release folder and write tests/data/release_reference.npz.

    git -C /work/.mirror/lehduong+OneDiffusion/repo archive HEAD onediffusion | tar -x -C /tmp/official
    .venv/bin/python tests/release_reference/make_release_reference.py --official /tmp/official

(`git archive HEAD` of the whole tree stops on an asset blob missing from the mirror; the `onediffusion` package is
all this needs.) The official tree is only put on sys.path at run time; none of its code is copied into this project,
only its outputs (about 16 KB of latents and settings) are committed.

What it does:

1. builds the tiny release folder twice (tests/release_reference/tiny_release.py, the builder the test uses), checks
   that both builds are byte-identical, and records `weights_fingerprint` of the weights;
2. loads it with the official `OneDiffusionPipeline.from_pretrained` (onediffusion/diffusion/pipelines/onediffusion.py)
   and runs, in float32 on the CPU with fixed initial noise:
   (a) text-to-image: `pipe(prompt="[[text2image]] a red cube", latents=noise, ...)`;
   (b) depth estimation as in the release's inference.py: `pipe.img2img(image=[photo],
       prompt="[[depth2image]] a red cube on a table", denoise_mask=[0, 1], ...)`;
   both with guidance_scale 4, negative prompt "", 8 steps, 48x48 pixels;
3. writes the initial noise, the pinned condition latent, the final latents as the official loop leaves them after
   its last step (read through its `callback`; for depth estimation the target view, the condition view being the
   pinned condition latent exactly), the scheduler's sigmas/timesteps and the settings.

Deviations from running the release as shipped, all needed to run it on a CPU in float32 and all pinned here:

* `flash_attn` is not installed (CUDA only): a shim module implements exactly what the release uses,
  `flash_attn_varlen_func` (non-causal, no dropout, softmax scale 1/sqrt(head_dim), logit softcap
  s -> 30·tanh(s/30) as the release passes softcap=30; float32 math) and `bert_padding.index_first_axis/pad_input`.
  The official `Attention.forward` takes that kernel only for fp16/bf16 inputs; its float32 branch is plain SDPA
  WITHOUT the softcap, which is not what the released model runs, so the dtype test is rewritten at run time
  (in memory, from the official source) to always take the flash-attn branch. The shim counts its calls and the
  script checks it ran in every attention layer of every forward.
* The official `from_pretrained` loads T5 in float16; the text encoder is cast back to float32 (the tiny T5's weights
  are float16 values, so this is lossless; checked against a float32 load).
* The official `img2img` encodes the condition image with an unseeded posterior sample; `retrieve_latents` is
  replaced by the posterior mean (`latent_dist.mode()`), which onegen gives with `VAETokenizer(sample=False)`.
* The official `img2img` ignores `latents=` for the initial noise (`prepare_init_latents` draws it); it is patched to
  return the fixed noise (the shape it is asked for is checked).
* `onediffusion.dataset.multitask.multiview` (imported for `calculate_rays`; it needs pytorch3d and cv2) is replaced
  by a stub: the multiview path is not run. `torchvision.transforms` is shimmed when torchvision is not installed
  (Compose, Lambda, ToTensor, Resize, Normalize with torchvision's arithmetic).
* The libraries are the project's (diffusers, transformers, torch from .venv), not the release's pins
  (diffusers 0.30.3, transformers 4.45.2, torch 2.3.1); their versions are stored in the npz.
  `--release-diffusers-wheel diffusers-0.30.3-py3-none-any.whl` (from `pip download --no-deps diffusers==0.30.3`)
  swaps in the scheduler class of the release's pinned diffusers, read from the wheel (the rest of that diffusers
  does not import next to transformers 5): diffusers 0.30.3 shifts the float64 sigmas it is given and rounds to float32
  afterwards, diffusers 0.42.1 (the .venv's) rounds them to float32 first and shifts in float32.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import inspect
import math
import subprocess
import sys
import tempfile
import textwrap
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "release_reference.npz"
OFFICIAL_MIRROR = Path("/work/.mirror/lehduong+OneDiffusion/repo")
SOFTCAP = 30.0
FORCED_BRANCH = "if inp_dtype in [torch.float16, torch.bfloat16]:"

for path in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from release_reference import tiny_release as tiny  # noqa: E402


# ---------------------------------------------------------------------------------------------------- shims

class FlashAttnShim:
    """flash_attn's varlen API as the release calls it, in float32 on the CPU; counts its calls."""

    def __init__(self):
        self.calls = 0
        self.softcaps: set[float] = set()

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        if dropout_p != 0.0 or causal or tuple(window_size) != (-1, -1) or alibi_slopes is not None \
                or return_attn_probs or block_table is not None:
            raise NotImplementedError("the shim implements the release's call only (no dropout/causal/window/alibi)")
        self.calls += 1
        self.softcaps.add(float(softcap))
        heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
        scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        kv_index = torch.arange(heads) // (heads // kv_heads)  # flash-attn's GQA: query head h -> KV head h // ratio
        out = torch.empty_like(q)
        for i in range(len(cu_seqlens_q) - 1):
            q0, q1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            k0, k1 = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            qs = q[q0:q1].float()
            ks = k[k0:k1].float()[:, kv_index]
            vs = v[k0:k1].float()[:, kv_index]
            scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            out[q0:q1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs).to(q.dtype)
        return out


def self_test_flash_attn_shim() -> None:
    """The shim without softcap equals torch's SDPA; with it, it equals the softcapped formula written out."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 4, 24, generator=generator) * 3 for _ in range(3))  # (B, N, H, D)
    lengths = torch.tensor([0, 7, 14], dtype=torch.int32)
    flat = [t.reshape(14, 4, 24) for t in (q, k, v)]
    shim = FlashAttnShim()
    plain = shim.flash_attn_varlen_func(*flat, lengths, lengths, 7, 7, softcap=0.0).view(2, 7, 4, 24)
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    capped = shim.flash_attn_varlen_func(*flat, lengths, lengths, 7, 7, softcap=SOFTCAP).view(2, 7, 4, 24)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(24)
    expected = torch.einsum("bhnm,bmhd->bnhd", (SOFTCAP * torch.tanh(scores / SOFTCAP)).softmax(-1), v)
    if not (torch.allclose(plain, sdpa, atol=1e-5) and torch.allclose(capped, expected, atol=1e-5)) \
            or torch.allclose(capped, plain, atol=1e-3):
        raise SystemExit("flash_attn shim self-test failed")


def index_first_axis(x, indices):
    return x[indices]


def pad_input(hidden_states, indices, batch, seqlen):
    out = torch.zeros(batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype,
                      device=hidden_states.device)
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])


def unpad_input(*args, **kwargs):
    raise NotImplementedError("unpad_input is not on the release's path (query length == key length)")


def install_flash_attn_shim() -> FlashAttnShim:
    """sys.modules["flash_attn"] for the official NextDiT. diffusers and transformers are imported first, so their
    import-time probes for an installed flash-attn (find_spec + package metadata) still see none."""
    importlib.import_module("diffusers.loaders.peft")
    importlib.import_module("diffusers.pipelines.pipeline_utils")
    importlib.import_module("diffusers.models.autoencoders.autoencoder_kl")
    importlib.import_module("diffusers.schedulers.scheduling_flow_match_euler_discrete")
    importlib.import_module("transformers.models.t5.modeling_t5")

    shim = FlashAttnShim()
    flash_attn = types.ModuleType("flash_attn")
    flash_attn.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    flash_attn.flash_attn_varlen_func = shim.flash_attn_varlen_func
    bert_padding = types.ModuleType("flash_attn.bert_padding")
    bert_padding.__spec__ = importlib.machinery.ModuleSpec("flash_attn.bert_padding", None)
    bert_padding.index_first_axis = index_first_axis
    bert_padding.pad_input = pad_input
    bert_padding.unpad_input = unpad_input
    flash_attn.bert_padding = bert_padding
    sys.modules["flash_attn"] = flash_attn
    sys.modules["flash_attn.bert_padding"] = bert_padding
    return shim


def install_torchvision_transforms_shim() -> bool:
    """torchvision.transforms with what the release's image processor uses; False when torchvision is installed."""
    try:
        importlib.import_module("torchvision.transforms")
        return False
    except ImportError:
        pass

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for transform in self.transforms:
                x = transform(x)
            return x

    class Lambda:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, x):
            return self.fn(x)

    class ToTensor:  # PIL -> (C, H, W) float in [0, 1], as torchvision's to_tensor for 8-bit images
        def __call__(self, pic):
            if pic.mode not in ("RGB", "L"):
                raise NotImplementedError(f"shim ToTensor: mode {pic.mode}")
            array = np.array(pic, dtype=np.uint8, copy=True)
            tensor = torch.from_numpy(array).view(pic.size[1], pic.size[0], len(pic.getbands()))
            return tensor.permute(2, 0, 1).contiguous().to(dtype=torch.get_default_dtype()).div(255)

    class Normalize:  # (x - mean) / std per channel, as torchvision's normalize
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            tensor = tensor.clone()
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
            return tensor.sub_(mean).div_(std)

    class Resize:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, x):
            raise NotImplementedError("shim Resize: only the do_crop=True path (CenterCropResizeImage) is run")

    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    for cls in (Compose, Lambda, ToTensor, Normalize, Resize):
        setattr(transforms, cls.__name__, cls)
    torchvision.transforms = transforms
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.transforms"] = transforms
    return True


def install_multiview_stub() -> None:
    stub = types.ModuleType("onediffusion.dataset.multitask.multiview")

    def calculate_rays(*args, **kwargs):
        raise NotImplementedError("multiview is not run by make_release_reference.py (stubbed: needs pytorch3d)")

    stub.calculate_rays = calculate_rays
    sys.modules["onediffusion.dataset.multitask.multiview"] = stub


def release_pinned_scheduler_class(wheel: Path):
    """FlowMatchEulerDiscreteScheduler of a diffusers wheel (0.30.3, the release's pin), loaded next to the installed
    diffusers (its relative imports resolve there)."""
    member = "diffusers/schedulers/scheduling_flow_match_euler_discrete.py"
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(member).decode()
    name = "diffusers.schedulers._release_pinned_flow_match_euler_discrete"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "diffusers.schedulers"
    module.__file__ = f"{wheel}!/{member}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module.FlowMatchEulerDiscreteScheduler


# ---------------------------------------------------------------------------------------------------- official

def import_official(tree: Path, shim: FlashAttnShim, scheduler_wheel: Path | None):
    if not (tree / "onediffusion" / "diffusion" / "pipelines" / "onediffusion.py").is_file():
        raise SystemExit(f"{tree} is not an exported official tree "
                         "(no onediffusion/diffusion/pipelines/onediffusion.py)")
    sys.path.insert(0, str(tree))
    install_multiview_stub()
    install_torchvision_transforms_shim()
    from onediffusion.diffusion.pipelines import onediffusion as official
    from onediffusion.models.denoiser.nextdit import modeling_nextdit

    # The release's kernel path (flash-attn, softcap 30) also for float32: rewrite the dtype test of Attention.forward.
    source = textwrap.dedent(inspect.getsource(modeling_nextdit.Attention.forward))
    if source.count(FORCED_BRANCH) != 1:
        raise SystemExit(f"official Attention.forward no longer contains {FORCED_BRANCH!r}; update the script")
    source = source.replace(FORCED_BRANCH, "if True:  # forced by make_release_reference.py: flash-attn branch")
    namespace: dict = {}
    exec(compile(source, "<official Attention.forward, flash-attn branch forced>", "exec"),
         modeling_nextdit.__dict__, namespace)
    modeling_nextdit.Attention.forward = namespace["forward"]
    if modeling_nextdit.flash_attn_varlen_func.__self__ is not shim:
        raise SystemExit("the official NextDiT did not pick up the flash_attn shim")

    # Pinned condition latent: the posterior mean instead of an unseeded sample.
    def retrieve_latents_mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    official.retrieve_latents = retrieve_latents_mean
    if scheduler_wheel is not None:
        official.FlowMatchEulerDiscreteScheduler = release_pinned_scheduler_class(scheduler_wheel)
    return official


def load_official_pipeline(official, folder: Path):
    from transformers import T5EncoderModel

    pipe = official.OneDiffusionPipeline.from_pretrained(str(folder))
    if pipe.text_encoder.dtype != torch.float16:
        raise SystemExit(f"expected the official loader's float16 T5, got {pipe.text_encoder.dtype}")
    pipe.text_encoder = pipe.text_encoder.float()
    reference = T5EncoderModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=torch.float32)
    for (name, a), (_, b) in zip(pipe.text_encoder.state_dict().items(), reference.state_dict().items()):
        if not torch.equal(a, b):
            raise SystemExit(f"T5 weight {name} is not float16-exact: the float16 load loses precision")
    for component in (pipe.transformer, pipe.vae, pipe.text_encoder):
        component.to(torch.float32).eval()
    return pipe


class Recorder:
    """Final latents (the loop's callback after its last step) and the transformer's timestep inputs."""

    def __init__(self, pipe):
        self.latents = None
        self.steps = 0
        self.timesteps: list[torch.Tensor] = []
        self.handle = pipe.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        self.timesteps.append(kwargs["timesteps"].detach().clone())

    def callback(self, step, t, latents):
        self.steps += 1
        self.latents = latents.detach().clone()


def run_text_to_image(pipe, noise: torch.Tensor) -> dict:
    recorder = Recorder(pipe)
    pipe(prompt=tiny.T2I_PROMPT, negative_prompt=tiny.NEGATIVE_PROMPT, height=tiny.HEIGHT, width=tiny.WIDTH,
         num_inference_steps=tiny.NUM_STEPS, guidance_scale=tiny.GUIDANCE_SCALE, latents=noise[:, 0].clone(),
         output_type="np", callback=recorder.callback, callback_steps=1)
    recorder.handle.remove()
    if recorder.steps != tiny.NUM_STEPS:
        raise SystemExit(f"text-to-image callback ran {recorder.steps} times, expected {tiny.NUM_STEPS}")
    latents = recorder.latents.reshape(noise.shape)
    return {"latents": latents, "sigmas": pipe.scheduler.sigmas.clone(), "timesteps": pipe.scheduler.timesteps.clone(),
            "model_timesteps": recorder.timesteps}


def run_depth_estimation(pipe, noise: torch.Tensor, image) -> dict:
    recorder = Recorder(pipe)
    captured: dict = {}
    original_prepare_latents = pipe.prepare_latents

    def prepare_latents(*args, **kwargs):
        out = original_prepare_latents(*args, **kwargs)
        if kwargs.get("image") is not None:
            image_tensor = kwargs["image"]
            if float(image_tensor.min()) >= 0:
                raise SystemExit("the release's preprocessing normalised twice (no pixel below 128): change the photo")
            captured["condition"] = out.detach().clone()
            captured["pixels"] = image_tensor.detach().clone()
        return out

    def prepare_init_latents(batch_size, seq_length, num_channels_latents, height, width, dtype, device, generator,
                             latents=None):
        shape = (batch_size, seq_length, num_channels_latents, height // pipe.vae_scale_factor,
                 width // pipe.vae_scale_factor)
        if tuple(noise.shape) != shape:
            raise SystemExit(f"img2img asks for initial noise of shape {shape}, the fixed noise is "
                             f"{tuple(noise.shape)}")
        return noise.clone().to(device=device, dtype=dtype)

    pipe.prepare_latents = prepare_latents
    pipe.prepare_init_latents = prepare_init_latents
    try:
        out = pipe.img2img(image=[image], prompt=tiny.DEPTH_PROMPT, negative_prompt=tiny.NEGATIVE_PROMPT,
                           denoise_mask=list(tiny.DEPTH_DENOISE_MASK), height=tiny.HEIGHT, width=tiny.WIDTH,
                           num_inference_steps=tiny.NUM_STEPS, guidance_scale=tiny.GUIDANCE_SCALE, output_type="np",
                           callback=recorder.callback, callback_steps=1)
    finally:
        del pipe.prepare_latents, pipe.prepare_init_latents
        recorder.handle.remove()
    if recorder.steps != tiny.NUM_STEPS:
        raise SystemExit(f"img2img callback ran {recorder.steps} times, expected {tiny.NUM_STEPS}")
    latents = recorder.latents
    if not torch.equal(out.latents, latents / 1.658):
        raise SystemExit("img2img's returned latents are not the callback's final latents / 1.658")
    condition = captured["condition"]  # (1, 1, 16, h, w)
    if not torch.equal(latents[:, [0]], condition):
        raise SystemExit("the condition view of the final latents is not the pinned condition latent")
    return {"latents": latents, "condition": condition[:, 0], "sigmas": pipe.scheduler.sigmas.clone(),
            "timesteps": pipe.scheduler.timesteps.clone(), "model_timesteps": recorder.timesteps,
            "pixels": captured["pixels"]}


def check_model_timesteps(result: dict, mask: tuple[int, ...] | None) -> None:
    """Every forward saw 1000·σ_k on target views and timesteps[-1] on condition views (CFG batch of 2)."""
    for step, t in enumerate(result["model_timesteps"]):
        expected = result["timesteps"][step]
        if mask is None:
            if not torch.equal(t, torch.full_like(t, float(expected))):
                raise SystemExit(f"text-to-image step {step}: unexpected timesteps {t}")
            continue
        for view, target in enumerate(mask):
            value = expected if target else result["timesteps"][-1]
            if not torch.equal(t[:, view], torch.full_like(t[:, view], float(value))):
                raise SystemExit(f"img2img step {step} view {view}: unexpected timesteps")


# ---------------------------------------------------------------------------------------------------- onegen checks

def check_against_onegen_text(pipe, folder: Path) -> np.ndarray:
    """The official and onegen tokenizers/T5 give the same ids and states; returns the ids (3, 32) and lengths."""
    from model.tokenizers import T5TextEncoder

    ours = T5TextEncoder.from_pretrained(folder)
    prompts = [tiny.T2I_PROMPT, tiny.DEPTH_PROMPT, tiny.NEGATIVE_PROMPT]
    ids = np.zeros((len(prompts), 32), dtype=np.int32)
    lengths = np.zeros(len(prompts), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        states, mask = pipe.encode_prompt(prompt, "cpu", 1, False)
        batch = pipe.tokenizer(prompt, padding="max_length", max_length=300, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        our_ids, our_mask = ours.tokenize([prompt])
        our_states, _ = ours.encode([prompt])
        if not (torch.equal(batch.input_ids, our_ids) and torch.equal(batch.attention_mask.long(), our_mask)):
            raise SystemExit(f"official and onegen tokenizers differ on {prompt!r}")
        if not torch.equal(states, our_states):
            diff = (states - our_states).abs().max().item()
            raise SystemExit(f"official and onegen T5 states differ on {prompt!r} (max abs {diff:.3g})")
        n = int(mask.sum())
        if n > ids.shape[1]:
            raise SystemExit(f"prompt {prompt!r} has {n} tokens; keep the reference prompts under {ids.shape[1]}")
        ids[row, :n] = batch.input_ids[0, :n].numpy()
        lengths[row] = n
    return ids, lengths


def official_commit(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(OFFICIAL_MIRROR), "rev-parse", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="exported official OneDiffusion tree")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"npz to write (default {DEFAULT_OUT})")
    parser.add_argument("--official-commit", default=None,
                        help=f"commit of the exported tree (default: HEAD of {OFFICIAL_MIRROR})")
    parser.add_argument("--release-diffusers-wheel", type=Path, default=None,
                        help="use the FlowMatchEulerDiscreteScheduler of this diffusers wheel "
                             "(the release pins 0.30.3)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)

    import diffusers
    import sentencepiece
    import transformers

    self_test_flash_attn_shim()
    shim = install_flash_attn_shim()
    official = import_official(args.official.resolve(), shim, args.release_diffusers_wheel)

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.build_tiny_release(Path(tmp) / "release")
        again = tiny.build_tiny_release(Path(tmp) / "again")
        if tiny.file_hashes(folder) != tiny.file_hashes(again):
            raise SystemExit("two builds of the tiny release folder differ: the builder is not deterministic")
        fingerprint = tiny.weights_fingerprint(folder)

        pipe = load_official_pipeline(official, folder)
        token_ids, token_lengths = check_against_onegen_text(pipe, folder)
        noise = tiny.initial_noise()
        image = tiny.condition_image()

        shim.calls = 0
        t2i = run_text_to_image(pipe, noise["t2i"])
        check_model_timesteps(t2i, None)
        depth = run_depth_estimation(pipe, noise["depth"], image)
        check_model_timesteps(depth, tiny.DEPTH_DENOISE_MASK)
        depth_blocks = pipe.transformer.config.depth
        expected_calls = 2 * tiny.NUM_STEPS * depth_blocks
        if shim.calls != expected_calls or shim.softcaps != {SOFTCAP}:
            raise SystemExit(f"flash-attn shim ran {shim.calls} times with softcaps {shim.softcaps}; expected "
                             f"{expected_calls} with {SOFTCAP}")

    scheduler_source = (f"diffusers wheel {args.release_diffusers_wheel.name}" if args.release_diffusers_wheel
                        else f"installed diffusers {diffusers.__version__}")
    record = {
        "official_commit": np.array(args.official_commit or official_commit(args.official)),
        "weights_fingerprint": np.array(fingerprint),
        "scheduler_source": np.array(scheduler_source),
        "versions": np.array(f"torch {torch.__version__}; diffusers {diffusers.__version__}; "
                             f"transformers {transformers.__version__}; numpy {np.__version__}; "
                             f"sentencepiece {sentencepiece.__version__}"),  # it trains the tiny T5 tokenizer
        "height": np.array(tiny.HEIGHT), "width": np.array(tiny.WIDTH),
        "num_inference_steps": np.array(tiny.NUM_STEPS), "guidance_scale": np.array(tiny.GUIDANCE_SCALE),
        "t2i_prompt": np.array(tiny.T2I_PROMPT), "depth_prompt": np.array(tiny.DEPTH_PROMPT),
        "negative_prompt": np.array(tiny.NEGATIVE_PROMPT),
        "depth_denoise_mask": np.array(tiny.DEPTH_DENOISE_MASK, dtype=np.int32),
        "token_ids": token_ids, "token_lengths": token_lengths,
        "condition_pixels_sum": np.array(float(depth["pixels"].double().sum())),
        "t2i_noise": noise["t2i"].numpy(), "t2i_latents": t2i["latents"].float().numpy(),
        "t2i_sigmas": t2i["sigmas"].float().numpy(), "t2i_timesteps": t2i["timesteps"].float().numpy(),
        "depth_noise": noise["depth"].numpy(), "depth_condition": depth["condition"].float().numpy(),
        # frame 1 only: frame 0 of the final latents is depth_condition exactly (checked above)
        "depth_target_latents": depth["latents"][:, [i for i, t in enumerate(tiny.DEPTH_DENOISE_MASK) if t]]
        .float().numpy(),
        "depth_sigmas": depth["sigmas"].float().numpy(), "depth_timesteps": depth["timesteps"].float().numpy(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **record)
    moved = {k: relative_error(v["latents"], n) for k, v, n in (("t2i", t2i, noise["t2i"]),
                                                               ("depth", depth, noise["depth"]))}
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes); weights fingerprint {fingerprint[:16]}…; "
          f"scheduler: {scheduler_source}; ||final - noise|| / ||noise||: "
          + ", ".join(f"{k} {v:.3f}" for k, v in moved.items()))
    if not all(math.isfinite(v) and v > 0.1 for v in moved.values()):
        raise SystemExit("the final latents barely moved from the noise: the tiny model is too trivial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
