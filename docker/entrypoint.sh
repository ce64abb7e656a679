#!/usr/bin/env bash
# Entry point of the megaspark GPU image.
#
#   megaspark-entrypoint check     versions of torch / CUDA / megatron-core / TE / sglang,
#                                  the visible GPUs, and the megaspark import (exit 1 if any fails)
#   megaspark-entrypoint CMD ...   run CMD (default: bash)
set -euo pipefail

if [ "${1:-}" = "check" ]; then
  exec python - <<'PY'
import importlib, sys
ok = True
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")
if not torch.cuda.is_available():
    print("no CUDA device is visible (run with --gpus all / a GPU allocation)")
    ok = False
for name in ("megatron.core", "transformer_engine.pytorch", "sglang", "megaspark"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', 'ok')}")
    except Exception as e:  # report every failure, not just the first
        print(f"{name}: FAILED ({type(e).__name__}: {e})")
        ok = False
sys.exit(0 if ok else 1)
PY
fi

if [ "$#" -eq 0 ]; then
  set -- bash
fi
exec "$@"
