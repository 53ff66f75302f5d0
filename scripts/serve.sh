#!/usr/bin/env bash
# Sets up .venv, then serves. With no arguments it serves the embedded all-MiniLM-L6-v2 offline.
# Any arguments go to `bentoml serve`, e.g. scripts/serve.sh --arg model_dir=/models/bert --port 8080
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/bentoml serve service:HuggingFaceService "$@"
