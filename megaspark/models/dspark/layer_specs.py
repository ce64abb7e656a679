"""Layer specs: which implementation backs each submodule of a draft layer.

Megatron-style: the model is written once against submodule slots, and a spec chooses
the classes. ``local`` uses megatron-core's tensor-parallel linears and megaspark's
RMSNorm (CPU and GPU). The Transformer Engine spec plugs in here.
"""

from __future__ import annotations

from megatron.core import tensor_parallel

from megaspark.models.dspark.attention import DualSourceAttentionSubmodules
from megaspark.models.dspark.layer import DSparkLayerSubmodules
from megaspark.models.dspark.norms import HeadRMSNorm, RMSNorm


def get_local_layer_spec(qk_norm: bool, attention_type: str = "gqa") -> DSparkLayerSubmodules:
    """The local spec; ``attention_type="mla"`` fills the attention slot with the MLA
    submodules (:mod:`megaspark.models.dspark.mla`; ``qk_norm`` does not apply to MLA)."""
    if attention_type == "mla":
        from megaspark.models.dspark.mla import DualSourceMLASubmodules

        return DSparkLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=DualSourceMLASubmodules(
                linear_q=tensor_parallel.ColumnParallelLinear,
                linear_q_up_proj=tensor_parallel.ColumnParallelLinear,
                linear_kv_up_proj=tensor_parallel.ColumnParallelLinear,
                linear_proj=tensor_parallel.RowParallelLinear,
                latent_layernorm=RMSNorm,
            ),
            pre_mlp_layernorm=RMSNorm,
        )
    return DSparkLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=DualSourceAttentionSubmodules(
            linear_q=tensor_parallel.ColumnParallelLinear,
            linear_kv=tensor_parallel.ColumnParallelLinear,
            linear_proj=tensor_parallel.RowParallelLinear,
            q_layernorm=HeadRMSNorm if qk_norm else None,
            k_layernorm=HeadRMSNorm if qk_norm else None,
        ),
        pre_mlp_layernorm=RMSNorm,
    )
