#!/usr/bin/env python
"""Benchmark opening and reading a prepared dataset: memory-mapped vs the old jsonl loader.

Writes a synthetic prepared dataset of ``--num-samples`` samples (random lengths in
``[--min-len, --max-len]``, random ids, the last two thirds of each sample supervised)
with the writer tools/prepare_data.py uses (``megaspark.data.indexed.SplitWriter``), and
a jsonl-only copy of its first ``--jsonl-samples`` samples (the format older versions
wrote, read by the old parser). Then, each in a fresh Python process, it opens the split
with ``PreparedDataset`` and reads ``--reads`` random samples, and prints the open time,
the resident-memory growth (RSS and its private part RssAnon, /proc/self/status), the
read time, and the ratios of the jsonl loader (extrapolated linearly from its subset to
the full size) to the indexed one. Both processes also digest the same samples of the subset: the two
formats must agree. The sampler's cost is measured too (first epoch permutation, a
seek, a length-grouped epoch).

The files are in the page cache when read (just written): the open time measures the
format, not the disk. Example::

    python tools/bench_dataset.py                       # 1M samples, 16-512 tokens (~0.8 GB)
    python tools/bench_dataset.py --num-samples 20000 --jsonl-samples 5000 --json
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory in MB from /proc/self/status: VmRSS (all), RssAnon (private
    memory: Python objects, tensors) or RssFile (mapped file pages, reclaimable)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ----------------------------------------------------------------------------- writing

def synthesize(out: Path, num_samples: int, min_len: int, max_len: int, vocab: int, seed: int,
               jsonl_dir: Path, jsonl_samples: int, chunk: int = 50_000) -> dict:
    """The synthetic dataset (train split only) and the jsonl-only subset copy."""
    import numpy as np

    from megaspark.data.indexed import SplitWriter, storage_meta

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    jsonl_dir.mkdir(parents=True, exist_ok=True)
    big = SplitWriter(out, "train", vocab, jsonl=False)
    small = SplitWriter(jsonl_dir, "train", vocab, jsonl=True, indexed=False)
    t0 = time.perf_counter()
    done = 0
    while done < num_samples:
        n = min(chunk, num_samples - done)
        lengths = rng.integers(min_len, max_len + 1, size=n, dtype=np.int64)
        total = int(lengths.sum())
        ids = rng.integers(0, vocab, size=total, dtype=np.int64)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = np.arange(total, dtype=np.int64) - starts
        mask = (pos >= np.repeat(lengths // 3, lengths)).astype(np.int64)
        big.add_batch(ids, mask, lengths)
        if done < jsonl_samples:
            k = min(n, jsonl_samples - done)
            t = int(lengths[:k].sum())
            small.add_batch(ids[:t], mask[:t], lengths[:k])
        done += n
    infos = {"train": big.finalize()}
    small_info = small.finalize()
    write_seconds = time.perf_counter() - t0
    base = {"tokenizer_vocab_size": vocab, "model_vocab_size": vocab, "pad_token_id": 0,
            "eos_token_id": 1, "max_length": max_len}
    (out / "meta.json").write_text(json.dumps({**base, "counts": {"train": num_samples, "valid": 0},
                                               "storage": storage_meta(infos)}))
    (jsonl_dir / "meta.json").write_text(json.dumps({**base, "counts": {"train": len(small)}}))
    return {"write_seconds": write_seconds, "num_tokens": infos["train"]["num_tokens"],
            "bin_bytes": infos["train"]["bin_bytes"],
            "idx_bytes": (out / "train.idx").stat().st_size,
            "jsonl_bytes": small_info["jsonl_bytes"], "jsonl_samples": len(small)}


# ------------------------------------------------------------------------- measurement

def child(args) -> dict:
    """Runs in a fresh process: open, read, digest (and, for the mmap format, the sampler)."""
    import numpy as np
    import torch

    from megaspark.data.dataset import BatchSampler, PreparedDataset

    torch.set_num_threads(1)
    gc.collect()
    rss0, anon0 = rss_mb(), rss_mb("RssAnon")
    t0 = time.perf_counter()
    ds = PreparedDataset(args.path, "train")
    t_open = time.perf_counter() - t0
    gc.collect()
    rss_open, anon_open = rss_mb(), rss_mb("RssAnon")
    n = len(ds)
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, n, size=args.reads)
    t0 = time.perf_counter()
    tokens = 0
    for i in idx.tolist():
        s = ds[i]
        tokens += s["input_ids"].numel()
    t_read = time.perf_counter() - t0
    rss_read, anon_read = rss_mb(), rss_mb("RssAnon")
    # the same samples in both processes, from the jsonl subset's range
    h = hashlib.sha256()
    for i in np.random.default_rng(args.seed + 1).integers(0, min(n, args.digest_range), size=200).tolist():
        s = ds[i]
        h.update(s["input_ids"].numpy().tobytes())
        h.update(s["loss_mask"].numpy().tobytes())
    res = {"format": ds.format, "num_samples": n, "open_seconds": t_open,
           "rss_base_mb": rss0, "rss_open_delta_mb": rss_open - rss0,
           "read_seconds": t_read, "reads": int(args.reads), "read_tokens": tokens,
           "rss_read_delta_mb": rss_read - rss0, "anon_open_delta_mb": anon_open - anon0,
           "anon_read_delta_mb": anon_read - anon0, "digest": h.hexdigest()}
    if args.sampler:
        mbs, dp = 4, 8
        t0 = time.perf_counter()
        BatchSampler(n, mbs, 3, dp, seed=1, consumed_samples=n // 2).micro_batches_at(n // 2, 1)
        res["sampler_first_seconds"] = time.perf_counter() - t0  # computes epoch 0's permutation
        t0 = time.perf_counter()
        for k in range(100):  # as the trainer does: a new sampler per step
            pos = n // 3 + k * mbs * dp
            BatchSampler(n, mbs, 3, dp, seed=1, consumed_samples=pos).micro_batches_at(pos, 1)
        res["sampler_seek_seconds"] = (time.perf_counter() - t0) / 100
        t0 = time.perf_counter()
        lengths = ds.lengths()
        res["lengths_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        BatchSampler(n, mbs, 0, dp, seed=1, length_grouped=True, lengths=lengths).micro_batches_at(0, 1)
        res["grouped_epoch_seconds"] = time.perf_counter() - t0
        res["rss_end_delta_mb"] = rss_mb() - rss0
        res["anon_end_delta_mb"] = rss_mb("RssAnon") - anon0
    return res


def run_child(path: Path, args, sampler: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--path", str(path),
           "--reads", str(args.reads), "--seed", str(args.seed), "--digest-range", str(args.jsonl_samples)]
    if sampler:
        cmd.append("--sampler")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=_REPO)
    if r.returncode != 0:
        raise SystemExit(f"error: benchmark process failed ({path}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_dataset.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=1_000_000)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32_000, help="vocabulary size (<= 65536: uint16 ids)")
    p.add_argument("--jsonl-samples", type=int, default=50_000,
                   help="samples in the jsonl-only copy read by the old loader (default 50,000)")
    p.add_argument("--reads", type=int, default=1000, help="random samples read after opening")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="where to create the temporary dataset (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the generated files (their path is printed)")
    p.add_argument("--json", action="store_true", help="also print one JSON object with every number")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--digest-range", type=int, default=50_000, help=argparse.SUPPRESS)
    p.add_argument("--sampler", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if not 1 <= args.min_len <= args.max_len:
        raise SystemExit("error: need 1 <= --min-len <= --max-len")
    args.jsonl_samples = max(1, min(args.jsonl_samples, args.num_samples))
    mean_len = (args.min_len + args.max_len) / 2
    est_gb = args.num_samples * mean_len * (3 if args.vocab <= 1 << 16 else 5) / 1e9
    root = Path(tempfile.mkdtemp(prefix="megaspark-bench-", dir=args.dir))
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb < 1.2 * est_gb + 0.5:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"error: about {est_gb:.1f} GB needed, {free_gb:.1f} GB free under {root.parent}")
    try:
        print(f"writing {args.num_samples:,} samples ({args.min_len}-{args.max_len} tokens, vocab "
              f"{args.vocab}) to {root} ...", flush=True)
        w = synthesize(root / "indexed", args.num_samples, args.min_len, args.max_len, args.vocab,
                       args.seed, root / "jsonl", args.jsonl_samples)
        print(f"  {w['num_tokens']:,} tokens: .bin {w['bin_bytes'] / 1e6:.0f} MB + .idx "
              f"{w['idx_bytes'] / 1e6:.1f} MB in {w['write_seconds']:.1f} s; jsonl subset "
              f"{w['jsonl_samples']:,} samples, {w['jsonl_bytes'] / 1e6:.0f} MB", flush=True)
        mm = run_child(root / "indexed", args, sampler=True)
        js = run_child(root / "jsonl", args, sampler=False)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    N, M = mm["num_samples"], js["num_samples"]
    scale = N / M
    js_open_x = js["open_seconds"] * scale
    js_rss_x = js["rss_open_delta_mb"] * scale
    per_read = lambda r: r["read_seconds"] / r["reads"] * 1e6  # noqa: E731
    ratios = {
        "open_time": js_open_x / max(mm["open_seconds"], 1e-9),
        "open_rss": js_rss_x / max(mm["rss_open_delta_mb"], 0.25),
        "read_time": per_read(js) / max(per_read(mm), 1e-9),
    }
    same = mm["digest"] == js["digest"]
    print(f"\nindexed .bin/.idx, {N:,} samples (fresh process, warm page cache):")
    print(f"  open            {mm['open_seconds'] * 1e3:9.2f} ms     RSS +{mm['rss_open_delta_mb']:.1f} MB "
          f"(private +{mm['anon_open_delta_mb']:.1f} MB)")
    print(f"  {mm['reads']} random reads {mm['read_seconds'] * 1e3:6.1f} ms ({per_read(mm):.1f} us/sample)  "
          f"RSS +{mm['rss_read_delta_mb']:.1f} MB since before open (private +{mm['anon_read_delta_mb']:.1f} MB, "
          f"the rest file-backed: code pages)")
    print(f"  sampler: first epoch permutation {mm['sampler_first_seconds'] * 1e3:.0f} ms, then a new "
          f"sampler + seek {mm['sampler_seek_seconds'] * 1e6:.0f} us/step; lengths() "
          f"{mm['lengths_seconds'] * 1e3:.0f} ms; length-grouped epoch {mm['grouped_epoch_seconds'] * 1e3:.0f} ms; "
          f"RSS +{mm['rss_end_delta_mb']:.1f} MB in all (private +{mm['anon_end_delta_mb']:.1f} MB)")
    print(f"jsonl (old loader), {M:,} samples:")
    print(f"  open            {js['open_seconds']:9.2f} s      RSS +{js['rss_open_delta_mb']:.1f} MB "
          f"(private +{js['anon_open_delta_mb']:.1f} MB)"
          f"   -> at {N:,} samples: ~{js_open_x:.0f} s, ~{js_rss_x / 1024:.1f} GB (linear)")
    print(f"  {js['reads']} random reads {js['read_seconds'] * 1e3:6.1f} ms ({per_read(js):.1f} us/sample)")
    print(f"ratios jsonl/indexed at {N:,} samples: open time x{ratios['open_time']:,.0f}, open RSS "
          f"x{ratios['open_rss']:,.0f}, per-sample read x{ratios['read_time']:.2f}")
    print(f"same samples in both formats: {'yes' if same else 'NO'}")
    if args.keep:
        print(f"files kept in {root}")
    if args.json:
        print(json.dumps({"write": w, "indexed": mm, "jsonl": js, "jsonl_extrapolated":
                          {"open_seconds": js_open_x, "rss_open_delta_mb": js_rss_x},
                          "ratios": ratios, "same_samples": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
