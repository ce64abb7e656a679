"""Rotary position embedding at explicit, non-contiguous positions.

The draft's key/value rows are ``[context 0..S-1; block rows a_j+k]`` (DSPARK_SPEC.md
§3.3), so cos/sin are gathered per position instead of sliced from a prefix. The
rotation is the HF "rotate_half" (non-interleaved) form, the one Llama/Qwen weights and
serving engines use.
"""

from __future__ import annotations

import torch


def inv_frequencies(head_dim: int, theta: float, scaling_factor: float = 1.0) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (theta**exponent) / scaling_factor).float()


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, scaling_factor: float = 1.0):
    """position_ids [b, T] -> (cos, sin) each [b, T, head_dim] in fp32."""
    inv = inv_frequencies(head_dim, theta, scaling_factor).to(position_ids.device)
    freqs = position_ids.to(torch.float32)[..., None] * inv  # [b, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, T, hd]; cos/sin [b, T, hd]. Computed in fp32, returned in x's dtype."""
    cos = cos[:, None]
    sin = sin[:, None]
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
