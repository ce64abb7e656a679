"""Prepared datasets, batching and the seekable data-parallel batch sampler.

A prepared dataset is a directory written by ``tools/prepare_data.py``: per split the
indexed, memory-mappable ``{split}.bin``/``{split}.idx`` (what training reads, see
:mod:`megaspark.data.indexed`) and ``{split}.jsonl`` (one ``{"input_ids": [...],
"loss_mask": [...]}`` per line, for people and other tools), and ``meta.json`` (target,
vocabulary size, eos/pad ids, counts, the storage format, ...). Directories from older
versions with only the ``.jsonl`` files still load (parsed into memory).

Sampling is defined on one *global sample stream*, independent of the parallel
layout: epoch ``e`` is a permutation of all samples drawn with seed ``seed + e``, and
the stream is the concatenation of the epochs. Global micro-step ``i`` consumes the
``micro_batch_size * dp_size`` samples that follow ``consumed_samples``; DP rank ``r``
takes the ``r``-th chunk of ``micro_batch_size`` of them. A run therefore resumes
exactly from ``consumed_samples``, and the same samples make up a global batch
whatever the DP size, micro-batch size or accumulation. With ``length_grouped`` each
epoch's permutation is reordered window by window so that neighbouring samples have
similar lengths (:func:`length_grouped_order`); the stream is otherwise defined the same.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import indexed
from .chat import DataError

META_FILE = "meta.json"
SPLITS = ("train", "valid")


def load_meta(data_dir) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: '{data_dir}' is not a prepared dataset "
                                f"(create one with tools/prepare_data.py)")
    return json.loads(path.read_text())


def chat_template_sha256(tokenizer) -> str:
    import hashlib

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256((template or "").encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """A fingerprint of the vocabulary (every token string and its id) and special ids."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def check_matches_target(data_dir, meta: dict, tokenizer, hf_config) -> None:
    """Refuse a prepared dataset tokenized for another target, before training: its
    ``meta.json`` must record this target's vocabulary (fingerprint, when recorded), sizes,
    special ids and chat template."""
    where = Path(data_dir) / META_FILE
    expected = {"model_vocab_size": int(hf_config.vocab_size), "tokenizer_vocab_size": len(tokenizer),
                "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
                "chat_template_sha256": chat_template_sha256(tokenizer)}
    if "tokenizer_sha256" in meta:
        expected["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    diff = [f"{k}: {meta[k]!r} there, {v!r} for this target" for k, v in expected.items()
            if k in meta and meta[k] != v]
    if diff:
        raise DataError(f"{where} was prepared for another tokenizer than the target's "
                        f"(prepared for {meta.get('target', '?')}): {'; '.join(diff)}. Re-run "
                        "tools/prepare_data.py with this --target-model")


#: ``--data-verify auto`` reads and checksums the data only below this size
AUTO_VERIFY_BYTES = 4 << 30


def verify_prepared(data_dir, meta: dict, mode: str = "auto") -> str:
    """Check that the indexed files are the ones ``meta.json`` records: every split's
    ``.bin`` header must carry the sha256 that ``meta.json`` recorded (O(1); catches a
    swapped ``.bin``/``.idx`` pair); with ``mode`` ``checksum`` (or ``auto`` below
    :data:`AUTO_VERIFY_BYTES`) the ``.bin`` is also read and checksummed (catches a changed
    byte). Sizes are always checked when a split is opened. Returns what was done."""
    splits = (meta.get("storage") or {}).get("splits") or {}
    present = [s for s in SPLITS if indexed.has_indexed(data_dir, s) and s in splits]
    total = sum(int(splits[s].get("bin_bytes") or 0) for s in present)
    full = mode == "checksum" or (mode == "auto" and total < AUTO_VERIFY_BYTES)
    for split in present:
        header = indexed.IndexedSplit(data_dir, split).header
        want = splits[split].get("bin_sha256")
        if want and header.get("bin_sha256") != want:
            raise DataError(f"{indexed.bin_path(data_dir, split)} is not the file {Path(data_dir) / META_FILE} "
                            f"records (sha256 {str(header.get('bin_sha256'))[:12]}… vs {want[:12]}…): the "
                            "dataset was changed after preparation; re-run tools/prepare_data.py")
        if full:
            indexed.verify_split(data_dir, split)
    if not present:
        return "no indexed splits (jsonl: sizes checked)"
    return f"{'sha256 of' if full else 'sizes and recorded sha256 of'} {total / 2**20:.1f} MiB checked"


class PreparedDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset.

    Datasets written by the current ``tools/prepare_data.py`` are read from the
    indexed ``{split}.bin``/``{split}.idx`` (:mod:`megaspark.data.indexed`): opening
    is O(1) in the number of samples (header, file sizes and first/last offset are checked;
    a truncated or corrupted file raises :class:`~megaspark.data.indexed.DatasetFormatError`
    naming it) and nothing is loaded until a sample is read. The content was validated
    when it was written; here only the largest token id is checked against
    ``vocab_size``.

    Older datasets with only ``{split}.jsonl`` are parsed and validated fully as before:
    each record must have equally long ``input_ids`` (ints in ``[0, vocab_size)``, the
    model vocabulary from ``meta.json``, or ``vocab_size`` if given) and ``loss_mask``
    (0/1); a malformed record raises :class:`DataError` naming the file and line.

    ``dataset[i]`` is ``{"input_ids": LongTensor[n], "loss_mask": LongTensor[n]}``;
    ``lengths()`` is a :class:`~megaspark.data.indexed.Lengths` (``np.asarray`` of it is
    an int64 array, no per-sample objects); ``format`` is ``"indexed"`` or ``"jsonl"``.
    """

    def __init__(self, data_dir, split: str = "train", vocab_size: Optional[int] = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(data_dir)
        self.vocab_size = int(vocab_size or self.meta.get("model_vocab_size")
                              or self.meta["tokenizer_vocab_size"])
        self._lengths: Optional[np.ndarray] = None
        jsonl = self.dir / f"{split}.jsonl"
        if indexed.has_indexed(self.dir, split):
            self.format = "indexed"
            self._split = indexed.IndexedSplit(self.dir, split, vocab_size=self.vocab_size)
            self.path = self._split.idx_path
            self._check_against_meta(jsonl)
            return
        if indexed.bin_path(self.dir, split).is_file():
            raise indexed.DatasetFormatError(
                f"{indexed.idx_path(self.dir, split)} is missing but {split}.bin exists (an "
                f"interrupted copy?); re-run tools/prepare_data.py")
        if not jsonl.is_file():
            raise FileNotFoundError(f"{jsonl} not found (nor {split}.idx/{split}.bin)")
        self.format = "jsonl"
        self.path = jsonl
        self._ids: list[Tensor] = []
        self._mask: list[Tensor] = []
        with open(jsonl, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                ids, mask = self._validate(line, line_no)
                self._ids.append(torch.tensor(ids, dtype=torch.long))
                self._mask.append(torch.tensor(mask, dtype=torch.long))

    def _check_against_meta(self, jsonl: Path) -> None:
        """O(1) consistency of the mapped split with meta.json and the jsonl next to it."""
        n = len(self._split)
        counts = self.meta.get("counts") or {}
        if isinstance(counts.get(self.split), int) and counts[self.split] != n:
            raise indexed.DatasetFormatError(
                f"{self.path}: {n} samples but {self.dir / META_FILE} says {counts[self.split]} "
                f"(files from different runs?); re-run tools/prepare_data.py")
        info = ((self.meta.get("storage") or {}).get("splits") or {}).get(self.split) or {}
        if info.get("jsonl_bytes") is not None and jsonl.is_file():
            size = jsonl.stat().st_size
            if size != info["jsonl_bytes"]:
                raise indexed.DatasetFormatError(
                    f"{jsonl} was changed after prepare_data wrote {self.split}.idx/.bin ({size} bytes, "
                    f"{info['jsonl_bytes']} recorded); training reads the .bin: re-run "
                    f"tools/prepare_data.py, or delete {self.split}.idx and {self.split}.bin to train "
                    f"on the edited .jsonl")

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
        return len(self._split) if self.format == "indexed" else len(self._ids)

    def __getitem__(self, i: int) -> dict:
        if self.format == "indexed":
            ids, mask = self._split[i]
            return {"input_ids": torch.from_numpy(ids), "loss_mask": torch.from_numpy(mask)}
        return {"input_ids": self._ids[i], "loss_mask": self._mask[i]}

    def lengths(self) -> indexed.Lengths:
        """Sample lengths (computed once, then cached: one int64 per sample)."""
        if self._lengths is None:
            if self.format == "indexed":
                self._lengths = self._split.lengths().numpy()
            else:
                self._lengths = np.fromiter((x.numel() for x in self._ids), dtype=np.int64,
                                            count=len(self._ids))
            self._lengths.setflags(write=False)
        return indexed.Lengths(self._lengths)

    @property
    def pad_id(self) -> int:
        """Padding id recorded by prepare_data (the tokenizer's pad, else eos, else 0)."""
        for key in ("pad_token_id", "eos_token_id"):
            if self.meta.get(key) is not None:
                return int(self.meta[key])
        return 0


def has_split(data_dir, split: str) -> bool:
    """Whether a prepared dataset directory has ``split`` (in either format)."""
    d = Path(data_dir)
    return indexed.has_indexed(d, split) or (d / f"{split}.jsonl").is_file()


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


# Epoch orders shared by every sampler of the process (the trainer may create a sampler
# per step): key -> read-only int array. A few entries: the current epoch, the next one
# (a micro-batch can straddle the boundary) and those of a second dataset.
_ORDER_CACHE: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_ORDER_CACHE_SIZE = 6


def _cached(key, lengths, build):
    hit = _ORDER_CACHE.get(key)
    if hit is not None and hit[0] is lengths:
        _ORDER_CACHE.move_to_end(key)
        return hit[1]
    order = build()
    order.setflags(write=False)
    _ORDER_CACHE[key] = (lengths, order)
    while len(_ORDER_CACHE) > _ORDER_CACHE_SIZE:
        _ORDER_CACHE.popitem(last=False)
    return order


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s shuffled order: ``torch.randperm(num_samples)`` drawn from a
    generator seeded with ``seed + epoch`` (the order megaspark has always used), as a
    read-only int array computed once per process and epoch."""
    def build():
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        perm = torch.randperm(num_samples, generator=g).numpy()
        return perm.astype(np.int32) if num_samples < 2 ** 31 else perm

    return _cached(("perm", int(num_samples), int(seed), int(epoch)), None, build)


def length_grouped_order(order: np.ndarray, lengths: np.ndarray, group_size: int,
                         window_groups: int, seed: int, epoch: int) -> np.ndarray:
    """Reorder one epoch so that consecutive groups of ``group_size`` samples have similar
    lengths.

    The epoch's order is cut into windows of ``group_size * window_groups`` consecutive
    entries; each window is sorted by length (longest first, ties in stream order), cut
    into groups of ``group_size`` and its full groups are shuffled (seeded with ``seed``
    and ``epoch``) so that training does not see long-to-short sweeps; a partial last group
    stays last. The result is a permutation of ``order`` window by window, and it depends
    only on ``order``, the lengths and the two sizes, not on the parallel layout.
    """
    n = order.shape[0]
    G, K = int(group_size), int(window_groups)
    W = G * K
    L = np.asarray(lengths)[order]
    n_win = -(-n // W)
    # sort every window by descending length (stable): pad the last window with -1
    padded_L = np.full(n_win * W, -1, dtype=np.int64)
    padded_L[:n] = L
    padded_o = np.full(n_win * W, -1, dtype=np.int64)
    padded_o[:n] = order
    sort = np.argsort(-padded_L.reshape(n_win, W), axis=1, kind="stable")
    sorted_o = np.take_along_axis(padded_o.reshape(n_win, W), sort, axis=1)
    # shuffle the full groups of each window
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7_919 + 0x5EED) % (2 ** 63))
    keys = torch.rand((n_win, K), generator=g).numpy()
    last_full = (n - (n_win - 1) * W) // G  # full groups in the last window
    keys[-1, last_full:] = 2.0  # partial/empty groups of the last window stay at its end
    gperm = np.argsort(keys, axis=1, kind="stable")
    grouped = np.take_along_axis(sorted_o.reshape(n_win, K, G), gperm[:, :, None], axis=1).reshape(-1)
    out = grouped[grouped >= 0]
    return out.astype(order.dtype, copy=False)


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
        length_grouped: reorder each epoch with :func:`length_grouped_order` so that
            micro-batches hold samples of similar length (less padding); needs ``lengths``.
        lengths: the samples' lengths (``dataset.lengths()``), for ``length_grouped``.
        length_group_size: samples per length group (default: the global micro-batch,
            ``micro_batch_size * dp_size``). Pass the global batch size to make the order
            independent of the parallel layout and of gradient accumulation.
        length_group_window: groups per sorting window (default 64).

    ``len(sampler)`` is the number of micro-batches per rank in one epoch's worth of
    samples. The index lists are plain ints; use with ``DataLoader(batch_sampler=...)``.
    Epoch orders are computed once per process (and cached across sampler instances), so
    creating a sampler or seeking with :meth:`micro_batches_at` costs O(micro-batch).
    """

    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, consumed_samples: int = 0, shuffle: bool = True,
                 num_epochs: Optional[int] = None, length_grouped: bool = False,
                 lengths=None, length_group_size: Optional[int] = None,
                 length_group_window: int = 64):
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
        self.length_grouped = bool(length_grouped)
        self._lengths = None
        if self.length_grouped:
            if lengths is None:
                raise ValueError("length_grouped=True needs the samples' lengths (dataset.lengths())")
            arr = lengths.numpy() if isinstance(lengths, indexed.Lengths) else lengths
            if not isinstance(arr, np.ndarray):
                arr = np.asarray(arr, dtype=np.int64)
            if arr.shape != (self.num_samples,):
                raise ValueError(f"{arr.shape[0] if arr.ndim else 0} lengths for {self.num_samples} samples")
            self._lengths = arr
            self.length_group_size = int(length_group_size or self.global_micro_batch)
            self.length_group_window = int(length_group_window)
            if self.length_group_size <= 0 or self.length_group_window <= 0:
                raise ValueError("length_group_size and length_group_window must be positive")

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return self.num_samples // self.global_micro_batch

    def epoch_of(self, consumed_samples: int) -> int:
        return consumed_samples // self.num_samples

    def _epoch_order(self, epoch: int) -> Optional[np.ndarray]:
        """The epoch's order (read-only array), or None for the identity."""
        base = epoch_permutation(self.num_samples, self.seed, epoch) if self.shuffle else None
        if not self.length_grouped:
            return base
        key = ("grouped", self.num_samples, self.seed, epoch, self.shuffle,
               self.length_group_size, self.length_group_window)

        def build():
            order = base if base is not None else np.arange(self.num_samples, dtype=np.int64)
            return length_grouped_order(order, self._lengths, self.length_group_size,
                                        self.length_group_window, self.seed, epoch)

        return _cached(key, self._lengths, build)

    def _stream(self, start: int, count: int) -> list[int]:
        """Global stream entries ``start … start + count - 1``."""
        parts = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            order = self._epoch_order(epoch)
            parts.append(np.arange(offset, offset + take) if order is None
                         else order[offset: offset + take])
            pos += take
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)).tolist()

    def micro_batches_at(self, consumed_samples: int, count: int) -> list[list[int]]:
        """This rank's ``count`` micro-batches starting at global stream position
        ``consumed_samples`` (a seek: nothing before it is computed)."""
        G, mbs = self.global_micro_batch, self.micro_batch_size
        lo = self.dp_rank * mbs
        return [self._stream(consumed_samples + k * G + lo, mbs) for k in range(count)]

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.consumed_samples
        G = self.global_micro_batch
        end = None if self.num_epochs is None else self.num_epochs * self.num_samples
        lo = self.dp_rank * self.micro_batch_size
        while end is None or pos + G <= end:
            chunk = self._stream(pos + lo, self.micro_batch_size)
            pos += G
            yield chunk


__all__ = ["PreparedDataset", "collate", "BatchSampler", "load_meta", "has_split", "META_FILE",
           "epoch_permutation", "length_grouped_order"]
