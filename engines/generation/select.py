"""Choosing the generation backend for a model: vLLM when it can serve it, else transformers."""

from __future__ import annotations

import importlib
import logging

from engines.generation.backend import GenerationBackend
from settings.arguments import ServerArguments
from settings.loading import ModelLoadError, ModelSource
from settings.tasks import Task

logger = logging.getLogger(__name__)


def vllm_unavailable_reason(source: ModelSource) -> str | None:
    """Why vLLM cannot serve this model (None when it can)."""
    if source.task == Task.text2text_generation:
        return "encoder-decoder (text2text_generation) models are served by the transformers backend only"
    try:
        vllm_models = importlib.import_module("vllm.model_executor.models")
    except Exception as error:  # ImportError, or a broken install raising anything at import time
        return f"vllm cannot be imported ({type(error).__name__}: {error})"
    architectures = list(getattr(source.config, "architectures", None) or [])
    if not architectures:
        return "the model config names no architectures"
    registry = vllm_models.ModelRegistry
    supported = set(registry.get_supported_archs())
    missing = [arch for arch in architectures if arch not in supported]
    if missing:
        return f"vLLM's model registry has no {', '.join(missing)}"
    from engines.generation.vllm_backend import cpu_unsupported_reason

    return cpu_unsupported_reason(source)


def transformers_refusal(source: ModelSource, args: ServerArguments) -> str | None:
    """Why the transformers backend would be chosen for this model and cannot serve it (None when it can, or
    when `backend=auto` sends it to vLLM): hybrid models whose layers are not all attention with a KV cache."""
    from engines.generation.transformers.cache_support import refusal, unsupported_layers_reason

    reason = unsupported_layers_reason(source.config)
    if reason is None or args.backend == "vllm":
        return None
    vllm_reason = vllm_unavailable_reason(source)
    if vllm_reason is None and args.backend == "auto":
        return None  # vLLM serves it
    architecture = ", ".join(getattr(source.config, "architectures", None) or []) or source.config.model_type
    if vllm_reason is None:
        instead = "vLLM can serve it here: start with --arg backend=vllm (or backend=auto)."
    else:
        instead = f"vLLM cannot serve it here either ({vllm_reason}); no backend of this server can."
    return refusal(f"{architecture} (model_type '{source.config.model_type}')", reason, instead)


def build_generation_backend(source: ModelSource, args: ServerArguments) -> GenerationBackend:
    """The backend for a generative model, per args.backend (not started yet: `await backend.start()`).

    auto: vLLM when it imports and knows every architecture of the config, else transformers.
    vllm: vLLM or ModelLoadError naming why not. huggingface: transformers.
    text2text_generation (T5, BART) always uses transformers. A hybrid (Mamba/SSM) model that would go to
    transformers is a ModelLoadError with the reason (`transformers_refusal`).
    """
    if not source.task.is_generative:
        raise ModelLoadError(f"task '{source.task.value}' is not a generation task")
    refused = transformers_refusal(source, args)
    if refused:
        raise ModelLoadError(refused)
    if args.backend in ("auto", "vllm"):
        reason = vllm_unavailable_reason(source)
        if reason is None:
            from engines.generation.vllm_backend import VLLMBackend

            logger.info("generation backend: vllm")
            return VLLMBackend(source, args)
        if args.backend == "vllm":
            raise ModelLoadError(f"backend 'vllm' was asked for but cannot serve this model: {reason}")
        logger.info("generation backend: huggingface (vLLM not used: %s)", reason)
    from engines.generation.transformers import TransformersBackend

    return TransformersBackend(source, args)
