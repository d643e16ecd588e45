"""KServe v2 REST (Open Inference Protocol), with Triton's binary tensor data extension.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``,
``GET /v2/models/{name}[/versions/{v}]``, ``GET .../ready``, ``POST .../infer``, and
``POST /v2/models/{name}/feedback`` (an A/B experiment's outcomes, ``ab_routing.py``).
Errors are ``{"error": "..."}`` with 400 (bad request), 401 (token), 404 (model/version),
413 (too large), 503 (overloaded or not ready) or 504 (timed out).

Under an A/B experiment a request that names no version is answered by the variant its
user header (``x-user-id``; without it, a random draw) picks; the reply's ``x-ab-experiment``
and ``x-ab-variant`` headers say which, and its ``id`` is what feedback refers to.

Binary tensor data: the body is a JSON header of ``Inference-Header-Content-Length`` bytes,
then each input whose ``parameters.binary_data_size`` is set, in order. Outputs are sent the
same way when the request asks (``binary_data`` on an output or ``binary_data_output``).
This module routes, authorises and answers; the body's wire format is ``rest_codec.py``.
With tracing on (``tracing.py``) an inference request's W3C ``traceparent`` header is
followed and its reply carries a ``traceparent`` header naming the server's span.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import secrets
import time
from typing import Any

from pollinate.log import logger
from pollinate.serving.ab_config import ABSettings
from pollinate.serving.ab_routing import Experiments
from pollinate.serving.batcher import BatcherClosedError, OverloadedError, RequestTimeoutError
from pollinate.serving.inputs import InvalidInputError
from pollinate.serving.models import ModelManager
from pollinate.serving.rest_codec import (
    COMPACT_JSON,
    HEADER_LENGTH,
    BadRequestError,
    Reply,
    encode_infer,
    parse_infer,
)
from pollinate.serving.tracing import RequestTrace, ServingTracer
from pollinate.serving.versions import ModelNotFoundError

__all__ = ["SERVER_EXTENSIONS", "RestApp", "build_rest_app", "metadata"]

SERVER_EXTENSIONS = ["binary_tensor_data"]


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
        raise BadRequestError(400, f"model version must be a positive integer, got {raw!r}")
    return int(raw)


_NO_TOKEN = "missing or wrong bearer token (Authorization: Bearer TOKEN)"


def _json(status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> Reply:
    body = COMPACT_JSON.encode(payload).encode()
    return status, body, "application/json", headers or []


def _error(status: int, message: str, request_id: str | None = None) -> Reply:
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

    def __init__(
        self,
        manager: ModelManager,
        experiments: Experiments | None = None,
        tracer: ServingTracer | None = None,
    ) -> None:
        from pollinate import __version__

        self.manager = manager
        self._tracer = tracer
        self._ab = experiments or Experiments(ABSettings(), manager.metrics)
        self._user_header = manager.settings.ab.user_header.encode()
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
    ) -> Reply:
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
            if tail == ["feedback"] and version_raw is None:
                if method != "POST":
                    return _error(405, f"{method} is not allowed on {path}")
                return await self._feedback(model, headers, receive)
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
                except BadRequestError as err:
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
            raise BadRequestError(413, f"the request body is over the {limit}-byte limit")
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequestError(400, "the client went away before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequestError(413, f"the request body is over the {limit}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _feedback(self, model: str, headers: dict[bytes, bytes], receive: Any) -> Reply:
        if not self._authorized(headers):
            return _error(401, _NO_TOKEN)
        try:
            body = await self._body(headers, receive)
        except BadRequestError as err:
            return _error(err.status, str(err))
        status, reply = self._ab.feedback(model, body)
        if self._access_log:
            logger.info("feedback", extra={"request_id": reply.get("id"), "model": model,
                                           "status": status, "protocol": "http"})  # fmt: skip
        return _json(status, reply)

    async def _infer(
        self, model: str, version_raw: str | None, headers: dict[bytes, bytes], receive: Any
    ) -> Reply:
        started = time.perf_counter()
        given_id = headers.get(b"x-request-id")
        request_id = (
            given_id.decode("latin-1") if given_id else f"{self._id_prefix}-{next(self._ids)}"
        )
        status = 200
        trace = None
        if self._tracer is not None:
            parent, state = headers.get(b"traceparent"), headers.get(b"tracestate")
            trace = self._tracer.start(
                started, parent.decode("latin-1") if parent else None,
                state.decode("latin-1") if state else None, model=model, protocol="http",
            )  # fmt: skip
        try:
            if not self._authorized(headers):
                raise BadRequestError(401, _NO_TOKEN)
            version = _version(version_raw)
            ab = None  # a request that names a version is not part of an experiment
            if version is None:
                user = headers.get(self._user_header)
                ab = self._ab.route(model, user.decode("latin-1") if user else None)
            target, target_version = (ab.model, ab.version) if ab is not None else (model, version)
            if self.manager.full(target, target_version, "http"):
                return (
                    _OVERLOADED if trace is None else _traced(trace, 503, _OVERLOADED, request_id)
                )
            decoding = time.perf_counter()
            body = await self._body(headers, receive)
            header_length = headers.get(HEADER_LENGTH.encode())
            parsed, tensors = parse_infer(
                body, header_length.decode("latin-1") if header_length is not None else None
            )
            if isinstance(parsed.get("id"), str):
                request_id = parsed["id"]
            if trace is not None:
                trace.phase("decode", decoding, time.perf_counter())
            outcome = await self.manager.infer(target, target_version, tensors, "http", trace)
            encoding = time.perf_counter()
            reply = encode_infer(
                parsed, outcome.model, outcome.version, outcome.outputs, request_id
            )
            if trace is not None:
                trace.phase("encode", encoding, time.perf_counter())
            if ab is not None:
                self._ab.answered(ab, request_id, outcome.outputs)
                reply[3].append((b"x-ab-experiment", ab.experiment.encode()))
                reply[3].append((b"x-ab-variant", ab.variant.encode()))
        except BadRequestError as err:
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
        return reply if trace is None else _traced(trace, status, reply, request_id)


def _traced(trace: RequestTrace, status: int, reply: Reply, request_id: str) -> Reply:
    """End the request's span; the reply carries its ``traceparent``."""
    trace.finish(time.perf_counter(), str(status), error=status >= 500, request_id=request_id)
    return (*reply[:3], [*reply[3], (b"traceparent", trace.traceparent.encode())])


def build_rest_app(
    manager: ModelManager,
    experiments: Experiments | None = None,
    tracer: ServingTracer | None = None,
) -> RestApp:
    """The ASGI app of the KServe v2 REST API over ``manager`` (and its A/B experiments),
    tracing requests with ``tracer`` when given."""
    return RestApp(manager, experiments, tracer)
