"""torch -> OpenVINO IR: conversion, the compacted ``.xml``, and writing the file pair.

* :func:`convert` turns a torch classifier into an ``openvino.Model`` with a dynamic batch
  dimension, input tensor ``input`` and output tensor ``logits``.
* :func:`save_ir` writes it as ``<stem>.xml`` + ``<stem>.bin``: OpenVINO saves into a hidden
  scratch folder inside the destination, then each file is published with
  :mod:`pollinate._atomic`, the weights first, so a failed export leaves nothing half-written
  behind. The ``.xml`` is compacted on the way (short layer names, no indentation, no torch
  tensor names inside the graph): a quarter of a small model's topology file, and nothing
  OpenVINO reads.
* The argument checks and the optional-import helper the OpenVINO modules share.

``openvino`` and ``nncf`` ship no ``py.typed`` marker; they are imported lazily (they cost
time and memory and are an optional extra) and handled as :data:`typing.Any`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import torch

from pollinate._atomic import atomic_file, atomic_write_text
from pollinate.errors import ConfigError, ExportError
from pollinate.log import logger

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OpenVinoInfo",
    "batch_shape",
    "check_input_shape",
    "check_module",
    "check_stem",
    "convert",
    "import_optional",
    "quiet",
    "save_ir",
]

INPUT_NAME = "input"
"""Name of the IR's input tensor (float32, ``(batch, *input_shape)``)."""

OUTPUT_NAME = "logits"
"""Name of the IR's output tensor (float32, ``(batch, num_classes)``)."""


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


def import_optional(name: str) -> Any:
    """Import an optional export dependency, or raise :class:`ConfigError` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"OpenVINO export needs the {name!r} package, which is not installed; "
            "install pollinate's 'export' extra"
        ) from exc


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
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


def batch_shape(dims: Sequence[int | None]) -> str:
    """Format a per-sample shape with a leading batch dimension: ``(batch, 1, 28, 28)``."""
    return "(batch, " + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def check_stem(stem: str) -> str:
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


def check_module(model: object) -> torch.nn.Module:
    """Return ``model`` if it is a torch module, or raise :class:`ConfigError`."""
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
def quiet() -> Iterator[None]:
    """Silence the tracer's and converters' warnings (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def convert(model: torch.nn.Module, input_shape: tuple[int, ...]) -> Any:
    """Convert ``model`` to an ``openvino.Model`` with a dynamic batch and named tensors.

    Raises:
        ConfigError: The torch model itself does not accept a batch of ``input_shape``.
        ExportError: OpenVINO could not convert the model, or it has not exactly one input
            and one output.
    """
    ov = import_optional("openvino")
    generator = torch.Generator().manual_seed(0)
    example = torch.rand((2, *input_shape), generator=generator)
    with _eval_mode(model):
        try:
            reference = model(example)
        except Exception as exc:
            raise ConfigError(
                f"the model does not accept input of shape {batch_shape(input_shape)}: "
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
            with quiet():
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


def save_ir(
    ov_model: Any,
    out_dir: Path,
    stem: str,
    *,
    compress_to_fp16: bool,
    precision: str,
    recipe: str | None,
) -> OpenVinoInfo:
    """Save ``ov_model`` as ``out_dir/stem.xml`` + ``.bin``, through a scratch folder."""
    ov = import_optional("openvino")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"export folder {out_dir} exists and is not a folder")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / f"{stem}.xml"
    bin_ = out_dir / f"{stem}.bin"
    try:
        with tempfile.TemporaryDirectory(
            dir=out_dir, prefix=f".{stem}.", suffix=".tmp", ignore_cleanup_errors=True
        ) as scratch:
            tmp_xml = Path(scratch) / xml.name
            try:
                ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=compress_to_fp16)
            except Exception as exc:
                raise ExportError(
                    f"OpenVINO could not save the model: {type(exc).__name__}: {exc}"
                ) from exc
            tmp_bin = Path(scratch) / bin_.name
            if not tmp_xml.is_file() or not tmp_bin.is_file():
                raise ExportError(f"OpenVINO did not write both {xml.name} and {bin_.name}")
            text = _compact_ir_xml(tmp_xml.read_text(encoding="utf-8"))
            # The weights first: whenever an .xml is in place, the .bin it names is too.
            with atomic_file(bin_) as staged:
                os.replace(tmp_bin, staged)  # OpenVINO's file, under the name atomic_file syncs
            atomic_write_text(xml, text)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    size = xml.stat().st_size + bin_.stat().st_size
    logger.info("wrote OpenVINO IR %s (%s, %d bytes)", xml, precision, size)
    return OpenVinoInfo(xml=xml, bin=bin_, precision=precision, size_bytes=size, recipe=recipe)
