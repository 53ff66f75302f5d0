#!/usr/bin/env bash
# Creates .venv at the repository root and installs the project from its own files.
# torch goes first, pinned: pip takes the CPU wheel on this disk, and the range in pyproject.toml
# then keeps anything else from pulling a CUDA build. Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".${extras}"
