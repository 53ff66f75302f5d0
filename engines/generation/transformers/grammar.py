"""Structured outputs with xgrammar (the library vLLM uses): a grammar compiled once per request, one
matcher per row, and a token bitmask applied to the batch's logits row by row inside the decode step,
so constrained and free rows share one batch.

A row's matcher accepts every token the row samples; once the grammar is complete only the stop tokens
(eos) remain allowed, so generation that ends by itself ends with a complete, valid text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
import xgrammar as xgr

from engines.generation.backend import StructuredOutput
from handlers.errors import InvalidInput

logger = logging.getLogger(__name__)


def choice_grammar(choices: tuple[str, ...]) -> str:
    """An EBNF grammar whose sentences are exactly the given texts (JSON escapes are EBNF's too)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class Grammars:
    """Compiles StructuredOutputs for one model's tokenizer and masks logits with their matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int]) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, structured: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar (xgrammar caches by spec); InvalidInput names a spec it cannot parse."""
        field = "structured_outputs." + structured.kind
        try:
            if structured.kind == "json":
                return self.compiler.compile_json_schema(structured.spec, any_whitespace=structured.any_whitespace)
            if structured.kind == "json_object":
                return self.compiler.compile_builtin_json_grammar()
            if structured.kind == "regex":
                return self.compiler.compile_regex(structured.spec)
            if structured.kind == "choice":
                if not structured.choices:
                    raise InvalidInput("'choice' needs at least one text", param=field)
                return self.compiler.compile_grammar(choice_grammar(structured.choices))
            try:
                return self.compiler.compile_grammar(structured.spec)
            except Exception:  # not EBNF: try Lark, as vLLM accepts both
                return self.compiler.compile_lark(structured.spec)
        except InvalidInput:
            raise
        except Exception as error:  # xgrammar's parse errors are RuntimeError / ValueError subclasses
            raise InvalidInput(f"cannot use this {structured.kind} constraint: {error}", param=field) from None

    @staticmethod
    def matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)

    def mask(self, logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> torch.Tensor:
        """`logits` [rows, vocab_size] with every token a row's grammar forbids at -inf (a copy when any row
        is constrained; the same tensor otherwise)."""
        constrained = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not constrained:
            return logits
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in constrained:
            matchers[i].fill_next_token_bitmask(bitmask, i)  # type: ignore[union-attr]
        logits = logits.clone()
        xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device), vocab_size=self.vocab_size, indices=constrained
        )
        return logits

    @staticmethod
    def accept(matcher: xgr.GrammarMatcher, token: int) -> None:
        if not matcher.is_terminated() and not matcher.accept_token(token):
            logger.warning("the grammar matcher refused token %d", token)
