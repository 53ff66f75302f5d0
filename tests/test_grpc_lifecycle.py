"""gRPC calls while the server drains (protocols/grpc_guard.py).

In-process runtimes behind `start_grpc_server`, as in test_grpc.py; the encoder batcher's `max_wait_ms` holds a
request long enough to act on it however busy the machine. The SIGTERM path through `bentoml serve` is in
test_shutdown.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from protocols.v2_grpc import start_grpc_server
from routes.lifecycle import Lifecycle
from tests import reference
from tests.test_grpc import LoopThread, free_port, runtime_for

HOLD_MS = 1500


def infer_request(model: str, texts: list[str], **parameters: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input-0", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(text.encode() for text in texts)
    for name, value in parameters.items():
        if isinstance(value, float):
            request.parameters[name].double_param = value
        else:
            request.parameters[name].int64_param = value
    return request


def wait_for(condition: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def test_draining_refuses_new_calls_and_lets_calls_in_flight_finish(loop, tiny_models):
    folder = tiny_models["sequence_classification"]
    runtime = runtime_for({"model_dir": str(folder), "model_name": "sst", "max_wait_ms": str(HOLD_MS)})
    lifecycle = Lifecycle()
    port = free_port()
    server = loop.run(start_grpc_server(runtime, port, "127.0.0.1", lifecycle=lifecycle, retry_after_s=7))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            in_flight = stub.ModelInfer.future(infer_request("sst", ["hello world"]), timeout=60)
            assert wait_for(lambda: lifecycle.in_flight == 1), "the call in flight is counted for the drain"
            lifecycle.draining = True  # what SIGTERM sets (routes/lifecycle.py)
            for refused_call in (
                lambda: stub.ModelInfer(infer_request("sst", ["new"]), timeout=30),
                lambda: stub.ServerReady(pb.ServerReadyRequest(), timeout=30),
                lambda: list(stub.ModelStreamInfer(iter([infer_request("sst", ["new"])]), timeout=30)),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    refused_call()
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in refused.value.details()
                assert ("retry-after", "7") in refused.value.trailing_metadata()
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live  # a stopping process is still live
            answer = in_flight.result(timeout=60)
        expected = reference.classification_logits(folder, ["hello world"]).argmax(dim=-1).tolist()
        assert answer.outputs[0].name == "output-0"
        assert int.from_bytes(answer.raw_output_contents[0][:8], "little", signed=True) == expected[0]
        assert lifecycle.in_flight == 0
    finally:
        loop.run(server.stop(grace=1))
        if runtime._batcher is not None:
            runtime._batcher.close()
