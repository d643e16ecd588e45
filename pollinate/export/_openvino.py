"""torch -> OpenVINO IR (FP32 / FP16 weights), and an IR runner.

* :func:`export_openvino` converts a torch classifier into an OpenVINO IR pair (``.xml`` +
  ``.bin``) with a dynamic batch dimension, input tensor ``input`` and output tensor ``logits``.
* :func:`openvino_runner` compiles an IR for the CPU and returns a ``numpy -> numpy`` function.

The conversion and the writing of the files are :mod:`pollinate.export._openvino_ir`; NNCF's
INT8 quantization is :mod:`pollinate.export._openvino_quant`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pollinate.errors import ConfigError, ExportError
from pollinate.export._openvino_ir import (
    OpenVinoInfo,
    batch_shape,
    check_input_shape,
    check_module,
    check_stem,
    convert,
    import_optional,
    save_ir,
)

__all__ = ["export_openvino", "openvino_runner"]


def export_openvino(
    model: torch.nn.Module,
    out_dir: Path,
    *,
    input_shape: tuple[int, ...],
    precision: Literal["fp16", "fp32"] = "fp16",
    stem: str = "model",
) -> OpenVinoInfo:
    """Convert a torch classifier into an OpenVINO IR with a dynamic batch dimension.

    Args:
        model: The trained classifier; its train/eval mode is left as it was.
        out_dir: Folder for ``<stem>.xml`` and ``<stem>.bin`` (created if missing; existing
            files of the same names are replaced).
        input_shape: Shape of one sample, without the batch dimension, e.g. ``(1, 28, 28)``.
        precision: ``"fp16"`` stores the weights as FP16 (half the size; the CPU plugin still
            computes in FP32), ``"fp32"`` stores them unchanged.
        stem: File name stem of the two files.

    Returns:
        The paths, precision and total size of the IR.

    Raises:
        ConfigError: A bad argument, or a model that does not accept ``input_shape``.
        ExportError: OpenVINO could not convert or save the model.
    """
    model = check_module(model)
    shape = check_input_shape(input_shape)
    stem = check_stem(stem)
    if precision not in ("fp16", "fp32"):
        raise ConfigError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    ov_model = convert(model, shape)
    return save_ir(
        ov_model,
        Path(out_dir),
        stem,
        compress_to_fp16=precision == "fp16",
        precision=precision,
        recipe=None,
    )


def openvino_runner(xml: Path, *, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """Compile an IR for the CPU and return ``run(x) -> logits``.

    ``run`` takes a float32 batch ``(batch, *input_shape)`` of any batch size (other real
    dtypes are converted) and returns float32 logits ``(batch, num_classes)``. Inference runs
    in FP32 (no BF16 down-casting on CPUs that support it), on ``threads`` threads, one
    request at a time (calls from several threads are serialised).

    Raises:
        ConfigError: ``xml`` or its ``.bin`` is missing, ``threads`` is not a positive int,
            or (from ``run``) the input does not fit the model.
        ExportError: OpenVINO could not read or compile the IR, or inference failed.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive int, got {threads!r}")
    xml = Path(xml)
    if not xml.is_file():
        raise ConfigError(f"OpenVINO model {xml} does not exist")
    if not xml.with_suffix(".bin").is_file():
        raise ConfigError(f"OpenVINO weights {xml.with_suffix('.bin')} do not exist")
    ov = import_optional("openvino")
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    try:
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
    except Exception as exc:
        raise ExportError(f"OpenVINO could not compile {xml}: {type(exc).__name__}: {exc}") from exc
    if len(compiled.inputs) != 1 or len(compiled.outputs) != 1:
        raise ExportError(
            f"{xml} has {len(compiled.inputs)} inputs and {len(compiled.outputs)} outputs; "
            "expected one of each"
        )
    in_shape = compiled.input(0).get_partial_shape()
    rank = in_shape.rank.get_length()
    sample_dims: list[int | None] = [
        dim.get_length() if dim.is_static else None for dim in list(in_shape)[1:]
    ]
    out_shape = compiled.output(0).get_partial_shape()
    out_tail: list[int] = [dim.get_length() if dim.is_static else 0 for dim in list(out_shape)[1:]]
    request = compiled.create_infer_request()
    lock = threading.Lock()

    def run(x: np.ndarray) -> np.ndarray:
        """Return the logits of the batch ``x``, shape ``(batch, num_classes)``, float32."""
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ConfigError(f"input must hold real numbers, got dtype {arr.dtype}")
        fits = arr.ndim == rank and all(
            want is None or got == want
            for got, want in zip(arr.shape[1:], sample_dims, strict=True)
        )
        if not fits:
            raise ConfigError(f"input must have shape {batch_shape(sample_dims)}, got {arr.shape}")
        if arr.shape[0] == 0:
            return np.zeros((0, *out_tail), dtype=np.float32)
        batch = np.ascontiguousarray(arr, dtype=np.float32)
        with lock:
            try:
                request.infer({0: batch})
            except Exception as exc:
                raise ExportError(
                    f"OpenVINO inference failed: {type(exc).__name__}: {exc}"
                ) from exc
            out = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        return out

    return run
