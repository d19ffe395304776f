"""Attention kernels of the OneDiffusion denoiser (spec §1.4).

Two different key/value head expansions are used by the released weights, and both matter for loading them:

* self-attention over image tokens: query head i uses KV head i // (heads / kv_heads) (repeat-interleave);
* text cross-attention: query head i uses text KV head i % kv_heads (tiling).

Self-attention logits are soft-capped: s -> softcap * tanh(s / softcap), softcap = 30, applied after the
1/sqrt(head_dim) scale. `softcap_self_attention` picks one of two paths that compute the same thing:

* "flex": `torch.nn.attention.flex_attention` with a softcap score_mod (compiled on GPU; eager on CPU, which works
  in forward only: FlexAttention has no CPU backward);
* "math": matmul -> softcap -> softmax -> matmul, which supports autograd everywhere (CPU training); for fp16/bf16
  inputs the logits are computed and capped in float32, as in the release's flash-attn kernel.

"auto" means flex on CUDA and math elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "flex", "math")
DEFAULT_SOFTCAP = 30.0


def check_attn_impl(attn_impl: str) -> str:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    return attn_impl


def resolve_attn_impl(attn_impl: str, device: torch.device) -> str:
    """The concrete path ("flex" or "math") for a requested `attn_impl` on `device`."""
    check_attn_impl(attn_impl)
    if attn_impl == "auto":
        return "flex" if device.type == "cuda" else "math"
    return attn_impl


_SCORE_MODS: dict[float, Callable] = {}
_COMPILED_FLEX: Callable | None = None


def softcap_score_mod(softcap: float) -> Callable:
    """FlexAttention score_mod s -> softcap * tanh(s / softcap); one function object per value (no recompiles)."""
    if softcap not in _SCORE_MODS:

        def score_mod(score, batch, head, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)

        _SCORE_MODS[softcap] = score_mod
    return _SCORE_MODS[softcap]


def _flex_attention_kernel(device: torch.device) -> Callable:
    """Eager flex_attention on CPU (compiling costs ~30 s there and the CPU kernel has no backward anyway) and
    inside an outer torch.compile (which fuses it); a compiled flex_attention otherwise."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device.type == "cpu" or torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def softcap_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softcap: float | None = DEFAULT_SOFTCAP,
    attn_impl: str = "auto",
) -> torch.Tensor:
    """Bidirectional GQA attention with logit soft-capping; KV heads expanded by repeat-interleave.

    q: (B, heads, N, head_dim); k, v: (B, kv_heads, N, head_dim). Returns (B, heads, N, head_dim).
    `softcap=None` disables the cap (the release's fp32 fallback; not how the weights were trained).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads != 0:
        raise ValueError(f"num_heads={heads} must be a multiple of num_kv_heads={kv_heads}")
    impl = resolve_attn_impl(attn_impl, q.device)
    if impl == "flex":
        flex = _flex_attention_kernel(q.device)
        score_mod = None if softcap is None else softcap_score_mod(float(softcap))
        return flex(q, k, v, score_mod=score_mod, enable_gqa=heads != kv_heads)

    # Like the release's flash kernel, half-precision q/k give float32 logits (fp32 products and accumulation, no
    # rounding of q or of the logits to bf16 before the cap and softmax); the probabilities go back to v's dtype.
    # Autocast is off in here, or it would turn the fp32 score matmul back into a bf16 one.
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k = q.float(), k.float()
    group = heads // kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, heads, N, head_dim)
        v = v.repeat_interleave(group, dim=1)
    # The 1/sqrt(head_dim) scale (and the 1/softcap inside tanh) is applied to q: N*d work instead of N*N.
    scale = 1.0 / math.sqrt(q.shape[-1])
    if softcap is not None:
        scale /= softcap
    with torch.autocast(q.device.type, enabled=False):
        scores = (q * scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        if softcap is not None:
            if scores.requires_grad:
                scores = torch.tanh(scores) * softcap
            else:
                scores = scores.tanh_().mul_(softcap)
        probs = scores.softmax(dim=-1).to(v.dtype)
        return probs @ v  # (B, heads, N, head_dim)


def tiled_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention from image queries to text keys; text KV heads expanded by tiling; no softcap.

    q: (B, heads, N, head_dim); k, v: (B, kv_heads, L, head_dim); key_mask: (B, L) bool, True = valid token.
    A sample without any valid text token gets a zero output (the release would produce NaN).
    Returns (B, heads, N, head_dim).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads != 0:
        raise ValueError(f"num_heads={heads} must be a multiple of num_kv_heads={kv_heads}")
    group = heads // kv_heads
    if group > 1:
        k = k.repeat(1, group, 1, 1)  # (B, heads, L, head_dim): head i <- text KV head i % kv_heads
        v = v.repeat(1, group, 1, 1)
    has_text = key_mask.any(dim=-1)  # (B,)
    safe_mask = key_mask | ~has_text[:, None]  # an all-padding row attends everywhere, then is zeroed
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe_mask[:, None, None, :])
    return out * has_text[:, None, None, None].to(out.dtype)
