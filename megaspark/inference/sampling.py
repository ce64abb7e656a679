"""Token sampling and speculative verification (DSPARK_SPEC.md §7 steps 4, 6 and 7).

Pure tensor functions, no model and no process group: everything here can be tested in
isolation. Distributions are 1-D (one row) or ``[n, V]`` float tensors; random draws
come from an explicit ``torch.Generator`` so a run is reproducible from its seed.

Greedy decoding is "temperature below :data:`GREEDY_TEMPERATURE`": the draft proposes
the argmax, its distribution is the one-hot of it, and verification accepts a draft
while it equals the target's argmax — the ``p/q`` rule with one-hot ``p`` and ``q``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

GREEDY_TEMPERATURE = 1e-5
# Residual mass below which the rejection distribution is numerically empty and the
# target distribution itself is used (it can only happen when p ≈ q).
RESIDUAL_EPS = 1e-9


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_TEMPERATURE


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` in fp32, or the one-hot of the argmax when greedy."""
    logits = logits.float()
    if is_greedy(temperature):
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One token from a 1-D distribution (argmax of a one-hot is exact, no draw)."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def sample_logits(logits: torch.Tensor, temperature: float,
                  generator: Optional[torch.Generator]) -> int:
    """One token from 1-D logits at temperature T (argmax when greedy, no draw)."""
    if is_greedy(temperature):
        return int(logits.argmax(-1).item())
    return sample(probabilities(logits, temperature), generator)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p − q, 0))``; ``p`` itself when the residual mass is ~0."""
    r = (p - q).clamp(min=0)
    mass = r.sum()
    if float(mass) <= RESIDUAL_EPS:
        return p
    return r / mass


@dataclass
class Verification:
    """Outcome of verifying ℓ drafts: the first ``accepted`` drafts are kept and
    ``next_token`` (the correction after a rejection, or the bonus if all were accepted)
    follows them."""

    accepted: int
    next_token: int

    def emitted(self, drafts: Sequence[int]) -> list:
        return list(drafts[: self.accepted]) + [self.next_token]


def verify(
    drafts: Sequence[int],
    q: Optional[torch.Tensor],
    p: torch.Tensor,
    temperature: float,
    generator: Optional[torch.Generator],
) -> Verification:
    """Standard speculative sampling, left to right (DSPARK_SPEC.md §7 step 7).

    ``drafts`` d_1…d_ℓ; ``q`` [ℓ, V] the draft distributions they were sampled from
    (unused when greedy, may be None); ``p`` [ℓ+1, V] the target's distributions at the
    ℓ+1 verified positions (row i predicts the token after position i), already at
    temperature T. Accept d_i with probability min(1, p_i(d_i)/q_i(d_i)); at the first
    rejection sample from the residual; if all are accepted sample the bonus from
    ``p[ℓ]``. Greedy: accept while d_i = argmax p_i, then emit argmax of the next row.
    """
    n = len(drafts)
    if p.shape[0] != n + 1:
        raise ValueError(f"need {n + 1} target distributions for {n} drafts, got {p.shape[0]}")
    if is_greedy(temperature):
        target = p.argmax(-1).tolist()
        for i, d in enumerate(drafts):
            if d != target[i]:
                return Verification(i, target[i])
        return Verification(n, target[n])
    for i, d in enumerate(drafts):
        p_d, q_d = float(p[i, d]), float(q[i, d])
        u = float(torch.rand((), generator=generator))
        # u < p/q, written without the division (q_d > 0 because d was sampled from q)
        if u * q_d < p_d:
            continue
        return Verification(i, sample(residual_distribution(p[i], q[i]), generator))
    return Verification(n, sample(p[n], generator))


def proposal_length(confidences: Sequence[float], threshold: float, max_len: int) -> int:
    """Static-threshold policy (DSPARK_SPEC.md §7 step 6): the index of the first
    per-step confidence below ``threshold`` (not the cumulative product), else
    ``max_len``. ``threshold <= 0`` always proposes ``max_len``."""
    if threshold <= 0:
        return max_len
    for k, c in enumerate(confidences[:max_len]):
        if c < threshold:
            return k
    return max_len


__all__ = [
    "GREEDY_TEMPERATURE", "is_greedy", "probabilities", "sample", "sample_logits",
    "residual_distribution", "Verification", "verify", "proposal_length",
]
