"""predictor_host: this server tokenizes and post-processes, a remote V2 predictor runs the model.

The remote side here is a minimal Open Inference Protocol server written for the test (what Triton
would be in production), running the same tiny model on the tensors it receives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForSequenceClassification

from engines.remote_predictor import RemotePredictorError, RemoteV2Predictor
from tests import reference
from tests.server_process import ServerProcess, free_port


def fake_triton(model_dir: Path, seen: list[str]) -> FastAPI:
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> dict:
        body = await request.json()
        seen.extend(tensor["name"] for tensor in body["inputs"])
        inputs = {
            t["name"]: torch.tensor(np.asarray(t["data"], dtype=np.int64).reshape(t["shape"])) for t in body["inputs"]
        }
        with torch.inference_mode():
            logits = model(**inputs).logits
        return {
            "model_name": name,
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": list(logits.shape), "data": logits.flatten().tolist()}
            ],
        }

    return app


@pytest.fixture(scope="module")
def remote(tiny_models) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(fake_triton(tiny_models["sequence_classification"], seen), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


def test_served_through_a_remote_v2_predictor_equals_transformers(remote, tiny_models, tmp_path):
    host, seen = remote
    args = {
        "model_dir": str(tiny_models["sequence_classification"]),
        "model_name": "sst",
        "predictor_host": host,
        "tensor_input_names": "input_ids,attention_mask",
    }
    server = ServerProcess(args, tmp_path / "server.log").wait_ready()
    try:
        texts = ["hello world", "the capital of france is paris"]
        logits = reference.classification_logits(tiny_models["sequence_classification"], texts)
        response = httpx.post(
            f"{server.url}/v1/models/sst:predict", json={"instances": texts, "parameters": {"return_raw_logits": True}}
        )
        got = [[row[str(j)] for j in range(3)] for row in response.json()["predictions"]]
        assert np.allclose(got, logits.numpy(), atol=1e-4)
        assert set(seen) == {"input_ids", "attention_mask"}  # token_type_ids left out, as asked
    finally:
        server.stop()


def test_unreachable_predictor_is_a_clear_502():
    predictor = RemoteV2Predictor(f"127.0.0.1:{free_port()}", "m", None, timeout_s=2)
    with pytest.raises(RemotePredictorError) as raised:
        predictor.infer({"input_ids": torch.ones(1, 3, dtype=torch.int64)})
    assert raised.value.status_code == 502 and "remote predictor" in raised.value.message
