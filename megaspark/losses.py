"""Vocab-parallel DSpark losses and metrics (DSPARK_SPEC.md §5.2, §6; DESIGN.md decision 4).

The vocabulary is sharded over the tensor-parallel group: each rank holds ``V/tp`` rows of
the frozen LM head and of ``W2``, so it only ever forms its shard of the corrected logits
``Z = h·W_lmᵀ + f·W2ᵀ``. From the shards:

* CE  = logsumexp(Z) − Z[y], with the max all-reduced (MAX) and Σexp and Z[y] all-reduced
  (SUM) — Megatron's vocab-parallel cross-entropy;
* L1  = Σ_v |p_d − p_t| = 2·TV, a per-shard sum followed by one all-reduce; ``p_t`` is the
  target's softmax computed the same way from its post-norm last hidden state;
* c*  = clamp(1 − ½·L1, 0, 1), detached, the confidence target and the analytic acceptance.

Rows are processed in chunks under activation checkpointing, so peak memory is
``O(chunk · V/tp)`` instead of ``O(N·B · V)``, and rows outside the eval mask are skipped
when their indices come from the host (no shape here depends on device data).
The results equal the unchunked single-device formula.

Every term is returned as a *sum* weighted by ω together with the local denominator
Σω; the caller divides by the global denominator (DESIGN.md decision 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_EPS = 1e-6


# ----------------------------------------------------------------------------- collectives
def _copy_to_tp(x, group):
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=group) if _size(group) > 1 else x


def _reduce_from_tp(x, group):
    """Forward all-reduce (SUM), backward identity: every TP rank holds the same loss."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group) if _size(group) > 1 else x


def _all_reduce_max_(x, group):
    if _size(group) > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX, group=group)
    return x


def _size(group) -> int:
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
):
    """Per-row CE and L1 for rows of draft hidden states.

    h [R, H], labels [R], lm_head [V/tp, H] (this rank's shard, starting at
    ``vocab_start``), feat [R, r] and w2 [V/tp, r] for the Markov bias, target_hidden
    [R, H] the target's post-norm last state at the aligned position (None: no L1).
    Returns (ce [R], l1 [R]) in fp32; l1 is zeros without ``target_hidden``.
    """
    need_l1 = target_hidden is not None
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


# ----------------------------------------------------------------------------- results
@dataclass
class LossSums:
    """Weighted loss sums of one micro-batch (divide by the *global* Σω) and metric sums."""

    ce_sum: torch.Tensor
    l1_sum: torch.Tensor
    conf_sum: torch.Tensor
    denominator: torch.Tensor  # local Σω (no grad)
    metrics: dict = field(default_factory=dict)  # name -> (num, den) tensors, no grad

    def loss(self, alpha_ce: float, alpha_l1: float, alpha_conf: float, denominator=None):
        """α-combination of the three terms over ``denominator`` (default: the local Σω)."""
        d = self.denominator if denominator is None else denominator
        total = alpha_ce * self.ce_sum + alpha_l1 * self.l1_sum + alpha_conf * self.conf_sum
        return total / (d + LOSS_EPS)


def acceptance_from_l1(l1: torch.Tensor) -> torch.Tensor:
    """c* = clamp(1 − ½·L1, 0, 1) = Σ_v min(p_d, p_t): acceptance probability at T=1."""
    return (1.0 - 0.5 * l1).clamp(0.0, 1.0)


def dspark_loss_sums(
    h: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    eval_mask: torch.Tensor,
    keep: torch.Tensor,
    lm_head: torch.Tensor,
    *,
    feat: Optional[torch.Tensor] = None,
    w2: Optional[torch.Tensor] = None,
    target_hidden: Optional[torch.Tensor] = None,
    confidence_logits: Optional[torch.Tensor] = None,
    vocab_start: int = 0,
    group=None,
    chunk_rows: int = 512,
    first_slot: int = 0,
    rows: Optional[torch.Tensor] = None,
) -> LossSums:
    """All DSpark loss terms and metrics for one micro-batch.

    Block-shaped inputs: h [b, N, B, H], labels/weights/eval_mask [b, N, B], keep [b, N],
    feat [b, N, B, r], target_hidden [b, N, B, H] (already gathered at the aligned
    indices), confidence_logits [b, N, B]. ``first_slot`` is 1 for Convention D (slot 0
    is the anchor and never scored).

    ``rows``: the flat indices of the supervised slots (eval mask), computed on the host
    when the blocks were built, so that only they cost vocabulary work. Without it every
    slot is scored and the unsupervised ones are weighted by 0. Either way no shape here
    depends on device data: nothing synchronises with the host.
    """
    b, N, B = labels.shape
    eval_mask = eval_mask.bool()
    if rows is None:
        flat = lambda t: None if t is None else t.reshape(b * N * B, *t.shape[3:])  # noqa: E731
    else:
        flat = lambda t: None if t is None else t.reshape(b * N * B, *t.shape[3:])[rows]  # noqa: E731
    ce_r, l1_r = vocab_parallel_ce_l1(
        flat(h), flat(labels), lm_head, feat=flat(feat), w2=w2, target_hidden=flat(target_hidden),
        vocab_start=vocab_start, group=group, chunk_rows=chunk_rows,
    )
    w_r = flat(weights).float()
    zero = w_r.sum() * 0.0
    ce_sum = (w_r * ce_r).sum()
    have_target = target_hidden is not None
    l1_sum = (w_r * l1_r).sum() if have_target else zero
    denominator = weights.float().sum().detach()

    metrics: dict = {}
    conf_sum = zero
    with torch.no_grad():
        metrics["ce_loss"] = (ce_sum.detach(), denominator)
        if have_target:
            metrics["l1_loss"] = (l1_sum.detach(), denominator)
    if have_target:
        c_star_r = acceptance_from_l1(l1_r.detach())
        if rows is None:
            c_star = c_star_r * eval_mask.reshape(-1)
        else:
            c_star = torch.zeros(b * N * B, dtype=torch.float32, device=h.device)
            c_star[rows] = c_star_r
        c_star = c_star.view(b, N, B)
        if confidence_logits is not None:
            logit_r = flat(confidence_logits).float()
            bce = F.binary_cross_entropy_with_logits(logit_r, c_star_r, reduction="none")
            conf_sum = (w_r * bce).sum()
        with torch.no_grad():
            _acceptance_metrics(metrics, c_star, eval_mask, keep, first_slot)
            if confidence_logits is not None:
                metrics["confidence_loss"] = (conf_sum.detach(), denominator)
                _confidence_metrics(
                    metrics, confidence_logits.float(), c_star, eval_mask, weights.float(),
                    denominator, first_slot,
                )
    return LossSums(ce_sum=ce_sum, l1_sum=l1_sum, conf_sum=conf_sum, denominator=denominator,
                    metrics=metrics)


def supervised_rows(eval_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the supervised slots of a [b, N, B] eval mask (host-side helper: call
    it where the mask is still on the CPU, e.g. when the blocks are built)."""
    return eval_mask.reshape(-1).nonzero().squeeze(1)


def _from_first_predicted_slot(e, c_star, first_slot):
    """Move each block's first supervised slot to ``first_slot`` (and the rest after it).

    Only VP-drafter blocks (§10) change: their first π slots show real tokens and are
    unsupervised, so acceptance counts from slot π. Anchor-only blocks always supervise
    ``first_slot`` (the sampler guarantees label a+1) and are returned unchanged."""
    B = e.shape[-1]
    supervised = e[..., first_slot:] > 0
    start = torch.where(supervised.any(-1), supervised.float().argmax(-1), 0)  # offset past first_slot
    # (always gathered: testing whether any block moved would read device data on the host)
    src = torch.arange(B, device=e.device) + start[..., None]
    inside = (src < B).to(e.dtype)
    src = src.clamp(max=B - 1)
    return e.gather(-1, src) * inside, c_star.gather(-1, src) * inside


def _acceptance_metrics(metrics, c_star, eval_mask, keep, first_slot):
    e, c_star = _from_first_predicted_slot(eval_mask.float(), c_star, first_slot)
    count = e.sum(dim=(0, 1))  # [B]
    accepted = (e * c_star).sum(dim=(0, 1))
    for k in range(first_slot, e.shape[-1]):
        metrics[f"accept_rate@{k}"] = (accepted[k], count[k])
        metrics[f"count@{k}"] = (count[k], torch.ones_like(count[k]))
    survive = torch.cumprod((e * c_star)[..., first_slot:], dim=-1)  # [b, N, B']
    valid_block = keep.bool() & (e[..., first_slot:] > 0).any(dim=-1)
    tau_blocks = 1.0 + survive.sum(dim=-1)
    metrics["tau"] = ((tau_blocks * valid_block).sum(), valid_block.float().sum())


def _confidence_metrics(metrics, logits, c_star, eval_mask, weights, denominator, first_slot):
    sig = torch.sigmoid(logits)
    diff = sig - c_star
    metrics["confidence_abs_error"] = ((weights * diff.abs()).sum(), denominator)
    metrics["confidence_bias"] = ((weights * diff).sum(), denominator)
    e = eval_mask.float()[..., first_slot:]
    cum_pred = torch.cumprod(sig[..., first_slot:] * e, dim=-1)
    cum_true = torch.cumprod(c_star[..., first_slot:] * e, dim=-1)
    metrics["confidence_cumprod_bias"] = (
        (weights[..., first_slot:] * (cum_pred - cum_true)).sum(),
        denominator,
    )


# ----------------------------------------------------------------------------- aggregation
def reduce_metrics(metric_sums: list, group=None, device=None) -> dict:
    """Sum (num, den) pairs over micro-batches and, with ``group``, over ranks; return
    the ratios Σnum/Σden (nan where Σden = 0). Every rank must pass the same keys.

    :func:`stack_metrics` (on the device, one all-reduce), then :func:`metrics_to_host`
    (the step's one read-back to the host, for logging)."""
    return metrics_to_host(*stack_metrics(metric_sums, group, device))


def stack_metrics(metric_sums: list, group=None, device=None):
    """(keys, Σ[num, den] as one float64 [len(keys), 2] tensor) on the metrics' device
    (``device``, else where the first metric lives, else the compute device), all-reduced
    over ``group``. No host synchronisation."""
    keys = sorted({k for m in metric_sums for k in m})
    if not keys:
        return keys, None
    if device is None:
        device = next((v.device for m in metric_sums for pair in m.values() for v in pair
                       if isinstance(v, torch.Tensor)), None)
    if device is None:
        from megaspark import platform

        device = platform.compute_device()

    def as_t(v):
        if isinstance(v, torch.Tensor):
            return v.detach().to(device=device, dtype=torch.float64).reshape(())
        return torch.tensor(float(v), dtype=torch.float64, device=device)

    zero = torch.zeros((), dtype=torch.float64, device=device)
    buf = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)
    for m in metric_sums:
        buf += torch.stack([torch.stack([as_t(m[k][0]), as_t(m[k][1])]) if k in m
                            else torch.stack([zero, zero]) for k in keys])
    if group is not None and _size(group) > 1:
        torch.distributed.all_reduce(buf, group=group)
    return keys, buf


def metrics_to_host(keys: list, buf) -> dict:
    """The ratios of :func:`stack_metrics`' sums as Python floats (one read-back)."""
    if not keys:
        return {}
    out = {}
    for k, (num, den) in zip(keys, buf.tolist()):
        out[k] = num if k.startswith("count@") else (num / den if den > 0 else float("nan"))
    return out
