"""3-axis rotary position embedding of the OneDiffusion denoiser (spec §1.5), computed on the fly.

Every token has a position (view index, patch row, patch column). A head of `head_dim` real values is
`head_dim / 2` complex pairs, formed from interleaved elements (2i, 2i+1). The pairs are split into three equal
chunks of `head_dim / 6` pairs: the first rotates with the view index, the second with the row, the third with the
column. Each chunk uses the standard RoPE frequencies of a `head_dim / 3`-dimensional sub-space:
omega_k = theta ** (-6k / head_dim), k = 0 .. head_dim/6 - 1 (theta = 10000).

The release precomputes a 128 x 128 x 128 table (about 1 GB) on the CPU in float32: float32 frequencies, float32
angles position * omega, then exp(i * angle) in complex64. Here the angles are computed for just the positions in
the batch. For a float32 (or half) compute dtype they are the release's float32 angles exactly (same frequencies,
computed on the CPU, same float32 products), and their cos/sin are taken in float64 and rounded to float32: within
1 float32 ulp of the release's table (complex64 exp has its own last-bit rounding). For float64 (the reference
tests) everything is float64.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0
NUM_ROPE_AXES = 3  # view, row, column


def check_rope_head_dim(head_dim: int) -> None:
    """Raise if `head_dim` cannot be split into three equal chunks of complex pairs."""
    if head_dim % (2 * NUM_ROPE_AXES) != 0:
        raise ValueError(
            f"3-axis RoPE needs head_dim (hidden_size / num_heads) divisible by 6, got {head_dim}; "
            "pick hidden_size and num_heads so that head_dim is a multiple of 6 (the release uses 3840 / 32 = 120)"
        )


def rope_frequencies(
    head_dim: int,
    theta: float = ROPE_THETA,
    linear_factor: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(head_dim/6,) float64 angular frequencies of one axis: theta**(-6k/head_dim) / linear_factor."""
    check_rope_head_dim(head_dim)
    pairs_per_axis = head_dim // (2 * NUM_ROPE_AXES)
    exponent = torch.arange(pairs_per_axis, dtype=torch.float64, device=device) * (2 * NUM_ROPE_AXES) / head_dim
    return 1.0 / (theta**exponent) / linear_factor


def token_positions(num_views: int, rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """(num_views*rows*cols, 3) int64 positions (view, row, col), view-major then row then column."""
    view = torch.arange(num_views, device=device)
    row = torch.arange(rows, device=device)
    col = torch.arange(cols, device=device)
    grid = torch.meshgrid(view, row, col, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, NUM_ROPE_AXES)


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = ROPE_THETA,
    linear_factor: float = 1.0,
) -> torch.Tensor:
    """(N, head_dim/2) float64 rotation angles for (N, 3) positions; pair chunks ordered view, row, column."""
    freqs = rope_frequencies(head_dim, theta, linear_factor, device=positions.device)  # (head_dim/6,)
    angles = positions.to(torch.float64)[:, :, None] * freqs  # (N, 3, head_dim/6)
    return angles.reshape(positions.shape[0], head_dim // 2)


def release_rope_frequencies(head_dim: int, theta: float = ROPE_THETA, linear_factor: float = 1.0) -> torch.Tensor:
    """(head_dim/6,) float32 frequencies exactly as the release computes them (on the CPU, in float32)."""
    check_rope_head_dim(head_dim)
    pairs_per_axis = head_dim // (2 * NUM_ROPE_AXES)
    exponent = torch.arange(0, head_dim, 2 * NUM_ROPE_AXES, device="cpu")[:pairs_per_axis] / head_dim
    return (1.0 / (theta**exponent) / linear_factor).to(torch.float32)


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    theta: float = ROPE_THETA,
    linear_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (N, head_dim/2), in `dtype`.

    float64: analytic float64 angles. Otherwise the release's float32 angles (see the module docstring), whose
    cos/sin are evaluated in float64 and rounded to `dtype`.
    """
    if dtype == torch.float64:
        angles = rope_angles(positions, head_dim, theta, linear_factor)
    else:
        freqs = release_rope_frequencies(head_dim, theta, linear_factor).to(positions.device)
        angles32 = positions.to(torch.float32)[:, :, None] * freqs  # (N, 3, head_dim/6), float32 products
        angles = angles32.reshape(positions.shape[0], head_dim // 2).to(torch.float64)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, N, heads, head_dim) by angles (N, head_dim/2).

    The rotation runs in the dtype of `cos` (float32 in the fast path, as the release does) and the result is
    cast back to x's dtype.
    """
    B, N, H, D = x.shape
    pairs = x.to(cos.dtype).reshape(B, N, H, D // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]  # (B, N, H, D/2)
    cos = cos[None, :, None, :]  # (1, N, 1, D/2)
    sin = sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)  # (B, N, H, D/2, 2)
    return rotated.reshape(B, N, H, D).to(x.dtype)
