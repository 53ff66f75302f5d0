"""The Open Inference Protocol's binary tensor data extension (what tritonclient sends by default).

A binary message is a JSON header of `Inference-Header-Content-Length` bytes followed by the raw
tensors in the order of the inputs (or outputs) whose parameters carry `binary_data_size`.
BYTES elements are each a 4-byte little-endian length and the bytes; numbers are little-endian.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from handlers.errors import InvalidInput

HEADER_LENGTH = "inference-header-content-length"
CONTENT_TYPE = "application/octet-stream"

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def split_message(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON header as a dict and the binary tail."""
    if header_length is None:
        raise InvalidInput(f"a binary request needs the {HEADER_LENGTH} header")
    try:
        length = int(header_length)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH} must be an integer, got '{header_length}'") from None
    if not 0 < length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    try:
        header = json.loads(body[:length])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInput(f"the JSON header of the binary request is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise InvalidInput("the JSON header of the binary request must be an object")
    return header, body[length:]


def decode_bytes_elements(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput("binary BYTES data ends inside an element's 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput("binary BYTES data is shorter than an element's length prefix says")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def decode_tensor(datatype: str, raw: bytes) -> list[Any]:
    """A flat list of the tensor's elements."""
    if datatype == "BYTES":
        return list(decode_bytes_elements(raw))
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(f"unknown datatype '{datatype}'")
    if len(raw) % dtype.itemsize:
        raise InvalidInput(f"{len(raw)} bytes is not a whole number of {datatype} elements")
    return np.frombuffer(raw, dtype=dtype).tolist()


def encode_tensor(datatype: str, flat: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = []
        for element in flat:
            data = element if isinstance(element, bytes) else str(element).encode()
            parts.append(struct.pack("<I", len(data)) + data)
        return b"".join(parts)
    return np.asarray(flat, dtype=NUMPY_DTYPES[datatype]).tobytes()


def join_message(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int]:
    """The response body and the value of its Inference-Header-Content-Length."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(blobs), len(head)
