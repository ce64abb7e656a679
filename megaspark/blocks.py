"""Training-time block construction for DSpark / DFlash drafts (spec §3, §3.7, §6.1, §10).

Everything here is a pure, batch-first torch function: no model code, no distributed code.
The pipeline for one micro-batch is

    anchors, keep = sample_anchors(loss_mask, N, generator)            # §3.1
    blocks = build_blocks(input_ids, loss_mask, anchors, keep,
                          block_size=B, mask_token_id=M)               # §3.2-§3.6, §6.1
    mask = dense_attention_mask(anchors, keep, S, B)                   # §3.4 (dense / SDPA form)
    ctx = context_lengths(anchors, keep)                               # §3.4 (structured form)

Shapes: ``Bt`` sequences of length ``S``, ``N`` anchor slots (fixed width, dummy slots have
``keep == False``), block size ``B``.  Slot ``k`` of block ``j`` lives at flat draft row
``j * B + k``.

Two slot conventions exist (§0):

* ``"S"`` (DeepSpec DSpark, default): slot k predicts ``x[a + 1 + k]``; every slot is supervised.
* ``"D"`` (original DFlash, §3.7): slot k predicts ``x[a + k]``; slot 0 (the anchor itself) is
  never supervised.  Optional per-block ``prefix_lengths`` give the VP-drafter mode of §10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "CONVENTIONS",
    "Blocks",
    "anchor_candidates",
    "sample_anchors",
    "decay_weights",
    "build_blocks",
    "prefix_length_pmf",
    "sample_prefix_lengths",
    "dense_attention_mask",
    "align_to_blocks",
    "context_lengths",
]

CONVENTIONS = ("S", "D")


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown slot convention {convention!r}; expected one of {CONVENTIONS}")


def _check_block_size(block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def _check_loss_mask(loss_mask: Tensor) -> None:
    if not isinstance(loss_mask, Tensor) or loss_mask.dim() != 2:
        shape = tuple(loss_mask.shape) if isinstance(loss_mask, Tensor) else type(loss_mask)
        raise ValueError(f"loss_mask must be a 2-D tensor [Bt, S], got {shape}")


def _check_integer(name: str, t: Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def _check_anchor_pair(anchors: Tensor, keep: Tensor) -> None:
    if not isinstance(anchors, Tensor) or not isinstance(keep, Tensor):
        raise ValueError("anchors and keep must be tensors")
    if anchors.dim() != 2:
        raise ValueError(f"anchors must be 2-D [Bt, N], got shape {tuple(anchors.shape)}")
    _check_integer("anchors", anchors)
    if keep.shape != anchors.shape:
        raise ValueError(
            f"keep shape {tuple(keep.shape)} does not match anchors shape {tuple(anchors.shape)}"
        )
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor, got dtype {keep.dtype}")


# --------------------------------------------------------------------------------------------
# §3.1 anchor sampling
# --------------------------------------------------------------------------------------------

def anchor_candidates(loss_mask: Tensor) -> Tensor:
    """Anchor candidate set A of §3.1 as a Bool [Bt, S] mask.

    ``True`` at ``i in [0, S-2]`` iff ``loss_mask[i] == loss_mask[i+1] == 1`` (the anchor token is
    supervised and so is the first label).  Non-zero loss-mask entries count as 1.
    """
    _check_loss_mask(loss_mask)
    sup = loss_mask != 0
    cand = torch.zeros_like(sup)
    if sup.shape[1] >= 2:
        cand[:, :-1] = sup[:, :-1] & sup[:, 1:]
    return cand


def _pad_anchor_slots(pos: Tensor, sentinel: int, num_anchors: int) -> tuple[Tensor, Tensor]:
    """Sort anchor positions ascending (``sentinel`` = "none"), move dummies to the end, pad to N.

    Returns (anchors Long [Bt, N], keep Bool [Bt, N]); dummy slots hold position 0 (§3.1 step 3).
    """
    pos = pos.sort(dim=1).values
    keep = pos < sentinel
    anchors = torch.where(keep, pos, torch.zeros_like(pos))
    pad = num_anchors - pos.shape[1]
    if pad > 0:
        anchors = torch.nn.functional.pad(anchors, (0, pad), value=0)
        keep = torch.nn.functional.pad(keep, (0, pad), value=False)
    return anchors, keep


def sample_anchors(
    loss_mask: Tensor,
    num_anchors: int,
    generator: torch.Generator | None = None,
    anchors: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fixed-width anchor slots of §3.1: returns (anchors Long [Bt, N], keep Bool [Bt, N]).

    Per sequence, ``n_b = min(|A_b|, N)`` candidates are drawn uniformly without replacement
    (i.i.d. U(0,1) keys on candidates, +inf elsewhere, the N smallest are taken), sorted ascending
    into slots ``0 .. n_b-1``; the remaining slots are dummies (position 0, keep False).
    Pass ``generator`` for reproducible draws.

    If ``anchors`` (integer [Bt, n], n <= N, negative = "no anchor") is given, no sampling happens:
    every non-negative entry must be a candidate and entries must be unique per sequence
    (ValueError otherwise); they are sorted and padded to width N.
    """
    _check_loss_mask(loss_mask)
    if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
        raise ValueError(f"num_anchors must be an int >= 1, got {num_anchors!r}")
    cand = anchor_candidates(loss_mask)
    bt, seq_len = cand.shape
    device = loss_mask.device

    if anchors is not None:
        return _validate_given_anchors(anchors, cand, num_anchors)

    gen_device = generator.device if generator is not None else device
    keys = torch.rand(bt, seq_len, generator=generator, device=gen_device).to(device)
    keys = keys.masked_fill(~cand, math.inf)
    m = min(num_anchors, seq_len)
    idx = torch.topk(keys, m, dim=1, largest=False).indices  # the m smallest keys
    chosen = cand.gather(1, idx)  # False where the draw ran into non-candidates (|A_b| < m)
    pos = torch.where(chosen, idx, torch.full_like(idx, seq_len))
    return _pad_anchor_slots(pos, seq_len, num_anchors)


def _validate_given_anchors(given: Tensor, cand: Tensor, num_anchors: int) -> tuple[Tensor, Tensor]:
    """Check caller-supplied anchors against the candidate mask, then sort and pad (§3.1)."""
    bt, seq_len = cand.shape
    if given.dim() != 2 or given.shape[0] != bt:
        raise ValueError(
            f"caller-supplied anchors must be [Bt={bt}, n], got shape {tuple(given.shape)}"
        )
    _check_integer("anchors", given)
    if given.shape[1] > num_anchors:
        raise ValueError(
            f"caller-supplied anchors have width {given.shape[1]} > num_anchors={num_anchors}"
        )
    given = given.to(device=cand.device, dtype=torch.long)
    present = given >= 0
    ok = present & (given < seq_len)
    if seq_len > 0:
        ok = ok & cand.gather(1, given.clamp(0, seq_len - 1))
    bad = present & ~ok
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"caller-supplied anchor {int(given[b, j])} of sample {b} (column {j}) is not an "
            f"anchor candidate: need 0 <= a <= S-2 = {seq_len - 2} and "
            f"loss_mask[a] = loss_mask[a+1] = 1"
        )
    pos = torch.where(present, given, torch.full_like(given, seq_len)).sort(dim=1).values
    dup = (pos[:, 1:] == pos[:, :-1]) & (pos[:, 1:] < seq_len)
    if bool(dup.any()):
        b, j = (int(v) for v in dup.nonzero()[0])
        raise ValueError(f"caller-supplied anchor {int(pos[b, j])} of sample {b} appears twice")
    return _pad_anchor_slots(pos, seq_len, num_anchors)


# --------------------------------------------------------------------------------------------
# §6.1 / §3.7 / §10 position weights
# --------------------------------------------------------------------------------------------

def decay_weights(
    block_size: int, gamma: float | None, convention: str = "S", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Per-slot loss decay ``w_k`` [B] (§6.1, §3.7).

    ``"S"``: ``exp(-k/gamma)``; ``"D"``: ``exp(-max(k-1, 0)/gamma)`` (first predicted slot k=1 has
    weight 1).  ``gamma`` None or <= 0 gives all ones.
    """
    _check_block_size(block_size)
    _check_convention(convention)
    k = torch.arange(block_size, dtype=torch.float64)
    if convention == "D":
        k = (k - 1).clamp(min=0)
    if gamma is None or gamma <= 0:
        return torch.ones(block_size, dtype=dtype)
    return torch.exp(-k / float(gamma)).to(dtype)


# --------------------------------------------------------------------------------------------
# §10 VP-drafter prefix lengths
# --------------------------------------------------------------------------------------------

def _prefix_support(block_size: int) -> tuple[int, int]:
    _check_block_size(block_size)
    if block_size < 2:
        raise ValueError("VP-drafter prefixes need block_size >= 2 (at least one predicted slot)")
    lo = min(2, block_size - 1)
    return lo, max(lo, block_size - 1)


def prefix_length_pmf(block_size: int, prefix_weight_base: float = 0.9) -> Tensor:
    """Exact pmf of the VP-drafter prefix length (§10.2), float64 [B].

    ``P(pi = i) ∝ beta**i`` for ``i in [min(2, B-1), B-1]``, zero elsewhere.
    """
    lo, hi = _prefix_support(block_size)
    if not prefix_weight_base > 0:
        raise ValueError(f"prefix_weight_base must be > 0, got {prefix_weight_base!r}")
    pmf = torch.zeros(block_size, dtype=torch.float64)
    i = torch.arange(lo, hi + 1, dtype=torch.float64)
    # beta**i / sum beta**i, computed relative to beta**lo to stay finite for any beta.
    w = torch.tensor(float(prefix_weight_base), dtype=torch.float64) ** (i - lo)
    pmf[lo : hi + 1] = w / w.sum()
    return pmf


def sample_prefix_lengths(
    num_blocks_shape: int | Sequence[int] | torch.Size,
    block_size: int,
    prefix_weight_base: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw i.i.d. VP-drafter prefix lengths pi (Long, shape ``num_blocks_shape``) per §10.2.

    ``pi in [min(2, B-1), B-1]`` with ``P(pi = i) ∝ prefix_weight_base**i``.  Sampling happens on
    the generator's device (CPU by default) and the result is moved to ``device``.
    """
    if isinstance(num_blocks_shape, int):
        num_blocks_shape = (num_blocks_shape,)
    shape = tuple(int(s) for s in num_blocks_shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"num_blocks_shape must be non-negative, got {shape}")
    pmf = prefix_length_pmf(block_size, prefix_weight_base)
    numel = math.prod(shape)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if numel == 0:
        out = torch.empty(shape, dtype=torch.long)
    else:
        out = torch.multinomial(
            pmf.to(gen_device), numel, replacement=True, generator=generator
        ).reshape(shape)
    return out.to(device if device is not None else gen_device)


# --------------------------------------------------------------------------------------------
# §3.2 – §3.7, §10 block tensors
# --------------------------------------------------------------------------------------------

@dataclass
class Blocks:
    """All per-slot training tensors of one micro-batch (batch-first; N anchors, B block size).

    ``noise_ids`` / ``position_ids`` feed the draft backbone; ``labels``/``prev_ids``/
    ``aligned_index`` feed the heads and losses; ``weights`` is the ω of §6.1 whose sum is the
    loss denominator D of §6.3.
    """

    anchors: Tensor  # Long [Bt,N]   anchor positions (0 for dummy slots)
    keep: Tensor  # Bool [Bt,N]   real block (True) or dummy slot (False)
    noise_ids: Tensor  # Long [Bt,N*B] draft input ids (§3.2, §10.3)
    position_ids: Tensor  # Long [Bt,S+N*B] context 0..S-1 then a_j + k (§3.3)
    label_index: Tensor  # Long [Bt,N,B] safe label index λ̂ (clamped to S-1; 0 for dummies)
    labels: Tensor  # Long [Bt,N,B] y = x[λ̂]
    prev_ids: Tensor  # Long [Bt,N,B] slot0 = x_a, slot k>=1 = labels[k-1] (teacher forcing)
    aligned_index: Tensor  # Long [Bt,N,B] target last-hidden index max(λ̂-1, 0) (§3.6)
    valid: Tensor  # Bool [Bt,N,B] raw validity v (§3.5 / §3.7 / §10.4)
    eval_mask: Tensor  # Bool [Bt,N,B] prefix-truncated validity (or = valid)
    weights: Tensor  # float32 [Bt,N,B] ω = eval_mask * decay
    block_size: int
    convention: str
    prefix_lengths: Tensor | None = None  # Long [Bt,N] VP-drafter π (§10), convention D only

    def to(self, device) -> "Blocks":
        """A copy with every tensor on ``device`` (blocks are built on the host, like a data
        loader's output, and moved to the compute device once)."""
        import dataclasses

        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Blocks(**moved)

    @property
    def batch_size(self) -> int:
        return self.anchors.shape[0]

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[1]

    @property
    def seq_len(self) -> int:
        return self.position_ids.shape[1] - self.num_anchors * self.block_size


def build_blocks(
    input_ids: Tensor,
    loss_mask: Tensor,
    anchors: Tensor,
    keep: Tensor,
    *,
    block_size: int,
    mask_token_id: int,
    gamma: float | None = 4.0,
    convention: str = "S",
    truncate_eval_mask: bool = True,
    prefix_lengths: Tensor | None = None,
) -> Blocks:
    """Build every block tensor of §3.2–§3.7 (and §10 when ``prefix_lengths`` is given).

    For block j (anchor a = a_j) and slot k:

    * label index λ = a+1+k (``"S"``) or a+k (``"D"``); λ̂ = min(λ, S-1), 0 for dummy blocks;
    * validity v = keep ∧ (λ < S) ∧ loss_mask[λ̂], and also k > 0 for ``"D"`` (k >= π in VP
      mode);
    * eval mask = cumprod of v along the block when ``truncate_eval_mask`` (``"D"``: over slots
      1..B-1 only, slot 0 stays False), else v.  VP mode never truncates (§10.4);
    * ω = eval_mask · decay, decay from :func:`decay_weights` (VP mode: exp(-max(k-π, 0)/γ));
    * input ids: slot 0 = x_a for kept blocks, other slots the mask token; VP mode shows the real
      token x_{a+k} in every slot k < π with a+k < S (§10.3).

    Kept anchors must lie in [0, S-1]; anchor values of dummy slots are ignored (treated as 0).
    Loss-mask entries count as supervised when non-zero.
    """
    # ---- validation -----------------------------------------------------------------------
    _check_block_size(block_size)
    _check_convention(convention)
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be an int >= 0, got {mask_token_id!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [Bt, S]")
    _check_integer("input_ids", input_ids)
    _check_loss_mask(loss_mask)
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    bt, seq_len = input_ids.shape
    if seq_len < 1:
        raise ValueError("sequences must have at least one token (S >= 1)")
    _check_anchor_pair(anchors, keep)
    if anchors.shape[0] != bt:
        raise ValueError(f"anchors batch size {anchors.shape[0]} != input_ids batch size {bt}")
    device = input_ids.device
    anchors = anchors.to(device=device, dtype=torch.long)
    keep = keep.to(device)
    bad = keep & ((anchors < 0) | (anchors >= seq_len))
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"kept anchor {int(anchors[b, j])} of sample {b} (slot {j}) is outside "
            f"[0, S-1={seq_len - 1}]"
        )
    num_anchors = anchors.shape[1]
    if prefix_lengths is not None:
        if convention != "D":
            raise ValueError("prefix_lengths (VP-drafter mode, §10) requires convention 'D'")
        if prefix_lengths.shape != anchors.shape:
            raise ValueError(
                f"prefix_lengths shape {tuple(prefix_lengths.shape)} != anchors shape "
                f"{tuple(anchors.shape)}"
            )
        _check_integer("prefix_lengths", prefix_lengths)
        prefix_lengths = prefix_lengths.to(device=device, dtype=torch.long)
        if bool(((prefix_lengths < 1) | (prefix_lengths > block_size - 1)).any()):
            raise ValueError(f"prefix_lengths must lie in [1, B-1 = {block_size - 1}]")

    # ---- slot geometry (§3.3) ---------------------------------------------------------------
    x = input_ids.long()
    sup = loss_mask.to(device) != 0
    a = torch.where(keep, anchors, torch.zeros_like(anchors))  # dummies sit at 0
    k = torch.arange(block_size, device=device)  # [B]
    slot_pos = a[:, :, None] + k  # [Bt,N,B] absolute position a_j + k
    kept = keep[:, :, None]  # [Bt,N,1]

    context_pos = torch.arange(seq_len, device=device).expand(bt, seq_len)
    position_ids = torch.cat([context_pos, slot_pos.reshape(bt, -1)], dim=1)

    def take(t: Tensor, index: Tensor) -> Tensor:  # t [Bt,S], index [Bt,N,B] -> [Bt,N,B]
        return t.gather(1, index.reshape(bt, -1)).reshape(index.shape)

    # ---- draft inputs (§3.2, §10.3) ---------------------------------------------------------
    visible = 1 if prefix_lengths is None else prefix_lengths[:, :, None]  # slots showing x_{a+k}
    show = kept & (k < visible) & (slot_pos < seq_len)
    real = take(x, slot_pos.clamp(max=seq_len - 1))
    noise_ids = torch.where(show, real, torch.full_like(real, mask_token_id)).reshape(bt, -1)

    # ---- labels, previous tokens, aligned indices (§3.5, §3.6, §3.7) -----------------------
    lam = slot_pos + 1 if convention == "S" else slot_pos
    in_range = lam < seq_len
    label_index = torch.where(kept, lam.clamp(max=seq_len - 1), torch.zeros_like(lam))
    labels = take(x, label_index)
    anchor_tok = x.gather(1, a)[:, :, None]  # [Bt,N,1]
    prev_ids = torch.cat([anchor_tok, labels[:, :, :-1]], dim=2)
    aligned_index = (label_index - 1).clamp(min=0)

    # ---- validity, eval mask, weights (§3.5, §3.7, §6.1, §10.4-5) ---------------------------
    valid = kept & in_range & take(sup, label_index)
    if prefix_lengths is not None:
        valid = valid & (k >= prefix_lengths[:, :, None])
        eval_mask = valid  # §10.4: no prefix truncation in VP-drafter mode
        shift = (k - prefix_lengths[:, :, None]).clamp(min=0).double()
        if gamma is None or gamma <= 0:
            decay = torch.ones_like(shift)
        else:
            decay = torch.exp(-shift / float(gamma))
        decay = decay.float()
    else:
        if convention == "D":
            valid = valid & (k > 0)
        if truncate_eval_mask:
            passing = valid.clone()
            if convention == "D":
                passing[..., 0] = True  # slot 0 is outside the product ...
            eval_mask = passing.long().cumprod(dim=2).bool()
            if convention == "D":
                eval_mask = eval_mask & (k > 0)  # ... but is itself never supervised
        else:
            eval_mask = valid
        decay = decay_weights(block_size, gamma, convention).to(device)
    weights = eval_mask.float() * decay

    return Blocks(
        anchors=a,
        keep=keep,
        noise_ids=noise_ids,
        position_ids=position_ids,
        label_index=label_index,
        labels=labels,
        prev_ids=prev_ids,
        aligned_index=aligned_index,
        valid=valid,
        eval_mask=eval_mask,
        weights=weights,
        block_size=block_size,
        convention=convention,
        prefix_lengths=prefix_lengths,
    )


# --------------------------------------------------------------------------------------------
# §3.4 attention mask
# --------------------------------------------------------------------------------------------

def align_to_blocks(last_hidden: torch.Tensor, aligned_index: torch.Tensor) -> torch.Tensor:
    """The target's last hidden state [b, S, H] at the aligned index of every slot (§3.6)
    → [b, N, B, H]."""
    b, N, B = aligned_index.shape
    idx = aligned_index.reshape(b, N * B, 1).expand(-1, -1, last_hidden.shape[-1])
    return last_hidden.gather(1, idx).reshape(b, N, B, -1)


def context_lengths(anchors: Tensor, keep: Tensor) -> Tensor:
    """Visible context keys per block, Long [Bt, N]: ``a_j`` if kept else 0 (§3.4).

    Block j sees context keys ``0 .. a_j-1`` plus its own B slots; this is the structured form of
    :func:`dense_attention_mask`.
    """
    _check_anchor_pair(anchors, keep)
    anchors = anchors.long()
    return torch.where(keep.to(anchors.device), anchors, torch.zeros_like(anchors))


def dense_attention_mask(anchors: Tensor, keep: Tensor, seq_len: int, block_size: int) -> Tensor:
    """Dense training mask of §3.4, Bool [Bt, N*B, S+N*B], ``True`` = attention allowed.

    Query row ``j*B + k`` may see context key κ < S iff κ < a_j, and block key ``S + j'*B + k'``
    iff j' = j (bidirectional within the block); rows of dummy blocks see nothing.  Kept rows
    therefore allow exactly ``a_j + B`` keys.
    """
    _check_anchor_pair(anchors, keep)
    _check_block_size(block_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
    bt, n = anchors.shape
    device = anchors.device
    keep = keep.to(device)
    bad = keep & ((anchors < 0) | (anchors >= max(seq_len, 1)))
    if bool(bad.any()):
        raise ValueError(f"kept anchors must lie in [0, S-1 = {seq_len - 1}]")
    nb = n * block_size
    mask = torch.zeros(bt, nb, seq_len + nb, dtype=torch.bool, device=device)

    # context part: [Bt, N, B, S] view of the first S key columns
    ctx_len = context_lengths(anchors, keep)
    ctx = torch.arange(seq_len, device=device) < ctx_len[:, :, None]  # [Bt,N,S]
    mask[:, :, :seq_len].unflatten(1, (n, block_size)).copy_(
        ctx[:, :, None, :].expand(bt, n, block_size, seq_len)
    )
    # block part: diagonal (j == j') of the [Bt, N, B, N, B] view of the last N*B key columns
    blk = mask[:, :, seq_len:].unflatten(1, (n, block_size)).unflatten(3, (n, block_size))
    diag = torch.diagonal(blk, dim1=1, dim2=3)  # [Bt, B, B, N] view
    diag.copy_(keep[:, None, None, :].expand_as(diag))
    return mask
