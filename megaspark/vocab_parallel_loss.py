"""The vocab-parallel CE and L1 terms of the DSpark loss and their gradients (DSPARK_SPEC.md
§5.2, §6; DESIGN.md decision 4); :mod:`megaspark.losses` assembles the loss from them.

The vocabulary is sharded over the tensor-parallel group: each rank holds ``V/tp`` rows of
the frozen LM head and of ``W2``, so it only ever forms its shard of the corrected logits
``Z = h·W_lmᵀ + f·W2ᵀ``. From the shards:

* CE  = logsumexp(Z) − Z[y], with the max all-reduced (MAX) and Σexp and Z[y] all-reduced
  (SUM) — Megatron's vocab-parallel cross-entropy;
* L1  = Σ_v |p_d − p_t| = 2·TV, a per-shard sum followed by one all-reduce; ``p_t`` is the
  target's softmax computed the same way from its post-norm last hidden state;
* c*  = clamp(1 − ½·L1, 0, 1), detached, the confidence target and the analytic acceptance.

Two implementations of the same numbers:

* :func:`vocab_parallel_ce_l1_sums` (what :func:`dspark_loss_sums` uses): one fused
  ``torch.autograd.Function`` whose differentiable outputs are the two *scalars*
  ``Σ ω·ce`` and ``Σ ω·l1`` (the weights ω are known at forward time). Its forward walks
  the rows in chunks and, while the chunk's ``[chunk, V/tp]`` probabilities are live,
  accumulates the gradients of both scalars w.r.t. h, the Markov features and the local
  W2 shard from the hand-derived formulas

      dce/dz = p_d − onehot(y),    dl1/dz_j = p_d,j · (s_j − Σ_k s_k·p_d,k),  s = sign(p_d − p_t)

  (Σ_k over the full vocabulary: one all-reduce); backward only scales them by the two
  upstream scalars. No autograd graph over ``[rows, V]`` tensors, nothing recomputed, the
  target logits formed once per chunk without grad and not at all when L1 is not needed.
  Peak extra memory: two ``[chunk, V/tp]`` fp32 buffers (one without L1; plus half of one
  with bf16 weights) and the gradient buffers (``[2, R, H]``, ``[2, R, r]``,
  ``[2, V/tp, r]`` fp32). The LM head must be frozen. The model passes ``combine = (α_ce,
  α_l1)``: the only differentiable output is then α_ce·Σω·ce + α_l1·Σω·l1, the two
  gradients are combined per chunk and the gradient GEMMs run once (buffers ``[1, …]``).
  The model also passes its supervised rows sorted by (sample, target position) with their
  :class:`RowGroups`: overlapping blocks score the same position several times, so the
  target's logits and softmax are formed once per group, and for the vanilla Markov head
  (whose feature W1[prev] the group shares) so are the bias ``f·W2ᵀ`` and the two gradient
  products, on the group's summed ``dZ``; only the draft's logits and ``dh`` stay per row
  (a third fewer GEMM rows in the loss at S = 512, 64 anchors, B = 7). That path keeps the
  signs of ``p_t − p_d`` in an int8 ``[chunk, V/tp]`` buffer between its two passes.
* :func:`vocab_parallel_ce_l1`: per-row differentiable CE and L1 by plain autograd, each
  chunk under activation checkpointing (any upstream gradient, e.g. per-row weights applied
  later; kept as the general form and as the benchmark/test comparison).

Rows outside the eval mask are skipped when their indices come from the host (no shape
here depends on device data). The results equal the unchunked single-device formula.

Every term is returned as a *sum* weighted by ω; the caller divides by the global
denominator (DESIGN.md decision 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

_COLUMN_BLOCK = 8192  # vocabulary columns per block of the fused loss's reductions / bf16 GEMMs


# ----------------------------------------------------------------------------- collectives
def _copy_to_tp(x, group):
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=group) if group_size(group) > 1 else x


def _reduce_from_tp(x, group):
    """Forward all-reduce (SUM), backward identity: every TP rank holds the same loss."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group) if group_size(group) > 1 else x


def _all_reduce_max_(x, group):
    if group_size(group) > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    return x


def group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


# ----------------------------------------------------------------------------- per-row terms
def _vocab_parallel_softmax_stats(logits: torch.Tensor, group):
    """(max, exp(logits - max), Σexp over the full vocabulary) for sharded logits."""
    m = _all_reduce_max_(logits.detach().max(dim=-1).values, group)
    ex = torch.exp(logits - m[:, None])
    return m, ex, _reduce_from_tp(ex.sum(dim=-1), group)


def _logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.to(weight.dtype) @ weight.t()).float()


def _chunk_terms(h, feat, labels, target_hidden, lm_head, w2, vocab_start: int, group, need_l1: bool):
    """CE and L1 of one chunk of rows; every tensor here is [rows_c, ·]."""
    h = _copy_to_tp(h, group)
    # Matmuls in the weights' dtype (no fp32 copy of a [V/tp, H] table per chunk), then
    # everything downstream in fp32 (DESIGN.md decision 7).
    logits = _logits(h, lm_head)
    if feat is not None:
        logits = logits + _logits(_copy_to_tp(feat, group), w2)
    m, ex, sumexp = _vocab_parallel_softmax_stats(logits, group)
    lse = m + torch.log(sumexp)
    v_local = logits.shape[-1]
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    picked = logits.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1)
    label_logit = _reduce_from_tp(torch.where(in_shard, picked, torch.zeros_like(picked)), group)
    ce = lse - label_logit
    if not need_l1:
        return ce, torch.zeros_like(ce)
    with torch.no_grad():
        t_logits = _logits(target_hidden, lm_head)
        _, t_ex, t_sum = _vocab_parallel_softmax_stats(t_logits, group)
        p_t = t_ex / t_sum[:, None]
    # Each rank's |p_d − p_t| shard depends on the replicated Σexp, so the gradient that
    # reaches Σexp through this path is partial per rank: copy_to (backward all-reduce)
    # sums it. The CE path uses Σexp identically on every rank and must not be summed.
    p_d = ex / _copy_to_tp(sumexp, group)[:, None]
    l1 = _reduce_from_tp((p_d - p_t).abs().sum(dim=-1), group)
    return ce, l1


def vocab_parallel_ce_l1(
    h: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.Tensor,
    *,
    feat: Optional[torch.Tensor] = None,
    w2: Optional[torch.Tensor] = None,
    target_hidden: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group=None,
    chunk_rows: int = 512,
    checkpoint_chunks: bool = True,
    need_l1: Optional[bool] = None,
):
    """Per-row CE and L1 for rows of draft hidden states, by autograd (per-row
    differentiable; see :func:`vocab_parallel_ce_l1_sums` for the fused weighted sums).

    h [R, H], labels [R], lm_head [V/tp, H] (this rank's shard, starting at
    ``vocab_start``), feat [R, r] and w2 [V/tp, r] for the Markov bias, target_hidden
    [R, H] the target's post-norm last state at the aligned position (None: no L1).
    ``need_l1``: see :func:`vocab_parallel_ce_l1_sums`.
    Returns (ce [R], l1 [R]) in fp32; l1 is zeros when it is not computed.
    """
    need_l1 = resolve_need_l1(need_l1, target_hidden)
    ces, l1s = [], []
    for start in range(0, h.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        args = (
            h[sl],
            feat[sl] if feat is not None else None,
            labels[sl],
            target_hidden[sl] if need_l1 else None,
            lm_head,
            w2,
            vocab_start,
            group,
            need_l1,
        )
        if checkpoint_chunks and torch.is_grad_enabled():
            ce, l1 = checkpoint(_chunk_terms, *args, use_reentrant=False, preserve_rng_state=False)  # no RNG inside
        else:
            ce, l1 = _chunk_terms(*args)
        ces.append(ce)
        l1s.append(l1)
    if not ces:
        z = h.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(ces), torch.cat(l1s)


# ----------------------------------------------------------------------------- fused sums
def resolve_need_l1(need_l1: Optional[bool], target_hidden) -> bool:
    if need_l1 is None:
        return target_hidden is not None
    if need_l1 and target_hidden is None:
        raise ValueError("need_l1=True needs target_hidden (the target's last hidden state)")
    return bool(need_l1)


def _all_reduce_sum_(x, group):
    if group_size(group) > 1:
        torch.distributed.all_reduce(x, group=group)
    return x


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out (fp32, contiguous) = a @ b, the GEMM in b's dtype (a is cast to it)."""
    a = a.to(b.dtype)
    if b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _logits_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, accumulate: bool = False):
    """out (fp32 [c, V/tp]) = (or +=) x·weightᵀ, the GEMM in the weight's dtype. For other
    dtypes than fp32 by column blocks, so that neither the GEMM's output nor its fp32
    promotion is ever a whole [c, V/tp] temporary."""
    x = x.to(weight.dtype)
    if weight.dtype == out.dtype:
        if accumulate:
            out.addmm_(x, weight.t())
        else:
            torch.mm(x, weight.t(), out=out)
        return
    for j in range(0, weight.shape[0], _COLUMN_BLOCK):
        block = x @ weight[j:j + _COLUMN_BLOCK].t()
        if accumulate:
            out[:, j:j + _COLUMN_BLOCK].add_(block)
        else:
            out[:, j:j + _COLUMN_BLOCK].copy_(block)


def _label_logits(z: torch.Tensor, labels: torch.Tensor, vocab_start: int):
    """(in this shard [c], the label's local column [c, 1], its logit or 0 [c]) of logits
    z [c, V/tp] whose shard starts at ``vocab_start``."""
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < z.shape[1])
    idx = local.clamp(0, z.shape[1] - 1)[:, None]
    picked = z.gather(1, idx).squeeze(1)
    return in_shard, idx, torch.where(in_shard, picked, torch.zeros_like(picked))


def _add_dw2(dw2: torch.Tensor, g: torch.Tensor, fc: torch.Tensor) -> None:
    """dw2 (fp32 [V/tp, r]) += gᵀ·fc, the GEMM in g's dtype; for other dtypes than fp32 by
    vocabulary blocks (no [V/tp, r] temporaries: GEMM output, promotion)."""
    if g.dtype == dw2.dtype:
        dw2.addmm_(g.t(), fc)
        return
    for j in range(0, dw2.shape[0], _COLUMN_BLOCK):
        dw2[j:j + _COLUMN_BLOCK].add_(g[:, j:j + _COLUMN_BLOCK].t() @ fc)


def _fused_chunks(h, feat, w2, lm_head, labels, weights, target_hidden, vocab_start: int, group,
                  chunk_rows: int, need_l1: bool, want_dh: bool, want_dfeat: bool, want_dw2: bool,
                  combine=None, groups: Optional[RowGroups] = None, feat_grouped: bool = False):
    """The chunk loop of :func:`vocab_parallel_ce_l1_sums` (no autograd here).

    Returns (ce [R], l1 [R], dh [K, R, H], dfeat [K, R, r], dw2 [K, V/tp, r]) in fp32, K = 2
    with L1 (else 1), the gradient buffers None where not wanted: ``[0]`` holds the
    rank-local partial gradient of Σω·ce, ``[1]`` that of **−**Σω·l1 (the sign is folded
    into the backward's coefficient; it saves a pass over [chunk, V/tp]). The loop's bounds
    are host ints and nothing here reads device data on the host (torch.compile traces it
    whole: every ``out=`` is contiguous).

    ``groups`` (:class:`RowGroups`; only with ``combine`` or without gradients):
    ``target_hidden`` is then per group ([U, H]), and with ``feat_grouped`` so is ``feat``
    ([U, r]; ``dfeat`` is then [1, U, r]).
    """
    R, V_l = h.shape[0], lm_head.shape[0]
    K = 2 if need_l1 and combine is None else 1  # gradient sets: one when α-combined
    if groups is not None and K != 1 and (want_dh or want_dfeat or want_dw2):
        raise ValueError("grouped rows need the α-combined gradients (combine)")
    f32, dev = torch.float32, h.device
    out = dict(
        ce=torch.zeros(R, dtype=f32, device=dev),
        l1=torch.zeros(R, dtype=f32, device=dev),
        dh=torch.empty(K, R, h.shape[1], dtype=f32, device=dev) if want_dh else None,
        # grouped features: a group split over two chunks accumulates from both
        dfeat=((torch.zeros if feat_grouped else torch.empty)(K, feat.shape[0], feat.shape[1], dtype=f32,
                                                             device=dev) if want_dfeat else None),
        dw2=torch.zeros(K, V_l, w2.shape[1], dtype=f32, device=dev) if want_dw2 else None,
    )
    for start in range(0, R, chunk_rows):
        # one function call per chunk: its [K, c, V/tp] buffer is freed before the next one
        sl = slice(start, min(start + chunk_rows, R))
        if groups is None:
            _fused_chunk(sl, out, h, feat, w2, lm_head, labels, weights, target_hidden, vocab_start, group,
                         need_l1, combine)
        else:
            _fused_chunk_grouped(sl, out, h, feat, w2, lm_head, labels, weights, target_hidden, vocab_start,
                                 group, need_l1, combine, groups, feat_grouped)
    return out["ce"], out["l1"], out["dh"], out["dfeat"], out["dw2"]


def _fused_chunk(sl, out, h, feat, w2, lm_head, labels, weights, target_hidden, vocab_start, group,
                 need_l1, combine=None):
    """One chunk of rows. The only [c, V/tp]-sized tensors: one fp32 [K, c, V/tp] buffer (the
    draft logits → p_d → ω·dce/dz in ``[0]``, the target logits → p_t → p_t − p_d →
    −ω·dl1/dz in ``[1]``, all in place) and, for non-fp32 weights, a copy of one of its
    slices in their dtype for the gradient GEMMs. Collectives: MAX of the row maxima, SUM of
    (Σexp, the label logit, target Σexp), SUM of (L1 partial, Σ s·p_d partial)."""
    dh, dfeat, dw2 = out["dh"], out["dfeat"], out["dw2"]
    grads = dh is not None or dfeat is not None or dw2 is not None
    V_l, K = lm_head.shape[0], 2 if need_l1 else 1
    f32, dev = torch.float32, h.device
    c = sl.stop - sl.start
    buf = torch.empty(K, c, V_l, dtype=f32, device=dev)
    # Matmuls in the weights' dtype (no fp32 copy of a [V/tp, H] table), everything
    # downstream in fp32 (DESIGN.md decision 7).
    z = buf[0]
    _logits_into(z, h[sl], lm_head)
    if feat is not None:
        _logits_into(z, feat[sl], w2, accumulate=True)
    if need_l1:
        t = buf[1]
        _logits_into(t, target_hidden[sl], lm_head)
        m = torch.stack([z.amax(dim=-1), t.amax(dim=-1)])
    else:
        m = z.amax(dim=-1)[None]
    _all_reduce_max_(m, group)
    in_shard, idx, picked = _label_logits(z, labels[sl], vocab_start)
    z.sub_(m[0, :, None]).exp_()
    stats = [z.sum(dim=-1), picked]
    if need_l1:
        t.sub_(m[1, :, None]).exp_()
        stats.append(t.sum(dim=-1))
    stats = _all_reduce_sum_(torch.stack(stats), group)
    out["ce"][sl] = m[0] + torch.log(stats[0]) - stats[1]
    p = z.div_(stats[0, :, None])  # p_d
    if need_l1:
        t.div_(stats[2, :, None]).sub_(p)  # p_t − p_d
        # Σ|p_t − p_d| and Σ s'·p_d by column blocks: torch.sum's accurate (cascade)
        # reduction with only a [c, block] temporary (vector_norm / bmm accumulate fp32
        # sequentially: ~1e-4 relative error at V = 150k)
        red = torch.zeros(2 if grads else 1, c, dtype=f32, device=dev)
        for j in range(0, V_l, _COLUMN_BLOCK):
            d = t[:, j:j + _COLUMN_BLOCK]
            red[0] += d.abs().sum(dim=-1)
            if grads:
                d.sign_()  # s' = −s, s = sign(p_d − p_t) (0 where equal, as autograd's abs)
                red[1] += (d * p[:, j:j + _COLUMN_BLOCK]).sum(dim=-1)
        red = _all_reduce_sum_(red, group)
        out["l1"][sl] = red[0]
    if not grads:
        return
    w_c = weights[sl]
    p.mul_(w_c[:, None])  # ω·p_d
    if need_l1:
        # dl1/dz = p_d·(s − Σ s·p_d) = −p_d·(s' − Σ s'·p_d): keep the negative (times ω)
        t.sub_(red[1, :, None]).mul_(p)
    p.scatter_add_(1, idx, -(w_c * in_shard)[:, None])  # ω·(p_d − onehot)
    if combine is not None:  # one set of gradient GEMMs: ω·(α_ce·dce/dz + α_l1·dl1/dz)
        a_ce, a_l1 = combine
        p.mul_(a_ce)
        if need_l1:
            p.sub_(t, alpha=a_l1)
        K = 1
    fc = None if dw2 is None else feat[sl].to(w2.dtype)
    for k in range(K):  # one [c, V/tp] slice at a time: a bf16 copy is half a slice
        g = buf[k].to(lm_head.dtype)
        if dh is not None:
            _mm_into(dh[k, sl], g, lm_head)
        if w2 is not None:
            g = g if w2.dtype == lm_head.dtype else buf[k].to(w2.dtype)
            if dfeat is not None:
                _mm_into(dfeat[k, sl], g, w2)
            if dw2 is not None:
                _add_dw2(dw2[k], g, fc)
        del g  # before the next slice's copy is made


_SIGN_BLOCK = 2048  # vocabulary columns per step of the grouped chunk's L1 / gradient loops


def _fused_chunk_grouped(sl, out, h, feat, w2, lm_head, labels, weights, target_u, vocab_start, group,
                         need_l1, combine, groups: RowGroups, feat_grouped: bool):
    """One chunk of rows sorted by group (:class:`RowGroups`), α-combined gradients only.

    [c, V/tp]-sized tensors: the draft's logits → p_d → the combined dZ (fp32), one fp32
    buffer whose first n rows (n = the chunk's groups) hold the groups' Markov bias, then
    their target probabilities, then their summed dZ, and an int8 sign(p_t − p_d); the rest
    is by blocks of ``_SIGN_BLOCK`` columns. Same collectives as :func:`_fused_chunk`."""
    dh, dfeat, dw2 = out["dh"], out["dfeat"], out["dw2"]
    grads = dh is not None or dfeat is not None or dw2 is not None
    V_l, f32, dev = lm_head.shape[0], torch.float32, h.device
    c = sl.stop - sl.start
    u0, u1 = groups.span(sl.start, sl.stop)
    n = u1 - u0
    local = groups.index[sl] - u0  # each row's group within the chunk
    z = torch.empty(c, V_l, dtype=f32, device=dev)
    per_group = feat is not None and feat_grouped
    gbuf = torch.empty(c, V_l, dtype=f32, device=dev) if (need_l1 or per_group) else None
    if per_group:  # the groups' Markov bias, copied to their rows, then + h·W_lmᵀ
        _logits_into(gbuf[:n], feat[u0:u1], w2)
        torch.index_select(gbuf[:n], 0, local, out=z)
        _logits_into(z, h[sl], lm_head, accumulate=True)
    else:
        _logits_into(z, h[sl], lm_head)
        if feat is not None:
            _logits_into(z, feat[sl], w2, accumulate=True)
    m = z.amax(dim=-1)
    if need_l1:
        t = gbuf[:n]
        _logits_into(t, target_u[u0:u1], lm_head)
        m = torch.cat([m, t.amax(dim=-1)])
    _all_reduce_max_(m, group)
    in_shard, idx, picked = _label_logits(z, labels[sl], vocab_start)
    z.sub_(m[:c, None]).exp_()
    stats = [z.sum(dim=-1), picked]
    if need_l1:
        t.sub_(m[c:, None]).exp_()
        stats.append(t.sum(dim=-1))
    stats = _all_reduce_sum_(torch.cat(stats), group)
    out["ce"][sl] = m[:c] + torch.log(stats[:c]) - stats[c:2 * c]
    p = z.div_(stats[:c, None])  # p_d
    sign = None
    if need_l1:
        t.div_(stats[2 * c:, None])  # the groups' p_t
        red = torch.zeros(2 if grads else 1, c, dtype=f32, device=dev)
        sign = torch.empty(c, V_l, dtype=torch.int8, device=dev) if grads else None
        for j in range(0, V_l, _SIGN_BLOCK):
            cols = slice(j, j + _SIGN_BLOCK)
            d = t[:, cols].index_select(0, local).sub_(p[:, cols])  # p_t − p_d
            red[0] += d.abs().sum(dim=-1)
            if grads:
                d.sign_()  # s' = −sign(p_d − p_t) (0 where equal, as autograd's abs)
                red[1] += (d * p[:, cols]).sum(dim=-1)
                sign[:, cols] = d
        red = _all_reduce_sum_(red, group)
        out["l1"][sl] = red[0]
    if not grads:
        return
    a_ce, a_l1 = combine
    w_c = weights[sl]
    if need_l1:
        # dZ = ω·p_d·(α_ce − α_l1·(s' − Σ s'·p_d)) − α_ce·ω·onehot  (dl1/dz = −p_d·(s' − Σ s'·p_d))
        for j in range(0, V_l, _SIGN_BLOCK):
            cols = slice(j, j + _SIGN_BLOCK)
            coef = sign[:, cols].to(f32).sub_(red[1, :, None]).mul_(-a_l1).add_(a_ce).mul_(w_c[:, None])
            p[:, cols].mul_(coef)
        del sign
    else:
        p.mul_((a_ce * w_c)[:, None])
    p.scatter_add_(1, idx, -(a_ce * w_c * in_shard)[:, None])
    g = p.to(lm_head.dtype)
    if dh is not None:
        _mm_into(dh[0, sl], g, lm_head)
    if w2 is None or (dfeat is None and dw2 is None):
        return
    if per_group:  # Σ of the group's rows' dZ, then the two products once per group
        gsum = gbuf[:n].zero_().index_add_(0, local, p)
        g, fc = gsum.to(w2.dtype), feat[u0:u1].to(w2.dtype)
        if dfeat is not None:
            if w2.dtype == f32:
                dfeat[0, u0:u1].addmm_(g, w2)
            else:
                dfeat[0, u0:u1].add_((g @ w2).float())
    else:
        g, fc = p.to(w2.dtype), feat[sl].to(w2.dtype)
        if dfeat is not None:
            _mm_into(dfeat[0, sl], g, w2)
    if dw2 is not None:
        _add_dw2(dw2[0], g, fc)


class _FusedCEL1Sums(torch.autograd.Function):
    """(objective, Σω·ce, Σω·l1, ce [R], l1 [R]) with gradients w.r.t. h, feat and w2
    (rank-local partial gradients: h and feat come through copy_to_tp, whose backward
    all-reduces them). Without ``combine`` the two sums are differentiable (backward: two
    scalars times two gradient sets of the forward) and the objective is a constant 0; with
    ``combine = (α_ce, α_l1)`` only objective = α_ce·Σω·ce + α_l1·Σω·l1 is (one gradient set:
    half the gradient GEMMs)."""

    @staticmethod
    def forward(ctx, h, feat, w2, lm_head, labels, weights, target_hidden, opts):
        vocab_start, group, chunk_rows, need_l1, want, combine, groups, feat_grouped = opts
        ce, l1, dh, dfeat, dw2 = _fused_chunks(h, feat, w2, lm_head, labels, weights, target_hidden,
                                               vocab_start, group, chunk_rows, need_l1, *want,
                                               combine=combine, groups=groups, feat_grouped=feat_grouped)
        ce_sum, l1_sum = (weights * ce).sum(), (weights * l1).sum()
        if combine is None:
            objective = ce_sum.new_zeros(())
            ctx.mark_non_differentiable(objective, ce, l1)
        else:
            objective = combine[0] * ce_sum + combine[1] * l1_sum
            ctx.mark_non_differentiable(ce_sum, l1_sum, ce, l1)
        ctx.save_for_backward(dh, dfeat, dw2)
        ctx.need_l1, ctx.combined = need_l1, combine is not None
        ctx.dtypes = (h.dtype, None if feat is None else feat.dtype, None if w2 is None else w2.dtype)
        return objective, ce_sum, l1_sum, ce, l1

    @staticmethod
    @once_differentiable
    def backward(ctx, g_obj, g_ce, g_l1, _g_ce_rows, _g_l1_rows):
        dh, dfeat, dw2 = ctx.saved_tensors
        if ctx.combined:
            coef = g_obj.reshape(1)
        else:
            coef = torch.stack([g_ce, -g_l1]) if ctx.need_l1 else g_ce.reshape(1)
        coef = coef.float()
        out = []
        for buf, dtype in zip((dh, dfeat, dw2), ctx.dtypes):
            out.append(None if buf is None else torch.einsum("kij,k->ij", buf, coef).to(dtype))
        return (*out, None, None, None, None, None)


def vocab_parallel_ce_l1_sums(
    h: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    lm_head: torch.Tensor,
    *,
    feat: Optional[torch.Tensor] = None,
    w2: Optional[torch.Tensor] = None,
    target_hidden: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group=None,
    chunk_rows: int = 512,
    need_l1: Optional[bool] = None,
    combine: Optional[tuple] = None,
    groups: Optional[RowGroups] = None,
    feat_by_prev: bool = False,
):
    """Fused weighted CE and L1 sums with a hand-derived backward (module docstring).

    h [R, H], labels [R], weights ω [R] (no grad), lm_head [V/tp, H] (this rank's frozen
    shard, starting at ``vocab_start``), feat [R, r] and w2 [V/tp, r] for the Markov bias,
    target_hidden [R, H] the target's post-norm last state at the aligned position.
    ``need_l1``: compute L1 (default: whenever ``target_hidden`` is given); with False the
    target logits are never formed and l1 is zeros.

    Returns (ce_sum, l1_sum, ce [R], l1 [R]), all fp32: ce_sum = Σ ω·ce and l1_sum = Σ ω·l1
    are differentiable w.r.t. h, feat and w2; the per-row values are not (metrics, c*).
    With ``combine = (α_ce, α_l1)`` returns (objective, ce_sum, l1_sum, ce, l1) where only
    objective = α_ce·ce_sum + α_l1·l1_sum is differentiable: the two gradients are combined
    in the forward, so the gradient GEMMs run once instead of twice.
    ``groups``: the rows come sorted by target position (:func:`group_rows`); the target's
    logits are then formed once per group, and with ``feat_by_prev`` (the Markov feature is a
    function of the previous token, i.e. the vanilla head, and ``groups.prev_shared``) so are
    the Markov bias and its gradient products. Used with ``combine`` or without gradients
    (otherwise ignored). Same results up to the order of floating-point sums.
    Peak extra memory O(chunk_rows · V/tp) plus fp32 gradient buffers [2, R, H], [2, R, r]
    and [2, V/tp, r] (only those whose input requires grad, and only with grad enabled).
    """
    need_l1 = resolve_need_l1(need_l1, target_hidden)
    if (feat is None) != (w2 is None):
        raise ValueError("feat and w2 come together (the Markov bias f·W2ᵀ)")
    grad_on = torch.is_grad_enabled()
    if grad_on and lm_head.requires_grad:
        raise ValueError("the fused loss treats the LM head as frozen: lm_head must not require "
                         "grad (use vocab_parallel_ce_l1 for a trainable head)")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    # Replicated inputs enter the vocab-parallel region here: identity forward, and the
    # backward all-reduces the rank-local partial gradients over TP.
    h = _copy_to_tp(h, group)
    feat = None if feat is None else _copy_to_tp(feat, group)
    want = (grad_on and h.requires_grad, grad_on and feat is not None and feat.requires_grad,
            grad_on and w2 is not None and w2.requires_grad)
    weights = weights.detach().float()
    target = target_hidden.detach() if need_l1 else None
    combine = None if combine is None else (float(combine[0]), float(combine[1]))
    if groups is not None and (combine is not None or not any(want)):
        if target is not None:
            target = target.index_select(0, groups.first)
        feat_grouped = feat is not None and feat_by_prev and groups.prev_shared
        if feat_grouped:  # autograd: the group's gradient reaches its first row's feature
            feat = feat.index_select(0, groups.first)
    else:
        groups, feat_grouped = None, False
    opts = (vocab_start, group, chunk_rows, need_l1, want, combine, groups, feat_grouped)
    if not any(want):
        ce, l1, *_ = _fused_chunks(h.detach(), None if feat is None else feat.detach(),
                                   None if w2 is None else w2.detach(), lm_head.detach(), labels,
                                   weights, target, vocab_start, group, chunk_rows, need_l1,
                                   False, False, False, groups=groups, feat_grouped=feat_grouped)
        ce_sum, l1_sum = (weights * ce).sum(), (weights * l1).sum()
        if combine is None:
            return ce_sum, l1_sum, ce, l1
        return combine[0] * ce_sum + combine[1] * l1_sum, ce_sum, l1_sum, ce, l1
    out = _FusedCEL1Sums.apply(h, feat, w2, lm_head.detach(), labels, weights, target, opts)
    return out[1:] if combine is None else out


@dataclass
class RowGroups:
    """Supervised rows that share a target position, made on the host with the blocks.

    Blocks overlap: at S = 512 with 64 anchors of 7 slots about a third of the supervised
    rows predict from the same (sample, position) as a row of another block. Their target
    distribution is the same, and so is their previous token (the vanilla Markov feature
    ``W1[prev]``). With the rows sorted by that key (``group_rows``), the fused loss forms
    the target's logits and softmax once per group, and for a Markov feature shared by the
    group forms its bias ``f·W2ᵀ`` once and its two gradient products on the group's
    summed ``dZ``. Only the draft's own logits stay per row.

    ``index`` [R]: the group of each row (non-decreasing); ``first`` [U]: the row of each
    group's first member; ``host_index``: ``index`` as host ints (chunk bounds without
    reading the device); ``prev_shared``: every row of a group has the same previous token."""

    index: torch.Tensor
    first: torch.Tensor
    host_index: tuple
    prev_shared: bool

    @property
    def count(self) -> int:
        return self.first.shape[0]

    def span(self, start: int, stop: int) -> tuple:
        """(first group, one past the last group) of rows ``start … stop−1``."""
        return self.host_index[start], self.host_index[stop - 1] + 1

    def to(self, device, non_blocking: bool = False) -> "RowGroups":
        return RowGroups(self.index.to(device, non_blocking=non_blocking),
                         self.first.to(device, non_blocking=non_blocking), self.host_index, self.prev_shared)


def group_rows(rows: torch.Tensor, keys: torch.Tensor, prev: Optional[torch.Tensor] = None):
    """Host-side: reorder the supervised ``rows`` (flat slot indices) so that rows with the
    same ``keys`` (flat [slots], e.g. sample·S + aligned position) are adjacent. Returns
    (sorted rows, :class:`RowGroups`); ``prev`` (flat [slots]) decides ``prev_shared``.
    Sums over rows do not depend on their order, and per-row outputs follow ``rows``."""
    k = keys.reshape(-1)[rows]
    order = torch.argsort(k, stable=True)
    rows, k = rows[order], k[order]
    new = torch.ones_like(k, dtype=torch.bool)
    new[1:] = k[1:] != k[:-1]
    index = torch.cumsum(new.long(), 0) - 1
    first = new.nonzero().squeeze(1)
    shared = True
    if prev is not None and rows.numel():
        p = prev.reshape(-1)[rows]
        shared = bool((p == p[first][index]).all())
    return rows, RowGroups(index, first, tuple(index.tolist()), shared)
