"""gRPC calls while the server drains, and calls their clients cancel (protocols/grpc_guard.py).

In-process runtimes behind `start_grpc_server`, as in test_grpc.py; the encoder batcher's `max_wait_ms` holds a
request long enough to act on it however busy the machine. The SIGTERM path through `bentoml serve` is in
test_shutdown.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from engines.generation.select import build_generation_backend
from engines.generation.transformers import TransformersBackend
from protocols.kserve_generation import GenerativeRuntime
from protocols.v2_grpc import start_grpc_server
from routes.lifecycle import Lifecycle
from settings.arguments import parse_arguments
from settings.loading import inspect_model
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


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_encoder_call_is_skipped_by_the_batcher(loop, tiny_models, how):
    """The first call waits HOLD_MS for company; its client cancels (or its deadline passes); the second joins
    that batch, which runs with the second alone."""
    folder = tiny_models["sequence_classification"]
    runtime = runtime_for({"model_dir": str(folder), "model_name": "sst", "max_wait_ms": str(HOLD_MS)})
    assert runtime._batcher is not None
    batches: list[int] = []
    process = runtime._batcher._process

    def spy(works: list[Any], *rest: Any) -> Any:
        batches.append(len(works))
        return process(works, *rest)

    runtime._batcher._process = spy
    cancelled: list[str] = []
    port = free_port()
    server = loop.run(start_grpc_server(runtime, port, "127.0.0.1", on_cancelled=cancelled.append))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            if how == "cancel":
                leaving = stub.ModelInfer.future(infer_request("sst", ["I leave"]), timeout=60)
                time.sleep(HOLD_MS / 4000)
                leaving.cancel()
            else:
                with pytest.raises(grpc.RpcError) as expired:
                    stub.ModelInfer(infer_request("sst", ["I leave"]), timeout=HOLD_MS / 4000)
                assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert wait_for(lambda: cancelled == ["/inference.GRPCInferenceService/ModelInfer"])
            staying = stub.ModelInfer(infer_request("sst", ["I stay", "me too"]), timeout=60)
        assert staying.outputs[0].shape == [2]
        assert batches == [1], "the cancelled call was skipped; the batch held only the call that stayed"
    finally:
        loop.run(server.stop(grace=1))
        runtime._batcher.close()


@pytest.fixture
def generation(loop, tiny_models: dict[str, Path]) -> Iterator[tuple[GenerativeRuntime, list[dict[str, bool]]]]:
    """The tiny Llama on the transformers backend, its generate() watched: per generation, whether it ran to its
    final output and whether it was closed."""
    args = parse_arguments(
        {"model_dir": str(tiny_models["llama"]), "backend": "huggingface", "model_name": "llama"}, environ={}
    )
    source = inspect_model(args)
    backend = build_generation_backend(source, args)
    assert isinstance(backend, TransformersBackend)
    runtime = GenerativeRuntime(backend, args, source)

    async def start() -> None:
        await runtime.start_loading()

    loop.run(start(), timeout=120)
    assert runtime.ready, runtime.load_error
    watched: list[dict[str, bool]] = []
    generate = backend.generate

    async def spy(*given: Any, **named: Any) -> AsyncIterator[Any]:
        seen = {"started": False, "finished": False, "closed": False}
        watched.append(seen)
        try:
            async for output in generate(*given, **named):
                seen["started"] = True
                seen["finished"] = seen["finished"] or bool(output.finished)
                yield output
        finally:
            seen["closed"] = True

    backend.generate = spy  # type: ignore[method-assign]
    yield runtime, watched
    loop.run(runtime.stop())


PROMPTS = ["the capital of france is", "hello there", "once upon a time", "machine learning models"]


def test_a_cancelled_generation_call_aborts_its_generation(loop, generation):
    runtime, watched = generation
    backend = runtime.backend
    assert isinstance(backend, TransformersBackend)
    cancelled: list[str] = []
    port = free_port()
    server = loop.run(start_grpc_server(runtime, port, "127.0.0.1", on_cancelled=cancelled.append))  # type: ignore[arg-type]
    long_work = infer_request("llama", PROMPTS, max_tokens=200, temperature=1.0)  # seconds of decoding together
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelInfer.future(long_work, timeout=120)
            assert wait_for(lambda: any(seen["started"] for seen in watched), timeout=60)
            call.cancel()
            assert wait_for(lambda: cancelled == ["/inference.GRPCInferenceService/ModelInfer"])
            assert wait_for(lambda: backend.active_requests() == 0, timeout=5), "the engine rows were freed"
            assert watched and all(seen["closed"] for seen in watched)
            assert not all(seen["finished"] for seen in watched), "the generation was aborted, not run to its end"
            answered = stub.ModelInfer(infer_request("llama", ["hello"], max_tokens=4), timeout=60)
        assert answered.outputs[0].name == "output-0" and len(answered.raw_output_contents[0]) > 4
    finally:
        loop.run(server.stop(grace=1))


def test_calls_are_not_counted_as_cancelled_when_answered(loop, tiny_models):
    """The counter hears only of cancelled calls; answered and failed calls leave in_flight at 0."""
    folder = tiny_models["sequence_classification"]
    runtime = runtime_for({"model_dir": str(folder), "model_name": "sst"})
    lifecycle = Lifecycle()
    cancelled: list[str] = []
    port = free_port()
    server = loop.run(start_grpc_server(runtime, port, "127.0.0.1", lifecycle=lifecycle, on_cancelled=cancelled.append))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            threads = [
                threading.Thread(target=lambda: stub.ModelInfer(infer_request("sst", ["a text"]), timeout=60))
                for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            with pytest.raises(grpc.RpcError) as unknown:
                stub.ModelInfer(infer_request("nope", ["a text"]), timeout=60)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
            streamed = list(stub.ModelStreamInfer(iter([infer_request("sst", ["x"])] * 3), timeout=60))
        assert len(streamed) == 3 and not any(response.error_message for response in streamed)
        assert cancelled == [] and lifecycle.in_flight == 0
    finally:
        loop.run(server.stop(grace=1))
        if runtime._batcher is not None:
            runtime._batcher.close()
