"""HF (DeepSpec-native, DSPARK_SPEC.md §9.1) names ↔ megaspark parameters, declaratively.

Each :class:`Mapping` names one megaspark parameter (relative to the model, ``{i}`` = the
*global* layer number) and the HF tensor(s) it holds. A fused megaspark parameter (``[k; v]``
or ``[gate; up]``) lists several HF tensors that are concatenated along dim 0 in the
*global* (unsharded) layout.

Tensor-parallel sharding is read from the attributes megatron puts on every parallel
parameter (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``): rank r of
tp holds chunks ``r, r+tp, …`` of the global tensor split into ``stride·tp`` pieces. So
``shard`` / ``unshard`` work for plain column/row/vocab-parallel and for stride-2 fused
weights alike, and the global tensors do not depend on the TP size.

The MLA draft (:mod:`.mla`) maps to DeepSeek-V3's names: ``q_a_proj``, ``q_a_layernorm``,
``q_b_proj`` (or ``q_proj`` without query compression), ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``. Its replicated down-projections and latent
norms carry no TP attributes (every rank holds the full tensor); ``kv_b_proj`` and
``q_b_proj`` are plain column-parallel (whole heads per rank).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Mapping:
    local: str  # megaspark parameter name, may contain {i}
    hf: tuple  # HF names (concatenated along dim 0 when more than one)


MAPPINGS = (
    Mapping("embedding.weight", ("embed_tokens.weight",)),
    Mapping("fc.weight", ("fc.weight",)),
    Mapping("hidden_norm.weight", ("hidden_norm.weight",)),
    Mapping("layers.{i}.input_layernorm.weight", ("layers.{i}.input_layernorm.weight",)),
    Mapping("layers.{i}.self_attention.linear_q.weight", ("layers.{i}.self_attn.q_proj.weight",)),
    Mapping("layers.{i}.self_attention.linear_q.bias", ("layers.{i}.self_attn.q_proj.bias",)),
    Mapping(
        "layers.{i}.self_attention.linear_kv.weight",
        ("layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.v_proj.weight"),
    ),
    Mapping(
        "layers.{i}.self_attention.linear_kv.bias",
        ("layers.{i}.self_attn.k_proj.bias", "layers.{i}.self_attn.v_proj.bias"),
    ),
    Mapping("layers.{i}.self_attention.q_layernorm.weight", ("layers.{i}.self_attn.q_norm.weight",)),
    Mapping("layers.{i}.self_attention.k_layernorm.weight", ("layers.{i}.self_attn.k_norm.weight",)),
    Mapping("layers.{i}.self_attention.linear_proj.weight", ("layers.{i}.self_attn.o_proj.weight",)),
    # MLA (DeepSeek-V3 names; linear_q / linear_proj above are q_proj / o_proj there too)
    Mapping("layers.{i}.self_attention.linear_q_down_proj.weight", ("layers.{i}.self_attn.q_a_proj.weight",)),
    Mapping("layers.{i}.self_attention.q_down_layernorm.weight",
            ("layers.{i}.self_attn.q_a_layernorm.weight",)),
    Mapping("layers.{i}.self_attention.linear_q_up_proj.weight", ("layers.{i}.self_attn.q_b_proj.weight",)),
    Mapping("layers.{i}.self_attention.linear_kv_down_proj.weight",
            ("layers.{i}.self_attn.kv_a_proj_with_mqa.weight",)),
    Mapping("layers.{i}.self_attention.kv_down_layernorm.weight",
            ("layers.{i}.self_attn.kv_a_layernorm.weight",)),
    Mapping("layers.{i}.self_attention.linear_kv_up_proj.weight", ("layers.{i}.self_attn.kv_b_proj.weight",)),
    Mapping("layers.{i}.pre_mlp_layernorm.weight", ("layers.{i}.post_attention_layernorm.weight",)),
    Mapping(
        "layers.{i}.mlp.linear_fc1.weight",
        ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
    ),
    Mapping("layers.{i}.mlp.linear_fc2.weight", ("layers.{i}.mlp.down_proj.weight",)),
    Mapping("final_layernorm.weight", ("norm.weight",)),
    Mapping("output_layer.weight", ("lm_head.weight",)),
    Mapping("markov_head.markov_w1.weight", ("markov_head.markov_w1.weight",)),
    Mapping("markov_head.markov_w2.weight", ("markov_head.markov_w2.weight",)),
    Mapping("markov_head.gate_proj.weight", ("markov_head.gate_proj.weight",)),
    Mapping("markov_head.gate_proj.bias", ("markov_head.gate_proj.bias",)),
    Mapping("markov_head.joint_proj.weight", ("markov_head.joint_proj.weight",)),
    Mapping("markov_head.joint_proj.bias", ("markov_head.joint_proj.bias",)),
    Mapping("confidence_head.proj.weight", ("confidence_head.proj.weight",)),
    Mapping("confidence_head.proj.bias", ("confidence_head.proj.bias",)),
)


def _compile(template: str):
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_COMPILED = [(m, _compile(m.local)) for m in MAPPINGS]


def local_layer_to_global(model, name: str) -> tuple[Mapping, Optional[int]]:
    for mapping, pattern in _COMPILED:
        match = pattern.match(name)
        if match:
            if "{i}" in mapping.local:
                return mapping, int(match.group(1)) + model.layer_offset
            return mapping, None
    raise KeyError(f"no HF mapping for megaspark parameter '{name}'")


def _tp_info(param):
    if getattr(param, "tensor_model_parallel", False):
        return int(param.partition_dim), int(getattr(param, "partition_stride", 1))
    return None, 1


def shard(full: torch.Tensor, dim: Optional[int], stride: int, rank: int, size: int) -> torch.Tensor:
    if dim is None or size == 1:
        return full
    pieces = torch.chunk(full, stride * size, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)


def unshard(local_shards: list, dim: Optional[int], stride: int) -> torch.Tensor:
    if dim is None or len(local_shards) == 1:
        return local_shards[0]
    split = [torch.chunk(t, stride, dim=dim) for t in local_shards]
    return torch.cat([split[r][s] for s in range(stride) for r in range(len(local_shards))], dim=dim)


def _tp():
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group(),
    )


@torch.no_grad()
def hf_state_dict(model, include_frozen: bool = True, grads: bool = False) -> dict:
    """Global HF-named tensors of the parameters this pipeline stage holds (or of their
    gradients, with ``grads``; parameters without one are skipped). Collective over the
    tensor-parallel group: every TP rank gets the full tensors."""
    rank, size, group = _tp()
    out = {}
    for name, param in model.named_parameters():
        mapping, layer = local_layer_to_global(model, name)
        if not include_frozen and mapping.local in ("embedding.weight", "output_layer.weight"):
            continue
        if grads:
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is None:
                continue
            source = grad
        else:
            source = param
        dim, stride = _tp_info(param)
        local = source.detach().contiguous()
        if dim is not None and size > 1:
            shards = [torch.empty_like(local) for _ in range(size)]
            torch.distributed.all_gather(shards, local, group=group)
            full = unshard(shards, dim, stride)
        else:
            full = local.clone()
        hf_names = [n.replace("{i}", str(layer)) for n in mapping.hf]
        if len(hf_names) == 1:
            out[hf_names[0]] = full
        else:
            for hf_name, piece in zip(hf_names, torch.chunk(full, len(hf_names), dim=0)):
                out[hf_name] = piece.clone()
    return out


@torch.no_grad()
def load_hf_state_dict(model, state: dict, strict: bool = True) -> list:
    """Copy this rank's shards of HF-named global tensors into the model. With ``strict``,
    every parameter must be provided with the right shape. Returns the HF keys used."""
    rank, size, _ = _tp()
    used = []
    for name, param in model.named_parameters():
        mapping, layer = local_layer_to_global(model, name)
        hf_names = [n.replace("{i}", str(layer)) for n in mapping.hf]
        missing = [n for n in hf_names if n not in state]
        if missing:
            if strict:
                raise KeyError(f"missing tensor(s) {missing} for parameter '{name}'")
            continue
        full = torch.cat([state[n] for n in hf_names], dim=0) if len(hf_names) > 1 else state[hf_names[0]]
        dim, stride = _tp_info(param)
        local = shard(full, dim, stride, rank, size)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(
                f"'{'+'.join(hf_names)}' has global shape {tuple(full.shape)}, which does not "
                f"fit parameter '{name}' of local shape {tuple(param.shape)} at TP={size}"
            )
        param.copy_(local.to(param.dtype))
        used.extend(hf_names)
    return used
