"""Shared tiny DSpark cases for model tests: a DSparkConfig, the matching reference cfg,
global HF-named weights and a batch, plus the in-process runner used inside spawned ranks."""

from __future__ import annotations

import copy

import torch

from megaspark.config import DSparkConfig
from tests import reference

BASE = dict(
    hidden_size=32,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=8,
    ffn_hidden_size=48,
    vocab_size=64,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    target_model_type="llama",
    num_target_layers=6,
    target_layer_ids=[1, 3],
    block_size=4,
    num_anchors=5,
    mask_token_id=7,
    markov_rank=6,
    markov_head_type="vanilla",
    confidence_head=True,
    confidence_with_markov=True,
    gamma=4.0,
    convention="S",
    alpha_ce=0.3,
    alpha_l1=0.9,
    alpha_conf=1.0,
    attention_chunk_blocks=2,
    loss_chunk_rows=7,
)

# name -> overrides; together: every head variant, both conventions, confidence on/off,
# q/k norm (a Qwen3 target, and a Llama target as every new draft has; the others are
# --no-qk-norm drafts), q/k/v bias (Qwen2), both attention backends.
CASES = {
    "S_vanilla_conf": {},
    "S_gated_conf_nomarkov": dict(markov_head_type="gated", confidence_with_markov=False, qk_norm=True),
    "S_rnn_conf": dict(markov_head_type="rnn"),
    "S_dflash_rank0_noconf": dict(markov_rank=0, confidence_head=False, alpha_ce=1.0, alpha_l1=0.0),
    "S_vanilla_noconf_qwen3": dict(confidence_head=False, qk_norm=True, target_model_type="qwen3"),
    "D_vanilla_conf": dict(convention="D", gamma=7.0),
    "D_gated_conf": dict(convention="D", markov_head_type="gated"),
    "D_rnn_noconf_bias": dict(
        convention="D", markov_head_type="rnn", confidence_head=False, attention_bias=True,
        target_model_type="qwen2",
    ),
    "S_dense_backend": dict(attention_backend="dense", markov_head_type="gated"),
}


def make_config(name: str) -> DSparkConfig:
    fields = dict(BASE)
    fields.update(CASES[name])
    return DSparkConfig(**fields).validate()


def reference_cfg(d: DSparkConfig) -> dict:
    return dict(
        hidden_size=d.hidden_size,
        num_layers=d.num_layers,
        num_heads=d.num_attention_heads,
        num_kv_heads=d.num_query_groups,
        head_dim=d.kv_channels,
        intermediate_size=d.ffn_hidden_size,
        num_tapped_layers=len(d.target_layer_ids),
        rms_norm_eps=d.rms_norm_eps,
        rope_theta=d.rope_theta,
        qk_norm=d.qk_norm,
        attention_bias=d.attention_bias,
        vocab_size=d.vocab_size,
        block_size=d.block_size,
        mask_token_id=d.mask_token_id,
        num_anchors=d.num_anchors,
        markov_rank=d.markov_rank,
        markov_head_type=d.markov_head_type,
        confidence_head=d.confidence_head,
        confidence_with_markov=d.confidence_with_markov,
        gamma=d.gamma,
        convention=d.convention,
        truncate_eval_mask=d.truncate_eval_mask,
        alpha_ce=d.alpha_ce,
        alpha_l1=d.alpha_l1,
        alpha_conf=d.alpha_conf,
    )


def make_case(name: str, seed: int = 0, Bt: int = 2, S: int = 14):
    d = make_config(name)
    rc = reference_cfg(d)
    weights = reference.random_weights(rc, seed, L=len(d.target_layer_ids))
    batch = reference.random_batch(rc, Bt, S, len(d.target_layer_ids), seed + 1)
    return d, rc, weights, batch


def draft_inputs(d: DSparkConfig, batch: dict):
    from megaspark.blocks import build_blocks
    from megaspark.models.dspark.model import DraftInputs

    blocks = build_blocks(
        batch["input_ids"], batch["loss_mask"], batch["anchors"], batch["keep"],
        block_size=d.block_size, mask_token_id=d.mask_token_id, gamma=d.gamma,
        convention=d.convention, truncate_eval_mask=d.truncate_eval_mask,
    )
    return DraftInputs.from_blocks(
        blocks, batch["target_hidden_states"], batch["target_last_hidden_states"]
    )


def build_model(d: DSparkConfig, weights: dict, tp: int = 1, pp: int = 1):
    """Inside an initialised process group: a DSparkModel at the current layout holding
    ``weights`` (global HF names)."""
    from megaspark.models.dspark.model import DSparkModel
    from megaspark.models.dspark.state_dict_adapter import load_hf_state_dict

    tcfg = d.transformer_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = DSparkModel(tcfg, d)
    load_hf_state_dict(model, weights)
    return model


def run_case(d: DSparkConfig, weights: dict, batch: dict, tp: int) -> dict:
    """Forward + backward of one case at the current layout; global results."""
    from megaspark.models.dspark.state_dict_adapter import hf_state_dict

    model = build_model(d, weights, tp=tp)
    inputs = draft_inputs(d, batch)
    sums = model(inputs)
    loss = sums.loss(d.alpha_ce, d.alpha_l1, d.alpha_conf)
    loss.backward()
    den = sums.denominator
    with torch.no_grad():  # evaluation: L1 and the acceptance metrics even where training skips them
        ev = model(inputs)
    return dict(
        eval_l1_loss=(ev.l1_sum / (ev.denominator + 1e-6)),
        eval_metrics={k: (float(v[0]), float(v[1])) for k, v in ev.metrics.items()},
        loss=loss.detach(),
        ce_loss=(sums.ce_sum / (den + 1e-6)).detach(),
        l1_loss=(sums.l1_sum / (den + 1e-6)).detach(),
        confidence_loss=(sums.conf_sum / (den + 1e-6)).detach(),
        denominator=den,
        metrics={k: (float(v[0]), float(v[1])) for k, v in sums.metrics.items()},
        grads=hf_state_dict(model, grads=True),
    )


def clone_cfg(cfg: dict, **overrides) -> dict:
    out = copy.deepcopy(cfg)
    out.update(overrides)
    return out


def leak_cases(d: DSparkConfig, inputs, h_with, generator: torch.Generator) -> list:
    """§13 item 11 perturbations: for every kept block j, ``h_with(**changed inputs)`` under
    changes block j must not see (context ≥ a_j, other blocks' noise ids and positions) and
    ones it must see (context a_j − 1, its own last slot). Returns (sample, block, what
    changed, must h[sample, block] change?, new h) tuples."""
    B, S = d.block_size, inputs.seq_len
    g = generator
    cases = []
    for b in range(inputs.keep.shape[0]):
        for j in range(inputs.keep.shape[1]):
            if not bool(inputs.keep[b, j]):
                continue
            a = int(inputs.anchors[b, j])
            f = inputs.context_features.clone()
            f[b, a:] += 5.0 * torch.randn(f[b, a:].shape, generator=g)
            cases.append((b, j, "context>=a", False, h_with(context_features=f)))
            noise = inputs.noise_ids.clone()
            pos = inputs.position_ids.clone()
            for jj in range(inputs.keep.shape[1]):
                if jj != j:
                    noise[b, jj * B:(jj + 1) * B] = torch.randint(0, d.vocab_size, (B,), generator=g)
                    pos[b, S + jj * B:S + (jj + 1) * B] += 3
            cases.append((b, j, "other blocks", False, h_with(noise_ids=noise, position_ids=pos)))
            if a >= 1:
                f = inputs.context_features.clone()
                f[b, a - 1] += 5.0 * torch.randn(f[b, a - 1].shape, generator=g)
                cases.append((b, j, "context a-1", True, h_with(context_features=f)))
            noise = inputs.noise_ids.clone()  # slot 0 sees later slots of its own block
            noise[b, j * B + B - 1] = (noise[b, j * B + B - 1] + 1) % d.vocab_size
            cases.append((b, j, "own last slot", True, h_with(noise_ids=noise)))
    return cases
