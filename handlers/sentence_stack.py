"""A sentence-transformers folder's whole stack after the transformer, read from its own files.

modules.json lists the modules in order: Transformer, Pooling, then any Dense (a Linear layer and its
activation, as sentence-transformers' Dense module saves them) and Normalize. sentence_bert_config.json
or the tokenizer config gives max_seq_length; config_sentence_transformers.json gives the prompts and the
default prompt name. A module this server cannot run stops the start, naming it, rather than serving
vectors that differ from `SentenceTransformer.encode`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from settings.loading import ModelLoadError

_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
# A tokenizer's model_max_length when nothing was set (transformers' VERY_LARGE_INTEGER): not a real limit.
_NO_LIMIT = 10**12


@dataclass(frozen=True)
class DenseLayer:
    """One Dense module: its folder, sizes and activation (a torch.nn class path)."""

    folder: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str
    use_residual: bool


@dataclass(frozen=True)
class SentenceStack:
    pooling: str = "mean"
    include_prompt: bool = True  # False: prompt tokens are left out of the pooling (INSTRUCTOR-style models)
    dense: list[DenseLayer] = field(default_factory=list)
    normalize: bool = True
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


# KServe's embedding: mean pooling then L2 normalisation, for folders without sentence-transformers files.
KSERVE_DEFAULT = SentenceStack()


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _kind(module_type: str) -> str:
    return module_type.rsplit(".", 1)[-1]


def read_stack(folder: Path) -> SentenceStack:
    """The stack of a sentence-transformers folder; KServe's default for any other folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        pooling_config = _json(folder / "1_Pooling" / "config.json")
        if not pooling_config:
            return KSERVE_DEFAULT
        return SentenceStack(pooling=_pooling_mode(pooling_config, folder), normalize=False)
    pooling, include_prompt, dense, normalize = "mean", True, [], False
    for module in json.loads(modules_file.read_text()):
        kind, module_folder = _kind(module.get("type", "")), folder / module.get("path", "")
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling_config = _json(module_folder / "config.json")
            pooling, include_prompt = _pooling_mode(pooling_config, folder), pooling_config.get("include_prompt", True)
        elif kind == "Dense":
            dense.append(_dense_layer(module_folder))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ModelLoadError(
                f"'{folder}' has a sentence-transformers {kind} module, which this server cannot run "
                "(it runs Transformer, Pooling, Dense and Normalize)"
            )
    settings = _json(folder / "config_sentence_transformers.json")
    prompts = {str(k): str(v) for k, v in (settings.get("prompts") or {}).items()}
    default_prompt = settings.get("default_prompt_name")
    if default_prompt is not None and default_prompt not in prompts:
        raise ModelLoadError(f"'{folder}': default_prompt_name '{default_prompt}' is not among its prompts")
    return SentenceStack(
        pooling, bool(include_prompt), dense, normalize, _max_seq_length(folder), prompts, default_prompt
    )


def _pooling_mode(config: dict[str, Any], folder: Path) -> str:
    modes: Any = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ModelLoadError(f"'{folder}': pooling {modes} is not supported; one of {', '.join(POOLING_MODES)}")
    return str(modes[0])


def _dense_layer(module_folder: Path) -> DenseLayer:
    config = _json(module_folder / "config.json")
    if config.get("module_input_name", "sentence_embedding") != "sentence_embedding" or config.get(
        "module_output_name", "sentence_embedding"
    ) not in (None, "sentence_embedding"):
        raise ModelLoadError(f"'{module_folder}': a Dense module on other than the sentence embedding is not supported")
    return DenseLayer(
        folder=module_folder,
        in_features=int(config["in_features"]),
        out_features=int(config["out_features"]),
        bias=bool(config.get("bias", True)),
        activation=str(config.get("activation_function") or "torch.nn.modules.linear.Identity"),
        use_residual=bool(config.get("use_residual", False)),
    )


def _max_seq_length(folder: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length (older saves), else the tokenizer's model_max_length (newer)."""
    value = _json(folder / "sentence_bert_config.json").get("max_seq_length")
    if value is None:
        value = _json(folder / "tokenizer_config.json").get("model_max_length")
    return int(value) if value is not None and int(value) < _NO_LIMIT else None


def activation_module(path: str) -> nn.Module:
    """The activation a Dense config names: a torch.nn Module class only (no code from the folder runs)."""
    module_name, _, class_name = path.rpartition(".")
    activation: Any = None
    if module_name.startswith("torch."):
        try:
            activation = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            activation = None
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ModelLoadError(f"Dense activation '{path}' is not a torch.nn module class")
    return activation()


class Dense(nn.Module):
    """sentence-transformers' Dense computation: activation(linear(x)), plus x (projected) with use_residual."""

    def __init__(self, layer: DenseLayer) -> None:
        super().__init__()
        self.linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
        self.activation = activation_module(layer.activation)
        self.residual: nn.Module | None = None
        if layer.use_residual:
            same = layer.in_features == layer.out_features
            self.residual = nn.Identity() if same else nn.Linear(layer.in_features, layer.out_features, bias=False)
        self.load_state_dict(_dense_weights(layer.folder), strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        return out if self.residual is None else out + self.residual(x)


def _dense_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelLoadError(f"Dense module '{folder}' has no model.safetensors or pytorch_model.bin")
    return {key: value for key, value in weights.items() if not key.startswith("activation")}
