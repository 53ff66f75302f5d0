"""Which caches the transformers backend batches: a hybrid Mamba/attention model (a tiny random Jamba) is
refused at start with the architecture, the reason and what to use instead; a model mixing sliding-window
and full-attention layers (a tiny Gemma2) is served, and past its window equals generate()."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    JambaConfig,
    JambaForCausalLM,
)

from engines.generation.select import build_generation_backend
from engines.generation.transformers import TransformersBackend
from engines.generation.transformers.cache_support import unsupported_cache_reason, unsupported_layers_reason
from settings.arguments import parse_arguments
from settings.loading import ModelLoadError, inspect_model
from tests.server_process import BENTOML, PROJECT_DIR
from tests.tiny_decoders import decoder_fields, greedy, reference, save_decoder, start_backend

WINDOW = 8


@pytest.fixture(scope="module")
def jamba_folder(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer JambaForCausalLM (one Mamba layer, one attention layer) on the tiny llama's tokenizer."""
    torch.manual_seed(5)
    config = JambaConfig(
        **decoder_fields(tiny_models["llama"]),
        num_hidden_layers=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        num_experts=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=1,
        use_mamba_kernels=False,
    )
    return save_decoder(JambaForCausalLM(config), tmp_path_factory.mktemp("jamba"), tiny_models["llama"])


@pytest.fixture(scope="module")
def gemma2_folder(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer Gemma2ForCausalLM alternating sliding-window (8 tokens) and full-attention layers."""
    torch.manual_seed(3)
    config = Gemma2Config(
        **decoder_fields(tiny_models["llama"]), num_hidden_layers=4, head_dim=32, sliding_window=WINDOW
    )
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    return save_decoder(Gemma2ForCausalLM(config), tmp_path_factory.mktemp("gemma2"), tiny_models["llama"])


def _args(path: Path, backend: str = "huggingface") -> object:
    return parse_arguments({"model_dir": str(path), "backend": backend}, environ={})


def test_hybrid_model_is_refused_with_the_reason(jamba_folder: Path) -> None:
    args = _args(jamba_folder)
    source = inspect_model(args)
    reason = unsupported_layers_reason(source.config)
    assert reason is not None and "1 of its 2 decoder layers" in reason and "linear_attention" in reason
    with pytest.raises(ModelLoadError) as refused:
        build_generation_backend(source, args)
    message = str(refused.value)
    assert "JambaForCausalLM" in message and "Mamba/SSM" in message
    assert "--arg backend=vllm" in message  # vLLM's registry has Jamba

    # A backend built around the selection (a model passed in) refuses when it starts, before serving.
    backend = TransformersBackend(source, args)
    with pytest.raises(ModelLoadError, match="cannot serve JambaForCausalLM"):
        asyncio.run(backend.start())
    assert not backend._running


def test_the_cache_a_forward_returns_is_checked_too(jamba_folder: Path, tiny_models: dict[str, Path]) -> None:
    """The backstop for configs that do not say: the cache of a real forward pass."""
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        jamba = JambaForCausalLM.from_pretrained(str(jamba_folder)).eval()
        hybrid = unsupported_cache_reason(jamba(input_ids=ids, use_cache=True).past_key_values)
        llama = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"])).eval()
        plain = unsupported_cache_reason(llama(input_ids=ids, use_cache=True).past_key_values)
    assert hybrid is not None and "LinearAttentionLayer" in hybrid
    assert plain is None
    assert unsupported_cache_reason(None) is not None


@pytest.mark.slow  # a `bentoml serve` process that imports vLLM to name it as the alternative: ~20 s here
def test_bentoml_serve_stops_at_start_naming_the_reason(jamba_folder: Path) -> None:
    done = subprocess.run(
        [
            BENTOML,
            "serve",
            "service:HuggingFaceService",
            "--arg",
            f"model_dir={jamba_folder}",
            "--arg",
            "backend=huggingface",
        ],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot start: the transformers backend cannot serve JambaForCausalLM" in done.stderr
    assert "--arg backend=vllm" in done.stderr


@pytest.fixture(scope="module")
def gemma2(gemma2_folder: Path) -> Iterator[TransformersBackend]:
    backend = start_backend(gemma2_folder)
    yield backend
    asyncio.run(backend.stop())


def test_mixed_sliding_and_full_attention_past_the_window_equals_generate(gemma2: TransformersBackend) -> None:
    prompts = [
        gemma2.tokenizer(text)["input_ids"]
        for text in ("Hello", "The cat sat on the mat and the dog slept by the door", "Paris is the capital of")
    ]
    assert max(len(p) for p in prompts) > WINDOW
    expected = [reference(gemma2, ids, 20) for ids in prompts]

    async def together() -> list[list[int]]:
        return await asyncio.gather(*(greedy(gemma2, ids, 20) for ids in prompts))

    gemma2.max_rows_seen = 0
    assert asyncio.run(together()) == expected  # batched, left-padded to different lengths
    assert gemma2.max_rows_seen == len(prompts)
