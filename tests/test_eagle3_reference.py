"""Self-checks of the independent Eagle3 reference (tests/eagle3_reference.py), which
megaspark's Eagle3 draft (issue 16) will be tested against: its test-time-training
attention equals the cache formulation engines and SpecForge use (step-0 keys causal, each
later step's key at the query's own position), no step sees a future position, and the
label masks follow the definition."""
from __future__ import annotations

import torch

from tests import eagle3_reference as ref

CFG = dict(hidden_size=16, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=24,
           rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=40, draft_vocab_size=24, ttt_steps=4)


def cache_step_attention(q, ks, vs, scale):
    """The cache formulation: scores against step 0's keys (causal) and, for each later
    step, one score against that step's key at the same position; one softmax."""
    b, nh, S, hd = q.shape
    rep = nh // ks[0].shape[1]
    k0, v0 = (x.repeat_interleave(rep, dim=1) for x in (ks[0], vs[0]))
    s0 = torch.einsum("bhqd,bhkd->bhqk", q, k0) * scale
    s0 = s0.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), torch.finfo(q.dtype).min)
    diag = [(q * k.repeat_interleave(rep, dim=1)).sum(-1, keepdim=True) * scale for k in ks[1:]]
    p = torch.softmax(torch.cat([s0, *diag], dim=-1), dim=-1)
    out = p[..., :S] @ v0
    for i, v in enumerate(vs[1:]):
        out = out + p[..., S + i:S + i + 1] * v.repeat_interleave(rep, dim=1)
    return out


def inputs(seed=0, b=2, S=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (b, S), generator=g)
    mask = (torch.rand(b, S, generator=g) < 0.8).long()
    aux = torch.randn(b, S, 3 * CFG["hidden_size"], generator=g, dtype=torch.float64)
    tl = 3 * torch.randn(b, S, CFG["vocab_size"], generator=g, dtype=torch.float64)
    d2t = torch.randperm(CFG["vocab_size"], generator=g)[: CFG["draft_vocab_size"]].sort().values
    return ids, mask, aux, tl, d2t


def test_explicit_attention_equals_the_cache_formulation():
    hd = 8
    q, ks, vs = ref.random_steps(1, b=2, S=9, hd=hd, steps=4)
    for t in range(4):
        a = ref.explicit_step_attention(q, ks[:t + 1], vs[:t + 1], hd ** -0.5)
        c = cache_step_attention(q, ks[:t + 1], vs[:t + 1], hd ** -0.5)
        assert torch.allclose(a, c, atol=1e-12), t


def test_no_step_sees_a_future_position():
    w = ref.random_weights(CFG, 0)
    ids, _, aux, _, _ = inputs()
    base = ref.eagle3_forward(w, CFG, ids, aux)
    T, p0 = CFG["ttt_steps"], 5
    ids2, aux2 = ids.clone(), aux.clone()
    ids2[:, p0 + T + 1:] = (ids2[:, p0 + T + 1:] + 7) % CFG["vocab_size"]  # beyond every step's input
    aux2[:, p0 + 1:] += 1.0
    got = ref.eagle3_forward(w, CFG, ids2, aux2)
    assert torch.allclose(got[:, :, : p0 + 1], base[:, :, : p0 + 1], atol=1e-12)
    assert not torch.allclose(got[:, :, p0 + 1:], base[:, :, p0 + 1:])
    # positive control: step t at p0 reads the token x_{p0+1+t}
    for t in range(T):
        ids3 = ids.clone()
        ids3[:, p0 + 1 + t] = (ids3[:, p0 + 1 + t] + 3) % CFG["vocab_size"]
        changed = ref.eagle3_forward(w, CFG, ids3, aux)
        assert torch.allclose(changed[:t, :, p0], base[:t, :, p0], atol=1e-12)
        assert not torch.allclose(changed[t, :, p0], base[t, :, p0])


def test_label_masks_follow_the_definition():
    ids, mask, _, tl, d2t = inputs(2)
    outside = [i for i in range(CFG["vocab_size"]) if i not in set(d2t.tolist())]
    tl[0, 4, outside[0]] = 100.0  # the target's top token at position 4 is not drafted
    labels, masks = ref.eagle3_labels(CFG, ids, mask, tl, d2t)
    S = ids.shape[1]
    drafted = set(d2t.tolist())
    for t in range(CFG["ttt_steps"]):
        for p in range(S):
            j = p + 1 + t  # the target position whose distribution is the label
            want = j + 1 < S and bool(mask[0, j + 1]) and int(tl[0, j].argmax()) in drafted
            assert not (j == 4 and want)
            assert bool(masks[t, 0, p]) == want, (t, p)
            if j < S:
                assert torch.allclose(labels[t, 0, p], torch.softmax(tl[0, j, d2t], -1))
    assert masks.any() and not masks.all()


def test_loss_is_the_decayed_token_pooled_soft_ce_and_trains():
    w = {k: v.clone().requires_grad_(True) for k, v in ref.random_weights(CFG, 3).items()}
    ids, mask, aux, tl, d2t = inputs(4)
    out = ref.eagle3_loss(w, CFG, ids, mask, aux, tl, d2t)
    m = out["masks"].double()
    wt = torch.tensor([0.8 ** t for t in range(CFG["ttt_steps"])], dtype=torch.float64)[:, None, None]
    assert torch.allclose(out["loss"], (wt * m * out["ce"]).sum() / (wt * m).sum())
    assert all(0 <= a <= 1 for a in out["acc"]) and 1.0 <= out["tau"] <= 1 + CFG["ttt_steps"]
    trainable = [v for k, v in w.items() if k != "embed_tokens.weight"]
    opt = torch.optim.Adam(trainable, lr=3e-2)
    first = None
    for _ in range(30):
        loss = ref.eagle3_loss(w, CFG, ids, mask, aux, tl, d2t)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
