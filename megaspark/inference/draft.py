"""The draft side of speculative decoding (DSPARK_SPEC.md §7 steps 2–6).

:class:`DraftProposer` owns the draft's context K/V cache and turns one backbone pass
into a proposal: base logits ``U = h·W_lmᵀ``, then the sequential Markov stage
(:func:`sample_block`) that samples slot by slot with ``prev`` = the token just
sampled, the per-slot confidences and the proposal length.

Slot conventions (§0): with Convention S slot k proposes d_{k+1} and every slot is a
draft (B drafts); with Convention D slot 0 carries the anchor itself — its "sampled"
token is forced to the anchor, exactly as its teacher-forced label is the anchor in
training — and slots 1…B−1 propose d_1…d_{B−1}. In both the Markov ``prev`` of a slot is
the token of the slot before (the anchor for the first slot), so the RNN state runs
over the same B steps as in training.

TP = 1 only (the full vocabulary of the LM head and ``W2`` on one rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megaspark.inference.sampling import is_greedy, probabilities, proposal_length, sample


@dataclass
class BlockSample:
    """Result of the sequential stage over one block."""

    tokens: list  # sampled (or forced) token of every visited slot, slot order
    logits: list  # corrected logits Z_k [V] of every visited slot (fp32)
    confidences: list  # c_k of the visited *draft* slots (empty without a head)
    stopped_at: Optional[int] = None  # draft index whose confidence fell below the threshold


@dataclass
class Proposal:
    tokens: list  # d_1 … d_ℓ
    q: Optional[torch.Tensor]  # [ℓ, V] draft distributions at temperature T (None if greedy)
    confidences: list = field(default_factory=list)  # c of the draft slots that were computed


def _tp_size() -> int:
    try:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size()
    except Exception:  # noqa: BLE001 - groups not initialised: a single process
        return 1


@torch.no_grad()
def sample_block(
    model,
    h: torch.Tensor,
    anchor: int,
    *,
    temperature: float = 0.0,
    generator: Optional[torch.Generator] = None,
    threshold: float = 0.0,
    forced: Optional[Sequence[int]] = None,
    base_logits: Optional[torch.Tensor] = None,
) -> BlockSample:
    """Sequential Markov sampling over the B slots of one block (§7 steps 3–5).

    ``h`` [B, H] draft hidden states. For k = 0…B−1: ``e_k = W1[prev_k]``; the confidence
    ``c_k = σ(head([h_k; e_k]))`` of a draft slot is computed *before* the slot is sampled
    (it depends on tokens up to the previous slot only) and, with ``threshold > 0``, the
    walk stops at the first ``c_k < threshold``; ``Z_k = U_k + W2·f_k`` with the head's
    feature ``f_k`` (vanilla/gated/rnn, state reset per block); the slot's token is drawn
    from ``softmax(Z_k/T)`` (argmax if greedy) unless ``forced`` gives it (teacher forcing,
    one token per slot); it becomes ``prev_{k+1}``. Convention D's slot 0 is always forced
    to the anchor.
    """
    d = model.dspark_config
    first = 0 if d.convention == "S" else 1
    B = h.shape[0]
    U = base_logits if base_logits is not None else h.float() @ model.output_layer.weight.float().t()
    markov = model.markov_head if d.has_markov else None
    w2 = markov.w2_local().float() if markov is not None else None
    head = model.confidence_head if d.confidence_head else None
    need_e = markov is not None or (head is not None and head.with_markov)
    out = BlockSample(tokens=[], logits=[], confidences=[])
    prev, state = int(anchor), None
    for k in range(B):
        h_k = h[k:k + 1]
        e_k = None
        if need_e:
            e_k = markov.embed_prev(torch.tensor([prev], device=h.device)).to(h.dtype)
        if head is not None and k >= first:
            c = float(torch.sigmoid(head(h_k, e_k))[0])
            out.confidences.append(c)
            if threshold > 0 and c < threshold:
                out.stopped_at = k - first
                break
        if markov is not None:
            f_k, state = markov.step(h_k, e_k, state)
            z = U[k] + (f_k.float() @ w2.t())[0]
        else:
            z = U[k]
        if k < first:
            token = int(anchor)
        elif forced is not None:
            token = int(forced[k])
        elif is_greedy(temperature):
            token = int(z.argmax())
        else:
            token = sample(probabilities(z, temperature), generator)
        out.logits.append(z)
        out.tokens.append(token)
        prev = token
    return out


class DraftProposer:
    """Runs the draft for one sequence: context cache + one block per call."""

    def __init__(self, model):
        if _tp_size() != 1:
            raise ValueError("speculative decoding runs the draft at tensor-parallel size 1")
        self.model = model
        self.config = d = model.dspark_config
        self.block_size = d.block_size
        self.first_slot = 0 if d.convention == "S" else 1
        self.max_drafts = d.drafts_per_block
        self.has_confidence = bool(d.confidence_head)
        self.reset()

    def reset(self) -> None:
        self.cache: list = []
        self.cached = 0  # context positions whose K/V are cached

    @property
    def device(self):
        return self.model.output_layer.weight.device

    @torch.no_grad()
    def hidden(self, anchor: int, position: int, new_features: Optional[torch.Tensor]) -> torch.Tensor:
        """One backbone pass: append ``new_features`` [Tn, L·H] (the positions verified
        since the last call, ``cached … position−1``) to the context cache and return h [B, H]
        of the block ``[anchor, M, …, M]`` at positions ``position …``."""
        n_new = 0 if new_features is None else int(new_features.shape[0])
        if self.cached + n_new != position:
            raise ValueError(f"context covers positions 0..{self.cached + n_new - 1} but the "
                             f"anchor sits at {position}")
        dev = self.device
        ctx = ctx_pos = None
        if n_new:
            ctx = new_features[None].to(dev)
            ctx_pos = torch.arange(self.cached, position, device=dev)[None]
        ids = torch.full((1, self.block_size), self.config.mask_token_id, dtype=torch.long, device=dev)
        ids[0, 0] = int(anchor)
        pos = torch.arange(position, position + self.block_size, device=dev)[None]
        h = self.model.inference_forward(ctx, ctx_pos, ids, pos, self.cache)[0]
        self.cached = position
        return h

    @torch.no_grad()
    def propose(
        self,
        anchor: int,
        position: int,
        new_features: Optional[torch.Tensor],
        *,
        temperature: float = 0.0,
        threshold: float = 0.0,
        generator: Optional[torch.Generator] = None,
        sps=None,
    ) -> Proposal:
        """Draft pass + sequential sampling + proposal length (§7 steps 2–6).

        Length policy: ``sps`` given → the hardware-aware scheduler (§8.2, one request,
        early stopping) on all slots' confidences; else ``threshold > 0`` → first slot
        with ``c_k < threshold``; else (and always without a confidence head) the full
        block.
        """
        h = self.hidden(anchor, position, new_features)
        use_threshold = threshold if (self.has_confidence and sps is None) else 0.0
        blk = sample_block(self.model, h, anchor, temperature=temperature, generator=generator,
                           threshold=use_threshold)
        drafts = blk.tokens[self.first_slot:]
        logits = blk.logits[self.first_slot:]
        if sps is not None and self.has_confidence:
            from megaspark.inference.scheduler import schedule_prefixes

            n = schedule_prefixes([blk.confidences], sps, early_stop=True).lengths[0]
        elif use_threshold > 0:
            n = proposal_length(blk.confidences, use_threshold, len(drafts))
        else:
            n = len(drafts)
        drafts, logits = drafts[:n], logits[:n]
        q = None
        if not is_greedy(temperature) and n:
            q = probabilities(torch.stack(logits), temperature)
        return Proposal(tokens=drafts, q=q, confidences=blk.confidences)


__all__ = ["BlockSample", "Proposal", "DraftProposer", "sample_block"]
