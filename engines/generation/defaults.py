"""The sampling defaults a model's generation_config.json sets (precedence level 2 in backend.py)."""

from __future__ import annotations

import json
from typing import Any

from settings.loading import ModelSource


def generation_config_defaults(source: ModelSource) -> dict[str, Any]:
    """The SamplingOptions fields the model's generation_config.json sets (precedence level 2).

    Read from the file itself, as vLLM's `generation_config="auto"` does: only keys written there
    count (transformers' GenerationConfig would add its own defaults, e.g. top_k 50).
    """
    path = source.path / "generation_config.json"
    try:
        explicit = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(explicit, dict):
        return {}
    defaults: dict[str, Any] = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if isinstance(explicit.get(key), int | float) and not isinstance(explicit.get(key), bool):
            defaults[key] = explicit[key]
    if isinstance(explicit.get("max_new_tokens"), int):
        defaults["max_tokens"] = explicit["max_new_tokens"]
    return defaults
