"""DSparkConfig: derivation from the target's HF config, overrides, default target-layer
ids (DSPARK_SPEC.md §1.2, §13 item 18) and validation (every bad configuration raises
:class:`ConfigError` naming the flag).

Pure python: only ``megaspark.config`` and in-memory transformers config objects; no
megatron, no processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from megaspark.config import (
    ConfigError,
    DSparkConfig,
    default_target_layer_ids,
    tp_friendly_attention_shape,
    validate_target_layer_ids,
)

transformers = pytest.importorskip("transformers")

# A tiny draft that is valid at TP = 1, 2 and 4.
BASE = dict(
    hidden_size=32,
    num_layers=2,
    num_attention_heads=8,
    num_query_groups=4,
    kv_channels=8,
    ffn_hidden_size=48,
    vocab_size=64,
    target_model_type="llama",
    num_target_layers=6,
    target_layer_ids=[1, 3],
    mask_token_id=7,
    markov_rank=6,
)


def make(**overrides) -> DSparkConfig:
    fields = dict(BASE)
    fields.update(overrides)
    return DSparkConfig(**fields)


def smollm2_like(**extra):
    return transformers.LlamaConfig(
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        num_hidden_layers=30,
        vocab_size=49152,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        **extra,
    )


def qwen3_tiny(**extra):
    kwargs = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # != hidden / heads, as in the real Qwen3 models
        intermediate_size=96,
        num_hidden_layers=8,
        vocab_size=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    kwargs.update(extra)
    return transformers.Qwen3Config(**kwargs)


# ----------------------------------------------------------------------------- from_hf_config
def test_base_is_valid_at_every_tp():
    for tp in (1, 2, 4):
        assert make().validate(tp) is not None


def test_from_hf_qwen3():
    d = DSparkConfig.from_hf_config(qwen3_tiny())
    assert d.target_model_type == "qwen3"
    assert d.qk_norm is True
    assert d.attention_bias is False
    assert (d.hidden_size, d.vocab_size, d.ffn_hidden_size) == (64, 128, 96)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (4, 2, 32)
    assert d.head_dim == 32
    assert d.rope_theta == 1_000_000.0
    assert d.rope_scaling_factor == 1.0
    assert d.rms_norm_eps == 1e-6
    assert d.max_position_embeddings == 2048
    assert d.num_target_layers == 8
    assert d.target_layer_ids == default_target_layer_ids(8, 5) == [1, 2, 3, 4, 5]
    assert d.num_layers == 5
    assert d.context_width == 5 * 64
    d.validate(1)
    d.validate(2)


def test_from_hf_qwen3_explicit_attention_bias():
    d = DSparkConfig.from_hf_config(qwen3_tiny(attention_bias=True))
    assert d.attention_bias is True and d.qk_norm is True


def test_from_hf_qwen2_has_qkv_bias():
    cfg = transformers.Qwen2Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        num_hidden_layers=8, vocab_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )
    d = DSparkConfig.from_hf_config(cfg)
    assert d.target_model_type == "qwen2"
    assert d.attention_bias is True
    assert d.qk_norm is True  # every GQA draft has q/k norms (what SGLang/vLLM build)
    assert DSparkConfig.from_hf_config(cfg, qk_norm=False).qk_norm is False  # --no-qk-norm
    assert d.kv_channels == 16  # hidden / heads: Qwen2 has no head_dim field
    assert d.rope_theta == 1_000_000.0
    d.validate(2)


def test_from_hf_llama_and_mistral():
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        num_hidden_layers=12, vocab_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    d = DSparkConfig.from_hf_config(cfg)
    assert (d.target_model_type, d.qk_norm, d.attention_bias) == ("llama", True, False)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (4, 4, 16)
    assert d.rope_theta == 500000.0
    assert d.target_layer_ids == [1, 3, 5, 7, 9]
    m = DSparkConfig.from_hf_config(
        transformers.MistralConfig(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            num_hidden_layers=12, vocab_size=128,
        )
    )
    assert m.target_model_type == "mistral" and m.qk_norm is True
    m.validate(2)


def test_from_hf_linear_rope_scaling():
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
        num_hidden_layers=12, vocab_size=128,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
    )
    d = DSparkConfig.from_hf_config(cfg)
    assert d.rope_theta == 500000.0
    assert d.rope_scaling_factor == 4.0


def test_from_hf_transformers4_style_rope_fields():
    """A 4.x-style config (rope_theta + rope_scaling attributes, no rope_parameters)."""
    cfg = SimpleNamespace(
        model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, num_hidden_layers=12, vocab_size=128, rope_theta=250000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
    )
    d = DSparkConfig.from_hf_config(cfg)
    assert (d.rope_theta, d.rope_scaling_factor) == (250000.0, 2.0)
    assert d.kv_channels == 16


def test_from_hf_uses_text_config():
    wrapper = SimpleNamespace(text_config=qwen3_tiny(), model_type="some_vlm")
    d = DSparkConfig.from_hf_config(wrapper)
    assert d.target_model_type == "qwen3" and d.hidden_size == 64


def test_smollm2_like_default_draft_shape_is_tp_friendly():
    d = DSparkConfig.from_hf_config(smollm2_like())
    assert (d.hidden_size, d.vocab_size, d.ffn_hidden_size) == (576, 49152, 1536)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (8, 4, 72)
    assert d.num_attention_heads * d.kv_channels == d.hidden_size
    assert d.rope_theta == 100000.0
    assert d.rms_norm_eps == 1e-5
    assert d.max_position_embeddings == 8192
    assert d.num_target_layers == 30
    assert d.target_layer_ids == default_target_layer_ids(30, 5)
    assert d.context_width == 5 * 576
    before = d.to_dict()
    for tp in (1, 2, 4):
        assert d.validate(tp) is d
        assert d.to_dict() == before  # validation never changes the shape: same model at every TP
    assert tp_friendly_attention_shape(576, 9, 3, 64) == (8, 4, 72)
    assert tp_friendly_attention_shape(4096, 32, 8, 128) == (32, 8, 128)  # already even: kept


def test_smollm2_like_explicit_target_shape_is_kept():
    d = DSparkConfig.from_hf_config(
        smollm2_like(), num_attention_heads=9, num_query_groups=3, kv_channels=64
    )
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (9, 3, 64)
    d.validate(1)
    with pytest.raises(ConfigError, match="--num-attention-heads"):
        d.validate(2)


def test_from_hf_overrides():
    d = DSparkConfig.from_hf_config(
        qwen3_tiny(), num_layers=3, num_attention_heads=8, num_query_groups=2, kv_channels=16,
        ffn_hidden_size=128,
    )
    assert d.num_layers == 3
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (8, 2, 16)
    assert d.ffn_hidden_size == 128
    d.validate(2)


def test_from_hf_heads_override_keeps_width_and_group_ratio():
    # 4 heads x 32 = 128 wide; 8 heads -> head dim 16; query/KV ratio 2 kept -> 4 groups.
    d = DSparkConfig.from_hf_config(qwen3_tiny(), num_attention_heads=8)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (8, 4, 16)
    d = DSparkConfig.from_hf_config(qwen3_tiny(), num_query_groups=1)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (4, 1, 32)
    d = DSparkConfig.from_hf_config(qwen3_tiny(), kv_channels=64)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (4, 2, 64)


def test_from_hf_target_layer_ids_and_taps():
    d = DSparkConfig.from_hf_config(qwen3_tiny(), target_layer_ids=[0, 6])
    assert d.target_layer_ids == [0, 6] and d.context_width == 2 * 64
    d.validate()
    d = DSparkConfig.from_hf_config(qwen3_tiny(), num_target_taps=1)
    assert d.target_layer_ids == [4] and d.context_width == 64


def test_from_hf_algorithm_fields_pass_through():
    d = DSparkConfig.from_hf_config(
        qwen3_tiny(), block_size=16, markov_rank=0, confidence_head=False, alpha_ce=1.0,
        alpha_l1=0.0, mask_token_id=5, convention="D", gamma=7.0,
    )
    assert (d.block_size, d.markov_rank, d.mask_token_id, d.convention, d.gamma) == (16, 0, 5, "D", 7.0)
    assert d.drafts_per_block == 15
    d.validate()


# ----------------------------------------------------------------------------- §13 item 18
def test_default_target_layer_ids():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(40, 5) == [1, 10, 19, 28, 37]
    assert default_target_layer_ids(28, 5) == [1, 7, 13, 19, 25]
    assert default_target_layer_ids(64, 5) == [1, 16, 31, 46, 61]
    for n in (3, 7, 12, 36, 40, 64):  # N=2: [1] would be the last layer, refused
        assert default_target_layer_ids(n, 1) == [n // 2]
    for n in range(8, 80):  # deep enough for 5 distinct taps
        ids = default_target_layer_ids(n, 5)
        validate_target_layer_ids(ids, n)
        assert ids[0] == 1 and ids[-1] == n - 3
    for n in range(4, 8):  # the rule would repeat ids: refused, naming the flags
        with pytest.raises(ConfigError, match="--num-target-taps"):
            default_target_layer_ids(n, 5)
    with pytest.raises(ConfigError):
        default_target_layer_ids(36, 0)
    with pytest.raises(ConfigError):
        default_target_layer_ids(3, 5)


def test_context_width_is_num_taps_times_hidden():
    for ids in ([2], [1, 3], [0, 1, 2, 4]):
        assert make(target_layer_ids=ids).context_width == len(ids) * 32


# ----------------------------------------------------------------------------- (de)serialise
def test_to_dict_from_dict_round_trip():
    d = DSparkConfig.from_hf_config(smollm2_like(), markov_head_type="rnn", gamma=None)
    again = DSparkConfig.from_dict(d.to_dict())
    assert again == d
    via_json = DSparkConfig.from_dict(json.loads(json.dumps(d.to_dict())))
    assert via_json == d
    assert set(d.to_dict()) == {f.name for f in dataclasses.fields(DSparkConfig)}


def test_from_dict_refuses_unknown_fields():
    d = make().to_dict()
    d["not_a_field"] = 1
    with pytest.raises(ConfigError, match="not_a_field"):
        DSparkConfig.from_dict(d)


# ----------------------------------------------------------------------------- bad configs
TP_CASES = [
    ("num_attention_heads", dict(num_attention_heads=6, num_query_groups=2), 4, "--num-attention-heads"),
    ("num_query_groups", dict(num_query_groups=2), 4, "--num-query-groups"),
    ("vocab", dict(vocab_size=66, mask_token_id=7), 4, "vocab_size"),
    ("ffn", dict(ffn_hidden_size=50), 4, "--ffn-hidden-size"),
    ("heads_tp3", dict(), 3, "--num-attention-heads"),
]


@pytest.mark.parametrize("name,overrides,tp,flag", TP_CASES, ids=[c[0] for c in TP_CASES])
def test_not_divisible_by_tp(name, overrides, tp, flag):
    d = make(**overrides)
    if tp != 3:
        d.validate(1)  # only the TP size makes it invalid
    with pytest.raises(ConfigError, match=flag) as err:
        d.validate(tp)
    assert "--tensor-model-parallel-size" in str(err.value)


BAD_LAYER_IDS = [
    ("last_layer", [1, 5]),
    ("minus_one", [-1, 2]),
    ("beyond", [1, 9]),
    ("decreasing", [3, 1]),
    ("repeated", [2, 2]),
    ("empty", []),
    ("not_int", [1.0, 2]),
]


@pytest.mark.parametrize("ids", [c[1] for c in BAD_LAYER_IDS], ids=[c[0] for c in BAD_LAYER_IDS])
def test_bad_target_layer_ids(ids):
    with pytest.raises(ConfigError, match="--target-layer-ids"):
        make(target_layer_ids=ids).validate()
    with pytest.raises(ConfigError, match="--target-layer-ids"):
        validate_target_layer_ids(ids, 6)


def test_target_layer_ids_boundaries_ok():
    make(target_layer_ids=[0, 4]).validate()  # 0 and N-2 are the extremes allowed
    make(target_layer_ids=[4]).validate()


def test_from_hf_bad_layer_ids_refused_by_validate():
    d = DSparkConfig.from_hf_config(qwen3_tiny(), target_layer_ids=[1, 7])  # 7 = last layer
    with pytest.raises(ConfigError, match="--target-layer-ids"):
        d.validate()


@pytest.mark.parametrize("mask", [64, 1000, -1])
def test_mask_token_outside_vocab(mask):
    with pytest.raises(ConfigError, match="--mask-token-id"):
        make(mask_token_id=mask).validate()


def test_confidence_with_markov_needs_rank():
    with pytest.raises(ConfigError, match="--markov-rank"):
        make(markov_rank=0, confidence_head=True, confidence_with_markov=True).validate()
    make(markov_rank=0, confidence_head=True, confidence_with_markov=False).validate()
    make(markov_rank=0, confidence_head=False, confidence_with_markov=True).validate()


def test_negative_markov_rank():
    with pytest.raises(ConfigError, match="--markov-rank"):
        make(markov_rank=-1, confidence_head=False).validate()


def test_unsupported_target_family_from_hf():
    with pytest.raises(ConfigError, match="gpt2"):
        DSparkConfig.from_hf_config(transformers.GPT2Config())
    gemma = SimpleNamespace(
        model_type="gemma", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=96, num_hidden_layers=8, vocab_size=128,
    )
    with pytest.raises(ConfigError, match="gemma") as err:
        DSparkConfig.from_hf_config(gemma)
    assert "unsupported target family" in str(err.value)


def test_unsupported_target_family_in_config():
    with pytest.raises(ConfigError, match="gemma"):
        make(target_model_type="gemma").validate()


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ],
    ids=["dynamic", "llama3"],
)
def test_unsupported_rope_type(rope):
    cfg = SimpleNamespace(
        model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, num_hidden_layers=12, vocab_size=128, rope_parameters=rope,
    )
    with pytest.raises(ConfigError, match=rope["rope_type"]):
        DSparkConfig.from_hf_config(cfg)


def test_unsupported_rope_type_transformers4_style():
    cfg = SimpleNamespace(
        model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, num_hidden_layers=12, vocab_size=128, rope_theta=1e4,
        rope_scaling={"type": "dynamic", "factor": 4.0},
    )
    with pytest.raises(ConfigError, match="dynamic"):
        DSparkConfig.from_hf_config(cfg)


@pytest.mark.parametrize("style", ["transformers5", "transformers4"])
def test_yarn_rope_is_resolved(style):
    """YaRN is supported (tests/test_mla.py checks the frequencies against transformers)."""
    yarn = {"factor": 4.0, "original_max_position_embeddings": 2048}
    if style == "transformers5":
        extra = dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, **yarn})
    else:
        extra = dict(rope_theta=1e4, rope_scaling={"type": "yarn", **yarn})
    cfg = SimpleNamespace(
        model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, num_hidden_layers=12, vocab_size=128, max_position_embeddings=8192, **extra,
    )
    d = DSparkConfig.from_hf_config(cfg, num_target_taps=3).validate()
    assert d.rope_theta == 1e4 and d.rope_scaling_factor == 1.0
    assert d.rope_yarn == dict(
        factor=4.0, original_max_position_embeddings=2048, beta_fast=32.0, beta_slow=1.0, mscale=0.0,
        mscale_all_dim=0.0, attention_factor=0.1 * math.log(4.0) + 1.0, truncate=True)
    assert d.softmax_scale == 16**-0.5  # GQA keeps hd^-1/2 under YaRN


def test_unknown_markov_head_type():
    with pytest.raises(ConfigError, match="--markov-head-type"):
        make(markov_head_type="lstm").validate()


def test_unknown_convention():
    with pytest.raises(ConfigError, match="--slot-convention"):
        make(convention="X").validate()
    with pytest.raises(ConfigError, match="--block-size"):
        make(convention="D", block_size=1).validate()


@pytest.mark.parametrize(
    "alphas",
    [
        dict(alpha_ce=0.0, alpha_l1=0.0, alpha_conf=0.0),
        # the confidence alpha does not count without a confidence head
        dict(alpha_ce=0.0, alpha_l1=0.0, alpha_conf=1.0, confidence_head=False),
    ],
    ids=["all_zero", "conf_only_without_head"],
)
def test_all_zero_alphas(alphas):
    with pytest.raises(ConfigError, match="alpha"):
        make(**alphas).validate()


@pytest.mark.parametrize(
    "field,flag",
    [("alpha_ce", "--ce-loss-alpha"), ("alpha_l1", "--l1-loss-alpha"),
     ("alpha_conf", "--confidence-loss-alpha")],
)
@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_bad_alpha_values(field, flag, value):
    with pytest.raises(ConfigError, match=flag):
        make(**{field: value}).validate()


def test_only_confidence_alpha_is_enough():
    make(alpha_ce=0.0, alpha_l1=0.0, alpha_conf=1.0).validate()


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(num_attention_heads=6, num_query_groups=4), "--num-query-groups"),
        (dict(num_query_groups=0), "--num-query-groups"),
        (dict(kv_channels=7), "--kv-channels"),
        (dict(num_layers=0), "--num-layers"),
        (dict(block_size=0), "--block-size"),
        (dict(num_anchors=0), "--num-anchors"),
        (dict(attention_backend="flash"), "--draft-attention-backend"),
        (dict(attention_chunk_blocks=0), "--attention-chunk-blocks"),
        (dict(loss_chunk_rows=0), "--loss-chunk-rows"),
    ],
    ids=["heads_vs_groups", "zero_groups", "odd_head_dim", "no_layers", "block0", "anchors0",
         "backend", "attn_chunk", "loss_chunk"],
)
def test_other_bad_fields(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        make(**overrides).validate()


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)
