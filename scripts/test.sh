#!/usr/bin/env bash
# Sets up .venv with the test extras, then runs the whole test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
exec .venv/bin/pytest "$@"
