"""Careless and hostile clients against `bentoml serve`: input limits, long texts, ragged V2 outputs, leaving.

A fill_mask server with small limits (4 inputs, 20,000 characters) and a tiny Llama on the transformers
backend; answers are compared with direct transformers calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForMaskedLM, AutoTokenizer

from tests.server_process import ServerProcess

LIMITS = {"max_client_batch_size": "4", "max_input_characters": "20000"}


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("hostile-logs")
    wanted = {
        "fill_mask": {"model_dir": str(tiny_models["fill_mask"]), "model_name": "bert", **LIMITS},
        "llama": {"model_dir": str(tiny_models["llama"]), "backend": "huggingface", "model_name": "llama"},
    }
    started = {name: ServerProcess(args, logs / f"{name}.log") for name, args in wanted.items()}
    try:
        yield {name: server.wait_ready().url for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


def predict_v1(url: str, texts: list[str], **parameters: object) -> httpx.Response:
    body: dict[str, object] = {"instances": texts, **({"parameters": parameters} if parameters else {})}
    return httpx.post(f"{url}/v1/models/bert:predict", json=body, timeout=60)


def test_input_limits_are_413_and_name_their_argument(servers):
    url = servers["fill_mask"]
    too_many = predict_v1(url, ["a [MASK]."] * 5)
    assert too_many.status_code == 413 and "max_client_batch_size=4" in too_many.json()["error"]
    too_long = predict_v1(url, ["a [MASK] " + "b" * 20_000])
    assert too_long.status_code == 413 and "max_input_characters=20000" in too_long.json()["error"]
    v2 = httpx.post(
        f"{url}/v2/models/bert/infer",
        json={"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [5], "data": ["a [MASK]."] * 5}]},
        timeout=60,
    )
    assert v2.status_code == 413 and "max_client_batch_size" in v2.json()["error"]
    assert predict_v1(url, ["a [MASK]."] * 4).status_code == 200  # at the limit is fine


def test_a_long_text_is_cut_and_answers_as_the_whole_text_truncated(servers, tiny_models):
    path = tiny_models["fill_mask"]
    text = "paris is the [MASK] of france. " + "john smith lives in paris and london. " * 500  # ~19k characters
    got = predict_v1(servers["fill_mask"], [text], return_raw_logits=True)
    assert got.status_code == 200, got.text
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    inputs = tokenizer([text], truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        logits = AutoModelForMaskedLM.from_pretrained(str(path)).eval()(**inputs).logits
    want = logits[0][inputs["input_ids"][0] == tokenizer.mask_token_id]
    [[mask_logits]] = got.json()["predictions"]
    torch.testing.assert_close(torch.tensor([next(iter(d.values())) for d in mask_logits]), want[0], rtol=0, atol=1e-4)


def test_ragged_v2_fill_mask_probabilities_are_json_per_input(servers):
    """Inputs with 1 and 2 masks: output-0 is BYTES [2], each element the JSON of that input's V1 answer."""
    url = servers["fill_mask"]
    texts = ["paris is the [MASK] of france.", "[MASK] smith lives in [MASK]."]
    body = {
        "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [2], "data": texts}],
        "parameters": {"return_probabilities": True},
    }
    response = httpx.post(f"{url}/v2/models/bert/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["shape"] == [2] and output["datatype"] == "BYTES"
    assert output["parameters"]["content_type"] == "json"
    v1 = predict_v1(url, texts, return_probabilities=True).json()["predictions"]
    assert [json.loads(element) for element in output["data"]] == v1
    assert [len(json.loads(element)) for element in output["data"]] == [1, 2]


def _cancelled_count(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "requests_cancelled_on_disconnect_total"
    )


def _requests_in_progress(url: str) -> float:
    """BentoML's own in-progress gauge: a request counts until the layers around the app see it end."""
    metrics = httpx.get(url + "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name.endswith("request_in_progress") and sample.labels.get("endpoint") != "/metrics"
    )


async def _leave_after(url: str, path: str, body: dict[str, object], seconds: float) -> bytes:
    """Send a request, then close the connection after `seconds` without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return b""
    finally:
        writer.close()


def test_clients_that_leave_free_the_generation_engine(servers):
    """18 non-streamed requests (n=8, 200 tokens: minutes of work together) left after 1.5 s, on OpenAI, KServe
    V1 and TGI's POST / (the last two on the fast path): every handler is cancelled, so the engine's rows are
    freed and a new request is answered."""
    url = servers["llama"]
    before = _cancelled_count(url)
    openai_body = {"model": "llama", "prompt": "the capital of france is", "max_tokens": 200, "n": 8,
                   "temperature": 1, "ignore_eos": True}  # fmt: skip
    v1_body = {"instances": ["the capital of france is"], "parameters": {"max_tokens": 200, "temperature": 1}}
    tgi_body = {"inputs": "the capital of france is", "parameters": {"max_new_tokens": 200, "do_sample": True}}

    async def leave_all() -> list[bytes]:
        return await asyncio.gather(
            *(_leave_after(url, "/openai/v1/completions", openai_body, 1.5) for _ in range(12)),
            *(_leave_after(url, "/v1/models/llama:predict", v1_body, 1.5) for _ in range(4)),
            *(_leave_after(url, "/", tgi_body, 1.5) for _ in range(2)),
        )

    answered_early = [reply for reply in asyncio.run(leave_all()) if reply]
    # Polled, not timed: the counter must reach one per request that left before its answer.
    for _ in range(100):
        if _cancelled_count(url) - before >= 18 - len(answered_early):
            break
        asyncio.run(asyncio.sleep(0.1))
    assert _cancelled_count(url) - before == 18 - len(answered_early) > 0
    # Their requests end too, not only their handlers: BentoML's timeout layer would otherwise hold each one,
    # and a graceful stop, for traffic.timeout (600 s).
    for _ in range(100):
        if _requests_in_progress(url) == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert _requests_in_progress(url) == 0
    after = httpx.post(
        f"{url}/openai/v1/completions", json={"model": "llama", "prompt": "hello", "max_tokens": 4}, timeout=60
    )
    assert after.status_code == 200, after.text
