"""Runs `bentoml serve` in a subprocess on a free loopback port, as a user would, for HTTP tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

PROJECT_DIR = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).with_name("bentoml"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        args: dict[str, str],
        log_path: Path,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        serve_options: list[str] | None = None,
        port_flag: str = "--http_port",
    ) -> None:
        """`bentoml serve` with `--arg` flags and `serve_options`; or `command`, given the port as `port_flag`."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if command is None:
            arg_flags = [flag for name, value in args.items() for flag in ("--arg", f"{name}={value}")]
            base = [BENTOML, "serve", "service:HuggingFaceService", "--host", "127.0.0.1"]
            self.command = [*base, "--port", str(self.port), *arg_flags, *(serve_options or [])]
        else:
            self.command = [*command, f"{port_flag}={self.port}"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true", **(env or {})}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command, cwd=PROJECT_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        # BentoML's workers run in sessions of their own, out of reach of killpg: remember them first, so
        # none outlives the test (and keeps its CPU and port) if the arbiter goes before it.
        try:
            workers = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            workers = []
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        for worker in alive:
            worker.kill()
        self._log.close()
