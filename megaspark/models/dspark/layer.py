"""One DSpark draft layer and the RMSNorm it uses (DSPARK_SPEC.md §2.3 step 2).

The layer takes the stage's hidden tensor ``[S + N·B, b, H]`` — the projected context C
in the first S rows, the block rows X after them — and returns the same layout with only
X updated. Its attention is the dual-source GQA block (:mod:`.attention`) or, with
``attention_type == "mla"``, DeepSeek's multi-head latent attention (:mod:`.mla`).
Carrying C inside the hidden tensor is what lets the layers be split across pipeline
stages: C simply travels with the activations (DESIGN.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megaspark.models.dspark.attention import (
    AttentionInputs,
    DualSourceAttention,
    DualSourceAttentionSubmodules,
)
from megaspark.models.dspark.norms import RMSNorm


@dataclass
class DSparkLayerSubmodules:
    input_layernorm: type = RMSNorm
    self_attention: DualSourceAttentionSubmodules = field(default_factory=DualSourceAttentionSubmodules)
    pre_mlp_layernorm: type = RMSNorm
    mlp: ModuleSpec = field(
        default_factory=lambda: ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=tensor_parallel.ColumnParallelLinear,
                linear_fc2=tensor_parallel.RowParallelLinear,
            ),
        )
    )


def mla_submodules(spec):
    """The MLA submodules for a layer spec's attention slot: an MLA spec as is; the local GQA
    spec (megatron's plain parallel linears) maps to the local MLA spec. Anything else (the
    Transformer Engine spec) is refused, naming the flags."""
    from megaspark.config import MLA_NEEDS_LOCAL_SPEC, ConfigError
    from megaspark.models.dspark.mla import DualSourceMLASubmodules

    if isinstance(spec, DualSourceMLASubmodules):
        return spec
    local = (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)
    if isinstance(spec, DualSourceAttentionSubmodules) and (spec.linear_q, spec.linear_proj) == local:
        return DualSourceMLASubmodules()
    raise ConfigError(MLA_NEEDS_LOCAL_SPEC)


class DSparkLayer(MegatronModule):
    def __init__(self, config, dspark_config, submodules: DSparkLayerSubmodules, layer_number: int):
        super().__init__(config=config)
        self.layer_number = layer_number  # global, 0-based
        eps = config.layernorm_epsilon
        self.input_layernorm = build_module(
            submodules.input_layernorm, config=config, hidden_size=config.hidden_size, eps=eps
        )
        if dspark_config.attention_type == "mla":
            from megaspark.models.dspark.mla import DualSourceMLA

            self.self_attention = DualSourceMLA(
                config, dspark_config, mla_submodules(submodules.self_attention))
        else:
            self.self_attention = DualSourceAttention(config, dspark_config, submodules.self_attention)
        self.pre_mlp_layernorm = build_module(
            submodules.pre_mlp_layernorm, config=config, hidden_size=config.hidden_size, eps=eps
        )
        self.mlp = build_module(submodules.mlp, config=config, ffn_hidden_size=config.ffn_hidden_size)

    def forward(self, hidden: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        S = inputs.seq_len
        context, x = hidden[:S], hidden[S:]
        x = x + self.self_attention(context, self.input_layernorm(x), inputs)
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(x))
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        x = x + mlp_out
        return torch.cat([context, x], dim=0)

    def forward_cached(self, context_new, x, rope: dict, cache: dict) -> torch.Tensor:
        """Inference: block rows x [B, b, H] with this layer's context K/V cache."""
        x = x + self.self_attention.forward_cached(
            context_new, self.input_layernorm(x), rope["ctx_cos"], rope["ctx_sin"],
            rope["blk_cos"], rope["blk_sin"], cache,
        )
        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(x))
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        return x + mlp_out
