"""What every predictive handler shares: typed options and results, tokenization, batched forward.

A handler knows nothing of HTTP: it takes texts and options and returns plain Python values.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from engines.remote_predictor import RemoteV2Predictor
from handlers.errors import ServingError
from handlers.requests import PredictOptions, TaskResult, TensorSpec
from settings.arguments import ServerArguments
from settings.loading import ModelSource
from settings.tasks import Task


@dataclass
class EncodedRows:
    """The rows of one request inside a batched forward pass."""

    start: int
    stop: int
    padded_len: int  # the request's own longest input, as if it had been padded alone (KServe's shape)


@dataclass
class ForwardBatch:
    """Tokenized inputs and model outputs of several requests run together."""

    encoding: dict[str, torch.Tensor]
    outputs: torch.Tensor
    rows: list[EncodedRows] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the inputs, in row order


def is_pair(item: Any) -> bool:
    """A (query, document) or (premise, hypothesis) pair of texts."""
    return isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(part, str) for part in item)


class PredictiveHandler(ABC):
    """A task on an encoder model: tokenize, forward in batches, post-process per request."""

    task: ClassVar[Task]
    model_class: ClassVar[type[PreTrainedModel] | Any]

    def __init__(self, source: ModelSource, args: ServerArguments) -> None:
        self.source = source
        self.args = args
        self.tokenizer = source.tokenizer
        self.model: PreTrainedModel | None = None
        self.remote: RemoteV2Predictor | None = None  # with predictor_host: the forward pass runs there
        # transformers models are not safe to call from two threads at once.
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the weights; slow, so it runs off the event loop after start-up."""
        if self.args.predictor_host:
            names = (
                [n.strip() for n in self.args.tensor_input_names.split(",")] if self.args.tensor_input_names else None
            )
            self.remote = RemoteV2Predictor(self.args.predictor_host, self.args.model_name, names)
            return
        model = self.model_class.from_pretrained(
            str(self.source.path),
            revision=self.args.model_revision,
            dtype=self.source.dtype,
            trust_remote_code=self.args.trust_remote_code,
        )
        model.to(self.source.device)
        model.eval()
        self.check_model(model)
        self.model = model

    def check_model(self, model: PreTrainedModel) -> None:  # noqa: B027 - optional hook
        """Refuse a model that cannot serve this task; subclasses add their own checks."""

    def warm_up(self) -> None:
        self.predict_many([(["warm up"], PredictOptions())])

    # --- described inputs and outputs (for V2 metadata and tensor encoding) ---

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec("input-0", "BYTES", [-1])]

    @abstractmethod
    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        """The outputs a request with these options gets, "output-0" first."""

    # --- the work ---

    def validate(self, texts: list[str], options: PredictOptions) -> None:  # noqa: B027 - optional hook
        """Cheap checks before queueing, so a bad request fails alone and at once."""

    def predict_many(self, requests: list[tuple[list[str], PredictOptions]]) -> list[TaskResult | ServingError]:
        """Run several requests in one forward pass; one result per request, in order."""
        texts = [text for request_texts, _ in requests for text in request_texts]
        need_offsets = any(
            options.return_offsets_mapping or options.aggregation_strategy != "none" for _, options in requests
        )
        encoding = self.encode(texts, need_offsets)
        offsets = encoding.pop("offset_mapping", None)
        lengths = encoding["attention_mask"].sum(dim=1)
        rows: list[EncodedRows] = []
        start = 0
        for request_texts, _ in requests:
            stop = start + len(request_texts)
            rows.append(EncodedRows(start, stop, int(lengths[start:stop].max())))
            start = stop
        model_inputs = {k: v.to(self.source.device) for k, v in encoding.items()}
        assert self.model is not None or self.remote is not None, "predict before load"
        # Rows of the padded batch run in chunks that keep within the token budget (memory bound).
        rows_per_pass = max(1, self.args.max_batch_tokens // max(1, encoding["input_ids"].shape[1]))
        with self._lock, torch.inference_mode():
            outputs = torch.cat(
                [
                    self.forward({k: v[i : i + rows_per_pass] for k, v in model_inputs.items()})
                    for i in range(0, len(texts), rows_per_pass)
                ]
            )
        batch = ForwardBatch(encoding=dict(encoding), outputs=outputs.float().cpu(), rows=rows, texts=texts)
        if offsets is not None:
            batch.encoding["offset_mapping"] = offsets
        results: list[TaskResult | ServingError] = []
        for request_rows, (_, options) in zip(rows, requests, strict=True):
            try:
                results.append(self.postprocess(batch, request_rows, options))
            except ServingError as error:  # one request's problem must not fail the others in its batch
                results.append(error)
        return results

    def encode(self, texts: list[Any], need_offsets: bool) -> Any:
        """Tokenize a batch's inputs, padded together; (a, b) pairs as the tokenizer's text pairs."""
        kwargs: dict[str, Any] = {
            "max_length": self.source.max_model_len,
            "truncation": True,
            "add_special_tokens": self.args.add_special_tokens,
            "return_token_type_ids": self.args.return_token_type_ids,
        }
        pairs = [is_pair(item) for item in texts]
        if not any(pairs):
            offsets = need_offsets and self.tokenizer.is_fast
            return self.tokenizer(texts, padding=True, return_offsets_mapping=offsets, return_tensors="pt", **kwargs)
        if all(pairs):
            firsts, seconds = [item[0] for item in texts], [item[1] for item in texts]
            return self.tokenizer(firsts, seconds, padding=True, return_tensors="pt", **kwargs)
        # Texts and pairs in one batch: each tokenized as it is, then padded together.
        features = [
            dict(self.tokenizer(*item, **kwargs) if pair else self.tokenizer(item, **kwargs))
            for item, pair in zip(texts, pairs, strict=True)
        ]
        return self.tokenizer.pad(features, padding=True, return_tensors="pt")

    # The model output a task post-processes: "logits" for heads, "last_hidden_state" for encoders.
    output_field: ClassVar[str] = "logits"

    def hidden_states(self, texts: list[str]) -> list[list[list[float]]]:
        """Each input's per-token model output without padding (TEI's /embed_all on encoders); one pass,
        outside the batcher but under the model's lock."""
        encoding = self.encode(texts, need_offsets=False)
        model_inputs = {k: v.to(self.source.device) for k, v in encoding.items()}
        with self._lock, torch.inference_mode():
            outputs = self.model_output(model_inputs).float().cpu()
        lengths = encoding["attention_mask"].sum(dim=1).tolist()
        return [outputs[row, : int(length)].tolist() for row, length in enumerate(lengths)]

    def model_output(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's output tensor, from the local model or the remote predictor."""
        if self.remote is not None:
            return self.remote.infer(model_inputs)
        assert self.model is not None
        return getattr(self.model(**model_inputs), self.output_field)

    def forward(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model_output(model_inputs)

    @abstractmethod
    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        """Turn one request's rows of the batch into its result."""

    # --- helpers for subclasses ---

    def class_key(self, index: int, options: PredictOptions) -> Any:
        """A class as the request wants it: its index (KServe's default) or its id2label name."""
        return self.label_name(index) if options.labels else index

    def label_name(self, index: int) -> str:
        id2label = getattr(self.source.config, "id2label", None) or {}
        return str(id2label.get(index, id2label.get(str(index), index)))

    @staticmethod
    def token_count(batch: ForwardBatch, rows: EncodedRows) -> int:
        return int(batch.encoding["attention_mask"][rows.start : rows.stop].sum())
