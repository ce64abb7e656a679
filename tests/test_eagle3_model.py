"""megaspark's tensor-parallel Eagle3 draft (megaspark/models/eagle3) against the
independent reference (tests/eagle3_reference.py, float64): per-step draft logits, the
decayed token-pooled soft-CE loss, the per-step accuracies and τ, and the gradient of every
trainable tensor, at TP = 1 and TP = 2 (with and without sequence parallelism), for the GQA
draft and the MLA (DeepSeek-V3-shaped) draft with and without a query rank (issue 16). The TTT attention equals attention over the
explicitly concatenated steps."""
from __future__ import annotations

import pytest
import torch

from tests import eagle3_reference as ref
from tests.launcher import run_distributed

CFG = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=24,
           rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=40, draft_vocab_size=24, ttt_steps=4)
# MLA: one KV head per query head, head_dim = the rope dims; nope, rope, value and latent
# widths all different (a shape mix-up cannot pass)
MLA = dict(CFG, attention="mla", num_kv_heads=4, head_dim=4, qk_nope_head_dim=6, qk_rope_head_dim=4,
           v_head_dim=5, kv_lora_rank=10, q_lora_rank=0)
CONFIGS = {"gqa": CFG, "mla": MLA, "mla_q_lora": dict(MLA, q_lora_rank=6)}
LAYOUTS = [(1, False), (2, False), (2, True)]  # (TP, sequence parallel)


def case(seed=0, b=2, S=12, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    w = ref.random_weights(cfg, seed)
    ids = torch.randint(0, CFG["vocab_size"], (b, S), generator=g)
    mask = (torch.rand(b, S, generator=g) < 0.85).long()
    aux = torch.randn(b, S, 3 * CFG["hidden_size"], generator=g, dtype=torch.float64)
    last = torch.randn(b, S, CFG["hidden_size"], generator=g, dtype=torch.float64)
    w_lm = torch.randn(CFG["vocab_size"], CFG["hidden_size"], generator=g, dtype=torch.float64)
    d2t = torch.randperm(CFG["vocab_size"], generator=g)[: CFG["draft_vocab_size"]].sort().values
    return w, ids, mask, aux, last, w_lm, d2t


def _config(cfg=CFG):
    from megaspark.models.eagle3.model import Eagle3Config

    mla = {k: cfg[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                               "v_head_dim") if k in cfg}
    return Eagle3Config(hidden_size=cfg["hidden_size"], num_attention_heads=cfg["num_heads"],
                        num_query_groups=cfg["num_kv_heads"], kv_channels=cfg["head_dim"],
                        ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                        draft_vocab_size=cfg["draft_vocab_size"], rms_norm_eps=cfg["rms_norm_eps"],
                        rope_theta=cfg["rope_theta"], ttt_steps=cfg["ttt_steps"],
                        attention_type=cfg.get("attention", "gqa"), **mla)


def _worker(rank, world_size):
    from megatron.core import parallel_state

    from megaspark.models.eagle3.model import Eagle3Draft, load_hf_tensors
    from megaspark.parallel import initialize_distributed

    out = {}
    for (tp, sp, variant) in [(tp, sp, v) for tp, sp in LAYOUTS for v in CONFIGS]:
        initialize_distributed(tensor_model_parallel_size=tp)
        cfg = CONFIGS[variant]
        e = _config(cfg)
        w, ids, mask, aux, last, w_lm, d2t = case(cfg=cfg)
        model = Eagle3Draft(e.transformer_config(tp, sequence_parallel=sp), e, d2t)
        assert model.sequence_parallel == sp
        load_hf_tensors(model, w, target_lm_head=w_lm)
        logits = model(ids, aux.float().transpose(0, 1).contiguous())
        sums = model.loss_sums(logits, ids, mask, last.float().transpose(0, 1).contiguous())
        loss = sums["num"] / sums["den"]
        loss.backward()
        if sp:  # what megatron's finalize_model_grads does: sum the norms' partial gradients over TP
            for p in model.parameters():
                if getattr(p, "sequence_parallel", False) and p.grad is not None:
                    torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
        out[(tp, sp, variant)] = {
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "loss": loss.item(),
            "logits": [z.detach() for z in logits],
            "correct": sums["correct"], "count": sums["count"], "chain": sums["chain"].item(),
            "positions": sums["positions"].item(),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        }
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2)


def _reference(variant):
    cfg = CONFIGS[variant]
    w, ids, mask, aux, last, w_lm, d2t = case(cfg=cfg)
    w = {k: v.clone().requires_grad_(k != "embed_tokens.weight") for k, v in w.items()}
    out = ref.eagle3_loss(w, cfg, ids, mask, aux, last @ w_lm.T, d2t)
    out["loss"].backward()
    out["grads"] = {k: v.grad for k, v in w.items() if v.grad is not None}
    return out


def _gather(per_rank: list, dim):
    return per_rank[0] if dim is None else torch.cat(per_rank, dim=dim)


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("tp,sp", LAYOUTS, ids=["tp1", "tp2", "tp2-sp"])
def test_eagle3_draft_matches_the_reference(results, tp, sp, variant):
    from megaspark.models.eagle3.model import state_dict_map

    reference = _reference(variant)
    cfg = CONFIGS[variant]
    ranks = sorted((r[(tp, sp, variant)] for r in results), key=lambda r: r["tp_rank"])
    if tp == 1:
        ranks = ranks[:1]
    assert ranks[0]["loss"] == pytest.approx(reference["loss"].item(), rel=1e-5)
    assert all(r["loss"] == ranks[0]["loss"] for r in ranks)
    logits = torch.stack([_gather([r["logits"][t] for r in ranks], -1) for t in range(cfg["ttt_steps"])])
    want = reference["logits"].permute(0, 2, 1, 3)  # [T, S, b, N]
    assert torch.allclose(logits.double(), want, atol=1e-5, rtol=1e-5)
    acc = (ranks[0]["correct"].double() / ranks[0]["count"].clamp(min=1)).tolist()
    assert acc == pytest.approx(reference["acc"], abs=1e-6)  # the reference divides in fp32
    assert 1 + ranks[0]["chain"] / ranks[0]["positions"] == pytest.approx(reference["tau"], abs=1e-9)
    names = state_dict_map(_config(cfg))
    assert set(hf for hf, _ in names.values()) == set(reference["grads"]) | {"embed_tokens.weight"}
    for name, (hf, dim) in names.items():
        if hf == "embed_tokens.weight":
            continue
        got = _gather([r["grads"][name] for r in ranks], dim).double()
        exp = reference["grads"][hf]
        assert torch.allclose(got, exp, atol=1e-5 * max(1.0, exp.abs().max().item()), rtol=1e-4), name
        if dim is None:  # replicated tensors: the same full gradient on every rank
            assert all(torch.equal(r["grads"][name], ranks[0]["grads"][name]) for r in ranks), name
    assert reference["masks"].any() and not reference["masks"].all()


def test_ttt_attention_equals_the_explicit_concatenation():
    from megaspark.models.eagle3.model import ttt_attention

    hd = 8
    q, ks, vs = ref.random_steps(5, b=2, S=10, hd=hd, steps=5)
    for t in range(5):
        got = ttt_attention(q, ks[:t + 1], vs[:t + 1], hd ** -0.5)
        want = ref.explicit_step_attention(q, ks[:t + 1], vs[:t + 1], hd ** -0.5)
        assert torch.allclose(got.double(), want, atol=1e-6), t
        # no future position: changing step-0 keys/values after p leaves rows ≤ p unchanged
        p = 4
        k2 = [k.clone() for k in ks[:t + 1]]
        v2 = [v.clone() for v in vs[:t + 1]]
        k2[0][:, :, p + 1:] += 1.0
        v2[0][:, :, p + 1:] += 1.0
        for s in range(1, t + 1):
            k2[s][:, :, p + 1:] += 1.0
        again = ttt_attention(q, k2, v2, hd ** -0.5)
        assert torch.allclose(again[:, :, : p + 1], got[:, :, : p + 1], atol=1e-12)


def test_config_refuses_impossible_shapes():
    e = _config()
    with pytest.raises(ValueError, match=r"attention heads \(--num-attention-heads = 4\) is not divisible by --tensor-model-parallel-size 3"):
        e.validate(3)
    import dataclasses

    with pytest.raises(ValueError, match="--draft-vocab-size 50"):
        dataclasses.replace(e, draft_vocab_size=50).validate()
    with pytest.raises(ValueError, match="--ttt-steps 0"):
        dataclasses.replace(e, ttt_steps=0).validate()
    # the MLA shape rules are DSpark's (one validator for both configs)
    m = _config(MLA).validate(2)
    with pytest.raises(ValueError, match=r"--num-query-groups \(2\) must equal --num-attention-heads \(4\)"):
        dataclasses.replace(m, num_query_groups=2).validate()
    with pytest.raises(ValueError, match="--kv-lora-rank must be > 0"):
        dataclasses.replace(m, kv_lora_rank=0).validate()
    with pytest.raises(ValueError, match="--kv-lora-rank only apply to --draft-attention mla"):
        dataclasses.replace(e, kv_lora_rank=8).validate()
