"""The transformers backend's capacity: a sliding-window model past its window equals generate(), the
KV-memory budget makes requests wait instead of over-filling memory, one failing row fails only its
request, and a warm-up generation runs before the backend reports ready."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from engines.generation.backend import GenerationRequest, SamplingOptions
from engines.generation.transformers import TransformersBackend
from engines.generation.transformers.state import Row
from handlers.errors import InvalidInput
from tests.tiny_decoders import decoder_fields, greedy, reference, save_decoder, start_backend

WINDOW = 8


@pytest.fixture(scope="module")
def mistral_folder(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MistralForCausalLM attending within a sliding window of 8 tokens, on the tiny llama's tokenizer."""
    torch.manual_seed(11)
    config = MistralConfig(
        **decoder_fields(tiny_models["llama"]), num_hidden_layers=2, head_dim=32, sliding_window=WINDOW
    )
    return save_decoder(MistralForCausalLM(config), tmp_path_factory.mktemp("mistral"), tiny_models["llama"])


@pytest.fixture(scope="module")
def mistral(mistral_folder: Path) -> Iterator[TransformersBackend]:
    backend = start_backend(mistral_folder)
    yield backend
    asyncio.run(backend.stop())


def test_sliding_window_model_past_its_window_equals_generate(mistral: TransformersBackend) -> None:
    prompts = [
        mistral.tokenizer(text)["input_ids"]
        for text in ("Hello", "The cat sat on the mat and the dog slept by the door", "Paris is the capital of")
    ]
    assert max(len(p) for p in prompts) > WINDOW  # prompts and generations both pass the window
    expected = [reference(mistral, ids, 24) for ids in prompts]

    async def together() -> list[list[int]]:
        return await asyncio.gather(*(greedy(mistral, ids, 24) for ids in prompts))

    mistral.max_rows_seen = 0
    assert asyncio.run(together()) == expected  # batched, left-padded to different lengths
    assert mistral.max_rows_seen == len(prompts)


@pytest.fixture(scope="module")
def budgeted(tiny_models: dict[str, Path]) -> Iterator[TransformersBackend]:
    """The tiny llama (1 KiB of KV cache per token and row) with a 1 MiB KV budget."""
    backend = start_backend(tiny_models["llama"], kv_cache_budget_mb="1")
    yield backend
    asyncio.run(backend.stop())


def test_warm_up_ran_before_start_returned(budgeted: TransformersBackend) -> None:
    assert budgeted.warmed_up and budgeted.steps >= 1
    assert budgeted.kv_bytes_per_token == 2 * 2 * 2 * 32 * 4  # K and V x layers x kv heads x head_dim x float32


def test_kv_budget_makes_a_request_wait_and_refuses_one_that_never_fits(budgeted: TransformersBackend) -> None:
    ids = budgeted.tokenizer("Paris is the capital of France and the river")["input_ids"]
    expected = reference(budgeted, ids, 100)
    sampling = SamplingOptions(max_tokens=100, temperature=0.0, ignore_eos=True, n=8)  # ~0.9 MiB: one at a time

    async def run(name: str) -> dict[int, list[int]]:
        choices: dict[int, list[int]] = {}
        async for output in budgeted.generate(GenerationRequest(name, ids, sampling)):
            for delta in output.choices:
                choices.setdefault(delta.index, []).extend(delta.token_ids)
        return choices

    async def together() -> list[dict[int, list[int]]]:
        return await asyncio.gather(run("a"), run("b"))

    budgeted.max_rows_seen = 0
    for result in asyncio.run(together()):
        assert [result[i] for i in range(8)] == [expected] * 8
    assert budgeted.max_rows_seen == 8  # the second request waited for the first one's memory
    too_big = SamplingOptions(max_tokens=100, temperature=0.0, n=16)

    async def refused() -> None:
        async for _ in budgeted.generate(GenerationRequest("c", ids, too_big)):
            pass

    with pytest.raises(InvalidInput, match="kv_cache_budget_mb"):
        asyncio.run(refused())


def test_a_failing_row_fails_only_its_request(budgeted: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = budgeted.tokenizer("Hello there")["input_ids"]
    expected = reference(budgeted, ids, 20)
    # Sampling raises for that request's row alone (a tiny temperature used to do it; it is greedy now).
    sample_row = budgeted.sampler.sample_row

    def failing(logits: torch.Tensor, row: Row) -> int:
        if row.state.request.request_id == "broken":
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return sample_row(logits, row)

    monkeypatch.setattr(budgeted.sampler, "sample_row", failing)
    broken = SamplingOptions(max_tokens=20, temperature=1.0, ignore_eos=True)

    async def broken_request() -> None:
        async for _ in budgeted.generate(GenerationRequest("broken", ids, broken)):
            pass

    async def together() -> list[object]:
        return await asyncio.gather(broken_request(), greedy(budgeted, ids, 20), return_exceptions=True)

    budgeted.max_rows_seen = 0
    failed, fine = asyncio.run(together())
    assert isinstance(failed, RuntimeError)
    assert fine == expected
    assert asyncio.run(greedy(budgeted, ids, 20)) == expected  # the engine goes on
