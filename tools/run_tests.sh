#!/usr/bin/env bash
# The test command: install (idempotent) and run the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec python -m pytest tests -q -ra "$@"
