"""Draft vocabularies for Eagle3 drafts: the ``N`` target tokens the draft's LM
head predicts, chosen by their frequency among the supervised tokens of a prepared
dataset, and the two mappings engines load with the draft.

* ``d2t`` [N] int64: the *offset* from a draft id to its target id (``target = draft +
  d2t[draft]``), the convention of EAGLE-3's checkpoints, SGLang and vLLM;
* ``t2d`` [V] bool: whether a target token is in the draft vocabulary.

Draft ids are assigned in increasing target-id order. The ``N`` most frequent supervised
tokens are taken (ties: the smaller id first); when the data has fewer than ``N`` distinct
tokens the smallest unused ids fill the rest, so every draft id maps to a target id.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import indexed
from .chat import DataError

#: Eagle3's default draft vocabulary size (SpecForge, EAGLE-3 releases)
DEFAULT_DRAFT_VOCAB_SIZE = 32000


@dataclass(frozen=True)
class DraftVocab:
    draft_to_target: torch.Tensor  # [N] int64, increasing target ids
    target_size: int

    @property
    def size(self) -> int:
        return int(self.draft_to_target.numel())

    @property
    def d2t(self) -> torch.Tensor:
        """[N] int64 offsets: ``target = draft + d2t[draft]``."""
        return self.draft_to_target - torch.arange(self.size, dtype=torch.int64)

    @property
    def t2d(self) -> torch.Tensor:
        """[V] bool: is the target token in the draft vocabulary?"""
        mask = torch.zeros(self.target_size, dtype=torch.bool)
        mask[self.draft_to_target] = True
        return mask

    @classmethod
    def from_d2t(cls, d2t: torch.Tensor, target_size: int) -> "DraftVocab":
        """The inverse of :attr:`d2t` (as read from an engine-format checkpoint)."""
        ids = d2t.to(torch.int64) + torch.arange(d2t.numel(), dtype=torch.int64)
        if ids.numel() and (bool((ids[1:] <= ids[:-1]).any()) or int(ids.min()) < 0
                            or int(ids.max()) >= target_size):
            raise ValueError(f"d2t does not map draft ids to increasing target ids in [0, {target_size})")
        return cls(ids, int(target_size))


def select_draft_vocab(counts: np.ndarray, size: int) -> DraftVocab:
    """The ``size`` most frequent tokens of ``counts`` ([V] occurrences per target id)."""
    counts = np.asarray(counts, dtype=np.int64)
    V = int(counts.shape[0])
    if not 0 < size <= V:
        raise ValueError(f"draft vocabulary size {size} must be in [1, {V}] (the target's vocabulary)")
    order = np.lexsort((np.arange(V), -counts))  # by count desc, then id asc
    seen = order[counts[order] > 0][:size]
    chosen = set(seen.tolist())
    if len(chosen) < size:  # fill with the smallest unused ids
        fill = [i for i in range(V) if i not in chosen][: size - len(chosen)]
        chosen.update(fill)
    ids = torch.tensor(sorted(chosen), dtype=torch.int64)
    return DraftVocab(ids, V)


def supervised_token_counts(data_dir, vocab_size: int, split: str = "train",
                            chunk: int = 1 << 24) -> np.ndarray:
    """[vocab_size] occurrences of every token at supervised positions (loss mask 1) of a
    prepared dataset's split, read in order from its indexed files (memory-mapped, in chunks:
    O(chunk) extra memory however large the split)."""
    if not indexed.has_indexed(data_dir, split):
        raise DataError(f"{Path(data_dir)}: no indexed {split} split (re-run tools/prepare_data.py)")
    s = indexed.IndexedSplit(data_dir, split, vocab_size=vocab_size, mmap=True)
    counts = np.zeros(int(vocab_size), dtype=np.int64)
    tokens, mask = s.arrays()
    if tokens is None:
        return counts
    for start in range(0, tokens.shape[0], chunk):
        t = np.asarray(tokens[start:start + chunk], dtype=np.int64)
        m = np.asarray(mask[start:start + chunk], dtype=bool)
        counts += np.bincount(t[m], minlength=int(vocab_size))
    return counts


__all__ = ["DraftVocab", "select_draft_vocab", "supervised_token_counts", "DEFAULT_DRAFT_VOCAB_SIZE"]
