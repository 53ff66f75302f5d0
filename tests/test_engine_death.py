"""A generation engine that dies turns readiness to 503 and fails requests with 503, never a hang.

The real service app (service.py, loaded fresh with its arguments in HF_SERVE_* variables) on the
transformers backend with the tiny Llama, driven in-process over ASGI. The engine's loop is made to die
the way a loop dies: an exception its step handler does not catch (a BaseException) raised from the
backend's decode step while requests are running.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from engines.generation.transformers.backend import TransformersBackend

PROJECT_DIR = Path(__file__).resolve().parent.parent


class EngineCrash(BaseException):
    """Not an Exception: the step loop's `except Exception` cannot keep the engine alive through it."""


def load_service(monkeypatch: pytest.MonkeyPatch, arguments: dict[str, str]) -> ModuleType:
    for name, value in arguments.items():
        monkeypatch.setenv(f"HF_SERVE_{name.upper()}", value)
    spec = importlib.util.spec_from_file_location("service_under_test_engine_death", PROJECT_DIR / "service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_dead_engine_means_503_for_readiness_and_requests(tiny_models, monkeypatch):
    module = load_service(monkeypatch, {"model_dir": str(tiny_models["llama"]), "backend": "huggingface"})

    async def scenario() -> None:
        service = module.HuggingFaceService()
        await service._start()
        while not service.runtime.ready:
            assert service.runtime.load_error is None, service.runtime.load_error
            await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=module.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            body = {"prompt": "hello", "max_tokens": 8}
            assert (await client.post("/openai/v1/completions", json=body)).status_code == 200

            decode = TransformersBackend._decode

            def dying_decode(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                decode(self, *args, **kwargs)
                raise EngineCrash("injected: the decode step blew up")

            monkeypatch.setattr(TransformersBackend, "_decode", dying_decode)
            running = await asyncio.wait_for(
                client.post("/openai/v1/completions", json={**body, "max_tokens": 64}), timeout=120
            )
            assert running.status_code == 503, running.text
            assert "engine died" in running.json()["error"]["message"]

            later = await asyncio.wait_for(client.post("/openai/v1/completions", json=body), timeout=120)
            assert later.status_code == 503 and later.headers["retry-after"]
            v2 = await asyncio.wait_for(
                client.post(
                    "/v2/models/model/infer",
                    json={"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
                ),
                timeout=120,
            )
            assert v2.status_code == 503 and "engine died" in v2.json()["error"]
            assert (await client.get("/v2/health/ready")).status_code == 503
            assert (await client.get("/v2/models/model/ready")).status_code == 503
            assert not service.__is_ready__()  # BentoML's /readyz
        await service._stop()

    asyncio.run(scenario())
