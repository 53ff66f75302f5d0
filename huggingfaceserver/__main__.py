"""Start the BentoML service from KServe's command line, so a KServe container command ports unchanged.

`python -m huggingfaceserver --model_name=m --model_id=org/name --http_port=8080 --return_probabilities`
becomes `bentoml serve service:HuggingFaceService --port 8080 --arg model_name=m ...`. Every flag of KServe's
model server is accepted (README: "KServe's model-server flags"), and `vllm serve` flags are taken verbatim
too (`--enable-auto-tool-choice --tool-call-parser hermes --lora-modules a=/x b=/y`).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from settings.arguments import ArgumentError, parse_arguments

PROJECT_DIR = Path(__file__).resolve().parent.parent
# KServe model-server flags that become `bentoml serve` options; None: accepted with no effect here
# (README, "KServe's model-server flags", says why for each). Every other KServe flag is a server argument.
_SERVER_FLAGS = {"http_port": "--port", "enable_docs_url": None, "max_threads": None, "access_log_format": None}
KSERVE_GRPC_PORT = "8081"
_FALSE = {"false", "0", "no", "off", "f", "n"}


def kserve_to_bentoml(argv: list[str]) -> list[str]:
    """The `bentoml serve` arguments for KServe-style flags; ArgumentError names any unknown flag."""
    given: dict[str, str] = {}
    serve_options: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--"):
            raise ArgumentError(f"unexpected argument '{token}'; flags look like --model_name=NAME")
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not has_value:
            # `--flag value`, `--flag value value ...` (vllm serve's list options, e.g. --lora-modules a=/x b=/y)
            # or a bare boolean `--flag`, as KServe's and vLLM's argparse accept.
            words = []
            while index < len(argv) and not argv[index].startswith("--"):
                words.append(argv[index])
                index += 1
            value = "true" if not words else words[0] if len(words) == 1 else shlex.join(words)
        if name in _SERVER_FLAGS:
            if _SERVER_FLAGS[name]:
                serve_options += [_SERVER_FLAGS[name], value]
            continue
        given[name] = value
    # KServe serves gRPC on 8081 unless --enable_grpc=false.
    if "grpc_port" not in given and given.get("enable_grpc", "true").strip().lower() not in _FALSE:
        given["grpc_port"] = KSERVE_GRPC_PORT
    # Fails here, before BentoML starts, with the names of unknown or contradictory flags. Names are
    # snake-cased first, so vLLM's dash-case flags (--max-num-seqs 8) reach the parser like any other.
    parse_arguments(given)
    command = ["serve", "service:HuggingFaceService", *serve_options]
    for name, value in given.items():
        command += ["--arg", f"{name}={value}"]
    return command


def secret_arguments(command: list[str]) -> tuple[list[str], dict[str, str]]:
    """`--arg api_key=...` moved into the environment (HF_SERVE_API_KEY), so the key stays out of the
    `bentoml serve` command line that `ps` shows for the server's lifetime."""
    kept: list[str] = []
    env: dict[str, str] = {}
    index = 0
    while index < len(command):
        if command[index] == "--arg" and command[index + 1].startswith("api_key="):
            env["HF_SERVE_API_KEY"] = command[index + 1].partition("=")[2]
            index += 2
            continue
        kept.append(command[index])
        index += 1
    return kept, env


def main(argv: list[str] | None = None) -> None:
    try:
        command = kserve_to_bentoml(sys.argv[1:] if argv is None else argv)
    except ArgumentError as error:
        sys.exit(f"huggingfaceserver: {error}")
    command, secrets = secret_arguments(command)
    os.chdir(PROJECT_DIR)
    os.execve(sys.executable, [sys.executable, "-m", "bentoml", *command], {**os.environ, **secrets})


if __name__ == "__main__":
    main()
