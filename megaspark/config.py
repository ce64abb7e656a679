"""DSparkConfig: the draft's shape (derived from the target's HF config) and the algorithm.

One dataclass carries everything the model, the block construction and the losses need.
It is built once from the target config plus user overrides, validated as a whole
(:meth:`DSparkConfig.validate`) before any weights are touched, and saved with every
checkpoint and export. :meth:`DSparkConfig.transformer_config` translates it to
megatron-core's ``TransformerConfig`` for the parallel layers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

# Families whose decoder block the draft reproduces (pre-norm RMSNorm, GQA, RoPE, SwiGLU).
# value: (per-head q/k RMSNorm, q/k/v projection bias default)
SUPPORTED_FAMILIES = {
    "llama": (False, None),
    "mistral": (False, None),
    "qwen2": (False, True),
    "qwen3": (True, None),
}
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
CONVENTIONS = ("S", "D")
ATTENTION_BACKENDS = ("structured", "dense")
SUPPORTED_ROPE_TYPES = ("default", "linear")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending flag/field."""


@dataclass
class DSparkConfig:
    # ---- draft shape (hidden size and vocab must equal the target's) ----
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    qk_norm: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    # ---- target ----
    target_model_type: str = "llama"
    num_target_layers: int = 0
    target_layer_ids: list = field(default_factory=list)
    # ---- DSpark algorithm (DSPARK_SPEC.md §3-§6; defaults are DeepSpec's) ----
    block_size: int = 7
    num_anchors: int = 512
    mask_token_id: int = 0
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    confidence_head: bool = True
    confidence_with_markov: bool = True
    gamma: Optional[float] = 4.0
    convention: str = "S"
    truncate_eval_mask: bool = True
    alpha_ce: float = 0.1
    alpha_l1: float = 0.9
    alpha_conf: float = 1.0
    # ---- implementation ----
    attention_backend: str = "structured"
    attention_chunk_blocks: int = 64
    loss_chunk_rows: int = 1024
    init_std: float = 0.02

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def context_width(self) -> int:
        """Input width of the context projector ``fc``: L·H."""
        return len(self.target_layer_ids) * self.hidden_size

    @property
    def has_markov(self) -> bool:
        return self.markov_rank > 0

    @property
    def drafts_per_block(self) -> int:
        return self.block_size if self.convention == "S" else self.block_size - 1

    # ------------------------------------------------------------------ validation
    def validate(self, tensor_model_parallel_size: int = 1) -> "DSparkConfig":
        """Raise :class:`ConfigError` naming the flag for anything that cannot work."""
        tp = tensor_model_parallel_size
        _check(self.num_layers >= 1, "--num-layers must be >= 1")
        _check(self.hidden_size >= 1, "hidden size must be positive")
        _check(self.num_attention_heads >= 1, "--num-attention-heads must be >= 1")
        _check(
            self.num_query_groups >= 1 and self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({self.num_query_groups})",
        )
        _check(self.kv_channels % 2 == 0, f"--kv-channels ({self.kv_channels}) must be even for RoPE")
        _check(tp >= 1, "--tensor-model-parallel-size must be >= 1")
        for name, flag, value in (
            ("attention heads", "--num-attention-heads", self.num_attention_heads),
            ("KV heads", "--num-query-groups", self.num_query_groups),
            ("vocabulary size", "target vocab_size", self.vocab_size),
            ("FFN width", "--ffn-hidden-size", self.ffn_hidden_size),
        ):
            _check(
                value % tp == 0,
                f"{name} ({flag} = {value}) is not divisible by --tensor-model-parallel-size {tp}",
            )
        _check(
            self.target_model_type in SUPPORTED_FAMILIES,
            f"unsupported target family '{self.target_model_type}'; supported: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}",
        )
        validate_target_layer_ids(self.target_layer_ids, self.num_target_layers)
        _check(self.block_size >= 1, "--block-size must be >= 1")
        _check(
            self.convention in CONVENTIONS,
            f"--slot-convention must be one of {CONVENTIONS}, got {self.convention!r}",
        )
        _check(
            self.convention == "S" or self.block_size >= 2,
            "--block-size must be >= 2 with --slot-convention D (slot 0 is the anchor)",
        )
        _check(self.num_anchors >= 1, "--num-anchors must be >= 1")
        _check(
            0 <= self.mask_token_id < self.vocab_size,
            f"--mask-token-id {self.mask_token_id} is outside the target vocabulary "
            f"[0, {self.vocab_size})",
        )
        _check(self.markov_rank >= 0, "--markov-rank must be >= 0")
        _check(
            self.markov_head_type in MARKOV_HEAD_TYPES,
            f"--markov-head-type must be one of {MARKOV_HEAD_TYPES}, got {self.markov_head_type!r}",
        )
        _check(
            not (self.confidence_head and self.confidence_with_markov and self.markov_rank == 0),
            "the confidence head with Markov features needs --markov-rank > 0; "
            "use --confidence-without-markov or set --markov-rank",
        )
        for flag, value in (
            ("--ce-loss-alpha", self.alpha_ce),
            ("--l1-loss-alpha", self.alpha_l1),
            ("--confidence-loss-alpha", self.alpha_conf),
        ):
            _check(value >= 0 and math.isfinite(value), f"{flag} must be a finite value >= 0")
        _check(
            self.alpha_ce + self.alpha_l1 + (self.alpha_conf if self.confidence_head else 0) > 0,
            "all loss alphas are zero: nothing to train",
        )
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"--draft-attention-backend must be one of {ATTENTION_BACKENDS}",
        )
        _check(self.attention_chunk_blocks >= 1, "--attention-chunk-blocks must be >= 1")
        _check(self.loss_chunk_rows >= 1, "--loss-chunk-rows must be >= 1")
        _check(self.rope_scaling_factor > 0, "RoPE scaling factor must be positive")
        return self

    # ------------------------------------------------------------------ megatron
    def transformer_config(
        self,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        sequence_parallel: bool = False,
        params_dtype=None,
        bf16: bool = False,
        use_cpu_initialization: Optional[bool] = None,
        **extra: Any,
    ):
        """The megatron-core ``TransformerConfig`` for the draft's parallel layers."""
        import torch
        import torch.nn.functional as F
        from megatron.core.transformer import TransformerConfig

        from megaspark import platform

        if use_cpu_initialization is None:
            # CPU initialisation draws the full master weight once and splits it, so
            # every TP layout starts from the same global weights.
            use_cpu_initialization = True
        init = _normal_init(self.init_std)
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.attention_bias,
            # megaspark's own HeadRMSNorm reduces its gradient over TP; megatron's flag
            # would make finalize_model_grads reduce it a second time.
            qk_layernorm=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method=init,
            output_layer_init_method=init,
            init_method_std=self.init_std,
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            sequence_parallel=sequence_parallel,
            params_dtype=params_dtype or (torch.bfloat16 if bf16 else torch.float32),
            bf16=bf16,
            use_cpu_initialization=use_cpu_initialization,
            masked_softmax_fusion=False,
            bias_dropout_fusion=False,
            bias_activation_fusion=False,
            gradient_accumulation_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            pipeline_dtype=params_dtype or (torch.bfloat16 if bf16 else torch.float32),
            deallocate_pipeline_outputs=platform.gpu_available(),
            **extra,
        )

    # ------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DSparkConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown DSpark config fields: {sorted(unknown)}")
        return cls(**d)

    def shape_signature(self) -> dict:
        """Fields that must match for a checkpoint to load into this model."""
        keys = (
            "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
            "kv_channels", "ffn_hidden_size", "vocab_size", "qk_norm", "attention_bias",
            "target_layer_ids", "num_target_layers", "block_size", "markov_rank",
            "markov_head_type", "confidence_head", "confidence_with_markov", "convention",
            "target_model_type",
        )
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------ from target
    @classmethod
    def from_hf_config(
        cls,
        hf_config,
        *,
        num_layers: Optional[int] = None,
        num_attention_heads: Optional[int] = None,
        num_query_groups: Optional[int] = None,
        kv_channels: Optional[int] = None,
        ffn_hidden_size: Optional[int] = None,
        target_layer_ids: Optional[list] = None,
        num_target_taps: int = 5,
        **algorithm: Any,
    ) -> "DSparkConfig":
        """Derive the draft from the target's HF (text) config, with Megatron-style overrides.

        The draft copies the target's hidden size, vocabulary, norms and RoPE. Its
        attention shape is the target's unless the target's head counts are odd (e.g.
        SmolLM2-135M: 9 heads / 3 KV heads), which no tensor-parallel size > 1 could
        split; then a TP-friendly shape of the same hidden size is chosen (see
        :func:`tp_friendly_attention_shape`). The choice never depends on the TP size,
        so every parallel layout trains the same model.
        """
        cfg = getattr(hf_config, "text_config", None) or hf_config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"unsupported target family '{model_type}'; supported: "
                f"{', '.join(sorted(SUPPORTED_FAMILIES))}"
            )
        qk_norm, bias_default = SUPPORTED_FAMILIES[model_type]
        hidden = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        if num_attention_heads is None and num_query_groups is None and kv_channels is None:
            heads, kv_heads, head_dim = tp_friendly_attention_shape(hidden, heads, kv_heads, head_dim)
        else:
            if kv_channels is None and num_attention_heads is not None:
                if (heads * head_dim) % num_attention_heads == 0:
                    head_dim = heads * head_dim // num_attention_heads
            heads = num_attention_heads or heads
            head_dim = kv_channels or head_dim
            if num_query_groups is None:
                ratio = max(1, int(getattr(cfg, "num_attention_heads")) // max(1, kv_heads))
                kv_heads = max(1, heads // ratio) if heads % ratio == 0 else heads
            else:
                kv_heads = num_query_groups
        n_target = int(cfg.num_hidden_layers)
        layer_ids = list(target_layer_ids) if target_layer_ids is not None else default_target_layer_ids(
            n_target, num_target_taps
        )
        theta, factor = _rope_params(cfg)
        attention_bias = getattr(cfg, "attention_bias", None)
        if attention_bias is None:
            attention_bias = bool(bias_default)
        return cls(
            hidden_size=hidden,
            num_layers=num_layers if num_layers is not None else 5,
            num_attention_heads=heads,
            num_query_groups=kv_heads,
            kv_channels=head_dim,
            ffn_hidden_size=ffn_hidden_size or int(cfg.intermediate_size),
            vocab_size=int(cfg.vocab_size),
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling_factor=factor,
            qk_norm=qk_norm,
            attention_bias=bool(attention_bias),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 4096)),
            target_model_type=model_type,
            num_target_layers=n_target,
            target_layer_ids=layer_ids,
            **algorithm,
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _normal_init(std: float):
    import torch

    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def _rope_params(cfg) -> tuple[float, float]:
    """(theta, linear scaling factor) from a transformers 4.x or 5.x config."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        rope_type = params.get("rope_type", params.get("type", "default"))
        factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    else:
        theta = float(getattr(cfg, "rope_theta", 10000.0))
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        factor = float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"target RoPE type '{rope_type}' is not supported by the draft yet; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, factor


def tp_friendly_attention_shape(hidden: int, heads: int, kv_heads: int, head_dim: int):
    """Keep the target's (heads, kv_heads, head_dim) if both head counts are even;
    otherwise choose the head dim (a multiple of 8 dividing ``hidden``) closest to the
    target's for which ``hidden / head_dim`` is even, and the smallest even KV-head count
    dividing the new head count that keeps at least the target's query/KV ratio.

    SmolLM2-135M (576, 9, 3, 64) → (8, 4, 72).
    """
    if heads % 2 == 0 and kv_heads % 2 == 0:
        return heads, kv_heads, head_dim
    ratio = max(1, heads // max(1, kv_heads))
    best = None
    for hd in range(8, hidden + 1, 8):
        if hidden % hd or (hidden // hd) % 2:
            continue
        key = (abs(hd - head_dim), -hd)
        if best is None or key < best[0]:
            best = (key, hd)
    if best is None:
        raise ConfigError(
            f"cannot find a tensor-parallel friendly attention shape for hidden size {hidden}; "
            "set --num-attention-heads, --num-query-groups and --kv-channels explicitly"
        )
    hd = best[1]
    new_heads = hidden // hd
    kv = next(
        d for d in range(2, new_heads + 1, 2) if new_heads % d == 0 and d >= new_heads / ratio
    )
    return new_heads, kv, hd


def default_target_layer_ids(num_target_layers: int, n: int) -> list:
    """DFlash's default taps (DSPARK_SPEC.md §1.2): n=1 → [N//2]; else evenly 1…N−3.
    (The rule lives in :mod:`megaspark.targets.base`; here its errors name the flags.)"""
    from megaspark.targets import base

    try:
        return base.default_target_layer_ids(num_target_layers, n)
    except ValueError as e:
        raise ConfigError(f"--num-target-taps / --target-layer-ids: {e}") from None


def validate_target_layer_ids(ids, num_target_layers: int) -> None:
    """Layer id k = output of target decoder layer k = HF hidden_states[k+1] (DESIGN.md
    decision 2); valid ids lie in [0, N−2]. Errors name ``--target-layer-ids``."""
    from megaspark.targets import base

    try:
        base.validate_target_layer_ids(list(ids), num_target_layers)
    except ValueError as e:
        raise ConfigError(f"--target-layer-ids: {e}") from None
