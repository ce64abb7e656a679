"""Speculative decoding with Eagle3 drafts (issue 16, item 5; megaspark/inference/eagle3.py):
the chain drafting forward equals the training forward under teacher forcing (so a draft
proposes what it was trained to), greedy decoding is lossless (identical to the target's
greedy continuation) with random drafts of several chain lengths, and at T = 1 the first
three tokens follow the target's exact distribution (χ²). The MLA draft (DeepSeek-V3 latent
attention) is checked the same way for teacher forcing and greedy losslessness."""
from __future__ import annotations

import pytest
import torch

from tests.launcher import run_distributed
from tests.test_speculative import (MIN_P_VALUE, _exact_three_token_distribution, _tiny_vocab_target,
                                    chi_square)

TAPS = [0, 1, 2]
CHI2_SAMPLES = 1500


def _draft(target, draft_vocab=8, ttt=3, scale=1.0, seed=0, mla=False):
    from megaspark.models.eagle3.model import Eagle3Config, Eagle3Draft

    cfg = target.config
    heads = cfg.num_attention_heads
    shape = (dict(num_query_groups=heads, kv_channels=4, attention_type="mla", kv_lora_rank=12, qk_nope_head_dim=6,
                  qk_rope_head_dim=4, v_head_dim=5) if mla else
             dict(num_query_groups=cfg.num_key_value_heads, kv_channels=cfg.hidden_size // heads))
    e = Eagle3Config(hidden_size=cfg.hidden_size, num_attention_heads=heads, **shape,
                     ffn_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                     draft_vocab_size=draft_vocab, ttt_steps=ttt, init_std=0.2)
    ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values
    model = Eagle3Draft(e.transformer_config(1), e, ids, seed=seed).eval()
    with torch.no_grad():
        model.embedding.weight.copy_(target.model.embed_tokens.weight)
        model.lm_head.weight.mul_(scale)
    return model


@torch.no_grad()
def _teacher_forcing(target, mla=False):
    from megaspark.inference.eagle3 import Eagle3Proposer

    model = _draft(target, ttt=4, scale=20.0, mla=mla)
    g = torch.Generator().manual_seed(1)
    S, H = 16, target.config.hidden_size
    x = torch.randint(0, target.config.vocab_size, (1, S), generator=g)
    aux = torch.randn(S, 1, 3 * H, generator=g)
    train = model(x, aux)  # T × [S, 1, N]
    out = []
    for p in (0, 5, 9):
        prop = Eagle3Proposer(model, num_tokens=4)
        if p > 2:  # the context arrives in two pieces, as rounds deliver it
            prop.propose(aux[:3, 0], x[0, 1:4].tolist())
            prop.reset()
            prop.propose(aux[:3, 0], x[0, 1:4].tolist(), forced=[0, 0, 0, 0])
            _, _, z = prop.propose(aux[3:p + 1, 0], x[0, 4:p + 2].tolist(), forced=x[0, p + 2:p + 6].tolist())
        else:
            _, _, z = prop.propose(aux[:p + 1, 0], x[0, 1:p + 2].tolist(), forced=x[0, p + 2:p + 6].tolist())
        want = torch.stack([train[t][p, 0] for t in range(4)])
        out.append((z, want))
    return out


def _worker(rank, world_size):
    from megaspark.inference import TargetDecoder
    from megaspark.inference.eagle3 import Eagle3SpeculativeDecoder
    from megaspark.parallel import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=1)
    target = _tiny_vocab_target()
    res = {"teacher": _teacher_forcing(target) + _teacher_forcing(target, mla=True), "greedy": [], "chi2": None}
    plain = TargetDecoder(target)
    for k, seed, mla in ((1, 0, False), (3, 1, False), (5, 2, False), (2, 3, True), (4, 4, True)):
        spec = Eagle3SpeculativeDecoder(_draft(target, seed=seed, scale=10.0, mla=mla), target, TAPS,
                                        num_speculative_tokens=k)
        for prompt in ([1, 2, 3], [5, 7, 1, 1, 0, 9]):
            a = spec.generate(prompt, 20).tokens
            b = plain.generate(prompt, 20).tokens
            res["greedy"].append((k, a, b, spec.generate(prompt, 20).stats.acceptance_length()))
    spec = Eagle3SpeculativeDecoder(_draft(target, scale=10.0), target, TAPS, num_speculative_tokens=2)
    V = target.config.vocab_size
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    prompt = [1, 2, 3, 4]
    for i in range(CHI2_SAMPLES):
        a, b, c = spec.generate(prompt, 3, temperature=1.0, generator=i).tokens
        counts[a, b, c] += 1
    res["chi2"] = (counts, _exact_three_token_distribution(target, prompt, 1.0))
    return res


@pytest.fixture(scope="module")
def engine():
    return run_distributed(_worker, 1)[0]


def test_chain_drafting_equals_the_training_forward(engine):
    for got, want in engine["teacher"]:
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_greedy_is_lossless(engine):
    accepted = []
    for k, spec, plain, tau in engine["greedy"]:
        assert spec == plain, (k, spec, plain)
        accepted.append(tau)
    assert len(engine["greedy"]) == 10  # 3 GQA and 2 MLA drafts, 2 prompts each


def test_sampling_matches_the_target_distribution(engine):
    counts, exact = engine["chi2"]
    assert int(counts.sum()) == CHI2_SAMPLES
    for obs, probs in ((counts, exact), (counts.sum(2), exact.sum(2)), (counts.sum((0, 1)), exact.sum((0, 1)))):
        stat, dof, pval = chi_square(obs, probs)
        assert pval > MIN_P_VALUE, (stat, dof, pval)


SMOL_NEW = 24


def _smollm2_worker(rank, world_size):
    from megaspark.inference import TargetDecoder
    from megaspark.inference.eagle3 import Eagle3SpeculativeDecoder
    from megaspark.models.eagle3.model import Eagle3Config, Eagle3Draft
    from megaspark.parallel import initialize_distributed
    from megaspark.targets.hf import HFTargetProvider

    initialize_distributed(tensor_model_parallel_size=1)
    taps = [1, 14, 26]  # Eagle3's default rule for SmolLM2's 30 layers
    provider = HFTargetProvider("builtin:smollm2-135m", layer_ids=taps)
    target, tok = provider.model, provider.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                   tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    out = {"ref": TargetDecoder(target).generate(prompt, SMOL_NEW).tokens}
    cfg = target.config
    for mla in (False, True):
        shape = (dict(attention_type="mla", num_query_groups=8, kv_channels=36, kv_lora_rank=288,
                      qk_nope_head_dim=72, qk_rope_head_dim=36, v_head_dim=72) if mla
                 else dict(num_query_groups=4, kv_channels=72))
        e = Eagle3Config(hidden_size=cfg.hidden_size, num_attention_heads=8, **shape,
                         ffn_hidden_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, draft_vocab_size=4096,
                         ttt_steps=3)
        ids = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(int(mla)))[:4096].sort().values
        model = Eagle3Draft(e.transformer_config(1), e, ids).eval()
        with torch.no_grad():
            model.embedding.weight.copy_(target.model.embed_tokens.weight)
        spec = Eagle3SpeculativeDecoder(model, target, taps, num_speculative_tokens=3)
        res = spec.generate(prompt, SMOL_NEW)
        out["mla" if mla else "gqa"] = (res.tokens, res.stats.acceptance_length())
    return out


@pytest.mark.slow
def test_greedy_lossless_with_smollm2():
    """Random GQA and MLA Eagle3 drafts of SmolLM2's shape against the real SmolLM2-135M:
    greedy speculative decoding gives exactly the target's greedy continuation."""
    out = run_distributed(_smollm2_worker, 1)[0]
    assert len(out["ref"]) == SMOL_NEW
    for variant in ("gqa", "mla"):
        tokens, tau = out[variant]
        assert tokens == out["ref"], variant
        assert tau >= 1.0
