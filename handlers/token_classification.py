"""token_classification: one class per token, or entity spans with aggregation_strategy=simple."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForTokenClassification

from handlers.base import EncodedRows, ForwardBatch, PredictiveHandler
from handlers.errors import InvalidInput
from handlers.requests import PredictOptions, TaskResult, TensorSpec
from settings.tasks import Task


class TokenClassificationHandler(PredictiveHandler):
    task = Task.token_classification
    model_class = AutoModelForTokenClassification
    per_token_output = True

    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        if options.aggregation_strategy != "none":
            specs = [TensorSpec("output-0", "BYTES", [-1])]
        elif options.return_probabilities or options.return_raw_logits:
            specs = [TensorSpec("output-0", "BYTES", [-1, -1])]
        else:
            specs = [TensorSpec("output-0", "BYTES" if options.labels else "INT64", [-1, 1, -1])]
        if options.return_offsets_mapping:
            specs.append(TensorSpec("offset_mapping", "INT64", [-1, -1, 2]))
        return specs

    def validate(self, texts: list[str], options: PredictOptions) -> None:
        if (options.aggregation_strategy != "none" or options.return_offsets_mapping) and not self.tokenizer.is_fast:
            raise InvalidInput("offsets and aggregation need a fast tokenizer, which this model lacks")

    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        # Sliced to the request's own padded length: the shape KServe gives when it pads each request alone.
        logits = batch.outputs[rows.start : rows.stop, : rows.padded_len]
        outputs: dict[str, list[Any]] = {}
        if options.aggregation_strategy == "simple":
            outputs["output-0"] = [self._entities(batch, rows.start + i, logits[i]) for i in range(len(logits))]
        elif options.return_probabilities:
            probs = torch.softmax(logits, dim=-1)
            outputs["output-0"] = [
                [{self.class_key(j, options): round(float(v), 4) for j, v in enumerate(token)} for token in row]
                for row in probs
            ]
        elif options.return_raw_logits:
            outputs["output-0"] = [
                [{self.class_key(j, options): float(v) for j, v in enumerate(token)} for token in row] for row in logits
            ]
        else:
            ids = logits.argmax(dim=-1).tolist()
            outputs["output-0"] = [[[self.class_key(i, options) for i in row]] for row in ids]
        if options.return_offsets_mapping:
            offsets = batch.encoding["offset_mapping"][rows.start : rows.stop, : rows.padded_len]
            outputs["offset_mapping"] = offsets.tolist()
        return TaskResult(outputs, self.token_count(batch, rows))

    def _entities(self, batch: ForwardBatch, row: int, logits: torch.Tensor) -> list[dict[str, Any]]:
        """Consecutive tokens of one entity type (B-/I- tags) merged into spans, as transformers' 'simple'."""
        probs = torch.softmax(logits, dim=-1)
        mask = batch.encoding["attention_mask"][row]
        special = batch.encoding.get("special_tokens_mask")
        offsets = batch.encoding["offset_mapping"][row]
        ids = batch.encoding["input_ids"][row]
        entities: list[dict[str, Any]] = []
        group: list[tuple[int, str, float]] = []  # (token position, entity type, score)

        def token(position: int) -> str:
            """The token's text as transformers' pipeline has it: an unknown token is its span of the input."""
            token_id = int(ids[position])
            if token_id == self.tokenizer.unk_token_id and row < len(batch.texts):
                return batch.texts[row][int(offsets[position][0]) : int(offsets[position][1])]
            return self.tokenizer.convert_ids_to_tokens(token_id)

        def flush() -> None:
            if not group:
                return
            label = group[0][1]
            positions = [p for p, _, _ in group]
            start, end = int(offsets[positions[0]][0]), int(offsets[positions[-1]][1])
            entities.append(
                {
                    "entity_group": label,
                    "score": float(sum(s for _, _, s in group) / len(group)),
                    "word": self.tokenizer.convert_tokens_to_string([token(p) for p in positions]),
                    "start": start,
                    "end": end,
                }
            )
            group.clear()

        for position in range(logits.shape[0]):
            start, end = (int(v) for v in offsets[position])
            is_special = special is not None and bool(special[row][position])
            if not mask[position] or is_special or start == end == 0:
                flush()
                continue
            index = int(probs[position].argmax())
            tag = self.label_name(index)
            prefix, _, kind = tag.partition("-") if tag[:2] in ("B-", "I-") else ("", "", tag)
            if kind == "O" or tag == "O":
                flush()
                continue
            if group and (group[-1][1] != kind or prefix == "B"):
                flush()
            group.append((position, kind, float(probs[position, index])))
        flush()
        return entities
