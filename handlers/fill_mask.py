"""fill_mask: the most likely token for each mask, or the top k tokens with scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel

from handlers.base import EncodedRows, ForwardBatch, PredictiveHandler
from handlers.errors import InvalidInput
from handlers.requests import PredictOptions, TaskResult, TensorSpec
from settings.tasks import Task


class FillMaskHandler(PredictiveHandler):
    task = Task.fill_mask
    model_class = AutoModelForMaskedLM
    _head: nn.Module | None = None

    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        if options.top_k is not None:
            return [TensorSpec("output-0", "BYTES", [-1])]
        if options.return_probabilities or options.return_raw_logits:
            return [TensorSpec("output-0", "BYTES", [-1, -1, -1])]
        return [TensorSpec("output-0", "BYTES", [-1])]

    def warm_up(self) -> None:
        self.predict_many([([f"warm {self.tokenizer.mask_token} up"], PredictOptions())])

    def check_model(self, model: PreTrainedModel) -> None:
        self._head = masked_lm_head(model)

    def forward(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits at the mask positions only, [rows, most masks in a row, vocabulary], zero-padded.

        The encoder body runs on every token, but only the hidden states at the masks go through the LM head:
        the full [rows, length, vocabulary] logits (16 GB for XLM-R's 250k vocabulary at 32 x 512) are never
        made. Equal to the full computation because the head acts on each position independently.
        """
        is_mask = model_inputs["input_ids"] == self.tokenizer.mask_token_id
        if self.remote is not None or self._head is None:
            logits = self.model_output(model_inputs)
            return _gather_masks(logits, is_mask)
        assert self.model is not None
        hidden = self.model.base_model(**model_inputs)[0]  # [rows, length, hidden]
        gathered = _gather_masks(hidden, is_mask)  # [rows, masks, hidden]
        return self._head(gathered)

    def validate(self, texts: list[str], options: PredictOptions) -> None:
        mask = self.tokenizer.mask_token
        if mask is None:
            raise InvalidInput("this tokenizer has no mask token, so fill_mask cannot run")
        for index, text in enumerate(texts):
            if mask not in text:
                raise InvalidInput(f"input {index} has no mask token {mask}", param="inputs")

    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        mask_id = self.tokenizer.mask_token_id
        predictions: list[Any] = []
        for row in range(rows.start, rows.stop):
            positions = (batch.encoding["input_ids"][row] == mask_id).nonzero().flatten()
            masks = len(positions)
            if masks == 0:
                raise InvalidInput(
                    f"input {row - rows.start} lost its mask token {self.tokenizer.mask_token} "
                    f"to truncation at max_model_len={self.source.max_model_len}"
                )
            logits = batch.outputs[row, :masks]  # [masks, vocab]: forward gathered the mask positions in order
            length = int(batch.encoding["attention_mask"][row].sum())
            ids = batch.encoding["input_ids"][row, :length]
            predictions.append(self._predict_masks(logits, options, ids, positions))
        return TaskResult({"output-0": predictions}, self.token_count(batch, rows))

    def _predict_masks(
        self, logits: torch.Tensor, options: PredictOptions, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> Any:
        if options.top_k is not None:
            probs = torch.softmax(logits, dim=-1)
            k = min(options.top_k, probs.shape[-1])
            single = len(positions) == 1
            per_mask = []
            for mask_probs, position in zip(probs, positions.tolist(), strict=True):
                scores, ids = mask_probs.topk(k)
                per_mask.append(
                    [
                        {
                            "score": float(s),
                            "token": int(i),
                            "token_str": self.tokenizer.decode([int(i)]),
                            "sequence": self._filled(input_ids, position, int(i), single),
                        }
                        for s, i in zip(scores, ids, strict=True)
                    ]
                )
            # One mask: a flat list, as transformers' fill-mask pipeline returns it.
            return per_mask[0] if len(per_mask) == 1 else per_mask
        if options.return_probabilities:
            probs = torch.softmax(logits, dim=-1)
            return [[{j: f"{float(p):.4f}"} for j, p in enumerate(mask_probs)] for mask_probs in probs]
        if options.return_raw_logits:
            return [[{j: float(v)} for j, v in enumerate(mask_logits)] for mask_logits in logits]
        return self.tokenizer.decode(logits.argmax(dim=-1).tolist())

    def _filled(self, input_ids: torch.Tensor, position: int, token: int, single: bool) -> str:
        """The input with one mask replaced by `token`, decoded as transformers' fill-mask pipeline does
        (special tokens skipped when the input has one mask, kept so the other masks show otherwise)."""
        ids = input_ids.clone()
        ids[position] = token
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=single)


def _gather_masks(values: torch.Tensor, is_mask: torch.Tensor) -> torch.Tensor:
    """values[row, position] at each row's mask positions, in order: [rows, most masks, ...], zero-padded."""
    counts = is_mask.sum(dim=1)
    width = max(1, int(counts.max())) if len(counts) else 1
    gathered = values.new_zeros((values.shape[0], width, *values.shape[2:]))
    rows, positions = is_mask.nonzero(as_tuple=True)
    # The k-th mask of a row goes to slot k: its rank among that row's masks.
    slots = torch.cumsum(is_mask.long(), dim=1)[rows, positions] - 1
    gathered[rows, slots] = values[rows, positions]
    return gathered


def masked_lm_head(model: PreTrainedModel) -> nn.Module | None:
    """The module that maps hidden states to vocabulary logits, when the model has exactly one besides its body.

    BERT's `cls`, RoBERTa/XLM-R's `lm_head`, ... Models whose head is spread over several children (DistilBERT)
    give None and run the full computation before gathering.
    """
    body = model.base_model
    heads = [
        module
        for name, module in model.named_children()
        if module is not body and any(True for _ in module.parameters()) and not name.endswith("loss_fct")
    ]
    return heads[0] if len(heads) == 1 else None
