"""KServe V1 (TensorFlow Serving style) predict protocol: {"instances": [...]} → {"predictions": [...]}."""

from __future__ import annotations

from typing import Annotated, Any

from annotated_types import Len
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from handlers.errors import InvalidInput
from handlers.requests import RequestOptions, TaskResult
from protocols.errors import invalid_from_validation

# A (query, document) pair for rerank models.
TextPair = Annotated[list[StrictStr], Len(2, 2)]


class V1PredictRequest(BaseModel):
    """`instances` (or `inputs`, as KServe also accepts) holds the texts; `parameters` is our extension."""

    model_config = ConfigDict(extra="forbid")

    instances: list[StrictStr | TextPair] | None = Field(
        None, description="Texts; on rerank models, [query, document] pairs (scored in order)."
    )
    inputs: list[StrictStr | TextPair] | None = None
    parameters: RequestOptions | None = Field(None, description="Per-request options (not in KServe).")


class V1PredictResponse(BaseModel):
    """One prediction per input: a class index, label, token ids, vector or text, by task and options."""

    predictions: list[Any]


class V1ModelsResponse(BaseModel):
    models: list[str]


class V1ModelStatus(BaseModel):
    name: str
    ready: bool


class RootResponse(BaseModel):
    """KServe's liveness answer on GET /."""

    status: str = Field(examples=["alive"])


def parse_predict_request(body: bytes) -> tuple[list[Any], RequestOptions | None]:
    """The texts (pairs as tuples) and options of a V1 request."""
    try:
        request = V1PredictRequest.model_validate_json(body)
    except ValidationError as error:
        raise invalid_from_validation(error, "V1 request") from None
    if request.instances is not None and request.inputs is not None:
        raise InvalidInput("give either 'instances' or 'inputs', not both")
    texts = request.instances if request.instances is not None else request.inputs
    if texts is None:
        raise InvalidInput("the V1 request needs an 'instances' list of strings")
    if not texts:
        raise InvalidInput("'instances' is empty: send at least one string")
    return [tuple(item) if isinstance(item, list) else item for item in texts], request.parameters


def predict_response(result: TaskResult) -> dict[str, Any]:
    return {"predictions": result.predictions}


def models_response(names: list[str]) -> dict[str, Any]:
    return {"models": names}


def model_status_response(name: str, ready: bool) -> dict[str, Any]:
    return {"name": name, "ready": ready}
