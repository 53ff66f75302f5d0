"""text_embedding: one vector per input, pooled as the model folder says."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModel

from handlers.base import EncodedRows, ForwardBatch, PredictiveHandler
from handlers.requests import PredictOptions, TaskResult, TensorSpec
from settings.arguments import ServerArguments
from settings.loading import ModelSource
from settings.tasks import Task, has_normalize_module, read_pooling_config

_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def pooling_from_folder(source: ModelSource) -> tuple[str, bool]:
    """(pooling mode, normalise): the sentence-transformers folder's own, else KServe's mean + L2."""
    config = read_pooling_config(source.path)
    if config is None:
        return "mean", True
    modes = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    mode = modes[0] if modes else "mean"
    return mode, has_normalize_module(source.path)


class TextEmbeddingHandler(PredictiveHandler):
    task = Task.text_embedding
    model_class = AutoModel

    def __init__(self, source: ModelSource, args: ServerArguments) -> None:
        super().__init__(source, args)
        self.pooling, self.normalize = pooling_from_folder(source)

    @property
    def dimensions(self) -> int:
        return int(self.source.config.hidden_size)

    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        return [TensorSpec("output-0", "FP64", [-1, self.dimensions])]

    output_field = "last_hidden_state"

    def forward(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model_output(model_inputs)
        return pool(hidden, model_inputs["attention_mask"], self.pooling)

    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        vectors = batch.outputs[rows.start : rows.stop]
        if self.normalize if options.normalize is None else options.normalize:  # per request (TEI's `normalize`)
            vectors = F.normalize(vectors, p=2, dim=1)
        return TaskResult({"output-0": vectors.tolist()}, self.token_count(batch, rows))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
