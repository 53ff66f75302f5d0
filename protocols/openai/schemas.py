"""OpenAI request schemas for completions and chat (pydantic, no torch): fields in OpenAI's order, then
vLLM's extras, each documented at the field. Unknown fields are accepted and logged; unsupported ones
are refused by name with a 400."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engines.generation.backend import INT64_MAX, INT64_MIN, StructuredOutput
from handlers.errors import InvalidInput
from protocols.errors import invalid_from_validation
from protocols.openai.structured import from_response_format
from protocols.openai.tools import ToolPlan, plan_tools

logger = logging.getLogger(__name__)

MAX_LOGPROBS = 20
DEFAULT_COMPLETION_MAX_TOKENS = 16


class OpenAIBaseModel(BaseModel):
    """Accepts fields it does not know (clients send new ones all the time) and logs their names."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def log_ignored(self, endpoint: str) -> None:
        if self.model_extra:
            logger.info("%s request: ignored unknown fields %s", endpoint, sorted(self.model_extra))


class StructuredOutputsParams(OpenAIBaseModel):
    """vLLM's `structured_outputs` request field: exactly one of json, regex, choice, grammar, json_object."""

    json_schema: str | dict[str, Any] | None = Field(
        None, alias="json", description="A JSON schema (object or its JSON text) the output must satisfy."
    )
    regex: str | None = Field(None, description="A regular expression the whole output must match.")
    choice: list[str] | None = Field(None, description="The output is exactly one of these texts.")
    grammar: str | None = Field(None, description="An EBNF (GBNF) or Lark grammar the output must follow.")
    json_object: bool | None = Field(None, description="The output is any JSON object.")
    disable_any_whitespace: bool = Field(False, description="JSON: no whitespace beyond what JSON needs.")
    disable_additional_properties: bool = Field(False, description="Not supported (400 when true).")
    whitespace_pattern: str | None = Field(None, description="Not supported (400 when set).")
    structural_tag: str | None = Field(None, description="Not supported (400 when set).")

    model_config = ConfigDict(extra="allow", protected_namespaces=(), populate_by_name=True)

    def to_structured(self) -> StructuredOutput:
        param = "structured_outputs"
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise InvalidInput(f"'structured_outputs.{name}' is not supported", param=param)
        if self.disable_additional_properties:
            raise InvalidInput("'structured_outputs.disable_additional_properties' is not supported", param=param)
        given = {
            "json": self.json_schema,
            "regex": self.regex,
            "choice": self.choice,
            "grammar": self.grammar,
            "json_object": self.json_object,
        }
        chosen = [name for name, value in given.items() if value is not None]
        if len(chosen) != 1:
            raise InvalidInput(
                "'structured_outputs' needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(chosen) or 'none'}",
                param=param,
            )
        whitespace = not self.disable_any_whitespace
        kind = chosen[0]
        if kind == "json":
            schema = self.json_schema
            return StructuredOutput("json", schema if isinstance(schema, str) else json.dumps(schema), (), whitespace)
        if kind == "choice":
            return StructuredOutput("choice", choices=tuple(self.choice or ()))
        if kind == "json_object":
            if not self.json_object:
                raise InvalidInput("'structured_outputs.json_object' must be true when given", param=param)
            return StructuredOutput("json_object", any_whitespace=whitespace)
        return StructuredOutput(kind, given[kind])  # type: ignore[arg-type]


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with the usage (choices empty).")


class SamplingFields(OpenAIBaseModel):
    """Fields shared by completions and chat, in OpenAI's order, then vLLM's extras."""

    model: str | None = Field(None, description="Served model name; the route checks it.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI default 0.")
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> bias added to its logit, clamped to [-100, 100]."
    )
    n: int = Field(1, ge=1, le=128, description="Choices per prompt.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="OpenAI default 0.")
    response_format: dict[str, Any] | None = Field(
        None, description="{'type': 'text' | 'json_object' | 'json_schema', 'json_schema': {'name', 'schema'}}."
    )
    seed: int | None = Field(
        None, ge=INT64_MIN, le=INT64_MAX, description="Seeds sampling: same seed and options, same output (int64)."
    )
    stop: str | list[str] | None = Field(None, description="Stop strings, excluded from the text.")
    stream: bool = Field(False, description="Server-sent events, one chunk per step and choice.")
    stream_options: StreamOptions | None = Field(None, description="include_usage: a last usage chunk.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy. OpenAI default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling. OpenAI default 1.")
    user: str | None = Field(None, description="Accepted and ignored.")
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, description="vLLM extra: keep the k most likely tokens; 0/-1 = all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extra: relative probability floor.")
    repetition_penalty: float | None = Field(None, gt=0.0, description="vLLM extra: 1 = off.")
    min_tokens: int = Field(0, ge=0, description="vLLM extra: no eos / stop token before this many tokens.")
    ignore_eos: bool = Field(False, description="vLLM extra: generate past eos up to max_tokens.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra: token ids that end a choice.")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra: keep the stop string.")
    skip_special_tokens: bool = Field(True, description="vLLM extra: leave special tokens out of the text.")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="vLLM extra: logprobs of the prompt tokens and this many alternatives."
    )
    structured_outputs: StructuredOutputsParams | None = Field(
        None, description="vLLM extra: one of json, regex, choice, grammar, json_object."
    )

    def refuse_unsupported(self) -> None:
        pass

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    """POST /openai/v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, a list of texts, token ids, or a list of token id lists."
    )
    best_of: int | None = Field(None, description="Only best_of == n is supported.")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text.")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Logprobs of the chosen tokens and this many alternatives."
    )
    max_tokens: int | None = Field(None, ge=1, description="Default: generation_config, else 16.")
    suffix: str | None = Field(None, description="Not supported (400).")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise InvalidInput("'suffix' is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidInput("'best_of' is not supported (only best_of == n)", param="best_of")

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids (used as they are, without special tokens added)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidInput("'prompt' is an empty list", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return [p if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[misc]


class ChatCompletionRequest(SamplingFields):
    """POST /openai/v1/chat/completions."""

    messages: list[dict[str, Any]] = Field(..., min_length=1, description="The conversation so far.")
    logprobs: bool = Field(False, description="Return the chosen tokens' logprobs.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token.")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI; max_completion_tokens wins.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Default: the rest of the context.")
    tools: list[dict[str, Any]] | None = Field(
        None,
        description="Functions the model may call: [{'type': 'function', 'function': {name, description, "
        "parameters}}], rendered by the chat template.",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description="none, auto (default with tools: hermes <tool_call> output parsed), required or "
        "{'type': 'function', 'function': {'name'}} (both enforced by grammar).",
    )
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported (400 when non-empty).")
    function_call: str | dict[str, Any] | None = Field(None, description="Not supported.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted and ignored.")
    # extras
    chat_template: str | None = Field(
        None,
        description="Extra: a Jinja chat template replacing the model's; refused unless the server runs with "
        "trust_request_chat_template.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra: passed to the template.")
    add_generation_prompt: bool = Field(True, description="Extra: end the prompt with the assistant header.")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.functions:
            raise InvalidInput("'functions' is not supported", param="functions")
        if self.function_call not in (None, "none", "auto"):
            raise InvalidInput("'function_call' is not supported", param="function_call")
        plan = self.tool_plan()
        if plan.forced and (self.structured_outputs is not None or from_response_format(self.response_format)):
            raise InvalidInput(
                f"tool_choice '{plan.mode}' is enforced by a grammar; it cannot be combined with "
                "response_format or structured_outputs",
                param="tool_choice",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInput("'top_logprobs' needs 'logprobs': true", param="top_logprobs")

    def tool_plan(self) -> ToolPlan:
        return plan_tools(self.tools, self.tool_choice)

    def text_messages(self) -> list[dict[str, Any]]:
        """Messages with text content only (a list of text parts is joined with newlines)."""
        result = []
        for i, message in enumerate(self.messages):
            if not isinstance(message.get("role"), str):
                raise InvalidInput(f"messages[{i}] has no 'role'", param="messages")
            content = message.get("content")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind != "text":
                        raise InvalidInput(
                            f"messages[{i}].content[{j}] of type '{kind}' is not supported; only 'text'",
                            param="messages",
                        )
                    texts.append(str(part.get("text", "")))
                content = "\n".join(texts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise InvalidInput(f"messages[{i}].content must be a string or a list of parts", param="messages")
            result.append({**message, "content": content})
        return result


_Request = TypeVar("_Request", CompletionRequest, ChatCompletionRequest)


def _parse(model: type[_Request], body: Mapping[str, Any], what: str) -> _Request:
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        raise invalid_from_validation(error, f"{what} request") from None
    request.log_ignored(what)
    request.refuse_unsupported()
    return request


def parse_completion_request(body: Mapping[str, Any]) -> CompletionRequest:
    return _parse(CompletionRequest, body, "completion")


def parse_chat_request(body: Mapping[str, Any]) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body, "chat completion")
