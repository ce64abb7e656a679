"""The offline hidden-states cache: its on-disk format and the provider that reads it
(``--target-backend offline --hidden-states-dir DIR``, DESIGN.md §3).

``tools/precompute_hidden_states.py`` runs the frozen target once over a prepared
dataset and writes, per split, shards of ``samples_per_shard`` consecutive samples::

    DIR/manifest.json                         what the cache is (see below), written last
    DIR/cache_config.json                     the same header, written first (resume check)
    DIR/train-00000-of-00004.safetensors      samples [0, 256) of the train split
    DIR/train-00000-of-00004.safetensors.json its record: range, tokens, bytes, sha256
    ...

Each shard is a plain safetensors file (``safe_open`` reads it) with four tensors, the
samples stored back to back at their own lengths (no padding)::

    offsets            I64 [n + 1]    sample j occupies rows offsets[j]:offsets[j+1]
    aux_hidden_states  BF16|F32 [T, L*H]  tapped layers, concatenated in id order
    last_hidden_states BF16|F32 [T, H]    post-final-norm last hidden state
    input_ids          I32 [T]        the tokens the states belong to (verified on read)

``manifest.json`` (``schema_version`` :data:`SCHEMA_VERSION`) records the target (name,
model type, :meth:`TargetProvider.fingerprint`, layer ids, hidden size, vocabulary), the
storage dtype, the dataset (its directory and :func:`dataset_hash`: meta.json, sample
counts and the bytes of every split file) and, per complete split, the shard list with
index ranges, token counts, sizes and sha256 checksums. A reader refuses a cache whose
schema, fingerprint, layer ids, hidden size or dataset do not match the run.

**Which lookup should the trainer use?** :meth:`OfflineTargetProvider.compute` is a
drop-in for the online providers: it receives only the padded token ids (as
``megaspark/training/batches.py`` passes them) and finds every row by a sha1 of its ids
without the trailing padding, then checks the cached ids token by token. It works with
the trainer unchanged. :meth:`OfflineTargetProvider.compute_for_samples` takes the
dataset indices and split directly (no hashing, no ambiguity); use it if the micro-batch
ever carries its dataset indices (``MicroBatch.stream_positions`` are *stream* positions,
not dataset indices).

Positions after a sample's end (padding) are zeros. The online HF provider, run without
an attention mask, returns the target's states *on the pad tokens* there; the draft
never reads them (its context is causal and ends at the anchor, and the losses weight
positions past a sample's end by zero), so training gives the same losses.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from megaspark.data.dataset import SPLITS
from megaspark.fileio import atomic_write_text, file_sha256

from .base import TargetOutput, TargetProvider, resolve_layer_ids
from .checkpoint import TargetCheckpoint

SCHEMA_VERSION = 1
FORMAT_NAME = "megaspark-hidden-states"
FLAG = "--hidden-states-dir"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "cache_config.json"

#: storage dtype names (``--dtype``) -> torch dtype, and torch dtype -> safetensors code
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_ST_CODES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int32: "I32", torch.int64: "I64"}
_ST_TORCH = {v: k for k, v in _ST_CODES.items()}
# Header fields that must be equal for shards written by different runs to be mixed.
RESUME_KEYS = ("format", "schema_version", "target_fingerprint", "layer_ids", "hidden_size",
               "dtype", "dataset_hash", "samples_per_shard", "target_backend", "target_dtype")


class HiddenStatesCacheError(ValueError):
    """An offline cache that is missing, incomplete, corrupt or made for another run."""


# ---------------------------------------------------------------------------------------
# Dataset identity and token-id keys
# ---------------------------------------------------------------------------------------

def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from fh


def dataset_hash(data_dir) -> tuple[str, dict]:
    """``(sha256 hex, {split: num_samples})`` of a prepared dataset directory.

    Covers ``meta.json`` and, for each split, the bytes of every file present: the
    ``.jsonl`` (with its number of samples, non-empty lines) and the memory-mapped
    ``.idx``/``.bin`` that training reads — a dataset re-prepared or edited gets another
    hash. A jsonl-only dataset (written before the memory-mapped format) hashes as it
    always did. The counts are those :class:`~megaspark.data.dataset.PreparedDataset`
    sees (the ``.idx`` header when present, else the jsonl's lines).
    """
    from megaspark.data import indexed

    data_dir = Path(data_dir)
    meta = data_dir / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: '{data_dir}' is not a prepared dataset")
    h = hashlib.sha256(b"megaspark-dataset-v1\n")
    h.update(hashlib.sha256(meta.read_bytes()).digest())
    counts = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            fh = hashlib.sha256()
            n = 0
            for line in _lines(path):
                fh.update(line)
                n += bool(line.strip())
            counts[split] = n
            h.update(f"{split}:{n}:{fh.hexdigest()}\n".encode())
        if indexed.has_indexed(data_dir, split):
            n = len(indexed.IndexedSplit(data_dir, split))  # checks sizes and header
            digests = [file_sha256(indexed.idx_path(data_dir, split)),
                       file_sha256(indexed.bin_path(data_dir, split))]
            counts[split] = n
            h.update(f"{split}.indexed:{n}:{digests[0]}:{digests[1]}\n".encode())
    if not counts:
        raise FileNotFoundError(f"'{data_dir}' has no split (train/valid .jsonl or .idx/.bin)")
    return h.hexdigest(), counts


def iter_token_ids(data_dir, split: str) -> Iterator[list]:
    """The ``input_ids`` of every sample of a split, in dataset-index order (from the
    memory-mapped ``.bin`` when present, as training reads them, else the ``.jsonl``)."""
    from megaspark.data import indexed

    if indexed.has_indexed(data_dir, split):
        r = indexed.IndexedSplit(data_dir, split, mmap=True)
        try:
            for i in range(len(r)):
                yield r.token_ids(i).tolist()
        finally:
            r.close()
        return
    for line in _lines(Path(data_dir) / f"{split}.jsonl"):
        if line.strip():
            yield json.loads(line)["input_ids"]


def dataset_pad_id(meta: dict) -> int:
    """The padding id the trainer uses (same rule as ``PreparedDataset.pad_id``)."""
    for key in ("pad_token_id", "eos_token_id"):
        if meta.get(key) is not None:
            return int(meta[key])
    return 0


def token_key(ids) -> bytes:
    """sha1 of a token-id sequence (as little-endian int64)."""
    return hashlib.sha1(np.asarray(ids, dtype="<i8").tobytes()).digest()


def strip_trailing(ids: list, pad_id: int) -> list:
    n = len(ids)
    while n and ids[n - 1] == pad_id:
        n -= 1
    return ids[:n]


# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------

def shard_ranges(num_samples: int, samples_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(s + samples_per_shard, num_samples)) for s in range(0, num_samples, samples_per_shard)]


def shard_file_name(split: str, k: int, n: int) -> str:
    return f"{split}-{k:05d}-of-{n:05d}.safetensors"


def sidecar_path(shard_path) -> Path:
    return Path(str(shard_path) + ".json")


class ShardWriter:
    """Streams one shard into a safetensors file without holding it in memory.

    The sample lengths are known before any forward, so the header (every tensor's
    shape and byte range) is written first and each sample's rows go straight to their
    place, in whatever order the batches finish. ``path`` should be a temporary name;
    the caller renames it once :meth:`close` returns.
    """

    def __init__(self, path, lengths: Sequence[int], aux_width: int, hidden_size: int,
                 dtype: torch.dtype, metadata: Optional[dict] = None):
        self.path = Path(path)
        self.lengths = [int(n) for n in lengths]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        T = int(self.offsets[-1])
        self.dtype = dtype
        self.item = torch.empty((), dtype=dtype).element_size()
        self.aux_width, self.hidden_size = int(aux_width), int(hidden_size)
        layout = [("offsets", torch.int64, [len(self.lengths) + 1]),
                  ("aux_hidden_states", dtype, [T, self.aux_width]),
                  ("last_hidden_states", dtype, [T, self.hidden_size]),
                  ("input_ids", torch.int32, [T])]
        header, pos, self.base = {}, 0, {}
        for name, dt, shape in layout:
            size = int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
            header[name] = {"dtype": _ST_CODES[dt], "shape": shape, "data_offsets": [pos, pos + size]}
            self.base[name] = pos
            pos += size
        header["__metadata__"] = {k: str(v) for k, v in (metadata or {}).items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
        self.data_start = 8 + len(blob)
        self.fh = open(self.path, "wb")
        self.fh.write(len(blob).to_bytes(8, "little"))
        self.fh.write(blob)
        self.fh.truncate(self.data_start + pos)
        self._write("offsets", 0, torch.from_numpy(self.offsets))
        self.written = [False] * len(self.lengths)

    def _write(self, name: str, byte_offset: int, t: Tensor) -> None:
        self.fh.seek(self.data_start + self.base[name] + byte_offset)
        self.fh.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())

    def write_sample(self, j: int, input_ids: Tensor, aux: Tensor, last: Tensor) -> None:
        """Sample ``j`` of the shard: ``input_ids [n]``, ``aux [n, L*H]``, ``last [n, H]``."""
        n, row0 = self.lengths[j], int(self.offsets[j])
        if tuple(aux.shape) != (n, self.aux_width) or tuple(last.shape) != (n, self.hidden_size) \
                or tuple(input_ids.shape) != (n,):
            raise ValueError(f"sample {j}: expected {n} rows of {self.aux_width}/{self.hidden_size} "
                             f"features, got {tuple(input_ids.shape)}, {tuple(aux.shape)}, "
                             f"{tuple(last.shape)}")
        self._write("input_ids", row0 * 4, input_ids.to(torch.int32))
        self._write("aux_hidden_states", row0 * self.aux_width * self.item, aux.to(self.dtype))
        self._write("last_hidden_states", row0 * self.hidden_size * self.item, last.to(self.dtype))
        self.written[j] = True

    def close(self) -> None:
        missing = [j for j, w in enumerate(self.written) if not w]
        if missing:
            self.fh.close()
            raise RuntimeError(f"shard {self.path} closed with samples {missing[:8]} not written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------

def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def read_manifest(cache_dir) -> dict:
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_FILE
    if not path.is_file():
        if (cache_dir / CONFIG_FILE).is_file():
            why = ("it is incomplete (no manifest.json yet: some shards are missing). Rerun "
                   "tools/precompute_hidden_states.py with the same arguments to finish it")
        elif cache_dir.is_dir():
            why = "it is not a hidden-states cache (no manifest.json)"
        else:
            why = "the directory does not exist"
        raise HiddenStatesCacheError(
            f"{FLAG} {cache_dir}: {why}; create the cache with tools/precompute_hidden_states.py")
    try:
        return read_json(path)
    except json.JSONDecodeError as e:
        raise HiddenStatesCacheError(f"{FLAG} {cache_dir}: manifest.json is not valid JSON ({e})") from None


def check_compatible(manifest: dict, *, cache_dir, fingerprint: str, layer_ids: Sequence[int],
                     hidden_size: int, dataset_hash_: Optional[str], splits: Iterable[str] = ()) -> None:
    """Refuse a cache made for another target, layer selection or dataset (raises
    :class:`HiddenStatesCacheError` naming ``--hidden-states-dir``)."""
    where = f"{FLAG} {cache_dir}"
    redo = "recompute it with tools/precompute_hidden_states.py for this run"
    if manifest.get("format") != FORMAT_NAME:
        raise HiddenStatesCacheError(f"{where} is not a megaspark hidden-states cache "
                                     f"(format {manifest.get('format')!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise HiddenStatesCacheError(
            f"{where} has schema version {manifest.get('schema_version')}, this megaspark reads "
            f"version {SCHEMA_VERSION}; {redo}")
    if [int(k) for k in manifest.get("layer_ids", [])] != [int(k) for k in layer_ids]:
        raise HiddenStatesCacheError(
            f"{where} holds target layer ids {manifest.get('layer_ids')}, but the run taps "
            f"{list(layer_ids)}; pass --target-layer-ids {' '.join(map(str, manifest.get('layer_ids', [])))} "
            f"or {redo}")
    if int(manifest.get("hidden_size", -1)) != int(hidden_size):
        raise HiddenStatesCacheError(
            f"{where} holds hidden size {manifest.get('hidden_size')}, the target has {hidden_size}; "
            f"it was made for another target ({manifest.get('target')}); {redo}")
    if manifest.get("target_fingerprint") != fingerprint:
        raise HiddenStatesCacheError(
            f"{where} was computed for a different target config (fingerprint "
            f"{manifest.get('target_fingerprint')} of {manifest.get('target')}, the run's target has "
            f"{fingerprint}); check --target-model or {redo}")
    if dataset_hash_ is not None and manifest.get("dataset", {}).get("hash") != dataset_hash_:
        raise HiddenStatesCacheError(
            f"{where} was computed for another dataset (hash {manifest.get('dataset', {}).get('hash')} "
            f"of {manifest.get('dataset', {}).get('dir')}; the run's --data-path has {dataset_hash_}); "
            f"the data was changed or re-prepared: {redo}")
    for split in splits:
        if split not in manifest.get("splits", {}):
            raise HiddenStatesCacheError(
                f"{where} has no complete '{split}' split (it has {sorted(manifest.get('splits', {}))}); "
                f"run tools/precompute_hidden_states.py --split {split} (or without --split) to add it")


# ---------------------------------------------------------------------------------------
# Frozen embedding / LM head straight from the target's safetensors
# ---------------------------------------------------------------------------------------

def load_target_weight(path: str, which: str, hf_config, full_config=None) -> Tensor:
    """The target's ``"embedding"`` or ``"lm_head"`` as an fp32 ``[V, H]`` tensor, read from
    its safetensors alone (the model is not built). A tied head is the embedding."""
    return TargetCheckpoint(path).weight(which, hf_config, full_config)


def load_target_embeddings(path: str, hf_config, full_config=None) -> tuple[Tensor, Tensor]:
    """``(embedding, lm_head)``, see :func:`load_target_weight`."""
    return (load_target_weight(path, "embedding", hf_config, full_config),
            load_target_weight(path, "lm_head", hf_config, full_config))


# ---------------------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------------------

class OfflineTargetProvider(TargetProvider):
    """Target features read from a cache written by ``tools/precompute_hidden_states.py``.

    Args:
        cache_dir: the cache (``--hidden-states-dir``).
        target: the target it was computed with — a local HF directory or ``builtin:<name>``
            (only its config, tokenizer, embedding and LM head are read; the model is not
            built), or an already built :class:`TargetProvider` (its config, tokenizer and
            weights are used).
        layer_ids: the run's tapped layers; ``None`` uses the default rule (like
            :class:`~megaspark.targets.hf.HFTargetProvider`).
        dataset_dir: the prepared dataset the run trains on (``--data-path``); its hash must
            equal the cache's. ``None`` uses the directory recorded in the cache.
        splits: splits that must be cached; default: every split the dataset has.
        device, dtype: where and in which dtype features are returned (default cpu, fp32;
            a bf16 cache is upcast exactly).
        verify_checksums: sha256 every shard now (slow for a big cache; sizes are always
            checked).
        max_open_shards: shard files kept open (memory-mapped) at once.

    Raises :class:`HiddenStatesCacheError` (a ``ValueError``) naming ``--hidden-states-dir``
    when the cache is incomplete or does not match the target, layer ids or dataset.
    """

    last_hidden_is_post_norm = True

    def __init__(self, cache_dir, target, layer_ids: Optional[Sequence[int]] = None,
                 dataset_dir=None, *, splits: Optional[Sequence[str]] = None, device="cpu",
                 dtype: torch.dtype = torch.float32, verify_checksums: bool = False,
                 max_open_shards: int = 64):
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(self.cache_dir)
        self._source = None
        self._full_config = None
        if isinstance(target, TargetProvider):
            self._source = target
            self.name = getattr(target, "name", type(target).__name__)
            self.path = getattr(target, "path", None)
            self.hf_config = target.hf_config
            self.tokenizer = getattr(target, "tokenizer", None)
        else:
            from .builtin import resolve_target
            from .hf import load_config_offline, load_tokenizer_offline

            self.name = str(target)
            self.path = resolve_target(target)
            self._full_config = load_config_offline(self.path)
            self.hf_config = self._full_config.get_text_config()
            self.tokenizer = load_tokenizer_offline(self.path)
        self.layer_ids = resolve_layer_ids(layer_ids, self.num_layers)
        self.device = torch.device(device)
        self.dtype = dtype

        if dataset_dir is None:
            dataset_dir = self.manifest.get("dataset", {}).get("dir")
        self.dataset_dir = Path(dataset_dir)
        ds_hash, counts = dataset_hash(self.dataset_dir)
        self.splits = list(splits) if splits is not None else [s for s in SPLITS if s in counts]
        check_compatible(self.manifest, cache_dir=self.cache_dir, fingerprint=self.fingerprint(),
                         layer_ids=self.layer_ids, hidden_size=self.hidden_size,
                         dataset_hash_=ds_hash, splits=self.splits)
        self.samples_per_shard = int(self.manifest["samples_per_shard"])
        self.cache_dtype = DTYPES[self.manifest["dtype"]]
        self.pad_id = dataset_pad_id(json.loads((self.dataset_dir / "meta.json").read_text()))
        self._shards: dict[str, list[dict]] = {}
        for split, rec in self.manifest["splits"].items():
            if rec["num_samples"] != counts.get(split):
                raise HiddenStatesCacheError(
                    f"{FLAG} {self.cache_dir}: split '{split}' has {rec['num_samples']} samples, the "
                    f"dataset {counts.get(split)}")
            shards = rec["shards"]
            for k, (s, e) in enumerate(shard_ranges(rec["num_samples"], self.samples_per_shard)):
                sh = shards[k] if k < len(shards) else None
                if sh is None or (sh["start"], sh["end"]) != (s, e):
                    raise HiddenStatesCacheError(
                        f"{FLAG} {self.cache_dir}: the shard list of '{split}' does not cover samples "
                        f"[{s}, {e}); the manifest is damaged, rerun tools/precompute_hidden_states.py")
                f = self.cache_dir / sh["file"]
                if not f.is_file() or f.stat().st_size != sh["bytes"]:
                    raise HiddenStatesCacheError(
                        f"{FLAG} {self.cache_dir}: shard {sh['file']} is missing or has the wrong size; "
                        f"rerun tools/precompute_hidden_states.py with the same arguments to redo it")
                if verify_checksums and file_sha256(f) != sh["sha256"]:
                    raise HiddenStatesCacheError(
                        f"{FLAG} {self.cache_dir}: shard {sh['file']} fails its sha256 checksum; delete "
                        f"it and rerun tools/precompute_hidden_states.py to redo it")
            self._shards[split] = shards
        self._open: OrderedDict = OrderedDict()
        self.max_open_shards = max(1, int(max_open_shards))
        self._index = None            # stripped-ids key -> packed (split, index), built lazily
        self._alternatives = {}       # key -> all packed entries, when several samples share it
        self._lengths: dict = {}
        self._digests: dict = {}
        self._trunc_index: dict = {}  # seq_length -> {key of ids[:S] stripped: packed}

    # -- reading -----------------------------------------------------------------------
    def _handle(self, split: str, k: int):
        key = (split, k)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        from safetensors import safe_open

        path = self.cache_dir / self._shards[split][k]["file"]
        f = safe_open(str(path), framework="pt")
        offsets = f.get_tensor("offsets").tolist()
        self._open[key] = (f, offsets)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return self._open[key]

    def get_sample(self, split: str, index: int, max_len: Optional[int] = None):
        """``(input_ids [n], aux [n, L*H], last [n, H])`` of one cached sample, in the
        cache's dtype (``n`` = its length, or ``max_len`` if shorter)."""
        if split not in self._shards:
            raise HiddenStatesCacheError(f"{FLAG} {self.cache_dir}: split '{split}' is not cached")
        n_samples = self.manifest["splits"][split]["num_samples"]
        if not 0 <= index < n_samples:
            raise IndexError(f"sample {index} is out of range for split '{split}' ({n_samples} samples)")
        k, j = divmod(int(index), self.samples_per_shard)
        f, offsets = self._handle(split, k)
        a, b = offsets[j], offsets[j + 1]
        if max_len is not None:
            b = min(b, a + int(max_len))
        return (f.get_slice("input_ids")[a:b].long(), f.get_slice("aux_hidden_states")[a:b],
                f.get_slice("last_hidden_states")[a:b])

    def _assemble(self, rows: list, S: int) -> TargetOutput:
        b = len(rows)
        aux = torch.zeros(b, S, self.aux_hidden_size, dtype=self.dtype)
        last = torch.zeros(b, S, self.hidden_size, dtype=self.dtype)
        for i, (_, a, l) in enumerate(rows):
            n = a.shape[0]
            aux[i, :n] = a.to(self.dtype)
            last[i, :n] = l.to(self.dtype)
        return TargetOutput(aux_hidden_states=aux.to(self.device), last_hidden_states=last.to(self.device))

    @torch.no_grad()
    def compute_for_samples(self, indices: Sequence[int], split: str = "train",
                            seq_length: Optional[int] = None) -> TargetOutput:
        """Features of dataset samples ``indices`` of ``split``, laid out like
        :func:`megaspark.data.dataset.collate` lays out their ids: ``[b, seq_length]``, right
        padded with zeros, longer samples truncated (``None``: pad to the longest)."""
        self._build_index()
        rows = []
        for idx in indices:
            ids, aux, last = self.get_sample(split, int(idx))
            if token_key(ids.tolist()) != self._digests[split][int(idx)]:
                raise HiddenStatesCacheError(
                    f"{FLAG} {self.cache_dir}: the cached token ids of {split} sample {idx} differ from "
                    f"the dataset's; the cache is damaged, recompute it")
            rows.append((ids, aux, last))
        if not rows:
            raise ValueError("compute_for_samples needs at least one index")
        S = int(seq_length) if seq_length is not None else max(r[0].numel() for r in rows)
        return self._assemble([(i[:S], a[:S], l[:S]) for i, a, l in rows], S)

    @torch.no_grad()
    def compute(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> TargetOutput:
        """Drop-in for the online providers: finds each row of the padded ``input_ids``
        ``[b, S]`` in the cache by a sha1 of its ids without trailing padding, verifies the
        cached ids and returns the features (zeros after each sample's end). Raises
        :class:`HiddenStatesCacheError` for a row that is not in the cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        self._build_index()
        S = input_ids.shape[1]
        ids_rows = input_ids.detach().cpu().tolist()
        mask_lens = None
        if attention_mask is not None:
            mask_lens = attention_mask.detach().cpu().long().sum(-1).tolist()
        rows = []
        for r, ids in enumerate(ids_rows):
            real = ids if mask_lens is None else ids[: int(mask_lens[r])]
            split, idx = self._lookup(real, S, None if mask_lens is None else int(mask_lens[r]))
            if split is None:
                preview = strip_trailing(real, self.pad_id)
                raise HiddenStatesCacheError(
                    f"{FLAG} {self.cache_dir}: row {r} of the micro-batch ({len(preview)} tokens before "
                    f"padding, starting {preview[:8]}) is not in the cache, which was computed for "
                    f"{self.dataset_dir} (splits {sorted(self._shards)}); the batch does not come from "
                    f"that dataset")
            n = self._lengths[split][idx]
            m = min(n, S) if mask_lens is None else min(n, int(mask_lens[r]))
            cids, aux, last = self.get_sample(split, idx, max_len=m)
            if cids.tolist() != ids[:m]:
                raise HiddenStatesCacheError(
                    f"{FLAG} {self.cache_dir}: row {r} matched {split} sample {idx} by hash but the cached "
                    f"token ids differ; the cache is damaged, recompute it")
            rows.append((cids, aux, last))
        return self._assemble(rows, S)

    # -- the token-id index ------------------------------------------------------------
    @staticmethod
    def _pack(split: str, idx: int) -> int:
        return (SPLITS.index(split) << 40) | idx

    @staticmethod
    def _unpack(v: int) -> tuple[str, int]:
        return SPLITS[v >> 40], v & ((1 << 40) - 1)

    def _build_index(self) -> None:
        if self._index is not None:
            return
        index, alts = {}, {}
        for split in self._shards:
            lengths, digests = [], []
            for i, ids in enumerate(iter_token_ids(self.dataset_dir, split)):
                lengths.append(len(ids))
                digests.append(token_key(ids))
                key = token_key(strip_trailing(ids, self.pad_id))
                v = self._pack(split, i)
                if key in index:
                    alts.setdefault(key, [index[key]]).append(v)
                    if len(ids) > self._len_of(index[key], lengths):
                        index[key] = v
                else:
                    index[key] = v
            self._lengths[split] = lengths
            self._digests[split] = digests
        self._index, self._alternatives = index, alts

    def _len_of(self, packed: int, current_lengths: Optional[list] = None) -> int:
        split, idx = self._unpack(packed)
        lengths = self._lengths.get(split, current_lengths)
        return lengths[idx]

    def _truncated_index(self, S: int) -> dict:
        """Keys of samples longer than ``S`` as the collate step truncates them."""
        if S not in self._trunc_index:
            idx = {}
            for split in self._shards:
                if max(self._lengths[split], default=0) <= S:
                    continue
                for i, ids in enumerate(iter_token_ids(self.dataset_dir, split)):
                    if len(ids) > S:
                        idx.setdefault(token_key(strip_trailing(ids[:S], self.pad_id)), self._pack(split, i))
            self._trunc_index[S] = idx
        return self._trunc_index[S]

    def _lookup(self, ids: list, S: int, n_real: Optional[int]):
        key = token_key(strip_trailing(ids, self.pad_id))
        v = self._index.get(key)
        if v is not None and key in self._alternatives and n_real is not None:
            exact = [a for a in self._alternatives[key] if self._len_of(a) == n_real]
            v = exact[0] if exact else v
        if v is None and len(ids) >= S:
            v = self._truncated_index(S).get(key)
        return (None, None) if v is None else self._unpack(v)

    # -- the rest of the provider interface ---------------------------------------------
    # Read from the checkpoint on every call and not kept: the draft copies them once.
    def embedding_weight(self) -> Tensor:
        if self._source is not None:
            return self._source.embedding_weight()
        return load_target_weight(self.path, "embedding", self.hf_config, self._full_config)

    def lm_head_weight(self) -> Tensor:
        if self._source is not None:
            return self._source.lm_head_weight()
        return load_target_weight(self.path, "lm_head", self.hf_config, self._full_config)

    def final_norm(self):
        return None  # the cache holds post-norm last hidden states

    def close(self) -> None:
        self._open.clear()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"OfflineTargetProvider({str(self.cache_dir)!r}, target={self.name!r}, "
                f"layer_ids={self.layer_ids}, dtype={m['dtype']}, splits="
                f"{ {s: r['num_samples'] for s, r in m['splits'].items()} })")


def build_offline_target(spec, device="cpu") -> OfflineTargetProvider:
    """What start-up calls for ``--target-backend offline`` (a :class:`~.base.TargetSpec`)."""
    return OfflineTargetProvider(spec.hidden_states_dir, spec.path, layer_ids=list(spec.layer_ids),
                                 dataset_dir=spec.data_path, device=device, dtype=spec.dtype)


__all__ = [
    "OfflineTargetProvider", "HiddenStatesCacheError", "ShardWriter", "SCHEMA_VERSION", "FORMAT_NAME",
    "MANIFEST_FILE", "CONFIG_FILE", "DTYPES", "RESUME_KEYS", "dataset_hash", "iter_token_ids",
    "dataset_pad_id", "token_key", "strip_trailing", "shard_ranges", "shard_file_name",
    "sidecar_path", "file_sha256", "atomic_write_text", "read_manifest", "check_compatible",
    "load_target_weight", "load_target_embeddings", "build_offline_target",
]
