"""`python -m huggingfaceserver` with every flag of KServe's model server, and the remote predictor over gRPC.

The served command is a KServe ServingRuntime's argument list (deploy/kserve/servingruntime.yaml, as KServe
substitutes {{.Name}}) plus every KServe model-server flag. Its model runs on a
small Open Inference Protocol gRPC server started here (tests/oip_grpc_server.py), reached with
predictor_protocol=grpc-v2 and binary tensors; answers are compared with a direct transformers call.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import yaml

from engines.remote_predictor import GrpcV2Predictor, RemotePredictorError, RemoteV2Predictor, connect
from huggingfaceserver.__main__ import kserve_to_bentoml
from settings.arguments import parse_arguments
from tests import oip_grpc_server, reference
from tests.server_process import PROJECT_DIR, ServerProcess, free_port

TEXTS = ["hello world", "the capital of france is paris", "a third, longer sentence about the weather"]
KSERVE_FLAGS = [
    "http_port", "grpc_port", "enable_grpc", "workers", "max_threads", "max_asyncio_workers", "enable_docs_url",
    "enable_latency_logging", "configure_logging", "log_config_file", "access_log_format", "protocol",
    "grpc_max_send_message_length", "grpc_max_receive_message_length", "predictor_host", "predictor_protocol",
    "predictor_use_ssl", "predictor_request_timeout_seconds", "predictor_request_retries",
    "enable_predictor_health_check",
]  # fmt: skip


def runtime_args() -> list[str]:
    """The ServingRuntime's own args, as KServe hands them to the container for an InferenceService 'sst'."""
    runtime = next(yaml.safe_load_all((PROJECT_DIR / "deploy" / "kserve" / "servingruntime.yaml").read_text()))
    container = next(c for c in runtime["spec"]["containers"] if c["name"] == "kserve-container")
    return [arg.replace("{{.Name}}", "sst") for arg in container["args"]]


def test_every_kserve_flag_is_accepted_and_lands_where_it_means_something():
    argv = [f"--{name}={value}" for name, value in _values(predictor_host="h:1").items()]
    command = kserve_to_bentoml(argv)
    given = {c.split("=", 1)[0]: c.split("=", 1)[1] for c in command if "=" in c}
    assert command[command.index("--port") + 1] == "9000"
    # Accepted with no effect (README says why): not passed on.
    assert not {"enable_docs_url", "max_threads", "access_log_format", "http_port"} & set(given)
    args = parse_arguments(given, environ={})
    assert (args.grpc_port, args.enable_grpc, args.workers, args.max_asyncio_workers) == (9001, True, 2, 3)
    assert (args.grpc_max_send_message_length, args.grpc_max_receive_message_length) == (1000, 2000)
    assert (args.enable_latency_logging, args.configure_logging, args.log_config_file) == (True, False, "/x.yaml")
    assert (args.predictor_protocol, args.predictor_use_ssl) == ("grpc-v2", True)
    assert (args.predictor_request_timeout_seconds, args.predictor_request_retries) == (7, 4)
    assert args.enable_predictor_health_check


def _values(**extra: str) -> dict[str, str]:
    values = {
        "http_port": "9000", "grpc_port": "9001", "enable_grpc": "true", "workers": "2", "max_threads": "8",
        "max_asyncio_workers": "3", "enable_docs_url": "true", "enable_latency_logging": "true",
        "configure_logging": "false", "log_config_file": "/x.yaml", "access_log_format": "%(h)s %(r)s",
        "protocol": "v2", "grpc_max_send_message_length": "1000", "grpc_max_receive_message_length": "2000",
        "predictor_protocol": "grpc-v2", "predictor_use_ssl": "true", "predictor_request_timeout_seconds": "7",
        "predictor_request_retries": "4", "enable_predictor_health_check": "true", "model_name": "m", **extra,
    }  # fmt: skip
    assert set(KSERVE_FLAGS) <= set(values)
    return values


def test_grpc_follows_kserve_defaults_and_enable_grpc_false_turns_it_off():
    assert "grpc_port=8081" in kserve_to_bentoml(["--model_name=m"])
    assert not any(
        item.startswith("grpc_port") for item in kserve_to_bentoml(["--model_name=m", "--enable_grpc=false"])
    )
    assert "grpc_port=7000" in kserve_to_bentoml(["--model_name=m", "--grpc_port", "7000"])


def test_vllm_dash_case_flags_reach_the_argument_parser():
    command = kserve_to_bentoml(["--model_name=m", "--max-num-seqs", "8", "--enable-prefix-caching"])
    assert "max_num_seqs=8" in command and "enable_prefix_caching=true" in command


def test_v1_predictor_protocol_is_refused_with_a_predictor_host():
    with pytest.raises(ValueError, match="predictor_protocol v1 cannot carry tokenizer tensors"):
        parse_arguments({"predictor_host": "h:1", "protocol": "v1"}, environ={})
    assert parse_arguments({"protocol": "v1"}, environ={}).predictor_protocol == "v1"  # KServe's default value


# --- the remote predictor over gRPC, in-process ---


@pytest.fixture(scope="module")
def oip(tiny_models: dict[str, Path]) -> Iterator[tuple[str, oip_grpc_server.OipServicer]]:
    port = free_port()
    server, servicer = oip_grpc_server.start(tiny_models["sequence_classification"], "sst", port)
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def test_grpc_predictor_sends_binary_tensors_and_retries_unavailable(oip, tiny_models):
    host, servicer = oip
    encoding = reference.tokenizer(tiny_models["sequence_classification"])(TEXTS, padding=True, return_tensors="pt")
    expected = reference.classification_logits(tiny_models["sequence_classification"], TEXTS)
    patient = GrpcV2Predictor(host, "sst", ["input_ids", "attention_mask"], timeout_s=10, retries=2)
    servicer.fail_next, calls = 2, servicer.calls
    assert torch.allclose(patient.infer(dict(encoding)), expected, atol=1e-5)
    assert servicer.calls - calls == 3  # two UNAVAILABLE, then the answer
    impatient = GrpcV2Predictor(host, "sst", None, timeout_s=10)
    servicer.fail_next = 1
    with pytest.raises(RemotePredictorError, match="UNAVAILABLE: warming up") as raised:
        impatient.infer(dict(encoding))
    assert raised.value.status_code == 502
    assert impatient.is_ready() and not GrpcV2Predictor(host, "other", None).is_ready()


def test_predictor_use_ssl_and_protocol_choose_the_transport():
    rest = connect(parse_arguments({"predictor_host": "h:1", "predictor_use_ssl": True}, environ={}))
    assert isinstance(rest, RemoteV2Predictor) and rest.url == "https://h:1/v2/models/model/infer"
    plain = connect(parse_arguments({"predictor_host": "h:1", "predictor_request_retries": 3}, environ={}))
    assert isinstance(plain, RemoteV2Predictor) and plain.url.startswith("http://") and plain.retries == 3
    grpc_args = {"predictor_host": "h:1", "protocol": "grpc-v2", "predictor_request_timeout_seconds": 9}
    remote = connect(parse_arguments(grpc_args, environ={}))
    assert isinstance(remote, GrpcV2Predictor) and (remote.host, remote.timeout_s) == ("h:1", 9)
    for predictor in (rest, plain, remote):
        predictor.close()


# --- the whole command line, served ---


@pytest.fixture(scope="module")
def served(oip, tiny_models, tmp_path_factory) -> Iterator[dict[str, Any]]:
    host, _ = oip
    folder = tmp_path_factory.mktemp("kserve-flags")
    latency_log = folder / "latency.log"
    log_config = folder / "logging.yaml"
    log_config.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "handlers": {"latency": {"class": "logging.FileHandler", "filename": str(latency_log)}},
                "loggers": {"hf_bentoml_server.latency": {"handlers": ["latency"], "level": "INFO"}},
            }
        )
    )
    grpc_port = free_port()
    # The runtime's args (its --http_port is the one ServerProcess appends, on a free port) ...
    argv = [arg for arg in runtime_args() if not arg.startswith("--http_port")]
    # ... the InferenceService's: where the storage initializer put the model, KServe's Hugging Face flags ...
    argv += [f"--model_dir={tiny_models['sequence_classification']}", "--backend=huggingface", "--dtype=float32"]
    argv += ["--task=sequence_classification", "--max_length=64", "--disable_log_requests"]
    # ... and every KServe model-server flag (vLLM's dash-case flags: test_vllm_dash_case_flags_..., without
    # importing vLLM three times at start here).
    argv += [
        f"--grpc_port={grpc_port}", "--enable_grpc=true", "--workers=1", "--max_threads=4",
        "--max_asyncio_workers=4", "--enable_docs_url=true", "--enable_latency_logging=true",
        "--configure_logging=true", f"--log_config_file={log_config}", "--access_log_format=%(h)s %(r)s %(s)s",
        "--protocol=v2", "--grpc_max_send_message_length=67108864", "--grpc_max_receive_message_length=65536",
        f"--predictor_host={host}", "--predictor_protocol", "grpc-v2", "--predictor_use_ssl=false",
        "--predictor_request_timeout_seconds=30", "--predictor_request_retries=2", "--enable_predictor_health_check",
    ]  # fmt: skip
    assert {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")} >= set(KSERVE_FLAGS) - {"http_port"}
    command = [sys.executable, "-m", "huggingfaceserver", *argv]
    server = ServerProcess({}, folder / "server.log", command=command)
    try:
        yield {"url": server.wait_ready().url, "grpc": f"127.0.0.1:{grpc_port}", "latency_log": latency_log}
    finally:
        server.stop()


def test_the_full_kserve_command_serves_through_the_grpc_predictor(served, oip, tiny_models):
    _, servicer = oip
    expected = reference.classification_logits(tiny_models["sequence_classification"], TEXTS)
    body = {"instances": TEXTS, "parameters": {"return_raw_logits": True}}
    response = httpx.post(f"{served['url']}/v1/models/sst:predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    got = [[row[str(j)] for j in range(expected.shape[1])] for row in response.json()["predictions"]]
    assert np.allclose(got, expected.numpy(), atol=1e-4)
    assert {"input_ids", "attention_mask"} <= set(servicer.seen_inputs)
    # A predictor that fails twice is retried (predictor_request_retries=2).
    servicer.fail_next = 2
    response = httpx.post(f"{served['url']}/v1/models/sst:predict", json={"instances": TEXTS}, timeout=30)
    assert response.json() == {"predictions": expected.argmax(dim=-1).tolist()}


def test_grpc_service_honours_its_port_and_message_limit(served, tiny_models):
    expected = reference.classification_logits(tiny_models["sequence_classification"], TEXTS).argmax(dim=-1)
    client = triton.InferenceServerClient(served["grpc"])
    tensor = triton.InferInput("input-0", [len(TEXTS)], "BYTES")
    tensor.set_data_from_numpy(np.array(TEXTS, dtype=object))
    assert client.infer("sst", [tensor]).as_numpy("output-0").tolist() == expected.tolist()
    big = triton.InferInput("input-0", [1], "BYTES")
    big.set_data_from_numpy(np.array(["x" * 70_000], dtype=object))  # over grpc_max_receive_message_length
    with pytest.raises(triton.InferenceServerException) as raised:
        client.infer("sst", [big])
    assert raised.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_latency_logging_goes_where_log_config_file_says(served):
    body = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]}
    assert httpx.post(f"{served['url']}/v2/models/sst/infer", json=body, timeout=30).status_code == 200
    deadline = time.monotonic() + 10
    while "model=sst preprocess_ms=" not in _read(served["latency_log"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    line = next(line for line in _read(served["latency_log"]).splitlines() if "model=sst" in line)
    stages = dict(part.split("=") for part in line.split()[1:])
    assert set(stages) == {"preprocess_ms", "predict_ms", "postprocess_ms"}
    assert all(float(value) >= 0 for value in stages.values())


def test_predictor_health_check_drives_readiness(served, oip):
    _, servicer = oip
    servicer.ready = False
    try:
        assert _wait_status(f"{served['url']}/v2/health/ready", 503)
    finally:
        servicer.ready = True
    assert _wait_status(f"{served['url']}/v2/health/ready", 200)


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _wait_status(url: str, status: int, within_s: float = 30) -> bool:
    """Polls until the route answers `status` (the health check runs every 5 s)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if httpx.get(url, timeout=5).status_code == status:
            return True
        time.sleep(0.5)
    return False
