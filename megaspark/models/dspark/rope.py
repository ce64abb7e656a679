"""Rotary position embedding at explicit, non-contiguous positions.

The draft's key/value rows are ``[context 0..S-1; block rows a_j+k]`` (DSPARK_SPEC.md
§3.3), so cos/sin are gathered per position instead of sliced from a prefix. The
rotation is the HF "rotate_half" (non-interleaved) form, the one Llama/Qwen weights and
serving engines use.

Frequencies: the default ``1/θ^(2i/d)``, optionally divided by a linear scaling factor,
or YaRN (``rope_type: "yarn"``, as transformers' ``_compute_yarn_parameters``: a ramp
between interpolated and extrapolated frequencies, cos/sin multiplied by the attention
factor). The MLA draft uses the interleaved-pair layout of DeepSeek
(:func:`apply_rope_interleaved`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def inv_frequencies(head_dim: int, theta: float, scaling_factor: float = 1.0) -> torch.Tensor:
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (theta**exponent) / scaling_factor).float()


def yarn_inv_frequencies(head_dim: int, theta: float, yarn: dict) -> torch.Tensor:
    """YaRN frequencies for ``yarn`` as resolved by :func:`megaspark.config.yarn_parameters`:
    dims rotating fewer than ``beta_slow`` times over the original context are interpolated
    (divided by ``factor``), those rotating more than ``beta_fast`` times are kept, with a
    linear ramp between."""
    factor = float(yarn["factor"])
    orig = float(yarn["original_max_position_embeddings"])

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn["beta_fast"]), correction_dim(yarn["beta_slow"])
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    extrapolated = 1.0 / theta**exponent
    interpolated = extrapolated / factor
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: extrapolate (high-frequency dims), 0: interpolate
    return (interpolated * (1 - keep) + extrapolated * keep).float()


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, scaling_factor: float = 1.0,
                 yarn: Optional[dict] = None):
    """position_ids [b, T] -> (cos, sin) each [b, T, head_dim] in fp32 (times YaRN's
    attention factor when ``yarn`` is given)."""
    if yarn is not None:
        inv = yarn_inv_frequencies(head_dim, theta, yarn).to(position_ids.device)
    else:
        inv = inv_frequencies(head_dim, theta, scaling_factor).to(position_ids.device)
    freqs = position_ids.to(torch.float32)[..., None] * inv  # [b, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if yarn is not None:
        factor = float(yarn["attention_factor"])
        cos, sin = cos * factor, sin * factor
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, T, hd]; cos/sin [b, T, hd]. Computed in fp32, returned in x's dtype."""
    cos = cos[:, None]
    sin = sin[:, None]
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved-pair RoPE: dims ``(2i, 2i+1)`` rotate together by frequency i.

    x [b, heads, T, d]; cos/sin [b, T, d] (``cat(freqs, freqs)`` as from :func:`rope_cos_sin`).
    Like transformers' ``apply_rotary_pos_emb_interleave`` the result comes out
    de-interleaved (``[rotated even dims; rotated odd dims]``): queries and keys get the same
    permutation, so every q·k equals the one of the in-place pair rotation.
    """
    return apply_rope(torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1), cos, sin)
