"""KServe v2 gRPC: package ``inference``, service ``GRPCInferenceService``.

Implements ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``,
``ModelMetadata`` and ``ModelInfer`` (typed ``contents`` and ``raw_input_contents``; outputs
always as ``raw_output_contents``, as Triton does). Status codes: ``INVALID_ARGUMENT`` (bad
request), ``NOT_FOUND`` (model/version), ``UNAUTHENTICATED`` (token), ``RESOURCE_EXHAUSTED``
(overloaded), ``DEADLINE_EXCEEDED`` (timed out), ``UNAVAILABLE`` (version unloading).
With tracing on (``tracing.py``) ``ModelInfer`` follows the ``traceparent`` metadata and
answers with its own in the trailing metadata. Under an A/B experiment (``ab_routing.py``) a
request that names no version goes to the variant its user metadata key (``x-user-id``)
picks, as over REST; the trailing metadata names it (``x-ab-experiment``, ``x-ab-variant``),
and REST's feedback endpoint takes the request's id.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

import grpc
import numpy as np

from pollinate.log import logger
from pollinate.serving.ab_config import ABSettings
from pollinate.serving.ab_routing import Experiments
from pollinate.serving.batcher import BatcherClosedError, OverloadedError, RequestTimeoutError
from pollinate.serving.inputs import InvalidInputError
from pollinate.serving.models import ModelManager
from pollinate.serving.proto import kserve_v2_pb2 as pb
from pollinate.serving.repository import KSERVE_DTYPES, kserve_datatype
from pollinate.serving.rest import SERVER_EXTENSIONS, metadata
from pollinate.serving.tracing import RequestTrace, ServingTracer
from pollinate.serving.versions import ModelNotFoundError

__all__ = ["InferenceServicer", "add_servicer"]


# KServe datatype -> the typed-contents field that carries it.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


class _AbortError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _version(raw: str) -> int | None:
    if raw == "":
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise _AbortError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"model version must be a positive integer, got {raw!r}",
        )
    return int(raw)


def _decode(request: Any) -> dict[str, np.ndarray]:
    if not request.inputs:
        raise _AbortError(grpc.StatusCode.INVALID_ARGUMENT, "the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _AbortError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give raw contents for every input or for none",
        )
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name or f"inputs[{i}]"
        dtype = KSERVE_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r}: datatype {tensor.datatype!r} is not supported; use one of "
                + ", ".join(KSERVE_DTYPES),
            )
        shape = [int(d) for d in tensor.shape]
        if any(d < 0 or d >= 2**31 for d in shape):
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {name!r}: negative or huge dimension in {shape}",
            )
        count = 1
        for d in shape:
            count *= d
        if raw:
            blob = raw[i]
            if len(blob) != count * dtype.itemsize:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {name!r}: {len(blob)} raw bytes; shape {shape} of {tensor.datatype} "
                    f"needs {count * dtype.itemsize}",
                )
            arr = np.frombuffer(blob, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {name!r}: {tensor.datatype} can only be sent as raw_input_contents",
                )
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input {name!r}: {len(values)} values in contents.{field} for shape {shape} "
                    f"({count} expected)",
                )
            try:
                arr = np.asarray(values, dtype=dtype)
            except OverflowError as err:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"input {name!r}: {err}"
                ) from err
        if tensor.name in tensors:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, f"input {tensor.name!r} is given twice"
            )
        tensors[tensor.name] = arr.reshape(shape)
    return tensors


class InferenceServicer:
    """The service, backed by the same :class:`ModelManager` as REST."""

    def __init__(
        self,
        manager: ModelManager,
        tracer: ServingTracer | None = None,
        experiments: Experiments | None = None,
    ) -> None:
        self._manager = manager
        self._tracer = tracer
        self._ab = experiments or Experiments(ABSettings(), manager.metrics)
        self._user_key = manager.settings.ab.user_header.lower()
        token = manager.settings.token
        self._expected = f"Bearer {token}".encode() if token is not None else None

    async def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if self._expected is None:
            return
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value if isinstance(value, str) else value.decode("latin-1")
        if not hmac.compare_digest(given.encode(), self._expected):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata authorization: Bearer TOKEN)",
            )

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerReadyResponse(ready=self._manager.ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._check_auth(context)
        try:
            self._manager.get(request.name, _version(request.version))
        except (ModelNotFoundError, _AbortError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._check_auth(context)
        from pollinate import __version__

        return pb.ServerMetadataResponse(
            name="pollinate", version=__version__, extensions=SERVER_EXTENSIONS
        )

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._check_auth(context)
        try:
            meta = metadata(self._manager, request.name, _version(request.version))
        except ModelNotFoundError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except _AbortError as err:
            await context.abort(err.code, str(err))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        started = time.perf_counter()
        request_id = request.id or uuid.uuid4().hex
        await self._check_auth(context)
        code: grpc.StatusCode | None = None
        message = ""
        trace = None if self._tracer is None else self._start_trace(started, request, context)
        trailing: list[tuple[str, str]] = []
        try:
            version = _version(request.model_version)
            ab = None  # a request that names a version is not part of an experiment
            if version is None:
                ab = self._ab.route(request.model_name, self._metadata(context, self._user_key))
            target, version = (
                (ab.model, ab.version) if ab is not None else (request.model_name, version)
            )
            if self._manager.full(target, version, "grpc"):
                raise _AbortError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "overloaded: the model's queue is full; retry later",
                )
            decoding = time.perf_counter()
            tensors = _decode(request)
            if trace is not None:
                trace.phase("decode", decoding, time.perf_counter())
            outcome = await self._manager.infer(target, version, tensors, "grpc", trace)
            encoding = time.perf_counter()
            wanted = [o.name for o in request.outputs] or list(outcome.outputs)
            unknown = [n for n in wanted if n not in outcome.outputs]
            if unknown:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"unknown output {unknown[0]!r}; the model gives {', '.join(outcome.outputs)}",
                )
            response = pb.ModelInferResponse(
                model_name=outcome.model, model_version=str(outcome.version), id=request_id
            )
            for name in wanted:
                arr = outcome.outputs[name]
                datatype = kserve_datatype(arr.dtype)
                response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
                response.raw_output_contents.append(
                    np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
                )
            if trace is not None:
                trace.phase("encode", encoding, time.perf_counter())
            if ab is not None:
                self._ab.answered(ab, request_id, outcome.outputs)
                trailing += [("x-ab-experiment", ab.experiment), ("x-ab-variant", ab.variant)]
        except _AbortError as err:
            code, message = err.code, str(err)
        except (InvalidInputError, ValueError) as err:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(err)
        except ModelNotFoundError as err:
            code, message = grpc.StatusCode.NOT_FOUND, str(err)
        except OverloadedError as err:
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded: {err}; retry later"
        except BatcherClosedError as err:
            code, message = grpc.StatusCode.UNAVAILABLE, str(err)
        except RequestTimeoutError as err:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(err)
        except Exception as err:
            logger.exception("request %s to %s failed in the model", request_id, request.model_name)
            code, message = grpc.StatusCode.INTERNAL, f"the model failed: {err}"
        failed = code is not None and code in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        if failed or self._manager.settings.access_log:
            logger.log(
                logging.WARNING if failed else logging.INFO, "infer",
                extra={"request_id": request_id, "model": request.model_name, "protocol": "grpc",
                       "status": code.name if code is not None else "OK",
                       "ms": round(1e3 * (time.perf_counter() - started), 3)},
            )  # fmt: skip
        if trace is not None:
            name = code.name if code is not None else "OK"
            trace.finish(time.perf_counter(), name, error=failed, request_id=request_id)
            trailing.append(("traceparent", trace.traceparent))
        if trailing:
            context.set_trailing_metadata(tuple(trailing))
        if code is not None:
            await context.abort(code, message)
        return response

    @staticmethod
    def _metadata(context: grpc.aio.ServicerContext, wanted: str) -> str | None:
        """The value of the request's metadata key ``wanted`` (lower case), or None."""
        for key, value in context.invocation_metadata() or ():
            if key == wanted:
                return value if isinstance(value, str) else value.decode("latin-1")
        return None

    def _start_trace(
        self, started: float, request: Any, context: grpc.aio.ServicerContext
    ) -> RequestTrace | None:
        assert self._tracer is not None
        parent = state = None
        for key, value in context.invocation_metadata() or ():
            if key in ("traceparent", "tracestate"):
                text = value if isinstance(value, str) else value.decode("latin-1")
                parent, state = (text, state) if key == "traceparent" else (parent, text)
        return self._tracer.start(started, parent, state, model=request.model_name, protocol="grpc")


_METHODS = {
    "ServerLive": pb.ServerLiveRequest,
    "ServerReady": pb.ServerReadyRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ServerMetadata": pb.ServerMetadataRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelInfer": pb.ModelInferRequest,
}


def add_servicer(
    server: grpc.aio.Server,
    manager: ModelManager,
    tracer: ServingTracer | None = None,
    experiments: Experiments | None = None,
) -> None:
    """Register the service; request bytes are parsed here, so garbage is INVALID_ARGUMENT.

    (With generated handlers, a body protobuf cannot parse ends as INTERNAL inside grpc.)
    """
    from google.protobuf.message import DecodeError

    servicer = InferenceServicer(manager, tracer, experiments)

    def handler(name: str, message: Any) -> Any:
        method = getattr(servicer, name)

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                request = message.FromString(raw)
            except DecodeError as err:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"the {name} request is not valid: {err}"
                )
            reply = await method(request, context)
            return bytes(reply.SerializeToString())

        return grpc.unary_unary_rpc_method_handler(call)

    handlers = {name: handler(name, message) for name, message in _METHODS.items()}
    service = "inference.GRPCInferenceService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
