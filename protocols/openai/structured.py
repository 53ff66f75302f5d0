"""Structured outputs in the request: OpenAI's `response_format` (json_schema, json_object) and vLLM's
`structured_outputs` (json, regex, choice, grammar, json_object), with vLLM's field names, turned into one
backend-neutral `StructuredOutput`. No torch: the backend compiles and applies it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from engines.generation.backend import StructuredOutput
from handlers.errors import InvalidInput

if TYPE_CHECKING:
    from protocols.openai.schemas import StructuredOutputsParams


def from_response_format(response_format: dict[str, Any] | None) -> StructuredOutput | None:
    """OpenAI's response_format: text (None), json_object, or json_schema {name, schema, strict}."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict | bool):
            raise InvalidInput(
                "'response_format' of type 'json_schema' needs json_schema.schema (a JSON schema object)",
                param="response_format",
            )
        return StructuredOutput("json", json.dumps(schema))
    raise InvalidInput(
        f"'response_format' of type '{kind}' is not supported; use text, json_object or json_schema",
        param="response_format",
    )


def structured_output(
    response_format: dict[str, Any] | None, params: StructuredOutputsParams | None
) -> StructuredOutput | None:
    """The request's one constraint, or None; both fields at once is a 400."""
    from_format = from_response_format(response_format)
    if params is None:
        return from_format
    if from_format is not None:
        raise InvalidInput(
            "send either 'response_format' (json) or 'structured_outputs', not both", param="structured_outputs"
        )
    return params.to_structured()
