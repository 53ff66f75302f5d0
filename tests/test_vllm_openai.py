"""vLLM's own OpenAI layer under /openai, in-process on the service's engine: SmolLM2 through the openai client.

One `bentoml serve` for the module (vLLM CPU, SmolLM2-135M-Instruct, a random LoRA adapter made with peft,
hermes tool calling), given `vllm serve` arguments by their own names, started by tests/vllm_server.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.vllm_server import serve_on_vllm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]

QUESTION = "What is the capital of France?"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "strict": True,  # vLLM pins the arguments to the schema only for strict tools (or --tool-strict-level)
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def make_lora(base: Path, target: Path) -> Path:
    """A random LoRA adapter on SmolLM2 (B non-zero, so it changes outputs), saved as peft saves it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(target))
    return target


@pytest.fixture(scope="module")
def lora(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(smollm2, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def server(smollm2: Path, lora: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    args = {
        "model_dir": str(smollm2),
        "model_name": "smollm2",
        "max_model_len": "2048",
        "enforce-eager": "true",
        "enable_auto_tool_choice": "true",
        "tool-call-parser": "hermes",
        "enable_lora": "true",
        "max_lora_rank": "8",
        "lora_modules": f"adapter={lora}",
    }
    yield from serve_on_vllm(args, tmp_path_factory)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/openai/v1", api_key="-")


def chat(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    kwargs = {"model": "smollm2", "temperature": 0.0, "max_tokens": 64, **kwargs}
    kwargs.setdefault("messages", [{"role": "user", "content": QUESTION}])
    return client.chat.completions.create(**kwargs)  # type: ignore[arg-type]


def test_greedy_chat_answers(client: openai.OpenAI) -> None:
    assert chat(client).choices[0].message.content == "The capital of France is Paris."


def test_models_lists_the_model_and_the_lora_adapter(client: openai.OpenAI) -> None:
    assert {model.id for model in client.models.list()} == {"smollm2", "adapter"}


def test_response_format_json_schema_and_json_object(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    parsed = json.loads(chat(client, response_format=response_format).choices[0].message.content or "")
    assert set(parsed) == {"country", "capital"} and all(isinstance(v, str) for v in parsed.values())
    messages = [{"role": "user", "content": QUESTION + " Answer in JSON."}]
    content = chat(client, messages=messages, response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(content or ""), dict)


def test_structured_outputs_json_regex_choice(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    content = chat(client, extra_body={"structured_outputs": {"json": schema}}).choices[0].message.content
    assert isinstance(json.loads(content or "")["city"], str)
    pattern = r"[A-Z][a-z]{2,10}"
    content = chat(client, extra_body={"structured_outputs": {"regex": pattern}}).choices[0].message.content
    assert re.fullmatch(pattern, content or "")
    choices = ["Paris", "London", "Berlin"]
    content = chat(client, extra_body={"structured_outputs": {"choice": choices}}).choices[0].message.content
    assert content in choices


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_none_auto_required_named(client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]

    def calls(tool_choice: object) -> tuple[list[tuple[str, dict]], str]:
        options = {"messages": messages, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 80}
        if not stream:
            message = chat(client, **options).choices[0].message
            found = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
            return found, message.content or ""
        names: dict[int, str] = {}
        arguments: dict[int, str] = {}
        text = ""
        for chunk in chat(client, **options, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for call in delta.tool_calls or []:
                if call.function and call.function.name:
                    names[call.index] = call.function.name
                if call.function and call.function.arguments:
                    arguments[call.index] = arguments.get(call.index, "") + call.function.arguments
        return [(names[i], json.loads(arguments.get(i, "{}"))) for i in sorted(names)], text

    found, text = calls("none")
    assert found == [] and text
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        found, _ = calls(tool_choice)
        assert found and all(name == "get_weather" and isinstance(args.get("city"), str) for name, args in found)
    found, text = calls("auto")  # the model chooses; whatever it chose must be well formed
    assert all(name == "get_weather" for name, _ in found) and (found or text)


def test_logit_bias_token_id_prompts_and_prompt_logprobs(client: openai.OpenAI, smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    prompt = "The capital of France is"
    ids = tokenizer(prompt).input_ids
    by_text = client.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="smollm2", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_text.choices[0].text

    forced = tokenizer(" banana", add_special_tokens=False).input_ids[0]
    biased = client.completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=3,
        temperature=0,
        logit_bias={str(forced): 100},
        extra_body={"return_token_ids": True},
    )
    assert biased.choices[0].model_extra["token_ids"] == [forced] * 3

    scored = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1}
    )
    prompt_logprobs = scored.choices[0].model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    assert all(str(token) in position for token, position in zip(ids[1:], prompt_logprobs[1:], strict=True))


def test_tokenize_and_detokenize(server: str, smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    text = "Hello world, how are you?"
    answer = httpx.post(server + "/openai/tokenize", json={"model": "smollm2", "prompt": text}, timeout=60)
    tokens = answer.json()["tokens"]
    assert tokens == tokenizer(text).input_ids
    back = httpx.post(server + "/openai/detokenize", json={"model": "smollm2", "tokens": tokens}, timeout=60).json()
    assert back["prompt"] == text


def test_responses_api(client: openai.OpenAI) -> None:
    response = client.responses.create(model="smollm2", input=QUESTION, temperature=0.0, max_output_tokens=32)
    assert "Paris" in response.output_text


def test_lora_adapter_output_equals_peft_merged_model(client: openai.OpenAI, smollm2: Path, lora: Path) -> None:
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    base = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(lora)).merge_and_unload().eval()
    prompt = "The capital of France is"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = merged.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    got = client.completions.create(
        model="adapter", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    plain = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].text == expected
    assert plain.choices[0].text != expected, "the adapter must change the output for this test to mean anything"


def test_kserve_routes_and_metrics_share_the_engine(server: str, client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    body = {"instances": [prompt], "parameters": {"max_tokens": 6, "temperature": 0}}
    v1 = httpx.post(server + "/v1/models/smollm2:predict", json=body, timeout=60).json()
    openai_text = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    assert v1["predictions"] == [openai_text.choices[0].text]
    metrics = httpx.get(server + "/metrics", timeout=60).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        'request_predict_seconds_count{model_name="smollm2"}',
    ):
        assert name in metrics, f"{name} is not in /metrics"


def test_errors_are_openai_shaped(server: str) -> None:
    """vLLM's own errors, with the request id beside `error` as in every other error body."""
    answer = httpx.post(
        server + "/openai/v1/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        timeout=60,
    )
    assert answer.status_code == 404 and answer.json()["error"]["message"]
    assert answer.json()["request_id"] == answer.headers["x-request-id"]
    answer = httpx.post(
        server + "/openai/v1/completions",
        json={"model": "smollm2", "prompt": "x", "max_tokens": -1},
        headers={"x-request-id": "vllm-400"},
        timeout=60,
    )
    assert answer.status_code == 400 and answer.json()["error"]["message"]
    assert answer.json()["request_id"] == answer.headers["x-request-id"] == "vllm-400"
