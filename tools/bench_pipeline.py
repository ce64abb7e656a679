#!/usr/bin/env python
"""Benchmark the pipeline efficiency of megaspark's DSpark draft under megatron-core's 1F1B
schedule, against the ideal ``m / (m + p − 1)``.

Everything compared is measured in the same run of this tool (same machine, same moment,
same inputs); nothing is compared against stored numbers and nothing passes or fails on
time. The tool does fail (exit status 1) when the pipelined run does not compute the same
loss and gradient norm as the single-process run, because the timings would then not be of
the same work.

What is measured
----------------
For each micro-batch count ``m`` (``--micro-batches``, default 1,2,4,8), the same draft (same
global weights: :class:`DSparkModel` initialises every submodule from (seed, global name), so
construction is layout-independent), the same ``m`` micro-batches and the same loss
(``pretrain_dspark.loss_func``: global-denominator loss times ``loss_scale``) run

* **PP=1** — one process (world size 1, one thread), megatron's no-pipelining schedule:
  forward + backward of the m micro-batches one after another → ``T_pp1``;
* **PP=p** — ``p`` gloo processes (one thread each), the draft's layers split evenly over
  them, megatron-core's 1F1B schedule (``get_forward_backward_func()`` →
  ``forward_backward_pipelining_without_interleaving``) → ``T_ppp``.

Both come from megatron's ``get_forward_backward_func``; the draft is not wrapped in DDP (no
data parallelism, so there is nothing to reduce) and no optimizer step is taken: only the
forward+backward schedule is timed. Inputs are built directly (no target model): random
context features and target last hidden states, random input ids, a loss mask with an
unsupervised prompt, anchors from :func:`megaspark.blocks.sample_anchors` and blocks from
:func:`megaspark.blocks.build_blocks`.

All ``1 + p`` processes start at once (imports and model construction overlap), wait for
each other, then the PP=1 process measures while the PP ranks wait blocked, and only then the
PP ranks measure: the two runs never compete for the cores. Every configuration is warmed up
with one untimed call, then timed ``--repeats`` times (round-robin over the micro-batch
counts, so a burst of outside load does not hit one m only); the median is reported. A timed
PP step runs from a barrier to a barrier (so it spans every stage); gradients are reset
outside the timed region.

    efficiency       = T_pp1 / (p · T_ppp)      (speedup over PP=1, divided by the stages)
    ideal            = m / (m + p − 1)          (1F1B with p equal stages, free communication)
    measured/ideal   = efficiency / ideal

Each PP rank also times its own stage alone (forward + backward of one micro-batch with no
communication, a random incoming activation / outgoing gradient) while the other ranks do the
same; with those stage times ``t_s`` the 1F1B schedule can at best reach
``m·Σt / (p · (Σt + (m − 1)·max t))`` — the "ideal with the measured stage imbalance", which
separates the cost of unequal stages (the last stage carries the LM head, Markov/confidence
heads and the vocabulary losses; the first only the context projector) from schedule and
communication overhead.

On a small CPU machine read the numbers with care: PP=p needs ``p`` free cores (the default
``p = 2`` takes both cores of a 2-core machine, so any other load steals time from the
pipeline, while the PP=1 baseline needs only one core), the stages share memory bandwidth
and caches, and gloo's point-to-point transfers go through loopback TCP. The header prints
the load average, and both runs report CPU time / wall time per process: below 1.0 for the
PP=1 process means outside load took its core; for a PP rank it also counts the time the rank
waits for the other stage (bubble, imbalance), so only the slowest stage's value is a
contention hint there.

Usage::

    python tools/bench_pipeline.py                       # hidden 256, 4 layers, m = 1,2,4,8
    python tools/bench_pipeline.py --quick               # tiny sizes, CI smoke (< 1 min)
    python tools/bench_pipeline.py --micro-batches 1,4,16 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# full-size defaults and the --quick ones; explicit options override either set
DEFAULTS = dict(
    hidden=256, layers=4, heads=8, query_groups=2, ffn_hidden=768, vocab=8192,
    seq_length=256, num_anchors=32, block_size=7, markov_rank=64, taps=3,
    micro_batch_size=1, micro_batches="1,2,4,8", repeats=5,
)
QUICK = dict(
    hidden=64, layers=2, heads=4, query_groups=2, ffn_hidden=128, vocab=512,
    seq_length=64, num_anchors=8, block_size=4, markov_rank=8, taps=2,
    micro_batch_size=1, micro_batches="1,2,4", repeats=2,
)
CHECK_RTOL = 1e-4  # PP=1 vs PP=p loss / gradient norm (fp32, same weights, same inputs)


# ----------------------------------------------------------------------------- model and inputs
def _dspark_config(cfg: dict):
    from megaspark.config import DSparkConfig

    H = cfg["hidden"]
    taps = cfg["taps"]
    num_target_layers = 3 * taps
    return DSparkConfig(
        hidden_size=H,
        num_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_query_groups=cfg["query_groups"],
        kv_channels=H // cfg["heads"],
        ffn_hidden_size=cfg["ffn_hidden"],
        vocab_size=cfg["vocab"],
        target_model_type="llama",
        num_target_layers=num_target_layers,
        target_layer_ids=[1 + 3 * i for i in range(taps)],
        block_size=cfg["block_size"],
        num_anchors=cfg["num_anchors"],
        mask_token_id=cfg["vocab"] - 1,
        markov_rank=cfg["markov_rank"],
        confidence_head=True,
        confidence_with_markov=cfg["markov_rank"] > 0,
    ).validate()


def _make_inputs(dcfg, cfg: dict, count: int, seed: int) -> list:
    """``count`` micro-batches of draft inputs, identical in every process (seeded CPU RNG)."""
    import torch

    from megaspark.blocks import build_blocks, sample_anchors
    from megaspark.models.dspark.model import DraftInputs

    g = torch.Generator().manual_seed(seed)
    b, S, H, V = cfg["micro_batch_size"], cfg["seq_length"], dcfg.hidden_size, dcfg.vocab_size
    out = []
    for _ in range(count):
        input_ids = torch.randint(0, V - 1, (b, S), generator=g)  # V-1 is the mask token
        loss_mask = torch.ones(b, S, dtype=torch.long)
        loss_mask[:, : max(1, S // 8)] = 0  # an unsupervised prompt, then the response
        anchors, keep = sample_anchors(loss_mask, dcfg.num_anchors, generator=g)
        blocks = build_blocks(
            input_ids, loss_mask, anchors, keep, block_size=dcfg.block_size,
            mask_token_id=dcfg.mask_token_id, gamma=dcfg.gamma, convention=dcfg.convention,
            truncate_eval_mask=dcfg.truncate_eval_mask,
        )
        features = torch.randn(b, S, dcfg.context_width, generator=g)
        last_hidden = torch.randn(b, S, H, generator=g)
        out.append(DraftInputs.from_blocks(blocks, features, last_hidden))
    return out


def _loss_func(inputs, dcfg, record, sums):
    """pretrain_dspark.loss_func, also recording the (scaled) loss value."""
    loss = sums.loss(dcfg.alpha_ce, dcfg.alpha_l1, dcfg.alpha_conf, denominator=inputs.global_denominator)
    loss = loss * inputs.loss_scale
    record.append(float(loss.detach()))
    return loss, {"metrics": sums.metrics}


# ----------------------------------------------------------------------------- one process
def _pin(cpu):
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {available[cpu % len(available)]})


def _worker(rank: int, world_size: int, cfg: dict, ready, baseline_done) -> dict:
    """One rank of a PP=world_size run: time the schedule for every m, and the stage alone.

    The PP=1 process and the PP=p ranks start together (imports and model construction
    overlap), meet at ``ready``, then the PP=1 process measures alone while the PP ranks
    wait (blocked, using no CPU) for ``baseline_done``."""
    import torch

    _pin(rank if cfg["pin_cpus"] else None)
    torch.set_num_threads(1)

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megaspark.models.dspark.model import DSparkModel
    from megaspark.parallel import initialize_distributed

    pp = world_size
    initialize_distributed(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp,
                           backend="gloo", seed=cfg["seed"])
    torch.manual_seed(cfg["seed"])
    dcfg = _dspark_config(cfg)
    tcfg = dcfg.transformer_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp)
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    model = DSparkModel(tcfg, dcfg, pre_process=first, post_process=last, seed=cfg["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    ms = cfg["micro_batch_list"]
    all_inputs = _make_inputs(dcfg, cfg, max(ms), cfg["seed"] + 1)
    rows = cfg["seq_length"] + dcfg.num_anchors * dcfg.block_size
    forward_backward = get_forward_backward_func()
    record: list = []

    def forward_step(data_iterator, chunk):
        inputs = next(data_iterator)
        return chunk(inputs), lambda sums: _loss_func(inputs, dcfg, record, sums)

    def barrier():
        if world_size > 1:
            torch.distributed.barrier()

    ready.wait(timeout=cfg["timeout"])
    if world_size > 1 and not baseline_done.wait(timeout=cfg["timeout"]):
        raise TimeoutError("the PP=1 run did not finish in time")

    def step(m: int):
        inputs = all_inputs[:m]
        den = sum(float(x.weights.double().sum()) for x in inputs)
        for x in inputs:
            x.loss_scale = float(m)  # megatron divides by m: leaves Σnum / D
            x.global_denominator = torch.tensor(den, dtype=torch.float32)
        forward_backward(
            forward_step_func=forward_step, data_iterator=iter(inputs), model=[model],
            num_microbatches=m, seq_length=rows, micro_batch_size=cfg["micro_batch_size"],
            forward_only=False,
        )

    results = {}
    for m in ms:  # warm-up of every configuration, also the correctness check
        for p in params:
            p.grad = None
        record.clear()
        barrier()
        step(m)
        grad_sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        results[m] = dict(walls=[], cpus=[], loss=sum(record) / m if last else None, grad_sq=grad_sq)
    # timed repeats round-robin over m, so a burst of outside load hits every m alike
    for _ in range(cfg["repeats"]):
        for m in ms:
            for p in params:
                p.grad = None
            barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            step(m)
            barrier()
            results[m]["walls"].append(time.perf_counter() - t0)
            results[m]["cpus"].append(time.process_time() - c0)

    stage = None
    if world_size > 1:
        stage = _time_stage_alone(model, all_inputs[0], dcfg, cfg, rows, first, last, barrier)
    else:
        baseline_done.set()
    return dict(rank=rank, first=first, last=last, results=results, stage=stage,
                threads=torch.get_num_threads(),
                params=sum(p.numel() for p in params))


def _time_stage_alone(model, inputs, dcfg, cfg, rows, first, last, barrier) -> dict:
    """Forward + backward of this rank's stage for one micro-batch, no communication: a
    random incoming activation (non-first stages) and outgoing gradient (non-last stages).
    All ranks do this at the same time, as they would inside the pipeline."""
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 7)
    shape = (rows, cfg["micro_batch_size"], dcfg.hidden_size)
    x_in = None if first else torch.randn(shape, generator=g)
    grad_out = None if last else torch.randn(shape, generator=g) * 1e-3
    inputs.loss_scale = 1.0
    inputs.global_denominator = inputs.weights.sum()
    params = [p for p in model.parameters() if p.requires_grad]

    def once():
        for p in params:
            p.grad = None
        x = None
        if x_in is not None:
            x = x_in.clone().requires_grad_()
        model.set_input_tensor(x)
        out = model(inputs)
        if last:
            loss, _ = _loss_func(inputs, dcfg, [], out)
            loss.backward()
        else:
            out.backward(grad_out)
        model.set_input_tensor(None)

    barrier()
    once()  # warm-up
    times = []
    for _ in range(max(3, cfg["repeats"])):
        barrier()
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    barrier()
    return dict(times=times, time=statistics.median(times))


# ----------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(run, rank, world_size, port, cfg, ready, baseline_done, queue):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    try:
        import warnings

        warnings.filterwarnings("ignore")
        result = _worker(rank, world_size, cfg, ready, baseline_done)
        queue.put((run, rank, True, result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((run, rank, False, traceback.format_exc()))
    finally:
        try:
            from megaspark.parallel import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001
            pass


def _launch(pp: int, cfg: dict, timeout: float) -> tuple:
    """Spawn the PP=1 process (world size 1) and the ``pp`` gloo ranks of the PP run (their
    own process group); returns (PP=1 result, PP results by rank)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ready, baseline_done = ctx.Barrier(1 + pp), ctx.Event()
    runs = {1: (1, _free_port()), pp: (pp, _free_port())}
    procs = [
        ctx.Process(target=_child, args=(run, r, size, port, cfg, ready, baseline_done, queue))
        for run, (size, port) in runs.items() for r in range(size)
    ]
    for p in procs:
        p.start()
    results, error = {}, None
    try:
        deadline = time.monotonic() + timeout
        for _ in procs:
            run, rank, ok, payload = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if not ok:
                error = f"rank {rank} of the PP={run} run failed:\n{payload}"
                break  # the others are probably stuck in a barrier or p2p exchange
            results[(run, rank)] = payload
    except BaseException as e:  # noqa: BLE001 - timeout or interrupt: stop our processes
        error = error or f"the benchmark processes did not finish: {e!r}"
    finally:
        for p in procs:
            p.join(timeout=5 if error else timeout)
            if p.is_alive():
                p.terminate()
                p.join()
    if error:
        raise RuntimeError(error)
    return [results[(1, 0)]], [results[(pp, r)] for r in range(pp)]


# ----------------------------------------------------------------------------- driver
def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _summarise(ranks: list, m: int) -> dict:
    """Per repeat the slowest rank's wall time (they end at a common barrier), median."""
    walls = [max(r["results"][m]["walls"][i] for r in ranks)
             for i in range(len(ranks[0]["results"][m]["walls"]))]
    cpu_over_wall = [
        _median([c / w for c, w in zip(r["results"][m]["cpus"], r["results"][m]["walls"])])
        for r in ranks
    ]
    last = [r for r in ranks if r["last"]][0]
    return dict(
        time_s=_median(walls), times_s=walls, cpu_over_wall=cpu_over_wall,
        loss=last["results"][m]["loss"],
        grad_norm=math.sqrt(sum(r["results"][m]["grad_sq"] for r in ranks)),
    )


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def run_benchmark(args) -> int:
    p = args.pp
    ms = args.micro_batch_list
    cfg = dict(
        hidden=args.hidden, layers=args.layers, heads=args.heads, query_groups=args.query_groups,
        ffn_hidden=args.ffn_hidden, vocab=args.vocab, seq_length=args.seq_length,
        num_anchors=args.num_anchors, block_size=args.block_size, markov_rank=args.markov_rank,
        taps=args.taps, micro_batch_size=args.micro_batch_size, micro_batch_list=ms,
        repeats=args.repeats, seed=args.seed, pin_cpus=args.pin_cpus, timeout=args.timeout,
    )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = args.seq_length + args.num_anchors * args.block_size

    print(f"# bench_pipeline: pipeline efficiency of the DSpark draft, megatron-core 1F1B, p = {p} stages")
    print("#   T_pp1          forward+backward of m micro-batches, PP=1, one process (world size 1, 1 thread)")
    print(f"#   T_pp{p}          the same m micro-batches, same global weights, PP={p} on {p} gloo processes "
          "(1 thread each), 1F1B")
    print(f"#   efficiency     T_pp1 / ({p} * T_pp{p})   (speedup over PP=1 divided by the number of stages)")
    print(f"#   ideal          m / (m + {p} - 1)   (1F1B bubble with {p} equal stages, free communication)")
    print("#   measured/ideal efficiency / ideal")
    print(f"#   ideal|imbal.   m*sum(t) / ({p} * (sum(t) + (m-1)*max(t))), t = each stage's own "
          "fwd+bwd time for one micro-batch")
    print(f"# draft: hidden {args.hidden}, {args.layers} layers ({args.layers // p} per stage), heads "
          f"{args.heads}/{args.query_groups}x{args.hidden // args.heads}, ffn {args.ffn_hidden}, vocab "
          f"{args.vocab}, markov rank {args.markov_rank}, {args.taps} target taps | micro-batch "
          f"{args.micro_batch_size} x (seq {args.seq_length} + {args.num_anchors} anchors x block "
          f"{args.block_size} = {rows} rows) | fp32")
    print(f"# timing: 1 warm-up + median of {args.repeats} repeats (round-robin over m) per "
          f"configuration; PP=1 then PP={p}, both measured in this run, never at the same time")
    load_s = "n/a" if load0 is None else " ".join(f"{x:.2f}" for x in load0)
    print(f"# machine: {cpus} CPUs available, load average {load_s}"
          + (f"  (WARNING: PP={p} needs {p} free cores)" if load0 and load0[0] > 0.5 and cpus <= p else ""))
    sys.stdout.flush()

    t_start = time.perf_counter()
    base, pipe = _launch(p, cfg, args.timeout)
    t_all = time.perf_counter() - t_start
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

    stage_t = [r["stage"]["time"] for r in pipe]
    sum_t, max_t = sum(stage_t), max(stage_t)
    stage_desc = ", ".join(
        f"stage {r['rank']} {1e3 * t:.1f} ms ({r['params']:,} params)" for r, t in zip(pipe, stage_t)
    )
    print(f"# both runs {t_all:.1f} s wall incl. start-up; "
          f"load average after {' '.join(f'{x:.2f}' for x in load1) if load1 else 'n/a'}")
    print(f"# stage alone (fwd+bwd, 1 micro-batch): {stage_desc}; max/mean "
          f"{max_t / (sum_t / p):.2f}")

    rows_out, ok = [], True
    header = (f"{'m':>3} {'T_pp1 s':>9} {f'T_pp{p} s':>9} {'speedup':>8} {'effic.':>7} {'ideal':>6} "
              f"{'meas/ideal':>10} {'ideal|imbal.':>12} {'cpu/wall pp1':>12} {f'cpu/wall pp{p}':>14}  check")
    print()
    print(header)
    for m in ms:
        b = _summarise(base, m)
        q = _summarise(pipe, m)
        eff = b["time_s"] / (p * q["time_s"])
        ideal = m / (m + p - 1)
        ideal_imb = m * sum_t / (p * (sum_t + (m - 1) * max_t))
        d_loss, d_grad = _rel(b["loss"], q["loss"]), _rel(b["grad_norm"], q["grad_norm"])
        same = d_loss <= CHECK_RTOL and d_grad <= CHECK_RTOL
        ok &= same
        row = dict(
            m=m, t_pp1_s=b["time_s"], t_ppp_s=q["time_s"], speedup=b["time_s"] / q["time_s"],
            efficiency=eff, ideal=ideal, measured_over_ideal=eff / ideal,
            ideal_with_imbalance=ideal_imb, measured_over_ideal_with_imbalance=eff / ideal_imb,
            t_pp1_all_s=b["times_s"], t_ppp_all_s=q["times_s"],
            cpu_over_wall_pp1=b["cpu_over_wall"], cpu_over_wall_ppp=q["cpu_over_wall"],
            loss_pp1=b["loss"], loss_ppp=q["loss"], grad_norm_pp1=b["grad_norm"],
            grad_norm_ppp=q["grad_norm"], loss_rel_diff=d_loss, grad_norm_rel_diff=d_grad,
            same_result=same,
        )
        rows_out.append(row)
        cw1 = "/".join(f"{x:.2f}" for x in b["cpu_over_wall"])
        cwp = "/".join(f"{x:.2f}" for x in q["cpu_over_wall"])
        print(f"{m:>3} {b['time_s']:>9.3f} {q['time_s']:>9.3f} {row['speedup']:>7.2f}x {eff:>7.2f} "
              f"{ideal:>6.2f} {eff / ideal:>10.2f} {ideal_imb:>12.2f} {cw1:>12} {cwp:>14}  "
              f"{'same' if same else 'DIFFERENT'} (loss {d_loss:.1e}, |grad| {d_grad:.1e})")
    per_mb = [r["t_pp1_s"] / r["m"] for r in rows_out]
    spread = (max(per_mb) - min(per_mb)) / min(per_mb)
    print(f"# noise: T_pp1/m (should not depend on m) spans {min(per_mb):.3f}-{max(per_mb):.3f} s "
          f"(+{100 * spread:.0f}%)" + ("; outside load: repeat the run or raise --repeats"
                                        if spread > 0.1 else ""))
    print()
    for r in rows_out:
        print(f"m={r['m']}  efficiency {r['efficiency']:.2f}  ideal {r['ideal']:.2f}  "
              f"measured/ideal {r['measured_over_ideal']:.2f}")

    if args.json:
        out = dict(
            config={k: v for k, v in cfg.items()}, pp=p, rows_per_micro_batch=rows,
            cpus=cpus, load_average_before=load0, load_average_after=load1,
            stage_alone_s=stage_t, stage_alone_all_s=[r["stage"]["times"] for r in pipe],
            params_per_stage=[r["params"] for r in pipe], params_pp1=base[0]["params"],
            results=rows_out, t_pp1_per_micro_batch_spread=spread, same_result=ok,
        )
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"# results written to {args.json}")
    if not ok:
        print(f"ERROR: PP=1 and PP={p} did not compute the same loss / gradient norm; "
              "the timings are not of the same work", file=sys.stderr)
        return 1
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Pipeline efficiency of megaspark's DSpark draft under megatron-core's 1F1B "
        "schedule (PP=p gloo processes vs the same draft at PP=1 in one process), against the "
        "ideal m/(m+p-1). Both are measured in the same run.",
    )
    d = DEFAULTS
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes for a CI smoke run (explicit options still override)")
    ap.add_argument("--micro-batches", dest="micro_batches",
                    help=f"comma-separated micro-batch counts m (default {d['micro_batches']})")
    ap.add_argument("--hidden", type=int, help=f"draft hidden size (default {d['hidden']})")
    ap.add_argument("--layers", type=int, help=f"draft layers, divisible by --pp (default {d['layers']})")
    ap.add_argument("--heads", type=int, help=f"attention heads (default {d['heads']})")
    ap.add_argument("--query-groups", type=int, help=f"KV heads (default {d['query_groups']})")
    ap.add_argument("--ffn-hidden", type=int, help=f"MLP width (default {d['ffn_hidden']})")
    ap.add_argument("--vocab", type=int, help=f"vocabulary size (default {d['vocab']})")
    ap.add_argument("--seq-length", type=int, help=f"context length S (default {d['seq_length']})")
    ap.add_argument("--num-anchors", type=int, help=f"anchors per sequence N (default {d['num_anchors']})")
    ap.add_argument("--block-size", type=int, help=f"block size B (default {d['block_size']})")
    ap.add_argument("--markov-rank", type=int, help=f"Markov head rank (default {d['markov_rank']})")
    ap.add_argument("--taps", type=int, help=f"target layers feeding the context (default {d['taps']})")
    ap.add_argument("--micro-batch-size", type=int,
                    help=f"sequences per micro-batch (default {d['micro_batch_size']})")
    ap.add_argument("--repeats", type=int, help=f"timed repeats per configuration, median "
                    f"reported (default {d['repeats']}; --quick {QUICK['repeats']})")
    ap.add_argument("--pp", type=int, default=2, help="pipeline stages p = processes of the "
                    "pipelined run (default 2; more than the free cores measures the OS scheduler)")
    ap.add_argument("--pin-cpus", action="store_true",
                    help="pin rank r to the r-th available CPU (the PP=1 process to the first)")
    ap.add_argument("--seed", type=int, default=1234, help="weights and inputs seed (default 1234)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds allowed for both runs before their processes are stopped "
                    "(default 3600)")
    ap.add_argument("--json", metavar="PATH", help="also write all results to this JSON file")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.micro_batch_list = [int(x) for x in str(args.micro_batches).split(",") if x.strip()]
    except ValueError:
        ap.error(f"--micro-batches must be comma-separated integers, got {args.micro_batches!r}")
    if not args.micro_batch_list or min(args.micro_batch_list) < 1:
        ap.error("--micro-batches needs at least one count, each >= 1")
    for k in DEFAULTS:
        if k != "micro_batches" and getattr(args, k) < (0 if k == "markov_rank" else 1):
            ap.error(f"--{k.replace('_', '-')} must be >= {0 if k == 'markov_rank' else 1}")
    if args.pp < 2:
        ap.error("--pp must be >= 2 (PP=1 is the baseline)")
    if args.layers % args.pp:
        ap.error(f"--layers ({args.layers}) must be divisible by --pp ({args.pp})")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        ap.error("--hidden must be a multiple of --heads with an even head dimension")
    if args.heads % args.query_groups:
        ap.error("--heads must be a multiple of --query-groups")
    if args.seq_length < 2:
        ap.error("--seq-length must be >= 2")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before torch loads
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    try:
        return run_benchmark(args)
    except RuntimeError as e:
        print(f"bench_pipeline.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
