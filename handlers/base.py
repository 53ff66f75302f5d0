"""What every predictive handler shares: typed options and results, tokenization, batched forward.

A handler knows nothing of HTTP: it takes texts and options and returns plain Python values.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engines import remote_predictor
from handlers.encoding import Encoded, TextCutter, pad_rows
from handlers.errors import ServingError
from handlers.requests import PredictOptions, TaskResult, TensorSpec, TextInput
from handlers.traced import TracedForward, trace_encoder
from settings.arguments import ServerArguments
from settings.loading import ModelSource, attention_choice
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
    texts: list[TextInput] = field(default_factory=list)  # the inputs, in row order


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
        self.max_length = source.max_model_len  # tokens kept of each input (subclasses may lower it)
        self.model: PreTrainedModel | None = None
        self.remote: remote_predictor.RemotePredictor | None = None  # with predictor_host: the forward pass runs there
        self.traced: TracedForward | None = None  # the model's pass traced with TorchScript (handlers/traced.py)
        # Forward passes are serialised unless `concurrent_forward` (a local CPU model, see there).
        self._lock = threading.Lock()
        self._cutters: dict[int, TextCutter] = {}

    def load(self) -> None:
        """Load the weights; slow, so it runs off the event loop after start-up."""
        if self.args.predictor_host:
            self.remote = remote_predictor.connect(self.args)
            if self.args.enable_predictor_health_check:
                self.remote.watch()
            return
        model = self.model_class.from_pretrained(
            str(self.source.path),
            revision=self.args.model_revision,
            dtype=self.source.dtype,
            trust_remote_code=self.args.trust_remote_code,
            **attention_choice(self.args),
        )
        model.to(self.source.device)
        model.eval()
        self.check_model(model)
        self.model = model
        if self.args.encoder_runtime == "torchscript" and self.source.device.type == "cpu":
            self.traced = trace_encoder(model, self.tokenizer, self.output_field)

    @property
    def concurrent_forward(self) -> bool:
        """Whether two threads may run forward passes at once (the batcher's express lane).

        True for a local model on CPU: a transformers encoder in inference mode reads its weights and writes
        only its own activations, so concurrent passes give the same results (tests/test_encoder_passes.py
        checks it), and on CPU a short pass beside a long one gets cores the long one would make it wait for.
        A GPU runs the passes one after another anyway, and a remote predictor schedules its own.
        """
        return self.model is not None and self.remote is None and self.source.device.type == "cpu"

    def _forward_guard(self) -> Any:
        return contextlib.nullcontext() if self.concurrent_forward else self._lock

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

    def validate(self, texts: list[TextInput], options: PredictOptions) -> None:  # noqa: B027 - optional hook
        """Cheap checks before queueing, so a bad request fails alone and at once."""

    def model_texts(self, texts: list[TextInput], options: PredictOptions) -> list[TextInput]:
        """The inputs as the model sees them; text_embedding puts the request's prompt before each text."""
        return texts

    def predict_many(self, requests: list[tuple[list[TextInput], PredictOptions]]) -> list[TaskResult | ServingError]:
        """Tokenize and run several requests in one batch; one result per request, in order."""
        return self.run([self.encode(texts, options) for texts, options in requests])

    def encode(
        self, texts: list[Any], options: PredictOptions, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> Encoded:
        """Tokenize one request (on a tokenizer lane): long texts cut safely, then truncated to max_length.

        Inputs are texts, (a, b) text pairs (tokenized as the tokenizer's pairs: rerank, NLI), or token ids
        (lists of ints: the model's input as given, one segment, every token attended).
        """
        tokenizer = tokenizer or self.tokenizer
        cutter = self._cutters.get(id(tokenizer))
        if cutter is None:
            cutter = self._cutters[id(tokenizer)] = TextCutter(tokenizer, self.max_length, self.args.add_special_tokens)
        need_offsets = options.return_offsets_mapping or options.aggregation_strategy != "none"
        inputs = self.model_texts(texts, options)
        common: dict[str, Any] = {
            "max_length": self.max_length,
            "truncation": True,
            "padding": False,
            "add_special_tokens": self.args.add_special_tokens,
            "return_token_type_ids": self.args.return_token_type_ids,
        }
        if all(isinstance(text, str) for text in inputs):  # the common case, in one call
            offsets = need_offsets and tokenizer.is_fast
            encoding = tokenizer(cutter.cut(inputs), return_offsets_mapping=offsets, **common)
            return Encoded(texts, options, dict(encoding))
        rows: list[dict[str, list[Any]]] = [{} for _ in inputs]
        strings = [i for i, item in enumerate(inputs) if isinstance(item, str)]
        pairs = [i for i, item in enumerate(inputs) if is_pair(item)]
        if strings:
            encoding = tokenizer(cutter.cut([inputs[i] for i in strings]), **common)
            for k, i in enumerate(strings):
                rows[i] = {key: encoding[key][k] for key in encoding}
        if pairs:
            encoding = tokenizer([inputs[i][0] for i in pairs], [inputs[i][1] for i in pairs], **common)
            for k, i in enumerate(pairs):
                rows[i] = {key: encoding[key][k] for key in encoding}
        for i, item in enumerate(inputs):
            if not rows[i]:
                rows[i] = {"input_ids": list(item), "attention_mask": [1] * len(item)}
        keys = list(dict.fromkeys(key for row in rows for key in row))
        fills = {"attention_mask": 1, "special_tokens_mask": 0}
        features = {key: [row.get(key, [fills.get(key, 0)] * len(row["input_ids"])) for row in rows] for key in keys}
        return Encoded(texts, options, features)

    def run(
        self,
        requests: list[Encoded],
        on_result: Callable[[int, TaskResult | ServingError], None] | None = None,
    ) -> list[TaskResult | ServingError]:
        """Forward several tokenized requests together (on the forward thread); one result per request.

        Rows are sorted by length and run in passes, each padded to its own longest row and kept within
        max_batch_tokens, so short rows do not pay for a long one's padding. Shortest passes run first, and a
        request is post-processed (and handed to `on_result`) as soon as its last row is done: small requests
        batched beside a long one are answered before the long one's pass runs.
        """
        assert self.model is not None or self.remote is not None, "predict before load"
        order = [(r, i) for r, encoded in enumerate(requests) for i in range(len(encoded.texts))]
        lengths = [len(requests[r].features["input_ids"][i]) for r, i in order]
        starts = [0]
        for encoded in requests:
            starts.append(starts[-1] + len(encoded.texts))
        remaining = [len(encoded.texts) for encoded in requests]
        row_outputs: list[torch.Tensor | None] = [None] * len(order)
        results: list[TaskResult | ServingError | None] = [None] * len(requests)
        with self._forward_guard(), torch.inference_mode():
            for indices in plan_passes(lengths, self.args.max_batch_tokens):
                length = max(lengths[i] for i in indices)
                tensors = pad_rows(requests, [order[i] for i in indices], length, self.tokenizer)
                tensors.pop("offset_mapping", None)
                output = self.forward({k: v.to(self.source.device) for k, v in tensors.items()}).float().cpu()
                for k, index in enumerate(indices):
                    row_outputs[index] = output[k]
                    request = order[index][0]
                    remaining[request] -= 1
                    if remaining[request] == 0:
                        rows = row_outputs[starts[request] : starts[request + 1]]
                        results[request] = self._finish(requests[request], rows, lengths, starts[request])
                        if on_result is not None:
                            on_result(request, results[request])
        return [result for result in results if result is not None]

    # Whether dimension 1 of the forward output follows the tokens (padded like them) or is the task's own.
    per_token_output: ClassVar[bool] = False

    def _finish(
        self, encoded: Encoded, rows: list[torch.Tensor | None], lengths: list[int], start: int
    ) -> TaskResult | ServingError:
        """One request's result from its rows' outputs, padded to the request's own longest input."""
        count = len(encoded.texts)
        padded_len = max(lengths[start : start + count], default=1)
        outputs = self._stack([row for row in rows if row is not None], padded_len)
        encoding = pad_rows([encoded], [(0, i) for i in range(count)], padded_len, self.tokenizer)
        batch = ForwardBatch(encoding=encoding, outputs=outputs, rows=[], texts=encoded.texts)
        try:
            return self.postprocess(batch, EncodedRows(0, count, padded_len), encoded.options)
        except ServingError as error:  # one request's problem must not fail the others in its batch
            return error

    def _stack(self, rows: list[torch.Tensor], padded_len: int) -> torch.Tensor:
        """Rows from passes of different widths as one tensor; per-token rows fit to `padded_len`."""
        if rows[0].dim() == 1:
            return torch.stack(rows)
        width = padded_len if self.per_token_output else max(row.shape[0] for row in rows)
        left = self.per_token_output and self.tokenizer.padding_side == "left"
        stacked = torch.zeros((len(rows), width, rows[0].shape[1]), dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            keep = min(width, row.shape[0])
            if left:
                stacked[i, width - keep :] = row[row.shape[0] - keep :]
            else:
                stacked[i, :keep] = row[:keep]
        return stacked

    def hidden_states(self, texts: list[str]) -> list[list[list[float]]]:
        """Each input's per-token model output without padding (TEI's /embed_all on encoders); one pass,
        outside the batcher (serialised with its passes unless concurrent_forward)."""
        encoded = self.encode(texts, PredictOptions())
        lengths = encoded.lengths
        tensors = pad_rows([encoded], [(0, i) for i in range(len(lengths))], max(lengths, default=1), self.tokenizer)
        names = set(self.tokenizer.model_input_names)  # not the features a task adds for itself (prompt_mask)
        model_inputs = {k: v.to(self.source.device) for k, v in tensors.items() if k in names}
        with self._forward_guard(), torch.inference_mode():
            outputs = self.model_output(model_inputs).float().cpu()
        return [outputs[row, :length].tolist() for row, length in enumerate(lengths)]

    # The model output a task post-processes: "logits" for heads, "last_hidden_state" for encoders.
    output_field: ClassVar[str] = "logits"

    def model_output(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's output tensor, from the local model or the remote predictor."""
        if self.remote is not None:
            return self.remote.infer(model_inputs)
        assert self.model is not None
        if self.traced is not None:
            output = self.traced(model_inputs)
            if output is not None:
                return output
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


def plan_passes(lengths: list[int], max_batch_tokens: int, min_pass_tokens: int = 64) -> list[list[int]]:
    """Rows (indices into `lengths`) grouped into forward passes, shortest first.

    A pass closes when the next row would take it past `max_batch_tokens` (rows x its longest row), or when
    that row is over twice as long as the pass's shortest and the pass already holds `min_pass_tokens`
    padded tokens: within a pass at most half the tokens are padding, and tiny passes are not split off.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    passes: list[list[int]] = []
    current: list[int] = []
    for index in order:
        length = lengths[index]
        if current:
            too_big = (len(current) + 1) * length > max_batch_tokens
            too_ragged = length > 2 * lengths[current[0]] and len(current) * lengths[current[-1]] >= min_pass_tokens
            if too_big or too_ragged:
                passes.append(current)
                current = []
        current.append(index)
    if current:
        passes.append(current)
    return passes
