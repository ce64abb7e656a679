"""The memory-mapped on-disk format of a prepared dataset split.

``tools/prepare_data.py`` writes, for each split, next to ``{split}.jsonl``::

    {split}.bin   the token ids of all samples back to back (``uint16`` when the model
                  vocabulary has at most 65,536 entries, else ``int32``), followed by their
                  loss masks (``uint8``, 0/1), same order
    {split}.idx   a 128-byte header, then ``int64 offsets[n + 1]``: sample ``i`` is
                  tokens ``offsets[i]:offsets[i+1]``

Header (little endian)::

    0   8s   magic  b"MSPKIDX\\0"
    8   u32  format version (:data:`VERSION`)
    12  u32  token dtype code (2: uint16, 4: int32)
    16  u64  number of samples n
    24  u64  number of tokens T (= offsets[n])
    32  u64  byte offset of the loss masks in .bin (= T * token itemsize)
    40  u64  size of .bin in bytes (= T * (itemsize + 1))
    48  i64  largest token id (-1 for an empty split)
    56  u64  shortest sample, 64 u64 longest sample, 72 u64 supervised tokens
    80  32s  sha256 of .bin
    112 u32  crc32 of bytes 0..111
    116 pad to 128

Everything about the *content* (token range, 0/1 masks, equal lengths, non-empty samples)
is validated when the split is written. Opening reads the header and checks the magic,
version, header checksum, both file sizes and the first and last offset: O(1) in the
number of samples, no per-sample Python objects, nothing resident (a sample is read
with ``os.pread`` from the page cache, or through a memory map, see
:class:`IndexedSplit`). A truncated, overwritten or mismatched file is refused with a
:class:`DatasetFormatError` naming it. :func:`verify_split` does the full O(data) check
(sha256 of .bin, monotone offsets).

Why not megatron-core's ``IndexedDataset``: it stores one token sequence per sample and
has no place for a per-token loss mask (two datasets would be needed), validates its
files with ``assert`` only (gone under ``python -O``) and never checks the .bin size (a
truncated file fails, or reads garbage, only when a sample past the end is read), and
importing it pulls in the whole ``megatron.core`` package (~4 s here). This format is a
few hundred lines of numpy, has no build step and the same .bin/.idx shape.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .chat import DataError

FORMAT_NAME = "megaspark-indexed"
VERSION = 1
MAGIC = b"MSPKIDX\x00"
HEADER_SIZE = 128
_HEAD = struct.Struct("<8sIIQQQQqQQQ32s")  # 112 bytes, then crc32 and padding
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<i4")}
_CODES = {v: k for k, v in _DTYPES.items()}
_COPY_CHUNK = 1 << 24


class DatasetFormatError(DataError):
    """A memory-mapped split that is truncated, corrupted, stale or not ours."""


def idx_path(directory, split: str) -> Path:
    return Path(directory) / f"{split}.idx"


def bin_path(directory, split: str) -> Path:
    return Path(directory) / f"{split}.bin"


def has_indexed(directory, split: str) -> bool:
    return idx_path(directory, split).is_file()


def token_dtype_for(vocab_size: int) -> np.dtype:
    return _DTYPES[2] if int(vocab_size) <= 1 << 16 else _DTYPES[4]


# ---------------------------------------------------------------------------------- writing

class SplitWriter:
    """Writes one split: ``{split}.bin`` / ``{split}.idx`` and (``jsonl=True``) the
    human-readable ``{split}.jsonl`` with exactly the bytes prepare_data always wrote.

    Every sample is validated (non-empty, ``input_ids`` and ``loss_mask`` of equal
    length, ids in ``[0, vocab_size)``, mask 0/1); a bad one raises :class:`DataError`
    with its index. :meth:`finalize` returns the record that goes into
    ``meta.json["storage"]["splits"][split]``. Write into a temporary directory and
    rename it (as prepare_data does): the files have their final names from the start.
    """

    def __init__(self, directory, split: str, vocab_size: int, *, jsonl: bool = True,
                 indexed: bool = True):
        self.dir = Path(directory)
        self.split = split
        self.vocab_size = int(vocab_size)
        if self.vocab_size <= 0 or self.vocab_size > 2 ** 31:
            raise ValueError(f"vocab_size {vocab_size} out of range")
        self.dtype = token_dtype_for(self.vocab_size)
        self.indexed = indexed
        self._n = 0
        self._tokens = 0
        self._supervised = 0
        self._max_id = -1
        self._min_len = None
        self._max_len = 0
        self._offsets = array("q", [0])
        self._sha = hashlib.sha256()
        self._jsonl = open(self.dir / f"{split}.jsonl", "w", encoding="utf-8") if jsonl else None
        if indexed:
            self._bin = open(bin_path(self.dir, split), "wb")
            self._mask_tmp = open(self.dir / f".{split}.mask.tmp", "wb+")

    # -- validation --------------------------------------------------------------------
    def _check(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray):
        where = f"{self.split} sample"
        if ids.shape != mask.shape:
            raise DataError(f"{where}s: {ids.size} token ids but {mask.size} loss-mask values")
        if lengths.size and lengths.min() <= 0:
            k = int(np.argmax(lengths <= 0))
            raise DataError(f"{where} {self._n + k}: empty sample")
        if ids.size:
            bad = (ids < 0) | (ids >= self.vocab_size)
            if bad.any():
                t = int(np.argmax(bad))
                k = int(np.searchsorted(np.cumsum(lengths), t, side="right"))
                raise DataError(f"{where} {self._n + k}: token id {int(ids[t])} is not an integer "
                                f"in [0, {self.vocab_size})")
            badm = (mask != 0) & (mask != 1)
            if badm.any():
                t = int(np.argmax(badm))
                k = int(np.searchsorted(np.cumsum(lengths), t, side="right"))
                raise DataError(f"{where} {self._n + k}: loss_mask value {int(mask[t])} is not 0 or 1")

    # -- adding samples ----------------------------------------------------------------
    def add(self, input_ids, loss_mask) -> None:
        """One sample (lists of ints or 1-d arrays)."""
        ids = np.asarray(input_ids)
        mask = np.asarray(loss_mask)
        if ids.size == 0:
            raise DataError(f"{self.split} sample {self._n}: empty sample")
        if ids.ndim != 1 or mask.ndim != 1 or ids.dtype.kind not in "iu" or mask.dtype.kind not in "iu":
            raise DataError(f"{self.split} sample {self._n}: input_ids and loss_mask must be "
                            f"1-d integer sequences")
        if ids.size != mask.size:
            raise DataError(f"{self.split} sample {self._n}: 'input_ids' has {ids.size} entries "
                            f"but 'loss_mask' has {mask.size}")
        self._append(ids.astype(np.int64, copy=False), mask.astype(np.int64, copy=False),
                     np.array([ids.size], dtype=np.int64), [(input_ids, loss_mask)])

    def add_batch(self, input_ids: np.ndarray, loss_mask: np.ndarray, lengths) -> None:
        """Many samples at once: their ids and masks concatenated, and their lengths."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        mask = np.asarray(loss_mask, dtype=np.int64).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if int(lengths.sum()) != ids.size:
            raise DataError(f"{self.split}: lengths sum to {int(lengths.sum())} but {ids.size} ids given")
        self._append(ids, mask, lengths, None)

    def _append(self, ids, mask, lengths, records) -> None:
        self._check(ids, mask, lengths)
        if self._jsonl is not None:
            if records is None:
                bounds = np.concatenate([[0], np.cumsum(lengths)])
                records = [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]
            for r_ids, r_mask in records:
                r_ids = r_ids.tolist() if isinstance(r_ids, np.ndarray) else [int(t) for t in r_ids]
                r_mask = r_mask.tolist() if isinstance(r_mask, np.ndarray) else [int(m) for m in r_mask]
                self._jsonl.write(json.dumps({"input_ids": r_ids, "loss_mask": r_mask},
                                             separators=(",", ":")) + "\n")
        if self.indexed:
            tok = ids.astype(self.dtype).tobytes()
            self._bin.write(tok)
            self._sha.update(tok)
            self._mask_tmp.write(mask.astype(np.uint8).tobytes())
            ends = self._tokens + np.cumsum(lengths)
            self._offsets.frombytes(ends.astype("<i8").tobytes())
        n = lengths.size
        if n:
            self._n += n
            self._tokens += int(lengths.sum())
            self._supervised += int(mask.sum())
            self._max_id = max(self._max_id, int(ids.max()))
            lo, hi = int(lengths.min()), int(lengths.max())
            self._min_len = lo if self._min_len is None else min(self._min_len, lo)
            self._max_len = max(self._max_len, hi)

    def __len__(self) -> int:
        return self._n

    # -- finishing ---------------------------------------------------------------------
    def finalize(self) -> dict:
        info = {"num_samples": self._n, "num_tokens": self._tokens,
                "supervised_tokens": self._supervised}
        if self._jsonl is not None:
            self._jsonl.close()
            info["jsonl_bytes"] = (self.dir / f"{self.split}.jsonl").stat().st_size
        if not self.indexed:
            return info
        mask_offset = self._tokens * self.dtype.itemsize
        self._mask_tmp.seek(0)
        while True:
            chunk = self._mask_tmp.read(_COPY_CHUNK)
            if not chunk:
                break
            self._bin.write(chunk)
            self._sha.update(chunk)
        self._mask_tmp.close()
        os.unlink(self.dir / f".{self.split}.mask.tmp")
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        bin_bytes = mask_offset + self._tokens
        digest = self._sha.digest()
        head = _HEAD.pack(MAGIC, VERSION, _CODES[self.dtype], self._n, self._tokens, mask_offset,
                          bin_bytes, self._max_id, self._min_len or 0, self._max_len,
                          self._supervised, digest)
        head += struct.pack("<I", zlib.crc32(head))
        head += b"\0" * (HEADER_SIZE - len(head))
        with open(idx_path(self.dir, self.split), "wb") as fh:
            fh.write(head)
            fh.write(np.frombuffer(self._offsets, dtype=np.int64).astype("<i8").tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        info.update({"bin_bytes": bin_bytes, "bin_sha256": digest.hex(), "token_dtype": self.dtype.name,
                     "max_token_id": self._max_id, "max_length": self._max_len})
        return info

    def abort(self) -> None:
        for fh in (self._jsonl, getattr(self, "_bin", None), getattr(self, "_mask_tmp", None)):
            if fh is not None and not fh.closed:
                fh.close()


def write_split(directory, split: str, records, vocab_size: int, *, jsonl: bool = True) -> dict:
    """Write ``records`` (an iterable of ``(input_ids, loss_mask)``) as one split."""
    w = SplitWriter(directory, split, vocab_size, jsonl=jsonl)
    try:
        for ids, mask in records:
            w.add(ids, mask)
        return w.finalize()
    except BaseException:
        w.abort()
        raise


def storage_meta(split_infos: dict) -> dict:
    """The ``meta.json["storage"]`` record for the splits written by :class:`SplitWriter`."""
    return {"format": FORMAT_NAME, "version": VERSION, "splits": split_infos}


# ---------------------------------------------------------------------------------- reading

class Lengths(Sequence):
    """Sample lengths backed by a numpy array: ``np.asarray(lengths)`` is free, indexing
    gives ints, slicing gives :class:`Lengths`, and it compares equal to a list of the
    same ints (so code written for the old ``list`` keeps working)."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = a

    def __len__(self) -> int:
        return int(self._a.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Lengths(self._a[i])
        return int(self._a[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self._a.tolist())

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)

    def numpy(self) -> np.ndarray:
        return self._a

    def sum(self) -> int:
        return int(self._a.sum())

    def __eq__(self, other) -> bool:
        if isinstance(other, (Lengths, np.ndarray, list, tuple)):
            o = np.asarray(other)
            return o.shape == self._a.shape and bool(np.array_equal(o, self._a))
        return NotImplemented

    __hash__ = None  # unhashable, like a list

    def __repr__(self) -> str:
        return f"Lengths({self._a!r})"


def _read_header(path: Path) -> dict:
    def bad(msg):
        raise DatasetFormatError(f"{path}: {msg}; re-run tools/prepare_data.py to rewrite the "
                                 f"dataset (or delete the .idx/.bin files to fall back to the .jsonl)")

    try:
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_SIZE)
    except OSError as e:
        raise DatasetFormatError(f"{path}: cannot read ({e})") from e
    if len(raw) < HEADER_SIZE:
        bad(f"truncated header ({len(raw)} of {HEADER_SIZE} bytes)")
    if raw[:8] != MAGIC:
        bad("not a megaspark indexed dataset (bad magic)")
    fields = _HEAD.unpack(raw[: _HEAD.size])
    (crc,) = struct.unpack_from("<I", raw, _HEAD.size)
    if zlib.crc32(raw[: _HEAD.size]) != crc:
        bad("header checksum mismatch (corrupted)")
    (_, version, code, n, tokens, mask_offset, bin_bytes, max_id, min_len, max_len, supervised,
     sha) = fields
    if version != VERSION:
        bad(f"format version {version}, this megaspark reads version {VERSION}")
    if code not in _DTYPES:
        bad(f"unknown token dtype code {code}")
    return dict(version=version, dtype=_DTYPES[code], num_samples=n, num_tokens=tokens,
                mask_offset=mask_offset, bin_bytes=bin_bytes, max_token_id=max_id, min_length=min_len,
                max_length=max_len, supervised_tokens=supervised, bin_sha256=sha.hex())


class IndexedSplit:
    """Read-only view of ``{split}.bin``/``{split}.idx``.

    ``split[i]`` is ``(ids, mask)`` as int64 numpy arrays (fresh copies). Opening is O(1);
    ``vocab_size`` (if given) is checked against the largest token id recorded at write
    time. Picklable: a copy in a DataLoader worker reopens the files.

    Two ways to read, same results: ``mmap=False`` (default, for training's random
    access) reads each sample with ``os.pread`` (three small reads from the page cache, a
    few microseconds): the process maps nothing, its resident memory stays flat however
    many samples it reads, and ranks on a node share the kernel's page cache.
    ``mmap=True`` maps both files (fastest for scanning a split in order); mapped file
    pages then count in the process's RSS (shared and reclaimable, but with large page
    cache folios a few thousand random reads map most of the file).
    """

    def __init__(self, directory, split: str, vocab_size: Optional[int] = None, mmap: bool = False):
        self.dir = Path(directory)
        self.split = split
        self.vocab_size = vocab_size
        self.use_mmap = bool(mmap)
        self.idx_path = idx_path(directory, split)
        self.bin_path = bin_path(directory, split)
        self._fds: list[int] = []
        self._open()

    def _bad(self, path, msg):
        raise DatasetFormatError(f"{path}: {msg}; re-run tools/prepare_data.py to rewrite the "
                                 f"dataset (or delete {self.split}.idx/.bin to fall back to the .jsonl)")

    def _open(self) -> None:
        h = _read_header(self.idx_path)
        self.header = h
        n, T = h["num_samples"], h["num_tokens"]
        bad = self._bad
        want_idx = HEADER_SIZE + 8 * (n + 1)
        got_idx = self.idx_path.stat().st_size
        if got_idx != want_idx:
            bad(self.idx_path, f"{got_idx} bytes, expected {want_idx} for {n} samples "
                               f"({'truncated' if got_idx < want_idx else 'trailing data'})")
        if not self.bin_path.is_file():
            bad(self.bin_path, "missing (the .idx exists)")
        got_bin = self.bin_path.stat().st_size
        itemsize = h["dtype"].itemsize
        if h["bin_bytes"] != T * (itemsize + 1) or h["mask_offset"] != T * itemsize:
            bad(self.idx_path, "inconsistent header sizes (corrupted)")
        if got_bin != h["bin_bytes"]:
            bad(self.bin_path, f"{got_bin} bytes, the index expects {h['bin_bytes']} "
                               f"({'truncated' if got_bin < h['bin_bytes'] else 'trailing data'}, "
                               f"or the .bin and .idx come from different runs)")
        if self.vocab_size is not None and h["max_token_id"] >= int(self.vocab_size):
            raise DataError(f"{self.bin_path}: token id {h['max_token_id']} is not an integer in "
                            f"[0, {int(self.vocab_size)}) (the dataset was prepared for a larger "
                            f"vocabulary than the model's)")
        self._n, self._T = n, T
        self._dtype = h["dtype"]
        self._mask_offset = h["mask_offset"]
        self._offsets = self._tokens = self._mask = None
        if self.use_mmap:
            self._idx_map = _map(self.idx_path)
            self._offsets = np.frombuffer(self._idx_map, dtype="<i8", count=n + 1, offset=HEADER_SIZE)
            self._bin_map = _map(self.bin_path) if T else None
            if T:
                self._tokens = np.frombuffer(self._bin_map, dtype=self._dtype, count=T, offset=0)
                self._mask = np.frombuffer(self._bin_map, dtype=np.uint8, count=T,
                                           offset=self._mask_offset)
            first, last = int(self._offsets[0]), int(self._offsets[n])
        else:
            self._idx_fd = os.open(self.idx_path, os.O_RDONLY)
            self._fds.append(self._idx_fd)
            self._bin_fd = os.open(self.bin_path, os.O_RDONLY)
            self._fds.append(self._bin_fd)
            first = int(self._offset_pair(0)[0]) if n else 0
            last = int(self._offset_pair(n - 1)[1]) if n else 0
        if first != 0 or last != T:
            bad(self.idx_path, f"offsets run from {first} to {last}, expected 0 to {T} (corrupted)")

    def arrays(self):
        """``(tokens, loss mask)`` of the whole split, concatenated in sample order, as
        read-only memory-mapped arrays (``mmap=True`` only; None for an empty split)."""
        if not self.use_mmap:
            raise ValueError("IndexedSplit.arrays() needs mmap=True")
        return self._tokens, self._mask

    def _pread(self, fd: int, path: Path, nbytes: int, offset: int) -> bytes:
        b = os.pread(fd, nbytes, offset)
        if len(b) != nbytes:
            self._bad(path, f"short read ({len(b)} of {nbytes} bytes at offset {offset}): the file "
                            f"was truncated after it was opened")
        return b

    def _offset_pair(self, i: int) -> np.ndarray:
        return np.frombuffer(self._pread(self._idx_fd, self.idx_path, 16, HEADER_SIZE + 8 * i), dtype="<i8")

    def __getstate__(self):
        return {"dir": self.dir, "split": self.split, "vocab_size": self.vocab_size, "mmap": self.use_mmap}

    def __setstate__(self, state):
        self.__init__(state["dir"], state["split"], state["vocab_size"], state["mmap"])

    def __len__(self) -> int:
        return self._n

    def _bounds(self, i: int) -> tuple[int, int]:
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        if self._offsets is not None:
            s, e = int(self._offsets[i]), int(self._offsets[i + 1])
        else:
            s, e = (int(x) for x in self._offset_pair(i))
        if not 0 <= s < e <= self._T:
            raise DatasetFormatError(f"{self.idx_path}: sample {i} has offsets {s}..{e} outside "
                                     f"[0, {self._T}] (corrupted); re-run tools/prepare_data.py")
        return s, e

    def token_ids(self, i: int) -> np.ndarray:
        """Sample ``i``'s ids in their stored dtype (a view when memory-mapped)."""
        s, e = self._bounds(int(i))
        if self._tokens is not None:
            return self._tokens[s:e]
        k = self._dtype.itemsize
        return np.frombuffer(self._pread(self._bin_fd, self.bin_path, (e - s) * k, s * k), dtype=self._dtype)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self._bounds(int(i))
        if self._tokens is not None:
            return self._tokens[s:e].astype(np.int64), self._mask[s:e].astype(np.int64)
        k = self._dtype.itemsize
        ids = np.frombuffer(self._pread(self._bin_fd, self.bin_path, (e - s) * k, s * k), dtype=self._dtype)
        mask = np.frombuffer(self._pread(self._bin_fd, self.bin_path, e - s, self._mask_offset + s),
                             dtype=np.uint8)
        return ids.astype(np.int64), mask.astype(np.int64)

    def offsets(self) -> np.ndarray:
        """All ``n + 1`` offsets (read on demand: 8 bytes per sample)."""
        if self._offsets is not None:
            return self._offsets
        return np.fromfile(self.idx_path, dtype="<i8", count=self._n + 1, offset=HEADER_SIZE)

    def lengths(self) -> Lengths:
        return Lengths(np.diff(self.offsets()))

    def close(self) -> None:
        self._offsets = self._tokens = self._mask = None
        self._idx_map = self._bin_map = None
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _map(path: Path):
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def verify_split(directory, split: str) -> None:
    """The full O(data) check: sha256 of ``.bin`` against the header, monotone offsets."""
    r = IndexedSplit(directory, split)
    sha = hashlib.sha256()
    with open(r.bin_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_COPY_CHUNK), b""):
            sha.update(chunk)
    if sha.hexdigest() != r.header["bin_sha256"]:
        raise DatasetFormatError(f"{r.bin_path}: sha256 mismatch (corrupted); re-run tools/prepare_data.py")
    if r._n and not (np.diff(r.offsets()) > 0).all():
        raise DatasetFormatError(f"{r.idx_path}: offsets are not increasing (corrupted)")


def convert_jsonl(data_dir, splits=("train", "valid")) -> dict:
    """Add ``.bin``/``.idx`` files to a jsonl-only prepared dataset (one written before this
    format existed) and record them in its ``meta.json``; the jsonl files stay as they are.
    Returns the storage records per converted split. Also ``python -m
    megaspark.data.indexed DATA_DIR``."""
    import tempfile

    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    vocab = max(int(meta.get("model_vocab_size") or 0), int(meta.get("tokenizer_vocab_size") or 0))
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=data_dir))
    infos = {}
    try:
        for split in splits:
            src = data_dir / f"{split}.jsonl"
            if not src.is_file():
                continue
            w = SplitWriter(tmp, split, vocab, jsonl=False)
            try:
                with open(src, encoding="utf-8") as fh:
                    for line_no, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        try:
                            rec = json.loads(line)
                            w.add(rec["input_ids"], rec["loss_mask"])
                        except (ValueError, KeyError, TypeError) as e:
                            raise DataError(str(e), line_no, str(src)) from None
                infos[split] = {**w.finalize(), "jsonl_bytes": src.stat().st_size}
            except BaseException:
                w.abort()
                raise
        if not infos:
            raise FileNotFoundError(f"{data_dir}: no train.jsonl or valid.jsonl to convert")
        for split in infos:  # .bin first, .idx (which makes the split indexed) last
            os.replace(tmp / f"{split}.bin", bin_path(data_dir, split))
            os.replace(tmp / f"{split}.idx", idx_path(data_dir, split))
        storage = storage_meta({**(meta.get("storage") or {}).get("splits", {}), **infos})
        new_meta = json.dumps({**meta, "storage": storage}, indent=2, sort_keys=True) + "\n"
        (tmp / "meta.json").write_text(new_meta)
        os.replace(tmp / "meta.json", meta_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return infos


__all__ = ["FORMAT_NAME", "VERSION", "SplitWriter", "write_split", "storage_meta", "IndexedSplit",
           "Lengths", "DatasetFormatError", "verify_split", "has_indexed", "idx_path", "bin_path",
           "convert_jsonl"]


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m megaspark.data.indexed DATA_DIR   (add .bin/.idx files to a "
                 "jsonl-only prepared dataset)")
    for name, info in convert_jsonl(sys.argv[1]).items():
        print(f"{sys.argv[1]}: {name}: {info['num_samples']} samples, {info['num_tokens']} tokens -> "
              f"{name}.bin ({info['bin_bytes']} bytes), {name}.idx")
