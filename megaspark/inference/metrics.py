"""Speculative-decoding metrics (DSPARK_SPEC.md §7 "Reported metrics").

* acceptance length τ = mean over verification rounds of (accepted drafts + 1);
* per-position acceptance at slot k = #rounds with ≥ k+1 accepted / #rounds that
  proposed ≥ k+1;
* verify rate = Σ (accepted + 1) / Σ (proposed + 1) (emitted tokens per verified token);
* confidence calibration: per proposed slot k of a round, the cumulative product
  ``Π_{i≤k} c_i`` against the indicator "the first k+1 drafts were all accepted";
  ECE over 20 equal-width bins, Brier score and AUROC. Only meaningful when every round
  proposes the full block (threshold 0); slots after an accepted stop token are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RoundRecord:
    proposed: int  # ℓ
    accepted: int  # drafts accepted (≤ ℓ)
    confidences: Optional[list] = None  # c_k of the proposed slots (None: no head)
    calibration_slots: int = 0  # how many leading slots count for calibration


@dataclass
class SpecStats:
    """Accumulates rounds of one or many generations."""

    max_drafts: int
    rounds: list = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def merge(self, other: "SpecStats") -> None:
        self.rounds.extend(other.rounds)
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds

    # ------------------------------------------------------------------ acceptance
    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    def acceptance_length(self) -> float:
        if not self.rounds:
            return float("nan")
        return sum(r.accepted + 1 for r in self.rounds) / len(self.rounds)

    def per_position_acceptance(self) -> list:
        """[(rate or None, #rounds that proposed ≥ k+1)] for k = 0 … max_drafts−1."""
        out = []
        for k in range(self.max_drafts):
            proposed = sum(1 for r in self.rounds if r.proposed >= k + 1)
            accepted = sum(1 for r in self.rounds if r.accepted >= k + 1)
            out.append((accepted / proposed if proposed else None, proposed))
        return out

    def verify_rate(self) -> float:
        width = sum(r.proposed + 1 for r in self.rounds)
        return sum(r.accepted + 1 for r in self.rounds) / width if width else float("nan")

    def mean_proposed(self) -> float:
        return sum(r.proposed for r in self.rounds) / len(self.rounds) if self.rounds else float("nan")

    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    # ------------------------------------------------------------------ calibration
    def calibration_pairs(self):
        """(predicted Π c, label) tensors over all calibration slots of all rounds."""
        preds, labels = [], []
        for r in self.rounds:
            if not r.confidences:
                continue
            acc = 1.0
            for k in range(r.calibration_slots):
                acc *= float(r.confidences[k])
                preds.append(acc)
                labels.append(1.0 if r.accepted >= k + 1 else 0.0)
        return (torch.tensor(preds, dtype=torch.float64), torch.tensor(labels, dtype=torch.float64))

    def calibration(self, bins: int = 20) -> Optional[dict]:
        pred, label = self.calibration_pairs()
        if pred.numel() == 0:
            return None
        return {
            "ece": expected_calibration_error(pred, label, bins),
            "brier": float(((pred - label) ** 2).mean()),
            "auroc": auroc(pred, label),
            "mean_predicted": float(pred.mean()),
            "mean_observed": float(label.mean()),
            "num_pairs": int(pred.numel()),
        }

    def summary(self) -> dict:
        return {
            "rounds": self.num_rounds,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second(),
            "acceptance_length": self.acceptance_length(),
            "mean_proposed": self.mean_proposed(),
            "verify_rate": self.verify_rate(),
            "per_position_acceptance": [
                {"position": k, "rate": rate, "rounds": n}
                for k, (rate, n) in enumerate(self.per_position_acceptance())
            ],
            "calibration": self.calibration(),
        }


def expected_calibration_error(pred: torch.Tensor, label: torch.Tensor, bins: int = 20) -> float:
    """Σ_b (n_b/N)·|mean pred_b − mean label_b| over ``bins`` equal-width bins of [0, 1]
    (a prediction of exactly 1 falls in the last bin)."""
    pred, label = pred.double().flatten(), label.double().flatten()
    if pred.numel() == 0:
        return float("nan")
    idx = (pred * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            total += n * abs(float(pred[sel].mean()) - float(label[sel].mean()))
    return total / pred.numel()


def auroc(pred: torch.Tensor, label: torch.Tensor) -> Optional[float]:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties); None if
    only one class is present."""
    pred, label = pred.double().flatten(), label.bool().flatten()
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    sorted_pred, order = torch.sort(pred)
    _, inverse, counts = torch.unique_consecutive(sorted_pred, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average_rank = (ends - counts + 1 + ends) / 2  # 1-based ranks, averaged over ties
    ranks = torch.empty_like(pred)
    ranks[order] = average_rank[inverse]
    u = float(ranks[label].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


__all__ = ["RoundRecord", "SpecStats", "expected_calibration_error", "auroc"]
