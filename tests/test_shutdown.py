"""SIGTERM with requests in flight, on a real `bentoml serve`: the requests finish (HTTP and gRPC), new ones get
503 with Retry-After (readiness too) or gRPC UNAVAILABLE, and the process exits 0.

The request in flight is held by the batcher's `max_wait_ms` (it waits that long for company), so it is
still running when the worker gets the signal, however fast or busy the machine.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import httpx

from tests import reference
from tests.server_process import ServerProcess, free_port
from tests.test_grpc_lifecycle import infer_request

HOLD_MS = 6000


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_0(tiny_models, tmp_path: Path):
    folder = tiny_models["sequence_classification"]
    grpc_port = free_port()
    args = {"model_dir": str(folder), "model_name": "sst", "max_wait_ms": str(HOLD_MS), "grpc_port": str(grpc_port)}
    server = ServerProcess(args, tmp_path / "server.log").wait_ready()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        stub = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda request: request.SerializeToString(),
            response_deserializer=lambda data: data,
        )
        grpc_in_flight = stub.future(infer_request("sst", ["hello world"]), timeout=120)
        answers: list[httpx.Response] = []
        in_flight = threading.Thread(
            target=lambda: answers.append(
                httpx.post(server.url + "/v1/models/sst:predict", json={"instances": ["hello world"]}, timeout=120)
            )
        )
        in_flight.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)  # as Kubernetes does: to the main process only
        deadline = time.monotonic() + HOLD_MS / 1000
        while httpx.get(server.url + "/readyz", timeout=30).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = httpx.get(server.url + "/v1/models", timeout=30)
        try:
            stub(infer_request("sst", ["too late"]), timeout=30)
            raise AssertionError("a gRPC call while draining was answered")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in str(error.details())
        in_flight.join(timeout=120)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] and "shutting down" in refused.json()["error"]
        expected = reference.classification_logits(folder, ["hello world"]).argmax(dim=-1).tolist()
        assert answers and answers[0].status_code == 200 and answers[0].json() == {"predictions": expected}
        assert grpc_in_flight.result(timeout=60)  # the drain waited for the gRPC call in flight too
        assert server.process.wait(timeout=60) == 0, server.log()
        assert "Running cleanup hook" in server.log()
    finally:
        channel.close()
        server.stop()
