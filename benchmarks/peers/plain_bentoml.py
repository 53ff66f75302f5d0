"""The anchor peer: a plain BentoML service over transformers, as a BentoML user would write it.

One `@bentoml.api(batchable=True, max_batch_size=64)` endpoint per encoder task, the model in-process,
BentoML's adaptive batching in front. No limits, no request ids, no protocol translation: it is the
fastest honest thing a user gets from BentoML alone, and the floor this project must beat.

    PLAIN_MODEL_DIR=/path/to/model PLAIN_TASK=embed bentoml serve benchmarks.peers.plain_bentoml:PlainEncoder
    POST /embed    {"sentences": ["..."]}  -> one normalised mean-pooled vector per sentence
    POST /classify {"sentences": ["..."]}  -> one softmax row per sentence
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer


@bentoml.service(traffic={"timeout": 120})
class PlainEncoder:
    def __init__(self) -> None:
        folder = os.environ["PLAIN_MODEL_DIR"]
        classify = os.environ.get("PLAIN_TASK", "embed") == "classify"
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        model_class = AutoModelForSequenceClassification if classify else AutoModel
        self.model = model_class.from_pretrained(folder).eval()

    def _encode(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")

    @bentoml.api(batchable=True, max_batch_size=64)
    def embed(self, sentences: list[str]) -> np.ndarray:
        with torch.inference_mode():
            inputs = self._encode(sentences)
            hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    @bentoml.api(batchable=True, max_batch_size=64)
    def classify(self, sentences: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(**self._encode(sentences)).logits.softmax(-1).numpy()
