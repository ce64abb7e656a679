#!/usr/bin/env python
"""Precompute the target's hidden states over a prepared dataset (the offline cache).

Runs the frozen target once over every sample of a dataset written by
tools/prepare_data.py and stores, per sample and at its own length, the tapped layers'
outputs [S_i, L*H] and the post-norm last hidden state [S_i, H]. Training then reads
them with `--target-backend offline --hidden-states-dir OUTPUT` instead of running the
target (megaspark/targets/offline.py describes the format).

The work is split into shards of --samples-per-shard consecutive samples. Each shard
is written to a temporary file and renamed when complete, so an interrupted run
resumes: complete shards are verified (sha256) and skipped, the rest is redone. Shards
can be spread over processes (--num-workers) and over nodes (--shard-rank /
--num-shard-ranks, e.g. one rank per Slurm task on a shared file system); whichever
process finishes last writes manifest.json (rerun with --finalize to rewrite it).

Examples::

    # the default dataset, bf16 cache, 2 processes on this machine
    python tools/precompute_hidden_states.py --target-model builtin:smollm2-135m \\
        --data-path data/smollm2-default --output cache/smollm2 --num-workers 2

    # a big target on GPUs: one rank per GPU across nodes, then train from the cache
    srun python tools/precompute_hidden_states.py --target-model /models/Qwen3-8B \\
        --data-path data/qwen3 --output /shared/cache/qwen3 --device cuda --target-dtype bf16 \\
        --shard-rank $SLURM_PROCID --num-shard-ranks $SLURM_NTASKS --target-layer-ids 1 9 17 25 33
    torchrun ... pretrain_dspark.py --target-model /models/Qwen3-8B --data-path data/qwen3 \\
        --target-backend offline --hidden-states-dir /shared/cache/qwen3 --target-layer-ids 1 9 17 25 33
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # allow `python tools/precompute_hidden_states.py` from a checkout
    sys.path.insert(0, str(_REPO))

from megaspark.targets import offline as fmt  # noqa: E402  (no transformers import yet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="precompute_hidden_states.py",
        description=__doc__.split("Examples::")[0],
        epilog="Examples:\n" + __doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("target (must match the training run)")
    g.add_argument("--target-model", default="builtin:smollm2-135m",
                   help="HF model directory or builtin:<name> (default: %(default)s)")
    g.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="target decoder layers to tap (default: DFlash rule with --num-target-taps)")
    g.add_argument("--num-target-taps", type=int, default=5,
                   help="taps when --target-layer-ids is not given (default: %(default)s, as pretrain_dspark.py)")
    g.add_argument("--target-backend", default="hf", choices=["hf", "sglang", "sglang-server"],
                   help="who runs the target: HF transformers in this process, SGLang's "
                        "ModelRunner in this process (CPU/GPU), or an SGLang server (GPU only; "
                        "the --sglang-* flags of pretrain_dspark.py apply)")
    g.add_argument("--target-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="dtype the target computes in (auto: bf16 on a GPU, fp32 on the CPU — "
                        "pretrain_dspark.py's --target-dtype auto without --bf16)")
    g.add_argument("--device", default=None,
                   help="device of the HF target (default: cuda if available, else cpu); with "
                        "--num-workers and cuda, worker w uses GPU w")
    d = p.add_argument_group("data and output")
    d.add_argument("--data-path", "--data-dir", dest="data_path", required=True,
                   help="prepared dataset directory (tools/prepare_data.py)")
    d.add_argument("--split", default="all", choices=["all", "train", "valid"],
                   help="which split(s) to cache (default: every split the dataset has)")
    d.add_argument("--output", required=True, help="cache directory (created; resumed if it exists)")
    d.add_argument("--dtype", default="bf16", choices=sorted(fmt.DTYPES),
                   help="storage dtype of the hidden states (default bf16, like DeepSpec; fp32 "
                        "reproduces the online features exactly)")
    d.add_argument("--samples-per-shard", type=int, default=256,
                   help="consecutive samples per shard file (default: %(default)s)")
    d.add_argument("--overwrite", action="store_true",
                   help="delete an existing cache made with other settings instead of refusing")
    d.add_argument("--verify", default="checksum", choices=["checksum", "size"],
                   help="how existing shards are checked before they are skipped (default: sha256)")
    d.add_argument("--finalize", action="store_true",
                   help="compute nothing: (re)write manifest.json from the complete shards")
    r = p.add_argument_group("throughput and parallelism")
    r.add_argument("--batch-size", type=int, default=8,
                   help="samples per target forward (right padded; default: %(default)s)")
    r.add_argument("--num-workers", type=int, default=1,
                   help="processes on this node, each with its own copy of the target")
    r.add_argument("--shard-rank", type=int, default=0, help="this process's rank among --num-shard-ranks")
    r.add_argument("--num-shard-ranks", type=int, default=1,
                   help="independent processes (e.g. nodes) sharing the work: rank r takes every "
                        "num-shard-ranks-th shard")
    r.add_argument("--threads", type=int, default=None,
                   help="CPU threads in total, split over the workers (default: $OMP_NUM_THREADS, "
                        "else all cores)")
    r.add_argument("--no-progress-bar", action="store_true")
    r.add_argument("--quiet", action="store_true", help="only errors")
    try:
        from megaspark.arguments import add_sglang_arguments

        add_sglang_arguments(p)
    except ImportError:  # pragma: no cover - the sglang adapter is optional here
        pass
    return p


class ToolError(Exception):
    pass


def log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- planning

def resolve_setup(args) -> dict:
    """The cache header: target identity, layer ids, dtype, dataset hash (cheap: config only)."""
    from megaspark.targets.base import config_fingerprint, default_target_layer_ids, validate_target_layer_ids
    from megaspark.targets.builtin import resolve_target
    from megaspark.targets.hf import load_config_offline

    path = resolve_target(args.target_model)
    config = load_config_offline(path).get_text_config()
    N = int(config.num_hidden_layers)
    try:
        ids = args.target_layer_ids if args.target_layer_ids is not None else \
            default_target_layer_ids(N, args.num_target_taps)
        ids = validate_target_layer_ids(list(ids), N)
    except ValueError as e:
        raise ToolError(f"--target-layer-ids / --num-target-taps: {e}") from None
    ds_hash, counts = fmt.dataset_hash(args.data_path)
    splits = [s for s in fmt.SPLITS if s in counts] if args.split == "all" else [args.split]
    for s in splits:
        if s not in counts:
            raise ToolError(f"--split {s}: {args.data_path} has no {s}.jsonl")
    meta = json.loads((Path(args.data_path) / "meta.json").read_text())
    H = int(config.hidden_size)
    header = {
        "format": fmt.FORMAT_NAME,
        "schema_version": fmt.SCHEMA_VERSION,
        "target": args.target_model,
        "target_path": str(path),
        "model_type": config.model_type,
        "target_fingerprint": config_fingerprint(config.to_dict(), ids),
        "layer_ids": ids,
        "num_target_layers": N,
        "hidden_size": H,
        "aux_hidden_size": len(ids) * H,
        "vocab_size": int(config.vocab_size),
        "dtype": args.dtype,
        "target_dtype": args.target_dtype,
        "target_backend": args.target_backend,
        "samples_per_shard": args.samples_per_shard,
        "dataset_hash": ds_hash,
        "dataset": {"dir": str(Path(args.data_path).resolve()), "hash": ds_hash,
                    "num_samples": counts, "pad_token_id": fmt.dataset_pad_id(meta),
                    "target": meta.get("target"), "max_length": meta.get("max_length")},
        "tensors": {"offsets": "I64 [n+1]", "aux_hidden_states": "[T, L*H]",
                    "last_hidden_states": "[T, H]", "input_ids": "I32 [T]"},
    }
    return {"header": header, "splits": splits, "counts": counts, "config": config}


def plan_shards(header: dict, counts: dict, splits) -> list[dict]:
    jobs = []
    sps = header["samples_per_shard"]
    for split in splits:
        ranges = fmt.shard_ranges(counts[split], sps)
        for k, (s, e) in enumerate(ranges):
            jobs.append({"split": split, "k": k, "start": s, "end": e,
                         "file": fmt.shard_file_name(split, k, len(ranges))})
    return jobs


def identity(header: dict) -> dict:
    return {k: header[k] for k in fmt.RESUME_KEYS}


def prepare_output(args, header: dict) -> Path:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / fmt.CONFIG_FILE
    if cfg.is_file():
        old = fmt.read_json(cfg)
        if identity(old) != identity(header):
            diff = {k: (old.get(k), header[k]) for k in fmt.RESUME_KEYS if old.get(k) != header[k]}
            if not args.overwrite:
                raise ToolError(
                    f"--output {out} holds a cache made with other settings ({diff}, as (cache, now)); "
                    f"use another --output, or --overwrite to delete it")
            if args.num_shard_ranks > 1:
                raise ToolError("--overwrite with --num-shard-ranks > 1 could delete another rank's "
                                "work; clear the directory once, then start the ranks")
            for f in out.iterdir():
                if f.name == fmt.MANIFEST_FILE or f.name == fmt.CONFIG_FILE or ".safetensors" in f.name:
                    f.unlink()
            fmt.atomic_write_text(cfg, json.dumps(header, indent=2, sort_keys=True) + "\n")
    else:
        fmt.atomic_write_text(cfg, json.dumps(header, indent=2, sort_keys=True) + "\n")
    return out


def shard_is_complete(out: Path, job: dict, header: dict, verify: str) -> bool:
    f, side = out / job["file"], fmt.sidecar_path(out / job["file"])
    if not f.is_file() or not side.is_file():
        return False
    try:
        rec = fmt.read_json(side)
    except (OSError, json.JSONDecodeError):
        return False
    if rec.get("identity") != identity(header) or (rec.get("start"), rec.get("end")) != (job["start"], job["end"]):
        return False
    if f.stat().st_size != rec.get("bytes"):
        return False
    return verify != "checksum" or fmt.file_sha256(f) == rec.get("sha256")


def clean_partial(out: Path, job: dict) -> None:
    """Leftovers of an interrupted write of this shard (temporary files, a shard without
    its record): removed before the shard is redone."""
    name = job["file"]
    for f in out.glob(f".{name}.tmp-*"):
        f.unlink(missing_ok=True)
    for f in (out / name, fmt.sidecar_path(out / name)):
        f.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- compute

def build_target(args, layer_ids, device, max_length=None):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.target_dtype]
    if args.target_backend == "sglang":
        from megaspark.targets.sglang_colocated import SGLangColocatedProvider

        return SGLangColocatedProvider(args.target_model, layer_ids=layer_ids, device=device,
                                       dtype=dtype, max_tokens=args.batch_size * int(max_length or 4096))
    if args.target_backend == "sglang-server":
        from megaspark.arguments.configs import sglang_options
        from megaspark.targets.sglang import SGLangTargetProvider

        return SGLangTargetProvider(args.target_model, layer_ids=layer_ids,
                                    options=sglang_options(args), dtype=dtype, device=device)
    from megaspark.targets.hf import HFTargetProvider

    return HFTargetProvider(args.target_model, layer_ids=layer_ids, dtype=dtype, device=device)


def compute_shard(args, target, dataset, job: dict, header: dict, out: Path, pad_id: int,
                  progress=lambda n: None) -> dict:
    import torch

    samples = [dataset[i]["input_ids"] for i in range(job["start"], job["end"])]
    lengths = [int(s.numel()) for s in samples]
    final = out / job["file"]
    tmp = out / f".{job['file']}.tmp-{os.getpid()}"
    meta = {"format": fmt.FORMAT_NAME, "schema_version": fmt.SCHEMA_VERSION, "split": job["split"],
            "start": job["start"], "end": job["end"], "dtype": header["dtype"],
            "target_fingerprint": header["target_fingerprint"],
            "layer_ids": json.dumps(header["layer_ids"]), "dataset_hash": header["dataset_hash"]}
    writer = fmt.ShardWriter(tmp, lengths, header["aux_hidden_size"], header["hidden_size"],
                             fmt.DTYPES[header["dtype"]], meta)
    try:
        # Longest first: batches of similar length waste little on padding. The order is a
        # function of the shard alone, so any process split writes the same bytes.
        order = sorted(range(len(samples)), key=lambda j: -lengths[j])
        for b0 in range(0, len(order), args.batch_size):
            batch = order[b0: b0 + args.batch_size]
            S = max(lengths[j] for j in batch)
            ids = torch.full((len(batch), S), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), S), dtype=torch.long)
            for r, j in enumerate(batch):
                ids[r, : lengths[j]] = samples[j]
                mask[r, : lengths[j]] = 1
            # HF: no mask, exactly as the trainer calls the online provider (right padding
            # never reaches a real position of a causal LM). SGLang needs the lengths.
            out_t = target.compute(ids, attention_mask=None if args.target_backend == "hf" else mask)
            aux, last = out_t.aux_hidden_states.cpu(), out_t.last_hidden_states.cpu()
            for r, j in enumerate(batch):
                n = lengths[j]
                writer.write_sample(j, samples[j], aux[r, :n], last[r, :n])
            progress(len(batch))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    record = {"file": job["file"], "split": job["split"], "index": job["k"], "start": job["start"],
              "end": job["end"], "num_samples": job["end"] - job["start"], "num_tokens": sum(lengths),
              "bytes": tmp.stat().st_size, "sha256": fmt.file_sha256(tmp), "identity": identity(header)}
    os.replace(tmp, final)
    fmt.atomic_write_text(fmt.sidecar_path(final), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def run_jobs(args, jobs: list, header: dict, out: Path, device, threads: int, progress) -> None:
    """Load the target and this process's datasets, then compute ``jobs`` in order."""
    import torch

    from megaspark.data.dataset import PreparedDataset

    torch.set_num_threads(max(1, threads))
    if not jobs:
        return
    target = build_target(args, header["layer_ids"], device, header["dataset"].get("max_length"))
    datasets = {s: PreparedDataset(args.data_path, s, vocab_size=header["vocab_size"])
                for s in {j["split"] for j in jobs}}
    pad_id = header["dataset"]["pad_token_id"]
    for job in jobs:
        clean_partial(out, job)
        compute_shard(args, target, datasets[job["split"]], job, header, out, pad_id, progress)
    if hasattr(target, "close"):
        target.close()


def _worker(wid: int, args, jobs, header, out, device, threads, queue) -> None:
    try:
        run_jobs(args, jobs, header, out, device, threads, lambda n: queue.put(("progress", wid, n)))
        queue.put(("done", wid, None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put(("error", wid, traceback.format_exc()))


def worker_device(args, w: int):
    import torch

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and args.num_workers > 1:
        return f"cuda:{w % max(1, torch.cuda.device_count())}"
    return dev


def run_parallel(args, todo: list, header: dict, out: Path, bar) -> None:
    import multiprocessing as mp
    import queue as queue_mod

    omp = os.environ.get("OMP_NUM_THREADS", "")
    total_threads = args.threads or (int(omp) if omp.isdigit() and int(omp) > 0 else os.cpu_count()) or 1
    W = max(1, min(args.num_workers, len(todo)))
    per_worker = max(1, total_threads // W)
    if W == 1:
        run_jobs(args, todo, header, out, worker_device(args, 0), per_worker, bar.update)
        return
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = []
    for w in range(W):
        jobs = todo[w::W]
        p = ctx.Process(target=_worker, args=(w, args, jobs, header, out, worker_device(args, w),
                                              per_worker, q), daemon=True)
        p.start()
        procs.append(p)
    done, errors = set(), []
    while len(done) + len(errors) < W:
        try:
            kind, wid, payload = q.get(timeout=5)
        except queue_mod.Empty:
            dead = [w for w, p in enumerate(procs) if not p.is_alive() and w not in done
                    and p.exitcode not in (0, None)]
            if dead and not errors:
                errors.append(f"worker {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                break
            continue
        if kind == "progress":
            bar.update(payload)
        elif kind == "done":
            done.add(wid)
        else:
            errors.append(f"worker {wid} failed:\n{payload}")
    if errors:
        for p in procs:  # our own children
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        raise ToolError(errors[0])
    for p in procs:
        p.join()


# ------------------------------------------------------------------------------- manifest

def finalize(out: Path, header: dict, counts: dict, required) -> dict:
    """Write manifest.json, listing every split whose shards are all complete, once the
    ``required`` splits are. Under a file lock and from a fresh scan, so the last of
    several finishing ranks sees everything."""
    from filelock import FileLock

    with FileLock(str(out / ".manifest.lock")):
        splits = {}
        for split in fmt.SPLITS:
            if split not in counts:
                continue
            jobs = plan_shards(header, counts, [split])
            recs = []
            for job in jobs:
                side = fmt.sidecar_path(out / job["file"])
                if not side.is_file() or not (out / job["file"]).is_file():
                    break
                rec = fmt.read_json(side)
                if rec.get("identity") != identity(header):
                    break
                recs.append({k: rec[k] for k in ("file", "start", "end", "num_tokens", "bytes", "sha256")})
            if len(recs) == len(jobs):
                splits[split] = {"num_samples": counts[split],
                                 "num_tokens": sum(r["num_tokens"] for r in recs), "shards": recs}
        manifest = dict(header)
        manifest["created"] = fmt.read_json(out / fmt.CONFIG_FILE).get("created")
        manifest["splits"] = splits
        if splits and all(s in splits for s in required):
            fmt.atomic_write_text(out / fmt.MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


# ------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.target_dtype == "auto":  # resolved before it is recorded in the manifest
        import torch

        on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        args.target_dtype = "bf16" if on_gpu else "fp32"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return _main(args)
    except (ToolError, FileNotFoundError, fmt.HiddenStatesCacheError) as e:
        print(f"precompute_hidden_states.py: error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    if args.batch_size < 1 or args.samples_per_shard < 1 or args.num_workers < 1:
        raise ToolError("--batch-size, --samples-per-shard and --num-workers must be >= 1")
    if not 0 <= args.shard_rank < args.num_shard_ranks:
        raise ToolError(f"--shard-rank {args.shard_rank} is not in [0, --num-shard-ranks "
                        f"{args.num_shard_ranks})")
    if args.target_backend == "sglang" and not args.finalize:
        from megaspark.targets.sglang_runtime import check_available

        try:  # fail fast, before any data is read
            check_available("cuda" if (args.device or "").startswith("cuda") else "cpu",
                            "--target-backend sglang")
        except RuntimeError as e:
            raise ToolError(str(e)) from None
        if args.num_workers > 1:
            raise ToolError("--num-workers > 1 with --target-backend sglang: one SGLang runner "
                            "per process; use --shard-rank to split the work between processes")
    if args.target_backend == "sglang-server" and not args.finalize:
        from megaspark.arguments.configs import sglang_options
        from megaspark.targets.sglang import check_sglang_available

        try:  # fail fast, before any data is read
            check_sglang_available(need_import=sglang_options(args).url is None)
        except RuntimeError as e:
            raise ToolError(str(e)) from None
        if args.num_workers > 1:
            raise ToolError("--num-workers > 1 with --target-backend sglang: the engine batches "
                            "itself; use one worker per engine (--shard-rank per node)")
    t0 = time.time()
    setup = resolve_setup(args)
    header, counts = setup["header"], setup["counts"]
    header_with_time = dict(header, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = prepare_output(args, header_with_time)
    jobs = plan_shards(header, counts, setup["splits"])
    mine = jobs[args.shard_rank:: args.num_shard_ranks]
    todo = [] if args.finalize else [j for j in mine if not shard_is_complete(out, j, header, args.verify)]
    n_samples = sum(j["end"] - j["start"] for j in todo)
    split_counts = ", ".join(f"{s} {counts[s]}" for s in setup["splits"])
    work = ("--finalize: nothing is computed" if args.finalize else
            f"{len(mine) - len(todo)} already complete, {len(todo)} to compute ({n_samples} samples)")
    log(args, f"{len(jobs)} shards of {header['samples_per_shard']} samples ({split_counts}); this rank "
              f"{args.shard_rank}/{args.num_shard_ranks}: {len(mine)} shards, {work}; layer ids "
              f"{header['layer_ids']}, {header['dtype']}")
    if todo:
        from tqdm import tqdm

        # the cache is being changed: until the last shard is back it is incomplete
        (out / fmt.MANIFEST_FILE).unlink(missing_ok=True)

        with tqdm(total=n_samples, unit="sample", desc="hidden states", dynamic_ncols=True,
                  disable=args.no_progress_bar or args.quiet) as bar:
            run_parallel(args, todo, header, out, bar)
    manifest = finalize(out, header, counts, setup["splits"])
    complete = sorted(manifest["splits"])
    missing = [s for s in setup["splits"] if s not in complete]
    if missing:
        log(args, f"shards of {missing} are still missing (other --shard-rank processes?); the last "
                  f"one to finish writes {fmt.MANIFEST_FILE} (or rerun with --finalize)")
    else:
        tokens = sum(manifest["splits"][s]["num_tokens"] for s in complete)
        log(args, f"wrote {out}/{fmt.MANIFEST_FILE}: splits {complete}, {tokens} tokens, "
                  f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
