"""torch -> OpenVINO IR (FP32 / FP16 weights), NNCF post-training INT8, and an IR runner.

* :func:`export_openvino` converts a torch classifier into an OpenVINO IR pair (``.xml`` +
  ``.bin``) with a dynamic batch dimension, input tensor ``input`` and output tensor ``logits``.
* :func:`quantize_openvino_int8` converts the same way, then quantizes the IR to INT8 with
  NNCF's post-training quantization on calibration samples.
* :func:`openvino_runner` compiles an IR for the CPU and returns a ``numpy -> numpy`` function.

Files are written into a hidden temporary folder inside ``out_dir`` and moved into place only
once both are complete, so a failed export leaves nothing half-written behind.
The ``.xml`` is compacted on the way (short layer names, no indentation, no torch tensor names
inside the graph): a quarter of a small model's topology file, and nothing OpenVINO reads.

``openvino`` and ``nncf`` ship no ``py.typed`` marker; they are imported lazily (they cost
time and memory and are an optional extra) and handled as :data:`typing.Any`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree

import numpy as np
import torch

from pollinate.errors import ConfigError, ExportError
from pollinate.log import logger

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "OpenVinoInfo",
    "export_openvino",
    "openvino_runner",
    "quantize_openvino_int8",
]

INPUT_NAME = "input"
"""Name of the IR's input tensor (float32, ``(batch, *input_shape)``)."""

OUTPUT_NAME = "logits"
"""Name of the IR's output tensor (float32, ``(batch, num_classes)``)."""

_PRESET = "performance"
"""NNCF preset. Measured on the default CNN (MNIST, 3 calibration draws of 300 samples), with
full bias correction ``performance`` (symmetric weights and activations) agreed with torch on
1000/1000 test samples each time; ``mixed`` (asymmetric activations) on 999-1000, and both
with fast bias correction on 998-1000. The quantized activations of a ReLU network are
non-negative, so symmetric (unsigned) ranges lose nothing, and they are the faster on CPU."""

_FAST_BIAS_CORRECTION = False
"""Full bias correction: lower logit error than the fast variant, ~0.1 s more on small models."""


@dataclass(frozen=True)
class OpenVinoInfo:
    """What an OpenVINO export wrote.

    Attributes:
        xml: The IR topology file.
        bin: The IR weights file next to it.
        precision: ``"fp32"``, ``"fp16"`` (weights stored as FP16) or ``"int8"``.
        size_bytes: Size of ``xml`` plus ``bin`` in bytes.
        recipe: How the INT8 model was quantized; ``None`` for FP32 / FP16.
    """

    xml: Path
    bin: Path
    precision: str
    size_bytes: int
    recipe: str | None


# ---------------------------------------------------------------------------- helpers


def _import(name: str) -> Any:
    """Import an optional export dependency, or raise :class:`ConfigError` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"OpenVINO export needs the {name!r} package, which is not installed; "
            "install pollinate's 'export' extra"
        ) from exc


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, or raise :class:`ConfigError`."""
    if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
        raise ConfigError(
            f"input_shape must be a tuple of positive ints (one sample, without the batch "
            f"dimension), got {input_shape!r}"
        )
    dims = tuple(input_shape)
    if not dims or not all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d > 0 for d in dims
    ):
        raise ConfigError(
            f"input_shape must be a non-empty tuple of positive ints (one sample, without the "
            f"batch dimension), got {input_shape!r}"
        )
    return tuple(int(d) for d in dims)


def _batch_shape(dims: Sequence[int | None]) -> str:
    """Format a per-sample shape with a leading batch dimension: ``(batch, 1, 28, 28)``."""
    return "(batch, " + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _check_stem(stem: str) -> str:
    """Return ``stem`` if it is a plain file name stem, or raise :class:`ConfigError`."""
    if (
        not isinstance(stem, str)
        or not stem
        or stem in {".", ".."}
        or stem.startswith(".")
        or "/" in stem
        or "\\" in stem
        or "\0" in stem
    ):
        raise ConfigError(f"stem must be a plain file name without a folder, got {stem!r}")
    return stem


def _check_module(model: object) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode without gradients; restore its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer's and converters' warnings (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _convert(model: torch.nn.Module, input_shape: tuple[int, ...]) -> Any:
    """Convert ``model`` to an ``openvino.Model`` with a dynamic batch and named tensors.

    Raises:
        ConfigError: The torch model itself does not accept a batch of ``input_shape``.
        ExportError: OpenVINO could not convert the model, or it has not exactly one input
            and one output.
    """
    ov = _import("openvino")
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((2, *input_shape), generator=generator)
    with _eval_mode(model):
        try:
            reference = model(example)
        except Exception as exc:
            raise ConfigError(
                f"the model does not accept input of shape {_batch_shape(input_shape)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(reference, torch.Tensor) or reference.ndim != 2:
            raise ExportError(
                "OpenVINO export needs a classifier that returns one tensor of logits "
                f"(batch, num_classes); got {type(reference).__name__}"
                + (
                    f" of shape {tuple(reference.shape)}"
                    if isinstance(reference, torch.Tensor)
                    else ""
                )
            )
        try:
            with _quiet():
                ov_model = ov.convert_model(
                    model, example_input=example, input=[(-1, *input_shape)]
                )
        except Exception as exc:
            raise ExportError(
                f"OpenVINO could not convert the model: {type(exc).__name__}: {exc}"
            ) from exc
    if len(ov_model.inputs) != 1 or len(ov_model.outputs) != 1:
        raise ExportError(
            "OpenVINO export needs a model with one input and one output; the converted model "
            f"has {len(ov_model.inputs)} inputs and {len(ov_model.outputs)} outputs"
        )
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.inputs[0].get_node().set_friendly_name(INPUT_NAME)
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ov_model


def _compact_ir_xml(text: str) -> str:
    """The IR topology without what OpenVINO does not read back; the model is unchanged.

    ``save_model`` indents every element with tabs, names each layer after its torch module
    path (``__module.features.0/aten::_convolution/Convolution/fq_weights_1``) and keeps the
    torch tensor names of intermediate ports: about a quarter of a small model's XML. Here
    layers other than the ``Parameter`` and ``Result`` get their id as name (``l12``),
    intermediate ports lose their tensor names (the input's and the output's stay), and the
    whitespace between elements goes. Types, shapes, precisions, edges, weights offsets and
    every ``rt_info`` (such as the ``decompression`` marks on FP16 weights) are kept.
    """
    try:
        root = ElementTree.fromstring(text)  # the file OpenVINO just wrote
    except ElementTree.ParseError as exc:
        raise ExportError(f"OpenVINO wrote an IR that is not valid XML: {exc}") from exc
    layers = root.find("layers")
    edges = root.find("edges")
    if layers is None or edges is None:
        raise ExportError("OpenVINO wrote an IR without <layers> or <edges>")
    results = {layer.get("id") for layer in layers if layer.get("type") == "Result"}
    feeding = {
        (e.get("from-layer"), e.get("from-port")) for e in edges if e.get("to-layer") in results
    }
    for layer in layers:
        layer_id, kind = layer.get("id"), layer.get("type")
        if kind in ("Parameter", "Result"):
            continue
        layer.set("name", f"l{layer_id}")
        for port in layer.iterfind("output/port"):
            if (layer_id, port.get("id")) not in feeding:
                port.attrib.pop("names", None)
    for element in root.iter():
        if element.text is not None and not element.text.strip():
            element.text = None
        if element.tail is not None and not element.tail.strip():
            element.tail = None
    return '<?xml version="1.0"?>\n' + ElementTree.tostring(root, encoding="unicode")


def _save(
    ov_model: Any,
    out_dir: Path,
    stem: str,
    *,
    compress_to_fp16: bool,
    precision: str,
    recipe: str | None,
) -> OpenVinoInfo:
    """Save ``ov_model`` as ``out_dir/stem.xml`` + ``.bin``, through a temporary folder."""
    ov = _import("openvino")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export folder {out_dir} exists and is not a folder")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / f"{stem}.xml"
    bin_ = out_dir / f"{stem}.bin"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{stem}.", suffix=".tmp"))
    try:
        tmp_xml = tmp / xml.name
        try:
            ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
        except Exception as exc:
            raise ExportError(
                f"OpenVINO could not save the model: {type(exc).__name__}: {exc}"
            ) from exc
        tmp_bin = tmp / bin_.name
        if not tmp_xml.is_file() or not tmp_bin.is_file():
            raise ExportError(f"OpenVINO did not write both {xml.name} and {bin_.name}")
        tmp_xml.write_text(_compact_ir_xml(tmp_xml.read_text(encoding="utf-8")), encoding="utf-8")
        for path in (tmp_xml, tmp_bin):
            os.chmod(path, 0o644)
        # The weights first: whenever an .xml is in place, the .bin it names is too.
        os.replace(tmp_bin, bin_)
        os.replace(tmp_xml, xml)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    size = xml.stat().st_size + bin_.stat().st_size
    logger.info("wrote OpenVINO IR %s (%s, %d bytes)", xml, precision, size)
    return OpenVinoInfo(xml=xml, bin=bin_, precision=precision, size_bytes=size, recipe=recipe)


# ---------------------------------------------------------------------------- public API


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
    model = _check_module(model)
    shape = _check_input_shape(input_shape)
    stem = _check_stem(stem)
    if precision not in ("fp16", "fp32"):
        raise ConfigError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
    ov_model = _convert(model, shape)
    return _save(
        ov_model,
        Path(out_dir),
        stem,
        compress_to_fp16=precision == "fp16",
        precision=precision,
        recipe=None,
    )


def quantize_openvino_int8(
    model: torch.nn.Module,
    out_dir: Path,
    calibration: np.ndarray,
    *,
    input_shape: tuple[int, ...],
    subset_size: int = 300,
    stem: str = "model",
) -> OpenVinoInfo:
    """Convert a torch classifier to OpenVINO and quantize it to INT8 with NNCF.

    Static post-training quantization (NNCF ``performance`` preset: symmetric per-channel
    weights and symmetric activations, with full bias correction) whose activation ranges come
    from the first ``subset_size`` samples of ``calibration``, fed one at a time.

    Args:
        model: The trained classifier; its train/eval mode is left as it was.
        out_dir: Folder for ``<stem>.xml`` and ``<stem>.bin``.
        calibration: Representative inputs, shape ``(N, *input_shape)``, values as the model
            sees them in training (e.g. training samples, never test samples).
        input_shape: Shape of one sample, without the batch dimension.
        subset_size: How many calibration samples to use at most.
        stem: File name stem of the two files.

    Returns:
        The paths, ``precision="int8"``, total size and the quantization recipe.

    Raises:
        ConfigError: A bad argument, empty or mis-shaped calibration data, or a model that
            does not accept ``input_shape``.
        ExportError: OpenVINO or NNCF failed.
    """
    model = _check_module(model)
    shape = _check_input_shape(input_shape)
    stem = _check_stem(stem)
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 1:
        raise ConfigError(f"subset_size must be a positive int, got {subset_size!r}")
    if not isinstance(calibration, np.ndarray):
        raise ConfigError(f"calibration must be a numpy array, got {type(calibration).__name__}")
    if calibration.shape[1:] != shape or calibration.shape[0] == 0:
        raise ConfigError(
            f"calibration must have shape {_batch_shape(shape)} with at least one sample, "
            f"got {calibration.shape}"
        )
    if not np.issubdtype(calibration.dtype, np.number) or np.issubdtype(
        calibration.dtype, np.complexfloating
    ):
        raise ConfigError(f"calibration must hold real numbers, got dtype {calibration.dtype}")
    n = min(int(calibration.shape[0]), subset_size)
    samples = np.ascontiguousarray(calibration[:n], dtype=np.float32)
    if not np.isfinite(samples).all():
        raise ConfigError("calibration data contains NaN or infinite values")

    ov_model = _convert(model, shape)
    nncf = _import("nncf")
    # One sample per item: NNCF counts subset_size in items, and per-sample statistics are
    # what its range estimators expect.
    dataset = nncf.Dataset([samples[i : i + 1] for i in range(n)])
    nncf_logger = logging.getLogger("nncf")
    old_level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)  # no INFO / WARNING lines from NNCF on the console
    try:
        # NNCF draws rich progress bars on stdout, which belongs to the CLI's own output.
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):
            quantized = nncf.quantize(
                ov_model,
                dataset,
                preset=nncf.QuantizationPreset(_PRESET),
                target_device=nncf.TargetDevice.CPU,
                subset_size=n,
                fast_bias_correction=_FAST_BIAS_CORRECTION,
            )
    except Exception as exc:
        raise ExportError(
            f"NNCF could not quantize the model: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        nncf_logger.setLevel(old_level)
    correction = "fast" if _FAST_BIAS_CORRECTION else "full"
    recipe = (
        f"NNCF post-training INT8 ({_PRESET} preset, {correction} bias correction), "
        f"{n} calibration samples"
    )
    # Non-quantized parts (biases, norms) stay FP32: they are tiny and FP16 would add error.
    return _save(
        quantized, Path(out_dir), stem, compress_to_fp16=False, precision="int8", recipe=recipe
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
    ov = _import("openvino")
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
            raise ConfigError(f"input must have shape {_batch_shape(sample_dims)}, got {arr.shape}")
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
