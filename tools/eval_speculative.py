#!/usr/bin/env python
"""Measure a DSpark draft by real speculative decoding against its target.

An Eagle3 draft (an ``LlamaForCausalLMEagle3`` export or an ``--algorithm eagle3``
checkpoint) is recognised and decoded by chain drafting of ``--num-speculative-tokens``
per round (megaspark/inference/eagle3.py); the report is the same (no confidences).

Loads the draft (an HF export directory or a megaspark training checkpoint) at TP = 1 in
a one-rank process group, runs every prompt through the speculative decoder
(DSPARK_SPEC.md §7) and through plain target-only decoding with the same sampling
settings, and reports:

* the measured acceptance length τ (mean accepted drafts + 1 per verification round),
  per-position acceptance and the verify rate;
* tokens/s of speculative and of target-only decoding in the same run, and the speed-up;
* the confidence calibration (ECE over 20 bins, Brier, AUROC of the cumulative product of
  the per-slot confidences against prefix acceptance), at ``--confidence-threshold 0``;
* at temperature 0, how many outputs equal the target's greedy output (all of them, or
  the decoder is broken);
* for a megaspark checkpoint, the analytic τ of its last evaluation (``best_eval_tau`` of
  the checkpoint, or the last ``eval`` line of ``--metrics-jsonl``), for comparison.

Examples::

    python tools/eval_speculative.py --draft runs/dspark/ --target-model builtin:smollm2-135m \\
        --data-path data/smollm2 --num-prompts 8 --max-new-tokens 128 --json eval.json
    python tools/eval_speculative.py --draft export/ --prompts prompts.jsonl --temperature 0 \\
        --confidence-threshold 0.5

Prompt files hold one JSON object per line: ``{"prompt": "..."}`` (one user turn through
the chat template), ``{"messages": [...]}`` / ``{"conversations": [...]}`` (the turns
before the first assistant turn), ``{"text": "..."}`` (plain text) or
``{"input_ids": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Examples:\n" + __doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--draft", required=True,
                   help="HF export directory (config.json + model.safetensors) or megaspark "
                        "checkpoint (a --save directory with 'latest', or one iter_N directory)")
    p.add_argument("--target-model", default=None,
                   help="builtin:smollm2-135m or a local HF model directory (default: the target "
                        "recorded in the checkpoint / export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="JSONL file of prompts (formats below)")
    src.add_argument("--data-path", help="prepared dataset directory: prompts of its valid split")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts to decode (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; < 1e-5 is greedy (default 0)")
    p.add_argument("--num-speculative-tokens", type=int, default=5,
                   help="Eagle3 drafts: tokens drafted per round by chaining the draft (default 5)")
    p.add_argument("--confidence-threshold", type=float, default=0.0,
                   help="propose drafts up to the first slot whose confidence is below this; 0 "
                        "proposes the whole block and measures calibration (default 0)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is sampled with seed + i")
    p.add_argument("--json", default=None, help="write the full report here")
    p.add_argument("--metrics-jsonl", default=None,
                   help="training log (--log-jsonl of pretrain_dspark.py): report the analytic tau "
                        "of its last eval line")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the target's end-of-sequence tokens")
    p.add_argument("--raw-prompts", action="store_true",
                   help="tokenise {'prompt': ...} records as plain text (no chat template)")
    p.add_argument("--no-baseline", action="store_true", help="skip target-only decoding")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="where the draft and the target run (auto: the GPU when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the target and the draft (auto: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _draft_metadata(path: str) -> dict:
    """Target name and analytic τ recorded with the draft, if any."""
    from megaspark.checkpoint_files import read_state, resolve_checkpoint

    meta = {"kind": None, "target": None, "best_eval_tau": None}
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            meta.update(kind="hf_export", target=json.load(f).get("dspark_target"))
        return meta
    try:
        ckpt = resolve_checkpoint(path)
    except Exception:  # noqa: BLE001 - load_draft reports what is wrong with the path
        return meta
    state = read_state(ckpt)
    meta.update(kind="megaspark_checkpoint", checkpoint=ckpt, iteration=state.get("iteration"),
                target=(state.get("args") or {}).get("target_model"),
                best_eval_tau=state.get("best_eval_tau"))
    return meta


def last_eval_tau(path: str):
    """τ of the last ``"kind": "eval"`` record of a training metrics JSONL."""
    tau = None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "eval" and rec.get("tau") is not None:
                tau = float(rec["tau"])
    return tau


def _stop_ids(provider) -> list:
    ids = set()
    for src in (getattr(provider.model, "generation_config", None), provider.hf_config,
                provider.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(int(i) for i in ids if i is not None)


def _load_prompts(args, tokenizer):
    from megaspark.inference.evaluate import load_prompts_jsonl, load_prompts_prepared

    if args.prompts:
        return load_prompts_jsonl(args.prompts, tokenizer, args.num_prompts, raw=args.raw_prompts)
    return load_prompts_prepared(args.data_path, "valid", args.num_prompts)


def _finish(args, report, meta, target_name, device, dtype) -> int:
    from megaspark.inference.evaluate import format_report

    report["target"] = target_name
    if args.metrics_jsonl:
        report["metrics_jsonl_tau"] = last_eval_tau(args.metrics_jsonl)
    best = meta.get("best_eval_tau")
    if best is not None and math.isfinite(float(best)):
        report["checkpoint_best_eval_tau"] = float(best)
    report["device"], report["dtype"] = str(device), str(dtype).replace("torch.", "")
    print(f"draft {args.draft} ({meta.get('kind') or 'unknown format'}), target {target_name} "
          f"({report['device']}, {report['dtype']})")
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=lambda x: None)
            f.write("\n")
    return 0


def _eval_eagle3(args, meta, target_name, device, dtype) -> int:
    """An Eagle3 draft (export or ``--algorithm eagle3`` checkpoint): chain drafting of
    --num-speculative-tokens per round."""
    from megaspark.export.eagle3 import load_eagle3
    from megaspark.inference import TargetDecoder
    from megaspark.inference.eagle3 import Eagle3SpeculativeDecoder
    from megaspark.inference.evaluate import evaluate
    from megaspark.targets.hf import HFTargetProvider

    probe = HFTargetProvider(target_name, layer_ids=[0], dtype=dtype, device=device)
    model, e, layer_ids = load_eagle3(args.draft, probe.embedding_weight())
    if not layer_ids:
        print("error: the Eagle3 draft records no tapped layers (eagle_config."
              "eagle_aux_hidden_state_layer_ids)", file=sys.stderr)
        return 2
    provider = HFTargetProvider(target_name, layer_ids=layer_ids, dtype=dtype, device=device)
    if provider.vocab_size != e.vocab_size or provider.hidden_size != e.hidden_size:
        print(f"error: Eagle3 draft (vocab {e.vocab_size}, hidden {e.hidden_size}) does not fit the target "
              f"{target_name} (vocab {provider.vocab_size}, hidden {provider.hidden_size})", file=sys.stderr)
        return 2
    model.to(device=device, dtype=dtype)
    stops = [] if args.ignore_eos else _stop_ids(provider)
    spec = Eagle3SpeculativeDecoder(model, provider, layer_ids, args.num_speculative_tokens, stop_token_ids=stops)
    plain = None if args.no_baseline else TargetDecoder(provider, stop_token_ids=stops)
    report = evaluate(spec, plain, _load_prompts(args, provider.tokenizer), max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, seed=args.seed, stop_token_ids=stops,
                      progress=not args.no_progress)
    report["draft"] = {"path": os.path.abspath(args.draft), "kind": meta.get("kind"), "algorithm": "eagle3",
                       "draft_vocab_size": e.draft_vocab_size, "taps": layer_ids,
                       "num_speculative_tokens": args.num_speculative_tokens}
    return _finish(args, report, meta, target_name, device, dtype)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megaspark.export.loading import load_draft
    from megaspark.inference import SpeculativeDecoder, TargetDecoder
    from megaspark.inference.evaluate import evaluate
    from megaspark.parallel import init_single_process_group
    from megaspark.targets.hf import HFTargetProvider

    meta = _draft_metadata(args.draft)
    target_name = args.target_model or meta.get("target")
    if not target_name:
        print("error: the draft records no target model; pass --target-model", file=sys.stderr)
        return 2

    from megaspark import platform

    try:
        device = platform.resolve_device(args.device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = platform.target_dtype(args.dtype, False, device)
    init_single_process_group(seed=args.seed, device=args.device)
    from megaspark.export.eagle3 import is_eagle3

    if is_eagle3(args.draft):
        return _eval_eagle3(args, meta, target_name, device, dtype)
    model, dcfg = load_draft(args.draft, tp=1, target_model=target_name)
    model.to(device=device, dtype=dtype)
    provider = HFTargetProvider(target_name, layer_ids=dcfg.target_layer_ids, dtype=dtype, device=device)
    if provider.vocab_size != dcfg.vocab_size or provider.hidden_size != dcfg.hidden_size:
        print(f"error: draft (vocab {dcfg.vocab_size}, hidden {dcfg.hidden_size}) does not fit the "
              f"target {target_name} (vocab {provider.vocab_size}, hidden {provider.hidden_size})",
              file=sys.stderr)
        return 2
    # The draft's frozen embedding / LM head are copies of the target's (DESIGN.md
    # decision 5); take them from the target actually used.
    model.load_target_embeddings(provider.embedding_weight(), provider.lm_head_weight())

    if args.confidence_threshold > 0 and not dcfg.confidence_head:
        print("note: the draft has no confidence head; --confidence-threshold is ignored and "
              "every round proposes the whole block", file=sys.stderr)
    prompts = _load_prompts(args, provider.tokenizer)
    stops = [] if args.ignore_eos else _stop_ids(provider)

    spec = SpeculativeDecoder(model, provider, stop_token_ids=stops)
    plain = None if args.no_baseline else TargetDecoder(provider, stop_token_ids=stops)
    report = evaluate(spec, plain, prompts, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, confidence_threshold=args.confidence_threshold,
                      seed=args.seed, stop_token_ids=stops, progress=not args.no_progress)
    report["draft"] = {"path": os.path.abspath(args.draft), "kind": meta.get("kind"),
                       "markov_head_type": dcfg.markov_head_type, "markov_rank": dcfg.markov_rank,
                       "confidence_head": dcfg.confidence_head, "num_layers": dcfg.num_layers}
    return _finish(args, report, meta, target_name, device, dtype)


if __name__ == "__main__":
    sys.exit(main())
