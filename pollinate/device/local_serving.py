"""Local inference on the device from the installed bundle (``pollinate edge run --serve-port``).

A small HTTP server on loopback (the standard library's ``ThreadingHTTPServer``; a device
needs no web framework) answers from the bundle in service in the device's bundle store:

- ``GET /v1/health``: ``{"status": "ok", "bundle": NAME | null}``
- ``GET /v1/bundle``: the bundle in service (name, model, version, installed, previous)
- ``POST /v1/predict`` with ``{"inputs": [...]}``: one sample or a batch, as the edge
  runtime takes them (raw uint8 images with ``"dtype": "uint8"``, else float32 already
  preprocessed); answers ``{"bundle", "outputs" (logits), "labels"}``.

When ``current.json`` changes (a new bundle was installed, or rolled back), the next request
loads the new bundle; requests already running finish on the old one. Errors are
``{"error": ...}`` with 400 (bad input), 404, 413 (body over the limit) or 503 (no bundle
installed yet). Nothing about the inputs is logged.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.device.bundles import BundleStore
from pollinate.edge_runtime import BundleError, EdgeModel, InputError, load_bundle

__all__ = ["LocalInference"]

logger = logging.getLogger("pollinate")
MAX_BODY = 8 << 20


class _RefusalError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class LocalInference:
    """The loaded model follows the store's ``current.json``; :meth:`start` serves HTTP."""

    def __init__(
        self,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int = 1,
        public_key: Path | None = None,
    ) -> None:
        self.store = BundleStore(state_dir)
        self.threads = threads
        self.public_key = public_key
        self._lock = threading.Lock()
        self._loaded: tuple[str, EdgeModel] | None = None
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pollinate-local-inference", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            if self._loaded is not None:
                self._loaded[1].close()
                self._loaded = None

    # ------------------------------------------------------------------ model
    def model(self) -> tuple[str, EdgeModel]:
        """The model of the bundle in service (loaded again when the pointer moved)."""
        current = self.store.current()
        if current is None:
            raise _RefusalError(HTTPStatus.SERVICE_UNAVAILABLE, "no bundle is installed yet")
        with self._lock:
            if self._loaded is None or self._loaded[0] != current.name:
                try:
                    model = load_bundle(current, public_key=self.public_key, threads=self.threads)
                except BundleError as err:
                    raise _RefusalError(
                        HTTPStatus.SERVICE_UNAVAILABLE, f"bundle {current.name}: {err}"
                    ) from err
                old, self._loaded = self._loaded, (current.name, model)
                if old is not None:
                    old[1].close()
                logger.info("serving bundle %s", current.name)
            return self._loaded

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        if "inputs" not in body:
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST, 'the body needs "inputs": a sample or a batch'
            )
        dtype = np.uint8 if body.get("dtype") == "uint8" else np.float32
        try:
            x = np.asarray(body["inputs"], dtype=dtype)
        except (TypeError, ValueError, OverflowError) as err:
            raise _RefusalError(
                HTTPStatus.BAD_REQUEST, f'"inputs" is not a numeric array ({err})'
            ) from None
        name, model = self.model()
        try:
            logits = model.predict(x)
        except InputError as err:
            raise _RefusalError(HTTPStatus.BAD_REQUEST, str(err)) from None
        batch = np.atleast_2d(logits)
        answer: dict[str, Any] = {"bundle": name, "outputs": logits.tolist()}
        if model.task == "regression":
            answer["values"] = batch[:, 0].tolist()
        else:
            answer["labels"] = model.labels_for(batch)
        return answer

    # ------------------------------------------------------------------ HTTP
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        service = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pollinate-edge"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # request lines are not logged: they say nothing useful here

            def _answer(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/health":
                    current = service.store.current()
                    bundle = current.name if current is not None else None
                    self._answer(HTTPStatus.OK, {"status": "ok", "bundle": bundle})
                elif self.path == "/v1/bundle":
                    info = service.store.describe()
                    if info is None:
                        self._answer(HTTPStatus.NOT_FOUND, {"error": "no bundle is installed"})
                    else:
                        self._answer(HTTPStatus.OK, info)
                else:
                    self._answer(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                if self.path != "/v1/predict":
                    self._answer(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        self.close_connection = True
                        raise _RefusalError(
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"the body is {length} bytes, over the {MAX_BODY} limit",
                        )
                    try:
                        body = json.loads(self.rfile.read(length) or b"null")
                    except ValueError as err:
                        raise _RefusalError(
                            HTTPStatus.BAD_REQUEST, f"the body is not JSON ({err})"
                        ) from None
                    if not isinstance(body, dict):
                        raise _RefusalError(
                            HTTPStatus.BAD_REQUEST, "the body must be a JSON object"
                        )
                    self._answer(HTTPStatus.OK, service.predict(body))
                except _RefusalError as err:
                    self._answer(err.status, {"error": str(err)})

        return Handler
