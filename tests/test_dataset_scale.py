"""Data at scale: the memory-mapped prepared-dataset format, its refusals, the cached
sampler (same stream as before) and the length-grouped order, and the benchmark tool."""
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megaspark.data import indexed
from megaspark.data.chat import DataError
from megaspark.data.dataset import BatchSampler, PreparedDataset, epoch_permutation, has_split
from megaspark.data.indexed import DatasetFormatError, verify_split
from megaspark.targets.offline import dataset_hash, iter_token_ids
from tests.tiny_models import single_thread

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def _load_prepare_data():
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir):
    """A dataset made by tools/prepare_data.py (both splits, varied lengths)."""
    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and then it ran to see the dog who was very happy today".split()
    with open(root / "chats.jsonl", "w") as fh:
        for _ in range(40):
            q = " ".join(rng.choice(words, size=rng.integers(1, 6)))
            a = " ".join(rng.choice(words, size=rng.integers(1, 30)))
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": a}]}) + "\n")
    out = root / "data"
    assert _load_prepare_data().main([
        "--input", str(root / "chats.jsonl"), "--target-model", tiny_llama_dir, "--output", str(out),
        "--max-length", "256", "--valid-fraction", "0.25", "--min-supervised-tokens", "1", "--quiet"]) == 0
    return out


def _jsonl_only(src: Path, dst: Path) -> Path:
    """A copy as older versions wrote it: jsonl + meta.json only."""
    dst.mkdir()
    for name in ("meta.json", "train.jsonl", "valid.jsonl"):
        shutil.copy(src / name, dst / name)
    return dst


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ format

def test_indexed_equals_jsonl_every_sample(prepared, tmp_path):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["storage"]["format"] == indexed.FORMAT_NAME and meta["storage"]["version"] == indexed.VERSION
    old_dir = _jsonl_only(prepared, tmp_path / "old")
    for split in ("train", "valid"):
        assert (prepared / f"{split}.idx").is_file() and (prepared / f"{split}.bin").is_file()
        new, old = PreparedDataset(prepared, split), PreparedDataset(old_dir, split)
        assert new.format == "indexed" and old.format == "jsonl"
        assert len(new) == len(old) == meta["counts"][split] > 0
        assert new.pad_id == old.pad_id
        for i in range(len(new)):
            a, b = new[i], old[i]
            assert a["input_ids"].dtype == a["loss_mask"].dtype == torch.long
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert torch.equal(new[-1]["input_ids"], old[-1]["input_ids"])
        with pytest.raises(IndexError):
            new[len(new)]
        # lengths: no per-sample objects, yet comparable to the old list
        assert new.lengths() == old.lengths() == [len(old[i]["input_ids"]) for i in range(len(old))]
        assert np.asarray(new.lengths()).dtype == np.int64 and sum(new.lengths()) == new.lengths().sum()
        assert len(set(new.lengths())) > 3
        # the offline cache's readers see the same samples
        assert list(iter_token_ids(prepared, split)) == list(iter_token_ids(old_dir, split))
        # memory-mapped access gives the same samples as the pread default
        mm = indexed.IndexedSplit(prepared, split, mmap=True)
        for i in range(len(new)):
            assert mm[i][0].tolist() == new[i]["input_ids"].tolist()
        verify_split(prepared, split)
        # picklable (DataLoader workers) without carrying the data
        blob = pickle.dumps(new)
        assert len(blob) < 4096 and torch.equal(pickle.loads(blob)[1]["input_ids"], new[1]["input_ids"])
    assert dataset_hash(prepared)[1] == dataset_hash(old_dir)[1] == {s: meta["counts"][s] for s in ("train", "valid")}
    assert dataset_hash(prepared)[0] != dataset_hash(old_dir)[0]
    assert has_split(prepared, "valid") and has_split(old_dir, "valid") and not has_split(tmp_path, "train")
    # an old jsonl-only dataset converted in place reads like a freshly prepared one
    r = subprocess.run([sys.executable, "-m", "megaspark.data.indexed", str(old_dir)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for split in ("train", "valid"):
        conv, new = PreparedDataset(old_dir, split), PreparedDataset(prepared, split)
        assert conv.format == "indexed" and len(conv) == len(new)
        assert all(torch.equal(conv[i]["input_ids"], new[i]["input_ids"]) and
                   torch.equal(conv[i]["loss_mask"], new[i]["loss_mask"]) for i in range(len(new)))
        assert (old_dir / f"{split}.bin").read_bytes() == (prepared / f"{split}.bin").read_bytes()
    assert json.loads((old_dir / "meta.json").read_text())["storage"] == meta["storage"]
    assert not [p for p in old_dir.iterdir() if p.name.startswith(".")]


def test_writer_validates(tmp_path):
    for bad, pattern in [
        (([1, 2], [1]), "entries"),
        (([1, 200], [1, 1]), r"token id 200 is not an integer in \[0, 100\)"),
        (([1, -1], [1, 1]), "token id -1"),
        (([1, 2], [1, 2]), "not 0 or 1"),
        (([], []), "empty"),
    ]:
        w = indexed.SplitWriter(tmp_path, "train", 100)
        w.add([3, 4], [0, 1])
        with pytest.raises(DataError, match=pattern) as e:
            w.add(*bad)
        assert "train sample 1" in str(e.value)
        w.abort()
    # bulk writing gives the same files as one sample at a time
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rows = [([5, 6, 7], [0, 1, 1]), ([9], [1]), ([1, 2], [0, 0])]
    indexed.write_split(a, "valid", rows, 100)
    w = indexed.SplitWriter(b, "valid", 100)
    w.add_batch([t for r in rows for t in r[0]], [m for r in rows for m in r[1]], [len(r[0]) for r in rows])
    w.finalize()
    for name in ("valid.bin", "valid.idx", "valid.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def _refused(data_dir, file_name, pattern, split="train"):
    with pytest.raises(DatasetFormatError, match=pattern) as e:
        PreparedDataset(data_dir, split)
    assert file_name in str(e.value)
    return e.value


def test_truncated_or_corrupted_files_are_refused(prepared, tmp_path):
    # truncated .bin / .idx, trailing data
    d = _copy(prepared, tmp_path / "tbin")
    raw = (d / "train.bin").read_bytes()
    (d / "train.bin").write_bytes(raw[:-3])
    _refused(d, str(d / "train.bin"), "truncated")
    (d / "train.bin").write_bytes(raw + b"xx")
    _refused(d, str(d / "train.bin"), "trailing data")
    d = _copy(prepared, tmp_path / "tidx")
    raw = (d / "train.idx").read_bytes()
    (d / "train.idx").write_bytes(raw[:-8])
    _refused(d, str(d / "train.idx"), "truncated")
    (d / "train.idx").write_bytes(raw[:40])
    _refused(d, str(d / "train.idx"), "truncated header")
    # header damage: magic, checksum
    (d / "train.idx").write_bytes(b"NOTOURS!" + raw[8:])
    _refused(d, str(d / "train.idx"), "bad magic")
    flipped = bytearray(raw)
    flipped[20] ^= 0x01  # the sample count
    (d / "train.idx").write_bytes(bytes(flipped))
    _refused(d, str(d / "train.idx"), "checksum")
    # offsets damaged: the last one at open, a middle one when that sample is read
    arr = bytearray(raw)
    n = (len(raw) - indexed.HEADER_SIZE) // 8 - 1
    last = indexed.HEADER_SIZE + 8 * n
    arr[last: last + 8] = np.int64(1 << 40).tobytes()
    (d / "train.idx").write_bytes(bytes(arr))
    _refused(d, str(d / "train.idx"), "offsets run from")
    arr = bytearray(raw)
    mid = indexed.HEADER_SIZE + 8 * 2
    arr[mid: mid + 8] = np.int64(-5).tobytes()
    (d / "train.idx").write_bytes(bytes(arr))
    ds = PreparedDataset(d, "train")
    ds[0]
    with pytest.raises(DatasetFormatError, match="sample 1 has offsets"):
        ds[1]
    with pytest.raises(DatasetFormatError, match="not increasing"):
        verify_split(d, "train")
    # same size, flipped byte in the data: only the full check (sha256) notices
    d = _copy(prepared, tmp_path / "flip")
    raw = bytearray((d / "valid.bin").read_bytes())
    raw[0] ^= 0x01
    (d / "valid.bin").write_bytes(bytes(raw))
    PreparedDataset(d, "valid")
    with pytest.raises(DatasetFormatError, match="sha256") as e:
        verify_split(d, "valid")
    assert str(d / "valid.bin") in str(e.value)
    # missing pieces, stale or mismatched files
    d = _copy(prepared, tmp_path / "noidx")
    (d / "train.idx").unlink()
    _refused(d, "train.idx", "missing")
    d = _copy(prepared, tmp_path / "nobin")
    (d / "train.bin").unlink()
    _refused(d, str(d / "train.bin"), "missing")
    d = _copy(prepared, tmp_path / "other")
    shutil.copy(prepared / "valid.bin", d / "train.bin")  # another split's data
    _refused(d, str(d / "train.bin"), "different runs|truncated|trailing")
    d = _copy(prepared, tmp_path / "edited")
    with open(d / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"input_ids": [5, 6], "loss_mask": [0, 1]}) + "\n")
    _refused(d, str(d / "train.jsonl"), "changed after prepare_data")
    d = _copy(prepared, tmp_path / "counts")
    meta = json.loads((d / "meta.json").read_text())
    meta["counts"]["train"] += 1
    (d / "meta.json").write_text(json.dumps(meta))
    _refused(d, str(d / "train.idx"), "meta.json says")
    # the model's vocabulary is smaller than the ids: refused from the header alone
    with pytest.raises(DataError, match=r"not an integer in \[0, 10\)") as e:
        PreparedDataset(prepared, "train", vocab_size=10)
    assert "train.bin" in str(e.value)


# ----------------------------------------------------------------------------- sampler

class _OldBatchSampler:
    """The sampler as it was before the epoch order was cached (the reference stream)."""

    def __init__(self, num_samples, micro_batch_size, dp_rank=0, dp_size=1, seed=0,
                 consumed_samples=0, shuffle=True, num_epochs=None):
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.consumed_samples, self.shuffle, self.num_epochs = consumed_samples, shuffle, num_epochs
        self._perm_cache = {}

    def _epoch_order(self, epoch):
        if not self.shuffle:
            return list(range(self.num_samples))
        if epoch not in self._perm_cache:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            self._perm_cache = {epoch: torch.randperm(self.num_samples, generator=g).tolist()}
        return self._perm_cache[epoch]

    def _stream(self, start, count):
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, self.num_samples)
            order = self._epoch_order(epoch)
            take = min(count - len(out), self.num_samples - offset)
            out.extend(order[offset: offset + take])
            pos += take
        return out

    def __iter__(self):
        pos, G = self.consumed_samples, self.micro_batch_size * self.dp_size
        end = None if self.num_epochs is None else self.num_epochs * self.num_samples
        lo = self.dp_rank * self.micro_batch_size
        while end is None or pos + G <= end:
            chunk = self._stream(pos + lo, self.micro_batch_size)
            pos += G
            yield chunk


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("N", [7, 37, 1000])
def test_sampler_stream_unchanged(N):
    for dp, mbs in [(1, 1), (2, 2), (3, 4), (4, 3)]:
        G = dp * mbs
        for consumed in (0, 5, N - 1, 3 * N + 7):
            for shuffle in (True, False):
                for r in range(dp):
                    kw = dict(seed=11, consumed_samples=consumed, shuffle=shuffle)
                    new = BatchSampler(N, mbs, r, dp, **kw)
                    want = _take(_OldBatchSampler(N, mbs, r, dp, **kw), 2 * N // G + 3)
                    assert _take(new, len(want)) == want
                    assert new.micro_batches_at(consumed, len(want)) == want
        fin = dict(seed=3, num_epochs=2)
        assert list(BatchSampler(N, mbs, dp - 1, dp, **fin)) == list(_OldBatchSampler(N, mbs, dp - 1, dp, **fin))


def test_epoch_permutation_cached_across_samplers(monkeypatch):
    N = 5003
    calls = []
    real = torch.randperm

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr(torch, "randperm", counting)
    first = epoch_permutation(N, 123, 4)
    assert not first.flags.writeable
    for step in range(50):  # as the trainer does: a new sampler per step, seeking
        pos = 4 * N + step * 8
        BatchSampler(N, 4, 1, 2, seed=123, consumed_samples=pos).micro_batches_at(pos, 1)
    assert calls == [N] and epoch_permutation(N, 123, 4) is first


def _plain_and_grouped(lengths, mbs, dp, group, window, seed=5, consumed=0, steps=None):
    N = len(lengths)
    steps = steps or N // (mbs * dp)

    def global_batches(**kw):
        per_rank = [BatchSampler(N, mbs, r, dp, seed=seed, consumed_samples=consumed, **kw)
                    .micro_batches_at(consumed, steps) for r in range(dp)]
        return [sum((per_rank[r][k] for r in range(dp)), []) for k in range(steps)]

    grouped = global_batches(length_grouped=True, lengths=lengths, length_group_size=group,
                             length_group_window=window)
    return global_batches(), grouped


def test_length_grouped_order():
    rng = np.random.default_rng(0)
    N = 2000
    lengths = rng.integers(16, 512, size=N)
    mbs, dp, window = 4, 2, 8
    group = mbs * dp
    plain, grouped = _plain_and_grouped(lengths, mbs, dp, group, window)
    flat_plain = [i for b in plain for i in b]
    flat_grouped = [i for b in grouped for i in b]
    W = group * window
    for a in range(0, len(flat_plain), W):  # a permutation of each window of the stream
        assert sorted(flat_grouped[a: a + W]) == sorted(flat_plain[a: a + W])
    assert flat_grouped != flat_plain
    # deterministic, and a later epoch is still a full permutation
    assert _plain_and_grouped(lengths, mbs, dp, group, window)[1] == grouped
    s = BatchSampler(N, 5, 0, 1, seed=5, length_grouped=True, lengths=lengths, length_group_size=8,
                     length_group_window=window)
    assert sorted(i for b in s.micro_batches_at(3 * N, N // 5) for i in b) == list(range(N))
    # less padding: the mean longest sample per micro-batch drops
    def mean_max(batches, k):
        return np.mean([lengths[b[j: j + k]].max() for b in batches for j in range(0, len(b), k)])

    assert mean_max(grouped, mbs) < 0.8 * mean_max(plain, mbs)
    # independent of the layout for a fixed group size (e.g. the global batch size)
    ref = _plain_and_grouped(lengths, 8, 1, 16, window, steps=100)[1]
    for mbs_, dp_ in [(4, 2), (2, 4), (1, 8)]:
        g = _plain_and_grouped(lengths, mbs_, dp_, 16, window, steps=100)[1]
        assert [i for b in g for i in b] == [i for b in ref for i in b]
    # resumes exactly mid-epoch and across epochs
    full = BatchSampler(N, 3, 1, 2, seed=5, length_grouped=True, lengths=lengths).micro_batches_at(0, 800)
    for step in (1, 333, 667):
        resumed = BatchSampler(N, 3, 1, 2, seed=5, consumed_samples=6 * step, length_grouped=True,
                               lengths=lengths)
        assert _take(resumed, 5) == full[step: step + 5]
    with pytest.raises(ValueError, match="lengths"):
        BatchSampler(N, 4, length_grouped=True)
    with pytest.raises(ValueError, match="lengths for"):
        BatchSampler(N, 4, length_grouped=True, lengths=lengths[:-1])


def test_length_grouped_with_dataset_lengths(prepared):
    ds = PreparedDataset(prepared, "train")
    s = BatchSampler(len(ds), 2, 0, 1, seed=0, length_grouped=True, lengths=ds.lengths(),
                     length_group_window=4, num_epochs=1)
    seen = [i for b in s for i in b]
    assert len(seen) == len(ds) // 2 * 2 and len(set(seen)) == len(seen)


# ------------------------------------------------------------------------------- bench

def test_bench_dataset_smoke(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_dataset.py"), "--num-samples", "20000",
         "--jsonl-samples", "2000", "--reads", "300", "--max-len", "256", "--dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("open", "random reads", "RSS", "ratios jsonl/indexed", "same samples in both formats: yes"):
        assert text in r.stdout
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["same_samples"] and res["indexed"]["num_samples"] == 20000
    assert res["indexed"]["open_seconds"] < 1.0 and res["indexed"]["anon_open_delta_mb"] < 5
    assert res["ratios"]["open_time"] > 1 and res["jsonl"]["format"] == "jsonl"
    assert not list(tmp_path.iterdir())  # cleaned up
