"""text_embedding: one vector per input, computed as the folder's sentence-transformers stack says.

Transformer -> Pooling -> Dense layers -> Normalize (handlers/sentence_stack.py reads them), with the
folder's max_seq_length and prompts; a folder without sentence-transformers files gets KServe's mean
pooling and L2 normalisation. `dimensions` keeps the first values and normalises them again (Matryoshka).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModel

from handlers.base import EncodedRows, ForwardBatch, PredictiveHandler
from handlers.encoding import Encoded
from handlers.errors import InvalidInput
from handlers.requests import PredictOptions, TaskResult, TensorSpec, TextInput
from handlers.sentence_stack import Dense, SentenceStack, read_stack
from settings.arguments import ServerArguments
from settings.loading import ModelSource
from settings.tasks import Task

# Per token, 1 where the prompt stands: pooling leaves those tokens out when include_prompt is false.
_PROMPT_MASK = "prompt_mask"


class TextEmbeddingHandler(PredictiveHandler):
    task = Task.text_embedding
    model_class = AutoModel

    def __init__(self, source: ModelSource, args: ServerArguments) -> None:
        super().__init__(source, args)
        self.stack: SentenceStack = read_stack(source.path)
        self.dense: list[Dense] = []
        # The folder's max_seq_length, unless max_model_len was set explicitly (then the argument wins).
        if self.stack.max_seq_length is not None and args.max_model_len is None:
            self.max_length = min(self.stack.max_seq_length, source.max_model_len)

    @property
    def pooling(self) -> str:
        return self.stack.pooling

    @property
    def normalize(self) -> bool:
        return self.stack.normalize

    @property
    def dimensions(self) -> int:
        """Size of the vectors: the last Dense layer's output, else the encoder's hidden size."""
        return self.stack.dense[-1].out_features if self.stack.dense else int(self.source.config.hidden_size)

    def load(self) -> None:
        super().load()
        self.dense = [Dense(layer).to(self.source.device, self.source.dtype).eval() for layer in self.stack.dense]

    def output_specs(self, options: PredictOptions) -> list[TensorSpec]:
        return [TensorSpec("output-0", "FP64", [-1, options.dimensions or self.dimensions])]

    output_field = "last_hidden_state"

    # --- request checks and prompts ---

    def prompt(self, options: PredictOptions) -> str:
        name = options.prompt_name or self.stack.default_prompt_name
        if name is None:
            return ""
        if name not in self.stack.prompts:
            known = ", ".join(sorted(self.stack.prompts)) or "none"
            raise InvalidInput(
                f"prompt_name '{name}' is not one of this model's prompts ({known})", param="prompt_name"
            )
        return self.stack.prompts[name]

    def validate(self, texts: list[TextInput], options: PredictOptions) -> None:
        if options.dimensions is not None and options.dimensions > self.dimensions:
            raise InvalidInput(
                f"dimensions={options.dimensions} is larger than this model's {self.dimensions}-value embeddings",
                param="dimensions",
            )
        vocabulary = int(self.source.config.vocab_size)
        for index, ids in enumerate(texts):
            if isinstance(ids, str):
                continue
            if options.prompt_name is not None:
                raise InvalidInput("prompt_name applies to texts, not to token-id inputs", param="prompt_name")
            if len(ids) > self.max_length:
                raise InvalidInput(
                    f"input {index} has {len(ids)} token ids; this model takes at most {self.max_length}", param="input"
                )
            if not all(0 <= token < vocabulary for token in ids):
                raise InvalidInput(f"input {index} has a token id outside this model's vocabulary [0, {vocabulary})")
        self.prompt(options)  # an unknown prompt name fails here, before queueing

    def model_texts(self, texts: list[TextInput], options: PredictOptions) -> list[TextInput]:
        # Token ids are the model's input as given: no prompt is put before them.
        prompt = self.prompt(options)
        return [prompt + text if isinstance(text, str) else text for text in texts] if prompt else texts

    def prompt_length(self, prompt: str) -> int:
        """Tokens of a prompt that pooling leaves out with include_prompt=false: as sentence-transformers
        counts them, the prompt tokenized alone without its trailing special token (e.g. [SEP])."""
        if not prompt:
            return 0
        ids = self.tokenizer(prompt, add_special_tokens=self.args.add_special_tokens)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def encode(self, texts: list[TextInput], options: PredictOptions, tokenizer: Any = None) -> Encoded:
        encoded = super().encode(texts, options, tokenizer)
        if self.stack.include_prompt:
            return encoded
        length = self.prompt_length(self.prompt(options))
        encoded.features[_PROMPT_MASK] = [
            [int(isinstance(text, str) and position < length) for position in range(len(ids))]
            for text, ids in zip(texts, encoded.features["input_ids"], strict=True)
        ]
        return encoded

    # --- the work ---

    def forward(self, model_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        model_inputs = dict(model_inputs)
        prompt_mask = model_inputs.pop(_PROMPT_MASK, None)
        hidden = self.model_output(model_inputs)
        mask = model_inputs["attention_mask"]
        if prompt_mask is not None:
            mask = mask.masked_fill(prompt_mask.bool(), 0)
        vectors = pool(hidden, mask, self.stack.pooling)
        for layer in self.dense:
            vectors = layer(vectors)
        return vectors

    def postprocess(self, batch: ForwardBatch, rows: EncodedRows, options: PredictOptions) -> TaskResult:
        vectors = batch.outputs[rows.start : rows.stop]
        if options.dimensions is not None and options.dimensions < vectors.shape[1]:
            vectors = vectors[:, : options.dimensions]  # Matryoshka: truncate, then normalise as the model does
        if self.stack.normalize if options.normalize is None else options.normalize:  # per request (TEI's normalize)
            vectors = F.normalize(vectors, p=2, dim=1)
        return TaskResult({"output-0": vectors.tolist()}, self.token_count(batch, rows))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":  # the first token pooled: [CLS], or the first after a left-out prompt
        return hidden[torch.arange(hidden.shape[0]), attention_mask.argmax(dim=1)]
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    summed, counts = (hidden * mask).sum(dim=1), mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts.sqrt() if mode == "mean_sqrt_len_tokens" else summed / counts
