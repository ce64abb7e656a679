#!/usr/bin/env bash
# One-command smoke test of the whole megaspark pipeline on a single (bare) GPU machine:
#
#   install           deps from a local wheel directory (WHEELS=), torch left as it is
#   target            a tiny random Qwen3 target (hidden 256, 4 layers) + offline tokenizer
#   data              synthetic chat conversations -> tools/prepare_data.py
#   train             pretrain_dspark.py under torchrun, TRAIN_ITERS iterations, --bf16 --device
#   resume            --load the checkpoint and train RESUME_ITERS more iterations
#   export            tools/convert_checkpoint_to_hf.py
#   validate          tools/validate_hf_export.py
#   eval_speculative  tools/eval_speculative.py at temperature 0: outputs == target greedy
#
# Prints one line "PASS <stage>" or "FAIL <stage>: <reason>" per stage (a stage whose input
# is missing fails as "not run"), then the mean step time and peak GPU memory of the train
# run, then "gpu_smoke: N passed, M failed". Exits 1 when any stage failed.
#
# Environment (all optional):
#   DEVICE=cuda|cpu|auto   --device of training (default cuda); CI runs DEVICE=cpu
#   NPROC=1                torchrun --nproc-per-node (data parallel)
#   BF16=1                 train with --bf16 (0: fp32)
#   WORK=DIR               work directory, logs in DIR/logs (default: a new mktemp dir)
#   WHEELS=DIR             install megaspark's dependencies from this wheel directory
#                          (pip --no-index; torch is pinned to the installed version). Unset:
#                          install nothing, the imports must already work.
#   PYTHON=python          interpreter (its torch is used)
#   TRAIN_ITERS=30 RESUME_ITERS=5
#   EXTRA_TRAIN_ARGS="..." extra pretrain_dspark.py flags (train and resume runs)
#   STAGE_TIMEOUT=600      seconds before a stage is killed
#
# Usage:
#   bash tools/gpu_smoke.sh                        # imports already work
#   WHEELS=/data/wheels bash tools/gpu_smoke.sh    # bare machine, torch preinstalled
#   bash tools/gpu_smoke.sh --print-requirements   # what to `pip download` into WHEELS
#   EXTRA_TRAIN_ARGS="--target-backend sglang" bash tools/gpu_smoke.sh
#                                                  # the target run by SGLang in the trainer
#                                                  # (needs sglang; ran with DEVICE=cpu)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

print_requirements() {
  # megaspark's install_requires from setup.py, torch left out (it comes with the machine)
  "$PYTHON" - "$REPO/setup.py" <<'EOF'
import ast, re, sys
tree = ast.parse(open(sys.argv[1]).read())
for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
        for req in ast.literal_eval(node.value):
            if re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower() != "torch":
                print(req)
EOF
}

case "${1:-}" in
  --print-requirements) print_requirements; exit $? ;;
  -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) echo "gpu_smoke.sh: unknown argument $1 (configure with environment variables; see --help)" >&2; exit 2 ;;
esac

DEVICE="${DEVICE:-cuda}"
NPROC="${NPROC:-1}"
BF16="${BF16:-1}"
WHEELS="${WHEELS:-}"
TRAIN_ITERS="${TRAIN_ITERS:-30}"
RESUME_ITERS="${RESUME_ITERS:-5}"
EXTRA_TRAIN_ARGS="${EXTRA_TRAIN_ARGS:-}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-600}"
if [ -z "${WORK:-}" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_smoke.XXXXXX")"
fi
mkdir -p "$WORK/logs" || { echo "gpu_smoke: cannot create WORK=$WORK" >&2; exit 2; }
WORK="$(cd "$WORK" && pwd)"
LOGS="$WORK/logs"

# No network on the target machine: never try the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MEGASPARK_CACHE="${MEGASPARK_CACHE:-$WORK/cache}"
if [ "$DEVICE" = cpu ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

echo "gpu_smoke: repo $REPO, work dir $WORK, DEVICE=$DEVICE NPROC=$NPROC BF16=$BF16"

PASSED=0
FAILED=0
declare -A OK=()

pass() {
  echo "PASS $1"
  PASSED=$((PASSED + 1))
  OK[$1]=1
}

# first_error LOG: the first line of LOG that looks like the cause of a failure
# (argparse-style "prog: error: ...", or "SomeError: ..."), launcher noise left out
first_error() {
  grep -E '(: error: |^(\[rank[0-9]+\]: ?)?[A-Za-z_.]*(Error|Exception): |^(AssertionError|KeyboardInterrupt))' "$1" 2>/dev/null |
    grep -v -e ChildFailedError -e 'warnings.warn' | head -n 1 | cut -c 1-400
}

# fail STAGE REASON [LOG]: the reason (with the log's first error line), the log's path,
# and its last lines on stderr
fail() {
  local stage=$1 reason=$2 log=${3:-} cause
  if [ -n "$log" ]; then
    cause="$(first_error "$log")"
    echo "FAIL $stage: $reason${cause:+: $cause} (log: $log)"
    if [ -s "$log" ]; then
      echo "---- last lines of $log ----" >&2
      grep -v -e 'warnings.warn' -e 'UserWarning: Transformer Engine' "$log" | tail -n 25 >&2
      echo "----" >&2
    fi
  else
    echo "FAIL $stage: $reason"
  fi
  FAILED=$((FAILED + 1))
}

# needs STAGE DEP...: true when every DEP passed, else STAGE fails as not run
needs() {
  local stage=$1 dep
  shift
  for dep in "$@"; do
    if [ -z "${OK[$dep]:-}" ]; then
      fail "$stage" "not run ($dep failed)"
      return 1
    fi
  done
}

# run LOG CMD...: CMD with a time limit, stdout+stderr appended to LOG; returns its exit status
run() {
  local log=$1
  shift
  echo "+ $*" >>"$log"
  timeout --kill-after=30 "$STAGE_TIMEOUT" "$@" >>"$log" 2>&1
}

# reason for a non-zero exit status
status_reason() {
  if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then
    echo "timed out after ${STAGE_TIMEOUT}s (exit status $1)"
  else
    echo "exit status $1"
  fi
}

# -------------------------------------------------------------------------------- install
# torch's installed version, from its metadata (no import)
torch_version() {
  "$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))'
}

# One interpreter start: every import the later stages need, the versions, and whether
# DEVICE / NPROC fit the GPUs this torch sees. Prints "ENV: <problem>" and exits 3 if not.
ENV_CHECK='
import sys
import torch, jinja2, tokenizers, transformers, safetensors, megatron.core, megaspark
device, nproc = sys.argv[1], int(sys.argv[2])
print(f"gpu_smoke: torch {torch.__version__} (cuda {torch.version.cuda}), megatron-core "
      f"{megatron.core.__version__}, transformers {transformers.__version__}")
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
if n:
    print(f"gpu_smoke: {n} GPU(s): {torch.cuda.get_device_name(0)}")
if device == "cuda" and not n:
    print("ENV: DEVICE=cuda but torch.cuda.is_available() is False (DEVICE=cpu for a CPU run)")
    sys.exit(3)
if device == "cuda" and n < nproc:
    print(f"ENV: NPROC={nproc} but only {n} GPU(s) are visible")
    sys.exit(3)
'

stage_install() {
  local log="$LOGS/install.log" rc torch_before torch_after problem
  if ! torch_before="$(torch_version 2>>"$log")"; then
    fail install "torch is not installed for $PYTHON (it must be preinstalled)" "$log"
    return
  fi
  if [ -n "$WHEELS" ]; then
    if [ ! -d "$WHEELS" ]; then
      fail install "WHEELS=$WHEELS is not a directory" "$log"
      return
    fi
    print_requirements >"$WORK/requirements.txt" 2>>"$log" || {
      fail install "could not read the requirements from $REPO/setup.py" "$log"
      return
    }
    # pin torch to what is installed: pip may not replace it, and finds no other torch
    echo "torch==$torch_before" >"$WORK/constraints.txt"
    run "$log" "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check \
      -c "$WORK/constraints.txt" -r "$WORK/requirements.txt"
    rc=$?
    if [ "$rc" -ne 0 ]; then
      fail install "pip install --no-index --find-links $WHEELS failed: $(status_reason "$rc")" "$log"
      return
    fi
    torch_after="$(torch_version 2>>"$log")"
    if [ "$torch_after" != "$torch_before" ]; then
      fail install "torch changed from $torch_before to $torch_after" "$log"
      return
    fi
  else
    echo "gpu_smoke: WHEELS unset: installing nothing, checking the imports"
  fi
  run "$log" "$PYTHON" -c "$ENV_CHECK" "$DEVICE" "$NPROC"
  rc=$?
  grep '^gpu_smoke: ' "$log"
  problem="$(sed -n 's/^ENV: //p' "$log" | head -n 1)"
  if [ -n "$problem" ]; then
    fail install "$problem" "$log"
  elif [ "$rc" -ne 0 ] && [ -n "$WHEELS" ]; then
    fail install "imports fail after installing from $WHEELS: $(status_reason "$rc")" "$log"
  elif [ "$rc" -ne 0 ]; then
    fail install "imports fail and WHEELS is unset (give WHEELS=DIR of dependency wheels)" "$log"
  else
    pass install
  fi
}

# --------------------------------------------------------------------------------- target
TARGET=""
stage_target() {
  needs target install || return
  local log="$LOGS/target.log" rc
  run "$log" "$PYTHON" -c "
import sys
from tests.tiny_models import make_tiny_target
path = make_tiny_target(sys.argv[1], family='qwen3', num_layers=4, hidden=256, heads=4, kv_heads=2)
print('TARGET=' + path)
" "$WORK/target"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail target "tiny Qwen3 target: $(status_reason "$rc")" "$log"
    return
  fi
  TARGET="$(sed -n 's/^TARGET=//p' "$log" | tail -n 1)"
  if [ -z "$TARGET" ] || [ ! -f "$TARGET/config.json" ]; then
    fail target "no model directory written" "$log"
    return
  fi
  pass target
}

# ----------------------------------------------------------------------------------- data
DATA="$WORK/data"
stage_data() {
  needs data target || return
  local log="$LOGS/data.log" rc
  "$PYTHON" - "$WORK/chats.jsonl" <<'EOF' >>"$log" 2>&1
import json, random, sys
rng = random.Random(0)
words = "the cat sat on a mat and then it ran to see the dog who was very happy today".split()
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        q = " ".join(rng.choices(words, k=6))
        a = " ".join(rng.choices(words, k=30))
        f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                         {"role": "assistant", "content": a}]}) + "\n")
EOF
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail data "writing the conversations: $(status_reason "$rc")" "$log"
    return
  fi
  run "$log" "$PYTHON" "$REPO/tools/prepare_data.py" --input "$WORK/chats.jsonl" --target-model "$TARGET" \
    --output "$DATA" --overwrite --max-length 128 --valid-fraction 0.125 --min-supervised-tokens 4 --quiet
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail data "tools/prepare_data.py: $(status_reason "$rc")" "$log"
    return
  fi
  if [ ! -s "$DATA/train.jsonl" ] || [ ! -s "$DATA/valid.jsonl" ]; then
    fail data "no train/valid split written to $DATA" "$log"
    return
  fi
  pass data
}

# ------------------------------------------------------------------------- train / resume
CKPT="$WORK/ckpt"
MEMDIR="$WORK/peak_mem"
WRAPPER="$WORK/pretrain_with_peak_mem.py"

# pretrain_dspark.py does not report peak GPU memory: run it through a wrapper that writes
# torch.cuda.max_memory_allocated() of each rank at exit (the real CUDA function, taken
# before megaspark's CPU compatibility layer can replace it; nothing is written on CPU).
write_wrapper() {
  cat >"$WRAPPER" <<EOF
import atexit, os, runpy, sys
import torch

_cuda = torch.cuda.is_available()
_initialized = torch.cuda.is_initialized
_max_allocated = torch.cuda.max_memory_allocated


def _report():
    if _cuda and _initialized():
        os.makedirs("$MEMDIR", exist_ok=True)
        with open(os.path.join("$MEMDIR", "rank%s" % os.environ.get("RANK", "0")), "w") as f:
            f.write(str(_max_allocated()))


atexit.register(_report)
script = os.path.join("$REPO", "pretrain_dspark.py")
sys.argv = [script] + sys.argv[1:]
sys.path.insert(0, "$REPO")
runpy.run_path(script, run_name="__main__")
EOF
}

GBS=$((2 * NPROC))
SEQ_LENGTH=128
train_flags() {
  TRAIN_FLAGS=(
    --target-model "$TARGET" --data-path "$DATA" --device "$DEVICE"
    --num-layers 2 --target-layer-ids 1 2 --block-size 4 --num-anchors 8 --markov-rank 32
    --seq-length "$SEQ_LENGTH" --micro-batch-size 2 --global-batch-size "$GBS"
    --lr 1e-3 --lr-warmup-fraction 0 --log-interval 1 --eval-iters 1 --no-progress-bar
    --save "$CKPT"
  )
  if [ "$BF16" = 1 ]; then
    TRAIN_FLAGS+=(--bf16)
  fi
  local extra=()
  read -r -a extra <<<"$EXTRA_TRAIN_ARGS"
  TRAIN_FLAGS+=(${extra[@]+"${extra[@]}"})
}

# torchrun of $PYTHON (an array, not a function: `timeout` runs commands, not functions)
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")

# check_log JSONL FIRST LAST [FIRST_RUN_JSONL]: "OK <summary>" or "BAD <reason>" about the
# train records of a --log-jsonl file: iterations exactly FIRST..LAST, every loss finite,
# and (runs of >= 10 iterations) that the draft learns: the mean loss of the last 5
# iterations is below 0.9x the loss of iteration 1. With FIRST_RUN_JSONL (a resumed run):
# its mean loss is below 0.9x the first run's iteration-1 loss, i.e. the trained weights
# were restored, not a fresh draft.
CHECK_LOG='
import json, math, sys

def train(path):
    recs = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in recs if r.get("kind") == "train"]

tr = train(sys.argv[1])
first, last = int(sys.argv[2]), int(sys.argv[3])
its = [r["iteration"] for r in tr]
if its != list(range(first, last + 1)):
    sys.exit(print(f"BAD logged iterations {its}, expected {first}..{last}"))
loss = [r.get("loss") for r in tr]
if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in loss):
    sys.exit(print(f"BAD non-finite training loss: {loss}"))
tail = sum(loss[-5:]) / len(loss[-5:])
if len(sys.argv) > 4:
    ref = [r["loss"] for r in train(sys.argv[4])]
    mean = sum(loss) / len(loss)
    if len(ref) >= 10 and not mean < 0.9 * ref[0]:
        sys.exit(print(f"BAD resumed mean loss {mean:.4f} is not below 0.9x the initial loss "
                       f"{ref[0]:.4f} of the first run: the trained weights were not restored"))
    print(f"OK iterations {first}..{last}, mean loss {mean:.4f} (first run: {ref[0]:.4f} -> {ref[-1]:.4f})")
else:
    if len(loss) >= 10 and not tail < 0.9 * loss[0]:
        sys.exit(print(f"BAD the draft does not learn: loss {loss[0]:.4f} at iteration {first}, "
                       f"{tail:.4f} over the last 5 iterations"))
    print(f"OK iterations {first}..{last}, loss {loss[0]:.4f} -> {tail:.4f} (mean of the last 5)")
'

# checkpoint_at ITERATION: true when $CKPT/latest names that iteration
checkpoint_at() {
  [ "$(cat "$CKPT/latest" 2>/dev/null)" = "$(printf 'iter_%07d' "$1")" ]
}

stage_train() {
  needs train data || return
  local log="$LOGS/train.log" rc verdict
  rm -rf "$CKPT" "$MEMDIR" "$WORK/train.jsonl"
  write_wrapper
  train_flags
  run "$log" "${TORCHRUN[@]}" "$WRAPPER" "${TRAIN_FLAGS[@]}" --train-iters "$TRAIN_ITERS" \
    --eval-interval "$TRAIN_ITERS" --save-interval "$TRAIN_ITERS" --log-jsonl "$WORK/train.jsonl"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail train "pretrain_dspark.py: $(status_reason "$rc")" "$log"
    return
  fi
  verdict="$("$PYTHON" -c "$CHECK_LOG" "$WORK/train.jsonl" 1 "$TRAIN_ITERS" 2>>"$log")"
  case "$verdict" in
    OK*) echo "gpu_smoke: train: ${verdict#OK }" ;;
    BAD*) fail train "$WORK/train.jsonl: ${verdict#BAD }" "$log"; return ;;
    *) fail train "could not read $WORK/train.jsonl" "$log"; return ;;
  esac
  if ! checkpoint_at "$TRAIN_ITERS"; then
    fail train "$CKPT/latest does not name iteration $TRAIN_ITERS" "$log"
    return
  fi
  pass train
}

stage_resume() {
  needs resume train || return
  local log="$LOGS/resume.log" rc verdict total=$((TRAIN_ITERS + RESUME_ITERS))
  rm -f "$WORK/resume.jsonl"
  train_flags
  run "$log" "${TORCHRUN[@]}" "$REPO/pretrain_dspark.py" "${TRAIN_FLAGS[@]}" --load "$CKPT" --train-iters "$total" \
    --eval-interval "$total" --save-interval "$total" --log-jsonl "$WORK/resume.jsonl"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail resume "pretrain_dspark.py --load: $(status_reason "$rc")" "$log"
    return
  fi
  verdict="$("$PYTHON" -c "$CHECK_LOG" "$WORK/resume.jsonl" "$((TRAIN_ITERS + 1))" "$total" \
    "$WORK/train.jsonl" 2>>"$log")"
  case "$verdict" in
    OK*) echo "gpu_smoke: resume: ${verdict#OK }" ;;
    BAD*) fail resume "$WORK/resume.jsonl: ${verdict#BAD }" "$log"; return ;;
    *) fail resume "could not read $WORK/resume.jsonl" "$log"; return ;;
  esac
  if ! checkpoint_at "$total"; then
    fail resume "$CKPT/latest does not name iteration $total" "$log"
    return
  fi
  pass resume
}

# ------------------------------------------------------------- export / validate / eval
HF="$WORK/hf-draft"
stage_export() {
  needs export train || return
  local log="$LOGS/export.log" rc
  run "$log" "$PYTHON" "$REPO/tools/convert_checkpoint_to_hf.py" --load "$CKPT" --output "$HF" \
    --target-model "$TARGET"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail export "tools/convert_checkpoint_to_hf.py: $(status_reason "$rc")" "$log"
    return
  fi
  if [ ! -f "$HF/config.json" ] || [ ! -f "$HF/model.safetensors" ]; then
    fail export "$HF has no config.json / model.safetensors" "$log"
    return
  fi
  pass export
}

stage_validate() {
  needs validate export || return
  local log="$LOGS/validate.log" rc
  run "$log" "$PYTHON" "$REPO/tools/validate_hf_export.py" "$HF"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail validate "tools/validate_hf_export.py: $(status_reason "$rc")" "$log"
    return
  fi
  pass validate
}

stage_eval_speculative() {
  needs eval_speculative export || return
  local log="$LOGS/eval_speculative.log" rc verdict
  local flags=(--draft "$HF" --target-model "$TARGET" --data-path "$DATA" --num-prompts 4
    --max-new-tokens 32 --temperature 0 --json "$WORK/eval.json" --no-progress)
  # fp32: at T=0 the output must equal greedy decoding exactly, which bf16 verification
  # (several tokens per target pass) and bf16 greedy (one per pass) need not agree on
  flags+=(--device "$DEVICE" --dtype fp32)
  rm -f "$WORK/eval.json"
  run "$log" "$PYTHON" "$REPO/tools/eval_speculative.py" "${flags[@]}"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    fail eval_speculative "tools/eval_speculative.py: $(status_reason "$rc")" "$log"
    return
  fi
  verdict="$("$PYTHON" -c "
import json, sys
r = json.load(open(sys.argv[1]))
g = r.get('greedy_identical')
if not g:
    print('FAIL the report has no greedy_identical entry')
elif g['prompts'] < 1 or g['identical'] != g['prompts']:
    print(f\"FAIL speculative output == target greedy for {g['identical']} of {g['prompts']} prompts\")
else:
    tau = r['speculative'].get('acceptance_length')
    print(f\"OK {g['identical']}/{g['prompts']} prompts identical to greedy, measured tau {tau:.3f}\")
" "$WORK/eval.json" 2>>"$log")"
  case "$verdict" in
    OK*) echo "gpu_smoke: eval_speculative: ${verdict#OK }"; pass eval_speculative ;;
    FAIL*) fail eval_speculative "${verdict#FAIL }" "$log" ;;
    *) fail eval_speculative "could not read $WORK/eval.json" "$log" ;;
  esac
}

# -------------------------------------------------------------------------------- summary
summary() {
  if [ -s "$WORK/train.jsonl" ]; then
    "$PYTHON" -c "
import json, sys
gbs, seq = int(sys.argv[2]), int(sys.argv[4])
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tr = [r for r in recs if r['kind'] == 'train' and r.get('tokens_per_sec')]
# tokens_per_sec of a log-interval-1 record = global batch x seq length / that step's time;
# iteration 1 (start-up, first allocations) is left out when there are others
steps = [gbs * seq / r['tokens_per_sec'] for r in tr if r['iteration'] > 1]
note = 'iteration 1 excluded'
if not steps:
    steps, note = [gbs * seq / r['tokens_per_sec'] for r in tr], 'iteration 1 included'
if steps:
    print(f'mean step time: {1000 * sum(steps) / len(steps):.1f} ms over {len(steps)} iterations '
          f'(train run, {note}; {sys.argv[3]})')
else:
    print('mean step time: n/a (no timed train records)')
" "$WORK/train.jsonl" "$GBS" "DEVICE=$DEVICE NPROC=$NPROC BF16=$BF16" "$SEQ_LENGTH" 2>/dev/null ||
      echo "mean step time: n/a (could not read $WORK/train.jsonl)"
  else
    echo "mean step time: n/a (no training log)"
  fi
  if [ "$DEVICE" = cpu ]; then
    echo "peak GPU memory: n/a on cpu"
  elif compgen -G "$MEMDIR/rank*" >/dev/null; then
    "$PYTHON" -c "
import glob, os, sys
vals = [int(open(p).read()) for p in glob.glob(os.path.join(sys.argv[1], 'rank*'))]
print(f'peak GPU memory: {max(vals) / 2**20:.1f} MiB (torch.cuda.max_memory_allocated, '
      f'max over {len(vals)} rank(s), train run)')
" "$MEMDIR"
  else
    echo "peak GPU memory: n/a (the train run wrote no CUDA measurement)"
  fi
  echo "gpu_smoke: work dir $WORK (logs in $LOGS)"
  echo "gpu_smoke: $PASSED passed, $FAILED failed"
}

START=$SECONDS
TIMES=""
for stage in install target data train resume export validate eval_speculative; do
  t0=$SECONDS
  : >"$LOGS/$stage.log"
  "stage_$stage"
  TIMES="$TIMES $stage $((SECONDS - t0))s,"
done
echo "gpu_smoke: stage times:${TIMES%,}; total $((SECONDS - START))s"
summary
[ "$FAILED" -eq 0 ]
