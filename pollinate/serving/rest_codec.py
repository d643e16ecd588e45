"""The KServe v2 REST wire format of an inference: the request body in, the response out.

:func:`parse_infer` decodes a request body: a JSON object with an ``inputs`` list whose
tensors carry ``data``, or, with Triton's binary tensor data extension, a JSON header of
``Inference-Header-Content-Length`` bytes followed by each input whose
``parameters.binary_data_size`` is set, in order (little-endian). :func:`encode_infer` encodes
the outputs the same way, in binary when the request asks (``binary_data`` on an output, or
``binary_data_output``). A malformed request raises :class:`BadRequestError` with its HTTP
status; ``rest.py`` serves the endpoints.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pollinate.serving.repository import KSERVE_DTYPES, kserve_datatype

__all__ = [
    "COMPACT_JSON",
    "HEADER_LENGTH",
    "BadRequestError",
    "Reply",
    "encode_infer",
    "parse_infer",
]

# (status, body, content type, extra headers) of one HTTP response
Reply = tuple[int, bytes, str, list[tuple[bytes, bytes]]]
HEADER_LENGTH = "inference-header-content-length"
COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder, not one per json.dumps
# the wire order of binary tensors (Triton's extension: little-endian)
_LITTLE_ENDIAN = {name: dtype.newbyteorder("<") for name, dtype in KSERVE_DTYPES.items()}


class BadRequestError(Exception):
    """A request the REST layer answers with ``status`` (400, 401, 413) and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _decode_tensor(spec: Any, index: int, blob: bytes | None) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise BadRequestError(
            400, f"inputs[{index}] must be an object with name, shape, datatype, data"
        )
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise BadRequestError(400, f"inputs[{index}].name must be a non-empty string")
    count = 1
    if isinstance(shape, list):
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**31:  # bool is not a dimension either
                count = -1
                break
            count *= d
    if not isinstance(shape, list) or count < 0:
        raise BadRequestError(400, f"input {name!r}: shape must be a list of non-negative integers")
    if not isinstance(datatype, str) or datatype not in KSERVE_DTYPES:
        raise BadRequestError(
            400, f"input {name!r}: datatype {datatype!r} is not supported; use one of "
            + ", ".join(KSERVE_DTYPES)
        )  # fmt: skip
    dtype = KSERVE_DTYPES[datatype]
    if blob is not None:
        if len(blob) != count * dtype.itemsize:
            raise BadRequestError(
                400, f"input {name!r}: {len(blob)} bytes of binary data; shape {shape} of "
                f"{datatype} needs {count * dtype.itemsize}"
            )  # fmt: skip
        arr = np.frombuffer(blob, dtype=_LITTLE_ENDIAN[datatype]).astype(dtype, copy=False)
        return name, arr.reshape(shape)
    where = f"input {name!r}"
    if "data" not in spec:
        raise BadRequestError(400, f"{where}: no `data` and no binary_data_size")
    try:
        arr = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as err:
        raise BadRequestError(
            400, f"{where}: data is not a list of {datatype} values ({err})"
        ) from err
    if arr.size != count:
        raise BadRequestError(
            400, f"{where}: {arr.size} values for shape {shape} ({count} expected)"
        )
    return name, arr.reshape(shape)


def parse_infer(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The request's JSON object and its input tensors by name; ``header_length`` is the
    ``Inference-Header-Content-Length`` header (None: the body is all JSON)."""
    json_end = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequestError(
                400, f"Inference-Header-Content-Length {header_length!r} is not a byte count "
                f"within the {len(body)}-byte body"
            )  # fmt: skip
        json_end = int(header_length)
    try:
        request = json.loads(body[:json_end])
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequestError(400, f"the request body is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise BadRequestError(400, "the request body must be a JSON object with an `inputs` list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequestError(400, "`inputs` must be a non-empty list of tensors")
    offset = json_end
    tensors: dict[str, np.ndarray] = {}
    for i, spec in enumerate(inputs):
        blob = None
        params = spec.get("parameters") if isinstance(spec, dict) else None
        if isinstance(params, dict) and "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequestError(400, f"inputs[{i}].parameters.binary_data_size must be >= 0")
            if offset + size > len(body):
                raise BadRequestError(
                    400, f"inputs[{i}] announces {size} binary bytes; the body has "
                    f"{len(body) - offset} left"
                )  # fmt: skip
            blob = body[offset : offset + size]
            offset += size
        name, arr = _decode_tensor(spec, i, blob)
        if name in tensors:
            raise BadRequestError(400, f"input {name!r} is given twice")
        tensors[name] = arr
    if offset != len(body):
        raise BadRequestError(
            400, f"{len(body) - offset} bytes follow the last input's binary data"
        )
    return request, tensors


def _wants_binary(request: dict[str, Any], output: str) -> bool:
    params = request.get("parameters")
    default = isinstance(params, dict) and bool(params.get("binary_data_output", False))
    for spec in request.get("outputs") or []:
        if isinstance(spec, dict) and spec.get("name") == output:
            p = spec.get("parameters")
            if isinstance(p, dict) and "binary_data" in p:
                return bool(p["binary_data"])
    return default


def encode_infer(
    request: dict[str, Any],
    model: str,
    version: int,
    outputs: dict[str, np.ndarray],
    request_id: str,
) -> Reply:
    """The 200 reply of an inference: the outputs the request names (every output when it
    names none), each as JSON ``data`` or, when asked, as binary after the JSON header."""
    wanted = [str(o.get("name")) for o in request.get("outputs") or [] if isinstance(o, dict)]
    names = wanted or list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise BadRequestError(
            400, f"unknown output {unknown[0]!r}; the model gives {', '.join(outputs)}"
        )
    header: dict[str, Any] = {"model_name": model, "model_version": str(version), "id": request_id}
    blobs: list[bytes] = []
    tensors = []
    for name in names:
        arr = outputs[name]
        entry: dict[str, Any] = {
            "name": name, "datatype": kserve_datatype(arr.dtype), "shape": list(arr.shape)
        }  # fmt: skip
        if _wants_binary(request, name):
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        tensors.append(entry)
    header["outputs"] = tensors
    text = COMPACT_JSON.encode(header).encode()
    headers = [(b"x-request-id", request_id.encode("latin-1", "replace"))]
    if not blobs:
        return 200, text, "application/json", headers
    headers.append((b"inference-header-content-length", str(len(text)).encode()))
    return 200, b"".join([text, *blobs]), "application/octet-stream", headers
