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

from megaspark import layer_ids as layer_id_rules
from megaspark.layer_ids import DEFAULT_NUM_TAPS
from megaspark.blocks import CONVENTIONS

# Families whose decoder block the draft reproduces (pre-norm RMSNorm, GQA or MLA, RoPE,
# SwiGLU). value: (the family's own blocks have per-head q/k RMSNorms: what an imported
# export that does not say is assumed to have; q/k/v projection bias default). New drafts
# have q/k norms whatever the family (DSparkConfig.from_hf_config).
SUPPORTED_FAMILIES = {
    "llama": (False, None),
    "mistral": (False, None),
    "qwen2": (False, True),
    "qwen3": (True, None),
    "deepseek_v2": (False, None),
    "deepseek_v3": (False, None),
}
# Targets with multi-head latent attention: their draft defaults to --draft-attention mla
# with the target's latent dims (and the dense layers' SwiGLU width).
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
ATTENTION_BACKENDS = ("auto", "sdpa", "structured", "flex", "dense")
ATTENTION_TYPES = ("gqa", "mla")
TRAINING_MODES = ("standard", "vp_drafter")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
DEFAULT_LOSS_CHUNK_ROWS = 512  # rows per chunk of the vocab-parallel loss (--loss-chunk-rows)
MLA_FLAGS = {
    "q_lora_rank": "--q-lora-rank",
    "kv_lora_rank": "--kv-lora-rank",
    "qk_nope_head_dim": "--qk-nope-head-dim",
    "qk_rope_head_dim": "--qk-rope-head-dim",
    "v_head_dim": "--v-head-dim",
}


#: The one refusal of MLA under Transformer Engine (the TE spec covers the GQA draft only)
MLA_NEEDS_LOCAL_SPEC = ("--draft-attention mla is implemented for --transformer-impl local only; "
                        "--transformer-impl transformer_engine covers the GQA draft (use "
                        "--transformer-impl local)")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending flag/field."""


class AttentionShape:
    """Derived attention dimensions shared by the draft configs (DSpark's and Eagle3's), from
    their fields ``attention_type``, ``kv_channels``, ``qk_nope_head_dim``,
    ``qk_rope_head_dim``, ``v_head_dim`` and ``rope_yarn``."""

    @property
    def is_mla(self) -> bool:
        return self.attention_type == "mla"

    @property
    def rope_head_dim(self) -> int:
        """Rotary dimension: the whole head (GQA) or ``qk_rope_head_dim`` (MLA)."""
        return self.qk_rope_head_dim if self.is_mla else self.kv_channels

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width entering the dot product."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.kv_channels

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.is_mla else self.kv_channels

    @property
    def softmax_scale(self) -> float:
        """Attention scale: ``qk_head_dim^-1/2``; for MLA with YaRN times ``mscale²`` with
        ``mscale = 0.1·mscale_all_dim·ln(factor) + 1`` (transformers' DeepSeek-V2/V3
        ``yarn_apply_mscale``). GQA keeps ``hd^-1/2`` under YaRN (Llama/Qwen semantics:
        YaRN's attention factor scales cos/sin instead)."""
        scale = self.qk_head_dim**-0.5
        if self.is_mla and self.rope_yarn and self.rope_yarn.get("mscale_all_dim"):
            m = yarn_get_mscale(self.rope_yarn["factor"], self.rope_yarn["mscale_all_dim"])
            scale = scale * m * m
        return scale

    def validate_attention(self, tp: int) -> None:
        """The attention and tensor-parallel rules every draft config shares (DSpark's and
        Eagle3's fields ``num_attention_heads``, ``num_query_groups``, ``ffn_hidden_size`` and
        the MLA dims); raises :class:`ConfigError` naming the flag."""
        _check(self.num_attention_heads >= 1, "--num-attention-heads must be >= 1")
        _check(
            self.num_query_groups >= 1 and self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads ({self.num_attention_heads}) must be a multiple of "
            f"--num-query-groups ({self.num_query_groups})",
        )
        _check(
            self.attention_type in ATTENTION_TYPES,
            f"--draft-attention must be one of {ATTENTION_TYPES}, got {self.attention_type!r}",
        )
        if self.is_mla:
            self._validate_mla_shape()
        else:
            _check(self.kv_channels % 2 == 0, f"--kv-channels ({self.kv_channels}) must be even for RoPE")
            given = [flag for attr, flag in MLA_FLAGS.items() if getattr(self, attr)]
            _check(not given, f"{', '.join(given)} only apply to --draft-attention mla")
        if self.rope_yarn is not None:
            _check(
                isinstance(self.rope_yarn, dict) and set(YARN_KEYS) <= set(self.rope_yarn)
                and float(self.rope_yarn["factor"]) > 0,
                f"rope_yarn must be a dict with {YARN_KEYS} and factor > 0 "
                "(see megaspark.config.yarn_parameters)",
            )
        _check(tp >= 1, "--tensor-model-parallel-size must be >= 1")
        for name, flag, value in (
            ("attention heads", "--num-attention-heads", self.num_attention_heads),
            ("KV heads", "--num-query-groups", self.num_query_groups),
            ("FFN width", "--ffn-hidden-size", self.ffn_hidden_size),
        ):
            _check(
                value % tp == 0,
                f"{name} ({flag} = {value}) is not divisible by --tensor-model-parallel-size {tp}",
            )

    def _validate_mla_shape(self) -> None:
        _check(self.kv_lora_rank > 0, f"--kv-lora-rank must be > 0 for --draft-attention mla, "
                                      f"got {self.kv_lora_rank}")
        _check(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"--qk-rope-head-dim must be even and > 0 for --draft-attention mla (RoPE rotates "
            f"pairs), got {self.qk_rope_head_dim}",
        )
        _check(self.qk_nope_head_dim >= 0, f"--qk-nope-head-dim must be >= 0, got {self.qk_nope_head_dim}")
        _check(self.v_head_dim > 0,
               f"--v-head-dim must be > 0 for --draft-attention mla, got {self.v_head_dim}")
        _check(self.q_lora_rank >= 0, f"--q-lora-rank must be >= 0 (0: no query compression), "
                                      f"got {self.q_lora_rank}")
        _check(
            self.num_query_groups == self.num_attention_heads,
            f"--draft-attention mla has no KV groups: --num-query-groups ({self.num_query_groups}) "
            f"must equal --num-attention-heads ({self.num_attention_heads})",
        )
        _check(
            self.kv_channels == self.qk_rope_head_dim,
            f"with --draft-attention mla, kv_channels (HF head_dim, {self.kv_channels}) is the rotary "
            f"head dim and must equal --qk-rope-head-dim ({self.qk_rope_head_dim})",
        )


@dataclass
class DSparkConfig(AttentionShape):
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
    # ---- training mode (§10): "vp_drafter" shows a sampled prefix of real tokens per block ----
    training_mode: str = "standard"
    prefix_weight_base: float = 0.9
    # ---- draft attention: "gqa" (the target's block) or "mla" (DeepSeek-V3 latent attention) ----
    # For "mla" (models/dspark/mla.py) num_query_groups == num_attention_heads and kv_channels
    # (HF "head_dim") == qk_rope_head_dim, the rotary dim, as in transformers' DeepseekV3Config;
    # the GQA-only q/k norms and biases are off. For "gqa" the five MLA dims are 0.
    attention_type: str = "gqa"
    q_lora_rank: int = 0  # mla: 0 = queries projected directly (HF q_proj), no low-rank compression
    kv_lora_rank: int = 0  # mla: width of the compressed KV latent (kv_a_proj_with_mqa)
    qk_nope_head_dim: int = 0  # mla: per-head query/key dims without RoPE
    qk_rope_head_dim: int = 0  # mla: per-head query dims with RoPE (the key part is shared)
    v_head_dim: int = 0  # mla: per-head value dim
    # YaRN RoPE (rope_type "yarn"), resolved by :func:`yarn_parameters`: factor,
    # original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim,
    # attention_factor (cos/sin multiplier), truncate. None: no YaRN.
    rope_yarn: Optional[dict] = None
    # ---- implementation ----
    attention_backend: str = "auto"  # auto: flex on CUDA, sdpa elsewhere
    attention_chunk_blocks: int = 16  # blocks per sdpa / structured kernel call
    loss_chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS
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
        self.validate_attention(tp)
        if self.is_mla:
            _check(not self.qk_norm, "--draft-attention mla has no per-head q/k norms (qk_norm must be off)")
            _check(not self.attention_bias, "--draft-attention mla has no projection biases "
                                            "(attention_bias must be off)")
        _check(
            self.vocab_size % tp == 0,
            f"vocabulary size (target vocab_size = {self.vocab_size}) is not divisible by "
            f"--tensor-model-parallel-size {tp}",
        )
        _check(
            self.target_model_type in SUPPORTED_FAMILIES,
            f"unsupported target family '{self.target_model_type}'; supported: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}",
        )
        validate_target_layer_ids(self.target_layer_ids, self.num_target_layers)
        check_algorithm(self.block_size, self.num_anchors, self.markov_rank, self.confidence_head,
                        self.confidence_with_markov, self.convention, self.training_mode,
                        self.prefix_weight_base)
        _check(
            0 <= self.mask_token_id < self.vocab_size,
            f"--mask-token-id {self.mask_token_id} is outside the target vocabulary "
            f"[0, {self.vocab_size})",
        )
        _check(
            self.markov_head_type in MARKOV_HEAD_TYPES,
            f"--markov-head-type must be one of {MARKOV_HEAD_TYPES}, got {self.markov_head_type!r}",
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
            "target_model_type", "attention_type", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
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
        num_target_taps: int = DEFAULT_NUM_TAPS,
        attention_type: Optional[str] = None,
        q_lora_rank: Optional[int] = None,
        kv_lora_rank: Optional[int] = None,
        qk_nope_head_dim: Optional[int] = None,
        qk_rope_head_dim: Optional[int] = None,
        v_head_dim: Optional[int] = None,
        qk_norm: Optional[bool] = None,
        **algorithm: Any,
    ) -> "DSparkConfig":
        """Derive the draft from the target's HF (text) config, with Megatron-style overrides
        (``None`` = the default described here).

        The draft copies the target's hidden size, vocabulary, norms and RoPE (default,
        linear or YaRN). Its attention shape is the target's unless the target's head counts
        are odd (e.g. SmolLM2-135M: 9 heads / 3 KV heads), which no tensor-parallel size > 1
        could split; then a TP-friendly shape of the same hidden size is chosen (see
        :func:`tp_friendly_attention_shape`). The choice never depends on the TP size, so
        every parallel layout trains the same model.

        ``attention_type`` (``--draft-attention``): default ``"mla"`` for DeepSeek-V2/V3
        targets, else ``"gqa"``.

        * MLA draft of a DeepSeek target: the target's heads, ``q_lora_rank`` (None → 0),
          ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim`` and
          its dense layers' ``intermediate_size`` for the SwiGLU MLP.
        * MLA draft of a GQA target: the heads of the GQA shape above (head dim ``hd``) and
          DeepSeek-V3's proportions relative to its 128-wide heads (nope 128, rope 64,
          v 128, kv latent 512): ``qk_nope_head_dim = v_head_dim = hd``,
          ``qk_rope_head_dim = hd/2`` (rounded down to even, at least 2),
          ``kv_lora_rank = 4·hd``, ``q_lora_rank = 0`` (queries projected directly; the
          draft is small). SmolLM2-135M → 8 heads, nope 72, rope 36, v 72, latent 288.
        * GQA draft of a DeepSeek target: ``v_head_dim`` as the head dim and the target's
          heads as both query and KV heads (then made TP-friendly as above).

        Any explicit MLA dimension overrides the default; they are refused for GQA drafts.
        """
        cfg = getattr(hf_config, "text_config", None) or hf_config
        model_type = getattr(cfg, "model_type", None)
        if model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"unsupported target family '{model_type}'; supported: "
                f"{', '.join(sorted(SUPPORTED_FAMILIES))}"
            )
        mla_target = model_type in MLA_FAMILIES
        if attention_type is None:
            attention_type = "mla" if mla_target else "gqa"
        mla_given = dict(q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
                         qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim,
                         v_head_dim=v_head_dim)
        check_attention_flags(attention_type, mla_given, num_query_groups, kv_channels,
                              model_type if mla_target else None)
        # Per-head q/k RMSNorms in every GQA draft by default, whatever the target family:
        # the DSpark draft layers SGLang and vLLM build always have them (a draft trained
        # without would be served with norms of weight 1). --no-qk-norm turns them off.
        qk_norm_given = qk_norm
        qk_norm = True if qk_norm is None else bool(qk_norm)
        bias_default = SUPPORTED_FAMILIES[model_type][1]
        hidden = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        if mla_target:
            # DeepseekV*Config.head_dim is the rotary dim; a GQA head is as wide as a value head
            head_dim = int(cfg.v_head_dim)
        else:
            head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        if num_attention_heads is None and num_query_groups is None and kv_channels is None:
            if not (mla_target and attention_type == "mla"):
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
        mla = dict.fromkeys(MLA_FLAGS, 0)
        if attention_type == "mla":
            if mla_target:
                defaults = dict(
                    q_lora_rank=int(getattr(cfg, "q_lora_rank", None) or 0),
                    kv_lora_rank=int(cfg.kv_lora_rank),
                    qk_nope_head_dim=int(cfg.qk_nope_head_dim),
                    qk_rope_head_dim=int(cfg.qk_rope_head_dim),
                    v_head_dim=int(cfg.v_head_dim),
                )
            else:
                half = head_dim // 2
                defaults = dict(q_lora_rank=0, kv_lora_rank=4 * head_dim, qk_nope_head_dim=head_dim,
                                qk_rope_head_dim=max(2, half - half % 2), v_head_dim=head_dim)
            mla = {k: int(v) if v is not None else defaults[k] for k, v in mla_given.items()}
            kv_heads = heads  # no KV groups: every head has its own keys/values from the latent
            head_dim = mla["qk_rope_head_dim"]  # HF DeepseekV3Config.head_dim semantics
            qk_norm = bool(qk_norm_given)  # MLA has none (validate() refuses an explicit True)
        n_target = int(cfg.num_hidden_layers)
        layer_ids = list(target_layer_ids) if target_layer_ids is not None else default_target_layer_ids(
            n_target, num_target_taps
        )
        theta, factor, yarn = rope_settings(cfg)
        attention_bias = getattr(cfg, "attention_bias", None)
        if attention_bias is None:
            attention_bias = bool(bias_default)
        if attention_type == "mla":
            attention_bias = False
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
            rope_yarn=yarn,
            qk_norm=qk_norm,
            attention_bias=bool(attention_bias),
            max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 4096)),
            target_model_type=model_type,
            num_target_layers=n_target,
            target_layer_ids=layer_ids,
            attention_type=attention_type,
            **mla,
            **algorithm,
        )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


#: The draft config's own defaults (DeepSpec's), which the flags and the export import share
DSPARK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DSparkConfig)
                   if f.default is not dataclasses.MISSING}


def check_attention_flags(attention_type: Optional[str], mla_given: dict, num_query_groups: Optional[int],
                          kv_channels: Optional[int], mla_default_family: Optional[str] = None) -> None:
    """The draft-attention flags agree with ``--draft-attention`` (None: not chosen yet, then
    only the values are checked): MLA shape flags (``mla_given``: field -> value or None) only
    for MLA, >= 0; GQA head flags only for GQA. ``mla_default_family``: the target family that
    made MLA the default (named in the error)."""
    _check(attention_type in ATTENTION_TYPES + (None,),
           f"--draft-attention must be one of {ATTENTION_TYPES}, got {attention_type!r}")
    given = [MLA_FLAGS[k] for k, v in mla_given.items() if v is not None]
    _check(attention_type != "gqa" or not given,
           f"{', '.join(given)} only apply to --draft-attention mla (the draft's attention is gqa)")
    for k, v in mla_given.items():
        _check(v is None or v >= 0, f"{MLA_FLAGS[k]} must be >= 0")
    _check(attention_type != "mla" or (num_query_groups is None and kv_channels is None),
           "--num-query-groups / --kv-channels describe GQA heads but the draft uses MLA"
           f"{' (the default for ' + mla_default_family + ' targets)' if mla_default_family else ''}: "
           "use --qk-nope-head-dim, --qk-rope-head-dim and --v-head-dim, or --draft-attention gqa")


def check_algorithm(block_size: int, num_anchors: int, markov_rank: int, confidence_head: bool,
                    confidence_with_markov: bool, convention: str, training_mode: str,
                    prefix_weight_base: float) -> None:
    """The rules of the algorithm fields that need no target (the flag validator runs them
    before anything loads; :meth:`DSparkConfig.validate` runs them on every config, e.g. one
    read from an export). Raises :class:`ConfigError` naming the flag."""
    _check(block_size >= 1, "--block-size must be >= 1")
    _check(convention in CONVENTIONS, f"--slot-convention must be one of {CONVENTIONS}, got {convention!r}")
    _check(convention == "S" or block_size >= 2,
           "--block-size must be >= 2 with --slot-convention D (slot 0 is the anchor)")
    _check(num_anchors >= 1, "--num-anchors must be >= 1")
    _check(markov_rank >= 0, "--markov-rank must be >= 0")
    _check(not (confidence_head and confidence_with_markov and markov_rank == 0),
           "the confidence head uses Markov features but --markov-rank is 0: add "
           "--confidence-without-markov or --no-confidence-head, or set --markov-rank")
    _check(training_mode in TRAINING_MODES,
           f"--training-mode must be one of {TRAINING_MODES}, got {training_mode!r}")
    if training_mode == "vp_drafter":
        _check(convention == "D",
               "--training-mode vp_drafter is a Convention-D (original DFlash) objective: use "
               "--algorithm dflash-original or --slot-convention D")
        _check(prefix_weight_base > 0 and math.isfinite(prefix_weight_base),
               f"--prefix-weight-base must be > 0 and finite, got {prefix_weight_base}")


def _normal_init(std: float):
    import torch

    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1·mscale·ln(scale) + 1`` (1 for scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_parameters(params: dict, max_position_embeddings: int) -> dict:
    """Resolve a YaRN ``rope_parameters``/``rope_scaling`` dict the way transformers'
    ``_compute_yarn_parameters`` does: ``factor`` (None → max_positions / original),
    ``beta_fast``/``beta_slow`` (default 32 / 1), ``truncate`` (default true) and the cos/sin
    ``attention_factor`` (default ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
    when both are given, else ``mscale(factor)``). ``mscale_all_dim`` also feeds the MLA
    softmax scale (:attr:`DSparkConfig.softmax_scale`)."""
    orig = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / orig
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return dict(
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(mscale or 0.0),
        mscale_all_dim=float(mscale_all_dim or 0.0),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def rope_settings(cfg) -> tuple[float, float, Optional[dict]]:
    """(theta, linear scaling factor, resolved YaRN parameters or None) from a transformers
    4.x (``rope_theta`` + ``rope_scaling``) or 5.x (``rope_parameters``) config."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        source = params
    else:
        theta = float(getattr(cfg, "rope_theta", 10000.0))
        source = scaling if isinstance(scaling, dict) else {}
    rope_type = source.get("rope_type", source.get("type", "default")) if source else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"target RoPE type '{rope_type}' is not supported by the draft; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    factor = float(source.get("factor", 1.0)) if rope_type == "linear" else 1.0
    yarn = None
    if rope_type == "yarn":
        yarn = yarn_parameters(source, int(getattr(cfg, "max_position_embeddings", None) or 4096))
    return theta, factor, yarn


def _rope_params(cfg) -> tuple[float, float]:
    """(theta, linear scaling factor); see :func:`rope_settings` for YaRN."""
    theta, factor, _ = rope_settings(cfg)
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
    (The rule lives in :mod:`megaspark.layer_ids`; here its errors name the flags.)"""
    try:
        return layer_id_rules.default_target_layer_ids(num_target_layers, n)
    except ValueError as e:
        raise ConfigError(f"--num-target-taps / --target-layer-ids: {e}") from None


def validate_target_layer_ids(ids, num_target_layers: int) -> None:
    """Layer id k = output of target decoder layer k = HF hidden_states[k+1] (DESIGN.md
    decision 2); valid ids lie in [0, N−2]. Errors name ``--target-layer-ids``."""
    try:
        layer_id_rules.validate_target_layer_ids(list(ids), num_target_layers)
    except ValueError as e:
        raise ConfigError(f"--target-layer-ids: {e}") from None
