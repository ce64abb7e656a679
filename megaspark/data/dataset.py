"""Prepared datasets, batching and the seekable data-parallel batch sampler.

A prepared dataset is a directory written by ``tools/prepare_data.py``:
``train.jsonl`` / ``valid.jsonl`` (one ``{"input_ids": [...], "loss_mask": [...]}``
per line) and ``meta.json`` (target, vocabulary size, eos/pad ids, counts, ...).

Sampling is defined on one *global sample stream*, independent of the parallel
layout: epoch ``e`` is a permutation of all samples drawn with seed ``seed + e``, and
the stream is the concatenation of the epochs. Global micro-step ``i`` consumes the
``micro_batch_size * dp_size`` samples that follow ``consumed_samples``; DP rank ``r``
takes the ``r``-th chunk of ``micro_batch_size`` of them. A run therefore resumes
exactly from ``consumed_samples``, and the same samples make up a global batch
whatever the DP size, micro-batch size or accumulation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from .chat import DataError

META_FILE = "meta.json"
SPLITS = ("train", "valid")


def load_meta(data_dir) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{data_dir}' is not a prepared dataset "
                                f"(create one with tools/prepare_data.py)")
    return json.loads(path.read_text())


class PreparedDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset, fully loaded and validated.

    Each record must have equally long ``input_ids`` (ints in ``[0, vocab_size)``, the
    model vocabulary from ``meta.json``, or ``vocab_size`` if given) and ``loss_mask``
    (0/1); a malformed record raises :class:`DataError` naming the file and line.
    ``dataset[i]`` is ``{"input_ids": LongTensor[n], "loss_mask": LongTensor[n]}``.
    """

    def __init__(self, data_dir, split: str = "train", vocab_size: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(data_dir)
        self.vocab_size = int(vocab_size or self.meta.get("model_vocab_size")
                              or self.meta["tokenizer_vocab_size"])
        path = self.dir / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        self.path = path
        self._ids: list[Tensor] = []
        self._mask: list[Tensor] = []
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                ids, mask = self._validate(line, line_no)
                self._ids.append(torch.tensor(ids, dtype=torch.long))
                self._mask.append(torch.tensor(mask, dtype=torch.long))

    def _validate(self, line: str, line_no: int):
        def fail(msg):
            raise DataError(msg, line_no, str(self.path))

        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"invalid JSON ({e.msg})")
        if not isinstance(rec, dict) or "input_ids" not in rec or "loss_mask" not in rec:
            fail("expected an object with 'input_ids' and 'loss_mask'")
        ids, mask = rec["input_ids"], rec["loss_mask"]
        if not isinstance(ids, list) or not isinstance(mask, list):
            fail("'input_ids' and 'loss_mask' must be lists")
        if not ids:
            fail("empty sample")
        if len(ids) != len(mask):
            fail(f"'input_ids' has {len(ids)} entries but 'loss_mask' has {len(mask)}")
        V = self.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                fail(f"token id {t!r} is not an integer in [0, {V})")
        for m in mask:
            if type(m) is not int or m not in (0, 1):
                fail(f"loss_mask value {m!r} is not 0 or 1")
        return ids, [int(m) for m in mask]

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self._ids[i], "loss_mask": self._mask[i]}

    def lengths(self) -> list[int]:
        return [len(x) for x in self._ids]

    @property
    def pad_id(self) -> int:
        """Padding id recorded by prepare_data (the tokenizer's pad, else eos, else 0)."""
        for key in ("pad_token_id", "eos_token_id"):
            if self.meta.get(key) is not None:
                return int(self.meta[key])
        return 0


def collate(samples: Sequence[dict], seq_length: Optional[int], pad_id: int = 0) -> dict:
    """Stack samples into ``[b, S]`` tensors.

    Shorter samples are right-padded with ``pad_id`` (loss mask 0), longer ones are
    truncated to ``seq_length``; ``seq_length=None`` pads to the longest sample.
    Returns ``input_ids`` (long), ``loss_mask`` (long, 0/1) and ``attention_mask``
    (long, 1 on real tokens).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    S = int(seq_length) if seq_length is not None else max(len(s["input_ids"]) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, S), int(pad_id), dtype=torch.long)
    loss_mask = torch.zeros((b, S), dtype=torch.long)
    attention_mask = torch.zeros((b, S), dtype=torch.long)
    for i, s in enumerate(samples):
        ids = torch.as_tensor(s["input_ids"], dtype=torch.long)[:S]
        mask = torch.as_tensor(s["loss_mask"], dtype=torch.long)[:S]
        n = ids.numel()
        input_ids[i, :n] = ids
        loss_mask[i, :n] = mask
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


class BatchSampler:
    """Seekable, deterministic sampler yielding this DP rank's micro-batches of indices.

    Args:
        num_samples: dataset size.
        micro_batch_size: samples per rank per micro-step.
        dp_rank, dp_size: this rank and the data-parallel world size.
        seed: shuffling seed; epoch ``e`` uses ``seed + e``.
        consumed_samples: global samples already consumed (all ranks); iteration starts
            right after them, so a resumed run continues exactly where it stopped.
        shuffle: ``False`` walks the samples in order every epoch (e.g. for validation).
        num_epochs: stop after this many passes over the stream (``None``: endless).
            Only complete global micro-batches are yielded.

    ``len(sampler)`` is the number of micro-batches per rank in one epoch's worth of
    samples. The index lists are plain ints; use with ``DataLoader(batch_sampler=...)``.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, consumed_samples: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = None):
        if num_samples <= 0:
            raise ValueError(f"no samples to draw from (num_samples={num_samples})")
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError("micro_batch_size and dp_size must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        if consumed_samples < 0:
            raise ValueError("consumed_samples must be >= 0")
        self.num_samples = int(num_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.consumed_samples = int(consumed_samples)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self._perm_cache: dict[int, list[int]] = {}

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return self.num_samples // self.global_micro_batch

    def epoch_of(self, consumed_samples: int) -> int:
        return consumed_samples // self.num_samples

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        if epoch not in self._perm_cache:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            self._perm_cache = {epoch: torch.randperm(self.num_samples, generator=g).tolist()}
        return self._perm_cache[epoch]

    def _stream(self, start: int, count: int) -> list[int]:
        """Global stream entries ``start … start + count - 1``."""
        out = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.num_samples)
            order = self._epoch_order(epoch)
            take = min(count - len(out), self.num_samples - offset)
            out.extend(order[offset: offset + take])
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.consumed_samples
        G = self.global_micro_batch
        end = None if self.num_epochs is None else self.num_epochs * self.num_samples
        lo = self.dp_rank * self.micro_batch_size
        while end is None or pos + G <= end:
            chunk = self._stream(pos + lo, self.micro_batch_size)
            pos += G
            yield chunk


__all__ = ["PreparedDataset", "collate", "BatchSampler", "load_meta", "META_FILE"]
