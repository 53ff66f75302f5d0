"""Rendering handler errors in each protocol's shape, and short messages from validation errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from handlers.errors import InvalidInput, ServingError


class KServeErrorBody(BaseModel):
    """The error body on KServe's V1/V2 routes and the root."""

    error: str = Field(description="What went wrong, naming the field or limit")
    request_id: str = Field(description="The request's id, as in the x-request-id response header")


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int = Field(description="The HTTP status")


class OpenAIErrorBody(BaseModel):
    """The error body under /openai, which the openai client turns into typed exceptions."""

    error: OpenAIError
    request_id: str


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field path, e.g. `instances.1: Input should be a valid string`."""
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(problems)


def invalid_from_validation(error: ValidationError, what: str) -> InvalidInput:
    return InvalidInput(f"invalid {what}: {describe_validation_error(error)}")


def kserve_error_body(error: ServingError) -> dict[str, Any]:
    """KServe's V1/V2 error body: {"error": "message"}."""
    return {"error": error.message}


def openai_error_body(error: ServingError) -> dict[str, Any]:
    """OpenAI's error body, which the openai client turns into typed exceptions."""
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.status_code,
        }
    }


# TEI's and TGI's error_type per status; huggingface_hub turns "validation" and "overloaded" into typed errors.
_TEI_ERROR_TYPES = {400: "validation", 404: "validation", 415: "validation", 429: "overloaded", 503: "unhealthy"}


def tei_error_body(error: ServingError) -> dict[str, Any]:
    """TEI's and TGI's error body: {"error": "message", "error_type": "validation" | "overloaded" | ...}."""
    return {"error": error.message, "error_type": _TEI_ERROR_TYPES.get(error.status_code, "backend")}
