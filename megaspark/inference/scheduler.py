"""Hardware-aware prefix scheduler (DSpark paper Algorithm 1; DSPARK_SPEC.md §8.2).

Given per-request confidences ``c_{r,1..γ}`` and the target's profiled throughput curve
``SPS(n)`` (verification steps per second for a verify batch of ``n`` tokens), choose
per-request proposal lengths ``ℓ_r`` maximising the expected token throughput
``Θ = τ*·SPS(Btok)``, where ``τ* = Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j})`` is the expected number of
emitted tokens and ``a_{r,j} = Π_{i≤j} c_{r,i}`` the prefix survival probability.

The greedy walk over candidates in decreasing ``a`` **must stop at the first candidate
that does not improve Θ** (``early_stop=True``). A global search (take the best prefix
of the whole walk) lets the confidence of a later slot — which depends on the earlier
draft *tokens* — decide whether an earlier draft is verified at all, which biases the
output distribution (paper App. A; :func:`app_a_counterexample`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch

SPSCurve = Union[Callable[[int], float], Mapping[int, float], Sequence[float]]


def _sps_fn(sps: SPSCurve) -> Callable[[int], float]:
    """A callable ``n -> SPS(n)``; a sequence is 1-based (``sps[0]`` is SPS(1))."""
    if callable(sps):
        return sps
    if isinstance(sps, Mapping):
        return lambda n: float(sps[n])
    values = list(sps)

    def lookup(n: int) -> float:
        if n > len(values):
            return 0.0  # beyond the profiled range: never worth it
        return float(values[n - 1])

    return lookup


@dataclass
class Schedule:
    lengths: list  # ℓ_r per request
    throughput: float  # Θ of the chosen schedule
    expected_tokens: float  # τ* of the chosen schedule
    verify_tokens: int  # Btok = R + Σ ℓ_r


def prefix_survival(confidences: Sequence[Sequence[float]]) -> list:
    """``a_{r,j} = Π_{i≤j} c_{r,i}`` for every request (lists of length γ_r)."""
    out = []
    for row in confidences:
        acc, a = 1.0, []
        for c in row:
            acc *= float(c)
            a.append(acc)
        out.append(a)
    return out


def schedule_prefixes(confidences: Sequence[Sequence[float]], sps: SPSCurve,
                      early_stop: bool = True) -> Schedule:
    """Algorithm 1. ``confidences[r][j-1] = c_{r,j}``; returns the chosen ℓ_r.

    Candidates ``(r, j)`` with ``a_{r,j} > 0`` are visited by decreasing ``a`` (ties:
    request, then slot, so a request's prefixes are visited in order — ``a`` is
    non-increasing in ``j``). With ``early_stop`` the walk ends at the first candidate
    that does not raise Θ; without it the best Θ over the whole walk is returned (the
    biased variant, kept only to demonstrate App. A).
    """
    sps_of = _sps_fn(sps)
    a = prefix_survival(confidences)
    R = len(a)
    cands = [(-a_rj, r, j) for r, row in enumerate(a) for j, a_rj in enumerate(row, 1) if a_rj > 0]
    cands.sort()
    lengths = [0] * R
    btok, tau = R, float(R)
    best = Schedule(list(lengths), tau * sps_of(btok) if R else 0.0, tau, btok)
    for neg_a, r, j in cands:
        if j != lengths[r] + 1:  # cannot happen with a non-increasing a; keep prefixes closed
            continue
        lengths[r] = j
        btok += 1
        tau += -neg_a
        theta = tau * sps_of(btok)
        if theta > best.throughput:
            best = Schedule(list(lengths), theta, tau, btok)
        elif early_stop:
            break
    return best


# ----------------------------------------------------------------------------- App. A
def first_token_distribution(p: torch.Tensor, q: torch.Tensor, verified) -> torch.Tensor:
    """Exact distribution of the first emitted token after the anchor when the draft
    proposes x₁ ~ q and ``verified(x₁)`` says whether x₁ is verified (ℓ ≥ 1) or not
    (ℓ = 0: the target samples from p directly). Standard speculative sampling when
    verified. p, q: [V] (float64 recommended)."""
    p, q = p.double(), q.double()
    residual = (p - q).clamp(min=0)
    residual = residual / residual.sum() if float(residual.sum()) > 0 else p
    out = torch.zeros_like(p)
    for x1 in range(p.shape[0]):
        if float(q[x1]) == 0:
            continue
        if verified(x1):
            acc = min(1.0, float(p[x1] / q[x1]))
            branch = (1 - acc) * residual
            branch[x1] += acc
        else:
            branch = p
        out += q[x1] * branch
    return out


def app_a_counterexample() -> dict:
    """The App. A setting, evaluated exactly with both scheduler variants.

    One request, two draft slots over a two-token vocabulary {A, B}; target p = (0.7, 0.3),
    draft q = (0.5, 0.5); c₁ = 0.8 and c₂ depends on the sampled x₁ (1.0 after A, 0.0 after
    B); SPS(1) = 1, SPS(2) = 0.5, SPS(3) = 0.45. Θ₀ = 1.0 and Θ₁ = 1.8·0.5 = 0.9, so the
    early-stopping scheduler never proposes (ℓ = 0); the global search proposes both
    drafts after A (Θ₂ = 2.6·0.45 = 1.17) and nothing after B, so x₁ = A is always
    emitted when drawn: the first token becomes (0.85, 0.15) instead of (0.7, 0.3).
    """
    p = torch.tensor([0.7, 0.3], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    c2 = {0: 1.0, 1: 0.0}
    sps = [1.0, 0.5, 0.45]

    def lengths(early_stop):
        return {x1: schedule_prefixes([[0.8, c2[x1]]], sps, early_stop).lengths[0] for x1 in (0, 1)}

    out = {"target": p.tolist()}
    for name, early in (("early_stop", True), ("global_search", False)):
        ls = lengths(early)
        dist = first_token_distribution(p, q, lambda x1, ls=ls: ls[x1] >= 1)
        out[name] = {"lengths": ls, "distribution": dist.tolist()}
    return out


__all__ = ["Schedule", "prefix_survival", "schedule_prefixes", "first_token_distribution",
           "app_a_counterexample", "SPSCurve"]
