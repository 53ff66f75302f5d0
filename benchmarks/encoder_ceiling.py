"""The in-process ceiling of an encoder: tokenize + forward + pool (or softmax), batched, no server.

What the model costs on this machine with nothing in front of it, measured in the same run as the
servers so ratios compare. Plain transformers calls, as the plain BentoML peer makes them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer


def load_encoder(folder: Path, task: str) -> tuple[object, torch.nn.Module]:
    model_class = AutoModelForSequenceClassification if task == "classify" else AutoModel
    return AutoTokenizer.from_pretrained(folder), model_class.from_pretrained(folder).eval()


def run_batch(tokenizer: object, model: torch.nn.Module, task: str, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")  # type: ignore[operator]
        if task == "classify":
            return model(**inputs).logits.softmax(-1)
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def inputs_per_second(folder: Path, task: str, text: str, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """Inputs/s of `run_batch` on `text` repeated, per batch size (after one warm-up batch each)."""
    tokenizer, model = load_encoder(folder, task)
    rates: dict[int, float] = {}
    for size in tqdm(batch_sizes, desc=f"in-process ceiling ({task})", unit="batch size", leave=False):
        batch = [text] * size
        run_batch(tokenizer, model, task, batch)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run_batch(tokenizer, model, task, batch)
            done += size
        rates[size] = done / (time.perf_counter() - started)
    return rates
