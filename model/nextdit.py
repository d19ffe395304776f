"""The released OneDiffusion denoiser: a Next-DiT over sequences of views (spec §1, checklist §10).

`NextDiT` has the parameter names and shapes of the official module for any config (the released
`transformer/` safetensors load with strict=True) and the numerics the weights were trained with:

* per-token adaLN from (timestep embedding + pooled text), scale and tanh-gate only (no shift);
* sandwich RMSNorms normalised in fp32 (fp64 for fp64 inputs), cast back, then scaled by the weight (the release's
  order); LayerNorms computed in fp32 and cast back (what nn.LayerNorm does for bf16 inputs);
* LayerNorm QK-norm over the whole projection (joint across heads);
* self-attention over all tokens of all views with logit softcap 30 in every dtype, KV heads repeat-interleaved;
* text cross-attention sharing the rotated queries, text KV heads tiled, per-head tanh gate, added before `wo`;
* 3-axis RoPE (view, row, column) computed on the fly (see `model.rope`).

Fast path: `attn_impl` picks FlexAttention ("flex", default on CUDA) or plain matmul attention ("math", default on
CPU, supports autograd there). When the timestep is constant within each view (always for (B,) and (B, T)
timesteps), the adaLN modulation is computed once per view and broadcast to its tokens instead of once per token.
The tests check it against an independent, plain float64 per-token implementation (tests/reference_nextdit.py).

Latent sizes that are not a multiple of the patch size are zero-padded at the bottom/right to the next multiple
(per-element timesteps are edge-replicated) and the output is cropped back; the official pipeline only uses
multiples of 16 pixels, i.e. even latent sizes, where nothing is padded.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.attention import DEFAULT_SOFTCAP, check_attn_impl, softcap_self_attention, tiled_cross_attention
from model.hub import named_load_errors, read_json_file, resolve_pretrained_folder
from model.presets import PRESETS
from model.rope import ROPE_THETA, apply_rope, check_rope_head_dim, rope_cos_sin, token_positions

logger = logging.getLogger(__name__)

__all__ = ["NextDiT", "PRESETS", "ffn_hidden_dim", "patchify", "unpatchify"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
TIMESTEP_FREQUENCY_DIM = 256
MAX_CONDITIONING_WIDTH = 1024

# Fields of the release's transformer/config.json that do not change the module (EMA and JAX training metadata).
RELEASE_ONLY_FIELDS = frozenset(
    {
        "decay",
        "inv_gamma",
        "min_decay",
        "optimization_step",
        "power",
        "update_after_step",
        "use_ema_warmup",
        "forward_dtype",
        "param_dtype",
        "remat_attention",
        "remat_block",
        "remat_mlp",
    }
)


def conditioning_width(hidden_size: int) -> int:
    """Width of the timestep/caption conditioning vector: min(hidden_size, 1024) as in the release."""
    return min(hidden_size, MAX_CONDITIONING_WIDTH)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU hidden width of the Llama recipe: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight, in the release's order: normalise in fp32 (fp64 for fp64 inputs), cast back
    to x's dtype, then multiply by the weight (in bf16 for a bf16 model: two roundings, as the release does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(_norm_dtype(x))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameter names) computed in fp32 (fp64 for fp64 inputs) and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _norm_dtype(x)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def modulate(x: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """x * (1 + scale) where token n of x (B, N, D) uses scale[:, n // group_size] of scale (B, N/group_size, D)."""
    B, N, D = x.shape
    return (x.view(B, -1, group_size, D) * (1 + scale[:, :, None])).view(B, N, D)


def gate(branch: torch.Tensor, gate_logits: torch.Tensor, group_size: int) -> torch.Tensor:
    """tanh(gate) * branch with the same per-group broadcast as `modulate`."""
    B, N, D = branch.shape
    return (branch.view(B, -1, group_size, D) * torch.tanh(gate_logits)[:, :, None]).view(B, N, D)


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, N, pT*pH*pW*C): tokens view-major then row then column; features (pt, ph, pw, c)."""
    B, T, C, H, W = x.shape
    pT, pH, pW = patch_size
    x = x.reshape(B, T // pT, pT, C, H // pH, pH, W // pW, pW)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # (B, T/pT, H/pH, W/pW, pT, pH, pW, C)
    return x.reshape(B, -1, pT * pH * pW * C)


def unpatchify(
    x: torch.Tensor, patch_size: tuple[int, int, int], groups: int, rows: int, cols: int, channels: int
) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, pT*pH*pW*C) -> (B, groups*pT, C, rows*pH, cols*pW)."""
    B = x.shape[0]
    pT, pH, pW = patch_size
    x = x.reshape(B, groups, rows, cols, pT, pH, pW, channels)
    x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, groups, pT, C, rows, pH, cols, pW)
    return x.reshape(B, groups * pT, channels, rows * pH, cols * pW)


def pad_to_patch_multiple(x: torch.Tensor, patch_h: int, patch_w: int, mode: str) -> torch.Tensor:
    """Pad (B, T, C, h, w) at the bottom/right so h, w become multiples of the patch size."""
    B, T, C, h, w = x.shape
    pad_h, pad_w = (-h) % patch_h, (-w) % patch_w
    if pad_h == 0 and pad_w == 0:
        return x
    flat = F.pad(x.reshape(B * T, C, h, w), (0, pad_w, 0, pad_h), mode=mode)
    return flat.reshape(B, T, C, h + pad_h, w + pad_w)


class TimestepEmbedder(nn.Module):
    """Sinusoid (cos first, 256 dims, max period 10000) of t on the 0..1000 scale, then an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = TIMESTEP_FREQUENCY_DIM):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int = TIMESTEP_FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
        """(...,) -> (..., dim) = [cos(t f), sin(t f)], f_k = exp(-ln(max_period) k / (dim/2)); fp32 or fp64."""
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t.to(dtype)[..., None] * freqs
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[..., :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        frequencies = self.sinusoid(t, self.frequency_embedding_size)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))


class SwiGLUFeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SelfCrossAttention(nn.Module):
    """Soft-capped GQA self-attention plus gated text cross-attention, summed per head before `wo`."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qk_norm: bool, y_dim: int):
        super().__init__()
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"num_heads={n_heads} must be a multiple of num_kv_heads={n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        kv_width = n_kv_heads * self.head_dim

        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_width, bias=False)
        self.wv = nn.Linear(dim, kv_width, bias=False)
        self.wk_y = nn.Linear(y_dim, kv_width, bias=False)
        self.wv_y = nn.Linear(y_dim, kv_width, bias=False)
        self.gate = nn.Parameter(torch.zeros(n_heads))  # per-head text gate, tanh(0) = 0
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm = FP32LayerNorm(n_heads * self.head_dim)
            self.k_norm = FP32LayerNorm(kv_width)
            self.ky_norm = FP32LayerNorm(kv_width, eps=1e-6)
        else:
            self.q_norm = self.k_norm = self.ky_norm = nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        softcap: float | None,
        attn_impl: str,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        L = text.shape[1]
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_norm(self.wq(x)).view(B, N, H, Dh)  # QK-norm over the whole projection, then split heads
        k = self.k_norm(self.wk(x)).view(B, N, Hkv, Dh)
        v = self.wv(x).view(B, N, Hkv, Dh)
        q = apply_rope(q, rope_cos, rope_sin).transpose(1, 2)  # (B, H, N, Dh)
        k = apply_rope(k, rope_cos, rope_sin).transpose(1, 2)  # (B, Hkv, N, Dh)
        v = v.transpose(1, 2)  # (B, Hkv, N, Dh)
        out = softcap_self_attention(q, k, v, softcap=softcap, attn_impl=attn_impl)  # (B, H, N, Dh)

        text_k = self.ky_norm(self.wk_y(text)).view(B, L, Hkv, Dh).transpose(1, 2)  # (B, Hkv, L, Dh), no RoPE
        text_v = self.wv_y(text).view(B, L, Hkv, Dh).transpose(1, 2)
        text_out = tiled_cross_attention(q, text_k, text_v, text_mask)  # (B, H, N, Dh)
        out = out + text_out * torch.tanh(self.gate).view(1, H, 1, 1).to(text_out.dtype)
        return self.wo(out.transpose(1, 2).reshape(B, N, H * Dh))


class NextDiTBlock(nn.Module):
    """Sandwich-norm adaLN block: x += tanh(g) * norm2(sublayer(norm1(x) * (1 + s))), for attention and FFN."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        multiple_of: int,
        ffn_dim_multiplier: float | None,
        norm_eps: float,
        qk_norm: bool,
        y_dim: int,
    ):
        super().__init__()
        self.attention = SelfCrossAttention(dim, n_heads, n_kv_heads, qk_norm, y_dim)
        self.feed_forward = SwiGLUFeedForward(dim, ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier))
        self.attention_norm1 = RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(conditioning_width(dim), 4 * dim))
        self.attention_y_norm = RMSNorm(y_dim, eps=norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        group_size: int,
        softcap: float | None,
        attn_impl: str,
    ) -> torch.Tensor:
        # x (B, N, D); cond (B, G, C) with N = G * group_size; text (B, L, Cy); text_mask (B, L) bool
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(cond).chunk(4, dim=-1)  # (B, G, D) each
        h = modulate(self.attention_norm1(x), scale_msa, group_size)
        h = self.attention(h, rope_cos, rope_sin, self.attention_y_norm(text), text_mask, softcap, attn_impl)
        x = x + gate(self.attention_norm2(h), gate_msa, group_size)
        h = modulate(self.ffn_norm1(x), scale_mlp, group_size)
        return x + gate(self.ffn_norm2(self.feed_forward(h)), gate_mlp, group_size)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) * (1 + scale(c)) -> Linear to patch values."""

    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm_final = FP32LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(conditioning_width(hidden_size), hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, group_size: int) -> torch.Tensor:
        return self.linear(modulate(self.norm_final(x), self.adaLN_modulation(cond), group_size))


class NextDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """OneDiffusion's Next-DiT denoiser; constructor fields are the release's transformer/config.json fields.

    Defaults are the official class's code defaults (the released config overrides most of them; use
    `NextDiT.from_preset("onediffusion-2.8b")` for the released architecture). Release-only metadata fields
    (EMA/JAX, see RELEASE_ONLY_FIELDS) are accepted and ignored. `attn_impl` ("auto" | "flex" | "math") is a
    runtime choice, not part of the saved config; it can be changed later by assigning `model.attn_impl`.

    A diffusers model: `from_pretrained` / `save_pretrained` are ModelMixin's (with the checks below), and
    PeftAdapterMixin gives LoRA through peft (`add_adapter(LoraConfig(target_modules=["wq", "wk", "wv", "wo"]))`,
    `load_lora_adapter`, `fuse_lora`, ...; model.lora). Adapters add modules, never rename the base's parameters.
    """

    config_name = CONFIG_NAME
    _supports_gradient_checkpointing = True
    _no_split_modules = ["NextDiTBlock"]

    def __init__(
        self,
        input_size=(1, 32, 32),
        patch_size=(1, 2, 2),
        in_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 32,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        pred_sigma: bool = False,
        caption_channels: int = 4096,
        qk_norm: bool = False,
        norm_type: str = "rms",
        model_max_length: int = 120,
        rotary_max_length: int = 384,
        rotary_max_length_t: int | None = None,
        *,
        attn_impl: str = "auto",
        **release_only_fields,
    ):
        super().__init__()
        _ignore_release_only_fields(release_only_fields)
        if norm_type != "rms":
            raise ValueError(f"norm_type={norm_type!r} is not supported: the released model uses 'rms'")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        check_rope_head_dim(hidden_size // num_heads)
        if caption_channels <= 0:
            raise ValueError(f"caption_channels must be positive (the text width), got {caption_channels}")
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3:
            raise ValueError(f"patch_size must be (time, height, width), got {patch_size}")
        self.register_to_config(
            input_size=list(input_size),
            patch_size=list(patch_size),
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            multiple_of=multiple_of,
            ffn_dim_multiplier=ffn_dim_multiplier,
            norm_eps=norm_eps,
            pred_sigma=pred_sigma,
            caption_channels=caption_channels,
            qk_norm=qk_norm,
            norm_type=norm_type,
            model_max_length=model_max_length,
            rotary_max_length=rotary_max_length,
            rotary_max_length_t=rotary_max_length_t,
        )
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if pred_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = hidden_size // num_heads
        self.caption_channels = caption_channels
        self.rotary_max_length = rotary_max_length
        self.rotary_max_length_t = rotary_max_length_t
        self.attn_impl = check_attn_impl(attn_impl)
        self.attn_softcap: float | None = DEFAULT_SOFTCAP  # None reproduces the release's fp32 fallback (no cap)
        self.gradient_checkpointing = False

        patch_volume = math.prod(patch_size)
        cond_dim = conditioning_width(hidden_size)
        self.x_embedder = nn.Linear(patch_volume * in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(cond_dim)
        self.y_embedder = nn.Sequential(
            FP32LayerNorm(caption_channels, eps=1e-6),
            nn.Linear(caption_channels, cond_dim),
        )
        self.layers = nn.ModuleList(
            NextDiTBlock(
                dim=hidden_size,
                n_heads=num_heads,
                n_kv_heads=self.num_kv_heads,
                multiple_of=multiple_of,
                ffn_dim_multiplier=ffn_dim_multiplier,
                norm_eps=norm_eps,
                qk_norm=qk_norm,
                y_dim=caption_channels,
            )
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_volume, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NextDiT":
        """Build a named configuration from `PRESETS`, with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown NextDiT preset {name!r}; available: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def initialize_weights(self) -> None:
        """Lumina-Next initialisation (spec §1.3); the released checkpoint's training init is unverified.

        Xavier-uniform for every Linear (zero biases), N(0, 0.02) for the timestep MLP, and zeros for the pooled
        caption projection, every adaLN projection, the final projection and the per-head text gates. Each block
        is therefore the identity at step 0 and the model predicts 0; all of these still receive gradients (the
        final projection first, then the gates), which is the DiT/Lumina recipe.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.y_embedder[1].weight)
        nn.init.zeros_(self.y_embedder[1].bias)
        for block in self.layers:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
            nn.init.zeros_(block.attention.gate)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        samples: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        *,
        rope_scale_factor: float = 1.0,
        rope_scale_watershed: float = 1.0,
        scale_factor: float | None = None,
        scale_watershed: float | None = None,
    ) -> torch.Tensor:
        """Predict the velocity of every view.

        samples: (B, T, C, h, w) latents, or (B, C, h, w) for T = 1.
        timesteps on the 0..1000 scale (1000 * sigma): (B,) per sample, (B, T) per view, or per element
            (B, T, C', h, w) / (B, C', h, w) with any C' (averaged over each patch, as the release does).
        encoder_hidden_states: (B, L, caption_channels); encoder_attention_mask: (B, L) of 0/1 (bool or int),
            None = all valid. A row without valid tokens gets zero text conditioning (no NaN).
        rope_scale_factor / rope_scale_watershed: the release's optional RoPE extrapolation (1, 1 = off);
            `scale_factor` / `scale_watershed` are the release's names for them, accepted so callers written
            against the official forward run unchanged.
        Returns (B, T, out_channels, h, w), also for 4-D input (as the release).
        """
        rope_scale_factor = rope_scale_factor if scale_factor is None else scale_factor
        rope_scale_watershed = rope_scale_watershed if scale_watershed is None else scale_watershed
        latents = samples[:, None] if samples.ndim == 4 else samples
        if latents.ndim != 5:
            raise ValueError(f"samples must be (B, T, C, h, w) or (B, C, h, w), got shape {tuple(samples.shape)}")
        B, T, C, h, w = latents.shape
        if C != self.in_channels:
            raise ValueError(f"samples have {C} channels, the model expects in_channels={self.in_channels}")
        pT, pH, pW = self.patch_size
        if T % pT != 0:
            raise ValueError(f"number of views T={T} must be a multiple of the temporal patch size {pT}")
        text, text_mask = self._check_text(encoder_hidden_states, encoder_attention_mask, B)
        param_dtype = self.x_embedder.weight.dtype

        latents = pad_to_patch_multiple(latents, pH, pW, mode="constant")  # (B, T, C, H, W)
        H, W = latents.shape[-2:]
        groups, rows, cols = T // pT, H // pH, W // pW
        self._check_rope_range(groups, rows, cols)
        t_per_group, group_size = self._timesteps_per_group(timesteps, samples.ndim, B, T, h, w, groups, rows * cols)

        x = self.x_embedder(patchify(latents, self.patch_size).to(param_dtype))  # (B, N, D)
        pooled_text = _masked_mean(text, text_mask)  # (B, Cy)
        cond = self.t_embedder(t_per_group) + self.y_embedder(pooled_text.to(x.dtype))[:, None]  # (B, G, Cc)

        theta, linear_factor = _rope_scaling(timesteps, rope_scale_factor, rope_scale_watershed)
        positions = token_positions(groups, rows, cols, device=x.device)  # (N, 3)
        rope_dtype = torch.float64 if param_dtype == torch.float64 else torch.float32
        rope_cos, rope_sin = rope_cos_sin(positions, self.head_dim, rope_dtype, theta, linear_factor)  # (N, Dh/2)

        text = text.to(x.dtype)
        for block in self.layers:
            args = (x, cond, rope_cos, rope_sin, text, text_mask, group_size, self.attn_softcap, self.attn_impl)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, *args)
            else:
                x = block(*args)

        out = self.final_layer(x, cond, group_size)  # (B, N, pT*pH*pW*out_channels)
        out = unpatchify(out, self.patch_size, groups, rows, cols, self.out_channels)  # (B, T, C_out, H, W)
        if (H, W) != (h, w):
            out = out[..., :h, :w].contiguous()
        return out

    def _check_text(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = encoder_hidden_states
        if text.ndim != 3 or text.shape[0] != batch or text.shape[-1] != self.caption_channels:
            raise ValueError(
                f"encoder_hidden_states must be (B={batch}, L, caption_channels={self.caption_channels}), "
                f"got {tuple(text.shape)}"
            )
        if encoder_attention_mask is None:
            return text, torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if tuple(encoder_attention_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(
                f"encoder_attention_mask must be (B, L) = {tuple(text.shape[:2])}, "
                f"got {tuple(encoder_attention_mask.shape)}"
            )
        return text, encoder_attention_mask.to(text.device) != 0

    def _check_rope_range(self, groups: int, rows: int, cols: int) -> None:
        max_views = self.rotary_max_length_t or self.rotary_max_length
        if groups > max_views or rows > self.rotary_max_length or cols > self.rotary_max_length:
            raise ValueError(
                f"{groups} views x {rows} x {cols} patches exceed the RoPE range of the model "
                f"(rotary_max_length={self.rotary_max_length}, rotary_max_length_t={self.rotary_max_length_t}): "
                "use fewer views or a smaller latent, or raise rotary_max_length in the config"
            )

    def _timesteps_per_group(
        self,
        timesteps: torch.Tensor,
        samples_ndim: int,
        batch: int,
        views: int,
        h: int,
        w: int,
        groups: int,
        tokens_per_group: int,
    ) -> tuple[torch.Tensor, int]:
        """Timesteps (B, G') and the group size: token n is conditioned on t[:, n // group_size].

        The release averages per-element timesteps over each patch in the timesteps' dtype
        (`patchify(timesteps).mean(-1)`), also for (B,) input, which it first broadcasts over the latent. A float32
        mean of equal values is not always that value, and the result depends on the layout, so this does the same:
        (B,) input is broadcast (the release's text-to-image call), (B, T) per-view input is laid out densely (what
        the release's img2img call builds). Both are constant within a view by construction, so they give one value
        per view without any host synchronisation. Per-element (B, T, C', h, w) input is averaged as given; when
        the result varies within a view (checked on the host), every token is its own group (group_size 1).
        """
        t = torch.as_tensor(timesteps, device=self.x_embedder.weight.device)
        if not t.is_floating_point():
            t = t.float()
        if t.ndim == 0:
            t = t.expand(batch)
        per_view = t.ndim in (1, 2)
        if t.ndim == 1:
            if t.shape[0] != batch:
                raise ValueError(f"timesteps (B,) must have B={batch} entries, got {t.shape[0]}")
            t = t[:, None, None, None, None].expand(batch, views, self.in_channels, h, w)
        elif t.ndim == 2:
            if tuple(t.shape) != (batch, views):
                raise ValueError(f"per-view timesteps must be (B, T) = {(batch, views)}, got {tuple(t.shape)}")
            t = t[:, :, None, None, None].expand(batch, views, self.in_channels, h, w).contiguous()
        elif t.ndim == 4 and samples_ndim == 4:
            t = t[:, None]
        if t.ndim != 5 or t.shape[:2] != (batch, views) or t.shape[-2:] != (h, w):
            raise ValueError(
                f"timesteps must be (B,), (B, T) or per element (B, T, C, h, w) = ({batch}, {views}, C, {h}, {w}), "
                f"got {tuple(t.shape)}"
            )
        t = pad_to_patch_multiple(t, self.patch_size[1], self.patch_size[2], mode="replicate")
        t_tokens = patchify(t, self.patch_size).mean(-1)  # (B, N), in the timesteps' dtype as the release
        t_grouped = t_tokens.view(batch, groups, tokens_per_group)
        if per_view or bool((t_grouped == t_grouped[..., :1]).all()):
            return t_grouped[..., 0], tokens_per_group
        return t_tokens, 1

    # ------------------------------------------------------------------ save / load

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """ConfigMixin's, without the release's EMA/JAX bookkeeping fields (diffusers would log each as unexpected)."""
        config_dict = {k: v for k, v in config_dict.items() if k not in RELEASE_ONLY_FIELDS}
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(
        self, save_directory, max_shard_size: int | str = "10GB", is_main_process: bool = True, **kwargs
    ) -> None:
        """Write config.json + diffusion_pytorch_model.safetensors (sharded with an index above max_shard_size)."""
        if kwargs.pop("safe_serialization", True) is not True:
            raise ValueError("NextDiT saves safetensors only (safe_serialization=False would write a pickle)")
        super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            safe_serialization=True,
            max_shard_size=max_shard_size,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        *,
        device: str | torch.device = "cpu",
        attn_impl: str = "auto",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> "NextDiT":
        """Load a local folder or a hub repo (e.g. "lehduong/OneDiffusion", subfolder="transformer").

        diffusers' ModelMixin.from_pretrained reads config.json (release-only fields are ignored) and the
        safetensors weights (single file or sharded with an index), after a strict key/shape check here from the
        files' headers (diffusers only warns about unexpected keys; this names every misfit); pickle checkpoints are
        refused. Parameters keep the file's values and are cast to `torch_dtype` (default float32).
        """
        folder = _resolve_model_folder(
            pretrained_model_name_or_path, subfolder, revision, cache_dir, local_files_only, token
        )
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {folder}: expected a NextDiT folder written by save_pretrained"
            )
        config = read_json_file(config_path, "the NextDiT config")
        class_name = config.get("_class_name", cls.__name__)
        if class_name != cls.__name__:
            raise ValueError(f"{config_path} describes a {class_name!r}, not a {cls.__name__!r}")
        config = {k: v for k, v in config.items() if not k.startswith("_")}

        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in cls(**config, attn_impl=attn_impl).state_dict().items()}
        _check_state_dict(expected, _safetensors_shapes(folder), folder)
        with named_load_errors(folder, "NextDiT weights"):
            model = super().from_pretrained(folder, torch_dtype=torch_dtype or torch.float32, use_safetensors=True,
                                            low_cpu_mem_usage=True, attn_impl=attn_impl)
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast, and there are none.
        return nn.Module.to(model, device=device) if torch.device(device).type != "cpu" else model


def _ignore_release_only_fields(fields: dict) -> None:
    unknown = sorted(k for k in fields if k not in RELEASE_ONLY_FIELDS and not k.startswith("_"))
    if unknown:
        warnings.warn(f"NextDiT ignores unknown config fields {unknown}", stacklevel=3)


def _masked_mean(text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of text (B, L, C) over valid tokens of mask (B, L) -> (B, C), in fp32 (fp64 for fp64 text)."""
    dtype = _norm_dtype(text)
    weights = mask[..., None].to(dtype)
    return (text.to(dtype) * weights).sum(dim=1) / (weights.sum(dim=1) + 1e-8)


def _rope_scaling(timesteps, scale_factor: float, scale_watershed: float) -> tuple[float, float]:
    """(theta, linear_factor) of the release's optional RoPE extrapolation; (10000, 1) when off.

    Position interpolation (frequencies / s) if max(t) < watershed, otherwise NTK (theta * s). The release
    compares the 0..1000-scale timestep with a watershed that defaults to 1.0, so NTK is what normally happens.
    """
    if scale_factor == 1.0 and scale_watershed == 1.0:
        return ROPE_THETA, 1.0
    if float(torch.as_tensor(timesteps).max()) < scale_watershed:
        return ROPE_THETA, scale_factor
    return ROPE_THETA * scale_factor, 1.0


def _resolve_model_folder(name_or_path, subfolder, revision, cache_dir, local_files_only, token) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist (subfolder={subfolder!r} of {path})")
        return folder
    prefix = f"{subfolder}/" if subfolder else ""
    snapshot = resolve_pretrained_folder(
        name_or_path,
        allow_patterns=[f"{prefix}{CONFIG_NAME}", f"{prefix}*.safetensors", f"{prefix}*.safetensors.index.json"],
        revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
    )
    return snapshot / subfolder if subfolder else snapshot


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors weights: the single file, or the shards its index names (in name order)."""
    single = folder / WEIGHTS_NAME
    index = folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json_file(index, "the safetensors index")["weight_map"]
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
    hint = f"; found pickle checkpoints {pickles}, never loaded (convert them to safetensors)" if pickles else ""
    hint += f"; found {others}: rename a single one to {WEIGHTS_NAME}" if others else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {folder}{hint}")


def weights_sha256(folder: Path) -> str:
    """sha256 of the folder's weight files' bytes in name order (for one file, what `sha256sum` prints): the
    identity of a LoRA adapter's base (model.lora)."""
    import hashlib

    digest = hashlib.sha256()
    for path in weight_files(folder):
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the weight files' headers (no tensor is read); an unreadable file raises a
    ValueError naming it."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        with named_load_errors(path, "NextDiT weights"), safe_open(path, framework="pt") as file:
            shapes.update({name: tuple(file.get_slice(name).get_shape()) for name in file.keys()})
    return shapes


def _check_state_dict(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key (expected, found: name -> shape)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = sorted(
        f"{name}: file {found[name]} vs model {expected[name]}"
        for name in set(expected) & set(found)
        if found[name] != expected[name]
    )
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mis_shaped:
            problems.append(f"shape mismatches {mis_shaped}")
        raise ValueError(f"weights in {source} do not match the NextDiT config: " + "; ".join(problems))
