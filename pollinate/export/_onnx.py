"""Torch -> ONNX export, static INT8 quantization and an ONNX Runtime session.

* :func:`export_onnx` writes one self-contained ``.onnx`` file with the dynamo exporter,
  a dynamic batch dimension, input ``input`` and output ``logits``, and checks it.
* :func:`quantize_onnx_int8` turns it into a static QDQ INT8 model calibrated on real samples.
* :func:`onnx_session` opens a file with ONNX Runtime on the CPU and returns ``fn(x) -> logits``.

Every file is written to a temporary file in the destination folder, checked, and renamed into
place, so a reader never sees a partial model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.external_data_helper import uses_external_data

from pollinate.errors import ConfigError
from pollinate.export._parity import ExportError
from pollinate.log import logger

__all__ = [
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "OnnxInfo",
    "export_onnx",
    "onnx_session",
    "quantize_onnx_int8",
]

#: Name of the graph input of every exported model.
INPUT_NAME = "input"
#: Name of the graph output of every exported model.
OUTPUT_NAME = "logits"
#: Lowest opset the dynamo exporter writes.
MIN_OPSET = 18
#: Samples per calibration batch fed to ONNX Runtime while collecting activation ranges.
_CALIBRATION_BATCH = 64
#: Operators quantized to INT8. The rest (the GroupNorm decomposition, pooling, ReLU) stays
#: in float between them: quantizing it too made the file larger and no more accurate.
_QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
#: Quantize weights to 7 bits (``[-64, 64]``) instead of 8. x86 CPUs without VNNI (AVX2, and
#: AVX-512 before Cascade Lake / Zen 4) multiply ``uint8`` activations by ``int8`` weights
#: with ``vpmaddubsw``, which adds each pair of products into a *saturating* int16: two bright
#: pixels (255) against two weights summing to more than 128 clip. With full-range per-channel
#: weights that happens in the first convolution of every MNIST digit, and the pruned INT8
#: model lost 0.5 to 1.3 points there against the same QDQ graph evaluated exactly (as VNNI
#: kernels, which accumulate in int32, compute it). With 7 bits no pair exceeds
#: 2 * 255 * 64 = 32,640 < 32,767, so the fused kernels match the graph on every CPU; over 8
#: pruning seeds that cost no accuracy, and the file size is unchanged.
_REDUCE_RANGE = True
#: ``int64`` initializers with at least this many elements are stored narrower.
_NARROW_MIN_ELEMENTS = 64


@dataclass(frozen=True)
class OnnxInfo:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ``.onnx`` file (self-contained: weights are inside it).
        opset: The default-domain opset of the graph.
        input_name: Name of the graph input (batch dimension dynamic).
        output_name: Name of the graph output (logits).
        size_bytes: Size of the file.
    """

    path: Path
    opset: int
    input_name: str
    output_name: str
    size_bytes: int


@contextlib.contextmanager
def _temp_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary file path next to ``dest``; it is removed unless renamed away."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _publish(tmp: Path, dest: Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``dest`` (an ordinary 0644 file)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def _compact(model: onnx.ModelProto, *, short_names: bool = True) -> None:
    """Drop and shrink what inference does not need, in place; the computation is unchanged.

    * doc strings, model and per-node metadata (the exporter's stack traces), intermediate
      ``value_info`` (shape annotations from shape inference; ONNX Runtime re-infers them),
      initializers no node reads and opset imports of domains no node uses;
    * large ``int64`` constants (index tables such as the one the exporter writes for adaptive
      pooling) are stored in the narrowest integer type that holds their values and widened
      back by a ``Cast`` node, which ONNX Runtime folds away when it loads the model;
    * with ``short_names``, intermediate tensors and nodes get short generated names (graph
      inputs and outputs keep theirs): in a model with ~18k weights, names are a noticeable
      part of the file.
    """
    graph = model.graph
    if any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute):
        return  # subgraphs may read outer names: leave such a model as it is
    for proto in (model, graph, *graph.node, *graph.input, *graph.output):
        proto.ClearField("doc_string")
    del model.metadata_props[:]
    for item in (*graph.node, *graph.input, *graph.output):
        del item.metadata_props[:]
    del graph.value_info[:]
    used = {name for node in graph.node for name in node.input}
    used.update(value.name for value in graph.output)
    kept = [init for init in graph.initializer if init.name in used]
    for init in kept:
        init.ClearField("doc_string")
        del init.metadata_props[:]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _narrow_int64_constants(graph)
    domains = {node.domain or "" for node in graph.node} | {""}
    opsets = [entry for entry in model.opset_import if (entry.domain or "") in domains]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    if short_names:
        _shorten_names(graph)


def _narrow_int64_constants(graph: onnx.GraphProto) -> None:
    """Store big ``int64`` initializers in a narrower type, widened again by a ``Cast`` node."""
    casts: list[onnx.NodeProto] = []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.INT64 or uses_external_data(init):
            continue
        values = onnx.numpy_helper.to_array(init)
        if values.size < _NARROW_MIN_ELEMENTS:
            continue
        for dtype in (np.int8, np.int16, np.int32):
            info = np.iinfo(dtype)
            if values.min() >= info.min and values.max() <= info.max:
                break
        else:
            continue
        name = init.name
        init.CopyFrom(onnx.numpy_helper.from_array(values.astype(dtype), name=f"{name}_narrow"))
        casts.append(
            onnx.helper.make_node(
                "Cast", [init.name], [name], name=f"{name}_widen", to=onnx.TensorProto.INT64
            )
        )
    if casts:
        nodes = [*casts, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)


def _drop_zero_bias_zero_points(graph: onnx.GraphProto) -> int:
    """Remove the all-zero ``int32`` zero points of constant bias ``DequantizeLinear`` nodes.

    The quantizer writes one ``int32`` zero point per bias element (4 bytes each, always 0);
    ``DequantizeLinear`` defaults an absent zero point to 0, so the result is the same and
    ONNX Runtime still fuses the node into ``QLinearConv`` / ``QGemm``. The ``int8`` weight
    zero points stay: without them ONNX Runtime no longer fuses ``Gemm`` into ``QGemm``.
    Returns how many inputs were removed (orphaned initializers are dropped by ``_compact``).
    """
    initializers = {init.name: init for init in graph.initializer}
    removed = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.input) != 3:
            continue
        values, zero_point = initializers.get(node.input[0]), initializers.get(node.input[2])
        if values is None or zero_point is None or values.data_type != onnx.TensorProto.INT32:
            continue
        if onnx.numpy_helper.to_array(zero_point).any():
            continue
        del node.input[2]
        removed += 1
    return removed


def _shorten_names(graph: onnx.GraphProto) -> None:
    """Rename intermediate tensors and nodes to short unique names (interface names stay)."""
    keep = {value.name for value in (*graph.input, *graph.output)}
    produced = [init.name for init in graph.initializer]
    produced += [out for node in graph.node for out in node.output if out]
    mapping: dict[str, str] = {}
    for name in produced:
        if name not in keep and name not in mapping:
            mapping[name] = f"t{_base36(len(mapping))}"
    taken = set(mapping.values())
    clashes = taken & keep  # an interface name that looks like a generated one
    if clashes:
        return
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)
    for i, node in enumerate(graph.node):
        node.name = f"n{_base36(i)}"  # node names are a namespace of their own
        node.input[:] = [mapping.get(name, name) for name in node.input]
        node.output[:] = [mapping.get(name, name) for name in node.output]


def _base36(number: int) -> str:
    """``number`` written in base 36 (``0``-``9``, ``a``-``z``)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return text


def _save_checked(model: onnx.ModelProto, dest: Path) -> int:
    """Save ``model`` as one self-contained file at ``dest`` after a full check; return its size.

    Raises:
        ExportError: The model fails :func:`onnx.checker.check_model` (``full_check=True``).
    """
    with _temp_path(dest) as tmp:
        onnx.save(model, os.fspath(tmp), save_as_external_data=False)
        try:
            onnx.checker.check_model(os.fspath(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"the ONNX model for {dest} is invalid: {exc}") from exc
        size = tmp.stat().st_size
        _publish(tmp, dest)
    return size


#: Loggers the exporter fills with notes (torchvision not installed) and, on failure, with
#: tracebacks that the raised ExportError already carries as its cause.
_TORCH_EXPORT_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch._subclasses",
    "torch.fx",
)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence the exporter's log chatter and its internal deprecation warnings for a while."""
    saved = {name: logging.getLogger(name).level for name in _TORCH_EXPORT_LOGGERS}
    try:
        for name in _TORCH_EXPORT_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``exc``, without terminal colours."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported ONNX model declares no default-domain opset")


def export_onnx(
    model: torch.nn.Module, path: Path, *, input_shape: tuple[int, ...], opset: int = 18
) -> OnnxInfo:
    """Export ``model`` to one self-contained ONNX file with a dynamic batch dimension.

    The model is put in eval mode and traced by the dynamo exporter
    (``torch.onnx.export(..., dynamo=True)``) on a zero batch of two samples; the batch
    dimension is declared dynamic with :class:`torch.export.Dim`. The graph has one input
    named ``input`` (``float32``, ``(batch, *input_shape)``) and one output named ``logits``.
    Weights are stored inside the file (never as external data). The graph is compacted without
    changing what it computes: doc strings, stack-trace metadata, shape annotations and unused
    initializers are dropped, large ``int64`` index tables are stored narrower, and
    intermediate tensors get short names. The file passes
    ``onnx.checker.check_model(full_check=True)`` before it is renamed into place.

    Args:
        model: The trained model (its training flag is restored afterwards).
        path: Destination ``.onnx`` file; parent folders are created.
        input_shape: Shape of one sample, e.g. ``(1, 28, 28)``.
        opset: ONNX opset to target (at least 18).

    Returns:
        Where the file is and what it holds.

    Raises:
        ConfigError: ``input_shape`` or ``opset`` is invalid.
        ExportError: The exporter failed or produced an invalid model.
    """
    path = Path(path)
    dims = tuple(input_shape)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ConfigError(
            f"input_shape must be a non-empty tuple of positive integers, got {input_shape!r}"
        )
    latest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= latest:
        raise ConfigError(f"opset must be an integer from {MIN_OPSET} to {latest}, got {opset!r}")

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.zeros((2, *dims), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with _quiet_torch():
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                optimize=True,
                verbose=False,
                report=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(
            f"cannot export the model to ONNX ({path.name}, input shape {dims}): {_root_cause(exc)}"
        ) from exc
    finally:
        model.train(was_training)
    if program is None:  # only the legacy TorchScript path returns None
        raise ExportError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    _compact(proto)
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"expected a model with one input and one output, got {len(graph.input)} inputs "
            f"and {len(graph.output)} outputs"
        )
    size = _save_checked(proto, path)
    info = OnnxInfo(
        path=path,
        opset=_default_opset(proto),
        input_name=graph.input[0].name,
        output_name=graph.output[0].name,
        size_bytes=size,
    )
    logger.debug("Exported %s (opset %d, %d bytes)", path, info.opset, size)
    return info


def check_calibration(calibration: np.ndarray) -> np.ndarray:
    """A non-empty, finite float32 batch of samples, or a ConfigError saying what is wrong."""
    data = np.asarray(calibration)
    if data.ndim < 2 or len(data) == 0:
        raise ConfigError(
            f"calibration must be a non-empty batch of samples (N, ...), got shape {data.shape}"
        )
    if not np.issubdtype(data.dtype, np.number):
        raise ConfigError(f"calibration must hold numbers, got dtype {data.dtype}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise ConfigError("calibration samples contain NaN or infinite values")
    return data


def quantize_onnx_int8(
    fp32_path: Path, out_path: Path, calibration: np.ndarray, *, per_channel: bool = True
) -> str:
    """Quantize an FP32 ONNX model to static QDQ INT8, calibrated on ``calibration``.

    Runs ONNX Runtime's pre-processing (``quant_pre_process``: graph optimization and shape
    inference), then ``quantize_static`` in QDQ format on the ``Conv``, ``Gemm`` and ``MatMul``
    nodes: symmetric ``int8`` weights restricted to 7 bits (``[-64, 64]``, per output channel
    when ``per_channel``) so that x86 CPUs without VNNI, whose ``uint8 x int8`` kernels add
    products pairwise in saturating int16, compute the same logits as others; ``int32``
    biases, ``uint8`` activations with MinMax ranges collected by running the model over
    ``calibration``. The weights are stored only once, as ``int8`` (no float copy), and the
    biases without their all-zero ``int32`` zero points (0 is the default). The model
    is then compacted like the FP32 one (see :func:`export_onnx`) and written as one checked,
    self-contained file renamed into place.

    Args:
        fp32_path: The model written by :func:`export_onnx`.
        out_path: Destination of the INT8 model.
        calibration: Representative ``float32`` samples, ``(N, *input_shape)``; a few hundred
            real training samples are enough.
        per_channel: Quantize weights per output channel (better accuracy) or per tensor.

    Returns:
        A one-line recipe for the bundle manifest.

    Raises:
        ConfigError: ``calibration`` is empty, not numeric or not finite.
        ExportError: ``fp32_path`` is missing or quantization fails.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    data = check_calibration(calibration)
    if not fp32_path.is_file():
        raise ExportError(f"cannot quantize {fp32_path}: no such ONNX file")
    from onnxruntime.quantization import (  # type: ignore[import-untyped]
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import (  # type: ignore[import-untyped]
        quant_pre_process,
    )

    try:
        input_name = onnx.load(os.fspath(fp32_path), load_external_data=False).graph.input[0].name
    except Exception as exc:  # protobuf decode errors, a graph without inputs
        raise ExportError(f"cannot quantize {fp32_path}: not a readable ONNX model") from exc

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds ``data`` to the calibration session in batches."""

        def __init__(self) -> None:
            self._batches = iter(range(0, len(data), _CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._batches, None)
            if start is None:
                return None
            return {input_name: data[start : start + _CALIBRATION_BATCH]}

        def rewind(self) -> None:
            self._batches = iter(range(0, len(data), _CALIBRATION_BATCH))

    weights = "per-channel" if per_channel else "per-tensor"
    with tempfile.TemporaryDirectory(prefix="pollinate-quant-") as work:
        prepared = Path(work) / "prepared.onnx"
        quantized = Path(work) / "quantized.onnx"
        try:
            quant_pre_process(os.fspath(fp32_path), os.fspath(prepared))
            quantize_static(
                os.fspath(prepared),
                os.fspath(quantized),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=_REDUCE_RANGE,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(_QUANTIZED_OPS),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True},
            )
            proto = onnx.load(os.fspath(quantized))
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime raises plain Exceptions and RuntimeErrors
            raise ExportError(f"INT8 quantization of {fp32_path.name} failed: {exc}") from exc
    _drop_zero_bias_zero_points(proto.graph)
    _compact(proto)
    size = _save_checked(proto, out_path)
    recipe = (
        f"static QDQ ({'/'.join(_QUANTIZED_OPS)}), {weights} 7-bit int8 weights, "
        f"uint8 activations, "
        f"MinMax calibration on {len(data)} samples"
    )
    logger.debug("Quantized %s -> %s (%d bytes): %s", fp32_path, out_path, size, recipe)
    return recipe


def onnx_session(path: Path, *, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """Open ``path`` with ONNX Runtime on the CPU and return ``fn(x) -> logits``.

    The session uses ``threads`` intra-op threads, one inter-op thread, sequential execution
    and all graph optimizations. ``fn`` takes a batch (cast to contiguous ``float32``) and
    returns the model's first output.

    Raises:
        ConfigError: ``threads`` is not a positive integer.
        ExportError: The file is missing or ONNX Runtime cannot load it.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"cannot open {path}: no such ONNX file")
    import onnxruntime as ort  # type: ignore[import-untyped]

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session: Any = ort.InferenceSession(
            os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime's own exception types are not importable portably
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    input_name: str = session.get_inputs()[0].name
    output_name: str = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        out = session.run([output_name], {input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0])

    return run
