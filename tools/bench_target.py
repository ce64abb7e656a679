#!/usr/bin/env python
"""Target features per second from each way megaspark can run the frozen target.

Same token sequences, same micro-batches, one run, one process (plus the engine's own
scheduler process for the server client):

* ``hf``: the embedded HF transformers provider (``--target-backend hf``), the baseline
  every ratio is taken against;
* ``sglang``: SGLang's ``ModelRunner`` in this process (``--target-backend sglang``):
  one prefill per micro-batch, tensors out;
* ``sglang-server``: the client of a separate SGLang engine (``--target-backend
  sglang-server``): an ``sglang.Engine`` whose scheduler runs in its own process, asked
  through ``generate``; hidden states come back as nested Python lists. A server
  reached over HTTP would also serialize them as JSON; the JSON round trip of the same
  responses is timed separately and added to give that client's cost.

The sequences are the built-in prompts (chatterbot-corpus and HumanEval, through the
target's chat template) concatenated and cut to lengths drawn uniformly from
``[--min-len, --max-len]``, so micro-batches mix lengths as training does. Each backend
computes all micro-batches ``--repeats`` times after one warm-up pass; the median pass
is reported as target tokens/s and ms per sample, with start-up time and the ratio to
HF; the passes of the backends are interleaved, so that load changes hit all alike. On
a CPU everything runs in fp32 with ``--threads`` torch threads.

Example::

    python tools/bench_target.py                          # SmolLM2-135M, 32 samples
    python tools/bench_target.py --backends hf sglang --json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

BACKENDS = ("hf", "sglang", "sglang-server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target-model", default="builtin:smollm2-135m")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def token_sequences(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` sequences of real text, lengths uniform in ``[lo, hi]``."""
    from megaspark.data.sources import builtin_prompt_conversations

    stream: list[int] = []
    for conv in builtin_prompt_conversations():
        msgs = [m for m in conv["messages"] if m.get("content")]
        if not msgs:
            continue
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= n * hi:
            break
    rng = random.Random(seed)
    out, pos = [], 0
    for _ in range(n):
        k = rng.randint(lo, hi)
        if pos + k > len(stream):
            pos = 0
        out.append(stream[pos:pos + k])
        pos += k
    return out


def micro_batches(seqs: list[list[int]], mbs: int):
    import torch

    out = []
    for b in range(0, len(seqs), mbs):
        group = seqs[b:b + mbs]
        S = max(len(s) for s in group)
        ids = torch.zeros(len(group), S, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(group):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        out.append((ids, mask))
    return out


def build(backend: str, model: str, max_tokens: int):
    import torch

    if backend == "hf":
        from megaspark.targets.hf import HFTargetProvider

        return HFTargetProvider(model, dtype=torch.float32, device="cpu")
    if backend == "sglang":
        from megaspark.targets.sglang_colocated import SGLangColocatedProvider

        return SGLangColocatedProvider(model, device="cpu", dtype=torch.float32, max_tokens=max_tokens)
    from megaspark.targets.sglang import SGLangOptions, SGLangTargetProvider

    opts = SGLangOptions(device="cpu", dtype="float32", max_tokens_per_request=max_tokens)
    return SGLangTargetProvider(model, options=opts, dtype=torch.float32, device="cpu")


class JSONTimer:
    """Wraps the server client's engine: times the JSON round trip of each response (what
    an HTTP server adds on top of the in-process Engine's Python lists)."""

    def __init__(self, engine):
        self.engine, self.seconds = engine, 0.0

    def generate(self, request):
        out = self.engine.generate(request)
        t = time.perf_counter()
        back = json.loads(json.dumps(out))
        self.seconds += time.perf_counter() - t
        return back

    def shutdown(self):
        self.engine.shutdown()


def measure_all(args, batches, n_tokens: int) -> list:
    """Build every backend (start-up timed with its first pass), then time the passes
    interleaved (backend A, B, C, A, B, C, ...) so that a change of machine load hits all
    of them alike; the median pass of each is reported."""
    import torch

    built = []
    for backend in args.backends:
        t0 = time.perf_counter()
        provider = build(backend, args.target_model, args.micro_batch_size * args.max_len)
        timer = None
        if backend == "sglang-server":
            timer = JSONTimer(provider.engine())
            provider._engine = timer
        torch.set_num_threads(args.threads)
        first = [provider.compute(ids, mask) for ids, mask in batches]  # warm-up (and start-up)
        built.append(dict(backend=backend, provider=provider, timer=timer, first=first,
                          startup=time.perf_counter() - t0, passes=[], json=[]))
    for _ in range(args.repeats):
        for b in built:
            if b["timer"]:
                b["timer"].seconds = 0.0
            t = time.perf_counter()
            for ids, mask in batches:
                b["provider"].compute(ids, mask)
            b["passes"].append(time.perf_counter() - t)
            b["json"].append(b["timer"].seconds if b["timer"] else 0.0)
    results = []
    for b in built:
        if hasattr(b["provider"], "close"):
            b["provider"].close()
        sec = statistics.median(b["passes"])
        res = {"backend": b["backend"], "startup_s": round(b["startup"], 2), "pass_s": round(sec, 4),
               "tokens_per_s": round(n_tokens / sec, 1),
               "ms_per_sample": round(1000 * sec / args.num_samples, 2)}
        if b["timer"]:
            j = statistics.median(b["json"])
            res["json_roundtrip_s"] = round(j, 4)
            res["http_ms_per_sample"] = round(1000 * (sec + j) / args.num_samples, 2)
        res["_first"] = b["first"]
        results.append(res)
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from megaspark.targets.builtin import resolve_target
    from megaspark.targets.hf import load_tokenizer_offline

    tok = load_tokenizer_offline(resolve_target(args.target_model))
    seqs = token_sequences(tok, args.num_samples, args.min_len, args.max_len, args.seed)
    batches = micro_batches(seqs, args.micro_batch_size)
    n_tokens = sum(len(s) for s in seqs)
    results = measure_all(args, batches, n_tokens)
    # the features must agree (fp32, CPU) for the speed comparison to mean anything
    ref = results[0].pop("_first")
    for r in results[1:]:
        got = r.pop("_first")
        diff = 0.0
        for (ids, mask), a, b in zip(batches, ref, got):
            m = mask[..., None].bool()
            diff = max(diff, (a.aux_hidden_states - b.aux_hidden_states).masked_fill(~m, 0).abs().max().item(),
                       (a.last_hidden_states - b.last_hidden_states).masked_fill(~m, 0).abs().max().item())
        r[f"max_abs_diff_vs_{results[0]['backend']}"] = diff
    base = results[0]
    for r in results:
        r["speed_vs_" + base["backend"]] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
    summary = {"target": args.target_model, "samples": args.num_samples, "tokens": n_tokens,
               "lengths": [args.min_len, args.max_len], "micro_batch_size": args.micro_batch_size,
               "threads": args.threads, "repeats": args.repeats, "results": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"target {args.target_model}: {args.num_samples} samples, {n_tokens} tokens "
          f"(lengths {args.min_len}-{args.max_len}), micro-batches of {args.micro_batch_size}, "
          f"{args.threads} threads, median of {args.repeats} passes, fp32 CPU")
    print(f"{'backend':<15}{'start-up s':>11}{'tokens/s':>11}{'ms/sample':>11}{'vs ' + base['backend']:>9}"
          f"{'max |diff|':>12}")
    for r in results:
        d = r.get(f"max_abs_diff_vs_{base['backend']}", 0.0)
        print(f"{r['backend']:<15}{r['startup_s']:>11.1f}{r['tokens_per_s']:>11.0f}{r['ms_per_sample']:>11.2f}"
              f"{r['speed_vs_' + base['backend']]:>8.2f}x{d:>12.2e}")
        if "http_ms_per_sample" in r:
            print(f"{'  + JSON (HTTP)':<15}{'':>11}{'':>11}{r['http_ms_per_sample']:>11.2f}"
                  f"   (JSON round trip of the responses: {r['json_roundtrip_s']:.3f} s per pass)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
