"""DSPARK_SPEC.md §13 invariants of the losses (:mod:`megaspark.losses`) checked on the
*megaspark* implementation, with the spec's worked numbers.

The forwards/backwards run in the one launch of two gloo processes that
tests/test_invariants.py shares (the worker is tests/spec_invariants.py, launched once per
session by the ``spec_invariant_runs`` fixture of tests/conftest.py), for TP = 1 (DP = 2)
and TP = 2; the assertions and the independent "direct" formulas (plain float64 torch) run
here in the parent. Only pure functions that never import megatron (``acceptance_from_l1``,
``_acceptance_metrics``) are called in the pytest process itself.

Covered: item 2 (DFlash reduction), 3 (zero W2), 13 (L1 / acceptance on crafted logits,
vocab-parallel), 14 (BCE minimum, confidence target detached), 15 (shared denominator),
16 (perfect-draft metrics, τ worked example) and 17 (per-position counts).
"""

from __future__ import annotations

import math

import pytest
import torch

from megaspark.losses import _acceptance_metrics, acceptance_from_l1
from tests import dspark_cases as dc
from tests.spec_invariants import EPS, TPS
from tests.spec_invariants import close as _close


@pytest.fixture(scope="module")
def runs(spec_invariant_runs):
    return spec_invariant_runs


@pytest.fixture(scope="module", params=TPS, ids=lambda tp: f"tp{tp}")
def res(request, runs):
    return runs[0][request.param]


# =============================================================================== direct formulas
def _direct(h, lm_head, labels, target_hidden):
    """float64 per-slot CE on base logits and L1 against the target distribution."""
    U = h.double() @ lm_head.double().t()
    logp = U.log_softmax(-1)
    ce = -logp.gather(-1, labels[..., None]).squeeze(-1)
    p_t = (target_hidden.double() @ lm_head.double().t()).softmax(-1)
    l1 = (logp.exp() - p_t).abs().sum(-1)
    return ce, l1


# =============================================================================== tests
def test_item2_dflash_reduction(res):
    r = res["item2"]["a0"]
    io = r["io"]
    ce, _ = _direct(r["h"], r["lm_head"], io["labels"], io["target_hidden"])
    w = io["weights"].double()
    expected = float((w * ce).sum() / (w.sum() + EPS))
    assert _close(r["loss"], expected), (r["loss"], expected)
    assert _close(r["den"], float(w.sum()))
    # no target state needed and the same value without it
    assert _close(r["no_target"]["loss"], expected)
    assert r["no_target"]["conf_sum"] == 0.0


def test_item2_dflash_reduction_with_l1(res):
    r = res["item2"]["a05"]
    io = r["io"]
    ce, l1 = _direct(r["h"], r["lm_head"], io["labels"], io["target_hidden"])
    w = io["weights"].double()
    den = w.sum() + EPS
    expected = float((w * ce).sum() / den + 0.5 * (w * l1).sum() / den)
    assert _close(r["loss"], expected), (r["loss"], expected)
    assert _close(r["l1_sum"], float((w * l1).sum()))
    assert float((w * l1).sum()) > 0  # the L1 term is really there


@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_item3_zero_w2_is_no_markov(res, kind):
    r = res["item3"][kind]
    z, io = r["zero_w2"], r["io"]
    ce, l1 = _direct(z["h"], r["lm_head"], io["labels"], io["target_hidden"])
    w = io["weights"].double()
    assert _close(z["ce_sum"], float((w * ce).sum())), (z["ce_sum"], float((w * ce).sum()))
    assert _close(z["l1_sum"], float((w * l1).sum()))
    for key in ("ce_sum", "l1_sum", "loss", "den"):
        assert _close(z[key], r["no_markov"][key]), (key, z[key], r["no_markov"][key])
    # control: a non-zero W2 does change the loss
    assert not _close(r["with_w2"]["loss"], z["loss"], rel=1e-4)


def test_item13_crafted_l1_and_acceptance(res):
    ce, l1, c = res["losses"]["crafted"]
    expected_l1 = torch.tensor([0.4, 0.4, 0.0, 0.0])
    torch.testing.assert_close(l1, expected_l1, rtol=0, atol=1e-6)
    torch.testing.assert_close(c, torch.tensor([0.8, 0.8, 1.0, 1.0]), rtol=0, atol=1e-6)
    # CE = -log p_d(y): p_d rows (0.5, 0.5), (0.7, 0.3), (0.5, 0.5), (0.7, 0.3)
    expected_ce = -torch.log(torch.tensor([0.5, 0.3, 0.5, 0.7]))
    torch.testing.assert_close(ce, expected_ce, rtol=0, atol=1e-6)


def test_item13_disjoint_one_hots(res):
    _, l1, c = res["losses"]["disjoint"]
    torch.testing.assert_close(l1, torch.tensor([2.0, 2.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(c, torch.tensor([0.0, 0.0]), rtol=0, atol=1e-6)


def test_item13_random_distributions(res):
    r = res["losses"]["random"]
    p_d, p_t = r["zd"].double().softmax(-1), r["zt"].double().softmax(-1)
    ce, l1, c = r["fwd"]
    torch.testing.assert_close(l1.double(), (p_d - p_t).abs().sum(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(c.double(), torch.minimum(p_d, p_t).sum(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(ce.double(), -p_d.log().gather(1, r["y"][:, None]).squeeze(1),
                               rtol=0, atol=1e-5)
    assert bool(((c >= 0) & (c <= 1)).all())
    _, l1_sw, c_sw = r["swapped"]
    torch.testing.assert_close(l1_sw, l1, rtol=0, atol=1e-6)  # symmetric
    torch.testing.assert_close(c_sw, c, rtol=0, atol=1e-6)


def test_item13_acceptance_from_l1_pure():
    l1 = torch.tensor([0.0, 0.4, 1.0, 2.0, 2.0000001, -1e-7])
    torch.testing.assert_close(
        acceptance_from_l1(l1), torch.tensor([1.0, 0.8, 0.5, 0.0, 0.0, 1.0]), rtol=0, atol=1e-7
    )


def test_item14_bce_minimum(res):
    r = res["losses"]["conf_min"]
    assert r["conf"] == pytest.approx(0.500402, abs=1e-6)
    h_c = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))  # binary entropy H(0.8)
    assert r["conf"] == pytest.approx(h_c, abs=1e-6)
    assert abs(r["logit_grad"]) < 1e-6  # it is the minimum over the logit
    num, den = r["metrics"]["confidence_loss"]
    assert num / den == pytest.approx(0.500402, abs=1e-6)
    z = res["losses"]["conf_zero"]
    assert z["conf"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert z["logit_grad"] == pytest.approx(0.5 - 0.8, abs=1e-6)


def test_item14_confidence_target_is_detached(res):
    for case in ("conf_min", "conf_zero"):
        r = res["losses"][case]
        # c* is computed from the draft distribution (h, Markov feature, W2) but detached:
        # the confidence loss sends no gradient into any of them through the target.
        for key in ("h_grad", "feat_grad", "w2_grad"):
            g = r[key]
            assert g is None or float(g.abs().max()) == 0.0, (case, key, g)


def test_item14_confidence_loss_gradients_in_model(res):
    r = res["item14"]
    assert r["conf"] > 0
    tg = r["target_grad"]
    assert tg is None or float(tg.abs().max()) == 0.0
    grads = r["grads"]

    def norm(key):
        return float(grads[key].abs().max()) if key in grads else 0.0

    for key in ("confidence_head.proj.weight", "confidence_head.proj.bias",
                "markov_head.markov_w1.weight", "fc.weight", "hidden_norm.weight", "norm.weight",
                "layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight"):
        assert norm(key) > 0, key
    # W2 only shapes p_d, which reaches the confidence loss only through the detached c*
    assert norm("markov_head.markov_w2.weight") == 0.0
    assert "embed_tokens.weight" not in grads and "lm_head.weight" not in grads  # frozen


def test_item15_doubling_weights(res):
    r = res["item15_17"]
    base, dbl = r["base"], r["double"]
    assert dbl["den"] == pytest.approx(2 * base["den"], rel=1e-6)
    assert _close(dbl["loss"], base["loss"], rel=1e-6), (dbl["loss"], base["loss"])
    for key in ("ce_sum", "l1_sum", "conf_sum"):
        assert dbl[key] == pytest.approx(2 * base[key], rel=1e-5)


@pytest.mark.parametrize("variant", ["unsup", "dummy"])
def test_item15_unsupervised_sample_contributes_nothing(res, variant):
    r = res["item15_17"][variant]
    full, s0, s1, s2 = r["full"], r["s0"], r["s1"], r["s2"]
    assert s1["den"] == 0.0 and s1["ce_sum"] == 0.0 and s1["l1_sum"] == 0.0 and s1["conf_sum"] == 0.0
    assert s1["loss"] == 0.0
    assert full["den"] == pytest.approx(s0["den"] + s2["den"], rel=1e-6)
    for key in ("ce_sum", "l1_sum", "conf_sum"):
        assert _close(full[key], s0[key] + s2[key]), (key, full[key], s0[key] + s2[key])
    combined = (0.3 * (s0["ce_sum"] + s2["ce_sum"]) + 0.9 * (s0["l1_sum"] + s2["l1_sum"])
                + 1.0 * (s0["conf_sum"] + s2["conf_sum"])) / (s0["den"] + s2["den"] + EPS)
    assert _close(full["loss"], combined), (full["loss"], combined)
    tau_num = s0["metrics"]["tau"][0] + s2["metrics"]["tau"][0]
    tau_den = s0["metrics"]["tau"][1] + s2["metrics"]["tau"][1]
    assert full["metrics"]["tau"][1] == tau_den  # its blocks are not valid blocks
    assert _close(full["metrics"]["tau"][0], tau_num)


def _check_counts(metrics, keep, first_slot, B):
    counts = [metrics[f"count@{k}"][0] for k in range(first_slot, B)]
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] == float(keep.sum()), (counts, int(keep.sum()))
    assert counts[-1] < counts[0]  # blocks running off the end / into gaps really truncate


def test_item17_counts(res):
    r = res["item15_17"]
    _check_counts(r["base"]["metrics"], r["keep"], 0, dc.BASE["block_size"])
    _check_counts(r["conv_D"]["sums"]["metrics"], r["conv_D"]["keep"], 1, dc.BASE["block_size"])
    assert "count@0" not in r["conv_D"]["sums"]["metrics"]


def test_item16_perfect_draft(res):
    p = res["losses"]["perfect"]
    B = 4
    assert abs(p["l1_sum"]) < 1e-6
    for k in range(B):
        num, den = p["metrics"][f"accept_rate@{k}"]
        assert den == 2.0 and num / den == pytest.approx(1.0, abs=1e-6)
    num, den = p["metrics"]["tau"]
    assert den == 2.0 and num / den == pytest.approx(B + 1, abs=1e-5)
    num, den = p["metrics"]["l1_loss"]
    assert abs(num / den) < 1e-6
    q = res["losses"]["imperfect"]  # control
    assert q["metrics"]["tau"][0] / q["metrics"]["tau"][1] < B + 1 - 1e-3


def test_item16_tau_worked_example():
    m = {}
    c = torch.tensor([[[0.9, 0.8, 0.5]]])
    _acceptance_metrics(m, c, torch.ones(1, 1, 3, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool), 0)
    num, den = m["tau"]
    assert float(num / den) == pytest.approx(2.98, abs=1e-6)
    for k, v in enumerate((0.9, 0.8, 0.5)):
        assert float(m[f"accept_rate@{k}"][0] / m[f"accept_rate@{k}"][1]) == pytest.approx(v, abs=1e-6)

    # a truncated slot ends the chain; a dummy block and a block with no valid slot are
    # not valid blocks and do not enter τ's denominator
    m = {}
    c = torch.tensor([[[0.9, 0.8, 0.5], [0.9, 0.8, 0.5], [0.3, 0.3, 0.3], [0.7, 0.7, 0.7]]])
    e = torch.tensor([[[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]]], dtype=torch.bool)
    keep = torch.tensor([[True, True, False, True]])
    _acceptance_metrics(m, c, e, keep, 0)
    num, den = m["tau"]
    assert float(den) == 2.0
    assert float(num / den) == pytest.approx((1 + 0.9 + 0.72 + 2.98) / 2, abs=1e-6)
    assert [float(m[f"count@{k}"][0]) for k in range(3)] == [3.0, 3.0, 2.0]
