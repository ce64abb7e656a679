#!/usr/bin/env python
"""Print the start-up memory plan of a run from the target's ``config.json`` alone.

    python tools/memory_plan.py --world-size 8 --target-model /models/Qwen3-8B \\
        --num-layers 5 --bf16 --seq-length 4096 --micro-batch-size 1 --global-batch-size 512 ...

Takes ``pretrain_dspark.py``'s flags (the same parser and validation, with the world size
from ``--world-size``) and needs no weights and no data: ``--target-model`` may be a
directory holding only the target's ``config.json``, and ``--data-path`` defaults to an
empty scratch directory. For every distinct rank role — first / middle / last pipeline
stage, running the target or not — it prints what the rank will hold
(:mod:`megaspark.memory_plan`): draft parameters, gradients, optimizer state with and
without ``--use-distributed-optimizer``, the target's weights and activations, the draft
inputs of a step and the draft's activations.

Exit status: 0 when every rank fits ``--memory-budget-gb`` (default here: 80), 1 when one
does not (the message names the largest items and the flags that shrink them), 2 on a bad
flag or config. ``--json`` prints the plans as JSON instead.

Not in the plan: the CUDA context, communication buffers (NCCL) and allocator
fragmentation (leave a few GB), and a co-located SGLang engine's share of the GPU
(``--target-backend sglang``: subtract its ``--sglang-mem-fraction-static`` from the budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

DEFAULT_BUDGET_GB = 80.0


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="tools/memory_plan.py",
        description="Memory plan per rank of a pretrain_dspark.py run, from the target's config "
        "alone. Every other flag is pretrain_dspark.py's (see its --help).",
    )
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="number of training processes (GPUs)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    own, rest = p.parse_known_args(argv)
    return own, rest


def _has_flag(argv, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _hf_config(target_model: str):
    from megaspark.targets.hf import load_config_offline

    path = target_model
    if target_model.startswith("builtin:"):
        from megaspark.targets.builtin import resolve_target

        path = resolve_target(target_model)
    return load_config_offline(path).get_text_config()


def _resolve_target_dtype(args):
    """``--target-dtype`` for the GPU run being planned (``auto``: bf16, as on a GPU)."""
    import torch

    from megaspark import platform

    return platform.target_dtype(args.target_dtype, args.bf16, torch.device("cuda"))


def rank_plans(args, dcfg, hf_config, world_size: int) -> list:
    """[(ranks, plan)] for every distinct rank role: each pipeline stage's TP rank 0 (which runs
    the target on the first stage with ``--target-backend hf``) and its other TP ranks;
    middle stages are reduced to the one needing the most memory."""
    from megaspark.arguments.configs import plan_settings
    from megaspark.memory_plan import plan_memory

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    from megaspark.targets.base import IN_PROCESS_BACKENDS

    in_process_target = args.target_backend in IN_PROCESS_BACKENDS
    plans = []
    for pp_rank in range(pp):
        for tp_rank in sorted({0, tp - 1}):
            computes = in_process_target and pp_rank == 0 and tp_rank == 0
            plan = plan_memory(plan_settings(args), dcfg, hf_config, tp_rank=tp_rank, pp_rank=pp_rank,
                               dp_size=dp, computes_target=computes)
            # global ranks (megatron order: TP fastest, then DP, then PP)
            ranks = [pp_rank * tp * dp + d * tp + t for d in range(dp) for t in range(tp)
                     if (t == 0) == (tp_rank == 0)]
            plans.append((pp_rank, tp_rank, ranks, plan))
    middle = [x for x in plans if 0 < x[0] < pp - 1]
    keep = [x for x in plans if x[0] in (0, pp - 1)]
    if middle:
        keep.append(max(middle, key=lambda x: x[3].total))
    keep.sort(key=lambda x: (x[0], x[1]))
    out, seen = [], set()
    for pp_rank, tp_rank, ranks, plan in keep:
        key = (pp_rank, plan.total, plan.target_weights)
        if key in seen:
            continue
        seen.add(key)
        out.append((ranks, plan))
    return out


def main(argv=None) -> int:
    own, rest = _parse(sys.argv[1:] if argv is None else argv)
    scratch = None
    if not _has_flag(rest, "--data-path"):
        scratch = tempfile.TemporaryDirectory(prefix="memory-plan-")
        rest = [*rest, "--data-path", scratch.name]
    try:
        from megaspark.arguments import ArgumentError, parse_args
        from megaspark.config import ConfigError
        from megaspark.memory_plan import MemoryPlanError, _fmt, budget_bytes

        try:
            args = parse_args(rest, world_size=own.world_size)
            if args.memory_budget_gb is None:
                args.memory_budget_gb = DEFAULT_BUDGET_GB
            args.target_dtype_resolved = _resolve_target_dtype(args)
            hf_config = _hf_config(args.target_model)
            from megaspark.training.pretrain import draft_config

            dcfg = draft_config(args, hf_config)
            if args.mask_token_id is not None:
                dcfg.mask_token_id = args.mask_token_id
            dcfg.validate(args.tensor_model_parallel_size)
            plans = rank_plans(args, dcfg, hf_config, own.world_size)
        except (ArgumentError, ConfigError, MemoryPlanError, OSError, ValueError) as e:
            print(f"memory_plan.py: error: {e}", file=sys.stderr)
            return 2
        budget = budget_bytes(args.memory_budget_gb)
        failures = []
        for ranks, plan in plans:
            try:
                plan.check(budget)
            except MemoryPlanError as e:
                failures.append((ranks, e))
        if own.json:
            print(json.dumps([dict(ranks=ranks, fits=plan.total <= budget, **dataclasses.asdict(plan))
                              for ranks, plan in plans], indent=1))
        else:
            tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
            vpp = args.virtual_pipeline_model_parallel_size
            print(f"world {own.world_size} = TP {tp} x PP {pp}{f' (x{vpp} virtual)' if vpp else ''} "
                  f"x DP {args.data_parallel_size}; {args.num_microbatches} micro-batch"
                  f"{'es' if args.num_microbatches != 1 else ''} of {args.micro_batch_size} x "
                  f"{args.seq_length} tokens per step and rank; draft {dcfg.num_layers} layers, "
                  f"anchors {dcfg.num_anchors} x block {dcfg.block_size}; "
                  f"{'bf16' if args.bf16 else 'fp32'} draft, target {args.target_backend} in "
                  f"{str(args.target_dtype_resolved).replace('torch.', '')}; budget "
                  f"{args.memory_budget_gb:g} GB = {_fmt(budget)} per rank")
            for ranks, plan in plans:
                shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
                print()
                print(plan.format().replace("memory plan (", f"ranks {shown}: memory plan (", 1))
                print(f"  -> {'fits' if plan.total <= budget else 'DOES NOT FIT'}")
        for ranks, e in failures:
            print(f"memory_plan.py: ranks {ranks[:8]}{'...' if len(ranks) > 8 else ''}: "
                  f"{str(e).splitlines()[0]}", file=sys.stderr)
        return 1 if failures else 0
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
