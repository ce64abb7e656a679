#!/usr/bin/env bash
# DSpark vs DFlash on the README's default setup: the same target (SmolLM2-135M-Instruct),
# data, draft backbone, block size and training budget; only --algorithm differs. Both
# drafts are then measured by real speculative decoding (tools/eval_speculative.py).
# Results recorded in docs/results.md. Assumes `bash examples/smollm2_cpu/train.sh` (or
# tools/install.sh + the --default-dataset step) has run once.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-data/smollm2-default}"
OUT="${OUT:-outputs/compare}"
ITERS="${TRAIN_ITERS:-80}"
PROMPTS="${NUM_PROMPTS:-8}"
export OMP_NUM_THREADS=1
for algo in dspark dflash; do
  extra=()
  [ "$algo" = dspark ] && extra=(--markov-rank 64)
  torchrun --nproc-per-node 2 pretrain_dspark.py --algorithm "$algo" ${extra[@]+"${extra[@]}"} \
    --target-model builtin:smollm2-135m --data-path "$DATA" --tensor-model-parallel-size 2 \
    --num-layers 2 --block-size 7 --num-anchors 32 \
    --seq-length 256 --micro-batch-size 2 --global-batch-size 4 \
    --train-iters "$ITERS" --lr 1e-3 --lr-warmup-fraction 0.05 --lr-decay-style cosine \
    --log-interval 10 --eval-interval "$ITERS" --eval-iters 8 --no-progress-bar \
    --save "$OUT/$algo/checkpoints" --log-jsonl "$OUT/$algo/metrics.jsonl"
  python tools/eval_speculative.py --draft "$OUT/$algo/checkpoints" --target-model builtin:smollm2-135m \
    --data-path "$DATA" --num-prompts "$PROMPTS" --max-new-tokens 64 --no-progress \
    --metrics-jsonl "$OUT/$algo/metrics.jsonl" --json "$OUT/$algo/eval.json"
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'algorithm':10} {'tau (analytic)':>15} {'tau (measured)':>15} {'speed-up':>9}")
for algo in ("dspark", "dflash"):
    r = json.load(open(f"{out}/{algo}/eval.json"))
    print(f"{algo:10} {r.get('metrics_jsonl_tau') or float('nan'):15.3f} "
          f"{r['speculative']['acceptance_length']:15.3f} {r['speedup']:8.2f}x")
PY
