"""An unexpected exception in a route: a 500 in the protocol's shape with the request id, its traceback logged
once, and the keep-alive connection still usable for the next request.

The real service app (service.py loaded fresh, a tiny classifier) served by uvicorn on a loopback port, so
keep-alive is real. The fault is injected: V1's response formatting raises for two-input requests, a bug
of the kind no handler knows (a RuntimeError), while one-input requests are answered normally.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from protocols import v1
from tests.server_process import free_port

PROJECT_DIR = Path(__file__).resolve().parent.parent


def test_a_500_keeps_its_shape_logs_once_and_keeps_the_connection(tiny_models, monkeypatch, caplog):
    monkeypatch.setenv("HF_SERVE_MODEL_DIR", str(tiny_models["sequence_classification"]))
    monkeypatch.setenv("HF_SERVE_MODEL_NAME", "sst")
    spec = importlib.util.spec_from_file_location("service_under_test_unexpected_error", PROJECT_DIR / "service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    service = module.HuggingFaceService()
    deadline = time.monotonic() + 120
    while not service.runtime.ready:
        assert service.runtime.load_error is None
        assert time.monotonic() < deadline, "the model did not load in 120 s"
        time.sleep(0.05)

    formatted = v1.predict_response

    def buggy(result):  # type: ignore[no-untyped-def]
        if len(result.predictions) == 2:
            raise RuntimeError("injected bug while formatting")
        return formatted(result)

    monkeypatch.setattr(v1, "predict_response", buggy)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(module.app, host="127.0.0.1", port=port, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    caplog.set_level(logging.INFO)
    try:
        url = f"http://127.0.0.1:{port}/v1/models/sst:predict"
        with httpx.Client(timeout=60) as client:
            failed = client.post(url, json={"instances": ["a", "b"]}, headers={"x-request-id": "bug-1"})
            first_connection = failed.extensions["network_stream"].get_extra_info("client_addr")
            answered = client.post(url, json={"instances": ["a"]})
            second_connection = answered.extensions["network_stream"].get_extra_info("client_addr")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert failed.status_code == 500
    assert failed.headers["content-type"] == "application/json"
    assert failed.headers["x-request-id"] == "bug-1"
    assert failed.json()["request_id"] == "bug-1" and "bug-1" in failed.json()["error"]
    assert "injected bug" not in failed.text  # internals stay in the log
    assert answered.status_code == 200 and len(answered.json()["predictions"]) == 1
    assert first_connection == second_connection, "the second request needed a new connection"
    tracebacks = [record for record in caplog.records if "injected bug" in record.getMessage() + str(record.exc_text)]
    assert len(tracebacks) == 1, [record.getMessage()[:200] for record in tracebacks]
    assert "Traceback" in tracebacks[0].getMessage() and "bug-1" in tracebacks[0].getMessage()
    assert not any("Exception in ASGI application" in record.getMessage() for record in caplog.records)


@pytest.fixture(autouse=True)
def _forget_the_fresh_service_module():
    yield
    sys.modules.pop("service_under_test_unexpected_error", None)
