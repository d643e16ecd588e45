"""Inference backends behind one small interface: onnxruntime, OpenVINO, LiteRT.

Each runtime is imported lazily, when a model is opened with it, and only that one: a device
with just onnxruntime installed never imports (or needs) OpenVINO. Runtimes are imported
through :func:`importlib.import_module`, so none of them is needed to import this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pollinate.edge_runtime.errors import BundleError, RuntimeMissingError

__all__ = [
    "PREFERENCE",
    "RUNTIME_INFO",
    "Backend",
    "LiteRtBackend",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "RuntimeInfo",
    "available_runtimes",
    "import_runtime",
    "open_backend",
    "runtime_installed",
]


@dataclass(frozen=True)
class RuntimeInfo:
    """What one inference runtime is called where: manifest, import, PyPI, pollinate extra."""

    name: str
    module: str
    package: str
    extra: str

    @property
    def install_hint(self) -> str:
        """The pip command that installs this runtime with pollinate."""
        return f'pip install "pollinate[{self.extra}]"'


RUNTIME_INFO: dict[str, RuntimeInfo] = {
    "onnxruntime": RuntimeInfo("onnxruntime", "onnxruntime", "onnxruntime", "edge"),
    "openvino": RuntimeInfo("openvino", "openvino", "openvino", "openvino"),
    "litert": RuntimeInfo("litert", "ai_edge_litert", "ai-edge-litert", "tflite"),
}
PREFERENCE: tuple[str, ...] = ("onnxruntime", "openvino", "litert")


def runtime_installed(runtime: str) -> bool:
    """Whether the runtime's module can be found, without importing it."""
    info = RUNTIME_INFO[runtime]
    try:
        return importlib.util.find_spec(info.module) is not None
    except (ImportError, ValueError):
        return False


def available_runtimes() -> list[str]:
    """Installed runtimes, in preference order (nothing is imported)."""
    return [name for name in PREFERENCE if runtime_installed(name)]


def import_runtime(runtime: str, module: str | None = None) -> Any:
    """Import a runtime (or one of its submodules); a missing one is a RuntimeMissingError."""
    info = RUNTIME_INFO[runtime]
    try:
        return importlib.import_module(module or info.module)
    except ImportError as err:
        raise RuntimeMissingError(
            f"the {info.name} runtime ({info.package}) is not installed or does not import "
            f"({err}); install it with: {info.install_hint}"
        ) from err


class Backend(ABC):
    """One opened model. ``run`` takes a full batch in the model's input layout and dtype."""

    runtime: ClassVar[str]
    input_name: str
    input_dtype: np.dtype[Any]
    output_name: str

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch and return the selected output as a new array."""

    def close(self) -> None:  # noqa: B027 - an optional hook, most runtimes free on GC
        """Release the runtime's resources (optional)."""


def _pick(names: list[str], wanted: str | None) -> int:
    """Index of ``wanted`` among ``names``, else 0 (the first output is the logits)."""
    if wanted is not None and wanted in names:
        return names.index(wanted)
    return 0


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


class OnnxRuntimeBackend(Backend):
    """onnxruntime's CPU execution provider, with an explicit thread count."""

    runtime = "onnxruntime"

    def __init__(self, model_path: Path, *, threads: int, output_name: str | None) -> None:
        ort = import_runtime("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # No busy-waiting worker threads: on a 2-core device they steal the other process' core.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load {model_path.name}: {err}") from err
        model_input = self._session.get_inputs()[0]
        if model_input.type not in _ORT_TYPES:
            raise BundleError(
                f"{model_path.name}: input {model_input.name!r} has type {model_input.type}; "
                f"this runtime feeds {', '.join(_ORT_TYPES)}"
            )
        self.input_name = str(model_input.name)
        self.input_dtype = np.dtype(_ORT_TYPES[model_input.type])
        names = [str(o.name) for o in self._session.get_outputs()]
        self.output_name = names[_pick(names, output_name)]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """``InferenceSession.run`` is thread-safe; no lock is needed."""
        (result,) = self._session.run([self.output_name], {self.input_name: batch})
        return np.asarray(result)


class OpenVinoBackend(Backend):
    """OpenVINO on CPU. Inference precision is pinned to f32.

    On CPUs with bf16 support OpenVINO would otherwise run an fp32 (or fp16-compressed) IR in
    bf16 and lose parity with the exported model; INT8 IRs keep their quantized kernels.

    Single samples, the common case on a device, run through a copy of the model compiled for
    a batch of one: a static graph skips OpenVINO's per-call shape inference and memory
    planning (about 30 us of the 0.1 ms the default CNN takes), and the sample is copied into
    the request's own input buffer instead of being wrapped in a new tensor. Any other batch
    size runs through the dynamic model, compiled on first use.
    """

    runtime = "openvino"

    def __init__(self, model_path: Path, *, threads: int, output_name: str | None) -> None:
        ov = import_runtime("openvino")
        self._config = {
            "INFERENCE_NUM_THREADS": str(threads),
            "INFERENCE_PRECISION_HINT": "f32",
            "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            self._core = ov.Core()
            self._model = self._core.read_model(str(model_path))
            shape = self._model.input(0).get_partial_shape()
            one = _single_sample_shape(shape)
            if one is not None and shape.is_dynamic:
                single_model = self._model.clone()
                single_model.reshape({0: one})
                single = self._core.compile_model(single_model, "CPU", self._config)
                self._dynamic = None  # compiled when a batch of another size comes
            else:
                single = self._dynamic = self._core.compile_model(self._model, "CPU", self._config)
        except Exception as err:  # OpenVINO raises RuntimeError and its own types
            raise BundleError(f"OpenVINO cannot load {model_path.name}: {err}") from err
        self._file = model_path.name
        model_input = single.input(0)
        self.input_name = str(model_input.get_any_name())
        self.input_dtype = np.dtype(model_input.get_element_type().to_dtype())
        names = [str(o.get_any_name()) for o in single.outputs]
        self._output_index = _pick(names, output_name)
        self.output_name = names[self._output_index]
        self._single_request = single.create_infer_request()
        # Views of the request's own buffers: they stay put while the shapes are static.
        self._single_in: np.ndarray | None = None
        self._single_out: np.ndarray | None = None
        if one is not None:
            self._single_in = self._single_request.get_input_tensor(0).data
            self._single_out = self._single_request.get_output_tensor(self._output_index).data
        self._dynamic_request: Any = None
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch; the result is a copy, never a view of OpenVINO's output buffer."""
        with self._lock:
            if self._single_in is not None and batch.shape == self._single_in.shape:
                np.copyto(self._single_in, batch, casting="same_kind")
                self._single_request.infer()
                return np.array(self._single_out, copy=True)
            if self._dynamic_request is None:
                self._dynamic_request = self._open_dynamic()
            feed = np.ascontiguousarray(batch, dtype=self.input_dtype)
            result = self._dynamic_request.infer(feed, share_inputs=True, share_outputs=True)
            return np.array(result.to_tuple()[self._output_index], copy=True)

    def _open_dynamic(self) -> Any:
        """An infer request of the dynamic-batch model, compiled on first use."""
        if self._dynamic is None:
            try:
                self._dynamic = self._core.compile_model(self._model, "CPU", self._config)
            except Exception as err:  # OpenVINO raises RuntimeError and its own types
                raise BundleError(f"OpenVINO cannot compile {self._file}: {err}") from err
        return self._dynamic.create_infer_request()


def _single_sample_shape(shape: Any) -> list[int] | None:
    """``shape`` with a batch of one when every other dimension is static, else None."""
    if shape.rank.is_dynamic or shape.rank.get_length() < 1:
        return None
    dims = list(shape)
    if any(dim.is_dynamic for dim in dims[1:]):
        return None
    first = dims[0].get_length() if dims[0].is_static else 1
    return [first, *(dim.get_length() for dim in dims[1:])]


class LiteRtBackend(Backend):
    """LiteRT (``ai-edge-litert``, the maintained TFLite interpreter).

    A dynamic batch dimension is resized per call. A model with a static batch (its
    ``shape_signature`` has no -1 there, as litert-torch writes them) is run in chunks of that
    batch, the last one zero-padded: XNNPack refuses to resize a static graph. Quantized
    (int8/uint8) input and output tensors are (de)quantized here with the tensor's scale and
    zero point, so the caller always feeds and receives float.
    """

    runtime = "litert"

    def __init__(self, model_path: Path, *, threads: int, output_name: str | None) -> None:
        module = import_runtime("litert", "ai_edge_litert.interpreter")
        try:
            self._interpreter = module.Interpreter(model_path=str(model_path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except Exception as err:  # the interpreter raises ValueError / RuntimeError
            raise BundleError(f"LiteRT cannot load {model_path.name}: {err}") from err
        self._input = self._interpreter.get_input_details()[0]
        outputs = self._interpreter.get_output_details()
        names = [str(o["name"]) for o in outputs]
        index = _pick(names, output_name)
        self._output_index = int(outputs[index]["index"])
        self.input_name = str(self._input["name"])
        self.output_name = names[index]
        raw_dtype = np.dtype(self._input["dtype"])
        self._quantized_input = raw_dtype.kind in "iu"
        self.input_dtype = np.dtype(np.float32) if self._quantized_input else raw_dtype
        signature = self._input.get("shape_signature", self._input["shape"])
        first = int(signature[0]) if len(signature) else -1
        self._static_batch = first if first > 0 else None
        self._lock = threading.Lock()  # the interpreter is not thread-safe

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Resize for the batch if needed (or chunk a static batch), (de)quantize, invoke."""
        fixed = self._static_batch
        if fixed is None or batch.ndim == 0 or batch.shape[0] == fixed:
            return self._run_one(batch)
        if batch.shape[0] == 0:
            raise ValueError(f"{self.input_name}: an empty batch cannot be run")
        parts = []
        for start in range(0, batch.shape[0], fixed):
            chunk = batch[start : start + fixed]
            pad = fixed - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            parts.append(self._run_one(chunk)[: fixed - pad])
        return np.concatenate(parts)

    def _run_one(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            index = int(self._input["index"])
            if tuple(self._input["shape"]) != batch.shape:
                self._interpreter.resize_tensor_input(index, list(batch.shape), strict=False)
                self._interpreter.allocate_tensors()
                self._input = self._interpreter.get_input_details()[0]
            feed = batch
            if self._quantized_input:
                scale, zero = self._input["quantization"]
                info = np.iinfo(np.dtype(self._input["dtype"]))
                feed = np.clip(np.round(batch / scale + zero), info.min, info.max)
                feed = feed.astype(self._input["dtype"])
            self._interpreter.set_tensor(index, feed)
            self._interpreter.invoke()
            out = np.array(self._interpreter.get_tensor(self._output_index), copy=True)
            details = next(
                d
                for d in self._interpreter.get_output_details()
                if int(d["index"]) == self._output_index
            )
            if out.dtype.kind in "iu":
                scale, zero = details["quantization"]
                out = (out.astype(np.float32) - zero) * scale
            return out


_BACKENDS: dict[str, type[OnnxRuntimeBackend | OpenVinoBackend | LiteRtBackend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": OpenVinoBackend,
    "litert": LiteRtBackend,
}


def open_backend(
    runtime: str, model_path: Path, *, threads: int = 1, output_name: str | None = None
) -> Backend:
    """Open ``model_path`` with ``runtime`` ('onnxruntime', 'openvino' or 'litert').

    ``output_name`` selects the output to return (the first one when absent or unknown).
    Raises :class:`RuntimeMissingError` when the runtime is not installed and
    :class:`BundleError` when the runtime refuses the file.
    """
    if runtime not in _BACKENDS:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(PREFERENCE)}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return _BACKENDS[runtime](Path(model_path), threads=threads, output_name=output_name)
