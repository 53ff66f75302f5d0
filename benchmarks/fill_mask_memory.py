"""Peak memory of one fill_mask request at the limits, with a 250k vocabulary (XLM-R's size).

Builds a random BERT masked-LM (2 layers, hidden 64, vocabulary 250,002, 512 positions) with the tests' tiny
tokenizer, then in a fresh process per case runs one request through the handler and reads the process's
peak RSS (ru_maxrss; tracemalloc does not see torch's allocations). Cases: max_client_batch_size inputs of
max_model_len tokens, one mask each, projecting only the masks (the server's path) and, for scale, the full
[inputs, length, vocabulary] computation on fewer inputs (at 32 x 512 it would need ~16 GB).

    .venv/bin/python -m benchmarks.fill_mask_memory
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import print_table, write_results

VOCAB = 250_002


def build(folder: Path) -> None:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from tests.tiny_models import build_bert_tokenizer

    tokenizer = build_bert_tokenizer()
    tokenizer.model_max_length = 512
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    BertForMaskedLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def run_case(folder: str, inputs: int, gather: bool) -> dict[str, float]:
    """In this process: load, note RSS, run one request, note peak RSS."""
    from handlers.registry import handler_class_for
    from handlers.requests import PredictOptions, TaskResult
    from settings.arguments import parse_arguments
    from settings.loading import inspect_model

    args = parse_arguments({"model_dir": folder, "device": "cpu"}, environ={})
    source = inspect_model(args)
    handler = handler_class_for(source.task)(source, args)
    handler.load()
    if not gather:
        handler._head = None  # the full computation, then the gather
    mask = handler.tokenizer.mask_token
    text = f"paris {mask} " + "the capital of france is paris " * 200  # cut to 512 tokens, mask kept
    handler.predict_many([([text] * 2, PredictOptions())])  # warm up allocators at a small size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    [result] = handler.predict_many([([text] * inputs, PredictOptions(top_k=5))])
    assert isinstance(result, TaskResult), result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, "growth_mb": (peak - before) / 1024}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] != "--":
        print(json.dumps(run_case(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "gather")))
        return
    cases = [(32, "gather"), (1, "full"), (4, "full")]
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        figures = {}
        for inputs, mode in cases:
            command = [sys.executable, "-m", "benchmarks.fill_mask_memory", tmp, str(inputs), mode]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            figures[f"{inputs} x 512 tokens, {mode}"] = json.loads(output.strip().splitlines()[-1])
    rows = [
        [name, f"{r['rss_before_mb']:.0f}", f"{r['peak_rss_mb']:.0f}", f"{r['growth_mb']:.0f}"]
        for name, r in figures.items()
    ]
    print_table(["request (vocabulary 250,002)", "RSS before MB", "peak RSS MB", "growth MB"], rows)
    write_results("fill_mask_memory", {"vocabulary": VOCAB, "cases": figures})


if __name__ == "__main__":
    main()
