"""Text generation: the transformers backend against transformers' own generate(), and the OpenAI layer's
default precedence and T5 path called directly (the OpenAI routes are in test_openai_generation.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.generation.backend import GenerationBackend, GenerationRequest, SamplingOptions
from engines.generation.select import build_generation_backend
from engines.generation.transformers import TransformersBackend
from handlers.errors import InvalidInput
from protocols.openai import create_chat_completion, create_completion
from settings.arguments import parse_arguments
from settings.loading import ModelLoadError, inspect_model
from tests.tiny_decoders import start_backend

PROMPTS = [
    "Paris is the capital of France and the river",
    "The cat sat on the mat and the dog slept by the door. The quick brown fox",
    "Hello",
    "Machine learning models read text and predict labels for",
]


@pytest.fixture(scope="module")
def llama(tiny_models: dict[str, Path]) -> Iterator[TransformersBackend]:
    backend = start_backend(tiny_models["llama"])
    yield backend
    asyncio.run(backend.stop())


@pytest.fixture(scope="module")
def t5(tiny_models: dict[str, Path]) -> Iterator[TransformersBackend]:
    backend = start_backend(tiny_models["t5"])
    yield backend
    asyncio.run(backend.stop())


async def _run(backend: GenerationBackend, prompt_ids: list[int], sampling: SamplingOptions) -> dict[int, dict]:
    """Every choice's token ids, text, logprobs and finish reason."""
    choices: dict[int, dict] = {}
    first = None
    async for output in backend.generate(GenerationRequest(f"r{time.monotonic_ns()}", prompt_ids, sampling)):
        first = first or output
        for delta in output.choices:
            choice = choices.setdefault(delta.index, {"ids": [], "text": "", "logprobs": [], "finish": None})
            choice["ids"] += delta.token_ids
            choice["text"] += delta.text
            choice["logprobs"] += delta.logprobs or ()
            choice["finish"] = delta.finish_reason
    assert first is not None and output.finished
    choices[-1] = {"prompt_logprobs": first.prompt_logprobs}
    return choices


def _reference(backend: TransformersBackend, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = backend.model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, attention_mask=None
        )[0].tolist()
    # Decoder-only outputs repeat the prompt; encoder-decoder outputs start with the decoder start token.
    return out[1:] if backend.is_encoder_decoder else out[len(prompt_ids) :]


@pytest.mark.parametrize("model", ["llama", "t5"])
def test_greedy_equals_generate_single_and_batched(model: str, request: pytest.FixtureRequest) -> None:
    backend: TransformersBackend = request.getfixturevalue(model)
    tokenizer = backend.tokenizer
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is padded
    greedy = SamplingOptions(max_tokens=24, temperature=0.0)
    expected = [_reference(backend, ids, 24) for ids in prompts]

    single = asyncio.run(_run(backend, prompts[1], greedy))
    assert single[0]["ids"] == expected[1]

    async def concurrent() -> list[dict[int, dict]]:
        return await asyncio.gather(*(_run(backend, ids, greedy) for ids in prompts))

    backend.max_rows_seen = 0
    results = asyncio.run(concurrent())
    assert backend.max_rows_seen == len(prompts)  # all four decoded in one forward pass
    for result, ids, want in zip(results, prompts, expected, strict=True):
        assert result[0]["ids"] == want, tokenizer.decode(ids)
        assert result[0]["finish"] in ("stop", "length")
        if result[0]["finish"] == "length":
            assert len(want) == 24


def test_logprobs_equal_log_softmax_of_a_forward_pass(llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]
    sampling = SamplingOptions(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=2)
    result = asyncio.run(_run(llama, ids, sampling))
    generated = result[0]["ids"]
    with torch.no_grad():
        logits = llama.model(torch.tensor([ids + generated])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for step, (token, entry) in enumerate(zip(generated, result[0]["logprobs"], strict=True)):
        row = logprobs[len(ids) - 1 + step]
        assert entry.chosen.token_id == token
        assert entry.chosen.logprob == pytest.approx(float(row[token]), abs=1e-4)
        values, top_ids = torch.topk(row, 3)
        assert [alt.token_id for alt in entry.top] == top_ids.tolist()
        assert [alt.logprob for alt in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    prompt_logprobs = result[-1]["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    for position in range(1, len(ids)):
        expected = float(logprobs[position - 1, ids[position]])
        assert prompt_logprobs[position].chosen.logprob == pytest.approx(expected, abs=1e-4)
        assert len(prompt_logprobs[position].top) == 2


def test_stop_strings_are_excluded(llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[3])["input_ids"]
    free = asyncio.run(_run(llama, ids, SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)))[0]
    text = free["text"]
    stop = text[6:9]
    assert len(stop) == 3
    stopped = asyncio.run(
        _run(llama, ids, SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop, "@@never"]))
    )[0]
    assert stopped["text"] == text[: text.index(stop)]
    assert stopped["finish"] == "stop"
    kept = asyncio.run(
        _run(
            llama,
            ids,
            SamplingOptions(
                max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
            ),
        )
    )[0]
    assert kept["text"] == text[: text.index(stop) + len(stop)]


def test_seed_reproducible_and_n(llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]
    sampling = SamplingOptions(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7, n=2, ignore_eos=True)
    first = asyncio.run(_run(llama, ids, sampling))
    again = asyncio.run(_run(llama, ids, sampling))
    assert [first[i]["ids"] for i in (0, 1)] == [again[i]["ids"] for i in (0, 1)]
    assert first[0]["ids"] != first[1]["ids"]  # two choices sample independently
    other = asyncio.run(_run(llama, ids, SamplingOptions(**{**sampling.__dict__, "seed": 8})))
    assert other[0]["ids"] != first[0]["ids"]


def test_penalties_change_the_output(llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[2])["input_ids"]
    plain = asyncio.run(_run(llama, ids, SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)))[0]
    penalised = asyncio.run(
        _run(llama, ids, SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True, frequency_penalty=2.0))
    )[0]
    assert len(set(penalised["ids"])) >= len(set(plain["ids"]))
    assert penalised["ids"] != plain["ids"]


def test_cancellation_frees_the_slot(llama: TransformersBackend) -> None:
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]

    async def scenario() -> float:
        started = asyncio.Event()

        async def consume() -> None:
            sampling = SamplingOptions(max_tokens=200, temperature=0.0, ignore_eos=True)
            async for _ in llama.generate(GenerationRequest("cancel-me", ids, sampling)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert llama.active_requests() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at = time.monotonic()
        while llama.active_requests() and time.monotonic() - cancelled_at < 2:
            await asyncio.sleep(0.005)
        assert llama.active_requests() == 0
        return time.monotonic() - cancelled_at

    assert asyncio.run(scenario()) < 1.0


def test_backend_selection(tiny_models: dict[str, Path]) -> None:
    args = parse_arguments({"model_dir": str(tiny_models["llama"]), "backend": "vllm"}, environ={})
    source = inspect_model(args)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match="vllm"):
            build_generation_backend(source, args)
        auto = parse_arguments({"model_dir": str(tiny_models["llama"])}, environ={})
        assert isinstance(build_generation_backend(source, auto), TransformersBackend)
    t5_args = parse_arguments({"model_dir": str(tiny_models["t5"]), "backend": "vllm"}, environ={})
    with pytest.raises(ModelLoadError, match="encoder-decoder"):
        build_generation_backend(inspect_model(t5_args), t5_args)


class RecordingBackend:
    """A fake GenerationBackend: records requests and answers each choice with one token."""

    name = "fake"

    def __init__(self, tokenizer: Any, sampling_defaults: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = 256
        self.sampling_defaults = sampling_defaults
        self.requests: list[GenerationRequest] = []

    def unsupported(self, sampling: SamplingOptions) -> str | None:
        return None

    async def generate(self, request: GenerationRequest):  # type: ignore[no-untyped-def]
        from engines.generation.backend import ChoiceDelta, GenerationOutput

        self.requests.append(request)
        choices = tuple(ChoiceDelta(i, (7,), "x", finish_reason="length") for i in range(request.sampling.n))
        yield GenerationOutput(request.request_id, len(request.prompt_token_ids), choices, finished=True)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def test_default_precedence_request_then_generation_config_then_openai(llama: TransformersBackend) -> None:
    backend = RecordingBackend(llama.tokenizer, {"temperature": 0.3, "top_k": 20, "max_tokens": 5})
    assert isinstance(backend, GenerationBackend)
    asyncio.run(create_completion(backend, {"prompt": "Hello"}))
    asyncio.run(create_completion(backend, {"prompt": "Hello", "temperature": 0.9, "max_tokens": 9, "top_k": 0}))
    asyncio.run(create_completion(RecordingBackend(llama.tokenizer, {}), {"prompt": "Hello"}))
    defaults, explicit = backend.requests[0].sampling, backend.requests[1].sampling
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens, defaults.top_p) == (0.3, 20, 5, 1.0)
    assert (explicit.temperature, explicit.top_k, explicit.max_tokens) == (0.9, 0, 9)
    chat = RecordingBackend(llama.tokenizer, {})
    response = asyncio.run(create_chat_completion(chat, {"messages": [{"role": "user", "content": "Hi"}]}))
    prompt_tokens = response["usage"]["prompt_tokens"]
    assert chat.requests[0].sampling.max_tokens == 256 - prompt_tokens  # chat: the rest of the context
    assert chat.requests[0].sampling.temperature == 1.0  # OpenAI's default


def test_t5_over_openai_and_overload(t5: TransformersBackend) -> None:
    ids = t5.tokenizer(PROMPTS[0])["input_ids"]
    expected = _reference(t5, ids, 8)
    response = asyncio.run(create_completion(t5, {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}))
    assert response["usage"]["completion_tokens"] == len(expected)
    assert response["choices"][0]["text"] == t5.tokenizer.decode(expected, skip_special_tokens=True)
    with pytest.raises(InvalidInput, match="echo"):
        asyncio.run(create_completion(t5, {"prompt": "x", "echo": True, "logprobs": 1}))
    limit, t5.max_queue_size = t5.max_queue_size, 0
    try:
        from handlers.errors import Overloaded

        with pytest.raises(Overloaded):
            asyncio.run(create_completion(t5, {"prompt": "x"}))
    finally:
        t5.max_queue_size = limit
