"""The baseline for ``pollinate serve``: a naive per-request KServe v2 REST server.

One request, one model call, no batching, no admission control: uvicorn (httptools, asyncio
loop, no access log) and Starlette, written the usual FastAPI way: the async endpoint reads the
body, then a sync function decodes it, calls ``onnxruntime.InferenceSession.run`` once and
encodes the answer, run in Starlette's thread pool.

Speaks the Open Inference Protocol's REST infer call in both forms: plain JSON (inputs'
``data`` inline) and Triton's binary tensor extension (``Inference-Header-Content-Length``:
a JSON header, then the raw little-endian tensors). The answer is binary for each output the
request asks with ``"parameters": {"binary_data": true}`` (or all outputs, when the request's
parameters say ``binary_data_output``), JSON otherwise. Bad input answers 400, an unknown
model 404.

Routes: ``POST /v2/models/{name}[/versions/{v}]/infer``, ``GET /v2/models/{name}[/ready]``,
``GET /v2/health/ready``, ``GET /v2/health/live``, ``GET /v2``.

Usage::

    python benchmarks/naive_server.py --model-file model.onnx --name cnn --port 8000 \
        [--host 127.0.0.1] [--threads N] [--port-file F]

``--port 0`` binds an ephemeral port; ``--port-file F`` gets ``{"http": port}``, written
atomically once the server is listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# KServe v2 datatypes and the numpy dtypes they map to (little-endian on the wire).
DTYPES: dict[str, str] = {
    "FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
    "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "BOOL": "?",
}  # fmt: skip
ORT_TYPES: dict[str, str] = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL",
}  # fmt: skip
V2_OF_NUMPY: dict[str, str] = {np.dtype(v).name: k for k, v in DTYPES.items()}


class BadRequestError(ValueError):
    """The request is malformed (answered 400)."""


class NaiveModel:
    """One ONNX model behind a per-request v2 infer call."""

    def __init__(
        self,
        model_file: Path,
        name: str,
        threads: int | None = None,
        torch_device: str | None = None,
    ) -> None:
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        self.name = name
        self.session = ort.InferenceSession(
            str(model_file), opts, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.torch_model: Any = None
        if torch_device is not None:
            # The same model in torch (model.safetensors + torch.json beside model.onnx), one
            # forward per request: the per-request baseline on a GPU.
            from pollinate.serving.backends import TorchBackend
            from pollinate.serving.repository import scan_model

            spec, versions = scan_model(model_file.parent.parent)
            files = versions[int(model_file.parent.name)]
            self.torch_model = TorchBackend(files, spec, device=torch_device, threads=threads or 1)  # type: ignore[arg-type]

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata document."""

        def tensor(t: Any) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in t.shape]
            return {"name": t.name, "datatype": ORT_TYPES.get(t.type, t.type), "shape": shape}

        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [tensor(t) for t in self.session.get_inputs()],
            "outputs": [tensor(t) for t in self.session.get_outputs()],
        }

    def infer(self, body: bytes, header_length: int | None) -> tuple[bytes, dict[str, str]]:
        """Decode one request, run the model once, encode the answer (body, headers)."""
        if header_length is not None:
            if not 0 <= header_length <= len(body):
                raise BadRequestError("Inference-Header-Content-Length exceeds the body")
            header_bytes, raw = body[:header_length], memoryview(body)[header_length:]
        else:
            header_bytes, raw = body, memoryview(b"")
        try:
            request = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequestError(f"request is not JSON: {e}") from e
        if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
            raise BadRequestError("request has no 'inputs' list")
        feeds = self._decode_inputs(request["inputs"], raw)
        wanted, binary = self._wanted_outputs(request)
        if self.torch_model is not None:
            out = self.torch_model.run(feeds)
            results = [out[name] for name in wanted]
        else:
            results = self.session.run(wanted, feeds)
        return self._encode(request, wanted, binary, results)

    def _decode_inputs(self, inputs: list[Any], raw: memoryview) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        offset = 0
        for spec in inputs:
            try:
                name = spec["name"]
                shape = [int(d) for d in spec["shape"]]
                datatype = spec["datatype"]
            except (KeyError, TypeError, ValueError) as e:
                raise BadRequestError(f"malformed input: {e!r}") from e
            if name not in self.inputs:
                raise BadRequestError(f"unknown input {name!r}")
            if datatype not in DTYPES:
                raise BadRequestError(f"unsupported datatype {datatype!r}")
            expected = ORT_TYPES.get(self.inputs[name].type)
            if datatype != expected:
                raise BadRequestError(f"input {name!r} must be {expected}, not {datatype}")
            model_shape = self.inputs[name].shape
            if len(shape) != len(model_shape) or any(
                isinstance(m, int) and m != s for m, s in zip(model_shape, shape, strict=True)
            ):
                raise BadRequestError(f"input {name!r} shape {shape} does not fit {model_shape}")
            if any(d < 0 for d in shape):
                raise BadRequestError(f"negative dimension in {shape}")
            count = int(np.prod(shape))
            dtype = np.dtype(DTYPES[datatype])
            size = (spec.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                size = int(size)
                if size != count * dtype.itemsize or offset + size > len(raw):
                    raise BadRequestError(f"input {name!r}: binary_data_size does not fit")
                array = np.frombuffer(raw, dtype, count, offset).reshape(shape)
                offset += size
            else:
                try:
                    array = np.asarray(spec["data"], dtype=dtype)
                except (KeyError, TypeError, ValueError) as e:
                    raise BadRequestError(f"input {name!r}: bad data: {e!r}") from e
                if array.size != count:
                    raise BadRequestError(f"input {name!r}: {array.size} values for {shape}")
                array = array.reshape(shape)
            feeds[name] = array.astype(dtype.newbyteorder("="), copy=False)
        if offset != len(raw):
            raise BadRequestError("binary data left over after the inputs")
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise BadRequestError(f"missing inputs {sorted(missing)}")
        return feeds

    def _wanted_outputs(self, request: dict[str, Any]) -> tuple[list[str], list[bool]]:
        """The outputs to compute and, for each, whether to send it binary."""
        default_binary = bool((request.get("parameters") or {}).get("binary_data_output"))
        outputs = request.get("outputs")
        if not outputs:
            return list(self.outputs), [default_binary] * len(self.outputs)
        names, binary = [], []
        for out in outputs:
            name = out.get("name") if isinstance(out, dict) else None
            if not isinstance(name, str) or name not in self.outputs:
                raise BadRequestError(f"unknown output {name!r}")
            names.append(name)
            binary.append(bool((out.get("parameters") or {}).get("binary_data", default_binary)))
        return names, binary

    def _encode(
        self,
        request: dict[str, Any],
        names: list[str],
        binary: list[bool],
        results: list[Any],
    ) -> tuple[bytes, dict[str, str]]:
        outputs, blobs = [], []
        for name, as_binary, value in zip(names, binary, results, strict=True):
            value = np.asarray(value)
            datatype = V2_OF_NUMPY[value.dtype.name]
            out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
            if as_binary:
                blob = np.ascontiguousarray(value, DTYPES[datatype]).tobytes()
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = value.ravel().tolist()
            outputs.append(out)
        doc: dict[str, Any] = {"model_name": self.name, "model_version": "1", "outputs": outputs}
        if "id" in request:
            doc["id"] = request["id"]
        header = json.dumps(doc, separators=(",", ":")).encode()
        if not blobs:
            return header, {"content-type": "application/json"}
        return b"".join([header, *blobs]), {
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        }


def build_app(model: NaiveModel) -> Starlette:
    """The Starlette app serving ``model``."""

    async def infer(request: Request) -> Response:
        if request.path_params["name"] != model.name:
            return JSONResponse({"error": f"unknown model {request.path_params['name']}"}, 404)
        body = await request.body()
        raw_length = request.headers.get("inference-header-content-length")
        try:
            header_length = int(raw_length) if raw_length is not None else None
            content, headers = await run_in_threadpool(model.infer, body, header_length)
        except (BadRequestError, ValueError, TypeError, KeyError, AttributeError) as e:
            return JSONResponse({"error": str(e)}, 400)
        return Response(content, headers=headers)

    async def ready(request: Request) -> Response:
        return Response(b"", 200)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "naive", "version": "1", "extensions": ["binary_tensor"]})

    async def model_metadata(request: Request) -> Response:
        if request.path_params["name"] != model.name:
            return JSONResponse({"error": f"unknown model {request.path_params['name']}"}, 404)
        return JSONResponse(model.metadata())

    async def model_ready(request: Request) -> Response:
        return Response(b"", 200 if request.path_params["name"] == model.name else 404)

    return Starlette(
        routes=[
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
            Route("/v2/models/{name}", model_metadata, methods=["GET"]),
            Route("/v2/health/ready", ready, methods=["GET"]),
            Route("/v2/health/live", ready, methods=["GET"]),
            Route("/v2", server_metadata, methods=["GET"]),
        ]
    )


def write_port_file(path: Path, ports: dict[str, int]) -> None:
    """Write ``ports`` as JSON to ``path`` atomically (pollinate's temp file + rename)."""
    from pollinate._atomic import atomic_write_text

    atomic_write_text(path, json.dumps(ports))


class _Server(uvicorn.Server):
    """uvicorn's server that writes the port file once it listens."""

    def __init__(self, config: uvicorn.Config, port_file: Path | None, port: int) -> None:
        super().__init__(config)
        self.port_file = port_file
        self.port = port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.port_file is not None and not self.should_exit:
            write_port_file(self.port_file, {"http": self.port})


def serve(
    model_file: Path,
    name: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
    port_file: Path | None = None,
    torch_device: str | None = None,
) -> None:
    """Serve ``model_file`` as model ``name`` until SIGINT/SIGTERM."""
    model = NaiveModel(model_file, name, threads, torch_device)
    model.session.run(None, {n: _zeros(i) for n, i in model.inputs.items()})  # warm up
    if model.torch_model is not None:
        model.torch_model.run({n: _zeros(i) for n, i in model.inputs.items()})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when their
    # proto says TCP, and without it uvicorn's two writes (headers, body) meet Nagle's
    # algorithm and the client's delayed ACK: 40 ms per response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    config = uvicorn.Config(
        build_app(model),
        http="httptools",
        loop="asyncio",
        access_log=False,
        log_level="warning",
        lifespan="off",
        timeout_keep_alive=75,
    )
    server = _Server(config, port_file, sock.getsockname()[1])
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()


def _zeros(spec: Any) -> np.ndarray:
    shape = [d if isinstance(d, int) else 1 for d in spec.shape]
    return np.zeros(shape, dtype=DTYPES[ORT_TYPES.get(spec.type, "FP32")])


def main() -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-file", type=Path, required=True)
    parser.add_argument("--name", default="cnn")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: an ephemeral port")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    parser.add_argument("--port-file", type=Path, default=None)
    parser.add_argument(
        "--torch-device", default=None, help="cpu|cuda: run the torch model (from the "
        "repository's model.safetensors beside --model-file) instead of onnxruntime",
    )  # fmt: skip
    args = parser.parse_args()
    serve(
        args.model_file,
        args.name,
        host=args.host,
        port=args.port,
        threads=args.threads,
        port_file=args.port_file,
        torch_device=args.torch_device,
    )


if __name__ == "__main__":
    main()
