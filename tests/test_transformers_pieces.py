"""The transformers backend's pieces alone: detokenizer and stop strings, KV-batch surgery, sampling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engines.generation.backend import GenerationRequest, SamplingOptions
from engines.generation.transformers.detokenizer import Detokenizer, StopStrings
from engines.generation.transformers.kv_batch import KVBatch
from engines.generation.transformers.sampling import Sampler
from engines.generation.transformers.state import RequestState, Row

# ---- detokenizer and stop strings ----


def test_incremental_detokenizer_equals_decoding_everything(tiny_models: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    prompt = tokenizer("The capital of France")["input_ids"]
    generated = tokenizer(" is Paris, a city with café culture", add_special_tokens=False)["input_ids"]
    detokenizer = Detokenizer(tokenizer, tuple(prompt), skip_special_tokens=True)
    text = "".join(detokenizer.add(t) for t in generated) + detokenizer.flush()
    whole = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert tokenizer.decode(prompt, skip_special_tokens=True) + text == whole


def test_stop_strings_hold_back_a_possible_start_and_cut_at_the_match() -> None:
    state = StopStrings(("STOP",), include_stop=False)
    assert state.add("abc ST") is None
    assert state.take(final=False) == "abc "  # "ST" might start "STOP": held back
    assert state.add("OP and more") == "STOP"
    assert state.take(final=True) == ""
    assert state.text == "abc "
    kept = StopStrings(("STOP", "X"), include_stop=True)
    assert kept.add("aSTOPbX") == "STOP"  # the earliest match wins
    assert kept.take(final=True) == "aSTOP"
    free = StopStrings((), include_stop=False)
    free.add("ab")
    assert free.take(final=False) == "ab"


# ---- KV-batch surgery ----


def _batch(lengths: list[int], fill: float) -> KVBatch:
    rows = len(lengths)
    length = max(lengths)
    keys = torch.zeros(rows, 1, length, 2)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for i, n in enumerate(lengths):
        keys[i, :, length - n :] = fill + i
        mask[i, length - n :] = 1
    return KVBatch(rows=[None] * rows, keys=[keys], values=[keys.clone()], mask=mask)  # type: ignore[list-item]


def test_concat_left_pads_and_select_trims_shared_padding() -> None:
    joined = KVBatch.concat([_batch([2], 1.0), _batch([5], 10.0)])
    assert joined.mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert joined.keys[0][0, 0, :, 0].tolist() == [0, 0, 0, 1, 1]
    kept = joined.select([0])
    assert kept is not None
    assert kept.mask.tolist() == [[1, 1]]  # three all-padding columns removed
    assert kept.keys[0].shape == (1, 1, 2, 2)
    assert joined.select([]) is None
    repeated = _batch([3], 2.0).repeat(3)
    assert repeated.keys[0].shape[0] == 3 and torch.equal(repeated.keys[0][0], repeated.keys[0][2])


# ---- sampling ----


def _row(sampling: SamplingOptions, seed: int = 0) -> Row:
    state = RequestState(GenerationRequest("r", (1, 2), sampling), loop=None, queue=None)  # type: ignore[arg-type]
    state.generator = torch.Generator().manual_seed(seed)
    return Row(state, 0, 2, detokenizer=None, text=StopStrings((), False))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sampler(tiny_models: dict[str, Path]) -> Sampler:
    return Sampler(AutoTokenizer.from_pretrained(str(tiny_models["llama"])), eos_ids={3})


def test_greedy_top_k_min_tokens_and_seeds(sampler: Sampler) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    logits[:, 3] = 100.0  # eos is by far the most likely
    rows = [
        _row(SamplingOptions(temperature=0.0)),
        _row(SamplingOptions(temperature=1.0, top_k=1)),
        _row(SamplingOptions(temperature=0.0, min_tokens=2)),
    ]
    sampler.sample(logits, rows)
    second = logits[2].clone()
    second[3] = float("-inf")
    assert [r.next_token for r in rows] == [3, 3, int(second.argmax())]  # min_tokens bans eos

    def draw(seed: int) -> list[int]:
        row = _row(SamplingOptions(temperature=1.0, top_p=0.9), seed)
        return [sampler.sample_row(logits[0] / 50, row) for _ in range(8)]

    assert draw(5) == draw(5) and draw(5) != draw(6)


def test_token_logprobs_are_log_softmax_top_k(sampler: Sampler) -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(2))
    logprobs = torch.log_softmax(logits, dim=-1)
    entry = sampler.token_logprobs(logprobs, 7, 3)
    assert entry.chosen.token_id == 7 and entry.chosen.logprob == pytest.approx(float(logprobs[7]))
    assert [a.token_id for a in entry.top] == torch.topk(logprobs, 3).indices.tolist()


def test_state_delivers_nothing_once_its_loop_is_closed() -> None:
    loop = asyncio.new_event_loop()
    state = RequestState(GenerationRequest("r", (1,), SamplingOptions()), loop=loop, queue=asyncio.Queue())
    loop.close()
    state.deliver(RuntimeError("late"))
    assert state.aborted
