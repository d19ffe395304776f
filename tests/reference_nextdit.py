"""Plain float64, per-token re-implementation of `NextDiT.forward`, written from the spec independently of it: the
tests' (and bench/bench_nextdit.py's) reference for the fast path. Test code, not part of the model package."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.attention import DEFAULT_SOFTCAP
from model.nextdit import TIMESTEP_FREQUENCY_DIM, NextDiT
from model.rope import ROPE_THETA

@torch.no_grad()
def reference_forward(
    model: NextDiT,
    samples: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    softcap: float | None = DEFAULT_SOFTCAP,
) -> torch.Tensor:
    """Plain float64, per-token re-implementation of `NextDiT.forward`, written from the spec independently of it.

    It reads the model's parameters by their official names and returns (B, T, out_channels, h, w) in float64.
    Slow and memory-hungry (full score matrices); for tests on tiny configs only.
    """
    f64 = torch.float64
    p = {name: t.detach().to(f64) for name, t in model.state_dict().items()}
    pT, pH, pW = model.patch_size
    D, H, Hkv, Dh = model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim
    eps = model.config.norm_eps
    qk_norm = model.config.qk_norm

    def linear(name, v):
        out = v @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    def layer_norm(v, name, eps_):
        centred = v - v.mean(-1, keepdim=True)
        out = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps_)
        return out * p[f"{name}.weight"] + p[f"{name}.bias"] if name else out

    def rms_norm(v, name):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps) * p[f"{name}.weight"]

    x = samples.to(f64)
    if x.ndim == 4:
        x = x[:, None]
    B, T, C, h, w = x.shape
    t = torch.as_tensor(timesteps).to(f64)
    if t.ndim == 0:
        t = t.expand(B)
    if t.ndim == 1:
        t = t[:, None, None, None, None].expand(B, T, 1, h, w)
    elif t.ndim == 2:
        t = t[:, :, None, None, None].expand(B, T, 1, h, w)
    elif t.ndim == 4:
        t = t[:, None]

    # Odd sizes: zero-pad the latents, edge-replicate the timesteps (bottom/right).
    Hp, Wp = -(-h // pH) * pH, -(-w // pW) * pW
    row_src = torch.arange(Hp).clamp(max=h - 1)
    col_src = torch.arange(Wp).clamp(max=w - 1)
    t = t[..., row_src, :][..., col_src]
    padded = torch.zeros(B, T, C, Hp, Wp, dtype=f64)
    padded[..., :h, :w] = x
    x = padded
    groups, rows, cols = T // pT, Hp // pH, Wp // pW
    N = groups * rows * cols

    def to_tokens(v):  # (B, T, C', Hp, Wp) -> (B, N, K*C'), features ordered (pt, ph, pw, c)
        pieces = [v[:, a::pT, :, b::pH, c::pW] for a in range(pT) for b in range(pH) for c in range(pW)]
        stacked = torch.stack(pieces, dim=-1)  # (B, G, C', rows, cols, K)
        return stacked.permute(0, 1, 3, 4, 5, 2).reshape(B, N, -1)

    tokens = to_tokens(x)  # (B, N, K*C)
    t_tok = to_tokens(t).mean(-1)  # (B, N)

    # Conditioning per token: timestep sinusoid (cos first) -> MLP, plus pooled text -> LN -> Linear.
    half = TIMESTEP_FREQUENCY_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=f64) / half)
    args = t_tok[..., None] * freqs
    t_emb = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", torch.cat([args.cos(), args.sin()], -1))))
    text = encoder_hidden_states.to(f64)
    L = text.shape[1]
    mask = torch.ones(B, L, dtype=torch.bool) if encoder_attention_mask is None else encoder_attention_mask != 0
    m = mask[..., None].to(f64)
    pooled = (text * m).sum(1) / (m.sum(1) + 1e-8)
    y_emb = linear("y_embedder.1", layer_norm(pooled, "y_embedder.0", 1e-6))
    c = t_emb + y_emb[:, None]  # (B, N, Cc)

    # RoPE: complex rotation per token; pairs [0, Dh/6) view, [Dh/6, Dh/3) row, [Dh/3, Dh/2) column.
    omega = 1.0 / (ROPE_THETA ** (torch.arange(0, Dh, 6, dtype=f64)[: Dh // 6] / Dh))
    n = torch.arange(N)
    view_idx, row_idx, col_idx = n // (rows * cols), (n // cols) % rows, n % cols
    cis = torch.cat(
        [torch.polar(torch.ones_like(omega), index[:, None].to(f64) * omega) for index in (view_idx, row_idx, col_idx)],
        dim=-1,
    )  # (N, Dh/2) complex128

    def rope(v):  # (B, N, heads, Dh)
        as_complex = torch.view_as_complex(v.reshape(*v.shape[:-1], Dh // 2, 2).contiguous())
        return torch.view_as_real(as_complex * cis[None, :, None, :]).reshape(v.shape)

    self_kv_head = torch.arange(H) // (H // Hkv)  # repeat-interleave
    text_kv_head = torch.arange(H) % Hkv  # tiling
    has_text = mask.any(-1)

    def attention(prefix, hx, text_normed):
        q = linear(f"{prefix}.wq", hx)
        k = linear(f"{prefix}.wk", hx)
        if qk_norm:
            q = layer_norm(q, f"{prefix}.q_norm", 1e-5)
            k = layer_norm(k, f"{prefix}.k_norm", 1e-5)
        q = rope(q.view(B, N, H, Dh))
        k = rope(k.view(B, N, Hkv, Dh))[:, :, self_kv_head]
        v = linear(f"{prefix}.wv", hx).view(B, N, Hkv, Dh)[:, :, self_kv_head]
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(Dh)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)

        ky = linear(f"{prefix}.wk_y", text_normed)
        if qk_norm:
            ky = layer_norm(ky, f"{prefix}.ky_norm", 1e-6)
        ky = ky.view(B, L, Hkv, Dh)[:, :, text_kv_head]
        vy = linear(f"{prefix}.wv_y", text_normed).view(B, L, Hkv, Dh)[:, :, text_kv_head]
        sy = torch.einsum("bnhd,blhd->bhnl", q, ky) / math.sqrt(Dh)
        sy = sy.masked_fill(~mask[:, None, None, :], float("-inf"))
        ay = torch.where(has_text[:, None, None, None], sy.softmax(-1), 0.0)
        out_y = torch.einsum("bhnl,blhd->bnhd", ay, vy)
        out = out + out_y * torch.tanh(p[f"{prefix}.gate"])[None, None, :, None]
        return linear(f"{prefix}.wo", out.reshape(B, N, H * Dh))

    hidden = linear("x_embedder", tokens)
    for i in range(len(model.layers)):
        pre = f"layers.{i}"
        s_msa, g_msa, s_mlp, g_mlp = linear(f"{pre}.adaLN_modulation.1", F.silu(c)).chunk(4, -1)
        hx = rms_norm(hidden, f"{pre}.attention_norm1") * (1 + s_msa)
        attn = attention(f"{pre}.attention", hx, rms_norm(text, f"{pre}.attention_y_norm"))
        hidden = hidden + torch.tanh(g_msa) * rms_norm(attn, f"{pre}.attention_norm2")
        hx = rms_norm(hidden, f"{pre}.ffn_norm1") * (1 + s_mlp)
        swiglu = F.silu(linear(f"{pre}.feed_forward.w1", hx)) * linear(f"{pre}.feed_forward.w3", hx)
        ff = linear(f"{pre}.feed_forward.w2", swiglu)
        hidden = hidden + torch.tanh(g_mlp) * rms_norm(ff, f"{pre}.ffn_norm2")

    scale = linear("final_layer.adaLN_modulation.1", F.silu(c))
    out_tokens = linear("final_layer.linear", layer_norm(hidden, None, 1e-6) * (1 + scale))  # (B, N, K*Cout)

    Cout = model.out_channels
    per_offset = out_tokens.view(B, groups, rows, cols, pT * pH * pW, Cout)
    out = torch.zeros(B, T, Cout, Hp, Wp, dtype=f64)
    k = 0
    for a in range(pT):
        for b in range(pH):
            for cc in range(pW):
                out[:, a::pT, :, b::pH, cc::pW] = per_offset[..., k, :].permute(0, 1, 4, 2, 3)
                k += 1
    return out[..., :h, :w]
