#!/usr/bin/env python3
"""The per-node commands of a multi-node megaspark run with one SGLang engine per node.

Used by ``launch.sh`` (the sbatch script) and by ``tests/test_slurm.py``. Standard library
only: it also runs on a login/batch host outside the container.

For every node it renders

1. the SGLang engine (``python3 -m sglang.launch_server``) in aux-hidden-state mode, bound
   to 127.0.0.1 on that node (the flags match ``megaspark.targets.sglang.engine_kwargs``;
   a test checks that),
2. a wait for the engine's ``/health``,
3. the trainer: ``torchrun`` with a static rendezvous at ``<first host>:<MASTER_PORT>``,
   ``--nnodes N --node-rank i --nproc-per-node G``, told where its node's engine is by
   ``MEGASPARK_SGLANG_URL``.

GPU split (``SGLANG_GPUS``):

* ``0`` (default, *shared*): the engine uses every GPU of the node (``SGLANG_TP_SIZE`` x
  ``SGLANG_DP_SIZE`` = G, default TP 1 x DP G: one replica per GPU) but only
  ``SGLANG_MEM_FRACTION`` (default 0.35) of each GPU's memory; the G trainer ranks use the
  rest. Target prefill and draft step alternate (a rank waits for its features), so the
  compute is time-shared rather than contended.
* ``K > 0`` (*dedicated*): the engine owns the last K GPUs (``--base-gpu-id G-K``, default
  memory fraction 0.85) and the trainer runs G-K ranks on the first G-K GPUs
  (``CUDA_VISIBLE_DEVICES``).

Usage::

    render_commands.py --hosts n1,n2 [--dry-run | --node-rank I --script] [--format text|json] -- TRAIN_ARGS...

Settings come from the environment (see examples/slurm/README.md): TARGET_MODEL,
TARGET_LAYER_IDS, TARGET_NUM_LAYERS, GPUS_PER_NODE, MASTER_PORT, SGLANG_PORT, SGLANG_GPUS,
SGLANG_TP_SIZE, SGLANG_DP_SIZE, SGLANG_MEM_FRACTION, SEQ_LENGTH, SEED, LAST_HIDDEN,
LOG_DIR, PYTHON, SHUTDOWN_TIMEOUT, SLURM_JOB_ID, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE.

The trainer always gets ``--exit-signal-handler`` and torchrun forwards SIGUSR1/SIGTERM to
it (``--signals-to-handle``, ``--shutdown-timeout SHUTDOWN_TIMEOUT``, default 600 s): see
docs/reliability.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

DEFAULT_NUM_TAPS = 5


class RenderError(ValueError):
    pass


def default_layer_ids(num_layers: int, n: int = DEFAULT_NUM_TAPS) -> list:
    """DFlash default taps (DSPARK_SPEC.md §1.2; same rule as megaspark.targets.base)."""
    N = int(num_layers)
    n = max(1, min(n, N - 3))
    if n == 1:
        return [N // 2]
    return [round(1 + i * (N - 4) / (n - 1)) for i in range(n)]


def capture_ids(layer_ids, num_layers: int, last_hidden: str = "tail") -> list:
    """What the engine captures: the taps, plus layer N-2 for the local tail."""
    N = int(num_layers)
    ids = [int(k) for k in layer_ids]
    if not ids or any(b <= a for a, b in zip(ids, ids[1:])) or not all(0 <= k <= N - 2 for k in ids):
        raise RenderError(f"TARGET_LAYER_IDS {ids} must be strictly increasing ids in 0..{N - 2} "
                          f"for a {N}-layer target")
    if last_hidden == "tail":
        return sorted(set(ids) | {N - 2})
    if last_hidden == "engine":
        return ids
    raise RenderError(f"LAST_HIDDEN must be 'tail' or 'engine', got {last_hidden!r}")


def gpus_per_node(env) -> int:
    for key in ("GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        v = env.get(key)
        if v:
            m = re.search(r"(\d+)\s*$", v.split(",")[0])  # "8" or "h100:8"
            if m:
                return int(m.group(1))
    return 8


def num_target_layers(env) -> int:
    if env.get("TARGET_NUM_LAYERS"):
        return int(env["TARGET_NUM_LAYERS"])
    cfg = os.path.join(env.get("TARGET_MODEL", ""), "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            c = json.load(f)
        c = c.get("text_config", c)
        return int(c["num_hidden_layers"])
    raise RenderError("set TARGET_NUM_LAYERS (or TARGET_MODEL to a directory with config.json)")


def node_plan(hosts, node_rank: int, train_args, env) -> dict:
    """Commands and GPU assignment of one node."""
    nnodes = int(env.get("NNODES") or len(hosts))
    if nnodes != len(hosts):
        raise RenderError(f"{nnodes} nodes requested but {len(hosts)} host names: {hosts}")
    if not 0 <= node_rank < nnodes:
        raise RenderError(f"node rank {node_rank} out of range for {nnodes} nodes")
    G = gpus_per_node(env)
    K = int(env.get("SGLANG_GPUS", "0"))
    if not 0 <= K < G:
        raise RenderError(f"SGLANG_GPUS={K} must be in [0, {G - 1}] for {G} GPUs per node")
    shared = K == 0
    engine_gpus = list(range(G)) if shared else list(range(G - K, G))
    trainer_gpus = list(range(G)) if shared else list(range(G - K))
    tp = int(env.get("SGLANG_TP_SIZE", "1"))
    if len(engine_gpus) % tp:
        raise RenderError(f"SGLANG_TP_SIZE={tp} does not divide the engine's {len(engine_gpus)} GPUs")
    dp = int(env.get("SGLANG_DP_SIZE") or len(engine_gpus) // tp)
    if tp * dp > len(engine_gpus):
        raise RenderError(f"SGLANG_TP_SIZE x SGLANG_DP_SIZE = {tp * dp} > {len(engine_gpus)} engine GPUs")
    mem = env.get("SGLANG_MEM_FRACTION") or ("0.35" if shared else "0.85")
    model = env.get("TARGET_MODEL")
    if not model:
        raise RenderError("set TARGET_MODEL (the target's HF directory, visible on every node)")
    N = num_target_layers(env)
    taps = [int(x) for x in env["TARGET_LAYER_IDS"].replace(",", " ").split()] if env.get("TARGET_LAYER_IDS") \
        else default_layer_ids(N)
    last_hidden = env.get("LAST_HIDDEN", "tail")
    capture = capture_ids(taps, N, last_hidden)
    py = env.get("PYTHON", "python3")
    port = int(env.get("SGLANG_PORT", "30000"))
    url = f"http://127.0.0.1:{port}"

    # Same fields and order as megaspark.targets.sglang.engine_kwargs + server_argv.
    engine = [py, "-m", "sglang.launch_server",
              "--model-path", model, "--tp-size", str(tp), "--mem-fraction-static", str(mem),
              "--dtype", env.get("SGLANG_DTYPE", "bfloat16"), "--random-seed", env.get("SEED", "42"),
              "--skip-tokenizer-init", "--disable-radix-cache", "--chunked-prefill-size", "-1"]
    if dp != 1:
        engine += ["--dp-size", str(dp)]
    if engine_gpus[0] != 0:
        engine += ["--base-gpu-id", str(engine_gpus[0])]
    engine += ["--context-length", env.get("SEQ_LENGTH", "4096"),
               "--enable-return-aux-hidden-states", "--speculative-algorithm", "DSPARK",
               "--return-aux-hidden-state-layer-ids", *[str(k) for k in capture],
               "--host", "127.0.0.1", "--port", str(port)]

    master_port = env.get("MASTER_PORT", "29500")
    trainer_env = [f"MEGASPARK_SGLANG_URL={url}"]
    if not shared:
        trainer_env.append("CUDA_VISIBLE_DEVICES=" + ",".join(str(g) for g in trainer_gpus))
    # Preemption (docs/reliability.md): torchrun forwards SIGUSR1 (launch.sh's time-limit
    # signal) as well as SIGTERM (preemption) to its ranks, which save and exit 0; it waits
    # SHUTDOWN_TIMEOUT seconds for that save before killing them.
    trainer = ["env", *trainer_env, "torchrun",
               "--nnodes", str(nnodes), "--node-rank", str(node_rank),
               "--nproc-per-node", str(len(trainer_gpus)),
               "--rdzv-backend", "static", "--rdzv-endpoint", f"{hosts[0]}:{master_port}",
               "--rdzv-id", env.get("SLURM_JOB_ID", "megaspark"),
               "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
               "--shutdown-timeout", env.get("SHUTDOWN_TIMEOUT", "600"),
               "pretrain_dspark.py",
               "--target-backend", "sglang-server", "--target-model", model,
               "--target-layer-ids", *[str(k) for k in taps],
               *([] if "--exit-signal-handler" in train_args else ["--exit-signal-handler"]),
               *train_args]
    return {
        "node_rank": node_rank, "host": hosts[node_rank], "nnodes": nnodes, "gpus_per_node": G,
        "mode": "shared" if shared else "dedicated", "engine_gpus": engine_gpus,
        "trainer_gpus": trainer_gpus, "engine_tp": tp, "engine_dp": dp, "mem_fraction": float(mem),
        "capture_layer_ids": capture, "target_layer_ids": taps, "engine_url": url,
        "rendezvous": f"{hosts[0]}:{master_port}",
        "engine": engine, "wait": ["curl", "-sf", f"{url}/health"], "trainer": trainer,
    }


def q(argv) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def node_script(plan: dict, log_dir: str, wait_seconds: int = 1800) -> str:
    """The bash program one node runs: engine in the background, wait, trainer."""
    r = plan["node_rank"]
    log = f"{log_dir}/sglang-node{r}.log"
    return "\n".join([
        "set -euo pipefail",
        "# SIGUSR1 (the time-limit signal) is for the trainer: this shell and the engine ignore",
        "# it (torchrun and the trainer ranks install their own handlers)",
        "trap '' USR1",
        f"mkdir -p {shlex.quote(log_dir)}",
        f"{q(plan['engine'])} > {shlex.quote(log)} 2>&1 &",
        "ENGINE_PID=$!",
        "trap 'kill \"$ENGINE_PID\" 2>/dev/null || true' EXIT",
        f"deadline=$((SECONDS + {int(wait_seconds)}))",
        f"until {q(plan['wait'])} > /dev/null; do",
        f"  kill -0 \"$ENGINE_PID\" 2>/dev/null || {{ echo 'SGLang engine on node {r} exited, see {log}' >&2; exit 1; }}",
        f"  [ \"$SECONDS\" -lt \"$deadline\" ] || {{ echo 'SGLang engine on node {r} not ready after {int(wait_seconds)} s' >&2; exit 1; }}",
        "  sleep 5",
        "done",
        q(plan["trainer"]),
        "",
    ])


def render_text(plans) -> str:
    out = []
    for p in plans:
        out.append(f"# node {p['node_rank']} ({p['host']}): {p['gpus_per_node']} GPUs, {p['mode']}: "
                   f"engine GPUs {p['engine_gpus']} (TP {p['engine_tp']} x DP {p['engine_dp']}, "
                   f"mem-fraction {p['mem_fraction']}), trainer GPUs {p['trainer_gpus']}")
        out.append("engine:  " + q(p["engine"]))
        out.append("wait:    " + q(p["wait"]))
        out.append("trainer: " + q(p["trainer"]))
    return "\n".join(out) + "\n"


def main(argv=None, env=None) -> int:
    env = dict(os.environ if env is None else env)
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", required=True, help="comma-separated host names, node rank order")
    ap.add_argument("--dry-run", action="store_true", help="print every node's commands")
    ap.add_argument("--node-rank", type=int, default=None, help="render this node only")
    ap.add_argument("--script", action="store_true", help="print the node's bash program")
    ap.add_argument("--format", choices=["text", "json"], default="text")
    a = ap.parse_args(argv)
    hosts = [h for h in a.hosts.split(",") if h]
    try:
        if a.script:
            if a.node_rank is None:
                raise RenderError("--script needs --node-rank")
            plan = node_plan(hosts, a.node_rank, train_args, env)
            sys.stdout.write(node_script(plan, env.get("LOG_DIR", "logs")))
            return 0
        ranks = range(len(hosts)) if a.node_rank is None else [a.node_rank]
        plans = [node_plan(hosts, r, train_args, env) for r in ranks]
    except RenderError as e:
        print(f"render_commands.py: error: {e}", file=sys.stderr)
        return 2
    if a.format == "json":
        sys.stdout.write(json.dumps(plans, indent=1) + "\n")
    else:
        sys.stdout.write(render_text(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
