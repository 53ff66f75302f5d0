"""The two servers benchmarks.vllm_side_by_side compares, started on the same model, and their CPU use."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.server_process import ServerProcess, free_port


def tiny_llama() -> Path:
    """The tiny Llama of tests/tiny_models.py, built into a temporary folder."""
    from tests.tiny_models import build_llama

    return build_llama(Path(tempfile.mkdtemp(prefix="vllm-bench-")) / "llama")


class VLLMServer:
    """vLLM's OpenAI server in a subprocess (its own session, so stop() ends its engine process too)."""

    def __init__(self, model: Path, name: str, extra: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        command += ["--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port), *extra]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **os.environ}
        env["HF_HUB_OFFLINE"] = "1"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.start_seconds = float("nan")

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        async with aiohttp.ClientSession() as session:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"vLLM server exited with {self.process.returncode}:\n{tail}")
                try:
                    async with session.get(self.url.removesuffix("/v1") + "/health") as response:
                        if response.status == 200:
                            self.start_seconds = time.perf_counter() - self.started
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


async def wait_for_ceiling(base_url: str, timeout: float) -> None:
    """Until the ceiling (vLLM's app served bare by our worker, vllm_ceiling_hook) answers GET {base_url}/health."""
    deadline = time.perf_counter() + timeout
    async with aiohttp.ClientSession() as session:
        while time.perf_counter() < deadline:
            try:
                async with session.get(base_url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{base_url}/health not ready after {timeout:.0f} s (did vllm_ceiling_hook find its module?)")


class ServerCPU:
    """The CPU seconds of a server's API process and of its engine core (vLLM's `VLLM::EngineCore`)."""

    API_MODULES = ("vllm.entrypoints.openai.api_server", "_bentoml_impl.worker.service")

    def __init__(self, root_pid: int) -> None:
        root = psutil.Process(root_pid)
        tree = [root, *root.children(recursive=True)]
        self.api = next(p for p in tree if any(module in p.cmdline() for module in self.API_MODULES))
        self.engine = next(p for p in tree if p.name().startswith("VLLM::EngineCore"))

    def seconds(self) -> tuple[float, float]:
        return tuple(sum(p.cpu_times()[:2]) for p in (self.api, self.engine))  # type: ignore[return-value]


OURS_ARGS = {"backend": "vllm", "model_name": "tiny-llama", "disable_log_stats": "true"}


def ceiling_env(port: int, serves: str = "vllm-app") -> dict[str, str]:
    """The environment in which our worker also serves vLLM's app bare on `port` (vllm_ceiling_hook), or with
    `serves="service"` our whole service app there, on a plain uvicorn server."""
    hook = str(Path(__file__).with_name("vllm_ceiling_hook"))
    path = os.pathsep.join(part for part in (hook, os.environ.get("PYTHONPATH", "")) if part)
    return {"PYTHONPATH": path, "BENCH_VLLM_CEILING_PORT": str(port), "BENCH_CEILING_SERVES": serves}


def start_ours(
    options: argparse.Namespace, extra: dict[str, str], log_name: str = "ours", env: dict[str, str] | None = None
) -> Any:
    """Our server (`bentoml serve`, backend vllm) on the same model, dtype and max_model_len, ready."""
    arguments = {
        **OURS_ARGS,
        "model_dir": str(options.model),
        "max_model_len": str(options.max_model_len),
        "dtype": options.dtype,
        **extra,
    }
    print(f"starting ours: bentoml serve {arguments} ...", flush=True)
    log = Path(f"/tmp/vllm-side-by-side-{log_name}.log")
    return ServerProcess(arguments, log, env=env).wait_ready(options.start_timeout)
