"""Which models the scheduler can batch: those whose every decoder layer keeps a key/value cache.

`kv_batch.py` holds a running batch as one left-padded key/value tensor pair per layer, and joins, pads
and cuts rows of it as requests come and go. That is right for full attention and for sliding-window
attention (the model's own mask hides what lies outside the window, `test_capacity.py` and
`test_cache_support.py` check both, mixed too). A Mamba/SSM, linear-attention or convolution layer keeps a
recurrent state per row instead: there is no token axis to pad, and a padding token fed through it
would change the state. Such models (Jamba, Bamba, FalconH1, Zamba, Mamba, Granite 4 hybrids, LFM2,
Qwen3-Next, ...) are refused at start with the reason rather than served wrong.

Two checks, both following transformers' own view of the model:
- `unsupported_layers_reason(config)`: the layer types transformers builds the cache from
  (`get_layer_types_and_kwargs`, what `DynamicCache(config=...)` uses), read before the weights load;
- `unsupported_cache_reason(cache)`: the cache a forward pass really returned (for remote code and
  architectures whose config says nothing).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from transformers.cache_utils import (
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    EncoderDecoderCache,
    get_layer_types_and_kwargs,
)

# Layer types whose cache is a plain key/value tensor pair that kv_batch.py can pad and cut.
KV_LAYER_TYPES = ("full_attention", "sliding_attention")
_KV_LAYER_CLASSES = (DynamicLayer, DynamicSlidingWindowLayer)


def decoder_layer_types(config: Any) -> list[str]:
    """The per-layer cache types transformers would build for this config (empty when it cannot say)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layer_types, _ = get_layer_types_and_kwargs(text)
    except Exception:  # a remote-code config without the per-layer fields transformers reads
        layer_types = getattr(text, "layer_types", None) or []
    return [str(t) for t in layer_types]


def unsupported_layers_reason(config: Any) -> str | None:
    """Why the config's layers cannot be batched here (None when every layer is attention with a KV cache)."""
    layer_types = decoder_layer_types(config)
    other = Counter(t for t in layer_types if t not in KV_LAYER_TYPES)
    if not other:
        return None
    kinds = ", ".join(f"{count} x {kind}" for kind, count in sorted(other.items()))
    return (
        f"{sum(other.values())} of its {len(layer_types)} decoder layers are not attention with a key/value cache "
        f"({kinds}: Mamba/SSM, linear-attention, convolution or other recurrent-state layers)"
    )


def unsupported_cache_reason(cache: Any) -> str | None:
    """Why the cache a forward pass returned cannot be batched here (None for per-layer key/value pairs)."""
    if isinstance(cache, EncoderDecoderCache):
        return unsupported_cache_reason(cache.self_attention_cache) or unsupported_cache_reason(
            cache.cross_attention_cache
        )
    if cache is None:
        return "its forward pass returns no past_key_values (its state is kept some other way)"
    if not isinstance(cache, DynamicCache):
        return f"its forward pass returns a {type(cache).__name__}, not a DynamicCache of key/value layers"
    other = Counter(type(layer).__name__ for layer in cache.layers if type(layer) not in _KV_LAYER_CLASSES)
    if not other:
        return None
    kinds = ", ".join(f"{count} x {kind}" for kind, count in sorted(other.items()))
    return f"{sum(other.values())} of its {len(cache.layers)} cache layers are not key/value layers ({kinds})"


def refusal(architecture: str, reason: str, instead: str) -> str:
    """The start-up message: which architecture, why, and what to use instead."""
    return (
        f"the transformers backend cannot serve {architecture}: {reason}. Its continuous batching keeps one "
        "left-padded key/value tensor per layer and pads, joins and cuts rows of it; a recurrent layer's state "
        f"cannot be padded or cut that way, so the output would be wrong. {instead}"
    )
