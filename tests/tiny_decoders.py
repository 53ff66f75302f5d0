"""Tiny random decoders of other architectures (Mistral, Gemma2, Jamba, ...) on the tiny llama's tokenizer,
and the transformers backend run on them: for tests of which layers and caches the backend batches.

    torch.manual_seed(11)
    config = MistralConfig(**decoder_fields(tiny_models["llama"]), num_hidden_layers=2, sliding_window=8)
    folder = save_decoder(MistralForCausalLM(config), tmp_path / "mistral", tiny_models["llama"])
    backend = start_backend(folder)
    assert asyncio.run(greedy(backend, ids, 20)) == reference(backend, ids, 20)
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from engines.generation.backend import GenerationRequest, SamplingOptions
from engines.generation.select import build_generation_backend
from engines.generation.transformers import TransformersBackend
from settings.arguments import parse_arguments
from settings.loading import inspect_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def decoder_fields(tokenizer_folder: Path) -> dict[str, int]:
    """The config fields every tiny decoder shares: small sizes, and the vocabulary and special tokens of
    the tokenizer in `tokenizer_folder`. Architecture-specific fields (layers, head_dim, ...) are the caller's."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_decoder(model: PreTrainedModel, folder: Path, tokenizer_folder: Path) -> Path:
    """A model folder as the server loads it: the model's weights and config, the borrowed tokenizer's files."""
    model.eval().save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def start_backend(path: Path, **given: str) -> TransformersBackend:
    """The transformers backend on the model at `path`, started; `given` are more `--arg` values."""
    args = parse_arguments({"model_dir": str(path), "backend": "huggingface", **given}, environ={})
    backend = build_generation_backend(inspect_model(args), args)
    assert isinstance(backend, TransformersBackend)
    asyncio.run(backend.start())
    return backend


async def greedy(backend: TransformersBackend, ids: list[int], max_tokens: int) -> list[int]:
    """The backend's greedy continuation of `ids`: exactly `max_tokens` token ids (eos ignored)."""
    out: list[int] = []
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for output in backend.generate(GenerationRequest(f"r{time.monotonic_ns()}", ids, sampling)):
        for delta in output.choices:
            out += delta.token_ids
    return out


def reference(backend: TransformersBackend, ids: list[int], max_tokens: int) -> list[int]:
    """transformers' own greedy generate() on the backend's model, for `greedy` to equal."""
    with torch.no_grad():
        out = backend.model.generate(
            torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(ids) :].tolist()
