"""Speculative decoding with an Eagle3 draft: chain drafting of
``num_speculative_tokens`` tokens per round against an HF target, batch size 1, lossless at
any temperature (the verification of :mod:`megaspark.inference.sampling`).

The draft runs exactly the attention it was trained with (``megaspark/models/eagle3``):

* its **context cache** holds, for every verified position p, the step-0 key/value of the
  layer input ``[RMSNorm(embed(x_{p+1})); RMSNorm(fc(aux[p]))]`` (target features of p, the
  token that followed it);
* a round starts at the last verified position p = s − 1 with the anchor x_s: step 0's
  query at p attends to the cached positions 0 … p and proposes d_1; step k feeds back the
  layer's own output and ``embed(d_k)`` at the same position, its query sees the context
  cache and the keys of steps 1 … k at p (test-time training's attention), and proposes
  d_{k+1}. Those chain keys are dropped after the round;
* after verification the accepted positions' target features (with the tokens that
  followed them) extend the context cache in the next round.

Draft ids map to target ids through the draft vocabulary; at T > 0 the proposal
distribution is the draft's softmax placed on those target ids (0 elsewhere), so the
acceptance test min(1, p/q) is the standard one. TP = 1.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megaspark.inference.metrics import RoundRecord, SpecStats
from megaspark.inference.sampling import is_greedy, probabilities, sample, sample_logits, verify
from megaspark.inference.speculative import GenerationOutput, _Emitter, _generator, _inference_mode
from megaspark.inference.target import CachedTarget


class Eagle3Proposer:
    """The draft side: context cache + one chain per round."""

    def __init__(self, model, num_tokens: int):
        from megatron.core import parallel_state

        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("speculative decoding runs the Eagle3 draft at tensor-parallel size 1")
        if num_tokens < 1:
            raise ValueError(f"--num-speculative-tokens {num_tokens} must be >= 1")
        self.m = model
        self.e = model.eagle3_config
        self.num_tokens = self.max_drafts = int(num_tokens)
        self.device = model.lm_head.weight.device
        self.reset()

    def reset(self) -> None:
        self.k = self.v = None  # [1, nkv, T, hd] step-0 keys/values of the verified positions
        self.cached = 0

    def _qkv(self, emb, g, pos):
        """Rows [n, H] at positions ``pos`` [n] → q [1, nh, n, dq], k [1, nkv, n, dq], v
        (the draft's own projections and RoPE: GQA or MLA)."""
        m = self.m
        a = torch.cat([m.input_layernorm(emb), m.hidden_norm(g)], dim=-1)[:, None]  # [n, 1, 2H]
        return m.qkv(a, *m.rope(pos[None]))

    def _finish(self, att, g):
        """Attention output [1, nh, 1, dv] of one row and its residual g [1, H] → o [1, H]."""
        m = self.m
        h = g[:, None] + m.attention_output(att)
        x = m.post_attention_layernorm(h)
        gate, _ = m.linear_gate(x)
        up, _ = m.linear_up(x)
        mlp, _ = m.linear_down(F.silu(gate) * up)
        return (h + mlp)[:, 0]

    def _attend(self, q, chain_k, chain_v):
        """q [1, nh, 1, hd] of the last position against the context cache and the chain."""
        rep = q.shape[1] // self.k.shape[1]
        k = torch.cat([self.k] + chain_k, dim=2).repeat_interleave(rep, dim=1)
        v = torch.cat([self.v] + chain_v, dim=2).repeat_interleave(rep, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.e.softmax_scale
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)

    def _logits(self, o):
        z, _ = self.m.lm_head(self.m.final_norm(o)[:, None])
        return z[:, 0].float()[0]  # [N] over the draft vocabulary

    @torch.no_grad()
    def propose(self, features: torch.Tensor, next_tokens: Sequence[int], temperature: float = 0.0,
                generator=None, forced: Optional[Sequence[int]] = None):
        """Extend the context cache with ``features`` [n, 3H] of the positions ``cached …
        cached+n−1`` and the tokens that followed them (``next_tokens``, the last one the
        anchor), then draft the chain from the last of them. Returns (target ids d_1 … d_K,
        the proposal distributions [K, V] over the target vocabulary or None when greedy,
        the draft-vocabulary logits of each step [K, N]). ``forced`` teacher-forces the
        chain's tokens (target ids; tests)."""
        m = self.m
        n = int(features.shape[0])
        if n < 1 or len(next_tokens) != n:
            raise ValueError("propose needs the features of at least one new position and its next token")
        ids = torch.as_tensor(list(next_tokens), dtype=torch.long, device=self.device)
        pos = torch.arange(self.cached, self.cached + n, device=self.device)
        g0, _ = m.fc(features.to(self.device, m.fc.weight.dtype)[:, None])
        g0 = g0[:, 0]
        emb = m.embedding(ids[None])[0].to(g0.dtype)
        q, k, v = self._qkv(emb, g0, pos)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.cached += n
        # step 0: the last new position's query over the cache 0 … p
        p = pos[-1:]
        o = self._finish(self._attend(q[:, :, -1:], [], []), g0[-1:])
        tokens, dists, logits = [], [], []
        chain_k, chain_v = [], []
        V = m.eagle3_config.vocab_size
        for step in range(self.num_tokens):
            z = self._logits(o)
            logits.append(z)
            if forced is not None:
                d = int(forced[step])
            elif is_greedy(temperature):
                d = int(m.draft_to_target[int(z.argmax())])
            else:
                qd = probabilities(z, temperature)
                full = torch.zeros(V, dtype=qd.dtype, device=qd.device)
                full[m.draft_to_target] = qd
                dists.append(full)
                d = sample(full, generator)
            tokens.append(d)
            if step + 1 == self.num_tokens:
                break
            emb = m.embedding(torch.tensor([[d]], device=self.device))[0].to(o.dtype)
            qk, kk, vk = self._qkv(emb, o, p)
            chain_k.append(kk)
            chain_v.append(vk)
            o = self._finish(self._attend(qk, chain_k, chain_v), o)
        return tokens, (torch.stack(dists) if dists else None), torch.stack(logits)


class Eagle3SpeculativeDecoder:
    """Eagle3 draft + HF target (tapped at the draft's three layers)."""

    def __init__(self, draft_model, target, layer_ids: Sequence[int], num_speculative_tokens: int = 5,
                 stop_token_ids: Sequence[int] = ()):
        self.draft = Eagle3Proposer(draft_model, num_speculative_tokens)
        self.config = draft_model.eagle3_config
        self.target = CachedTarget(target, layer_ids=list(layer_ids))
        if self.target.vocab_size != draft_model.eagle3_config.vocab_size:
            raise ValueError(f"draft's target vocabulary {draft_model.eagle3_config.vocab_size} != target "
                             f"vocabulary {self.target.vocab_size}")
        self.stop_token_ids = set(int(t) for t in stop_token_ids)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 generator=None, stop_token_ids: Optional[Sequence[int]] = None,
                 confidence_threshold: float = 0.0) -> GenerationOutput:
        """``confidence_threshold`` is accepted for the evaluation driver's sake and has no
        effect (an Eagle3 draft has no confidence head: every round drafts the full chain)."""
        with _inference_mode():
            return self._generate(prompt_ids, max_new_tokens, temperature, generator, stop_token_ids)

    def _generate(self, prompt_ids, max_new_tokens, temperature, generator, stop_token_ids):
        if len(prompt_ids) == 0:
            raise ValueError("the prompt must contain at least one token")
        gen = _generator(generator)
        stops = self.stop_token_ids if stop_token_ids is None else set(int(t) for t in stop_token_ids)
        stats = SpecStats(max_drafts=self.draft.num_tokens)
        emit = _Emitter(max_new_tokens, stops)
        widths = []
        t0 = time.perf_counter()
        self.target.reset()
        self.draft.reset()
        step = self.target.forward(list(prompt_ids), last_only=True)
        anchor = sample_logits(step.logits[-1], temperature, gen)
        features, next_tokens = step.features, list(prompt_ids[1:]) + [anchor]
        position = len(prompt_ids)
        emit.push([anchor])
        while not emit.done:
            drafts, q, _ = self.draft.propose(features, next_tokens, temperature, gen)
            widths.append(len(drafts) + 1)
            step = self.target.forward([anchor] + drafts)
            p = probabilities(step.logits, temperature)
            result = verify(drafts, None if q is None else q.to(p.device), p, temperature, gen)
            n = result.accepted
            self.target.crop(position + n + 1)
            emitted = result.emitted(drafts)
            stats.add_round(RoundRecord(proposed=len(drafts), accepted=n))
            emit.push(emitted)
            features = step.features[: n + 1]
            next_tokens = emitted  # the token after each newly verified position
            position += n + 1
            anchor = result.next_token
        stats.seconds = time.perf_counter() - t0
        stats.new_tokens = len(emit.tokens)
        return GenerationOutput(tokens=emit.tokens, stats=stats, finished_by_stop=emit.stopped,
                                verify_widths=widths)


__all__ = ["Eagle3Proposer", "Eagle3SpeculativeDecoder"]
