#!/usr/bin/env bash
# Multi-node DSpark training on Slurm: one SGLang target engine per node, co-located with
# that node's trainer ranks (torchrun, static rendezvous on the first node).
#
#   TARGET_MODEL=/models/Qwen3-8B sbatch --nodes 2 examples/slurm/launch.sh -- \
#       --data-path /data/qwen3-8b --seq-length 4096 --bf16 ...
#   DRY_RUN=1 bash examples/slurm/launch.sh -- ...   # print each node's commands, run nothing
#   bash examples/slurm/launch.sh --dry-run -- ...   # same
#
# Everything after "--" goes to pretrain_dspark.py. The per-node commands come from
# examples/slurm/render_commands.py (see its docstring and README.md for the GPU split and
# every environment variable). Container (pyxis/enroot): set CONTAINER_IMAGE, e.g.
#   CONTAINER_IMAGE=registry.example.com#megaspark/gpu:latest CONTAINER_MOUNTS=/models:/models,/data:/data
# and srun gets --container-image/--container-mounts/--container-workdir.
#
#SBATCH --job-name=megaspark-dspark
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
# Preemptible and time-limited runs (docs/reliability.md): 300 s before the time limit
# Slurm sends SIGUSR1 to this script; it asks the trainer ranks to save (scancel --signal)
# and requeues the job once they have exited. The requeued job resumes from --save by
# itself (auto-resume). Preemption (PreemptMode=REQUEUE) sends SIGTERM, which torchrun
# forwards to the ranks as well; give it a GraceTime longer than one step plus one save.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
TRAIN_ARGS=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "launch.sh: unknown option $1 (trainer flags go after --)" >&2; exit 2 ;;
  esac
done

# sbatch runs a copy of this script from its spool directory: find the repository from
# the submit directory unless MEGASPARK_DIR says otherwise.
MEGASPARK_DIR="${MEGASPARK_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}}"
RENDER="$MEGASPARK_DIR/examples/slurm/render_commands.py"

# Host names in node-rank order: scontrol expands Slurm's compressed list (node[01-02]);
# without scontrol (tests, dry runs elsewhere) SLURM_JOB_NODELIST is a plain comma list.
NODELIST="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-$(hostname)}}"
SCONTROL="${SCONTROL:-scontrol}"
if command -v "$SCONTROL" > /dev/null 2>&1; then
  mapfile -t HOSTS < <("$SCONTROL" show hostnames "$NODELIST")
else
  IFS=',' read -r -a HOSTS <<< "$NODELIST"
fi
HOSTLIST="$(IFS=','; echo "${HOSTS[*]}")"
export NNODES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-${#HOSTS[@]}}}"

if [ "$DRY_RUN" = "1" ]; then
  exec python3 "$RENDER" --hosts "$HOSTLIST" --dry-run -- "${TRAIN_ARGS[@]}"
fi

# Fail here, before any node starts, if the settings cannot be rendered.
python3 "$RENDER" --hosts "$HOSTLIST" --dry-run -- "${TRAIN_ARGS[@]}"

CONTAINER_ARGS=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  CONTAINER_ARGS=(
    "--container-image=$CONTAINER_IMAGE"
    "--container-mounts=$MEGASPARK_DIR:$MEGASPARK_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
    "--container-workdir=$MEGASPARK_DIR"
  )
fi

# Time limit: SIGUSR1 (#SBATCH --signal=B:USR1@...) reaches this script only; pass it to
# the job's steps (the trainer ranks save and exit 0) and requeue once they are done.
REQUEUE=0
# shellcheck disable=SC2317  # invoked by the trap below
on_time_limit() {
  echo "launch.sh: time limit near: asking the trainer to save, then requeueing job ${SLURM_JOB_ID:-?}" >&2
  REQUEUE=1
  "${SCANCEL:-scancel}" --signal=USR1 "${SLURM_JOB_ID}" || true
}
trap on_time_limit USR1

# One task per node; each renders and runs its own program (engine, wait, trainer).
# SLURM_NODEID is set by srun inside each task.
export HOSTLIST RENDER MEGASPARK_DIR
# shellcheck disable=SC2016  # expanded by the bash of each task, not here
srun --ntasks-per-node=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
  bash -c 'trap "" USR1; cd "$MEGASPARK_DIR" && python3 "$RENDER" --hosts "$HOSTLIST" --node-rank "$SLURM_NODEID" --script -- "$@" | bash' \
  launch-node "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
status=0
while true; do
  # a trapped signal interrupts wait; wait again until srun has really exited
  wait "$SRUN_PID" && status=0 || status=$?
  kill -0 "$SRUN_PID" 2> /dev/null || break
done
if [ "$REQUEUE" = "1" ]; then
  "${SCONTROL:-scontrol}" requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$status"
