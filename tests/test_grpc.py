"""The Open Inference Protocol over gRPC (protocols/v2_grpc.py), called with tritonclient.grpc unchanged.

The runtimes run in-process (no `bentoml serve`): each gets a gRPC server on a free loopback port in
one asyncio loop on a background thread. Every answer is compared with a direct transformers call.
"""

from __future__ import annotations

import ast
import asyncio
import queue
import socket
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from engines.encoder_runtime import PredictiveRuntime
from handlers.errors import InvalidInput, ModelNotFound, NotReady, Overloaded, ServingError, UnsupportedMediaType
from protocols import v2_binary
from protocols.v2_grpc import grpc_status, start_grpc_server
from settings.arguments import parse_arguments
from settings.loading import default_model_dir
from tests import reference

SENTENCES = ["The capital of France is Paris.", "hello world", "a much longer sentence about the weather in paris"]
MINILM = Path(default_model_dir())
T = TypeVar("T")


class LoopThread:
    """An asyncio loop on a daemon thread, as a BentoML worker's loop would be."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def runtime_for(arguments: dict[str, Any], load: bool = True) -> PredictiveRuntime:
    runtime = PredictiveRuntime(parse_arguments(arguments, environ={}))
    if load:
        runtime.load()
    return runtime


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path]) -> Iterator[dict[str, str]]:
    """Address per task: sequence_classification (sst), token_classification (ner), fill_mask (bert),
    text_embedding (minilm, the default model folder) and not_ready (sst, weights never loaded)."""
    models = {
        "sequence_classification": {"model_dir": str(tiny_models["sequence_classification"]), "model_name": "sst"},
        "token_classification": {"model_dir": str(tiny_models["token_classification"]), "model_name": "ner"},
        "fill_mask": {"model_dir": str(tiny_models["fill_mask"]), "model_name": "bert"},
        "text_embedding": {"model_name": "minilm"},
    }
    # One at a time: transformers' loading is not thread-safe (its meta-device init context is global).
    runtimes = {task: runtime_for(arguments) for task, arguments in models.items()}
    runtimes["not_ready"] = runtime_for(models["sequence_classification"], load=False)
    loop = LoopThread()
    started: list[grpc.aio.Server] = []
    addresses = {}
    try:
        for task, runtime in runtimes.items():
            port = free_port()
            started.append(loop.run(start_grpc_server(runtime, port, "127.0.0.1", server_version="9.9.9")))
            addresses[task] = f"127.0.0.1:{port}"
        yield addresses
    finally:
        for server in started:
            loop.run(server.stop(grace=1))
        loop.close()
        for runtime in runtimes.values():
            if runtime._batcher is not None:
                runtime._batcher.close()


def client(servers: dict[str, str], task: str) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(servers[task])


def text_input(texts: list[str], name: str = "input-0") -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object))
    return tensor


def grpc_error(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- health and metadata ---


def test_health_and_server_metadata(servers):
    sst = client(servers, "sequence_classification")
    assert sst.is_server_live() and sst.is_server_ready() and sst.is_model_ready("sst")
    metadata = sst.get_server_metadata()
    assert (metadata.name, metadata.version) == ("hf-bentoml-server", "9.9.9")
    error = grpc_error(lambda: sst.is_model_ready("nope"))
    assert error.status() == "StatusCode.NOT_FOUND" and "Model with name nope does not exist." in error.message()


def test_model_metadata_has_real_tensors(servers):
    expected = {
        "sequence_classification": ("sst", [("output-0", "INT64", [-1])]),
        "token_classification": ("ner", [("output-0", "INT64", [-1, 1, -1])]),
        "fill_mask": ("bert", [("output-0", "BYTES", [-1])]),
        "text_embedding": ("minilm", [("output-0", "FP64", [-1, 384])]),
    }
    for task, (name, outputs) in expected.items():
        metadata = client(servers, task).get_model_metadata(name, as_json=True)
        assert metadata["name"] == name and metadata["platform"] == "huggingface"
        assert metadata["inputs"] == [{"name": "input-0", "datatype": "BYTES", "shape": ["-1"]}]  # int64 as JSON str
        assert [(o["name"], o["datatype"], [int(d) for d in o["shape"]]) for o in metadata["outputs"]] == outputs
    error = grpc_error(lambda: client(servers, "fill_mask").get_model_metadata("sst"))
    assert error.status() == "StatusCode.NOT_FOUND"


def test_not_ready_model_answers_unavailable(servers):
    waiting = client(servers, "not_ready")
    assert waiting.is_server_live()
    assert not waiting.is_server_ready() and not waiting.is_model_ready("sst")
    error = grpc_error(lambda: waiting.infer("sst", [text_input(["hello"])]))
    assert error.status() == "StatusCode.UNAVAILABLE" and "still loading" in error.message()


# --- inference equals transformers ---


def test_sequence_classification_equals_transformers(servers, tiny_models):
    logits = reference.classification_logits(tiny_models["sequence_classification"], SENTENCES)
    sst = client(servers, "sequence_classification")
    result = sst.infer("sst", [text_input(SENTENCES)], request_id="req-1")
    assert result.get_response().id == "req-1" and result.get_response().model_name == "sst"
    output = result.get_output("output-0")
    assert (output.datatype, list(output.shape)) == ("INT64", [3])
    assert result.as_numpy("output-0").tolist() == logits.argmax(dim=-1).tolist()
    # Request parameters are the REST request options; outputs asked for by name come alone.
    result = sst.infer(
        "sst",
        [text_input(SENTENCES)],
        outputs=[triton.InferRequestedOutput("probabilities")],
        parameters={"return_probabilities": True},
        compression_algorithm="gzip",
    )
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, 3)
    assert np.allclose(probabilities, torch.softmax(logits, dim=-1).numpy(), atol=1e-5)
    labels = sst.infer("sst", [text_input(SENTENCES)], parameters={"labels": True}).as_numpy("output-0")
    names = ["NEGATIVE", "NEUTRAL", "POSITIVE"]
    assert [label.decode() for label in labels] == [names[i] for i in logits.argmax(dim=-1).tolist()]


def test_token_classification_equals_transformers(servers, tiny_models):
    logits = reference.token_logits(tiny_models["token_classification"], SENTENCES)
    result = client(servers, "token_classification").infer(
        "ner", [text_input(SENTENCES)], parameters={"return_offsets_mapping": True}
    )
    ids = result.as_numpy("output-0")
    assert ids.dtype == np.int64 and ids.shape == (3, 1, logits.shape[1])
    assert ids[:, 0, :].tolist() == logits.argmax(dim=-1).tolist()
    encoding = reference.tokenizer(tiny_models["token_classification"])(SENTENCES[:1], return_offsets_mapping=True)
    offsets = result.as_numpy("offset_mapping")
    assert offsets.shape[0] == 3 and offsets.shape[2] == 2
    assert offsets[0, : len(encoding["offset_mapping"][0])].tolist() == [list(p) for p in encoding["offset_mapping"][0]]


def test_fill_mask_equals_transformers(servers, tiny_models):
    texts = ["the capital of france is [MASK].", "[MASK] is the capital of [MASK]."]
    expected = reference.fill_mask_tokens(tiny_models["fill_mask"], texts)
    result = client(servers, "fill_mask").infer("bert", [text_input(texts)])
    assert result.get_output("output-0").datatype == "BYTES"
    assert [token.decode() for token in result.as_numpy("output-0")] == expected


def test_embedding_equals_transformers(servers):
    result = client(servers, "text_embedding").infer("minilm", [text_input(SENTENCES)])
    vectors = result.as_numpy("output-0")
    assert vectors.dtype == np.float64 and vectors.shape == (3, 384)
    assert np.allclose(vectors, reference.mean_pooled_embeddings(MINILM, SENTENCES).numpy(), atol=1e-5)


def test_bytes_contents_and_typed_parameters_from_a_plain_stub(servers, tiny_models):
    """Clients other than tritonclient (e.g. KServe's) may send texts in contents.bytes_contents."""
    logits = reference.classification_logits(tiny_models["sequence_classification"], SENTENCES)
    request = pb.ModelInferRequest(model_name="sst", id="plain")
    tensor = request.inputs.add(name="input-0", datatype="BYTES", shape=[3, 1])
    tensor.contents.bytes_contents.extend(text.encode() for text in SENTENCES)
    request.parameters["return_raw_logits"].string_param = "true"  # coerced as REST coerces JSON
    request.parameters["priority"].uint64_param = 1  # a scheduling hint, not a request option
    with grpc.insecure_channel(servers["sequence_classification"]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        default = stub.ModelInfer(request, timeout=30)  # KServe's answer: output-0 alone
        request.parameters["extra_outputs"].bool_param = True  # the FP32 logits beside it, asked for
        response = stub.ModelInfer(request, timeout=30)
    assert [o.name for o in default.outputs] == ["output-0"]
    assert default.raw_output_contents[0] == response.raw_output_contents[0]
    assert response.id == "plain" and [o.name for o in response.outputs] == ["output-0", "logits"]
    assert len(response.raw_output_contents) == 2
    elements = v2_binary.decode_bytes_elements(response.raw_output_contents[0])
    dicts = [ast.literal_eval(element.decode()) for element in elements]  # KServe's str(dict)
    assert np.allclose([[row[j] for j in range(3)] for row in dicts], logits.numpy(), atol=1e-4)
    raw = np.frombuffer(response.raw_output_contents[1], dtype="<f4").reshape(list(response.outputs[1].shape))
    assert np.allclose(raw, logits.numpy(), atol=1e-4)


def test_concurrent_requests_and_a_stream(servers, tiny_models):
    texts = [f"sentence number {i} about paris" for i in range(12)]
    expected = reference.classification_logits(tiny_models["sequence_classification"], texts).argmax(dim=-1).tolist()
    sst = client(servers, "sequence_classification")
    answers: queue.Queue[tuple[int, Any, Any]] = queue.Queue()
    for i, text in enumerate(texts):
        sst.async_infer("sst", [text_input([text])], lambda result, error, i=i: answers.put((i, result, error)))
    got = {}
    for _ in texts:
        i, result, error = answers.get(timeout=30)
        assert error is None, error
        got[i] = result.as_numpy("output-0").tolist()[0]
    assert [got[i] for i in range(len(texts))] == expected

    # Triton's streaming extra: each request answered in turn, a bad one does not end the stream.
    streamed: queue.Queue[tuple[Any, Any]] = queue.Queue()
    sst.start_stream(callback=lambda result, error: streamed.put((result, error)))
    try:
        sst.async_stream_infer("sst", [text_input(texts[:2])], request_id="s1")
        sst.async_stream_infer("sst", [text_input(["x"])], outputs=[triton.InferRequestedOutput("nope")])
        sst.async_stream_infer("sst", [text_input(texts[2:3])], request_id="s3")
        results = [streamed.get(timeout=30) for _ in range(3)]
    finally:
        sst.stop_stream()
    ok = {r.get_response().id: r.as_numpy("output-0").tolist() for r, e in results if e is None}
    assert ok == {"s1": expected[:2], "s3": expected[2:3]}
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 1 and "unknown output(s) nope" in errors[0].message()


# --- errors: each a clear status, and the server keeps answering ---


def _wrong_datatype() -> list[triton.InferInput]:
    tensor = triton.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    return [tensor]


def _wrong_shape() -> list[triton.InferInput]:
    tensor = text_input(["a"])
    tensor.set_shape([2])
    return [tensor]


@pytest.mark.parametrize(
    ("model", "inputs", "extra", "status", "needle"),
    [
        ("nope", lambda: [text_input(["ok"])], {}, "NOT_FOUND", "Model with name nope does not exist."),
        ("sst", _wrong_datatype, {}, "INVALID_ARGUMENT", "datatype FP32; text models take BYTES"),
        ("sst", _wrong_shape, {}, "INVALID_ARGUMENT", "shape [2]"),
        ("sst", lambda: [text_input(["a"]), text_input(["b"], "input-1")], {}, "INVALID_ARGUMENT", "one BYTES input"),
        ("sst", lambda: [text_input(["ok"])], {"parameters": {"bogus": 1}}, "INVALID_ARGUMENT", "bogus"),
        ("sst", lambda: [text_input(["ok"])], {"parameters": {"top_k": 2}}, "INVALID_ARGUMENT", "fill_mask"),
        (
            "sst",
            lambda: [text_input(["ok"])],
            {"outputs": [triton.InferRequestedOutput("logits")]},
            "INVALID_ARGUMENT",
            "unknown output(s) logits",
        ),
    ],
)
def test_bad_requests_get_clear_statuses_and_server_keeps_serving(servers, model, inputs, extra, status, needle):
    sst = client(servers, "sequence_classification")
    error = grpc_error(lambda: sst.infer(model, inputs(), **extra))
    assert error.status() == f"StatusCode.{status}", error
    assert needle in error.message()
    assert sst.infer("sst", [text_input(["still here"])]).as_numpy("output-0").shape == (1,)


def test_fill_mask_without_mask_and_triton_extras(servers):
    bert = client(servers, "fill_mask")
    error = grpc_error(lambda: bert.infer("bert", [text_input(["no mask here"])]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "[MASK]" in error.message()
    for call in (bert.get_model_repository_index, bert.get_inference_statistics, lambda: bert.get_model_config("bert")):
        assert grpc_error(call).status() == "StatusCode.UNIMPLEMENTED"
    assert bert.is_model_ready("bert")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (UnsupportedMediaType("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotReady("x"), grpc.StatusCode.UNAVAILABLE),
        (ServingError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(error: ServingError, code: grpc.StatusCode):
    assert grpc_status(error.status_code) == code
