"""fill_mask projects only the mask positions to the vocabulary, with logits equal to the full computation."""

from __future__ import annotations

import torch
from transformers import AutoModelForMaskedLM

from handlers.fill_mask import masked_lm_head
from handlers.registry import handler_class_for
from settings.arguments import parse_arguments
from settings.loading import inspect_model


def test_gathered_mask_logits_equal_the_full_logits(tiny_models):
    path = tiny_models["fill_mask"]
    args = parse_arguments({"model_dir": str(path), "device": "cpu"}, environ={})
    handler = handler_class_for(inspect_model(args).task)(inspect_model(args), args)
    handler.load()
    assert handler._head is not None and handler._head is masked_lm_head(handler.model)  # the gathering path
    mask = handler.tokenizer.mask_token
    # Different numbers of masks per row, at different places, with padding.
    texts = [f"paris is the {mask} of france.", f"{mask} smith lives in {mask} and {mask}.", f"i hate {mask}"]
    inputs = dict(handler.tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.inference_mode():
        gathered = handler.forward(inputs)  # [rows, most masks, vocabulary]
        full = AutoModelForMaskedLM.from_pretrained(str(path)).eval()(**inputs).logits
    is_mask = inputs["input_ids"] == handler.tokenizer.mask_token_id
    assert gathered.shape == (3, 3, full.shape[-1])
    for row in range(3):
        want = full[row][is_mask[row]]
        torch.testing.assert_close(gathered[row, : len(want)], want, rtol=0, atol=1e-5)
        assert not gathered[row, len(want) :].any()  # padding slots stay zero
