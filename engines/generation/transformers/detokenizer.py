"""Per-sequence text: incremental detokenization and stop strings (no model, only the tokenizer)."""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded before the first generated token, so its leading space survives decoding.
DETOKENIZE_CONTEXT = 5


class Detokenizer:
    """Incremental decoding with a sliding prefix window (vLLM/TGI's method): emits text only once a
    token's characters are complete (no U+FFFD at the end), and keeps leading spaces right."""

    def __init__(self, tokenizer: Any, prompt_ids: tuple[int, ...], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        context = list(prompt_ids[-DETOKENIZE_CONTEXT:])
        self.ids = context
        self.prefix_offset = 0
        self.read_offset = len(context)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still undecided (an incomplete character at the very end)."""
        if self.read_offset >= len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip)
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopStrings:
    """The text of one sequence so far, with stop strings applied and a held-back tail."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include_stop = include_stop
        self.text = ""
        self.emitted = 0
        self.max_stop = max((len(s) for s in self.stops), default=0)

    def add(self, delta: str) -> str | None:
        """Append decoded text; returns the stop string when one matched (the text is cut there)."""
        if not delta:
            return None
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        best: tuple[int, str] | None = None
        for stop in self.stops:
            position = self.text.find(stop, start)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return None
        position, stop = best
        self.text = self.text[: position + (len(stop) if self.include_stop else 0)]
        return stop

    def take(self, final: bool) -> str:
        """Text ready to send: all of it when final, else all but a tail that may start a stop string."""
        end = len(self.text)
        if not final and self.stops:
            hold = 0
            for stop in self.stops:
                for k in range(min(len(stop) - 1, end - self.emitted), hold, -1):
                    if self.text.endswith(stop[:k]):
                        hold = k
                        break
            end -= hold
        if end <= self.emitted:
            return ""
        chunk = self.text[self.emitted : end]
        self.emitted = end
        return chunk
