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
import itertools
import json
import logging
import secrets
import time
from typing import Any

import numpy as np

from pollinate.serving.batcher import BatcherClosedError, OverloadedError, RequestTimeoutError
from pollinate.serving.models import InvalidInputError, ModelManager, ModelNotFoundError
from pollinate.serving.repository import KSERVE_DTYPES, kserve_datatype

__all__ = ["SERVER_EXTENSIONS", "RestApp", "build_rest_app", "metadata"]

logger = logging.getLogger("pollinate")
SERVER_EXTENSIONS = ["binary_tensor_data"]
_HEADER = "inference-header-content-length"
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # one encoder, not one per json.dumps call
# the wire order of binary tensors (Triton's extension: little-endian)
_LITTLE_ENDIAN = {name: dtype.newbyteorder("<") for name, dtype in KSERVE_DTYPES.items()}


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
    if not isinstance(spec, dict):
        raise _BadRequestError(
            400, f"inputs[{index}] must be an object with name, shape, datatype, data"
        )
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise _BadRequestError(400, f"inputs[{index}].name must be a non-empty string")
    count = 1
    if isinstance(shape, list):
        for d in shape:
            if type(d) is not int or not 0 <= d < 2**31:  # bool is not a dimension either
                count = -1
                break
            count *= d
    if not isinstance(shape, list) or count < 0:
        raise _BadRequestError(
            400, f"input {name!r}: shape must be a list of non-negative integers"
        )
    if not isinstance(datatype, str) or datatype not in KSERVE_DTYPES:
        raise _BadRequestError(
            400, f"input {name!r}: datatype {datatype!r} is not supported; use one of "
            + ", ".join(KSERVE_DTYPES)
        )  # fmt: skip
    dtype = KSERVE_DTYPES[datatype]
    if blob is not None:
        if len(blob) != count * dtype.itemsize:
            raise _BadRequestError(
                400, f"input {name!r}: {len(blob)} bytes of binary data; shape {shape} of "
                f"{datatype} needs {count * dtype.itemsize}"
            )  # fmt: skip
        arr = np.frombuffer(blob, dtype=_LITTLE_ENDIAN[datatype]).astype(dtype, copy=False)
        return name, arr.reshape(shape)
    where = f"input {name!r}"
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


_Reply = tuple[int, bytes, str, list[tuple[bytes, bytes]]]
_NO_TOKEN = "missing or wrong bearer token (Authorization: Bearer TOKEN)"


def _json(status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> _Reply:
    body = _COMPACT.encode(payload).encode()
    return status, body, "application/json", headers or []


def _error(status: int, message: str, request_id: str | None = None) -> _Reply:
    headers = [(b"x-request-id", request_id.encode())] if request_id else []
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return _json(status, {"error": message}, headers)


_OVERLOADED = _error(503, "overloaded: the model's queue is full; retry later")


class RestApp:
    """The KServe v2 REST API as a plain ASGI app (the routes are few and fixed).

    Served by uvicorn; no framework sits between the socket and the batcher, which keeps
    the per-request cost low enough for thousands of requests a second on one core.
    """

    def __init__(self, manager: ModelManager) -> None:
        from pollinate import __version__

        self.manager = manager
        self._limit = manager.settings.max_request_bytes
        self._access_log = manager.settings.access_log
        token = manager.settings.token
        self._expected = f"Bearer {token}".encode() if token is not None else None
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._server_meta = {
            "name": "pollinate", "version": __version__, "extensions": SERVER_EXTENSIONS
        }  # fmt: skip

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        status, body, content_type, extra = await self._dispatch(scope, headers, receive)
        out = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": out + extra})
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self._expected is None:
            return True
        return hmac.compare_digest(headers.get(b"authorization", b""), self._expected)

    async def _dispatch(
        self, scope: dict[str, Any], headers: dict[bytes, bytes], receive: Any
    ) -> _Reply:
        method, path = scope["method"], scope["path"]
        parts = path.strip("/").split("/")
        if parts[0] != "v2":
            return _error(404, f"no endpoint {method} {path}; see /v2")
        rest = parts[1:]
        action = "metadata"
        if len(rest) >= 2 and rest[0] == "models":
            model, tail = rest[1], rest[2:]
            version_raw: str | None = None
            if len(tail) >= 2 and tail[0] == "versions":
                version_raw, tail = tail[1], tail[2:]
            if tail in ([], ["ready"], ["infer"]):
                action = tail[0] if tail else "metadata"
                wanted = "POST" if action == "infer" else "GET"
                if method != wanted:
                    return _error(405, f"{method} is not allowed on {path}")
                if action == "infer":
                    return await self._infer(model, version_raw, headers, receive)
                if not self._authorized(headers):
                    return _error(401, _NO_TOKEN)
                try:
                    version = _version(version_raw)
                    if action == "ready":
                        self.manager.get(model, version)
                        return _json(200, {"name": model, "ready": True})
                    return _json(200, metadata(self.manager, model, version))
                except _BadRequestError as err:
                    return _error(err.status, str(err))
                except ModelNotFoundError as err:
                    return _error(404, str(err))
        elif rest in ([], ["health", "live"], ["health", "ready"]):
            if method != "GET":
                return _error(405, f"{method} is not allowed on {path}")
            if rest == ["health", "live"]:
                return _json(200, {"live": True})
            if rest == ["health", "ready"]:
                ok = self.manager.ready()
                return _json(200 if ok else 503, {"ready": ok})
            if not self._authorized(headers):
                return _error(401, _NO_TOKEN)
            return _json(200, self._server_meta)
        return _error(404, f"no endpoint {method} {path}; see /v2")

    async def _body(self, headers: dict[bytes, bytes], receive: Any) -> bytes:
        limit = self._limit
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _BadRequestError(413, f"the request body is over the {limit}-byte limit")
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _BadRequestError(400, "the client went away before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BadRequestError(413, f"the request body is over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _infer(
        self, model: str, version_raw: str | None, headers: dict[bytes, bytes], receive: Any
    ) -> _Reply:
        started = time.perf_counter()
        given_id = headers.get(b"x-request-id")
        request_id = (
            given_id.decode("latin-1") if given_id else f"{self._id_prefix}-{next(self._ids)}"
        )
        status = 200
        try:
            if not self._authorized(headers):
                raise _BadRequestError(401, _NO_TOKEN)
            version = _version(version_raw)
            if self.manager.full(model, version, "http"):
                return _OVERLOADED
            body = await self._body(headers, receive)
            header_length = headers.get(_HEADER.encode())
            parsed, tensors = _parse_infer(
                body, header_length.decode("latin-1") if header_length is not None else None
            )
            if isinstance(parsed.get("id"), str):
                request_id = parsed["id"]
            outcome = await self.manager.infer(model, version, tensors, "http")
            reply = _encode(parsed, outcome.model, outcome.version, outcome.outputs, request_id)
        except _BadRequestError as err:
            status, reply = err.status, _error(err.status, str(err), request_id)
        except (InvalidInputError, ValueError) as err:
            status, reply = 400, _error(400, str(err), request_id)
        except ModelNotFoundError as err:
            status, reply = 404, _error(404, str(err), request_id)
        except OverloadedError as err:
            status, reply = 503, _error(503, f"overloaded: {err}; retry later", request_id)
        except BatcherClosedError as err:
            status, reply = 503, _error(503, str(err), request_id)
        except RequestTimeoutError as err:
            status, reply = 504, _error(504, str(err), request_id)
        except Exception as err:
            logger.exception("request %s to %s failed in the model", request_id, model)
            status, reply = 500, _error(500, f"the model failed: {err}", request_id)
        if status >= 500 or self._access_log:
            logger.log(
                logging.WARNING if status >= 500 else logging.INFO, "infer",
                extra={"request_id": request_id, "model": model, "status": status,
                       "protocol": "http", "ms": round(1e3 * (time.perf_counter() - started), 3)},
            )  # fmt: skip
        return reply


def build_rest_app(manager: ModelManager) -> RestApp:
    """The ASGI app of the KServe v2 REST API over ``manager``."""
    return RestApp(manager)


def _encode(
    request: dict[str, Any],
    model: str,
    version: int,
    outputs: dict[str, np.ndarray],
    request_id: str,
) -> _Reply:
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
    text = _COMPACT.encode(header).encode()
    headers = [(b"x-request-id", request_id.encode("latin-1", "replace"))]
    if not blobs:
        return 200, text, "application/json", headers
    headers.append((b"inference-header-content-length", str(len(text)).encode()))
    return 200, b"".join([text, *blobs]), "application/octet-stream", headers
