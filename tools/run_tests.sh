#!/usr/bin/env bash
# The test command: install (idempotent, SGLang included) and run the whole suite, slow
# tests and the real-SGLang tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --with-sglang
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MEGASPARK_REQUIRE_SGLANG=1
exec python -m pytest tests -q -ra --durations=30 "$@"
