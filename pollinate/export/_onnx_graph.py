"""ONNX graph compaction and the checked, atomic save shared by export and quantization.

* :func:`compact` drops and shrinks what inference does not need (doc strings, metadata,
  shape annotations, unused initializers), stores big ``int64`` tables narrower and gives
  intermediate tensors short names; the computation is unchanged.
* :func:`drop_zero_bias_zero_points` removes the all-zero ``int32`` bias zero points the INT8
  quantizer writes.
* :func:`save_checked` writes a model as one self-contained file through
  :func:`pollinate._atomic.atomic_file`, after ``onnx.checker`` passed on exactly those bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from pollinate._atomic import atomic_file
from pollinate.errors import ExportError

__all__ = ["compact", "drop_zero_bias_zero_points", "save_checked"]

#: ``int64`` initializers with at least this many elements are stored narrower.
_NARROW_MIN_ELEMENTS = 64


def compact(model: onnx.ModelProto, *, short_names: bool = True) -> None:
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


def drop_zero_bias_zero_points(graph: onnx.GraphProto) -> int:
    """Remove the all-zero ``int32`` zero points of constant bias ``DequantizeLinear`` nodes.

    The quantizer writes one ``int32`` zero point per bias element (4 bytes each, always 0);
    ``DequantizeLinear`` defaults an absent zero point to 0, so the result is the same and
    ONNX Runtime still fuses the node into ``QLinearConv`` / ``QGemm``. The ``int8`` weight
    zero points stay: without them ONNX Runtime no longer fuses ``Gemm`` into ``QGemm``.
    Returns how many inputs were removed (orphaned initializers are dropped by :func:`compact`).
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


def save_checked(model: onnx.ModelProto, dest: Path) -> int:
    """Save ``model`` as one self-contained file at ``dest`` after a full check; return its size.

    The file is written beside ``dest`` under a temporary name, checked there, and renamed
    into place only when the check passed (:func:`pollinate._atomic.atomic_file`).

    Raises:
        ExportError: The model fails :func:`onnx.checker.check_model` (``full_check=True``).
    """
    with atomic_file(dest) as tmp:
        onnx.save(model, os.fspath(tmp), save_as_external_data=False)
        try:
            onnx.checker.check_model(os.fspath(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ExportError(f"the ONNX model for {dest} is invalid: {exc}") from exc
        size = tmp.stat().st_size
    return size
