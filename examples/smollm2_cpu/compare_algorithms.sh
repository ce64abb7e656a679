#!/usr/bin/env bash
# Eagle3, DFlash and DSpark on the README's default setup with the same budget: the same
# target (SmolLM2-135M-Instruct), data, sequence length, batch, iterations, learning rate and
# TP = 2; each algorithm with its own draft (DSpark / DFlash: 2 block-parallel layers, block
# 7; Eagle3: its one decoder layer unrolled for 7 test-time-training steps, drafting 6
# tokens per round, the most a block of 7 can accept). Every draft is then measured by real
# speculative decoding (tools/eval_speculative.py, T = 0) and one table printed. Results
# recorded in docs/results.md. Builds the default dataset on first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-data/smollm2-default}"
OUT="${OUT:-outputs/compare-algorithms}"
ITERS="${TRAIN_ITERS:-80}"
PROMPTS="${NUM_PROMPTS:-8}"
export OMP_NUM_THREADS=1
if [ ! -f "$DATA/meta.json" ]; then
  python tools/prepare_data.py --default-dataset --output "$DATA"
fi
for algo in eagle3 dflash dspark; do
  extra=(--num-layers 2 --block-size 7 --num-anchors 32)
  spec=()
  case "$algo" in
    dspark) extra+=(--markov-rank 64) ;;
    eagle3) extra=(--ttt-steps 7); spec=(--num-speculative-tokens 6) ;;
  esac
  torchrun --nproc-per-node 2 pretrain_dspark.py --algorithm "$algo" "${extra[@]}" \
    --target-model builtin:smollm2-135m --data-path "$DATA" --tensor-model-parallel-size 2 \
    --seq-length 256 --micro-batch-size 2 --global-batch-size 4 \
    --train-iters "$ITERS" --lr 1e-3 --lr-warmup-fraction 0.05 --lr-decay-style cosine \
    --log-interval 10 --eval-interval "$ITERS" --eval-iters 8 --no-progress-bar \
    --save "$OUT/$algo/checkpoints" --log-jsonl "$OUT/$algo/metrics.jsonl"
  python tools/eval_speculative.py --draft "$OUT/$algo/checkpoints" --target-model builtin:smollm2-135m \
    --data-path "$DATA" --num-prompts "$PROMPTS" --max-new-tokens 64 --no-progress ${spec[@]+"${spec[@]}"} \
    --metrics-jsonl "$OUT/$algo/metrics.jsonl" --json "$OUT/$algo/eval.json"
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'algorithm':10} {'tau (analytic)':>15} {'tau (measured)':>15} {'identical':>10} {'speed-up':>9}")
for algo in ("eagle3", "dflash", "dspark"):
    r = json.load(open(f"{out}/{algo}/eval.json"))
    same = r.get("greedy_identical") or {"identical": "-", "prompts": "-"}
    print(f"{algo:10} {r.get('metrics_jsonl_tau') or float('nan'):15.3f} "
          f"{r['speculative']['acceptance_length']:15.3f} {same['identical']:>4}/{same['prompts']:<5} "
          f"{r['speedup']:8.2f}x")
PY
