"""Encoder kernels and precision: SDPA attention by default, `attn_implementation` and `dtype` on GPU.

On CPU: the embedded all-MiniLM-L6-v2 loads with torch's scaled_dot_product_attention (transformers'
default), and `attn_implementation=eager` gives the same embeddings. On a GPU (skipped without one):
float16 and bfloat16 with SDPA give embeddings close to float32's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from handlers.base import PredictiveHandler
from handlers.registry import handler_class_for
from handlers.requests import PredictOptions, TaskResult
from settings.arguments import parse_arguments
from settings.loading import default_model_dir, inspect_model

SENTENCES = ["The weather in Paris is mild today.", "A cat sat on the mat.", "Bread prices rose in March."]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


def minilm_handler(**arguments: Any) -> PredictiveHandler:
    args = parse_arguments({"model_dir": default_model_dir(), **arguments}, environ={})
    source = inspect_model(args)
    handler = handler_class_for(source.task)(source, args)
    handler.load()
    return handler


def embeddings(handler: PredictiveHandler) -> np.ndarray:
    [result] = handler.predict_many([(SENTENCES, PredictOptions())])
    assert isinstance(result, TaskResult), result
    return np.asarray(result.predictions, dtype=np.float64)


def test_encoders_use_sdpa_by_default_and_eager_gives_the_same_embeddings():
    default = minilm_handler(device="cpu")
    eager = minilm_handler(device="cpu", attn_implementation="eager")
    assert default.model is not None and eager.model is not None
    assert default.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    np.testing.assert_allclose(embeddings(default), embeddings(eager), rtol=0, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_sdpa_on_gpu_is_close_to_float32(dtype: str):
    reference = embeddings(minilm_handler(device="cpu", dtype="float32"))
    half = minilm_handler(device="cuda", dtype=dtype, attn_implementation="sdpa")
    assert half.model is not None and next(half.model.parameters()).dtype == getattr(torch, dtype)
    # Unit-length vectors: half precision keeps ~3 significant digits, bfloat16 ~2.
    np.testing.assert_allclose(embeddings(half), reference, rtol=0, atol=1e-2 if dtype == "bfloat16" else 2e-3)
