"""KServe v2 REST (Open Inference Protocol), with Triton's binary tensor data extension.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}[/versions/{v}]``, ``GET .../ready``, ``POST .../infer``.
Errors are ``{"error": "..."}`` with 400 (bad request), 401 (token), 404 (model/version),
413 (too large), 503 (overloaded or not ready) or 504 (timed out).

Binary tensor data: the body is a JSON header of ``Inference-Header-Content-Length`` bytes,
then each input whose ``parameters.binary_data_size`` is set, in order. Outputs are sent the
same way when the request asks (``binary_data`` on an output or ``binary_data_output``).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pollinate.serving.batcher import BatcherClosedError, OverloadedError, RequestTimeoutError
from pollinate.serving.models import InvalidInputError, ModelManager, ModelNotFoundError
from pollinate.serving.repository import KSERVE_DTYPES

__all__ = ["SERVER_EXTENSIONS", "build_rest_app", "metadata"]

logger = logging.getLogger("pollinate")
SERVER_EXTENSIONS = ["binary_tensor_data"]
_HEADER = "inference-header-content-length"


class _BadRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def metadata(manager: ModelManager, model: str, version: int | None) -> dict[str, Any]:
    """The KServe model-metadata object (shared by REST and gRPC)."""
    loaded = manager.get(model, version)
    spec = loaded.spec
    return {
        "name": spec.name,
        "versions": [str(v) for v in manager.models()[spec.name]],
        "platform": spec.platform,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in spec.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in spec.outputs
        ],
    }


def _version(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise _BadRequestError(400, f"model version must be a positive integer, got {raw!r}")
    return int(raw)


def _decode_tensor(spec: Any, index: int, blob: bytes | None) -> tuple[str, np.ndarray]:
    where = f"inputs[{index}]"
    if not isinstance(spec, dict):
        raise _BadRequestError(400, f"{where} must be an object with name, shape, datatype, data")
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise _BadRequestError(400, f"{where}.name must be a non-empty string")
    where = f"input {name!r}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
    ):
        raise _BadRequestError(400, f"{where}: shape must be a list of non-negative integers")
    if datatype not in KSERVE_DTYPES:
        raise _BadRequestError(
            400, f"{where}: datatype {datatype!r} is not supported; use one of "
            + ", ".join(KSERVE_DTYPES)
        )  # fmt: skip
    dtype = KSERVE_DTYPES[datatype]
    count = 1
    for d in shape:
        count *= d
    if blob is not None:
        if len(blob) != count * dtype.itemsize:
            raise _BadRequestError(
                400, f"{where}: {len(blob)} bytes of binary data; shape {shape} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )  # fmt: skip
        arr = np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return name, arr.reshape(shape)
    if "data" not in spec:
        raise _BadRequestError(400, f"{where}: no `data` and no binary_data_size")
    try:
        arr = np.asarray(spec["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as err:
        raise _BadRequestError(
            400, f"{where}: data is not a list of {datatype} values ({err})"
        ) from err
    if arr.size != count:
        raise _BadRequestError(
            400, f"{where}: {arr.size} values for shape {shape} ({count} expected)"
        )
    return name, arr.reshape(shape)


def _parse_infer(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    json_end = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise _BadRequestError(
                400, f"Inference-Header-Content-Length {header_length!r} is not a byte count "
                f"within the {len(body)}-byte body"
            )  # fmt: skip
        json_end = int(header_length)
    try:
        request = json.loads(body[:json_end])
    except (ValueError, UnicodeDecodeError) as err:
        raise _BadRequestError(400, f"the request body is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise _BadRequestError(400, "the request body must be a JSON object with an `inputs` list")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _BadRequestError(400, "`inputs` must be a non-empty list of tensors")
    offset = json_end
    tensors: dict[str, np.ndarray] = {}
    for i, spec in enumerate(inputs):
        blob = None
        params = spec.get("parameters") if isinstance(spec, dict) else None
        if isinstance(params, dict) and "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _BadRequestError(400, f"inputs[{i}].parameters.binary_data_size must be >= 0")
            if offset + size > len(body):
                raise _BadRequestError(
                    400, f"inputs[{i}] announces {size} binary bytes; the body has "
                    f"{len(body) - offset} left"
                )  # fmt: skip
            blob = body[offset : offset + size]
            offset += size
        name, arr = _decode_tensor(spec, i, blob)
        if name in tensors:
            raise _BadRequestError(400, f"input {name!r} is given twice")
        tensors[name] = arr
    if offset != len(body):
        raise _BadRequestError(
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


def build_rest_app(manager: ModelManager) -> Starlette:
    """The Starlette app of the KServe v2 REST API."""
    settings = manager.settings
    token = settings.token
    limit = settings.max_request_bytes
    from pollinate import __version__

    def _authorized(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def _error(status: int, message: str, request_id: str | None = None) -> JSONResponse:
        headers = {"x-request-id": request_id} if request_id else None
        if status == 503:
            headers = {**(headers or {}), "retry-after": "1"}
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        ok = manager.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        if not _authorized(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        return JSONResponse(
            {"name": "pollinate", "version": __version__, "extensions": SERVER_EXTENSIONS}
        )

    async def model_metadata(request: Request) -> Response:
        if not _authorized(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        try:
            version = _version(request.path_params.get("version"))
            return JSONResponse(metadata(manager, request.path_params["model"], version))
        except _BadRequestError as err:
            return _error(err.status, str(err))
        except ModelNotFoundError as err:
            return _error(404, str(err))

    async def model_ready(request: Request) -> Response:
        if not _authorized(request):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        try:
            version = _version(request.path_params.get("version"))
            manager.get(request.path_params["model"], version)
        except _BadRequestError as err:
            return _error(err.status, str(err))
        except ModelNotFoundError as err:
            return _error(404, str(err))
        return JSONResponse({"name": request.path_params["model"], "ready": True})

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        model = request.path_params["model"]
        status = 200
        try:
            if not _authorized(request):
                raise _BadRequestError(
                    401, "missing or wrong bearer token (Authorization: Bearer TOKEN)"
                )
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise _BadRequestError(413, f"the request body is over the {limit}-byte limit")
            chunks = []
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _BadRequestError(413, f"the request body is over the {limit}-byte limit")
                chunks.append(chunk)
            body = b"".join(chunks)
            version = _version(request.path_params.get("version"))
            parsed, tensors = _parse_infer(body, request.headers.get(_HEADER))
            if isinstance(parsed.get("id"), str):
                request_id = parsed["id"]
            outcome = await manager.infer(model, version, tensors, "http")
            response = _encode(parsed, outcome.model, outcome.version, outcome.outputs, request_id)
        except _BadRequestError as err:
            status, response = err.status, _error(err.status, str(err), request_id)
        except (InvalidInputError, ValueError) as err:
            status, response = 400, _error(400, str(err), request_id)
        except ModelNotFoundError as err:
            status, response = 404, _error(404, str(err), request_id)
        except OverloadedError as err:
            status, response = 503, _error(503, f"overloaded: {err}; retry later", request_id)
        except BatcherClosedError as err:
            status, response = 503, _error(503, str(err), request_id)
        except RequestTimeoutError as err:
            status, response = 504, _error(504, str(err), request_id)
        except Exception as err:
            logger.exception("request %s to %s failed in the model", request_id, model)
            status, response = 500, _error(500, f"the model failed: {err}", request_id)
        if status >= 500 or settings.access_log:
            logger.log(
                logging.WARNING if status >= 500 else logging.INFO, "infer",
                extra={"request_id": request_id, "model": model, "status": status,
                       "protocol": "http", "ms": round(1e3 * (time.perf_counter() - started), 3)},
            )  # fmt: skip
        return response

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(404, f"no endpoint {request.method} {request.url.path}; see /v2")

    async def bad_method(request: Request, exc: Exception) -> Response:
        return _error(405, f"{request.method} is not allowed on {request.url.path}")

    base = "/v2/models/{model}"
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route(base, model_metadata, methods=["GET"]),
        Route(base + "/versions/{version}", model_metadata, methods=["GET"]),
        Route(base + "/ready", model_ready, methods=["GET"]),
        Route(base + "/versions/{version}/ready", model_ready, methods=["GET"]),
        Route(base + "/infer", infer, methods=["POST"]),
        Route(base + "/versions/{version}/infer", infer, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method})


def _encode(
    request: dict[str, Any],
    model: str,
    version: int,
    outputs: dict[str, np.ndarray],
    request_id: str,
) -> Response:
    wanted = [str(o.get("name")) for o in request.get("outputs") or [] if isinstance(o, dict)]
    names = wanted or list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise _BadRequestError(
            400, f"unknown output {unknown[0]!r}; the model gives {', '.join(outputs)}"
        )
    header: dict[str, Any] = {"model_name": model, "model_version": str(version), "id": request_id}
    blobs: list[bytes] = []
    tensors = []
    for name in names:
        arr = outputs[name]
        datatype = next(k for k, v in KSERVE_DTYPES.items() if v == arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if _wants_binary(request, name):
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        tensors.append(entry)
    header["outputs"] = tensors
    text = json.dumps(header, separators=(",", ":")).encode()
    headers = {"x-request-id": request_id}
    if not blobs:
        return Response(text, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(text))
    return Response(
        b"".join([text, *blobs]), media_type="application/octet-stream", headers=headers
    )
