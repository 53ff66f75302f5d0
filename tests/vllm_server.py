"""`bentoml serve` on vLLM's CPU engine for the slow vLLM tests (tests/test_vllm_openai.py, test_vllm_pooling.py).

The model runs in vLLM's engine-core process itself (VLLM_ENABLE_V1_MULTIPROCESSING=0: no further worker
process, so the engine starts in seconds), with a 1 GiB KV cache so that several servers fit the machine; each
server has its own BENTOML_HOME, which keeps its Prometheus files apart from other servers'.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server_process import ServerProcess

VLLM_TEST_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Loading and warming a vLLM engine on a busy 2-core machine takes minutes.
READY_TIMEOUT_S = 600


def serve_on_vllm(args: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """For a module fixture (`yield from`): the server's URL once ready; stopped when the fixture ends."""
    home = tmp_path_factory.mktemp("bentoml-home")
    process = ServerProcess(args, home / "server.log", env={**VLLM_TEST_ENV, "BENTOML_HOME": str(home)})
    try:
        yield process.wait_ready(timeout=READY_TIMEOUT_S).url
    finally:
        process.stop()
