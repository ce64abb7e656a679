#!/usr/bin/env python
"""Benchmark megaspark's memory-saving loss and attention against their naive forms.

Everything is reported as a *ratio of two measurements taken in the same run* (same
machine, same thread count, same inputs); absolute numbers are printed for information
only and nothing here passes or fails on time. The tool does fail (exit status 1) when
the formulations do not compute the same values, because the ratios would then be
meaningless.

1. **Loss** — three formulations of the same CE + L1 objective, TP = 1 (``group=None``),
   with ``target_hidden`` and the Markov bias ``feat``/``w2``, over ``R`` rows
   (``--loss-rows``; default 896 = 128 anchors × block 7 at the Qwen3 vocabulary
   V = 151,936):

   * **fused** — :func:`megaspark.vocab_parallel_loss.vocab_parallel_ce_l1_sums`, one autograd
     Function with a hand-derived backward, row chunks of ``--chunk-rows`` (no autograd
     graph over ``[rows, V]``, no recomputation);
   * **grouped** — what training uses: the same Function with the CE and L1 gradients
     combined and the rows grouped by target position (:func:`megaspark.vocab_parallel_loss.group_rows`;
     target logits, Markov bias and its gradient products once per group).
   * **chunked** — the previous implementation, :func:`megaspark.vocab_parallel_loss.vocab_parallel_ce_l1`:
     per-row autograd, each chunk under activation checkpointing (``--skip-chunked`` to
     leave it out);
   * **naive** — a full-logits formulation written below (:func:`naive_ce_l1`): over all
     rows at once ``logits = h·Wᵀ + f·W2ᵀ``, ``log_softmax``, CE, ``softmax``,
     ``Σ|p_d − p_t|``.

   The rows come as overlapping blocks make them: in groups of 1–2 (about two thirds of
   the rows distinct) that share the target's hidden state and the Markov feature.
   Objective ``(Σ CE + Σ L1) / R``; gradients flow to ``h``, ``feat`` and ``W2`` (the LM
   head is frozen, as in DSpark training); the feature's gradient is compared summed over
   each group (what reaches ``W1``). Reported: fused/naive and grouped/naive (the aim: peak
   extra memory ≤ 10 %), chunked/naive and fused/chunked.
2. **Attention** — :func:`structured_attention_with_keep` and :func:`sdpa_block_attention`
   (the CPU default) against :func:`dense_mask_attention` with the ``[N·B, S+N·B]`` mask of
   :func:`megaspark.blocks.dense_attention_mask`, sorted random anchors from
   :func:`megaspark.blocks.sample_anchors`. Only the core attention is timed: the mask /
   context lengths are built once per micro-batch (shared by all layers) and are inputs.

Each variant runs forward + backward, and the tool compares outputs and gradients of each
with the naive / dense one (max abs / relative difference) before printing any ratio.

How peak memory is measured (CPU, no CUDA allocator statistics)
----------------------------------------------------------------
Every variant runs in its **own fresh subprocess** (this script re-invoked with a hidden
``--_worker`` argument), so no allocator state, cached pages or leftovers of the other
variant can leak into its numbers; the variants run one after another, never
concurrently. Inside the worker two independent measurements are taken:

* **Primary: torch allocator accounting.** The first forward+backward of the worker runs
  under ``torch.profiler.profile(profile_memory=True)``. With memory profiling on, c10's
  CPU allocator reports every allocation and free (``ProfiledCPUMemoryReporter``) as a
  ``[memory]`` event carrying its signed byte count. Sorting those events by time and
  taking the maximum of their running sum gives the exact peak of *live tensor bytes
  allocated during the step* (the step's inputs, allocated before, are excluded — they
  are identical for both variants; the gradients of the leaves, allocated during the
  step, are included). This is what CUDA's ``max_memory_allocated`` would report, it is
  independent of glibc's heap behaviour and of page touching, and it is deterministic. It
  does not see memory that bypasses the torch allocator (e.g. MKL/oneDNN GEMM scratch),
  which is small and similar for both variants.
* **Cross-check: process RSS.** The same step is bracketed by the current RSS
  (``/proc/self/statm``) before and the high-water mark ``ru_maxrss`` after; the
  difference is the step's peak resident growth as the OS sees it. Large tensors are
  ``mmap``-ed and unmapped by glibc, so this tracks live memory well at full size, but
  it includes allocator fragmentation and non-torch buffers and is noisy for tiny sizes.

A tiny call of every loss form runs before the measured step, so lazy imports (megaspark's
loss imports megatron on its first call) and kernel initialisation are not charged to it.

The fused loss's peak extra memory is ~2 ``[chunk, V]`` fp32 buffers plus its fp32
gradient buffers (``[2, V, r]`` for W2 is the largest), so fused/naive scales like
``chunk / R``: the default ``--chunk-rows 128`` with ``R = 896`` is the ≤ 10 % case
(``--chunk-rows 512`` gives ~22 % there; at a training step's R of a few thousand rows
the ratio is smaller again).

Time: every one of the ``--repeats`` forward+backward steps of a variant is timed and
the median is reported; the first is the profiled step (the profiler only records a few
hundred large ops here, a negligible overhead), so the loss default ``--repeats 1`` costs
a single step per variant (5-20 s each at the defaults, one thread; the peak memory of the
naive loss there is ~3 GiB); attention steps are cheap and default to 3. The machine may be shared: the variants run at different
moments, so repeat the run (or raise ``--repeats``) before trusting small time
differences. On CPU every large fresh allocation is page-faulted in on each step; that is
a real cost of both forms here (a GPU caching allocator would hide it), so CPU time
ratios are not GPU time ratios. The worker's CPU time (``time.process_time``, all
threads) is printed as a cross-check that is less sensitive to other load on the
machine than wall time.

Usage::

    python tools/bench_loss.py               # defaults: loss V=151,936, R=896; attention N·B=3,584, S=2,048
    python tools/bench_loss.py --quick       # tiny sizes, a few seconds (CI smoke)
    python tools/bench_loss.py --hidden 512 --chunk-rows 256 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

LOSS_MEMORY_AIM = 0.10  # fused peak extra memory <= 10 % of naive
ATTN_TIME_AIM = 1.0  # structured faster than dense

# full-size defaults and the --quick ones; explicit options override either set
DEFAULTS = dict(
    vocab=151_936, hidden=256, markov_rank=64, loss_rows=896, num_anchors=512, block_size=7,
    seq_len=2048, chunk_rows=128, heads=8, query_groups=2, head_dim=128, batch=1, attn_chunk_blocks=16,
    repeats=1, attn_repeats=3,
)
QUICK = dict(
    vocab=2048, hidden=32, markov_rank=8, loss_rows=64, num_anchors=16, block_size=4,
    seq_len=128, chunk_rows=16, heads=2, query_groups=1, head_dim=16, batch=1, attn_chunk_blocks=4,
    repeats=2, attn_repeats=2,
)
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------- the naive loss
def naive_ce_l1(h, labels, lm_head, feat, w2, target_hidden):
    """The textbook formulation: full [R, V] logits for all rows at once, no chunking."""
    import torch

    logits = h.float() @ lm_head.float().t() + feat.float() @ w2.float().t()
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(1, labels[:, None]).squeeze(1)
    p_d = torch.softmax(logits, dim=-1)
    with torch.no_grad():
        p_t = torch.softmax(target_hidden.float() @ lm_head.float().t(), dim=-1)
    l1 = (p_d - p_t).abs().sum(dim=-1)
    return ce, l1


# ----------------------------------------------------------------------------- measurement
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark (delta is then a lower bound)
        return _maxrss_bytes()


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB, macOS bytes


def _peak_from_memory_events(prof) -> int:
    """Maximum of the running sum of the signed sizes of the CPU ``[memory]`` events."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def _measure(step, repeats: int):
    """``repeats`` forward+backward steps, all timed; the first one also gives the peak
    memory (allocator events under the profiler, and the RSS high-water mark)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    rss0, hwm0 = _rss_bytes(), _maxrss_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        outputs = step()
        times, cpu = [time.perf_counter() - t0], [time.process_time() - c0]
    hwm1 = _maxrss_bytes()
    peak = _peak_from_memory_events(prof)
    del prof
    for _ in range(repeats - 1):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(
        peak_bytes=peak,
        rss_delta_bytes=max(0, hwm1 - rss0),
        rss_reliable=hwm1 > hwm0,  # False: the step never exceeded an earlier high-water mark
        times_s=times,
        time_s=statistics.median(times),
        cpu_time_s=statistics.median(cpu),  # all threads of the worker
    ), outputs


# ----------------------------------------------------------------------------- workers
def _set_threads(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _loss_worker(args, variant: str):
    import torch

    from megaspark.vocab_parallel_loss import group_rows, vocab_parallel_ce_l1, vocab_parallel_ce_l1_sums

    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    R, V, H, r = args.loss_rows, args.vocab, args.hidden, args.markov_rank
    # logits with std ~2 and a target close to the draft: realistic, non-saturated softmaxes
    lm_head = (torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))).to(dt)
    w2 = (torch.randn(V, r, generator=g) * 0.05).to(dt).requires_grad_()
    h = torch.randn(R, H, generator=g).to(dt).requires_grad_()
    # rows in groups of 1-2 sharing the target position (its hidden state, its Markov feature)
    group = torch.repeat_interleave(torch.arange(R), torch.randint(1, 3, (R,), generator=g))[:R]
    feat = torch.randn(R, r, generator=g)[group].to(dt).requires_grad_()
    target_hidden = (h.detach().float() + 0.5 * torch.randn(R, H, generator=g))[group].to(dt)
    labels = torch.randint(0, V, (R,), generator=g)
    ones = torch.ones(R)
    leaves = (h, feat, w2)

    def objective(form, n, chunk_rows):
        """(Σ CE + Σ L1 over the first n rows, ce, l1)"""
        if form == "naive":
            ce, l1 = naive_ce_l1(h[:n], labels[:n], lm_head, feat[:n], w2, target_hidden[:n])
            return ce.sum() + l1.sum(), ce, l1
        if form == "chunked":
            ce, l1 = vocab_parallel_ce_l1(h[:n], labels[:n], lm_head, feat=feat[:n], w2=w2,
                                          target_hidden=target_hidden[:n], chunk_rows=chunk_rows)
            return ce.sum() + l1.sum(), ce, l1
        if form == "grouped":
            _, groups = group_rows(torch.arange(n), group[:n])
            total, _, _, ce, l1 = vocab_parallel_ce_l1_sums(
                h[:n], labels[:n], ones[:n], lm_head, feat=feat[:n], w2=w2, target_hidden=target_hidden[:n],
                chunk_rows=chunk_rows, combine=(1.0, 1.0), groups=groups, feat_by_prev=True)
            return total, ce, l1
        ce_sum, l1_sum, ce, l1 = vocab_parallel_ce_l1_sums(
            h[:n], labels[:n], ones[:n], lm_head, feat=feat[:n], w2=w2,
            target_hidden=target_hidden[:n], chunk_rows=chunk_rows)
        return ce_sum + l1_sum, ce, l1

    def step():
        for t in leaves:
            t.grad = None
        total, ce, l1 = objective(variant, R, args.chunk_rows)
        loss = total / R
        loss.backward()
        grad_feat = torch.zeros(int(group[-1]) + 1, r, dtype=feat.grad.dtype).index_add_(0, group, feat.grad)
        return dict(ce=ce.detach(), l1=l1.detach(), loss=loss.detach(),
                    grad_h=h.grad, grad_feat_per_group=grad_feat, grad_w2=w2.grad)

    # warm-up of every form on a few rows: lazy imports (megaspark's loss imports megatron on
    # first call), kernel initialisation; otherwise they would be charged to the RSS step
    for form in ("naive", "chunked", "fused", "grouped"):
        objective(form, min(R, 4), 2)[0].backward()
    return _measure(step, args.repeats)


def _attention_inputs(args):
    import torch

    from megaspark.blocks import context_lengths, dense_attention_mask, sample_anchors

    dt = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    b, S, N, B = args.batch, args.seq_len, args.num_anchors, args.block_size
    nkv, hd = args.query_groups, args.head_dim
    grp = args.heads // nkv
    # a prompt of ~S/8 unsupervised tokens, then a supervised response
    loss_mask = torch.ones(b, S, dtype=torch.long)
    loss_mask[:, : S // 8] = 0
    anchors, keep = sample_anchors(loss_mask, N, generator=g)  # sorted, dummies last
    rows = N * B
    q = torch.randn(b, nkv, grp, rows, hd, generator=g).to(dt).requires_grad_()
    k = torch.randn(b, nkv, S + rows, hd, generator=g).to(dt).requires_grad_()
    v = torch.randn(b, nkv, S + rows, hd, generator=g).to(dt).requires_grad_()
    grad_out = torch.randn(b, nkv, grp, rows, hd, generator=g).to(dt)
    return dict(
        q=q, k=k, v=v, grad_out=grad_out, keep=keep, ctx=context_lengths(anchors, keep),
        kept_blocks=int(keep.sum()),
    ), (dense_attention_mask(anchors, keep, S, B))


def _warm_up_attention(args):
    """Both backends once on tiny inputs (lazy initialisation outside the measured steps)."""
    import torch

    from megaspark.blocks import context_lengths, dense_attention_mask
    from megaspark.models.dspark.attention import (
        dense_mask_attention,
        structured_attention_with_keep,
    )

    B, S = args.block_size, 8
    anchors, keep = torch.tensor([[1, 5]]), torch.tensor([[True, True]])
    from megaspark.models.dspark.attention import sdpa_block_attention

    for dense in (True, False, None):
        q = torch.randn(1, 1, 1, 2 * B, 4, requires_grad=True)
        kv = torch.randn(1, 1, S + 2 * B, 4, requires_grad=True)
        if dense is None:
            out = sdpa_block_attention(q, kv, kv, context_lengths(anchors, keep), keep, B, S, 1)
        elif dense:
            out = dense_mask_attention(q, kv, kv, dense_attention_mask(anchors, keep, S, B))
        else:
            out = structured_attention_with_keep(q, kv, kv, context_lengths(anchors, keep), keep,
                                                 B, S, 1)
        out.sum().backward()


def _attention_worker(args, variant: str):
    from megaspark.models.dspark.attention import (
        dense_mask_attention,
        sdpa_block_attention,
        structured_attention_with_keep,
    )

    _warm_up_attention(args)
    inp, dense_mask = _attention_inputs(args)
    if variant != "dense":
        dense_mask = None  # the structured backend never builds it
    q, k, v = inp["q"], inp["k"], inp["v"]

    def step():
        for t in (q, k, v):
            t.grad = None
        if variant == "dense":
            out = dense_mask_attention(q, k, v, dense_mask)
        elif variant == "sdpa":
            out = sdpa_block_attention(q, k, v, inp["ctx"], inp["keep"], args.block_size, args.seq_len,
                                       args.attn_chunk_blocks)
        else:
            out = structured_attention_with_keep(
                q, k, v, inp["ctx"], inp["keep"], args.block_size, args.seq_len,
                args.attn_chunk_blocks,
            )
        out.backward(inp["grad_out"])
        return dict(out=out.detach(), grad_q=q.grad, grad_k=k.grad, grad_v=v.grad)

    res, outputs = _measure(step, args.attn_repeats)
    res["kept_blocks"] = inp["kept_blocks"]
    return res, outputs


def _run_worker(args):
    import torch

    _set_threads(args)
    kind, variant = args._worker.split(":")
    fn = _loss_worker if kind == "loss" else _attention_worker
    res, outputs = fn(args, variant)
    res["threads"] = torch.get_num_threads()
    torch.save(outputs, os.path.join(args._out, f"{kind}_{variant}.pt"))
    with open(os.path.join(args._out, f"{kind}_{variant}.json"), "w") as f:
        json.dump(res, f)


# ----------------------------------------------------------------------------- driver
def _forward_args(args) -> list:
    out = []
    for name in list(DEFAULTS) + ["dtype", "seed", "threads"]:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out


def _spawn(args, kind, variant, tmp) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", f"{kind}:{variant}",
           "--_out", tmp] + _forward_args(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=_REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:  # interrupted: do not leave a multi-GiB worker behind
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        sys.stderr.write(stdout + stderr)
        raise SystemExit(f"worker {kind}:{variant} failed with exit code {proc.returncode}")
    with open(os.path.join(tmp, f"{kind}_{variant}.json")) as f:
        res = json.load(f)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _diffs(tmp, kind, a, b) -> dict:
    """For every saved output: max |x_a − x_b|, that relative to max |x_b|, and the norm-wise
    relative error ‖x_a − x_b‖ / ‖x_b‖ (the equality criterion: fp32 rounding alone gives
    max-relative errors ~1e-4 on the L1 gradients — |·| flips sign where p_d ≈ p_t — but
    norm-wise errors ~1e-5, while a real bug gives O(1))."""
    import torch

    xa = torch.load(os.path.join(tmp, f"{kind}_{a}.pt"))
    xb = torch.load(os.path.join(tmp, f"{kind}_{b}.pt"))
    out = {}
    for name in xa:
        ta, tb = xa[name].double(), xb[name].double()
        if ta.shape != tb.shape:
            out[name] = dict(max_abs=float("inf"), max_rel=float("inf"), norm_rel=float("inf"))
            continue
        absd = (ta - tb).abs().max().item() if ta.numel() else 0.0
        scale = tb.abs().max().item() if tb.numel() else 0.0
        dn, n = (ta - tb).norm().item(), tb.norm().item()
        out[name] = dict(max_abs=absd, max_rel=absd / scale if scale > 0 else absd,
                         norm_rel=dn / n if n > 0 else dn)
    return out


def _gib(n) -> str:
    return f"{n / 2**30:.3f} GiB"


def _ratio(a, b) -> float:
    return a / b if b else float("nan")


def _print_diffs(kind, diffs, tol) -> bool:
    ok = all(d["norm_rel"] <= tol for d in diffs.values())  # NaN fails too
    parts = "  ".join(f"{k} {d['max_abs']:.2e} (rel {d['norm_rel']:.0e})" for k, d in diffs.items())
    print(f"{kind}  max abs diff (norm-wise rel): {parts}  -> "
          f"{'EQUAL' if ok else 'MISMATCH'} (rel tol {tol:g})")
    return ok


def _loss_section(args, tmp, tol, results) -> bool:
    rows = args.loss_rows
    variants = ["naive", "fused", "grouped"] + ([] if args.skip_chunked else ["chunked"])
    print(f"# loss: V={args.vocab}  H={args.hidden}  markov rank={args.markov_rank}  "
          f"rows R={rows}  chunk rows={args.chunk_rows}  dtype={args.dtype}  "
          f"({', '.join(variants)})", flush=True)
    res = {v: _spawn(args, "loss", v, tmp) for v in variants}
    logit_bytes = rows * args.vocab * 4
    chunk_bytes = min(rows, args.chunk_rows) * args.vocab * 4
    for name, r in res.items():
        print(f"#   {name:8s} peak {_gib(r['peak_bytes'])} "
              f"(= {r['peak_bytes'] / logit_bytes:.2f} x fp32 [R,V] logits "
              f"= {r['peak_bytes'] / chunk_bytes:.2f} x [chunk,V])  "
              f"rss +{_gib(r['rss_delta_bytes'])}  time {r['time_s']:.2f} s "
              f"cpu {r['cpu_time_s']:.2f} s (median of {len(r['times_s'])}, "
              f"threads {r['threads']})")
    ok = True
    diffs = {}
    for v in variants[1:]:
        diffs[v] = _diffs(tmp, "loss", v, "naive")
        ok &= _print_diffs(f"loss  check {v} vs naive", diffs[v], tol)
    ratios = {}
    pairs = [(v, "naive") for v in variants[1:]] + ([("fused", "chunked")] if "chunked" in res else [])
    for a, b in pairs:
        ra, rb = res[a], res[b]
        ratios[f"{a}/{b}"] = dict(
            peak_memory=_ratio(ra["peak_bytes"], rb["peak_bytes"]),
            peak_rss=_ratio(ra["rss_delta_bytes"], rb["rss_delta_bytes"]),
            time=_ratio(ra["time_s"], rb["time_s"]),
            cpu_time=_ratio(ra["cpu_time_s"], rb["cpu_time_s"]),
        )
    for a, b in pairs:
        x = ratios[f"{a}/{b}"]
        aim = ""
        if b == "naive" and a in ("fused", "grouped"):
            aim = (f"  (aim <= {LOSS_MEMORY_AIM}: "
                   f"{'met' if x['peak_memory'] <= LOSS_MEMORY_AIM else 'NOT met'})")
        print(f"loss  peak memory  {a}/{b} = {x['peak_memory']:.3f}{aim}")
    for a, b in pairs:
        reliable = res[a]["rss_reliable"] and res[b]["rss_reliable"]
        print(f"loss  peak RSS  {a}/{b} = {ratios[f'{a}/{b}']['peak_rss']:.3f}  (cross-check"
              f"{'' if reliable else ', unreliable'})")
    for a, b in pairs:
        print(f"loss  time  {a}/{b} = {ratios[f'{a}/{b}']['time']:.3f}")
    for a, b in pairs:
        print(f"loss  CPU time  {a}/{b} = {ratios[f'{a}/{b}']['cpu_time']:.3f}  (cross-check)", flush=True)
    results["loss"] = dict(res, diffs=diffs, ratios=ratios)
    return ok


def run_benchmark(args) -> int:
    import torch

    tol = 1e-4 if args.dtype == "float32" else 3e-2
    results = dict(config={k: getattr(args, k) for k in list(DEFAULTS) + ["dtype", "seed"]},
                   torch=torch.__version__)
    ok = True
    rows = args.num_anchors * args.block_size
    if args.quick:
        print("# --quick: tiny sizes, the ratios below measure overheads, not the real trade-off")
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        if not args.skip_loss:
            ok &= _loss_section(args, tmp, tol, results)
        if not args.skip_attention:
            print(f"# attention: S={args.seq_len}  N·B={args.num_anchors}x{args.block_size}={rows}  "
                  f"heads={args.heads} (groups {args.query_groups})  head dim={args.head_dim}  "
                  f"batch={args.batch}  chunk blocks={args.attn_chunk_blocks}  dtype={args.dtype}",
                  flush=True)
            dense = _spawn(args, "attention", "dense", tmp)
            struct = _spawn(args, "attention", "structured", tmp)
            sdpa = _spawn(args, "attention", "sdpa", tmp)
            diffs = _diffs(tmp, "attention", "structured", "dense")
            sdpa_diffs = _diffs(tmp, "attention", "sdpa", "dense")
            for name, r in (("dense", dense), ("structured", struct), ("sdpa", sdpa)):
                print(f"#   {name:10s} peak {_gib(r['peak_bytes'])}  rss +{_gib(r['rss_delta_bytes'])}  "
                      f"time {r['time_s']:.2f} s  cpu {r['cpu_time_s']:.2f} s "
                      f"(median of {len(r['times_s'])}, threads {r['threads']})")
            print(f"#   kept blocks {struct['kept_blocks']} of {args.batch * args.num_anchors}")
            ok &= _print_diffs("attention  check structured vs dense", diffs, tol)
            ok &= _print_diffs("attention  check sdpa vs dense", sdpa_diffs, tol)
            tim = _ratio(struct["time_s"], dense["time_s"])
            cpu = _ratio(struct["cpu_time_s"], dense["cpu_time_s"])
            mem = _ratio(struct["peak_bytes"], dense["peak_bytes"])
            rss = _ratio(struct["rss_delta_bytes"], dense["rss_delta_bytes"])
            print(f"attention  time  structured/dense = {tim:.3f}  (aim < {ATTN_TIME_AIM}: "
                  f"{'met' if tim < ATTN_TIME_AIM else 'NOT met'})")
            print(f"attention  CPU time  structured/dense = {cpu:.3f}  (cross-check)")
            print(f"attention  peak memory  structured/dense = {mem:.3f}")
            print(f"attention  peak RSS  structured/dense = {rss:.3f}  (cross-check)", flush=True)
            sdpa_ratios = dict(time=_ratio(sdpa["time_s"], dense["time_s"]),
                               time_vs_structured=_ratio(sdpa["time_s"], struct["time_s"]),
                               peak_memory=_ratio(sdpa["peak_bytes"], dense["peak_bytes"]))
            print(f"attention  time  sdpa/dense = {sdpa_ratios['time']:.3f}")
            print(f"attention  time  sdpa/structured = {sdpa_ratios['time_vs_structured']:.3f}")
            print(f"attention  peak memory  sdpa/dense = {sdpa_ratios['peak_memory']:.3f}", flush=True)
            results["attention"] = dict(dense=dense, structured=struct, sdpa=sdpa, diffs=diffs,
                                        sdpa_diffs=sdpa_diffs,
                                        ratios=dict(time=tim, cpu_time=cpu, peak_memory=mem,
                                                    peak_rss=rss), sdpa_ratios=sdpa_ratios)
    results["outputs_equal"] = bool(ok)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"# results written to {args.json}")
    if not ok:
        print("ERROR: the two formulations differ; the ratios above are meaningless", file=sys.stderr)
        return 1
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Peak memory and time of megaspark's fused vocab-parallel loss (and of the "
        "previous checkpointed-autograd one) vs a naive full-logits loss, and of structured vs "
        "dense-mask block attention (forward+backward, single process, TP=1). Prints ratios "
        "measured in the same run.",
    )
    d = DEFAULTS
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for a CI smoke run (explicit size options still override)")
    p.add_argument("--vocab", type=int, help=f"vocabulary size V (default {d['vocab']})")
    p.add_argument("--hidden", type=int, help=f"hidden size H of the loss inputs (default {d['hidden']})")
    p.add_argument("--markov-rank", type=int, help=f"rank r of the Markov bias feat/W2 (default {d['markov_rank']})")
    p.add_argument("--loss-rows", type=int, help=f"rows R of the loss (default {d['loss_rows']})")
    p.add_argument("--num-anchors", type=int, help=f"anchors per sequence N for attention (default {d['num_anchors']})")
    p.add_argument("--block-size", type=int, help=f"block size B for attention (default {d['block_size']})")
    p.add_argument("--seq-len", type=int, help=f"context length S for attention (default {d['seq_len']})")
    p.add_argument("--chunk-rows", type=int, help=f"loss rows per chunk, fused and chunked (default {d['chunk_rows']})")
    p.add_argument("--heads", type=int, help=f"attention query heads (default {d['heads']})")
    p.add_argument("--query-groups", type=int, help=f"attention KV heads (default {d['query_groups']})")
    p.add_argument("--head-dim", type=int, help=f"attention head dim (default {d['head_dim']})")
    p.add_argument("--batch", type=int, help=f"sequences per micro-batch for attention (default {d['batch']})")
    p.add_argument("--attn-chunk-blocks", type=int,
                   help=f"blocks per chunk of the structured attention (default {d['attn_chunk_blocks']}, megaspark's)")
    p.add_argument("--repeats", type=int,
                   help="forward+backward steps per variant, all timed (median reported); the first "
                   f"is also the peak-memory step (default {d['repeats']} for the loss, "
                   f"{d['attn_repeats']} for attention)")
    p.add_argument("--attn-repeats", type=int, help="steps per attention variant (default: "
                   "--repeats if given, else %d)" % d["attn_repeats"])
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype of inputs/weights; both variants compute logits and softmaxes in fp32 "
                   "(default float32)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's default; --quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    p.add_argument("--skip-loss", action="store_true", help="only run the attention benchmark")
    p.add_argument("--skip-attention", action="store_true", help="only run the loss benchmark")
    p.add_argument("--skip-chunked", action="store_true",
                   help="leave out the previous (checkpointed autograd) loss: fused vs naive only")
    p.add_argument("--json", metavar="PATH", help="also write all results to this JSON file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    if args.attn_repeats is None and args.repeats is not None:
        args.attn_repeats = args.repeats
    if args.quick and not args.threads:
        args.threads = 1  # tiny ops: avoid OpenMP barrier overhead on a busy machine
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in DEFAULTS:
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.heads % args.query_groups:
        p.error("--heads must be a multiple of --query-groups")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        _run_worker(args)
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
