"""Tiny random Hugging Face models built offline, for tests that need real model folders.

Every builder writes a complete folder with `save_pretrained` (config, safetensors weights, tokenizer),
so the server loads it exactly as it would load a Hub download. Weights come from a fixed torch seed
and the tokenizers are trained on the small corpus below (see build_bert_tokenizer for how the
WordPiece vocab is kept stable), so every build writes the same bytes.

    from tests.tiny_models import build_all
    paths = build_all(Path("/tmp/tiny"))  # {"sequence_classification": Path(...), ...}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

SEED = 1234

CORPUS = """\
Paris is the capital of France. The capital of France is Paris.
Berlin is the capital of Germany, and Rome is the capital of Italy.
Madrid is the capital of Spain. London is the capital of England.
The river Seine flows through Paris and the river Thames flows through London.
John Smith lives in Paris and works in London. Mary Jones was born in Berlin.
Alice and Bob visited Rome last summer with their friends from Madrid.
The weather today is good, the sun is bright and the sky is blue.
I love this movie, it was great and the actors were wonderful.
I hate the rain, the food was bad and the service was terrible.
This is a neutral sentence about a table, a chair and a window.
The quick brown fox jumps over the lazy dog near the old house.
A man walks to the market to buy bread, milk, cheese and apples.
Hello world! How are you today? I am fine, thank you very much.
Machine learning models read text and predict labels for every token.
The model answers questions about cities, countries, people and places.
She said that the train to Berlin leaves at nine in the morning.
We went to the museum in Paris and saw many famous paintings.
The children play football in the park after school every day.
Good morning, good evening and good night to everyone here.
What is the capital of France? The answer is Paris, of course.
Please write a short story about a cat who lives in a small town.
The cat sat on the mat and the dog slept by the door.
Water is wet, fire is hot, ice is cold and the wind is strong.
Numbers like one, two, three, four, five, six, seven and ten are words too.
Red, green, yellow, white and black are colors of the flag.
The president of the company met the team in the new office.
Students learn history, science, music and art at the university.
My friend Peter travels by plane to Tokyo and by boat to Lisbon.
Emma works at the hospital as a doctor and helps sick people.
The book on the shelf is interesting but the film is boring.
Mountains, forests, lakes and beaches make the country beautiful in spring.
Our teacher explained mathematics, physics and chemistry with simple examples.
Yesterday it snowed in Vienna, so we stayed inside drinking coffee and tea.
The engineer fixed the computer, the phone and the printer before lunch.
Farmers grow wheat, rice, potatoes and tomatoes on large fields.
The orchestra played a quiet song while the audience listened carefully.
Doctors recommend sleeping eight hours, eating vegetables and walking often.
The library opens early on Monday and closes late on Friday.
Captain Miller sailed from Amsterdam to Dublin across a stormy sea.
Scientists discovered a new planet orbiting a distant star.
"""

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTIMENT_LABELS = ["NEGATIVE", "NEUTRAL", "POSITIVE"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


# --- tokenizers ---


def build_bert_tokenizer(vocab_size: int = 2000) -> BertTokenizerFast:
    """A lower-casing WordPiece tokenizer, trained on CORPUS, wrapped as BERT's fast tokenizer."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    # The trainer breaks ties between equally frequent pairs in hash order, so its intermediate pieces
    # ("##ian", "capi") and ids change from run to run. Kept: what every run learns (trained to the end,
    # every corpus word is one token) in a fixed order, so a build gives the same files every time.
    words = {
        word
        for line in corpus_lines()
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(line))
    }
    learned = set(tokenizer.get_vocab())
    missing = words - learned
    assert not missing, f"vocab_size {vocab_size} is too small for the corpus; missing {sorted(missing)[:5]}"
    alphabet = {t for t in learned if len(t) == 1 or (t.startswith("##") and len(t) == 3)}
    tokens = BERT_SPECIAL_TOKENS + sorted((alphabet | words) - set(BERT_SPECIAL_TOKENS))
    vocab = {token: index for index, token in enumerate(tokens)}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)


def build_generation_tokenizer(
    specials: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str,
    append_eos: bool,
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (no unknown bytes, exact round trip) for generative models.

    With `bos`, each text starts with it (Llama); with `append_eos`, each ends with eos (T5).
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    template = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if append_eos else [])])
    pair = " ".join([template, "$B:1", *([f"{eos}:1"] if append_eos else [])])
    added = ([bos] if bos else []) + ([eos] if append_eos else [])
    special_ids = [(token, tokenizer.token_to_id(token)) for token in added]
    tokenizer.post_processor = processors.TemplateProcessing(single=template, pair=pair, special_tokens=special_ids)
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        model_max_length=256,
        **kwargs,
    )


# --- BERT models ---


def _bert_config(
    tokenizer: BertTokenizerFast, initializer_range: float = 0.1, hidden_size: int = 32, **extra: object
) -> BertConfig:
    """BERT's shape, scaled down. The weights are 5x BERT's initial scale (0.02): with that, a random
    model's outputs are nearly uniform and the same for every input, which tests nothing. hidden_size=64
    gives head size 32, the smallest vLLM's CPU attention takes (the default 32 gives 16)."""
    return BertConfig(
        initializer_range=initializer_range,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def _labels(names: list[str]) -> dict[str, object]:
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


def build_sequence_classification(folder: Path, tokenizer: BertTokenizerFast, hidden_size: int = 32) -> Path:
    torch.manual_seed(SEED)
    # Larger still, so that different inputs get different classes (checked by the tests).
    config = _bert_config(tokenizer, 0.2, hidden_size, **_labels(SENTIMENT_LABELS))
    model = BertForSequenceClassification(config)
    return _save(model, tokenizer, folder)


def build_token_classification(folder: Path, tokenizer: BertTokenizerFast, hidden_size: int = 32) -> Path:
    torch.manual_seed(SEED + 1)
    model = BertForTokenClassification(_bert_config(tokenizer, hidden_size=hidden_size, **_labels(NER_LABELS)))
    return _save(model, tokenizer, folder)


def build_fill_mask(folder: Path, tokenizer: BertTokenizerFast) -> Path:
    torch.manual_seed(SEED + 2)
    model = BertForMaskedLM(_bert_config(tokenizer))
    return _save(model, tokenizer, folder)


def build_bert_model(folder: Path, tokenizer: BertTokenizerFast) -> Path:
    """A bare encoder (architectures ["BertModel"]), no sentence-transformers files."""
    torch.manual_seed(SEED + 3)
    model = BertModel(_bert_config(tokenizer))
    return _save(model, tokenizer, folder)


def build_sentence_transformers(folder: Path, tokenizer: BertTokenizerFast, hidden_size: int = 32) -> Path:
    """A sentence-transformers layout: Transformer, CLS Pooling, Normalize (JSON written by hand)."""
    torch.manual_seed(SEED + 4)
    config = _bert_config(tokenizer, hidden_size=hidden_size)
    model = BertModel(config)
    _save(model, tokenizer, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": config.max_position_embeddings, "do_lower_case": False}, indent=2)
    )
    return folder


def build_cross_encoder(folder: Path, tokenizer: BertTokenizerFast, hidden_size: int = 32) -> Path:
    """A sentence-transformers CrossEncoder folder (v6 layout, JSON written by hand): a one-label
    BertForSequenceClassification with modules.json and config_sentence_transformers.json naming it."""
    torch.manual_seed(SEED + 7)
    model = BertForSequenceClassification(_bert_config(tokenizer, 0.2, hidden_size, num_labels=1))
    _save(model, tokenizer, folder)
    transformer_type = "sentence_transformers.base.modules.transformer.Transformer"
    modules = [{"idx": 0, "name": "0", "path": "", "type": transformer_type}]
    st_config = {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.activation.Sigmoid", "prompts": {}}
    transformer = {"transformer_task": "sequence-classification", "module_output_name": "scores"}
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(transformer, indent=2))
    return folder


# --- generative models (for the text generation handlers) ---


def build_llama(folder: Path) -> Path:
    """A tiny LlamaForCausalLM: bos <s> prepended, eos </s>, pad <pad>, with a chat template."""
    tokenizer = build_generation_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", append_eos=False
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(SEED + 5)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(folder))
    # The chat template goes into tokenizer_config.json (not chat_template.jinja), as older folders have it.
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    return folder


def build_t5(folder: Path) -> Path:
    """A tiny T5ForConditionalGeneration: pad <pad> (id 0, also the decoder start), eos </s> appended."""
    tokenizer = build_generation_tokenizer(
        ["<pad>", "</s>", "<unk>"], bos=None, eos="</s>", pad="<pad>", unk="<unk>", append_eos=True
    )
    torch.manual_seed(SEED + 6)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        # Input and output embeddings are tied; a random decoder mostly echoes its input, so it would
        # repeat the decoder start token (<pad>) forever. A small <pad> row makes it produce real text.
        model.shared.weight[tokenizer.pad_token_id].mul_(0.01)
    return _save(model, tokenizer, folder)


BERT_BUILDERS: dict[str, Callable[[Path, BertTokenizerFast], Path]] = {
    "sequence_classification": build_sequence_classification,
    "token_classification": build_token_classification,
    "fill_mask": build_fill_mask,
    "bert_model": build_bert_model,
    "sentence_transformers": build_sentence_transformers,
    "cross_encoder": build_cross_encoder,
}


def build_all(root: Path) -> dict[str, Path]:
    """Build every tiny model into root/<name>; the names are BERT_BUILDERS' keys plus "llama" and "t5"."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_bert_tokenizer()
    paths = {name: builder(root / name, tokenizer) for name, builder in BERT_BUILDERS.items()}
    paths["llama"] = build_llama(root / "llama")
    paths["t5"] = build_t5(root / "t5")
    return paths
