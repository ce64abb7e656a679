"""The fused vocab-parallel CE/L1 loss (megaspark.vocab_parallel_loss.vocab_parallel_ce_l1_sums, used by
dspark_loss_sums) against autograd of the plain full-vocabulary formula, at TP = 1 and TP = 2.

Every case: a draft hidden state h (a leaf standing in for the backbone), Markov features
built from it by one of the head variants (none, vanilla, gated, rnn — the fused Function
only sees feat/W2), a confidence logit from [h; W1[prev]], and the α-combination of CE, L1
and the confidence BCE over the shared denominator. Gradients of h, of the features (dfeat),
of the W2 shard, of the head parameters and of the confidence head are compared with float64
autograd of the unchunked, unsharded formula; the LM head stays frozen (no grad). fp32 runs
also match the previous implementation (per-row autograd under checkpointing,
vocab_parallel_ce_l1) within 1e-6; bf16 runs use a looser tolerance.

The batch has the structure of overlapping blocks: slots share a key (sample, target
position) and with it the target's hidden state and the previous token. With the rows
sorted and grouped by that key (``group_rows``, as the model does) the fused loss forms the
target's logits, and for the vanilla head the Markov bias and its gradient products, once
per group; those runs are checked the same way (the per-row feature gradient excepted for
the vanilla head: it reaches the group's first row, the gradient of W1 is compared).

TP = 2 runs in one two-process launch that checks every case; TP = 1 runs in-process.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.launcher import run_distributed

V, H, RANK = 48, 16, 5
BLOCKS = (2, 3, 4)  # b, N, B: 24 rows
HEADS = ("none", "vanilla", "gated", "rnn")
# (α_ce, α_l1, α_conf, need_l1): DFlash (no L1 at all), L1 for metrics only, DSpark with and
# without confidence, confidence only
ALPHAS = {
    "dflash": (1.0, 0.0, 0.0, False),
    "ce_l1_metrics": (1.0, 0.0, 0.0, True),
    "dspark": (0.1, 0.9, 1.0, True),
    "ce_l1_noconf": (0.3, 0.9, 0.0, True),
    "conf_only": (0.0, 0.0, 1.0, True),
}
CHUNKS = (5, 8, 1000)  # does not divide 24 (or the supervised count), divides 24, one chunk
FP32_TOL = 1e-6  # against the previous implementation (same precision)
REF_TOL = 1e-5  # fp32 against float64 autograd
BF16_TOL = 3e-2  # bf16: norm-wise relative (gradients), relative (loss, metrics)


def cases(dtypes=("float32", "bfloat16")):
    for head, alphas, chunk, rows, dtype in itertools.product(HEADS, ALPHAS, CHUNKS, (False, True), dtypes):
        if dtype == "bfloat16" and chunk != 5:
            continue  # bf16: one chunk size is enough
        yield (head, alphas, chunk, rows, dtype)


# ----------------------------------------------------------------------------- data
def make_params(seed: int = 0):
    """Global float64 master values (weights, inputs, batch) of one case family."""
    g = torch.Generator().manual_seed(seed)
    b, N, B = BLOCKS
    r = RANK
    p = dict(
        lm=torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H)),
        w2=torch.randn(V, r, generator=g) * 0.3,
        w1=torch.randn(V, r, generator=g) * 0.5,
        gate_w=torch.randn(r, H + r, generator=g) * 0.3,
        gate_b=torch.randn(r, generator=g) * 0.1,
        joint_w=torch.randn(3 * r, 2 * r + H, generator=g) * 0.3,
        joint_b=torch.randn(3 * r, generator=g) * 0.1,
        conf_w=torch.randn(1, H + r, generator=g) * 0.3,
        conf_b=torch.randn(1, generator=g) * 0.1,
        h=torch.randn(b, N, B, H, generator=g),
    )
    p["target"] = p["h"] + 0.7 * torch.randn(b, N, B, H, generator=g)
    p["labels"] = torch.randint(0, V, (b, N, B), generator=g)
    p["prev"] = torch.randint(0, V, (b, N, B), generator=g)
    # overlapping blocks: slots with the same (sample, position) key share the target's
    # hidden state and the previous token (those of the key's first slot)
    keys = torch.randint(0, 9, (b, N, B), generator=g) + 100 * torch.arange(b)[:, None, None]
    keys[0, 0, :2] = torch.tensor([-1, -2])  # two rows of their own, where draft and target
    flat_keys = keys.reshape(-1)              # agree exactly: |p_d − p_t| has zeros (sign 0)
    # (zero states: logits exactly 0 whatever the GEMM's shape, so p_d = p_t = 1/V exactly)
    first = {}
    for i, k in enumerate(flat_keys.tolist()):
        first.setdefault(k, i)
    src = torch.tensor([first[k] for k in flat_keys.tolist()])
    for name in ("target", "prev"):
        t = p[name].reshape(b * N * B, *p[name].shape[3:])
        p[name] = t[src].reshape(p[name].shape)
    p["h"][0, 0, :2] = 0.0
    p["target"][0, 0, :2] = 0.0
    p["keys"] = keys
    mask = torch.rand(b, N, B, generator=g) > 0.3
    mask[0, 0, 0] = True
    p["mask"] = mask
    p["weights"] = torch.exp(-torch.arange(B, dtype=torch.float64) / 4.0).expand(b, N, B) * mask
    p["keep"] = torch.ones(b, N, dtype=torch.bool)
    return {k: (v.double() if v.is_floating_point() else v) for k, v in p.items()}


TRAINABLE = ("h", "w2", "w1", "gate_w", "gate_b", "joint_w", "joint_b", "conf_w", "conf_b")


def features(head: str, p: dict, h: torch.Tensor):
    """(Markov feature f [b, N, B, r] or None, e = W1[prev]) for a head variant."""
    e = p["w1"][p["prev"]]
    if head == "none":
        return None, e
    if head == "vanilla":
        return e, e
    if head == "gated":
        return torch.sigmoid(torch.cat([h, e], -1) @ p["gate_w"].t() + p["gate_b"]) * e, e
    state, feats = torch.zeros_like(e[:, :, 0]), []
    for k in range(h.shape[2]):
        z = torch.cat([state, e[:, :, k], h[:, :, k]], -1) @ p["joint_w"].t() + p["joint_b"]
        g_raw, c_raw, o_raw = z.chunk(3, dim=-1)
        gate = torch.sigmoid(g_raw)
        state = gate * state + (1 - gate) * torch.tanh(c_raw)
        feats.append(torch.tanh(o_raw))
    return torch.stack(feats, dim=2), e


def leaves(p: dict, dtype, w2_slice=slice(None)):
    """Fresh leaves in ``dtype`` (the LM head and W2 restricted to this rank's vocab shard)."""
    out = {}
    for k, v in p.items():
        if v.is_floating_point():
            v = v[w2_slice] if k in ("w2", "lm") else v
            # the decay weights stay fp32, as the model's (blocks are built in fp32)
            v = v.to(torch.float32 if k == "weights" and dtype != torch.float64 else dtype).clone()
            if k in TRAINABLE:
                v.requires_grad_(True)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- the two sides
def naive_loss(p: dict, head: str, alphas) -> dict:
    """The plain formula, unchunked and unsharded, by autograd. Float64 leaves: exact; bf16
    leaves: the same precision scheme as the model (GEMMs in bf16, everything after in fp32)."""
    a_ce, a_l1, a_conf, _ = alphas
    acc = torch.float64 if p["h"].dtype == torch.float64 else torch.float32
    h = p["h"]
    feat, e = features(head, p, h)
    if feat is not None:
        feat.retain_grad()
    logits = (h @ p["lm"].t()).to(acc)
    if feat is not None:
        logits = logits + (feat @ p["w2"].t()).to(acc)
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, p["labels"][..., None]).squeeze(-1)
    p_d = torch.softmax(logits, -1)
    with torch.no_grad():
        p_t = torch.softmax((p["target"] @ p["lm"].t()).to(acc), -1)
    l1 = (p_d - p_t).abs().sum(-1)
    c_star = (1 - 0.5 * l1.detach()).clamp(0, 1)
    w = p["weights"].to(acc)
    total = a_ce * (w * ce).sum() + a_l1 * (w * l1).sum()
    if a_conf > 0:
        conf_logit = (torch.cat([h, e], -1) @ p["conf_w"].t() + p["conf_b"]).squeeze(-1).to(acc)
        bce = F.binary_cross_entropy_with_logits(conf_logit, c_star, reduction="none")
        total = total + a_conf * (w * bce).sum()
    loss = total / (w.sum() + 1e-6)
    loss.backward()
    grads = {k: p[k].grad for k in TRAINABLE if p[k].grad is not None}
    if feat is not None:
        grads["feat"] = feat.grad
    return dict(loss=loss.detach(), ce=ce.detach(), l1=l1.detach(), grads=grads)


def megaspark_loss(p: dict, head: str, alphas, chunk: int, use_rows: bool, vocab_start: int = 0,
                   group=None, legacy: bool = False, combined: bool = False, grouped: bool = False) -> dict:
    """dspark_loss_sums on this rank's shard (legacy: the sums by the previous per-row
    autograd implementation instead of the fused Function; combined: the fused Function with
    the CE and L1 gradients α-combined in the forward, as the model calls it; grouped: and
    the rows grouped by key, as the model does)."""
    from megaspark import losses
    from megaspark import vocab_parallel_loss as vpl

    a_ce, a_l1, a_conf, need_l1 = alphas
    h = p["h"]
    feat, e = features(head, p, h)
    if feat is not None:
        feat.retain_grad()
    conf = (torch.cat([h, e], -1) @ p["conf_w"].t() + p["conf_b"]).squeeze(-1).float()
    use_conf = a_conf > 0
    rows = p["mask"].reshape(-1).nonzero().squeeze(1) if use_rows else None
    kwargs = dict(feat=feat, w2=p["w2"] if feat is not None else None, target_hidden=p["target"],
                  confidence_logits=conf if use_conf else None, vocab_start=vocab_start,
                  group=group, chunk_rows=chunk, rows=rows, need_l1=need_l1)
    if grouped:
        rows, groups = vpl.group_rows(rows, p["keys"], p["prev"])
        assert groups.prev_shared and groups.count < rows.numel()
        kwargs.update(rows=rows, groups=groups, feat_by_prev=head == "vanilla")
    if combined:
        kwargs["alphas"] = (a_ce, a_l1)
    restore = None
    if legacy:  # today's formulation: per-row autograd (checkpointed chunks), then the sums
        restore = losses.vocab_parallel_ce_l1_sums

        def previous(h, labels, weights, lm_head, combine=None, groups=None, feat_by_prev=False, **kw):
            assert combine is None and groups is None
            ce, l1 = vpl.vocab_parallel_ce_l1(h, labels, lm_head, **kw)
            return (weights * ce).sum(), (weights * l1).sum(), ce.detach(), l1.detach()

        losses.vocab_parallel_ce_l1_sums = previous
    try:
        sums = losses.dspark_loss_sums(h, p["labels"], p["weights"], p["mask"], p["keep"], p["lm"], **kwargs)
    finally:
        if restore is not None:
            losses.vocab_parallel_ce_l1_sums = restore
    loss = sums.loss(a_ce, a_l1, a_conf)
    loss.backward()
    grads = {k: p[k].grad for k in TRAINABLE if p[k].grad is not None}
    if feat is not None:
        grads["feat"] = feat.grad
    metrics = {k: (float(n), float(d)) for k, (n, d) in sums.metrics.items()}
    return dict(loss=loss.detach(), metrics=metrics, grads=grads, lm_grad=p["lm"].grad,
                lm_requires_grad=p["lm"].requires_grad)


def run_cases(tp: int = 1, rank: int = 0, group=None, dtypes=("float32", "bfloat16")):
    base = make_params()
    shard = slice(rank * (V // tp), (rank + 1) * (V // tp))
    out = {}
    for case in cases(dtypes):
        head, alphas, chunk, use_rows, dtype = case
        dt = getattr(torch, dtype)
        res = megaspark_loss(leaves(base, dt, shard), head, ALPHAS[alphas], chunk, use_rows,
                             vocab_start=shard.start, group=group)
        if use_rows:
            res["grouped"] = megaspark_loss(leaves(base, dt, shard), head, ALPHAS[alphas], chunk, use_rows,
                                            vocab_start=shard.start, group=group, combined=True,
                                            grouped=True)
        if dtype == "float32":
            res["legacy"] = megaspark_loss(leaves(base, dt, shard), head, ALPHAS[alphas], chunk,
                                           use_rows, vocab_start=shard.start, group=group, legacy=True)
            res["combined"] = megaspark_loss(leaves(base, dt, shard), head, ALPHAS[alphas], chunk,
                                             use_rows, vocab_start=shard.start, group=group, combined=True)
        out[case] = res
    return out


# ----------------------------------------------------------------------------- comparison
def _rel(a, b):
    a, b = a.double(), b.double()
    n = float(b.norm())
    return float((a - b).norm()) / n if n > 0 else float((a - b).norm())


def check(results, tp: int, rank: int):
    base = make_params()
    shard = slice(rank * (V // tp), (rank + 1) * (V // tp))
    refs = {}
    for case, got in results.items():
        head, alphas, chunk, use_rows, dtype = case
        if (head, alphas) not in refs:
            refs[(head, alphas)] = naive_loss(leaves(base, torch.float64), head, ALPHAS[alphas])
        ref = refs[(head, alphas)]
        ref_grads = dict(ref["grads"])
        if "w2" in ref_grads:
            ref_grads["w2"] = ref_grads["w2"][shard]
        assert got["lm_grad"] is None and not got["lm_requires_grad"], case
        assert set(got["grads"]) == set(ref_grads), (case, set(got["grads"]) ^ set(ref_grads))
        if dtype == "float32":
            loss, ref_loss = float(got["loss"]), float(ref["loss"])
            assert abs(loss - ref_loss) < REF_TOL, (case, loss, ref_loss)
            for k, g in got["grads"].items():
                diff = float((g.double() - ref_grads[k]).abs().max())
                assert diff < REF_TOL, (case, k, diff)
            legacy = got["legacy"]
            # separate and α-combined gradient sets, and rows grouped by target position
            for variant in (got, got["combined"]) + ((got["grouped"],) if "grouped" in got else ()):
                assert abs(float(variant["loss"]) - float(legacy["loss"])) < FP32_TOL, case
                assert set(variant["metrics"]) == set(legacy["metrics"]), case
                for k, (num, den) in variant["metrics"].items():
                    lnum, lden = legacy["metrics"][k]
                    assert den == pytest.approx(lden, abs=FP32_TOL), (case, k)
                    if den > 0:
                        assert abs(num / den - lnum / lden) < FP32_TOL, (case, k, num / den, lnum / lden)
                assert set(variant["grads"]) == set(legacy["grads"]), case
                for k, g in variant["grads"].items():
                    if k == "feat" and variant is got.get("grouped") and head == "vanilla":
                        continue  # the group's gradient sits on its first row (W1's is compared)
                    diff = float((g - legacy["grads"][k]).abs().max())
                    assert diff < FP32_TOL, (case, k, diff)
        else:
            # the loss against float64; the gradients against the naive formula in the same
            # precision scheme (bf16 GEMMs round the logits: the L1 gradient's signs flip
            # wherever p_d ≈ p_t, so float64 is no reference for them)
            loss, ref_loss = float(got["loss"]), float(ref["loss"])
            assert abs(loss - ref_loss) < BF16_TOL * max(1.0, ref_loss), (case, loss, ref_loss)
            key = (head, alphas, "bf16")
            if key not in refs:
                refs[key] = naive_loss(leaves(base, torch.bfloat16), head, ALPHAS[alphas])
            bf_grads = dict(refs[key]["grads"])
            if "w2" in bf_grads:
                bf_grads["w2"] = bf_grads["w2"][shard]
            for variant in (got,) + ((got["grouped"],) if "grouped" in got else ()):
                assert abs(float(variant["loss"]) - ref_loss) < BF16_TOL * max(1.0, ref_loss), case
                for k, g in variant["grads"].items():
                    if k == "feat" and variant is got.get("grouped") and head == "vanilla":
                        continue
                    assert g.dtype == torch.bfloat16, (case, k, g.dtype)
                    assert _rel(g, bf_grads[k]) < BF16_TOL, (case, k, _rel(g, bf_grads[k]))
        # the metrics against the reference: CE and (when computed) L1
        w = base["weights"]
        ce_ref = float((w * ref["ce"]).sum() / w.sum())
        tol = REF_TOL if dtype == "float32" else BF16_TOL * max(1.0, ce_ref)
        num, den = got["metrics"]["ce_loss"]
        assert abs(num / den - ce_ref) < tol, (case, num / den, ce_ref)
        need_l1 = ALPHAS[alphas][3]
        assert ("l1_loss" in got["metrics"]) == need_l1, case
        if need_l1:
            l1_ref = float((w * ref["l1"]).sum() / w.sum())
            num, den = got["metrics"]["l1_loss"]
            assert abs(num / den - l1_ref) < (REF_TOL if dtype == "float32" else BF16_TOL), case


# ----------------------------------------------------------------------------- TP = 1
def test_fused_matches_naive_and_previous_tp1():
    check(run_cases(tp=1), tp=1, rank=0)


# ----------------------------------------------------------------------------- TP = 2
def _tp2_worker(rank, world_size):
    from megatron.core import parallel_state

    from megaspark.parallel import initialize_distributed

    initialize_distributed(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    results = run_cases(tp=2, rank=parallel_state.get_tensor_model_parallel_rank(), group=group)
    direct = _direct_function_cases(2, parallel_state.get_tensor_model_parallel_rank(), group)
    return parallel_state.get_tensor_model_parallel_rank(), results, direct


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_worker, 2)


def test_fused_matches_naive_and_previous_tp2(tp2_results):
    for rank, results, _ in tp2_results:
        check(results, tp=2, rank=rank)
    # the replicated results are identical on both ranks
    (_, a, _), (_, b, _) = tp2_results
    for case in a:
        assert float(a[case]["loss"]) == float(b[case]["loss"]), case
        for k in a[case]["grads"]:
            if k != "w2":
                assert torch.equal(a[case]["grads"][k], b[case]["grads"][k]), (case, k)


# ----------------------------------------------------------------------------- the Function itself
def _direct_function_cases(tp: int, rank: int, group):
    """vocab_parallel_ce_l1_sums on flat rows: per-row values and the gradients of an
    arbitrary combination a·ce_sum + b·l1_sum (two independent upstream scalars)."""
    from megaspark.vocab_parallel_loss import vocab_parallel_ce_l1_sums

    base = make_params(seed=3)
    Vl = V // tp
    shard = slice(rank * Vl, (rank + 1) * Vl)
    R = math.prod(BLOCKS)
    out = {}
    for with_feat, chunk, (a, b) in itertools.product((False, True), (7, 24), ((0.7, -1.3), (0.0, 2.0))):
        p = leaves(base, torch.float32, shard)
        h = p["h"].reshape(R, H)
        feat = p["w1"][p["prev"]].reshape(R, RANK).detach().requires_grad_() if with_feat else None
        ce_sum, l1_sum, ce, l1 = vocab_parallel_ce_l1_sums(
            h, p["labels"].reshape(R), p["weights"].reshape(R), p["lm"], feat=feat,
            w2=p["w2"] if with_feat else None, target_hidden=p["target"].reshape(R, H),
            vocab_start=shard.start, group=group, chunk_rows=chunk)
        assert not ce.requires_grad and not l1.requires_grad
        (a * ce_sum + b * l1_sum).backward()
        out[(with_feat, chunk, a, b)] = dict(
            ce=ce, l1=l1, ce_sum=ce_sum.detach(), l1_sum=l1_sum.detach(), dh=p["h"].grad,
            dfeat=None if feat is None else feat.grad, dw2=p["w2"].grad if with_feat else None)
    return out


def _check_direct(direct, tp, rank):
    base = make_params(seed=3)
    Vl = V // tp
    R = math.prod(BLOCKS)
    for (with_feat, chunk, a, b), got in direct.items():
        p = leaves(base, torch.float64)
        h = p["h"]
        feat = p["w1"][p["prev"]].detach().requires_grad_() if with_feat else None
        logits = h @ p["lm"].t() + (feat @ p["w2"].t() if with_feat else 0)
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, p["labels"][..., None]).squeeze(-1)
        p_t = torch.softmax(p["target"] @ p["lm"].t(), -1)
        l1 = (torch.softmax(logits, -1) - p_t).abs().sum(-1)
        w = p["weights"]
        (a * (w * ce).sum() + b * (w * l1).sum()).backward()
        assert float((got["ce"] - ce.detach().reshape(R)).abs().max()) < REF_TOL
        assert float((got["l1"] - l1.detach().reshape(R)).abs().max()) < REF_TOL
        assert abs(float(got["ce_sum"]) - float((w * ce.detach()).sum())) < 1e-4
        assert abs(float(got["l1_sum"]) - float((w * l1.detach()).sum())) < 1e-4
        assert float((got["dh"] - p["h"].grad).abs().max()) < REF_TOL, (with_feat, chunk, a, b)
        if with_feat:
            assert float((got["dfeat"].reshape(feat.shape) - feat.grad).abs().max()) < REF_TOL
            ref_dw2 = p["w2"].grad[rank * Vl:(rank + 1) * Vl]
            assert float((got["dw2"] - ref_dw2).abs().max()) < REF_TOL


def test_function_two_upstream_scalars_tp1():
    _check_direct(_direct_function_cases(1, 0, None), 1, 0)


def test_function_two_upstream_scalars_tp2(tp2_results):
    for rank, _, direct in tp2_results:
        _check_direct(direct, 2, rank)


# ----------------------------------------------------------------------------- no L1, no target logits
class _Untouchable(torch.Tensor):
    """A target hidden state that fails the moment any torch operation uses it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__repr__,):
            return "Untouchable"
        raise AssertionError(f"the target hidden state was used ({func})")


def test_target_logits_not_formed_without_l1(monkeypatch):
    from megaspark import losses
    from megaspark import vocab_parallel_loss as vpl

    p = leaves(make_params(), torch.float32)
    target = torch.zeros(0).as_subclass(_Untouchable)
    logit_gemms, grad_gemms = [], []
    real_logits, real_mm = vpl._logits_into, vpl._mm_into
    monkeypatch.setattr(vpl, "_logits_into", lambda out, x, w, **kw: (
        logit_gemms.append(tuple(x.shape)), real_logits(out, x, w, **kw)))
    monkeypatch.setattr(vpl, "_mm_into", lambda out, a, b: (
        grad_gemms.append(tuple(a.shape)), real_mm(out, a, b)))
    sums = losses.dspark_loss_sums(p["h"], p["labels"], p["weights"], p["mask"], p["keep"], p["lm"],
                                   target_hidden=target, chunk_rows=10, need_l1=False)
    sums.loss(1.0, 0.0, 0.0).backward()
    # per chunk: the draft logits and one dh GEMM (CE only), nothing for a target
    assert logit_gemms == [(10, H), (10, H), (4, H)], logit_gemms
    assert grad_gemms == [(10, V), (10, V), (4, V)], grad_gemms
    assert "l1_loss" not in sums.metrics and "tau" not in sums.metrics
    assert float(sums.l1_sum) == 0.0 and p["h"].grad is not None
    # the trap works: with L1 needed the same call touches the target
    with pytest.raises(AssertionError, match="target hidden state was used"):
        losses.dspark_loss_sums(p["h"], p["labels"], p["weights"], p["mask"], p["keep"], p["lm"],
                                target_hidden=target, chunk_rows=10)
    # and the same CE as with L1
    q = leaves(make_params(), torch.float32)
    with_l1 = losses.dspark_loss_sums(q["h"], q["labels"], q["weights"], q["mask"], q["keep"], q["lm"],
                                      target_hidden=q["target"], chunk_rows=10)
    with_l1.loss(1.0, 0.0, 0.0).backward()
    assert float(with_l1.ce_sum.detach()) == float(sums.ce_sum.detach())
    assert torch.allclose(q["h"].grad, p["h"].grad, atol=1e-7, rtol=0)


def test_l1_refusals_and_frozen_head():
    from megaspark import losses
    from megaspark.vocab_parallel_loss import vocab_parallel_ce_l1_sums

    p = leaves(make_params(), torch.float32)
    args = (p["h"], p["labels"], p["weights"], p["mask"], p["keep"], p["lm"])
    with pytest.raises(ValueError, match="need_l1=True needs target_hidden"):
        losses.dspark_loss_sums(*args, need_l1=True)
    conf = torch.zeros(BLOCKS)
    with pytest.raises(ValueError, match="confidence loss needs L1"):
        losses.dspark_loss_sums(*args, target_hidden=p["target"], confidence_logits=conf, need_l1=False)
    lm = p["lm"].clone().requires_grad_()
    R = math.prod(BLOCKS)
    with pytest.raises(ValueError, match="LM head as frozen"):
        vocab_parallel_ce_l1_sums(p["h"].reshape(R, H), p["labels"].reshape(R),
                                         p["weights"].reshape(R), lm)
    with torch.no_grad():  # evaluation: nothing is differentiated, a trainable head is fine
        vocab_parallel_ce_l1_sums(p["h"].reshape(R, H), p["labels"].reshape(R),
                                         p["weights"].reshape(R), lm)


def test_no_grad_path_equals_grad_path():
    """Evaluation (no grad: no gradient buffers) gives the same values as training."""
    from megaspark.losses import dspark_loss_sums

    p = leaves(make_params(), torch.float32)
    feat, e = features("gated", p, p["h"])
    args = (p["h"], p["labels"], p["weights"], p["mask"], p["keep"], p["lm"])
    kw = dict(feat=feat, w2=p["w2"], target_hidden=p["target"], chunk_rows=7)
    train = dspark_loss_sums(*args, **kw)
    with torch.no_grad():
        ev = dspark_loss_sums(*args, **kw)
    assert not ev.ce_sum.requires_grad and train.ce_sum.requires_grad
    assert float(ev.ce_sum) == float(train.ce_sum.detach())
    assert float(ev.l1_sum) == float(train.l1_sum.detach())
    for k, (num, den) in train.metrics.items():
        assert float(ev.metrics[k][0]) == float(num) and float(ev.metrics[k][1]) == float(den), k


def test_chunk_loop_has_no_host_sync_or_data_dependent_shape():
    """The chunk loop traces whole under torch.compile (fullgraph: no graph break, so no
    .item(), nonzero or bool(tensor)); checked with the eager backend (no compiler needed)."""
    from megaspark import vocab_parallel_loss as losses

    p = leaves(make_params(), torch.float32)
    R = math.prod(BLOCKS)
    args = (p["h"].detach().reshape(R, H), p["w1"][p["prev"]].detach().reshape(R, RANK),
            p["w2"].detach(), p["lm"], p["labels"].reshape(R), p["weights"].reshape(R).float(),
            p["target"].reshape(R, H), 0, None, 7, True, True, True, True)
    torch._dynamo.reset()
    compiled = torch.compile(losses._fused_chunks, backend="eager", fullgraph=True)
    got = compiled(*args)
    want = losses._fused_chunks(*args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_grouped_chunk_loop_has_no_host_sync_or_data_dependent_shape():
    """The same with the rows grouped by target position (chunk bounds from host ints)."""
    from megaspark import vocab_parallel_loss as losses

    p = leaves(make_params(), torch.float32)
    R = math.prod(BLOCKS)
    rows, groups = losses.group_rows(torch.arange(R), p["keys"], p["prev"])
    feat = p["w1"][p["prev"]].detach().reshape(R, RANK)[rows][groups.first]
    args = (p["h"].detach().reshape(R, H)[rows], feat, p["w2"].detach(), p["lm"], p["labels"].reshape(R)[rows],
            p["weights"].reshape(R).float()[rows], p["target"].reshape(R, H)[rows][groups.first], 0, None, 7,
            True, True, True, True)
    kw = dict(combine=(0.1, 0.9), groups=groups, feat_grouped=True)
    torch._dynamo.reset()
    compiled = torch.compile(losses._fused_chunks, backend="eager", fullgraph=True)
    got = compiled(*args, **kw)
    want = losses._fused_chunks(*args, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
