"""The draft's RMSNorms: the hidden-state norm (fp32 compute, HF Llama/Qwen semantics) and the
per-head q/k norm of Qwen3-style attention, with their tensor/sequence-parallel gradient rules."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel


class RMSNorm(torch.nn.Module):
    """RMSNorm computed in fp32 (HF Llama/Qwen semantics), weight initialised to 1.

    Marks its weight ``sequence_parallel`` so megatron all-reduces its gradient across
    TP ranks when sequence parallelism shards the rows it sees.
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        dtype = getattr(config, "params_dtype", None) or torch.float32
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        if config is not None:
            setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class HeadRMSNorm(RMSNorm):
    """Per-head RMSNorm for q/k (Qwen3). Its weight is replicated over TP but each rank
    applies it to its own heads only, so its gradient is a partial sum per rank; the
    weight enters through ``copy_to_tensor_model_parallel_region`` (backward all-reduce)
    so every rank holds the full gradient without a post-hoc reduction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            weight = tensor_parallel.copy_to_tensor_model_parallel_region(weight)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * weight.float()).to(x.dtype)
