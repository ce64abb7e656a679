"""DSpark heads: the Markov (sequential) head and the confidence head (SPEC §4, §5).

All Markov variants add ``B_k = W2 · f_k`` to the base logits, where the *Markov feature*
``f_k ∈ R^r`` is

* vanilla: ``e_k = W1[prev_k]``;
* gated:   ``σ(W_g [h_k; e_k] + b_g) ⊙ e_k``;
* rnn:     ``tanh(o_raw)`` of a GRU-like cell over the block, state reset per block.

``W1`` (``[V, r]``) is a vocab-parallel embedding and ``W2`` (``r → V``) a column-parallel
linear whose output stays sharded over the vocabulary; the bias itself is only ever
formed shard by shard inside the chunked loss (:mod:`megaspark.losses`) or at inference.
The small projections (gate, joint, confidence) are replicated across TP ranks.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule


def _init_replicated(linear: torch.nn.Linear, std: float, dtype: torch.dtype) -> None:
    """Initialise a small replicated projection in fp32 (the same numbers whatever the run's
    dtype, like megatron's CPU initialisation), then store it in the run's ``params_dtype``."""
    with torch.no_grad():
        torch.nn.init.normal_(linear.weight, std=std)
        torch.nn.init.zeros_(linear.bias)
    linear.to(dtype=dtype)


class MarkovHead(MegatronModule):
    def __init__(self, config, dspark_config):
        super().__init__(config=config)
        r, V, H = dspark_config.markov_rank, dspark_config.vocab_size, config.hidden_size
        self.rank = r
        self.head_type = dspark_config.markov_head_type
        self.markov_w1 = tensor_parallel.VocabParallelEmbedding(
            V, r, init_method=config.init_method, config=config
        )
        self.markov_w2 = tensor_parallel.ColumnParallelLinear(
            r, V, config=config, init_method=config.init_method, bias=False, gather_output=False,
            skip_bias_add=False,
        )
        if self.head_type == "gated":
            self.gate_proj = torch.nn.Linear(H + r, r, bias=True)
        elif self.head_type == "rnn":
            self.joint_proj = torch.nn.Linear(2 * r + H, 3 * r, bias=True)
        for name in ("gate_proj", "joint_proj"):
            module = getattr(self, name, None)
            if module is not None:
                _init_replicated(module, dspark_config.init_std, config.params_dtype)

    def embed_prev(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """prev_ids [...] → e = W1[prev] [..., r] (all-reduced over the vocab shards)."""
        shape = prev_ids.shape
        e = self.markov_w1(prev_ids.reshape(-1, 1))  # [n, 1, r]
        return e.reshape(*shape, self.rank)

    def step(self, h_k: torch.Tensor, e_k: torch.Tensor, state: torch.Tensor | None):
        """One slot: (h_k [n, H], e_k [n, r], state [n, r] or None) → (f_k, new state)."""
        if self.head_type == "vanilla":
            return e_k, state
        if self.head_type == "gated":
            g = torch.sigmoid(self.gate_proj(torch.cat([h_k, e_k], dim=-1)))
            return g * e_k, state
        if state is None:
            state = torch.zeros_like(e_k)
        z = self.joint_proj(torch.cat([state, e_k, h_k], dim=-1))
        g_raw, c_raw, o_raw = z.chunk(3, dim=-1)
        gate = torch.sigmoid(g_raw)
        new_state = gate * state + (1 - gate) * torch.tanh(c_raw)
        return torch.tanh(o_raw), new_state

    def features(self, h: torch.Tensor, prev_ids: torch.Tensor):
        """Training path, teacher-forced: h [b, N, B, H], prev_ids [b, N, B] →
        (f [b, N, B, r], e [b, N, B, r])."""
        e = self.embed_prev(prev_ids).to(h.dtype)
        if self.head_type == "vanilla":
            return e, e
        if self.head_type == "gated":
            f, _ = self.step(h, e, None)
            return f, e
        feats, state = [], None
        for k in range(h.shape[2]):  # sequential over the block, state reset per block
            f_k, state = self.step(h[:, :, k], e[:, :, k], state)
            feats.append(f_k)
        return torch.stack(feats, dim=2), e

    def w2_local(self) -> torch.Tensor:
        """This rank's vocab shard of W2, ``[V/tp, r]``."""
        return self.markov_w2.weight


class ConfidenceHead(MegatronModule):
    """``ℓ_k = w·[h_k; W1[prev_k]] + b`` (or ``w·h_k + b``); c_k = σ(ℓ_k). Replicated."""

    def __init__(self, config, dspark_config):
        super().__init__(config=config)
        self.with_markov = dspark_config.confidence_with_markov
        d_in = config.hidden_size + (dspark_config.markov_rank if self.with_markov else 0)
        self.proj = torch.nn.Linear(d_in, 1, bias=True)
        _init_replicated(self.proj, dspark_config.init_std, config.params_dtype)

    def forward(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        x = torch.cat([h, e], dim=-1) if self.with_markov else h
        return self.proj(x).squeeze(-1).float()
