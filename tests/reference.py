"""What a direct transformers call gives on a model folder: the answers the server must equal."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)


@cache
def tokenizer(path: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(path))


@cache
def model(path: Path, kind: type) -> Any:
    return kind.from_pretrained(str(path)).eval()


def encode(path: Path, texts: list[str], max_length: int = 512) -> dict[str, torch.Tensor]:
    return dict(tokenizer(path)(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.inference_mode()
def classification_logits(path: Path, texts: list[str]) -> torch.Tensor:
    return model(path, AutoModelForSequenceClassification)(**encode(path, texts)).logits


@torch.inference_mode()
def token_logits(path: Path, texts: list[str]) -> torch.Tensor:
    return model(path, AutoModelForTokenClassification)(**encode(path, texts)).logits


@torch.inference_mode()
def fill_mask_tokens(path: Path, texts: list[str]) -> list[str]:
    encoding = encode(path, texts)
    logits = model(path, AutoModelForMaskedLM)(**encoding).logits
    mask_id = tokenizer(path).mask_token_id
    answers = []
    for row in range(len(texts)):
        positions = (encoding["input_ids"][row] == mask_id).nonzero().flatten()
        answers.append(tokenizer(path).decode(logits[row, positions].argmax(dim=-1).tolist()))
    return answers


@torch.inference_mode()
def mean_pooled_embeddings(path: Path, texts: list[str], max_length: int = 512) -> torch.Tensor:
    encoding = encode(path, texts, max_length)
    hidden = model(path, AutoModel)(**encoding).last_hidden_state
    mask = encoding["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), p=2, dim=1)
