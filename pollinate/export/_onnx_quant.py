"""Static INT8 quantization of an exported ONNX model, calibrated on real samples.

:func:`quantize_onnx_int8` runs ONNX Runtime's pre-processing and ``quantize_static`` (QDQ,
``Conv`` / ``Gemm`` / ``MatMul``, 7-bit symmetric int8 weights, uint8 activations, MinMax
ranges), then compacts the result like the FP32 model and saves it checked and atomically
(:mod:`pollinate.export._onnx_graph`). The calibration batch is checked by
:func:`pollinate.export._calibration.check_calibration`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from pollinate.errors import ExportError
from pollinate.export._calibration import check_calibration
from pollinate.export._onnx_graph import compact, drop_zero_bias_zero_points, save_checked
from pollinate.log import logger

__all__ = ["quantize_onnx_int8"]

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
    is then compacted like the FP32 one (see :func:`~pollinate.export._onnx.export_onnx`)
    and written as one checked, self-contained file renamed into place.

    Args:
        fp32_path: The model written by :func:`~pollinate.export._onnx.export_onnx`.
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
    drop_zero_bias_zero_points(proto.graph)
    compact(proto)
    try:
        size = save_checked(proto, out_path)
    except ExportError as err:
        # onnxruntime's QDQ quantizer writes an invalid graph for some models (the DPLSTM's,
        # where a tensor gets a second producer): say how to export the model anyway
        raise ExportError(
            f"{err}; onnxruntime's INT8 quantizer cannot handle this model's graph: export "
            "it with --precision fp32 (and --format openvino for FP16/INT8 there)"
        ) from err
    recipe = (
        f"static QDQ ({'/'.join(_QUANTIZED_OPS)}), {weights} 7-bit int8 weights, "
        f"uint8 activations, "
        f"MinMax calibration on {len(data)} samples"
    )
    logger.debug("Quantized %s -> %s (%d bytes): %s", fp32_path, out_path, size, recipe)
    return recipe
