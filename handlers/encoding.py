"""Tokenizing requests apart from the forward pass: long texts cut safely, per-request encodings, padding.

Runs on the batcher's tokenizer lanes; the forward thread only pads ready token ids into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from handlers.requests import PredictOptions, TextInput

# Padding values of each feature a tokenizer may return (offsets pad as (0, 0), as transformers pads them).
_PAD_VALUES = {"attention_mask": 0, "special_tokens_mask": 1}


@dataclass
class Encoded:
    """One request, tokenized: per feature, one unpadded list per input (truncated to max_model_len)."""

    texts: list[TextInput]  # str, or token ids given as they are
    options: PredictOptions
    features: dict[str, list[list[Any]]]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.features["input_ids"]]

    @property
    def cost(self) -> tuple[int, int]:
        """(rows, padded length): what the request takes of a batch's token budget."""
        lengths = self.lengths
        return len(lengths), max(lengths, default=1)


def first_cut(max_tokens: int) -> int:
    """Characters of a long text tokenized first when looking for a safe cut (doubled until proven safe).

    English averages about 4-5 characters per token; 8 per token plus a margin makes the first try enough for
    ordinary prose, so the proof below usually costs one extra tokenization of a few thousand characters.
    """
    return 8 * max_tokens + 64


def safe_prefix(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int, limit: int | None = None) -> str:
    """The shortest tried prefix of `text` whose truncated tokens provably equal those of the whole text.

    The argument. A fast tokenizer runs normalizer -> pre-tokenizer -> model, and:
    (1) normalizers act on each character or on one combining sequence (lower-casing, accent stripping,
        NFC/NFKC, BERT's control-character cleaning), so cutting the raw text changes the normalized text only
        in its last word;
    (2) pre-tokenizers (whitespace, punctuation, byte-level regex, Metaspace) split the text into words by
        looking at most at the next word (the byte-level regex's `\\s+(?!\\S)` looks ahead one character),
        so every word but the last two of a prefix is also a word of the whole text, with the same content;
    (3) the model (WordPiece, BPE, Unigram) tokenizes each word on its own: a word's tokens depend only on
        that word, including [UNK] for a word longer than WordPiece's max_input_chars_per_word.
    So if the first `max_tokens` content tokens of a prefix all come from words that are followed by at least
    two more words of that prefix, those tokens are the first `max_tokens` tokens of the whole text too, and
    truncation keeps exactly them. The check reads each token's word index (`word_ids`), which the
    tokenizer's own pre-tokenizer assigns, so it holds for whatever tokenizer the model has, with no bound
    guessed from token lengths (none exists: whitespace, control characters and one huge [UNK] word produce
    few or no tokens from any number of characters). If the check fails, the prefix doubles, up to the whole
    text: a text that cannot be cut safely is tokenized whole, which is correct and, with the character cap,
    bounded. Slow (Python) tokenizers have no word ids: their texts are never cut.
    """
    if not tokenizer.is_fast or max_tokens <= 0 or tokenizer.truncation_side == "left":
        return text  # left truncation keeps the text's end: a prefix would be wrong
    cut = first_cut(max_tokens) if limit is None else limit
    while cut < len(text):
        prefix = text[:cut]
        encoding = tokenizer(prefix, add_special_tokens=False, truncation=False, verbose=False)
        words = encoding.word_ids()
        if len(words) > max_tokens:
            # Added tokens (e.g. [MASK] typed in the text) have no word: they split words, so skip them.
            kept = [w for w in words[:max_tokens] if w is not None]
            known = [w for w in words if w is not None]
            if known and max(known) >= (max(kept) if kept else 0) + 2:
                return prefix
        cut *= 2
    return text


class TextCutter:
    """Cuts each long input of a request to a safe prefix before it is tokenized with truncation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int, add_special_tokens: bool) -> None:
        special = tokenizer.num_special_tokens_to_add(pair=False) if add_special_tokens else 0
        self.max_content_tokens = max_model_len - special
        self.tokenizer = tokenizer
        self.threshold = first_cut(self.max_content_tokens)

    def cut(self, texts: list[str]) -> list[str]:
        return [
            safe_prefix(t, self.tokenizer, self.max_content_tokens) if len(t) > self.threshold else t for t in texts
        ]


def pad_rows(
    requests: list[Encoded],
    rows: list[tuple[int, int]],
    length: int,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, torch.Tensor]:
    """Tensors of the given (request, input) rows, padded to `length` on the tokenizer's padding side.

    A feature only some requests have (offsets) is padded as a whole row for the others.
    """
    left = tokenizer.padding_side == "left"
    pads = {
        "input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        "token_type_ids": tokenizer.pad_token_type_id,
        "offset_mapping": (0, 0),
        **_PAD_VALUES,
    }
    keys = list(dict.fromkeys(key for encoded in requests for key in encoded.features))
    tensors: dict[str, torch.Tensor] = {}
    for key in keys:
        pad = pads.get(key, 0)
        padded = []
        for request, row in rows:
            values = requests[request].features.get(key)
            row_values = list(values[row]) if values is not None else []
            filler = [pad] * (length - len(row_values))
            padded.append(filler + row_values if left else row_values + filler)
        tensors[key] = torch.tensor(padded, dtype=torch.long)
    return tensors
