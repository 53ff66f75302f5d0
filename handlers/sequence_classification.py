"""sequence_classification: one class per input text."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from handlers.base import EncodedRows, ForwardBatch, PredictiveHandler
from handlers.requests import PredictOptions, TaskResult, TensorSpec
from settings.tasks import Task


class SequenceClassificationHandler(PredictiveHandler):
    task = Task.sequence_classification
    model_class = AutoModelForSequenceClassification

    @property
    def num_labels(self) -> int:
        return int(self.source.config.num_labels)

    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        if options.return_probabilities or options.return_raw_logits:
            scores = "probabilities" if options.return_probabilities else "logits"
            return [
                TensorSpec("output-0", "BYTES", [-1]),
                TensorSpec(scores, "FP32", [-1, self.num_labels], extra=True),
            ]
        return [TensorSpec("output-0", "BYTES" if options.labels else "INT64", [-1])]

    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        logits = batch.outputs[rows.start : rows.stop]
        count = self.token_count(batch, rows)
        if options.return_probabilities or options.return_raw_logits:
            if options.return_probabilities:
                scores, name = torch.softmax(logits, dim=-1), "probabilities"
                values = [[round(float(v), 4) for v in row] for row in scores]
            else:
                scores, name = logits, "logits"
                values = [[float(v) for v in row] for row in scores]
            dicts = [{self.class_key(j, options): v for j, v in enumerate(row)} for row in values]
            return TaskResult({"output-0": dicts, name: scores.tolist()}, count)
        indices = logits.argmax(dim=-1).tolist()
        return TaskResult({"output-0": [self.class_key(i, options) for i in indices]}, count)
