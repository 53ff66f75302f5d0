"""rerank: a cross-encoder scores (query, document) pairs; one relevance score per pair.

Scores are the model's single logit through sentence-transformers' CrossEncoder activation: sigmoid by
default (or what the folder's CrossEncoder config names: Identity keeps the logit), raw logits when the
request asks for them. Single texts are accepted too (TEI's /predict on a re-ranker) and scored alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from handlers.base import EncodedRows, ForwardBatch, PredictiveHandler, is_pair
from handlers.errors import InvalidInput
from handlers.requests import PredictOptions, TaskResult, TensorSpec
from settings.arguments import ServerArguments
from settings.loading import ModelSource
from settings.tasks import Task, cross_encoder_activation

logger = logging.getLogger(__name__)


class RerankHandler(PredictiveHandler):
    task = Task.rerank
    model_class = AutoModelForSequenceClassification

    def __init__(self, source: ModelSource, args: ServerArguments) -> None:
        super().__init__(source, args)
        activation = cross_encoder_activation(source.path) or ""
        self.sigmoid = not activation.endswith("Identity")
        if activation and not activation.endswith(("Identity", "Sigmoid")):
            logger.warning("CrossEncoder activation %s is not served; scores use sigmoid", activation)

    def check_model(self, model: PreTrainedModel) -> None:
        if int(model.config.num_labels) != 1:
            raise InvalidInput(f"rerank needs a one-label cross-encoder; this model has {model.config.num_labels}")

    def warm_up(self) -> None:
        self.predict_many([([("warm", "up")], PredictOptions())])  # type: ignore[list-item]

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec("input-0", "BYTES", [-1, 2])]

    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        return [TensorSpec("output-0", "FP32", [-1])]

    def validate(self, texts: list[Any], options: PredictOptions) -> None:
        for index, item in enumerate(texts):
            if not (isinstance(item, str) or is_pair(item)):
                raise InvalidInput(f"input {index} must be a text or a [query, document] pair of texts")

    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        logits = batch.outputs[rows.start : rows.stop, 0]
        scores = logits if options.return_raw_logits or not self.sigmoid else torch.sigmoid(logits)
        return TaskResult({"output-0": scores.tolist()}, self.token_count(batch, rows))
