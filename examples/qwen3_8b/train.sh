#!/usr/bin/env bash
# DSpark draft for Qwen3-8B with the DeepSpec reference hyper-parameters
# (DSPARK_SPEC.md §11.1; see README.md next to this file for the mapping and what is missing).
#
#   TARGET_MODEL=/models/Qwen3-8B DATA=/data/qwen3-8b bash examples/qwen3_8b/train.sh [extra flags]
#
# One node, 8 GPUs, target computed by HF in-process (--target-backend hf). Multi-node with
# one SGLang engine per node: examples/slurm/launch.sh with the same flags (README.md).
# PRINT_ONLY=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/../.."

TARGET_MODEL="${TARGET_MODEL:-/models/Qwen3-8B}"
DATA="${DATA:-data/qwen3-8b}"
OUT="${OUT:-outputs/qwen3-8b-dspark}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
EPOCHS="${EPOCHS:-10}"
GLOBAL_BATCH=512

# 10 epochs over the prepared training split, in optimizer steps of 512 sequences
# (there is no --epochs flag: the step count is computed from data/meta.json).
if [ -z "${TRAIN_ITERS:-}" ]; then
  if [ -f "$DATA/meta.json" ]; then
    TRAIN_ITERS="$(python3 -c 'import json, math, sys
n = json.load(open(sys.argv[1]))["counts"]["train"]
print(max(1, math.ceil(int(sys.argv[2]) * n / int(sys.argv[3]))))' "$DATA/meta.json" "$EPOCHS" "$GLOBAL_BATCH")"
  else
    TRAIN_ITERS=1000
    echo "train.sh: $DATA/meta.json not found; using TRAIN_ITERS=$TRAIN_ITERS" >&2
  fi
fi

ARGS=(
  # target (Qwen3-8B: 36 layers, hidden 4096; taps = DFlash rule for 36 layers)
  --target-model "$TARGET_MODEL"
  --target-backend "${TARGET_BACKEND:-hf}"
  --target-layer-ids 1 9 17 25 33
  --mask-token-id 151669
  # draft and DSpark algorithm
  --num-layers 5
  --block-size 7
  --num-anchors 512
  --markov-rank 256
  --markov-head-type vanilla
  # confidence head on, with Markov features: the defaults (no --no-confidence-head,
  # no --confidence-without-markov)
  --loss-decay-gamma 4.0
  --ce-loss-alpha 0.1
  --l1-loss-alpha 0.9
  --confidence-loss-alpha 1.0
  --slot-convention S
  # optimisation: AdamW on fp32 master weights, bf16 model, betas (0.9, 0.999), wd 0
  --bf16
  --lr 6e-4
  --min-lr 0
  --lr-warmup-fraction 0.04
  --lr-decay-style cosine
  --weight-decay 0.0
  --adam-beta1 0.9
  --adam-beta2 0.999
  --clip-grad 1.0
  --seed 42
  # batch: 512 sequences = 1 per GPU x 8 GPUs x 64 accumulation steps
  --micro-batch-size 1
  --global-batch-size "$GLOBAL_BATCH"
  --seq-length 4096
  --train-iters "$TRAIN_ITERS"
  # data, checkpoints, logs
  --data-path "$DATA"
  --save "$OUT/checkpoints"
  --save-interval 1000
  --eval-interval 1000
  --eval-iters 20
  --log-interval 10
  --tensorboard-dir "$OUT/tensorboard"
  --log-jsonl "$OUT/metrics.jsonl"
  # with TARGET_BACKEND=sglang (SGLang's ModelRunner in this process) the GPU share of
  # SGLang's weights + KV pool is --sglang-mem-fraction-static (default 0.35)
  # TODO(flags missing): Transformer Engine layer spec for the draft (e.g. a
  #   --transformer-impl transformer_engine); the reference recipe is bf16, so FP8
  #   (--fp8-format, which exists) is not part of it.
)

CMD=(torchrun --nproc-per-node "$GPUS_PER_NODE" pretrain_dspark.py "${ARGS[@]}" "$@")
if [ "${PRINT_ONLY:-0}" = "1" ]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
