"""For the tracing tests: an OTLP/HTTP trace receiver on loopback and a tiny repository.

:class:`OtlpReceiver` is a real collector endpoint as far as an exporter can tell: it takes
``POST /v1/traces`` (protobuf, gzip or not), decodes the body with opentelemetry-proto's
``ExportTraceServiceRequest`` and answers 200 with an empty ``ExportTraceServiceResponse``.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

MODEL = "tiny"


def tiny_repository(root: Path) -> Path:
    """``root/repo``: model ``tiny`` version 1, x (N, 4) FP32 -> logits (N, 3) = x @ w."""
    repo = root / "repo"
    (repo / MODEL / "1").mkdir(parents=True)
    (repo / MODEL / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
    )
    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, repo / MODEL / "1" / "model.onnx")
    return repo


def infer_body(rows: int = 1) -> dict[str, Any]:
    """A KServe v2 JSON request for ``tiny``."""
    data = [float(i % 4) for i in range(4 * rows)]
    return {"inputs": [{"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": data}]}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector got it (ids as hex)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    links: tuple[str, ...]
    attributes: dict[str, Any]


class OtlpReceiver:
    """``with OtlpReceiver() as otlp:``: a collector on ``otlp.endpoint`` (no path)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.posts: list[str] = []  # the paths posted to
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver._add(self.path, request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _add(self, path: str, request: ExportTraceServiceRequest) -> None:
        with self._lock:
            self.posts.append(path)
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value for a in resource_spans.resource.attributes}
                service = attrs["service.name"].string_value if "service.name" in attrs else ""
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append(
                            ReceivedSpan(
                                service=service,
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_id=span.parent_span_id.hex(),
                                links=tuple(link.span_id.hex() for link in span.links),
                                attributes={a.key: _value(a.value) for a in span.attributes},
                            )
                        )

    def wait_for(
        self, names: set[str], traces: Collection[str] = (), timeout: float = 20.0
    ) -> list[ReceivedSpan]:
        """The spans received once spans of every name in ``names`` and of every trace id in
        ``traces`` have arrived (AssertionError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if names <= {s.name for s in spans} and set(traces) <= {s.trace_id for s in spans}:
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the collector got {sorted({s.name for s in spans})} of "
                    f"{len({s.trace_id for s in spans})} traces, not {names} of {set(traces)}"
                )
            time.sleep(0.05)

    def __enter__(self) -> OtlpReceiver:
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None
