"""The request lifecycle against a careless or hostile client, through `bentoml serve`: one error shape with a
request id on every route, the API key (HTTP and gRPC), body limits, and overload (429 with Retry-After).

One server, a tiny classifier with `api_key`, small body limits and a small queue; every case of the README's
"Limits and security" table is a row of ERROR_CASES.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from routes.guard import request_id_source
from tests.server_process import ServerProcess, free_port

API_KEY = "test-key-5f1e9a"
AUTH = {"authorization": f"Bearer {API_KEY}"}
LIMIT = 65536
GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = {
        "model_dir": str(tiny_models["sequence_classification"]),
        "model_name": "sst",
        "api_key": API_KEY,
        "max_request_bytes": str(LIMIT),
        "max_decompressed_bytes": str(LIMIT),
        "max_queue_size": "2",
        "retry_after_s": "3",
        "grpc_port": str(GRPC_PORT),
        "max_log_len": "40",
    }
    process = ServerProcess(args, tmp_path_factory.mktemp("hostile") / "server.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def v2_body(texts: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}


BOMB = gzip.compress(json.dumps(v2_body(["a" * (LIMIT * 2)])).encode())
GZIP_OK = gzip.compress(json.dumps(v2_body(["hello"])).encode())
DEFLATE_OK = zlib.compress(json.dumps(v2_body(["hello"])).encode())

# (what, method, path, headers, body, status, shape): shape "kserve" is {"error": str}, "openai" {"error": {...}}.
ERROR_CASES: list[tuple[str, str, str, dict[str, str], bytes | None, int, str]] = [
    ("no key", "GET", "/v1/models", {}, None, 401, "kserve"),
    ("wrong key", "POST", "/v1/models/sst:predict", {"authorization": "Bearer nope"}, b'{"instances": ["a"]}', 401,
     "kserve"),
    ("key without Bearer", "GET", "/v2/models/sst", {"authorization": API_KEY}, None, 401, "kserve"),
    ("no key, OpenAI", "GET", "/openai/v1/models", {}, None, 401, "openai"),
    ("no key, V2 infer", "POST", "/v2/models/sst/infer", {}, json.dumps(v2_body(["a"])).encode(), 401, "kserve"),
    ("unknown path", "GET", "/nope", AUTH, None, 404, "kserve"),
    ("unknown path, OpenAI", "POST", "/openai/v1/nope", AUTH, b"{}", 404, "openai"),
    ("wrong method", "DELETE", "/v1/models", AUTH, None, 405, "kserve"),
    ("wrong method, V2", "GET", "/v2/models/sst/infer", AUTH, None, 405, "kserve"),
    ("unknown model", "POST", "/v1/models/other:predict", AUTH, b'{"instances": ["a"]}', 404, "kserve"),
    ("malformed JSON", "POST", "/v1/models/sst:predict", AUTH, b'{"instances": [', 400, "kserve"),
    ("wrong JSON type", "POST", "/v1/models/sst:predict", AUTH, b'{"instances": "a"}', 400, "kserve"),
    ("wrong content type", "POST", "/v1/models/sst:predict", {**AUTH, "content-type": "image/png"}, b"x", 415,
     "kserve"),
    ("V2 wrong datatype", "POST", "/v2/models/sst/infer", AUTH,
     b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', 400, "kserve"),
    ("body over max_request_bytes", "POST", "/v1/models/sst:predict", AUTH,
     json.dumps({"instances": ["a" * LIMIT]}).encode(), 413, "kserve"),
    ("body over max_request_bytes, OpenAI", "POST", "/openai/v1/embeddings", AUTH,
     json.dumps({"input": "a" * LIMIT}).encode(), 413, "openai"),
    ("gzip bomb over max_decompressed_bytes", "POST", "/v2/models/sst/infer", {**AUTH, "content-encoding": "gzip"},
     BOMB, 413, "kserve"),
    ("broken gzip", "POST", "/v2/models/sst/infer", {**AUTH, "content-encoding": "gzip"}, b"not gzip", 400, "kserve"),
    ("unknown encoding", "POST", "/v2/models/sst/infer", {**AUTH, "content-encoding": "br"}, b"{}", 415, "kserve"),
    ("embeddings on a classifier", "POST", "/openai/v1/embeddings", AUTH, b'{"input": "a"}', 400, "openai"),
    ("completions on a classifier", "POST", "/openai/v1/completions", AUTH, b'{"prompt": "a"}', 400, "openai"),
    ("malformed OpenAI JSON", "POST", "/openai/v1/embeddings", AUTH, b"{", 400, "openai"),
]  # fmt: skip


def check_error(response: httpx.Response, status: int, shape: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    request_id = response.headers["x-request-id"]
    assert body["request_id"] == request_id
    if shape == "openai":
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["code"] == status and isinstance(error["type"], str) and "param" in error
    else:
        assert isinstance(body["error"], str) and body["error"]


@pytest.mark.parametrize(
    ("what", "method", "path", "headers", "body", "status", "shape"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES]
)
def test_every_error_in_its_protocols_shape_with_a_request_id(server, what, method, path, headers, body, status, shape):
    response = httpx.request(method, server.url + path, headers=headers, content=body, timeout=30)
    check_error(response, status, shape)
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert response.headers["allow"]
    if status == 413:
        assert "max_request_bytes" in response.text or "max_decompressed_bytes" in response.text


def test_chunked_body_over_the_limit_is_413_without_content_length(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ["'
        for _ in range(LIMIT // 1024 + 1):
            yield b"a" * 1024
        yield b'"]}'

    response = httpx.post(server.url + "/v1/models/sst:predict", headers=AUTH, content=chunks(), timeout=30)
    assert "content-length" not in response.request.headers
    check_error(response, 413, "kserve")


@pytest.mark.parametrize(("encoding", "body"), [("gzip", GZIP_OK), ("deflate", DEFLATE_OK)], ids=["gzip", "deflate"])
def test_compressed_bodies_under_the_limit_are_served(server, encoding, body):
    headers = {**AUTH, "content-encoding": encoding}
    response = httpx.post(server.url + "/v2/models/sst/infer", headers=headers, content=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1]


@pytest.mark.parametrize("path", ["/", "/v2/health/live", "/v2/health/ready", "/v1/models/sst", "/v2/models/sst/ready"])
def test_health_and_readiness_need_no_key(server, path):
    response = httpx.get(server.url + path, timeout=30)
    assert response.status_code == 200, response.text
    for bentoml_path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(server.url + bentoml_path, timeout=30).status_code == 200


def test_the_key_opens_model_routes_and_openai_client_works(server):
    from openai import AuthenticationError, OpenAI

    assert httpx.post(server.url + "/v1/models/sst:predict", headers=AUTH, json={"instances": ["a"]}).status_code == 200
    assert OpenAI(base_url=server.url + "/openai/v1", api_key=API_KEY).models.list().data[0].id == "sst"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/openai/v1", api_key="wrong").models.list()


def _request_metrics(url: str, endpoint: str) -> dict[str, float]:
    """BentoML's request series for one endpoint (routes/outer_layers.py records them), summed over workers."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.startswith("bentoml_service_request") and sample.labels.get("endpoint") == endpoint:
                key = sample.name.removeprefix("bentoml_service_request_")
                if sample.name.endswith("_total") or sample.name.endswith("_count"):
                    key += f"[{sample.labels['http_response_code']}]"
                elif not sample.name.endswith("in_progress"):
                    continue
                found[key] = found.get(key, 0.0) + sample.value
    return found


def test_bentomls_request_metrics_count_every_answer_refusals_included(server):
    path = "/v1/models/sst:predict"
    before = _request_metrics(server.url, path)
    for headers in (AUTH, AUTH, {}):
        httpx.post(server.url + path, headers=headers, json={"instances": ["a"]}, timeout=30)
    after = _request_metrics(server.url, path)
    for code, answered in (("200", 2), ("401", 1)):
        for series in ("total", "duration_seconds_count"):
            key = f"{series}[{code}]"
            assert after.get(key, 0) - before.get(key, 0) == answered, (key, before, after)
    assert after["in_progress"] == 0


def test_the_key_guards_bentomls_typed_endpoints_too(server):
    """The guard wraps BentoML's outer app: the @bentoml.api endpoints need the key like every model route."""
    body = {"texts": ["a"]}
    refused = httpx.post(server.url + "/bentoml/classify", json=body, timeout=30)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert httpx.post(server.url + "/bentoml/classify", headers=AUTH, json=body, timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("given", "echoed"),
    [("client-id.42", True), ("a" * 128, True), ("a" * 129, False), ("has space", False), ("semi;colon", False)],
)
def test_request_id_is_the_clients_when_short_and_plain(server, given, echoed):
    response = httpx.get(server.url + "/v1/models", headers={**AUTH, "x-request-id": given}, timeout=30)
    assert response.status_code == 200
    assert (response.headers["x-request-id"] == given) is echoed
    assert 1 <= len(response.headers["x-request-id"]) <= 128


def test_past_max_queue_size_fast_429_with_retry_after_and_admitted_requests_finish(server):
    text = " ".join(["word"] * 3000)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            calls = [
                client.post(server.url + "/v1/models/sst:predict", json={"instances": [text, text]}) for _ in range(48)
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    statuses = sorted({response.status_code for response in responses})
    assert statuses == [200, 429], statuses
    for response in responses:
        if response.status_code == 429:
            check_error(response, 429, "kserve")
            assert response.headers["retry-after"] == "3"
        else:
            assert len(response.json()["predictions"]) == 2


def infer_request(texts: list[str]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="sst")
    tensor = request.inputs.add(name="input-0", datatype="BYTES", shape=[len(texts)])
    tensor.contents.bytes_contents.extend(text.encode() for text in texts)
    return request


def test_grpc_needs_the_key_except_for_health(server):
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name="sst")).ready
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(infer_request(["a"]), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            stub.ServerMetadata(pb.ServerMetadataRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.ModelInfer(infer_request(["a"]), metadata=tuple(AUTH.items()))
        assert list(answer.outputs[0].shape) == [1]
        with pytest.raises(grpc.RpcError) as too_large:
            stub.ModelInfer(infer_request(["a" * LIMIT]), metadata=tuple(AUTH.items()))
        assert too_large.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ModelInfer(pb.ModelInferRequest(model_name="x"), metadata=(*AUTH.items(), ("x-request-id", "g-1")))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "g-1" in unknown.value.details()
        assert ("x-request-id", "g-1") in tuple(unknown.value.trailing_metadata())


def test_grpc_overload_is_resource_exhausted_with_retry_after(server):
    text = " ".join(["word"] * 3000)

    async def burst() -> list[grpc.StatusCode | tuple[grpc.StatusCode, Any]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one() -> Any:
                try:
                    await stub.ModelInfer(infer_request([text, text]), metadata=tuple(AUTH.items()))
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    return error.code(), dict(error.trailing_metadata() or ())

            return await asyncio.gather(*(one() for _ in range(48)))

    outcomes = asyncio.run(burst())
    refused = [outcome for outcome in outcomes if outcome != grpc.StatusCode.OK]
    assert refused, "no request was refused past max_queue_size"
    assert len(refused) < len(outcomes)
    for code, trailing in refused:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert trailing["retry-after"] == "3"


def test_logs_never_hold_the_key_nor_a_whole_prompt_past_max_log_len(server):
    marker = "secret-prompt-" + "x" * 100
    response = httpx.post(server.url + "/v1/models/sst:predict", headers=AUTH, json={"instances": [marker]})
    assert response.status_code == 200
    log = server.log_path.read_text(errors="replace")
    assert API_KEY not in log
    assert marker not in log


@pytest.mark.parametrize("flag", ["--api-key", "--api_key"])
def test_kserve_command_line_takes_the_key_and_keeps_it_off_the_serve_command(flag):
    from huggingfaceserver.__main__ import kserve_to_bentoml, secret_arguments

    command = kserve_to_bentoml(["--model_name=m", flag, "s3cret", "--http_port=8080"])
    kept, env = secret_arguments(command)
    assert env == {"HF_SERVE_API_KEY": "s3cret"}
    assert not any("s3cret" in part for part in kept)
    assert kept[:2] == ["serve", "service:HuggingFaceService"] and "--port" in kept and "model_name=m" in kept


def test_new_request_ids_are_unique_hex_and_differ_between_processes():
    """The guard's own ids (routes/guard.py): a counter under a random per-process prefix, not uuid4 per request."""
    this_process, another_process = request_id_source(), request_id_source()
    ids = [this_process() for _ in range(1000)] + [another_process() for _ in range(1000)]
    assert len(set(ids)) == 2000
    assert all(len(given) == 32 and int(given, 16) >= 0 for given in ids)
    assert ids[0][:16] != ids[1000][:16]
