"""The megaspark draft + losses against the independent single-process reference
(tests/reference.py: dense mask, full logits), at TP=1 and TP=2 on two gloo processes.

One launch runs every case at TP=2, then re-initialises the groups at TP=1 (DP=2) and
runs them again; the parent compares both to the reference computed in float64.
"""

from __future__ import annotations

import pytest
import torch

from tests import dspark_cases as dc
from tests import reference
from tests.launcher import run_distributed

TOL = 1e-5
FROZEN = {"embed_tokens.weight", "lm_head.weight"}


def _worker(rank, world_size, names):
    from megaspark.parallel import initialize_distributed

    results = {}
    for tp in (2, 1):
        initialize_distributed(tensor_model_parallel_size=tp)
        for name in names:
            d, _, weights, batch = dc.make_case(name)
            results[(tp, name)] = dc.run_case(d, weights, batch, tp=tp)
    return results


@pytest.fixture(scope="module")
def parallel_results():
    return run_distributed(_worker, 2, list(dc.CASES))


def _reference(name):
    d, rc, weights, batch = dc.make_case(name)
    w64 = {k: v.double().requires_grad_(k not in FROZEN) for k, v in weights.items()}
    b64 = {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}
    ref = reference.reference_forward_loss(w64, rc, b64)
    ref["loss"].backward()
    grads = {k: v.grad for k, v in w64.items() if v.grad is not None}
    return ref, grads


@pytest.mark.parametrize("name", list(dc.CASES))
@pytest.mark.parametrize("tp", [1, 2])
def test_matches_reference(parallel_results, name, tp):
    ref, ref_grads = _reference(name)
    for rank_results in parallel_results:  # every rank holds the full (replicated) result
        got = rank_results[(tp, name)]
        d = dc.make_config(name)
        # a training step whose objective has no L1 (DFlash: α_l1 = 0, no confidence head)
        # never forms the target's logits: no L1 and no acceptance metrics; evaluation has them
        trains_l1 = d.alpha_l1 > 0 or d.confidence_head
        for key in ("loss", "ce_loss", "confidence_loss", "denominator") + (("l1_loss",) if trains_l1 else ()):
            assert abs(float(got[key]) - float(ref[key])) < TOL, (key, float(got[key]), float(ref[key]))
        assert abs(float(got["eval_l1_loss"]) - float(ref["l1_loss"])) < TOL
        assert set(got["grads"]) == set(ref_grads), set(got["grads"]) ^ set(ref_grads)
        for key, g in got["grads"].items():
            diff = float((g.double() - ref_grads[key]).abs().max())
            assert diff < TOL, (key, diff)
        if not trains_l1:
            assert float(got["l1_loss"]) == 0.0 and "tau" not in got["metrics"]
        m = got["metrics"] if trains_l1 else got["eval_metrics"]
        tau_num, tau_den = m["tau"]
        assert abs(tau_num / tau_den - float(ref["tau"])) < TOL
        first = 0 if dc.make_config(name).convention == "S" else 1
        for k in range(first, ref["count"].shape[0]):
            num, den = m[f"accept_rate@{k}"]
            assert den == pytest.approx(float(ref["count"][k]))
            if den > 0:
                assert abs(num / den - float(ref["accept_rate"][k])) < TOL
        if ref.get("confidence_abs_error") is not None:
            num, den = m["confidence_abs_error"]
            assert abs(num / (den + 1e-6) - float(ref["confidence_abs_error"])) < TOL


def test_tp2_equals_tp1(parallel_results):
    r = parallel_results[0]
    for name in dc.CASES:
        a, b = r[(1, name)], r[(2, name)]
        assert abs(float(a["loss"]) - float(b["loss"])) < TOL
        for key in a["grads"]:
            assert float((a["grads"][key] - b["grads"][key]).abs().max()) < TOL, (name, key)
