"""A whole sentence-transformers stack, built by sentence-transformers itself from the tiny BERT (tests only).

Transformer (max_seq_length 16) -> mean Pooling -> Dense 32->48 with GELU -> Dense 48->24 with Tanh
-> Normalize, with prompts and a default prompt. Built once per tiny BERT and library versions, in a
folder beside the tiny models, staged and renamed into place like them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

MAX_SEQ_LENGTH = 16
PROMPTS = {"query": "query: ", "passage": "passage: "}
DEFAULT_PROMPT = "query"


def build_stack(bert: Path, folder: Path, pooling: str = "mean", include_prompt: bool = True) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    torch.manual_seed(99)
    transformer = models.Transformer(str(bert), max_seq_length=MAX_SEQ_LENGTH)
    hidden = int(transformer.auto_model.config.hidden_size)
    modules = [
        transformer,
        models.Pooling(hidden, pooling_mode=pooling, include_prompt=include_prompt),
        models.Dense(hidden, 48, activation_function=torch.nn.GELU()),
        models.Dense(48, 24, activation_function=torch.nn.Tanh()),
        models.Normalize(),
    ]
    model = SentenceTransformer(modules=modules, prompts=PROMPTS, default_prompt_name=DEFAULT_PROMPT, device="cpu")
    model.save(str(folder))
    # Older saves (e.g. all-MiniLM-L6-v2) keep the length here; sentence-transformers reads it too.
    config_file = folder / "sentence_bert_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "max_seq_length": MAX_SEQ_LENGTH}, indent=2))
    return folder


def cached_stack(bert: Path, pooling: str = "mean", include_prompt: bool = True) -> Path:
    """The stack for this tiny BERT; `pooling` and `include_prompt` vary the Pooling module."""
    import sentence_transformers

    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(sentence_transformers.__version__.encode())
    key.update((bert / "model.safetensors").read_bytes())
    key.update(f"{pooling}-{include_prompt}".encode())
    root = bert.parent.parent / f"hf-serve-st-stack-{key.hexdigest()[:16]}"
    if (root / "modules.json").is_file():
        return root
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
    try:
        build_stack(bert, staging, pooling, include_prompt)
        with contextlib.suppress(OSError):  # another session finished first; its build is the same
            staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
