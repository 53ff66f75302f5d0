"""vLLM's /tokenize and /detokenize, in vLLM's request and response shapes (no torch): a prompt, or chat
messages rendered by the chat template, to token ids and back."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engines.generation.backend import GenerationBackend
from handlers.errors import InvalidInput
from protocols.openai.generation_requests import chat_prompt_ids
from protocols.openai.schemas import ChatCompletionRequest, OpenAIBaseModel


class TokenizeRequest(OpenAIBaseModel):
    """POST /openai/tokenize: `prompt` (completion form) or `messages` (chat form), as vLLM accepts."""

    model: str | None = Field(None, description="Served model name; the route checks it.")
    prompt: str | None = Field(None, description="Text to tokenize (completion form).")
    messages: list[dict[str, Any]] | None = Field(None, description="A conversation, rendered by the chat template.")
    add_special_tokens: bool = Field(True, description="Completion form: add the model's special tokens (bos ...).")
    add_generation_prompt: bool = Field(True, description="Chat form: end with the assistant header.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Chat form: passed to the template.")
    tools: list[dict[str, Any]] | None = Field(None, description="Chat form: tools rendered by the template.")
    return_token_strs: bool = Field(False, description="Also return each token's string.")


class TokenizeResponse(OpenAIBaseModel):
    count: int = Field(..., description="Number of tokens.")
    max_model_len: int = Field(..., description="The model's context length.")
    tokens: list[int] = Field(..., description="Token ids.")
    token_strs: list[str] | None = Field(None, description="Each token's string, when asked for.")


class DetokenizeRequest(OpenAIBaseModel):
    """POST /openai/detokenize."""

    model: str | None = Field(None, description="Served model name; the route checks it.")
    tokens: list[int] = Field(..., description="Token ids to decode.")


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str = Field(..., description="The decoded text.")


def tokenize(backend: GenerationBackend, request: TokenizeRequest) -> TokenizeResponse:
    tokenizer = backend.tokenizer
    if (request.prompt is None) == (request.messages is None):
        raise InvalidInput("send either 'prompt' or 'messages'", param="prompt")
    if request.messages is not None:
        chat = ChatCompletionRequest(
            messages=request.messages,
            add_generation_prompt=request.add_generation_prompt,
            chat_template_kwargs=request.chat_template_kwargs,
            tools=request.tools,
        )
        ids = chat_prompt_ids(backend, chat)
    else:
        ids = list(tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"])
    strings = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=backend.max_model_len, tokens=ids, token_strs=strings)


def detokenize(backend: GenerationBackend, request: DetokenizeRequest) -> DetokenizeResponse:
    vocabulary = len(backend.tokenizer)
    bad = [t for t in request.tokens if not 0 <= t < vocabulary]
    if bad:
        raise InvalidInput(f"token ids {bad[:5]} are outside the vocabulary (0..{vocabulary - 1})", param="tokens")
    return DetokenizeResponse(prompt=backend.tokenizer.decode(request.tokens))
