"""Dual-source block attention of the DSpark draft (DSPARK_SPEC.md §2.3, §3.4).

Queries come from the block rows only; keys and values come from ``[C; Y]`` (projected
context, then the block rows) through the *same* projections. During training block j
may see context keys ``0 … a_j−1`` and the B rows of its own block, nothing else.

Interchangeable core-attention implementations (``--draft-attention-backend``; ``auto``
takes FlexAttention on a GPU and the chunked SDPA kernel elsewhere):

* :func:`sdpa_block_attention` (CPU default): per chunk of blocks, one
  ``scaled_dot_product_attention`` call (PyTorch's fused kernel: no score tensor in the
  autograd graph, GQA without repeating K/V) over ``[context prefix; the chunk's blocks]``
  with a small boolean mask (prefix ``< a_j``, own block only).
* :func:`flex_block_attention`: one FlexAttention call with a ``BlockMask`` (GPU default).
* :func:`structured_block_attention` never builds the ``[N·B, S+N·B]`` mask.
  Each block's scores are ``[B, a_j]`` against a context *prefix* plus ``[B, B]`` against
  its own block, softmaxed jointly. Blocks are processed in chunks whose context is cut
  at the chunk's longest prefix, so with sorted anchors the work on the context is about
  half of the dense mask's and the cross-block ``N·B × N·B`` part disappears.
* :func:`dense_mask_attention` is the literal dense-mask formulation, kept as the
  reference and as the benchmark baseline.

All return the same values (rows with no visible key — dummy blocks — give 0).
All take an explicit softmax ``scale`` (default ``hd^-1/2``) and a value width that may
differ from the query/key width, so the MLA draft (:mod:`.mla`, ``nKV = heads``, ``g = 1``)
uses them unchanged. The module :class:`DualSourceAttention` holds the tensor-parallel
projections of the GQA draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megaspark.models.dspark.rope import apply_rope


def _masked_fill_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def structured_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_lengths: torch.Tensor,
    block_size: int,
    seq_len: int,
    chunk_blocks: int = 64,
    scale: Optional[float] = None,
    block_context_max: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """q [b, nKV, g, N·B, hd]; k [b, nKV, S+N·B, hd]; v [b, nKV, S+N·B, hd_v] (the value
    width may differ, e.g. MLA); context_lengths [b, N] (a_j for kept blocks, 0 for dummies);
    ``scale`` defaults to ``hd^-1/2``. Returns [b, nKV, g, N·B, hd_v].

    ``block_context_max`` (N host ints, the largest a_j of each block index over the batch)
    sizes every chunk without reading ``context_lengths`` back from the device; without it
    each chunk costs one host synchronisation."""
    b, nkv, g, rows, hd = q.shape
    hd_v = v.shape[-1]
    B = block_size
    N = rows // B
    S = seq_len
    scale = hd**-0.5 if scale is None else scale
    k_ctx, k_blk = k[:, :, :S], k[:, :, S:].reshape(b, nkv, N, B, hd)
    v_ctx, v_blk = v[:, :, :S], v[:, :, S:].reshape(b, nkv, N, B, hd_v)
    qb = q.reshape(b, nkv, g, N, B, hd)
    fill = _masked_fill_value(torch.float32)
    outs = []
    for start in range(0, N, chunk_blocks):
        stop = min(N, start + chunk_blocks)
        lens = context_lengths[:, start:stop]  # [b, n]
        if block_context_max is not None:
            ctx_len = max(block_context_max[start:stop], default=0)
        else:
            ctx_len = int(lens.max().item()) if lens.numel() else 0
        q_c = qb[:, :, :, start:stop].float()  # [b, kv, g, n, B, hd]
        # own-block scores [b, kv, g, n, B, B]
        s_blk = torch.einsum("bkgnqd,bknpd->bkgnqp", q_c, k_blk[:, :, start:stop].float()) * scale
        parts = [s_blk]
        if ctx_len > 0:
            kc = k_ctx[:, :, :ctx_len].float()
            s_ctx = torch.einsum("bkgnqd,bkpd->bkgnqp", q_c, kc) * scale  # [b,kv,g,n,B,ctx]
            pos = torch.arange(ctx_len, device=q.device)
            ctx_ok = pos[None, None, :] < lens[:, :, None]  # [b, n, ctx]
            s_ctx = s_ctx.masked_fill(~ctx_ok[:, None, None, :, None, :], fill)
            parts.insert(0, s_ctx)
        scores = torch.cat(parts, dim=-1)
        probs = torch.softmax(scores, dim=-1)
        p_blk = probs[..., -B:]
        out = torch.einsum("bkgnqp,bknpd->bkgnqd", p_blk, v_blk[:, :, start:stop].float())
        if ctx_len > 0:
            p_ctx = probs[..., :-B]
            out = out + torch.einsum("bkgnqp,bkpd->bkgnqd", p_ctx, v_ctx[:, :, :ctx_len].float())
        outs.append(out)
    out = torch.cat(outs, dim=3) if outs else q.new_zeros(b, nkv, g, 0, B, hd_v)
    return out.reshape(b, nkv, g, rows, hd_v).to(q.dtype)


def structured_attention_with_keep(q, k, v, context_lengths, keep, block_size, seq_len, chunk_blocks=64,
                                   scale: Optional[float] = None, block_context_max=None):
    out = structured_block_attention(q, k, v, context_lengths, block_size, seq_len, chunk_blocks, scale,
                                     block_context_max)
    row_keep = keep.repeat_interleave(block_size, dim=1)  # [b, N·B]
    return out * row_keep[:, None, None, :, None].to(out.dtype)


def dense_mask_attention(q, k, v, allowed: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """q [b, nKV, g, Tq, hd]; k [b, nKV, Tk, hd]; v [b, nKV, Tk, hd_v]; allowed Bool
    [b, Tq, Tk] (True = visible); ``scale`` defaults to ``hd^-1/2``. Rows with no visible key
    return 0. Returns [b, nKV, g, Tq, hd_v]."""
    hd = q.shape[-1]
    scale = hd**-0.5 if scale is None else scale
    scores = torch.einsum("bkgqd,bkpd->bkgqp", q.float(), k.float()) * scale
    scores = scores.masked_fill(~allowed[:, None, None], _masked_fill_value(torch.float32))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgqp,bkpd->bkgqd", probs, v.float())
    any_visible = allowed.any(dim=-1)  # [b, Tq]
    return (out * any_visible[:, None, None, :, None]).to(q.dtype)


def sdpa_block_attention(q, k, v, context_lengths, keep, block_size: int, seq_len: int, chunk_blocks: int = 16,
                         scale: Optional[float] = None, block_context_max: Optional[Sequence[int]] = None):
    """The block attention by ``scaled_dot_product_attention``, ``chunk_blocks`` blocks per
    call: keys ``[context 0 … L−1; the chunk's n·B block rows]`` with L the chunk's longest
    context (``block_context_max``, host ints; without it one host read per chunk), and a
    boolean mask ``[b, 1, n·B, L + n·B]`` (context key < a_j, or a key of the row's own
    block). Every row sees its own block, so no row is fully masked; rows of dummy blocks
    are zeroed afterwards. In the inputs' dtype; shapes as :func:`structured_block_attention`,
    ``keep`` [b, N] bool."""
    import torch.nn.functional as F

    b, nkv, g, rows, hd = q.shape
    hd_v = v.shape[-1]
    B, S = block_size, seq_len
    N = rows // B
    qb = q.reshape(b, nkv * g, N, B, hd)
    dev = q.device
    own = torch.arange(chunk_blocks * B, device=dev) // B
    outs = []
    for start in range(0, N, chunk_blocks):
        stop = min(N, start + chunk_blocks)
        n = stop - start
        lens = context_lengths[:, start:stop]  # [b, n]
        if block_context_max is not None:
            L = max(block_context_max[start:stop], default=0)
        else:
            L = int(lens.max().item()) if lens.numel() else 0
        blk = slice(S + start * B, S + stop * B)
        kc = torch.cat([k[:, :, :L], k[:, :, blk]], dim=2)
        vc = torch.cat([v[:, :, :L], v[:, :, blk]], dim=2)
        ctx_ok = torch.arange(L, device=dev)[None, None, :] < lens[:, :, None]  # [b, n, L]
        ctx_ok = ctx_ok.repeat_interleave(B, dim=1)  # [b, n·B, L]
        blk_ok = (own[:n * B, None] == own[None, :n * B]).expand(b, -1, -1)
        mask = torch.cat([ctx_ok, blk_ok], dim=-1)[:, None]
        out = F.scaled_dot_product_attention(qb[:, :, start:stop].reshape(b, nkv * g, n * B, hd), kc, vc,
                                             attn_mask=mask, scale=scale, enable_gqa=g > 1)
        outs.append(out.reshape(b, nkv, g, n, B, hd_v))
    out = torch.cat(outs, dim=3) if outs else q.new_zeros(b, nkv, g, 0, B, hd_v)
    row_keep = keep.repeat_interleave(B, dim=1)  # [b, N·B]
    return out.reshape(b, nkv, g, rows, hd_v) * row_keep[:, None, None, :, None].to(out.dtype)


_COMPILED_FLEX = None


def _flex_attention_fn(device: torch.device):
    """FlexAttention: compiled on a GPU (its fused kernel), eager elsewhere (a reference
    implementation; forward only on the CPU)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_block_attention(q, k, v, context_lengths, keep, block_size: int, seq_len: int,
                         scale: Optional[float] = None) -> torch.Tensor:
    """The block attention as one FlexAttention call with a ``BlockMask`` built from the
    anchors: query row ``j·B + k`` sees context keys ``< a_j`` and the keys of its own kept
    block (rows of dummy blocks see nothing and give 0). Runs in the inputs' dtype (no fp32
    copies of q/k/v) and reads nothing back to the host. Shapes as
    :func:`structured_block_attention`; ``keep`` [b, N] bool."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, nkv, g, rows, hd = q.shape
    B, S = block_size, seq_len
    ctx, kept = context_lengths, keep.bool()

    def mask_mod(bi, hi, qi, ki):
        j = qi // B
        return (ki < ctx[bi, j]) | ((ki >= S) & ((ki - S) // B == j) & kept[bi, j])

    mask = create_block_mask(mask_mod, B=b, H=None, Q_LEN=rows, KV_LEN=S + rows, device=q.device)
    out = _flex_attention_fn(q.device)(q.reshape(b, nkv * g, rows, hd), k, v, block_mask=mask,
                                       scale=scale, enable_gqa=g > 1)
    return out.reshape(b, nkv, g, rows, v.shape[-1])


def block_attention(backend: str, q, k, v, inputs, seq_len: int, chunk_blocks: int,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Dispatch to the block-attention kernel of ``backend`` (``auto``: flex on CUDA, sdpa
    elsewhere). ``inputs``: the layer's :class:`AttentionInputs`."""
    if backend == "auto":
        backend = "flex" if q.device.type == "cuda" else "sdpa"
    if backend == "sdpa":
        return sdpa_block_attention(q, k, v, inputs.context_lengths, inputs.keep, inputs.block_size, seq_len,
                                    chunk_blocks, scale=scale, block_context_max=inputs.block_context_max)
    if backend == "dense":
        return dense_mask_attention(q, k, v, inputs.dense_mask, scale=scale)
    if backend == "flex":
        return flex_block_attention(q, k, v, inputs.context_lengths, inputs.keep, inputs.block_size,
                                    seq_len, scale=scale)
    return structured_attention_with_keep(q, k, v, inputs.context_lengths, inputs.keep, inputs.block_size,
                                          seq_len, chunk_blocks, scale=scale,
                                          block_context_max=inputs.block_context_max)


def append_to_cache(cache: dict, **new: torch.Tensor) -> None:
    """Append newly verified context rows (dim 2 = positions) to an inference cache."""
    for name, t in new.items():
        cache[name] = torch.cat([cache[name], t], dim=2) if name in cache else t


@dataclass
class DualSourceAttentionSubmodules:
    linear_q: type = tensor_parallel.ColumnParallelLinear
    linear_kv: type = tensor_parallel.ColumnParallelLinear
    linear_proj: type = tensor_parallel.RowParallelLinear
    q_layernorm: Optional[ModuleSpec] = None
    k_layernorm: Optional[ModuleSpec] = None


@dataclass
class AttentionInputs:
    """Per-micro-batch tensors every draft layer needs (computed once per stage)."""

    cos: torch.Tensor  # [b, S+N·B, hd]
    sin: torch.Tensor
    context_lengths: torch.Tensor  # [b, N]
    keep: torch.Tensor  # [b, N] bool
    seq_len: int
    block_size: int
    dense_mask: Optional[torch.Tensor] = None  # [b, N·B, S+N·B] (dense backend only)
    block_context_max: Optional[tuple] = None  # N host ints: max_b a_j (no device read-back)


class DualSourceAttention(MegatronModule):
    """Tensor-parallel dual-source attention: heads (and KV groups) split across TP ranks,
    ``linear_proj`` row-parallel, exactly like Megatron's self-attention."""

    def __init__(self, config, dspark_config, submodules: DualSourceAttentionSubmodules):
        super().__init__(config=config)
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.dspark_config = dspark_config
        self.head_dim = config.kv_channels
        self.heads_per_rank = config.num_attention_heads // tp
        self.groups_per_rank = config.num_query_groups // tp
        self.backend = dspark_config.attention_backend
        self.chunk_blocks = dspark_config.attention_chunk_blocks
        q_width = config.num_attention_heads * self.head_dim
        kv_width = config.num_query_groups * self.head_dim
        self.linear_q = build_module(
            submodules.linear_q, config.hidden_size, q_width, config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_qkv_bias,
            skip_bias_add=False, is_expert=False,
        )
        # [k; v] fused; stride 2 keeps each rank's shard = [its k heads; its v heads], so
        # the global weight is the same at any TP size (as Megatron does for SwiGLU fc1).
        self.linear_kv = build_module(
            submodules.linear_kv, config.hidden_size, 2 * kv_width, config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_qkv_bias,
            skip_bias_add=False, is_expert=False, stride=2,
        )
        self.q_layernorm = (
            build_module(submodules.q_layernorm, hidden_size=self.head_dim, config=config,
                         eps=config.layernorm_epsilon)
            if submodules.q_layernorm is not None else None
        )
        self.k_layernorm = (
            build_module(submodules.k_layernorm, hidden_size=self.head_dim, config=config,
                         eps=config.layernorm_epsilon)
            if submodules.k_layernorm is not None else None
        )
        self.linear_proj = build_module(
            submodules.linear_proj, q_width, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=False, is_expert=False,
        )

    def _project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [T, b, H] → rotated k, v [b, nkv, T, hd] (this rank's KV heads)."""
        T, b, _ = x.shape
        kv, _ = self.linear_kv(x)
        kv = kv.view(T, b, 2, self.groups_per_rank, self.head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if self.k_layernorm is not None:
            k = self.k_layernorm(k)
        k = apply_rope(k.permute(1, 2, 0, 3), cos, sin)
        return k, v.permute(1, 2, 0, 3)

    def forward_cached(self, context_new, block, ctx_cos, ctx_sin, blk_cos, blk_sin, cache: dict):
        """Inference (DSPARK_SPEC.md §7): append the K/V of newly verified context rows to
        ``cache`` (they persist), then attend from the block to [cached context; block]
        with no mask — every cached position precedes the anchor and the block is
        bidirectional. block [B, b, H] (normed) → [B, b, H]."""
        if context_new is not None and context_new.shape[0] > 0:
            k_new, v_new = self._project_kv(context_new, ctx_cos, ctx_sin)
            append_to_cache(cache, k=k_new, v=v_new)
        B, b, _ = block.shape
        hd, nq, nkv = self.head_dim, self.heads_per_rank, self.groups_per_rank
        q, _ = self.linear_q(block)
        q = q.view(B, b, nq, hd)
        if self.q_layernorm is not None:
            q = self.q_layernorm(q)
        q = apply_rope(q.permute(1, 2, 0, 3), blk_cos, blk_sin).reshape(b, nkv, nq // nkv, B, hd)
        k_blk, v_blk = self._project_kv(block, blk_cos, blk_sin)
        k = torch.cat([cache["k"], k_blk], dim=2) if "k" in cache else k_blk
        v = torch.cat([cache["v"], v_blk], dim=2) if "v" in cache else v_blk
        allowed = torch.ones(b, B, k.shape[2], dtype=torch.bool, device=block.device)
        out = dense_mask_attention(q, k, v, allowed)
        out = out.reshape(b, nq, B, hd).permute(2, 0, 1, 3).reshape(B, b, nq * hd)
        out, _ = self.linear_proj(out)
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Checkpoint the fused ``[k; v]`` projection as two separately sharded halves (as
        megatron does for SwiGLU's fc1), so checkpoints reshard across TP sizes."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        singleton = (metadata or {}).get("singleton_local_shards", False)
        for key in (f"{prefix}linear_kv.weight", f"{prefix}linear_kv.bias"):
            if key in sharded:
                sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded

    def forward(self, context: torch.Tensor, block: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """context [S, b, H] (projected C), block [N·B, b, H] (normed) → [N·B, b, H]."""
        S, b, _ = context.shape
        rows = block.shape[0]
        hd, nq, nkv = self.head_dim, self.heads_per_rank, self.groups_per_rank
        q, _ = self.linear_q(block)
        kv, _ = self.linear_kv(torch.cat([context, block], dim=0))
        q = q.view(rows, b, nq, hd)
        kv = kv.view(S + rows, b, 2, nkv, hd)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if self.q_layernorm is not None:
            q = self.q_layernorm(q)
        if self.k_layernorm is not None:
            k = self.k_layernorm(k)
        q = q.permute(1, 2, 0, 3)  # [b, nq, rows, hd]
        k = k.permute(1, 2, 0, 3)  # [b, nkv, S+rows, hd]
        v = v.permute(1, 2, 0, 3)
        k = apply_rope(k, inputs.cos, inputs.sin)
        q = apply_rope(q, inputs.cos[:, S:], inputs.sin[:, S:])
        q = q.reshape(b, nkv, nq // nkv, rows, hd)
        out = block_attention(self.backend, q, k, v, inputs, S, self.chunk_blocks)
        out = out.reshape(b, nq, rows, hd).permute(2, 0, 1, 3).reshape(rows, b, nq * hd)
        out, _ = self.linear_proj(out)
        return out
