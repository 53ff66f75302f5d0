"""The OpenAI layer (protocols/openai) through the real service app: `service.py` imported with its
arguments set (tests/service_app.py), driven by the official openai client over httpx's ASGI transport,
and by a uvicorn server for the disconnect case. Greedy outputs equal transformers' generate()."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi import FastAPI

from engines.generation.transformers import TransformersBackend
from handlers.errors import InvalidInput
from protocols.openai import create_chat_completion, create_completion
from tests.service_app import load_service, stop_service
from tests.test_generation import PROMPTS, _reference


@pytest.fixture(scope="module")
def served(tiny_models: dict[str, Path]) -> Iterator[tuple[Any, Any]]:
    service, instance = load_service(
        {
            "model_dir": str(tiny_models["llama"]),
            "backend": "huggingface",
            "model_name": "tiny",
            # Limits low enough to reach on a 256-token model (defaults: 8192, 32768, 20).
            "max_tokens_limit": "1000",
            "max_request_tokens": "2048",
            "max_top_logprobs": "5",
        }
    )
    yield service, instance
    stop_service(instance)


@pytest.fixture(scope="module")
def app(served: tuple[Any, Any]) -> FastAPI:
    return served[0].app


@pytest.fixture(scope="module")
def llama(served: tuple[Any, Any]) -> TransformersBackend:
    backend = served[1].generation
    assert isinstance(backend, TransformersBackend)
    return backend


def _client(app: FastAPI) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        base_url="http://test/openai/v1",
        api_key="none",
        http_client=httpx.AsyncClient(transport=transport, base_url="http://test"),
        max_retries=0,
    )


def test_openai_completions(app: FastAPI, llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]
    expected_ids = _reference(llama, ids, 16)

    async def scenario() -> None:
        client = _client(app)
        response = await client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0)
        choice = response.choices[0]
        assert response.model == "tiny" and response.object == "text_completion"
        assert response.usage.prompt_tokens == len(ids)
        assert response.usage.completion_tokens == len(expected_ids)  # default max_tokens 16
        assert response.usage.total_tokens == len(ids) + len(expected_ids)
        assert choice.finish_reason == ("length" if len(expected_ids) == 16 else "stop")
        full = llama.tokenizer.decode(ids + expected_ids, skip_special_tokens=True)
        assert PROMPTS[0] + choice.text == full

        # Streaming gives the same text; finish_reason only on the last chunk.
        stream = await client.completions.create(
            model="tiny", prompt=PROMPTS[0], temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected_ids)
        texts = [c.choices[0].text for c in chunks[:-1]]
        reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
        assert "".join(texts) == choice.text
        assert reasons[-1] == choice.finish_reason and all(r is None for r in reasons[:-1])

        # n = 2 for each of two prompts: indexes prompt * n + choice; echo and logprobs.
        many = await client.completions.create(
            model="tiny", prompt=[PROMPTS[0], PROMPTS[2]], n=2, max_tokens=5, temperature=0, echo=True, logprobs=2
        )
        assert [c.index for c in many.choices] == [0, 1, 2, 3]
        assert many.choices[0].text == many.choices[1].text  # greedy: both choices equal
        assert many.choices[2].text.startswith(PROMPTS[2])
        logprobs = many.choices[0].logprobs
        assert logprobs.token_logprobs[0] is None  # the first prompt token
        assert len(logprobs.tokens) == len(ids) + 5
        assert all(len(top) >= 2 for top in logprobs.top_logprobs[1:])
        await client.close()

    asyncio.run(scenario())


def test_openai_chat(app: FastAPI, llama: TransformersBackend) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    text = llama.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = llama.tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = _reference(llama, prompt_ids, 12)

    async def scenario() -> None:
        client = _client(app)
        response = await client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_completion_tokens=12, logprobs=True, top_logprobs=2
        )
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert response.usage.prompt_tokens == len(prompt_ids)
        assert response.usage.completion_tokens == len(expected)
        with torch.no_grad():
            logits = llama.model(torch.tensor([prompt_ids + expected])).logits[0]
        reference = torch.log_softmax(logits.float(), dim=-1)
        want = [float(reference[len(prompt_ids) - 1 + i, token]) for i, token in enumerate(expected)]
        assert [e.logprob for e in choice.logprobs.content] == pytest.approx(want, abs=1e-4)
        assert [e.token for e in choice.logprobs.content] == [llama.tokenizer.decode([t]) for t in expected]
        assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)

        stream = await client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_completion_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
        body = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in body) == choice.message.content
        assert body[-1].choices[0].finish_reason == choice.finish_reason
        assert all(c.choices[0].finish_reason is None for c in body[:-1])

        # Chat's default max_tokens is the rest of the context; seeds reproduce samples.
        seeded = [
            await client.chat.completions.create(model="tiny", messages=messages, seed=3, max_tokens=10, n=2)
            for _ in range(2)
        ]
        assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
        await client.close()

    asyncio.run(scenario())


def test_openai_errors_are_400_by_name(app: FastAPI, llama: TransformersBackend) -> None:
    async def scenario() -> None:
        client = _client(app)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=300)
        message = caught.value.body["message"]
        assert "256" in message and "300" in message  # both numbers named
        # logit_bias and token-id prompts are served now; ids outside the vocabulary are a 400.
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            await client.completions.create(model="tiny", prompt="x", logit_bias={"99999999": 2.0})
        with pytest.raises(openai.BadRequestError, match="token ids"):
            await client.completions.create(model="tiny", prompt=[1, 2, 99999999])
        # tools and JSON response formats are served now (test_structured_outputs.py); misuse is still a 400.
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            )
        with pytest.raises(openai.BadRequestError, match="response_format"):
            await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], response_format={"type": "xml"}
            )
        await client.close()

    asyncio.run(scenario())
    with pytest.raises(InvalidInput, match="max_tokens"):
        asyncio.run(create_completion(llama, {"prompt": "x", "max_tokens": 0}))


def test_raw_sse_format(app: FastAPI) -> None:
    async def scenario() -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(
                "/openai/v1/completions",
                json={"prompt": PROMPTS[0], "max_tokens": 6, "n": 2, "temperature": 0, "stream": True},
            )
            assert response.headers["content-type"].startswith("text/event-stream")
            return response.text.split("\n\n")

    events = [e for e in asyncio.run(scenario()) if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]  # one finish_reason per choice, on its last chunk
    for index in (0, 1):
        mine = [c for c in chunks if c["choices"][0]["index"] == index]
        assert mine[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_client_disconnect_frees_the_slot(app: FastAPI, llama: TransformersBackend) -> None:
    """A real server: closing a stream mid-way cancels the route, which aborts the request."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        body = {"prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
            client.stream("POST", "/openai/v1/completions", json=body) as response,
        ):
            assert response.status_code == 200
            first = next(response.iter_lines())
            assert first.startswith("data: ")
            assert llama.active_requests() == 1
        closed_at = time.monotonic()
        while llama.active_requests() and time.monotonic() - closed_at < 2:
            time.sleep(0.01)
        assert llama.active_requests() == 0
        assert time.monotonic() - closed_at < 1.0
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_request_limits_are_400_naming_the_limit(app: FastAPI, llama: TransformersBackend) -> None:
    async def scenario() -> None:
        client = _client(app)
        with pytest.raises(openai.BadRequestError, match="max_tokens_limit"):
            await client.completions.create(model="tiny", prompt="x", max_tokens=1001)
        with pytest.raises(openai.BadRequestError, match="max_request_tokens") as caught:
            await client.completions.create(model="tiny", prompt="x", n=16, max_tokens=200)
        assert caught.value.body["param"] == "n"
        with pytest.raises(openai.BadRequestError, match="max_top_logprobs"):
            await client.completions.create(model="tiny", prompt="x", logprobs=6)
        with pytest.raises(openai.BadRequestError, match="max_top_logprobs"):
            await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=6
            )
        # Chat's default max_tokens (the rest of the context) stays within n x max_tokens too.
        chat = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            n=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert chat.usage.completion_tokens == 16 * (2048 // 16)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for seed in (2**70, -(2**63) - 1):
                for path in ("/openai/v1/completions", "/openai/v1/chat/completions"):
                    body = f'{{"prompt": "x", "messages": [{{"role": "user", "content": "x"}}], "seed": {seed}}}'
                    response = await http.post(path, content=body, headers={"content-type": "application/json"})
                    assert response.status_code == 400, response.text
                    assert "seed" in response.json()["error"]["message"]
            fine = await http.post("/openai/v1/completions", json={"prompt": "x", "seed": 2**63 - 1, "max_tokens": 2})
            assert fine.status_code == 200
        await client.close()

    asyncio.run(scenario())


def test_request_chat_template_needs_trust(app: FastAPI, llama: TransformersBackend) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3, "chat_template": template}

    async def scenario() -> None:
        client = _client(app)
        with pytest.raises(openai.BadRequestError, match="trust_request_chat_template") as caught:
            await client.chat.completions.create(
                model="tiny", messages=body["messages"], max_tokens=3, extra_body={"chat_template": template}
            )
        assert caught.value.body["param"] == "chat_template"
        await client.close()

    asyncio.run(scenario())
    trusted = dataclasses.replace(llama.policy, trust_request_chat_template=True)
    original, llama.policy = llama.policy, trusted
    try:
        response = asyncio.run(create_chat_completion(llama, body))
    finally:
        llama.policy = original
    assert response["usage"]["prompt_tokens"] == len(
        llama.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    )


def test_cancelled_non_streamed_requests_free_their_rows(llama: TransformersBackend) -> None:
    """16 clients ask for n=8, max_tokens=200 and leave (their awaiting tasks are cancelled, as the
    route's disconnect watcher does): every row is aborted and the engine goes idle."""
    body = {"prompt": PROMPTS[1], "n": 8, "max_tokens": 200, "ignore_eos": True, "temperature": 1.0}

    async def scenario() -> tuple[int, int]:
        tasks = [asyncio.create_task(create_completion(llama, dict(body))) for _ in range(16)]
        start = llama.steps
        while llama.steps < start + 5:  # generating: the rows are in the batch
            await asyncio.sleep(0.01)
        assert llama.active_requests() > 0
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        deadline = time.monotonic() + 5
        while llama.active_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        idle_at = llama.steps
        await asyncio.sleep(0.3)
        return idle_at, llama.steps

    idle_at, later = asyncio.run(scenario())
    assert llama.active_requests() == 0
    assert later == idle_at  # no decode step ran after the clients left
    assert llama.steps < 16 * 200  # far from the 3,200 steps the abandoned requests asked for


def test_logit_bias_token_id_prompts_and_prompt_logprobs(app: FastAPI, llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logits = llama.model(torch.tensor([ids])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    forced = int(torch.argsort(reference[-1])[len(reference[-1]) // 2])  # an unlikely token

    async def scenario() -> None:
        client = _client(app)
        as_text = await client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        as_ids = await client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
        both = await client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
        assert as_ids.choices[0].text == as_text.choices[0].text == both.choices[0].text
        assert as_ids.usage.prompt_tokens == len(ids)
        biased = await client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=3, temperature=0, logit_bias={str(forced): 100}, logprobs=0
        )
        assert biased.choices[0].logprobs.tokens == [llama.tokenizer.decode([forced])] * 3
        # logprobs stay those of the model's raw logits (the bias changes the choice, not the reported logprob)
        assert biased.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(reference[-1, forced]), abs=1e-4)
        with_prompt = await client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=1, extra_body={"prompt_logprobs": 2}
        )
        entries = with_prompt.choices[0].model_extra["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(ids)
        for position in range(1, len(ids)):
            row = reference[position - 1]
            mine = entries[position][str(ids[position])]
            assert mine["logprob"] == pytest.approx(float(row[ids[position]]), abs=1e-4)
            assert mine["rank"] == int((row > row[ids[position]]).sum()) + 1
            top = torch.topk(row, 2).indices.tolist()
            assert all(str(t) in entries[position] for t in top)
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
        )
        assert chat.model_extra["prompt_logprobs"][0] is None
        assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
        await client.close()

    asyncio.run(scenario())


def test_tokenize_and_detokenize_in_vllm_shapes(app: FastAPI, llama: TransformersBackend) -> None:
    tokenizer = llama.tokenizer
    messages = [{"role": "user", "content": "What is the capital?"}]
    chat_ids = tokenizer(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )["input_ids"]

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            response = await http.post("/openai/tokenize", json={"prompt": PROMPTS[1], "return_token_strs": True})
            assert response.status_code == 200, response.text
            body = response.json()
            ids = tokenizer(PROMPTS[1])["input_ids"]
            assert body == {
                "count": len(ids),
                "max_model_len": llama.max_model_len,
                "tokens": ids,
                "token_strs": tokenizer.convert_ids_to_tokens(ids),
            }
            plain = await http.post("/openai/tokenize", json={"prompt": PROMPTS[1], "add_special_tokens": False})
            assert plain.json()["tokens"] == tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"]
            chat = await http.post("/openai/tokenize", json={"model": "tiny", "messages": messages})
            assert chat.json()["tokens"] == chat_ids
            back = await http.post("/openai/detokenize", json={"tokens": ids})
            assert back.json() == {"prompt": tokenizer.decode(ids)}
            bad = await http.post("/openai/detokenize", json={"tokens": [10**9]})
            assert bad.status_code == 400 and "vocabulary" in bad.text
            neither = await http.post("/openai/tokenize", json={})
            assert neither.status_code == 400
            other = await http.post("/openai/tokenize", json={"model": "other", "prompt": "x"})
            assert other.status_code == 404

    asyncio.run(scenario())


def test_temperature_below_epsilon_is_greedy(app: FastAPI, llama: TransformersBackend) -> None:
    """Like vLLM (_SAMPLING_EPS = 1e-5): a temperature of 1e-45 or 1e-8 is greedy. Dividing the logits by
    it used to overflow to NaN and fail the request with a 500."""
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]
    expected = llama.tokenizer.decode(ids + _reference(llama, ids, 8), skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital?"}]
    v2_body = {"inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": [PROMPTS[0]]}]}

    async def scenario() -> None:
        client = _client(app)
        for temperature in (1e-45, 1e-8, 9.9e-6):
            tiny = await client.completions.create(
                model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=temperature, logprobs=1
            )
            assert PROMPTS[0] + tiny.choices[0].text == expected, temperature
            assert all(v is not None and v > float("-inf") for v in tiny.choices[0].logprobs.token_logprobs)
        stream = await client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1e-45, stream=True
        )
        assert PROMPTS[0] + "".join([c.choices[0].text async for c in stream]) == expected
        greedy_chat = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        tiny_chat = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=1e-45, n=2
        )
        assert [c.message.content for c in tiny_chat.choices] == [greedy_chat.choices[0].message.content] * 2

        # KServe V1 and V2 run the same completion path.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            texts = []
            for temperature in (0, 1e-45):
                parameters = {"max_tokens": 8, "temperature": temperature}
                v1 = await http.post(
                    "/v1/models/tiny:predict", json={"instances": [PROMPTS[0]], "parameters": parameters}
                )
                assert v1.status_code == 200, v1.text
                v2 = await http.post("/v2/models/tiny/infer", json={**v2_body, "parameters": parameters})
                assert v2.status_code == 200, v2.text
                texts += [v1.json()["predictions"][0], v2.json()["outputs"][0]["data"][0]]
            assert texts == [expected[len(PROMPTS[0]) :]] * 4

        # The server keeps serving, sampled requests included.
        sampled = await client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0.7)
        assert sampled.usage.completion_tokens >= 1
        await client.close()

    asyncio.run(scenario())
    assert llama.dead_reason is None and llama.active_requests() == 0
