"""Torch -> ONNX export and an ONNX Runtime session.

* :func:`export_onnx` writes one self-contained ``.onnx`` file with the dynamo exporter,
  a dynamic batch dimension, input ``input`` and output ``logits``, and checks it.
* :func:`onnx_session` opens a file with ONNX Runtime on the CPU and returns ``fn(x) -> logits``.

The static INT8 quantizer is :mod:`pollinate.export._onnx_quant`; the graph compaction and the
checked save both use are :mod:`pollinate.export._onnx_graph`. Every file is written to a
temporary file in the destination folder, checked, and renamed into place, so a reader never
sees a partial model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from pollinate.errors import ConfigError, ExportError
from pollinate.export._onnx_graph import compact, save_checked
from pollinate.log import logger

__all__ = [
    "INPUT_NAME",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "OnnxInfo",
    "export_onnx",
    "onnx_session",
]

#: Name of the graph input of every exported model.
INPUT_NAME = "input"
#: Name of the graph output of every exported model.
OUTPUT_NAME = "logits"
#: Lowest opset the dynamo exporter writes.
MIN_OPSET = 18


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
    compact(proto)
    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"expected a model with one input and one output, got {len(graph.input)} inputs "
            f"and {len(graph.output)} outputs"
        )
    size = save_checked(proto, path)
    info = OnnxInfo(
        path=path,
        opset=_default_opset(proto),
        input_name=graph.input[0].name,
        output_name=graph.output[0].name,
        size_bytes=size,
    )
    logger.debug("Exported %s (opset %d, %d bytes)", path, info.opset, size)
    return info


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
