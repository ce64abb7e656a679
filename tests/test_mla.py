"""MLA (DeepSeek-V2/V3 multi-head latent attention) as the draft's dual-source attention
(``--draft-attention mla``; megaspark/models/dspark/mla.py).

In-process (no megatron initialisation): config derivation from a tiny random DeepSeek-V3
target and from a GQA (SmolLM2-like) target, validation messages, YaRN frequencies and the
MLA softmax scale against transformers, the interleaved RoPE against transformers, the
export tables / parameter counts and config round trips (both layouts), the validator tool,
the TE-spec refusal, and the tiny DeepSeek-V3 target's hidden states through the HF provider.

One launch of two gloo processes (TP = 2, then TP = 1 with DP = 2) for everything that needs
megatron: the full DSparkModel loss and every HF-named gradient of several MLA drafts
(q_lora_rank 0 and > 0, structured and dense backends, YaRN, one derived from the tiny
DeepSeek-V3 target; plus a GQA draft with YaRN RoPE) against the float64 plain-torch
reference (tests/reference.py, MLA branch) at both TP sizes; the replicated latent
parameters' gradients identical on both TP ranks; one MLA layer against transformers' own ``DeepseekV3Attention``; the leak test; the
training forward against the cached (weight-absorbed) inference forward; the export round
trip through ``load_draft`` and the speculative-decoding proposer on the loaded draft; and a
checkpoint saved at TP = 2 loaded at TP = 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from megaspark.config import ConfigError, DSparkConfig, yarn_parameters
from megaspark.export.files import export_hf, read_hf
from megaspark.export.hf_config import canonical
from megaspark.export.loading import load_draft
from megaspark.export.tensors import ExportError, hf_tensor_shapes, parameter_counts
from tests import dspark_cases as dc
from tests import reference
from tests import launcher
from tests.launcher import run_distributed
from tests.tiny_models import make_tiny_target

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
FROZEN = {"embed_tokens.weight", "lm_head.weight"}
MLA_DIMS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
NONE_MLA = dict.fromkeys(MLA_DIMS)  # what pretrain passes when no MLA flag is given

# a YaRN setting that matters at the test's positions (< 30): small original context,
# attention_factor != 1 (mscale != mscale_all_dim) so the cos/sin magnitude is exercised too
YARN = yarn_parameters(dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                            beta_fast=8.0, beta_slow=1.0, mscale=0.8, mscale_all_dim=1.0), 4096)


def mla_config(**overrides) -> DSparkConfig:
    fields = dict(dc.BASE)
    fields.update(attention_type="mla", num_query_groups=4, kv_channels=4, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, q_lora_rank=0)
    fields.update(overrides)
    return DSparkConfig(**fields).validate(2)


CASES = {
    "q0_structured": dict(),
    "q12_dense_gated": dict(q_lora_rank=12, attention_backend="dense", markov_head_type="gated"),
    "q12_yarn_D_rnn": dict(q_lora_rank=12, rope_yarn=YARN, convention="D", gamma=7.0,
                           markov_head_type="rnn", target_model_type="qwen3"),
    "q0_yarn_nope0_dflash": dict(rope_yarn=YARN, qk_nope_head_dim=0, markov_rank=0, confidence_head=False,
                                 alpha_ce=1.0, alpha_l1=0.0),
}


def reference_cfg(d: DSparkConfig) -> dict:
    rc = dc.reference_cfg(d)
    rc.update({k: getattr(d, k) for k in MLA_DIMS}, attention_type=d.attention_type, rope_yarn=d.rope_yarn)
    return rc


def make_case(d: DSparkConfig, seed: int = 0, Bt: int = 2, S: int = 14):
    rc = reference_cfg(d)
    L = len(d.target_layer_ids)
    return rc, reference.random_weights(rc, seed, L=L), reference.random_batch(rc, Bt, S, L, seed + 1)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return make_tiny_target(tmp_path_factory.mktemp("tiny_deepseek"), family="deepseek_v3")


def deepseek_config(path, **kw) -> DSparkConfig:
    from megaspark.targets.hf import load_config_offline

    hf_cfg = load_config_offline(path).get_text_config()
    algo = dict(num_layers=2, num_target_taps=3, block_size=4, num_anchors=5, mask_token_id=7,
                markov_rank=6, attention_chunk_blocks=2, loss_chunk_rows=7)
    algo.update(kw)
    return DSparkConfig.from_hf_config(hf_cfg, **{**NONE_MLA, "attention_type": None, **algo})


@pytest.fixture(scope="module")
def cases(deepseek_dir):
    out = {name: mla_config(**kw) for name, kw in CASES.items()}
    out["deepseek_tiny"] = deepseek_config(deepseek_dir).validate(2)
    out["gqa_yarn"] = DSparkConfig(**dict(dc.BASE, rope_yarn=YARN)).validate(2)  # YaRN for GQA too
    return out


# =====================================================================================
# config
# =====================================================================================


def smollm2_like():
    return transformers.LlamaConfig(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
        num_hidden_layers=30, vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=100000.0,
    )


def test_deepseek_target_derives_an_mla_draft_with_its_dims(deepseek_dir):
    d = deepseek_config(deepseek_dir)
    assert d.attention_type == "mla" and d.target_model_type == "deepseek_v3"
    assert (d.q_lora_rank, d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim) == (
        24, 32, 16, 8, 16)
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (4, 4, 8)
    assert d.ffn_hidden_size == 128  # the target's dense intermediate_size, not the experts'
    assert not d.qk_norm and not d.attention_bias
    assert d.rope_yarn == dict(factor=4.0, original_max_position_embeddings=512, beta_fast=32.0,
                               beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, attention_factor=1.0,
                               truncate=True)
    assert d.softmax_scale == pytest.approx(24**-0.5 * (0.1 * math.log(4.0) + 1) ** 2)
    d.validate(4)
    # q_lora_rank None (DeepSeek-V2-Lite style) → 0; explicit overrides win
    d2 = deepseek_config(deepseek_dir, q_lora_rank=0, kv_lora_rank=48, v_head_dim=8)
    assert (d2.q_lora_rank, d2.kv_lora_rank, d2.v_head_dim, d2.qk_nope_head_dim) == (0, 48, 8, 16)
    # a GQA draft of a DeepSeek target: v_head_dim-wide heads, all heads as KV heads
    g = deepseek_config(deepseek_dir, attention_type="gqa").validate(2)
    assert (g.attention_type, g.num_attention_heads, g.num_query_groups, g.kv_channels) == ("gqa", 4, 4, 16)
    assert all(getattr(g, k) == 0 for k in MLA_DIMS) and g.rope_yarn == d.rope_yarn


def test_gqa_target_mla_defaults_and_overrides():
    d = DSparkConfig.from_hf_config(smollm2_like(), **NONE_MLA, attention_type="mla").validate(8)
    # SmolLM2's 9/3 x 64 heads become TP-friendly 8 x 72; DeepSeek-V3 proportions per head
    assert (d.num_attention_heads, d.num_query_groups, d.kv_channels) == (8, 8, 36)
    assert (d.q_lora_rank, d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim) == (
        0, 288, 72, 36, 72)
    assert d.rope_yarn is None and d.rope_theta == 100000.0
    d = DSparkConfig.from_hf_config(smollm2_like(), attention_type="mla", num_attention_heads=4,
                                    q_lora_rank=64, kv_lora_rank=None, qk_nope_head_dim=None,
                                    qk_rope_head_dim=16, v_head_dim=None).validate(4)
    assert (d.num_attention_heads, d.q_lora_rank, d.kv_lora_rank, d.qk_rope_head_dim, d.v_head_dim) == (
        4, 64, 4 * 144, 16, 144)
    # GQA is unchanged by the new keywords (None = default)
    g = DSparkConfig.from_hf_config(smollm2_like(), **NONE_MLA, attention_type=None)
    assert (g.attention_type, g.num_attention_heads, g.num_query_groups, g.kv_channels) == ("gqa", 8, 4, 72)
    with pytest.raises(ConfigError, match="--kv-lora-rank, --v-head-dim only apply to --draft-attention mla"):
        DSparkConfig.from_hf_config(smollm2_like(), attention_type="gqa", kv_lora_rank=64, v_head_dim=8)


@pytest.mark.parametrize("changes, needle", [
    (dict(kv_lora_rank=0), "--kv-lora-rank must be > 0"),
    (dict(qk_rope_head_dim=3, kv_channels=3), "--qk-rope-head-dim must be even"),
    (dict(v_head_dim=0), "--v-head-dim must be > 0"),
    (dict(qk_nope_head_dim=-1), "--qk-nope-head-dim must be >= 0"),
    (dict(q_lora_rank=-2), "--q-lora-rank must be >= 0"),
    (dict(num_query_groups=2), "--num-query-groups (2) must equal --num-attention-heads (4)"),
    (dict(kv_channels=8), "must equal --qk-rope-head-dim (4)"),
    (dict(qk_norm=True), "no per-head q/k norms"),
    (dict(attention_bias=True), "no projection biases"),
    (dict(attention_type="mqa"), "--draft-attention must be one of"),
])
def test_mla_validation_names_the_flags(changes, needle):
    fields = dict(dc.BASE, attention_type="mla", num_query_groups=4, kv_channels=4, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    fields.update(changes)
    with pytest.raises(ConfigError) as err:
        DSparkConfig(**fields).validate(1)
    assert needle in str(err.value)


def test_mla_heads_must_split_over_tp_and_gqa_refuses_mla_dims():
    with pytest.raises(ConfigError, match="--num-attention-heads = 4.*--tensor-model-parallel-size 8"):
        mla_config().validate(8)
    with pytest.raises(ConfigError, match="--kv-lora-rank only apply to --draft-attention mla"):
        DSparkConfig(**dict(dc.BASE, kv_lora_rank=16)).validate()


# =====================================================================================
# RoPE / scale against transformers
# =====================================================================================


@pytest.mark.parametrize("params", [
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
         mscale_all_dim=1.0),  # DeepSeek-V3
    dict(factor=4.0, original_max_position_embeddings=16, beta_fast=8.0, beta_slow=1.0, mscale=0.8,
         mscale_all_dim=1.0),
    dict(factor=4.0, original_max_position_embeddings=32768),  # Qwen-style: defaults for the rest
])
def test_yarn_matches_transformers(params):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    from megaspark.models.dspark.rope import rope_cos_sin, yarn_inv_frequencies

    rope = dict(rope_type="yarn", rope_theta=10000.0, **params)
    hf = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16,
                                       qk_nope_head_dim=8, v_head_dim=8, kv_lora_rank=16,
                                       max_position_embeddings=163840, rope_parameters=dict(rope))
    inv_hf, att_hf = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    yarn = yarn_parameters(rope, 163840)
    assert yarn["attention_factor"] == pytest.approx(att_hf, rel=1e-12)
    inv = yarn_inv_frequencies(16, 10000.0, yarn)
    assert torch.allclose(inv, inv_hf.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(inv, 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16))  # YaRN changed something
    cos, sin = rope_cos_sin(torch.arange(5)[None], 16, 10000.0, yarn=yarn)
    emb = torch.arange(5)[:, None].float() * inv_hf
    assert torch.allclose(cos[0], torch.cat([emb, emb], -1).cos() * att_hf, atol=1e-6)
    d = mla_config(qk_nope_head_dim=8, qk_rope_head_dim=16, kv_channels=16, rope_yarn=yarn)
    assert d.softmax_scale == pytest.approx(yarn_apply_mscale(rope, 24**-0.5), rel=1e-12)


def test_interleaved_rope_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        apply_rotary_pos_emb_interleave,
    )

    from megaspark.models.dspark.rope import apply_rope_interleaved, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 1, 7, 8, generator=g)
    pos = torch.tensor([[0, 1, 2, 9, 10, 11, 12], [3, 4, 5, 6, 20, 21, 22]])
    hf = transformers.DeepseekV3Config(hidden_size=32, num_attention_heads=3, qk_rope_head_dim=8,
                                       qk_nope_head_dim=4, v_head_dim=4, kv_lora_rank=8,
                                       rope_parameters=dict(rope_type="default", rope_theta=500.0))
    cos, sin = DeepseekV3RotaryEmbedding(hf)(q, pos)
    q_hf, k_hf = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    c, s = rope_cos_sin(pos, 8, 500.0)
    assert torch.allclose(apply_rope_interleaved(q, c, s), q_hf, atol=1e-6)
    assert torch.allclose(apply_rope_interleaved(k, c, s), k_hf, atol=1e-6)


# =====================================================================================
# export tables, config round trips, validator, TE refusal
# =====================================================================================


def target_config(d: DSparkConfig) -> dict:
    cfg = {
        "architectures": ["SomethingForCausalLM"], "model_type": d.target_model_type,
        "hidden_size": d.hidden_size, "num_hidden_layers": d.num_target_layers,
        "num_attention_heads": d.num_attention_heads, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": d.ffn_hidden_size, "vocab_size": d.vocab_size, "rms_norm_eps": d.rms_norm_eps,
        "max_position_embeddings": d.max_position_embeddings, "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": d.rope_theta, "rope_type": "default"},
    }
    if d.rope_yarn:
        cfg["rope_parameters"] = {"rope_theta": d.rope_theta, "rope_type": "yarn", **d.rope_yarn}
    return cfg


def per_layer_count(d: DSparkConfig) -> int:
    H, nh, I = d.hidden_size, d.num_attention_heads, d.ffn_hidden_size
    dn, dr, dv, r, rq = d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim, d.kv_lora_rank, d.q_lora_rank
    q = (H * rq + rq + rq * nh * (dn + dr)) if rq else H * nh * (dn + dr)
    return q + H * (r + dr) + r + r * nh * (dn + dv) + nh * dv * H + 3 * H * I + 2 * H


@pytest.mark.parametrize("name", ["q0_structured", "q12_dense_gated"])
def test_tensor_table_and_parameter_counts(cases, name):
    d = cases[name]
    shapes = hf_tensor_shapes(d)
    attn = sorted(k.split("self_attn.")[1] for k in shapes if k.startswith("layers.0.self_attn."))
    q_names = (["q_a_layernorm.weight", "q_a_proj.weight", "q_b_proj.weight"] if d.q_lora_rank
               else ["q_proj.weight"])
    assert attn == sorted(q_names + ["kv_a_layernorm.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight",
                                     "o_proj.weight"])
    assert shapes["layers.1.self_attn.kv_b_proj.weight"] == (4 * (8 + 6), 16)
    assert shapes["layers.1.self_attn.kv_a_proj_with_mqa.weight"] == (16 + 4, 32)
    assert shapes["layers.1.self_attn.o_proj.weight"] == (32, 4 * 6)
    counts = parameter_counts(d)
    assert counts["per_layer"] == per_layer_count(d)
    heads = counts["markov_head"] + counts["confidence_head"]
    H, L = d.hidden_size, len(d.target_layer_ids)
    assert counts["trainable"] == d.num_layers * per_layer_count(d) + H * L * H + 2 * H + heads
    # a DeepSeek-V3-sized MLA layer (q 1536, kv 512, nope 128, rope 64, v 128, 128 heads, dense MLP 18432)
    big = dataclasses.replace(d, hidden_size=7168, num_attention_heads=128, num_query_groups=128,
                              kv_channels=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                              qk_rope_head_dim=64, v_head_dim=128, ffn_hidden_size=18432)
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    with torch.device("meta"):  # transformers' own DeepSeek-V3 attention block, no memory
        layer = DeepseekV3Attention(transformers.DeepseekV3Config(), 0)
        attention = sum(p.numel() for p in layer.parameters())
    assert attention == 187_107_328
    assert parameter_counts(big)["per_layer"] == attention + 3 * 7168 * 18432 + 2 * 7168


@pytest.mark.parametrize("layout", ["deepspec", "specforge"])
@pytest.mark.parametrize("name", ["q0_structured", "q12_yarn_D_rnn", "deepseek_tiny"])
def test_export_config_round_trip(tmp_path, cases, deepseek_dir, name, layout):
    d = cases[name]
    rc, weights, _ = make_case(d)
    target = target_config(d)
    if name == "deepseek_tiny":
        from megaspark.targets.hf import load_config_offline

        target = load_config_offline(deepseek_dir).get_text_config()
    config = export_hf(weights, d, target, tmp_path / "out", layout=layout, target_name="fake")
    assert config["draft_attention"] == "mla" and config["num_key_value_heads"] == d.num_attention_heads
    assert config["q_lora_rank"] == (d.q_lora_rank or None)  # DeepSeek: null = q_proj
    assert [config[k] for k in MLA_DIMS[1:]] == [getattr(d, k) for k in MLA_DIMS[1:]]
    assert config["rope_interleave"] is True and config["qk_head_dim"] == d.qk_head_dim
    if layout == "specforge":
        assert config["dflash_config"]["attention_mode"] == "mla"
    else:
        assert config["architectures"] == ["DeepseekV3DSparkModel"]
    if name == "deepseek_tiny":
        assert config["first_k_dense_replace"] == d.num_layers and "num_nextn_predict_layers" not in config
        assert "dspark_target_shape" not in config  # the draft has the target's dims
    back, state = read_hf(tmp_path / "out")
    assert canonical(back) == canonical(d)
    for k, v in state.items():
        assert torch.equal(v, weights[k]), k
    # the validator accepts it
    tool = launcher.tool("validate_hf_export.py", tmp_path / "out",
                         "--engine", "vllm" if layout == "deepspec" else "sglang", timeout=120)
    problems = [ln for ln in tool.stdout.splitlines() if ln.startswith("PROBLEM")]
    engine_rules = [p for p in problems if "Convention D" in p or "convention" in p.lower()]
    assert problems == engine_rules, tool.stdout


def test_gqa_draft_of_deepseek_target_exports_as_gqa(tmp_path, deepseek_dir):
    from megaspark.targets.hf import load_config_offline

    d = deepseek_config(deepseek_dir, attention_type="gqa").validate()
    _, weights, _ = make_case(d)
    config = export_hf(weights, d, load_config_offline(deepseek_dir).get_text_config(), tmp_path / "g")
    assert not any(k in config for k in ("draft_attention", "kv_lora_rank", "qk_head_dim", "rope_interleave"))
    assert d.qk_norm  # a GQA draft has q/k norms whatever the target: the engines' block
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["dspark_qk_norm"] is True
    assert config["dspark_target_shape"]["kv_lora_rank"] == 32
    back, _ = read_hf(tmp_path / "g")
    assert canonical(back) == canonical(d)


def test_mla_import_errors(tmp_path, cases):
    d = cases["q0_structured"]
    _, weights, _ = make_case(d)
    export_hf(weights, d, target_config(d), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_interleave"] = False
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="rope_interleave false is not supported"):
        read_hf(tmp_path / "m")
    cfg["rope_interleave"] = True
    cfg["kv_lora_rank"] = 0
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="--kv-lora-rank must be > 0"):
        read_hf(tmp_path / "m")
    # a weight that does not fit the MLA config
    bad = dict(weights)
    bad["layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(3, 16)
    with pytest.raises(ExportError, match="kv_b_proj.weight' has shape"):
        export_hf(bad, d, target_config(d), tmp_path / "bad")


def test_transformer_engine_spec_refuses_mla():
    from megaspark.models.dspark import te_spec

    with pytest.raises(ConfigError, match="--draft-attention mla .*--transformer-impl transformer_engine"):
        te_spec.select_layer_spec("transformer_engine", False, "mla")
    with pytest.raises(ConfigError, match="--draft-attention mla"):
        te_spec.get_te_layer_spec(False, "mla")
    from megaspark.models.dspark.mla import DualSourceMLASubmodules

    spec = te_spec.select_layer_spec(None, False, "mla")  # unset --transformer-impl: local
    assert isinstance(spec.self_attention, DualSourceMLASubmodules)


def test_tiny_deepseek_target_hidden_states_load(deepseek_dir):
    from megaspark.targets.hf import HFTargetProvider

    provider = HFTargetProvider(deepseek_dir, layer_ids=[1, 2, 3])
    ids = torch.randint(0, 312, (2, 11), generator=torch.Generator().manual_seed(3))
    out = provider.compute(ids)
    with torch.no_grad():
        full = provider.model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hs = full.hidden_states
    assert out.aux_hidden_states.shape == (2, 11, 3 * 64)
    assert torch.equal(out.aux_hidden_states, torch.cat([hs[2], hs[3], hs[4]], dim=-1))
    logits = out.last_hidden_states @ provider.lm_head_weight().t()
    assert torch.allclose(logits, full.logits, atol=1e-5)
    d = deepseek_config(deepseek_dir)
    assert d.context_width == out.aux_hidden_states.shape[-1]


# =====================================================================================
# megatron: one launch, TP = 2 then TP = 1
# =====================================================================================

REPLICATED = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")


def _run(d, weights, batch, tp):
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict

    model = dc.build_model(d, weights, tp=tp)
    inputs = dc.draft_inputs(d, batch)
    sums = model(inputs)
    loss = sums.loss(d.alpha_ce, d.alpha_l1, d.alpha_conf)
    loss.backward()
    local = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None and not getattr(p, "tensor_model_parallel", False)
             and ".self_attention." in n}
    return dict(loss=float(loss), ce=float(sums.ce_sum), den=float(sums.denominator),
                grads=hf_state_dict(model, grads=True), local_replicated=local)


def _hf_layer_check(d, weights):
    """One MLA layer (layer 0's attention) against transformers' DeepseekV3Attention on the
    sequence [C; Y] with the block mask, and with the cached path against plain attention."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    from megaspark.blocks import dense_attention_mask
    from tests.spec_invariants import leak_batch

    batch = leak_batch(d)  # dummy blocks and a block anchored at 0
    rope = {"rope_theta": d.rope_theta, "rope_type": "default"}
    if d.rope_yarn:
        rope = {"rope_theta": d.rope_theta, "rope_type": "yarn", **d.rope_yarn}
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=d.hidden_size, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_attention_heads, q_lora_rank=d.q_lora_rank or None,
        kv_lora_rank=d.kv_lora_rank, qk_nope_head_dim=d.qk_nope_head_dim,
        qk_rope_head_dim=d.qk_rope_head_dim, v_head_dim=d.v_head_dim, rms_norm_eps=d.rms_norm_eps,
        max_position_embeddings=d.max_position_embeddings, rope_parameters=rope, rope_interleave=True,
    )
    hf_cfg._attn_implementation = "eager"
    hf_attn = DeepseekV3Attention(hf_cfg, layer_idx=0).double()
    prefix = "layers.0.self_attn."
    hf_attn.load_state_dict({k[len(prefix):]: v.double() for k, v in weights.items() if k.startswith(prefix)})
    model = dc.build_model(d, weights, tp=1)
    inputs = dc.draft_inputs(d, batch)
    attn_inputs = model.attention_inputs(inputs)
    S = inputs.seq_len
    g = torch.Generator().manual_seed(7)
    b, rows = inputs.noise_ids.shape
    context = torch.randn(S, b, d.hidden_size, generator=g)
    block = torch.randn(rows, b, d.hidden_size, generator=g)
    attention = model.layers[0].self_attention
    with torch.no_grad():
        ours = attention(context, block, attn_inputs).transpose(0, 1)  # [b, rows, H]
        allowed = dense_attention_mask(inputs.anchors, inputs.keep, S, inputs.block_size)  # [b, rows, S+rows]
        full = torch.ones(b, S + rows, S + rows, dtype=torch.bool)
        full[:, S:] = allowed
        mask = torch.zeros(b, 1, S + rows, S + rows, dtype=torch.float64).masked_fill(~full[:, None], -1e300)
        x = torch.cat([context, block]).transpose(0, 1).double()
        cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, inputs.position_ids)
        theirs, _ = hf_attn(x, (cos, sin), mask)
        theirs = theirs[:, S:]
        # inference: no context, one block of 4 rows at positions 5..8, no mask
        blk = block[:4]
        pos = torch.arange(5, 9)[None].expand(b, -1)
        bc, bs = model.rope(pos)
        cached = attention.forward_cached(None, blk, None, None, bc, bs, {}).transpose(0, 1)
        xb = blk.transpose(0, 1).double()
        cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(xb, pos)
        plain, _ = hf_attn(xb, (cos, sin), None)
    row_kept = inputs.keep.repeat_interleave(inputs.block_size, dim=1)
    return dict(ours=ours, theirs=theirs.float(), row_kept=row_kept, cached=cached, plain=plain.float())


def _leak(d, weights, tp):
    """Block j's h under perturbations of what it must not see (context >= a_j, other blocks'
    noise ids and positions) and of what it must see (context a_j - 1, its own last slot)."""
    from tests.spec_invariants import leak_batch

    g = torch.Generator().manual_seed(11)
    batch = leak_batch(d)
    model = dc.build_model(d, weights, tp=tp)
    inputs = dc.draft_inputs(d, batch)

    def h(**changes):
        with torch.no_grad():
            return model(dataclasses.replace(inputs, labels=None, **changes)).clone()

    base = h()
    cases = dc.leak_cases(d, inputs, h, g)
    return dict(base=base, cases=cases)


def _backbone(d, weights, batch, tp):
    """Training forward (full context + block mask) vs inference forward (latent cache
    filled in two increments, then one block without mask), for several anchors."""
    from megaspark.blocks import build_blocks
    from megaspark.models.dspark.model import DraftInputs

    model = dc.build_model(d, weights, tp=tp)
    ids, mask = batch["input_ids"][:1], torch.ones_like(batch["loss_mask"][:1])
    feats = batch["target_hidden_states"][:1]
    S = ids.shape[1]
    out = {}
    for a in (0, 1, 6, 11):
        blocks = build_blocks(ids, mask, torch.tensor([[a]]), torch.tensor([[True]]), block_size=d.block_size,
                              mask_token_id=d.mask_token_id, gamma=d.gamma, convention=d.convention)
        inputs = DraftInputs.from_blocks(blocks, feats)
        inputs.labels = None
        with torch.no_grad():
            h_train = model(inputs)[0, 0]
        split, cache = a // 2, []
        blk_pos = blocks.position_ids[:, S:]
        if split > 0:
            model.inference_forward(feats[:, :split], torch.arange(split)[None], blocks.noise_ids, blk_pos,
                                    cache)
        h_inf = model.inference_forward(feats[:, split:a], torch.arange(split, a)[None], blocks.noise_ids,
                                        blk_pos, cache)[0]
        shapes = {k: tuple(v.shape) for k, v in cache[0].items()} if cache and cache[0] else {}
        out[a] = (h_train, h_inf, shapes)
    return out


def _export_round_trip(d, weights, batch, out_dir):
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict

    model = dc.build_model(d, weights, tp=1)
    inputs = dc.draft_inputs(d, batch)
    export_hf(hf_state_dict(model), d, target_config(d), out_dir, target_name="fake")
    loaded, d2 = load_draft(out_dir)
    with torch.no_grad():
        h1 = model(dataclasses.replace(inputs, labels=None))
        h2 = loaded(dataclasses.replace(inputs, labels=None))
        logits1 = h1 @ model.output_layer.weight.t()
        logits2 = h2 @ loaded.output_layer.weight.t()
        l1 = float(model(inputs).loss(d.alpha_ce, d.alpha_l1, d.alpha_conf))
        l2 = float(loaded(inputs).loss(d.alpha_ce, d.alpha_l1, d.alpha_conf))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # speculative decoding's proposer on the loaded draft: the latent cache filled over two
    # calls proposes what one call with the whole context proposes
    from megaspark.inference.draft import DraftProposer

    feats, ids = batch["target_hidden_states"][0], batch["input_ids"][0]
    incremental = DraftProposer(loaded)
    incremental.propose(int(ids[5]), 5, feats[:5])
    p_inc = incremental.propose(int(ids[9]), 9, feats[5:9])
    p_once = DraftProposer(loaded).propose(int(ids[9]), 9, feats[:9])
    return dict(logits=(logits1, logits2), loss=(l1, l2), same_config=canonical(d2) == canonical(d),
                trainable=trainable, proposals=(p_inc.tokens, p_once.tokens, p_inc.confidences,
                                                p_once.confidences), drafts=d.drafts_per_block)


def _checkpoint(d, weights, tp, ckpt):
    """Save the model's sharded state dict at TP = 2, load it at TP = 1: the global HF tensors
    survive (replicated latent projections, head-split kv_b / q_b)."""
    from megatron.core import dist_checkpointing

    from megaspark.models.dspark.model import DSparkModel
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict

    if tp == 2:
        model = dc.build_model(d, weights, tp=tp)
        os.makedirs(ckpt, exist_ok=True)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, ckpt)
        return None
    model = DSparkModel(d.transformer_config(tensor_model_parallel_size=1), d, seed=99)  # other init
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt)
    with torch.no_grad():
        model.load_state_dict(loaded["model"], strict=True)
    got = hf_state_dict(model)
    return {k: float((got[k] - weights[k]).abs().max()) for k in weights}


def _worker(rank, world_size, configs, tmp):
    import time

    from megaspark.parallel import initialize_distributed

    from megaspark.training.checkpointing import prestart_checkpoint_writer

    prestart_checkpoint_writer()  # before any process group (see its docstring)
    out = {}
    t0 = time.time()
    for tp in (2, 1):
        initialize_distributed(tensor_model_parallel_size=tp)
        d = configs["q12_dense_gated"]
        out[("checkpoint", tp)] = _checkpoint(d, make_case(d)[1], tp, os.path.join(tmp, "ckpt"))
        for name, d in configs.items():
            _, weights, batch = make_case(d)
            out[("run", tp, name)] = _run(d, weights, batch, tp)
        for name in ("q0_structured", "q12_dense_gated"):
            d = configs[name]
            _, weights, _ = make_case(d, seed=61)
            out[("leak", tp, name)] = _leak(d, weights, tp)
        for name in ("q0_structured", "q12_yarn_D_rnn", "deepseek_tiny"):
            d = configs[name]
            _, weights, batch = make_case(d, Bt=1, S=16)
            out[("backbone", tp, name)] = _backbone(d, weights, batch, tp)
        if tp == 1:
            for name in ("q0_structured", "q12_yarn_D_rnn"):
                d = configs[name]
                _, weights, _ = make_case(d)
                out[("hf", name)] = _hf_layer_check(d, weights)
            for name in ("q12_dense_gated", "deepseek_tiny"):
                d = configs[name]
                _, weights, batch = make_case(d)
                out[("export", name)] = _export_round_trip(d, weights, batch,
                                                           os.path.join(tmp, f"{name}-{rank}"))
    out["seconds"] = time.time() - t0
    return out


@pytest.fixture(scope="module")
def results(cases, tmp_path_factory):
    return run_distributed(_worker, 2, cases, str(tmp_path_factory.mktemp("mla_exports")))


_REFERENCE_CACHE: dict = {}


def _reference(d):
    key = json.dumps(d.to_dict(), sort_keys=True)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = _reference_uncached(d)
    return _REFERENCE_CACHE[key]


def _reference_uncached(d):
    rc, weights, batch = make_case(d)
    w64 = {k: v.double().requires_grad_(k not in FROZEN) for k, v in weights.items()}
    b64 = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    ref = reference.reference_forward_loss(w64, rc, b64)
    ref["loss"].backward()
    return ref, {k: v.grad for k, v in w64.items() if v.grad is not None}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(CASES) + ["deepseek_tiny", "gqa_yarn"])
def test_loss_and_every_gradient_match_the_reference(results, cases, name, tp):
    ref, ref_grads = _reference(cases[name])
    assert float(ref["loss"].detach()) > 0
    for rank_results in results:  # both ranks hold the full (replicated) result
        got = rank_results[("run", tp, name)]
        ref_loss = float(ref["loss"].detach())
        assert abs(got["loss"] - ref_loss) < TOL, (got["loss"], ref_loss)
        assert abs(got["den"] - float(ref["denominator"])) < TOL
        assert set(got["grads"]) == set(ref_grads), set(got["grads"]) ^ set(ref_grads)
        for key, grad in got["grads"].items():
            assert float(ref_grads[key].abs().max()) > 0, key  # every gradient is exercised
            diff = float((grad.double() - ref_grads[key]).abs().max())
            assert diff < TOL, (key, diff)


@pytest.mark.parametrize("name", list(CASES) + ["deepseek_tiny", "gqa_yarn"])
def test_tp2_equals_tp1_and_replicated_grads_are_identical(results, name):
    a, b = results[0][("run", 1, name)], results[0][("run", 2, name)]
    assert abs(a["loss"] - b["loss"]) < TOL
    for key in a["grads"]:
        assert float((a["grads"][key] - b["grads"][key]).abs().max()) < TOL, (name, key)
    r0 = results[0][("run", 2, name)]["local_replicated"]
    r1 = results[1][("run", 2, name)]["local_replicated"]
    expected = {"linear_kv_down_proj", "kv_down_layernorm"} | (
        {"linear_q_down_proj", "q_down_layernorm"} if "q12" in name or name == "deepseek_tiny" else set())
    if name == "gqa_yarn":
        expected = set()
    assert {n.split(".")[3] for n in r0} == expected
    for n in r0:  # full, identical gradients on both TP ranks without any post-hoc reduction
        assert torch.equal(r0[n], r1[n]), n
        assert float(r0[n].abs().max()) > 0, n


@pytest.mark.parametrize("name", ["q0_structured", "q12_yarn_D_rnn"])
def test_one_layer_matches_transformers_deepseek_v3_attention(results, name):
    r = results[0][("hf", name)]
    kept = r["row_kept"]
    assert kept.any() and not kept.all()  # the batch has dummy blocks, which HF cannot express
    diff = (r["ours"] - r["theirs"]).abs()[kept]
    assert float(diff.max()) < 1e-5 and float(r["theirs"][kept].abs().max()) > 1e-3
    assert float((r["ours"][~kept]).abs().max()) == 0.0  # dummy rows see nothing → 0
    assert float((r["cached"] - r["plain"]).abs().max()) < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ["q0_structured", "q12_dense_gated"])
def test_leak(results, name, tp):
    r = results[0][("leak", tp, name)]
    kinds = set()
    for b, j, what, must_change, h in r["cases"]:
        diff = float((h[b, j] - r["base"][b, j]).abs().max())
        kinds.add(what)
        if must_change:
            assert diff > 1e-4, (b, j, what, diff)
        else:
            assert diff < 1e-6, (b, j, what, diff)
    assert kinds == {"context>=a", "other blocks", "context a-1", "own last slot"}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ["q0_structured", "q12_yarn_D_rnn", "deepseek_tiny"])
def test_train_and_cached_inference_backbone_agree(results, cases, name, tp):
    d = cases[name]
    r = results[0][("backbone", tp, name)]
    for a, (h_train, h_inf, shapes) in r.items():
        assert float((h_train - h_inf).abs().max()) < 1e-5, (name, tp, a)
        if a > 0:  # the cache holds the compressed latent and the rotated rope key only
            assert shapes == {"latent": (1, 1, a, d.kv_lora_rank), "k_pe": (1, 1, a, d.qk_rope_head_dim)}
    assert float((r[1][0] - r[11][0]).abs().max()) > 1e-3  # not vacuous


@pytest.mark.parametrize("name", ["q12_dense_gated", "deepseek_tiny"])
def test_export_round_trip_gives_identical_logits(results, cases, name):
    for rank_results in results:
        r = rank_results[("export", name)]
        assert r["same_config"]
        assert torch.equal(*r["logits"])
        assert r["loss"][0] == r["loss"][1]
        assert r["trainable"] == parameter_counts(cases[name])["trainable"]
        inc, once, c_inc, c_once = r["proposals"]
        assert len(inc) == r["drafts"] and inc == once
        assert max(abs(a - b) for a, b in zip(c_inc, c_once)) < 1e-5


def test_checkpoint_saved_at_tp2_loads_at_tp1(results):
    for rank_results in results:
        diffs = rank_results[("checkpoint", 1)]
        assert any("kv_b_proj" in k for k in diffs) and any("q_a_proj" in k for k in diffs)
        assert max(diffs.values()) == 0.0, {k: v for k, v in diffs.items() if v}
