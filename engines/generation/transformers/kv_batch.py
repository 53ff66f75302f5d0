"""KV-batch surgery: the running batch's caches as one left-padded tensor pair per layer.

Joining requests are padded to a common length and concatenated, finished or aborted rows are
removed with index_select, and leading columns that are padding in every row are trimmed.
Encoder-decoder batches also carry the cross-attention caches and encoder states, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from engines.generation.transformers.state import Row


@dataclass(eq=False)
class KVBatch:
    """Rows decoded together, with their KV caches padded to common lengths."""

    rows: list[Row]
    keys: list[torch.Tensor]  # per layer [B, H, T, D], left-padded
    values: list[torch.Tensor]
    mask: torch.Tensor  # [B, T] 1 = real token
    cross_keys: list[torch.Tensor] | None = None  # per layer [B, H, S, D], right-padded
    cross_values: list[torch.Tensor] | None = None
    encoder_hidden: torch.Tensor | None = None  # [B, S, hidden], right-padded
    encoder_mask: torch.Tensor | None = None  # [B, S]

    def select(self, keep: list[int]) -> KVBatch | None:
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Columns that are padding in every remaining row can go.
        real = mask.sum(0).nonzero()
        first = int(real[0]) if len(real) else mask.shape[1]
        batch = KVBatch(
            rows=[self.rows[i] for i in keep],
            keys=[k.index_select(0, index)[:, :, first:] for k in self.keys],
            values=[v.index_select(0, index)[:, :, first:] for v in self.values],
            mask=mask[:, first:],
        )
        if self.encoder_hidden is not None:
            assert self.cross_keys is not None and self.cross_values is not None and self.encoder_mask is not None
            enc_mask = self.encoder_mask.index_select(0, index)
            length = int(enc_mask.sum(1).max())
            batch.cross_keys = [k.index_select(0, index)[:, :, :length] for k in self.cross_keys]
            batch.cross_values = [v.index_select(0, index)[:, :, :length] for v in self.cross_values]
            batch.encoder_hidden = self.encoder_hidden.index_select(0, index)[:, :length]
            batch.encoder_mask = enc_mask[:, :length]
        return batch

    def repeat(self, n: int) -> KVBatch:
        """A one-row batch turned into n identical rows (the rows themselves are set by the caller)."""
        if n == 1:
            return self
        batch = KVBatch(
            rows=self.rows,
            keys=[k.repeat(n, 1, 1, 1) for k in self.keys],
            values=[v.repeat(n, 1, 1, 1) for v in self.values],
            mask=self.mask.repeat(n, 1),
        )
        if self.encoder_hidden is not None:
            assert self.cross_keys is not None and self.cross_values is not None and self.encoder_mask is not None
            batch.cross_keys = [k.repeat(n, 1, 1, 1) for k in self.cross_keys]
            batch.cross_values = [v.repeat(n, 1, 1, 1) for v in self.cross_values]
            batch.encoder_hidden = self.encoder_hidden.repeat(n, 1, 1)
            batch.encoder_mask = self.encoder_mask.repeat(n, 1)
        return batch

    @staticmethod
    def concat(batches: list[KVBatch]) -> KVBatch:
        if len(batches) == 1:
            return batches[0]
        length = max(b.mask.shape[1] for b in batches)

        def left(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            missing = length - t.shape[-dim_from_end]
            if missing == 0:
                return t
            pad = [0, 0] * (dim_from_end - 1) + [missing, 0]
            return F.pad(t, pad)

        batch = KVBatch(
            rows=[row for b in batches for row in b.rows],
            keys=[torch.cat([left(b.keys[i], 2) for b in batches]) for i in range(len(batches[0].keys))],
            values=[torch.cat([left(b.values[i], 2) for b in batches]) for i in range(len(batches[0].values))],
            mask=torch.cat([left(b.mask, 1) for b in batches]),
        )
        if batches[0].encoder_hidden is not None:
            source = max(b.encoder_mask.shape[1] for b in batches)  # type: ignore[union-attr]

            def right(t: torch.Tensor, dim_from_end: int) -> torch.Tensor:
                missing = source - t.shape[-dim_from_end]
                if missing == 0:
                    return t
                return F.pad(t, [0, 0] * (dim_from_end - 1) + [0, missing])

            layers = range(len(batches[0].cross_keys))  # type: ignore[arg-type]
            batch.cross_keys = [torch.cat([right(b.cross_keys[i], 2) for b in batches]) for i in layers]  # type: ignore[index]
            batch.cross_values = [torch.cat([right(b.cross_values[i], 2) for b in batches]) for i in layers]  # type: ignore[index]
            batch.encoder_hidden = torch.cat([right(b.encoder_hidden, 2) for b in batches])  # type: ignore[arg-type]
            batch.encoder_mask = torch.cat([right(b.encoder_mask, 1) for b in batches])  # type: ignore[arg-type]
        return batch


def cache_from(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A DynamicCache holding the given tensors without copying them."""
    cache = DynamicCache()
    layers = []
    for k, v in zip(keys, values, strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layers.append(layer)
    cache.layers = layers
    return cache


def cache_tensors(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
