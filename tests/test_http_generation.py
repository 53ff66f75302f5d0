"""Text generation through `bentoml serve` with the openai client, on both backends.

Greedy answers must equal transformers' `model.generate` on the same model, token for token.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from tests.server_process import ServerProcess
from tests.vllm_server import VLLM_TEST_ENV

HAS_VLLM = importlib.util.find_spec("vllm") is not None
BACKENDS = ["huggingface", pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed"))]
PROMPT = "the capital of france is"
ENGINE_NICE = 5  # the vLLM server's engine_nice
PROCESSES: dict[str, ServerProcess] = {}  # the servers of the `servers` fixture, by name


@pytest.fixture(scope="module")
def servers(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    logs = tmp_path_factory.mktemp("generation-logs")
    wanted = {
        "huggingface": {"model_dir": str(tiny_models["llama"]), "backend": "huggingface", "model_name": "llama"},
        "t5": {"model_dir": str(tiny_models["t5"]), "model_name": "t5"},
    }
    if HAS_VLLM:
        wanted["vllm"] = {
            "model_dir": str(tiny_models["llama"]),
            "backend": "vllm",
            "model_name": "llama",
            "dtype": "float32",
            "engine_nice": str(ENGINE_NICE),
        }
    started = {name: ServerProcess(args, logs / f"{name}.log", env=VLLM_TEST_ENV) for name, args in wanted.items()}
    PROCESSES.update(started)
    try:
        yield {name: server.wait_ready(timeout=300).url for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


def greedy_reference(path: Path, prompt: str, max_new_tokens: int, seq2seq: bool = False) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kind = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = kind.from_pretrained(str(path)).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    new_tokens = output[0] if seq2seq else output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_completions_greedy_equal_generate_streamed_or_not(servers, tiny_models, backend):
    client = openai.OpenAI(base_url=f"{servers[backend]}/openai/v1", api_key="-")
    expected = greedy_reference(tiny_models["llama"], PROMPT, 12)
    response = client.completions.create(
        model="llama", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 12
    prompt_tokens = len(AutoTokenizer.from_pretrained(str(tiny_models["llama"]))(PROMPT)["input_ids"])
    assert response.usage.prompt_tokens == prompt_tokens

    chunks = list(
        client.completions.create(
            model="llama", prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and not any(reasons[:-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_streaming_n_and_seed(servers, backend):
    client = openai.OpenAI(base_url=f"{servers[backend]}/openai/v1", api_key="-")
    messages = [{"role": "user", "content": "hello there"}]
    stream = client.chat.completions.create(
        model="llama", messages=messages, max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 6
    both = client.chat.completions.create(model="llama", messages=messages, max_tokens=6, n=2, seed=7, temperature=1)
    again = client.chat.completions.create(model="llama", messages=messages, max_tokens=6, n=2, seed=7, temperature=1)
    assert len(both.choices) == 2
    assert [c.message.content for c in both.choices] == [c.message.content for c in again.choices]


@pytest.mark.parametrize("backend", BACKENDS)
def test_v1_and_v2_generate_text(servers, tiny_models, backend):
    url = servers[backend]
    expected = greedy_reference(tiny_models["llama"], PROMPT, 5)
    parameters = {"max_tokens": 5, "temperature": 0}
    v1 = httpx.post(f"{url}/v1/models/llama:predict", json={"instances": [PROMPT], "parameters": parameters})
    assert v1.status_code == 200, v1.text
    body = {
        "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": [PROMPT]}],
        "parameters": parameters,
    }
    v2 = httpx.post(f"{url}/v2/models/llama/infer", json=body).json()
    # eos may end a greedy answer early; the reference is cut at the same length.
    assert expected.startswith(v1.json()["predictions"][0])
    assert v2["outputs"][0]["data"] == v1.json()["predictions"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_errors_are_400_and_404(servers, backend):
    client = openai.OpenAI(base_url=f"{servers[backend]}/openai/v1", api_key="-")
    with pytest.raises(openai.BadRequestError, match=r"max_model_len|context"):
        # past the tiny model's context, within max_tokens_limit
        client.completions.create(model="llama", prompt=PROMPT, max_tokens=1000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt=PROMPT, max_tokens=2)
    response = httpx.post(f"{servers[backend]}/openai/v1/embeddings", json={"input": "x"})
    if backend == "vllm":  # vLLM's own layer has pooling routes only for a pooling model
        assert response.status_code == 404
    else:
        assert response.status_code == 400 and "text_embedding" in response.json()["error"]["message"]
    assert client.completions.create(model="llama", prompt=PROMPT, max_tokens=2).choices


def test_t5_text2text_over_completions_and_v1(servers, tiny_models):
    client = openai.OpenAI(base_url=f"{servers['t5']}/openai/v1", api_key="-")
    expected = greedy_reference(tiny_models["t5"], PROMPT, 6, seq2seq=True)
    response = client.completions.create(
        model="t5", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].text == expected
    v1 = httpx.post(f"{servers['t5']}/v1/models/t5:predict", json={"instances": [PROMPT]})
    assert v1.status_code == 200 and isinstance(v1.json()["predictions"][0], str)


def vllm_counts(url: str) -> tuple[float, float]:
    """From vLLM's metrics on /metrics: (requests running, requests that ended at max_tokens). vLLM does not
    count an aborted request as finished, so a request that was aborted never adds to the second."""
    running = finished = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:request_success_total" and sample.labels.get("finished_reason") == "length":
                finished += sample.value
    return running, finished


def wait_until(done: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_aborts_its_request_on_vllm(servers, stream):
    """/openai/* on the vLLM backend is vLLM's own app, past our cancellation layer (routes/fast_path.py):
    vLLM's routes must abort a request whose client leaves, streamed or not, through `bentoml serve`."""
    url = servers["vllm"]
    _, finished_before = vllm_counts(url)
    # 64 x 240 tokens: ~1.5 s on the tiny model alone (n=4 took 0.4 s, too close to a 0.3 s timeout), so the
    # client leaves long before the end.
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 240, "n": 64, "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=httpx.Timeout(60, read=60 if stream else 0.1)) as client:
        if stream:
            with client.stream("POST", f"{url}/openai/v1/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_raw())  # the first event arrived; now leave
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(f"{url}/openai/v1/completions", json=body)
    wait_until(lambda: vllm_counts(url)[0] == 0, 20)
    running, finished = vllm_counts(url)
    assert running == 0 and finished == finished_before  # stopped, and not by reaching max_tokens
    # The server goes on serving, and a request that runs to max_tokens is counted.
    client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="-")
    client.completions.create(model="llama", prompt=PROMPT, max_tokens=2)
    wait_until(lambda: vllm_counts(url)[1] > finished_before, 10)
    assert vllm_counts(url)[1] == finished_before + 1


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_vllm_engine_processes_run_below_the_http_worker(servers):
    """With `engine_nice`, every thread of the engine core runs that many nice steps above the worker's own value,
    so the event loop that answers and streams gets a core first (engines/process_priority.py); the worker is
    left as it was."""
    assert servers["vllm"]
    tree = psutil.Process(PROCESSES["vllm"].process.pid).children(recursive=True)
    engines = [process for process in tree if process.name().startswith("VLLM::")]
    workers = [process for process in tree if "_bentoml_impl.worker" in " ".join(process.cmdline())]
    assert engines and len(workers) == 1
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in workers[0].threads()} == {base}
    for engine in engines:
        threads = [os.getpriority(os.PRIO_PROCESS, thread.id) for thread in engine.threads()]
        assert len(threads) > 1 and set(threads) == {max(base, min(ENGINE_NICE, 19))}, (engine.name(), threads)
