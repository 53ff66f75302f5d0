"""Open Inference Protocol (KServe V2) over REST: schemas and translation, JSON and binary."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from handlers.errors import InvalidInput
from handlers.requests import RequestOptions, TaskResult, TensorSpec
from protocols import v2_binary
from protocols.errors import invalid_from_validation

# Parameters the protocol itself defines; everything else in `parameters` is a request option.
_PROTOCOL_PARAMETERS = {"binary_data", "binary_data_size", "binary_data_output", "content_type", "headers"}
EXTENSIONS = ["binary_tensor_data"]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """An output tensor: `data` inline, or `parameters.binary_data_size` bytes after the JSON header."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


@dataclass
class ParsedInfer:
    """A V2 request reduced to what a text model needs, plus how to answer it."""

    request_id: str | None
    texts: list[str]
    options: RequestOptions
    requested_outputs: list[RequestOutput] | None
    binary_output: bool
    input_shape: list[int] | None = None

    def text_pairs(self) -> list[tuple[str, str]]:
        """The input as (query, document) pairs, for rerank models: a BYTES tensor of shape [N, 2]."""
        shape = self.input_shape or []
        if len(shape) != 2 or shape[1] != 2:
            raise InvalidInput(f"a rerank model takes one BYTES input of shape [N, 2] (query, document); got {shape}")
        return [(self.texts[i], self.texts[i + 1]) for i in range(0, len(self.texts), 2)]


def parse_infer_request(body: bytes, content_type: str, header_length: str | None) -> ParsedInfer:
    binary_tail = b""
    # tritonclient sends the length header without a content type; either marks a binary message.
    if header_length is not None or content_type == v2_binary.CONTENT_TYPE:
        header, binary_tail = v2_binary.split_message(body, header_length)
        try:
            request = InferenceRequest.model_validate(header)
        except ValidationError as error:
            raise invalid_from_validation(error, "V2 inference request") from None
    else:
        try:
            request = InferenceRequest.model_validate_json(body)
        except ValidationError as error:
            raise invalid_from_validation(error, "V2 inference request") from None
    require_one_input([i.name for i in request.inputs])
    tensor = request.inputs[0]
    texts = _input_texts(tensor, binary_tail)
    options = request_options(request.parameters, tensor.parameters)
    binary_output = bool((request.parameters or {}).get("binary_data_output", False)) or any(
        (output.parameters or {}).get("binary_data", False) for output in request.outputs or []
    )
    return ParsedInfer(request.id, texts, options, request.outputs, binary_output, tensor.shape)


def require_one_input(names: list[str]) -> None:
    if len(names) != 1:
        raise InvalidInput(f"this model takes one BYTES input of texts; got {len(names)} ({', '.join(names)})")


def check_text_tensor(name: str, datatype: str, shape: list[int]) -> None:
    """A text input must be BYTES with a valid shape; checked before its data is read (REST and gRPC)."""
    if datatype != "BYTES":
        raise InvalidInput(f"input '{name}' has datatype {datatype}; text models take BYTES")
    if any(dim < 0 for dim in shape):
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {shape}")


def _input_texts(tensor: RequestInput, binary_tail: bytes) -> list[str]:
    check_text_tensor(tensor.name, tensor.datatype, tensor.shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidInput(f"input '{tensor.name}' has both binary_data_size and data")
        if not isinstance(size, int) or size != len(binary_tail):
            raise InvalidInput(
                f"input '{tensor.name}' says binary_data_size={size} but {len(binary_tail)} bytes follow the header"
            )
        flat: list[Any] = v2_binary.decode_tensor("BYTES", binary_tail)
    elif tensor.data is None:
        raise InvalidInput(f"input '{tensor.name}' has no data")
    else:
        flat = _flatten(tensor.data)
    return texts_from_elements(tensor.name, tensor.shape, flat)


def texts_from_elements(name: str, shape: list[int], flat: list[Any]) -> list[str]:
    """The texts of a BYTES input's flat elements (str or UTF-8 bytes), checked against its shape."""
    expected = math.prod(shape)
    if len(flat) != expected:
        raise InvalidInput(f"input '{name}' has shape {shape} ({expected} elements) but {len(flat)} data")
    if not flat:
        raise InvalidInput(f"input '{name}' is empty: send at least one string")
    texts = []
    for index, element in enumerate(flat):
        if isinstance(element, bytes):
            try:
                element = element.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidInput(f"input '{name}' element {index} is not UTF-8 text") from None
        if not isinstance(element, str):
            raise InvalidInput(f"input '{name}' element {index} is {type(element).__name__}, not a string")
        texts.append(element)
    return texts


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def request_options(*parameter_sets: dict[str, Any] | None) -> RequestOptions:
    """Request options from `parameters` objects (request, then input), protocol parameters left out."""
    merged: dict[str, Any] = {}
    for parameters in parameter_sets:
        merged.update({k: v for k, v in (parameters or {}).items() if k not in _PROTOCOL_PARAMETERS})
    try:
        return RequestOptions.model_validate(merged)
    except ValidationError as error:
        raise invalid_from_validation(error, "V2 parameters") from None


# --- responses ---


def _leaves(value: Any, depth: int) -> tuple[list[int], list[Any]]:
    """Shape and flat elements of `value` taken `depth` levels deep; the rest of each leaf is an element."""
    if depth == 0:
        return [], [value]
    if not isinstance(value, list):
        raise ValueError("output is shallower than its declared shape")
    shapes, flat = [], []
    for item in value:
        shape, elements = _leaves(item, depth - 1)
        shapes.append(shape)
        flat.extend(elements)
    if any(shape != shapes[0] for shape in shapes[1:]):
        raise ValueError("output is ragged")
    return [len(value), *(shapes[0] if shapes else [0] * (depth - 1))], flat


def _bytes_element(element: Any) -> str:
    if isinstance(element, str):
        return element
    if isinstance(element, dict):
        return str(element)  # KServe sends probability dicts as Python's str(dict); kept for its clients
    return json.dumps(element)


def output_tensors(result: TaskResult, specs: list[TensorSpec]) -> list[tuple[TensorSpec, list[int], list[Any]]]:
    """Each output's shape and flat data.

    A ragged BYTES output (fill_mask probabilities for inputs with different numbers of masks) cannot be a
    rectangular tensor: it is answered with shape [inputs], each element the JSON text of that input's value
    (JSON keys are strings), and, on REST, the output parameter content_type "json". A shorter shape than the
    model metadata's tells the client which form it got.
    """
    tensors = []
    for spec in specs:
        values = result.outputs[spec.name]
        try:
            shape, flat = _leaves(values, len(spec.shape))
        except ValueError:
            if spec.datatype != "BYTES":
                raise InvalidInput(
                    f"output '{spec.name}' is ragged (its inputs give different shapes) and {spec.datatype} tensors "
                    "must be rectangular; send the inputs in separate requests"
                ) from None
            tensors.append((spec, [len(values)], [json.dumps(value) for value in values]))
            continue
        if spec.datatype == "BYTES":
            flat = [_bytes_element(element) for element in flat]
        tensors.append((spec, shape, flat))
    return tensors


def select_outputs(
    specs: list[TensorSpec], requested: list[RequestOutput] | None, extra_outputs: bool = False
) -> list[TensorSpec]:
    """The outputs named in `outputs`; by default KServe's own (extra tensors only with `extra_outputs`)."""
    if not requested:
        return [spec for spec in specs if extra_outputs or not spec.extra]
    by_name = {spec.name: spec for spec in specs}
    unknown = [output.name for output in requested if output.name not in by_name]
    if unknown:
        raise InvalidInput(f"unknown output(s) {', '.join(unknown)}; this request has {', '.join(by_name)}")
    return [by_name[output.name] for output in requested]


def infer_response(
    model_name: str, parsed: ParsedInfer, result: TaskResult, specs: list[TensorSpec]
) -> tuple[bytes, str, int | None]:
    """Body, content type and (for binary) the header length of the response."""
    header: dict[str, Any] = {
        "model_name": model_name,
        "model_version": None,
        "id": parsed.request_id,
        "parameters": {},
        "outputs": [],
    }
    binary_names = {
        output.name
        for output in parsed.requested_outputs or []
        if (output.parameters or {}).get("binary_data", parsed.binary_output)
    }
    blobs = []
    for spec, shape, flat in output_tensors(
        result, select_outputs(specs, parsed.requested_outputs, parsed.options.extra_outputs)
    ):
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": shape}
        if len(shape) < len(spec.shape):  # ragged: one JSON text per input
            entry["parameters"] = {"content_type": "json"}
        if (parsed.binary_output and not parsed.requested_outputs) or spec.name in binary_names:
            blob = v2_binary.encode_tensor(spec.datatype, flat)
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = flat
        header["outputs"].append(entry)
    if blobs:
        body, length = v2_binary.join_message(header, blobs)
        return body, v2_binary.CONTENT_TYPE, length
    return json.dumps(header).encode(), "application/json", None


def server_metadata(name: str, version: str) -> dict[str, Any]:
    return {"name": name, "version": version, "extensions": EXTENSIONS}


def model_metadata(name: str, platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> dict[str, Any]:
    def describe(spec: TensorSpec) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}

    return {
        "name": name,
        "versions": [],
        "platform": platform,
        "inputs": [describe(spec) for spec in inputs],
        "outputs": [describe(spec) for spec in outputs],
    }
