"""Dual-source multi-head latent attention (DeepSeek-V2/V3 MLA) for the DSpark draft
(``--draft-attention mla``).

Same contract as :class:`~megaspark.models.dspark.attention.DualSourceAttention`: queries
come from the block rows only; keys and values come from ``[C; Y]`` (projected context,
then the normed block rows) through the *same* projections; the block mask of
DSPARK_SPEC.md §3.4 is applied by the same kernels (:func:`structured_block_attention` /
:func:`dense_mask_attention`, with ``nKV = heads``, ``g = 1``).

The maths is transformers' ``DeepseekV3Attention`` (HF tensor names in brackets)::

    q        = W_q x                       [q_proj]              (q_lora_rank = 0)
             = W_qb RMSNorm(W_qa x)        [q_a_proj, q_a_layernorm, q_b_proj]
    q_h      = [q_nope_h; q_pe_h]          per head, nope then rope dims
    [c; k_pe] = W_kva x                    [kv_a_proj_with_mqa]  latent c, one shared rope key
    c        = RMSNorm(c)                  [kv_a_layernorm]
    [k_nope_h; v_h] = W_kvb c              [kv_b_proj]           per head, nope then value dims
    k_h      = [k_nope_h; RoPE(k_pe)]      k_pe shared by all heads
    out      = W_o [softmax(q_h·k_h · s) v_h]_h                   [o_proj]

with DeepSeek's interleaved-pair RoPE on the rope dims only
(:func:`~megaspark.models.dspark.rope.apply_rope_interleaved`), and softmax scale
``s = (qk_nope + qk_rope)^-1/2``, times ``mscale²`` under YaRN
(:attr:`DSparkConfig.softmax_scale`).

Tensor parallelism
------------------
Heads are split over TP ranks. ``linear_q`` / ``linear_q_up_proj`` (HF ``q_proj`` /
``q_b_proj``), ``linear_kv_up_proj`` (``kv_b_proj``) are column-parallel and
``linear_proj`` (``o_proj``) row-parallel. Their HF layouts are head-major (each head's
``[nope; rope]`` or ``[k_nope; v]`` rows are contiguous), so a plain (stride-1) split
gives every rank whole heads and the global weights do not depend on the TP size. The
down-projections ``linear_q_down_proj`` / ``linear_kv_down_proj`` and the latent norms
``q_down_layernorm`` / ``kv_down_layernorm`` are small and replicated: plain torch
modules, initialised from the per-layer seeded CPU RNG, so identical on every rank.

Gradients of the replicated parameters are complete and identical on every rank without
any post-hoc reduction: the latents enter column-parallel linears, whose input mapping
all-reduces the gradient in backward; the shared rope key ``k_pe`` is consumed directly by
each rank's local heads, so it passes once through
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward).

Inference cache
---------------
:meth:`DualSourceMLA.forward_cached` caches, per layer, the *compressed* context: the normed
latent ``c`` ``[b, 1, T, kv_lora_rank]`` and the already-rotated shared key ``k_pe``
``[b, 1, T, qk_rope_head_dim]`` (keys ``"latent"`` / ``"k_pe"``, sequence on dim 2) — the
point of MLA: ``kv_lora_rank + qk_rope_head_dim`` numbers per position instead of
``heads·(qk + v)``. The block attends through the weight-absorbed form (as DeepSeek serves
it): ``q_nope_h`` is mapped into the latent space by ``kv_b_proj``'s key rows, scores are
``q̃_h·c + q_pe_h·k_pe``, and the attended latent goes through the value rows. This equals
the training form up to float rounding (tests/test_mla.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megaspark.models.dspark.attention import (
    AttentionInputs,
    append_to_cache,
    block_attention,
    dense_mask_attention,
)
from megaspark.models.dspark.rope import apply_rope_interleaved


@dataclass
class DualSourceMLASubmodules:
    linear_q: type = tensor_parallel.ColumnParallelLinear  # q_lora_rank = 0
    linear_q_up_proj: type = tensor_parallel.ColumnParallelLinear  # q_lora_rank > 0
    linear_kv_up_proj: type = tensor_parallel.ColumnParallelLinear
    linear_proj: type = tensor_parallel.RowParallelLinear
    latent_layernorm: Optional[type] = None  # default: megaspark's RMSNorm (computes in fp32)


class DualSourceMLA(MegatronModule):
    """Tensor-parallel dual-source multi-head latent attention (see the module docstring)."""

    def __init__(self, config, dspark_config, submodules: Optional[DualSourceMLASubmodules] = None,
                 input_size: Optional[int] = None):
        """``input_size``: width of the projections' input (default the hidden size; the
        Eagle3 draft's attention reads ``[embedding; hidden]``, twice as wide); the output
        projection always returns the hidden size."""
        super().__init__(config=config)
        from megaspark.models.dspark.norms import RMSNorm

        submodules = submodules or DualSourceMLASubmodules()
        d = dspark_config
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.dspark_config = d
        self.tp = tp
        self.heads_per_rank = config.num_attention_heads // tp
        self.q_lora_rank = d.q_lora_rank
        self.kv_lora_rank = d.kv_lora_rank
        self.nope_dim = d.qk_nope_head_dim
        self.rope_dim = d.qk_rope_head_dim
        self.v_dim = d.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.softmax_scale = d.softmax_scale
        self.backend = d.attention_backend
        self.chunk_blocks = d.attention_chunk_blocks
        H, nh, eps = config.hidden_size, config.num_attention_heads, config.layernorm_epsilon
        H_in = input_size or H
        norm_cls = submodules.latent_layernorm or RMSNorm

        def replicated_linear(n_in, n_out):
            layer = torch.nn.Linear(n_in, n_out, bias=False, dtype=config.params_dtype)
            with torch.no_grad():
                config.init_method(layer.weight)
            return layer

        def column(cls, n_in, n_out):
            return build_module(
                cls, n_in, n_out, config=config, init_method=config.init_method, gather_output=False,
                bias=False, skip_bias_add=False, is_expert=False,
            )

        # construction order fixes the seeded initialisation; keep it stable
        if self.q_lora_rank > 0:
            self.linear_q_down_proj = replicated_linear(H_in, self.q_lora_rank)
            self.q_down_layernorm = norm_cls(config, hidden_size=self.q_lora_rank, eps=eps)
            self.linear_q_up_proj = column(submodules.linear_q_up_proj, self.q_lora_rank, nh * self.qk_dim)
        else:
            self.linear_q = column(submodules.linear_q, H_in, nh * self.qk_dim)
        self.linear_kv_down_proj = replicated_linear(H_in, self.kv_lora_rank + self.rope_dim)
        self.kv_down_layernorm = norm_cls(config, hidden_size=self.kv_lora_rank, eps=eps)
        self.linear_kv_up_proj = column(submodules.linear_kv_up_proj, self.kv_lora_rank,
                                        nh * (self.nope_dim + self.v_dim))
        self.linear_proj = build_module(
            submodules.linear_proj, nh * self.v_dim, H, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=False, is_expert=False,
        )

    # ------------------------------------------------------------------ projections
    def _queries(self, x: torch.Tensor):
        """x [T, b, H] → (q_nope [b, nh, T, nope], q_pe [b, nh, T, rope]) for this rank's heads."""
        b = x.shape[1]
        if self.q_lora_rank > 0:
            q, _ = self.linear_q_up_proj(self.q_down_layernorm(self.linear_q_down_proj(x)))
        else:
            q, _ = self.linear_q(x)
        # (T positions in; all of them out under sequence parallelism, which gathers them)
        q = q.view(q.shape[0], b, self.heads_per_rank, self.qk_dim).permute(1, 2, 0, 3)
        return q[..., : self.nope_dim], q[..., self.nope_dim:]

    def _latent(self, x: torch.Tensor):
        """x [T, b, H] → (normed latent c [T, b, r], shared rope key k_pe [b, 1, T, rope],
        not yet rotated). Replicated over TP."""
        kv = self.linear_kv_down_proj(x)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_down_layernorm(latent), k_pe.permute(1, 0, 2).unsqueeze(1)

    def _up_weights(self):
        """kv_b_proj rows of this rank's heads: (W_uk [nh, nope, r], W_uv [nh, v, r])."""
        w = self.linear_kv_up_proj.weight.view(self.heads_per_rank, self.nope_dim + self.v_dim,
                                               self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """out [b, nh, T, v] → o_proj output [T, b, H]."""
        b, nh, T, v = out.shape
        out, _ = self.linear_proj(out.permute(2, 0, 1, 3).reshape(T, b, nh * v))
        return out

    # ------------------------------------------------------------------ training
    def forward(self, context: torch.Tensor, block: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """context [S, b, H] (projected C), block [N·B, b, H] (normed) → [N·B, b, H]."""
        S, b, _ = context.shape
        rows = block.shape[0]
        nh = self.heads_per_rank
        q_nope, q_pe = self._queries(block)
        latent, k_pe = self._latent(torch.cat([context, block], dim=0))
        if self.tp > 1:
            # every rank's heads read the one shared key: sum their gradients exactly once
            k_pe = tensor_parallel.copy_to_tensor_model_parallel_region(k_pe)
        kv, _ = self.linear_kv_up_proj(latent)
        kv = kv.view(S + rows, b, nh, self.nope_dim + self.v_dim).permute(1, 2, 0, 3)
        k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim:]
        k_pe = apply_rope_interleaved(k_pe, inputs.cos, inputs.sin)
        q_pe = apply_rope_interleaved(q_pe, inputs.cos[:, S:], inputs.sin[:, S:])
        k = torch.cat([k_nope, k_pe.expand(-1, nh, -1, -1)], dim=-1)  # [b, nh, S+rows, qk]
        q = torch.cat([q_nope, q_pe], dim=-1).unsqueeze(2)  # [b, nh, 1, rows, qk]
        out = block_attention(self.backend, q, k, v, inputs, S, self.chunk_blocks, scale=self.softmax_scale)
        return self._output(out[:, :, 0])

    # ------------------------------------------------------------------ inference
    def _compress(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, b, H] → (latent [b, 1, T, r], rotated k_pe [b, 1, T, rope]): what is cached."""
        latent, k_pe = self._latent(x)
        return latent.permute(1, 0, 2).unsqueeze(1), apply_rope_interleaved(k_pe, cos, sin)

    def forward_cached(self, context_new, block, ctx_cos, ctx_sin, blk_cos, blk_sin, cache: dict):
        """Inference (DSPARK_SPEC.md §7): append the compressed latent and rotated rope key of
        newly verified context rows to ``cache`` (they persist), then attend from the block to
        [cached context; block] with no mask, in the weight-absorbed form (module docstring).
        block [B, b, H] (normed) → [B, b, H]."""
        if context_new is not None and context_new.shape[0] > 0:
            lat_new, pe_new = self._compress(context_new, ctx_cos, ctx_sin)
            append_to_cache(cache, latent=lat_new, k_pe=pe_new)
        B, b, _ = block.shape
        q_nope, q_pe = self._queries(block)
        q_pe = apply_rope_interleaved(q_pe, blk_cos, blk_sin)
        lat, pe = self._compress(block, blk_cos, blk_sin)
        if "latent" in cache:
            lat = torch.cat([cache["latent"], lat], dim=2)
            pe = torch.cat([cache["k_pe"], pe], dim=2)
        w_uk, w_uv = self._up_weights()
        q_lat = torch.einsum("bhqn,hnr->bhqr", q_nope, w_uk.to(q_nope.dtype))
        # one shared "KV head" (the latent) for all query heads: nKV = 1, g = heads
        q_abs = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(1)  # [b, 1, nh, B, r+rope]
        k_abs = torch.cat([lat, pe], dim=-1)  # [b, 1, Tk, r+rope]
        allowed = torch.ones(b, B, k_abs.shape[2], dtype=torch.bool, device=block.device)
        out_lat = dense_mask_attention(q_abs, k_abs, lat, allowed, scale=self.softmax_scale)
        out = torch.einsum("bhqr,hvr->bhqv", out_lat[:, 0], w_uv.to(out_lat.dtype))
        return self._output(out)
