"""The DSpark loss of a micro-batch and its metrics (DSPARK_SPEC.md §5.2, §6; DESIGN.md
decision 4): CE, L1 (= 2·TV) and the confidence BCE as sums weighted by ω with the local
denominator Σω (the caller divides by the global one, DESIGN.md decision 3), acceptance and
calibration metrics, and their reduction over micro-batches and ranks. The vocabulary-sized
terms come from :mod:`megaspark.vocab_parallel_loss`, which never gathers the full
vocabulary; c* = clamp(1 − ½·L1, 0, 1), detached, is the confidence target and the
analytic acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from megaspark.vocab_parallel_loss import RowGroups, group_size, resolve_need_l1, vocab_parallel_ce_l1_sums

LOSS_EPS = 1e-6


# ----------------------------------------------------------------------------- results
@dataclass
class LossSums:
    """Weighted loss sums of one micro-batch (divide by the *global* Σω) and metric sums."""

    ce_sum: torch.Tensor
    l1_sum: torch.Tensor
    conf_sum: torch.Tensor
    denominator: torch.Tensor  # local Σω (no grad)
    metrics: dict = field(default_factory=dict)  # name -> (num, den) tensors, no grad
    # With the α-combined fused loss: α_ce·ce_sum + α_l1·l1_sum, the only differentiable
    # vocabulary term (ce_sum and l1_sum are then values only), and the (α_ce, α_l1) used.
    objective: Optional[torch.Tensor] = None
    alphas: Optional[tuple] = None

    def loss(self, alpha_ce: float, alpha_l1: float, alpha_conf: float, denominator=None):
        """α-combination of the three terms over ``denominator`` (default: the local Σω)."""
        d = self.denominator if denominator is None else denominator
        if self.objective is not None:
            if (float(alpha_ce), float(alpha_l1)) != self.alphas:
                raise ValueError(f"these loss sums were fused with (α_ce, α_l1) = {self.alphas}, "
                                 f"not ({alpha_ce}, {alpha_l1})")
            return (self.objective + alpha_conf * self.conf_sum) / (d + LOSS_EPS)
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
    need_l1: Optional[bool] = None,
    alphas: Optional[tuple] = None,
    groups: Optional[RowGroups] = None,
    feat_by_prev: bool = False,
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

    ``need_l1``: compute L1 and c* (default: whenever ``target_hidden`` is given). A
    training step whose objective does not use them (α_l1 = 0 and no confidence head, the
    DFlash case) passes False: the target logits are then never formed, and the L1 and
    acceptance metrics (which come from c*) are absent. The CE and L1 sums come from the
    fused :func:`vocab_parallel_ce_l1_sums`.

    ``alphas = (α_ce, α_l1)``: combine the CE and L1 gradients in the forward (one set of
    gradient GEMMs instead of two); :meth:`LossSums.loss` must then be called with them.

    ``groups``: ``rows`` sorted by target position with their :class:`RowGroups`
    (:func:`group_rows`, on the host): the target's logits once per group, and with
    ``feat_by_prev`` (vanilla Markov head) the Markov bias and its gradients too.
    """
    b, N, B = labels.shape
    eval_mask = eval_mask.bool()
    have_target = resolve_need_l1(need_l1, target_hidden)
    if confidence_logits is not None and target_hidden is not None and not have_target:
        raise ValueError("the confidence loss needs L1 (its target c*): need_l1 must not be False")
    if rows is None:
        flat = lambda t: None if t is None else t.reshape(b * N * B, *t.shape[3:])  # noqa: E731
    else:
        flat = lambda t: None if t is None else t.reshape(b * N * B, *t.shape[3:])[rows]  # noqa: E731
    w_r = flat(weights).float()
    fused = vocab_parallel_ce_l1_sums(
        flat(h), flat(labels), w_r, lm_head, feat=flat(feat), w2=w2,
        target_hidden=flat(target_hidden) if have_target else None, vocab_start=vocab_start,
        group=group, chunk_rows=chunk_rows, need_l1=have_target, combine=alphas,
        groups=groups if rows is not None else None, feat_by_prev=feat_by_prev,
    )
    objective = None
    if alphas is not None:
        objective, *fused = fused
        alphas = (float(alphas[0]), float(alphas[1]))
    ce_sum, l1_sum, ce_r, l1_r = fused
    zero = w_r.sum() * 0.0
    if not have_target:
        l1_sum = zero
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
                    metrics=metrics, objective=objective, alphas=alphas)


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
    if group is not None and group_size(group) > 1:
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
