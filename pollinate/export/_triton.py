"""A Triton model-repository entry for the serving tier: ``config.pbtxt`` + ``<version>/``.

:func:`write_triton_entry` adds one version of an exported ONNX model to a repository in the
layout Triton (and pollinate's serving tier) reads; :func:`next_triton_version` picks a
version that is always newer than what is served; :func:`triton_config` is the config text.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_file, atomic_write_bytes, atomic_write_text
from pollinate.edge_runtime.manifest import Manifest, TensorSpec

__all__ = ["next_triton_version", "triton_config", "write_triton_entry"]

_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}


def _triton_tensor(spec: TensorSpec) -> str:
    if spec.dtype not in _TRITON_TYPES:
        raise ValueError(
            f"tensor {spec.name!r} has dtype {spec.dtype!r}, which has no Triton type here "
            f"(supported: {', '.join(_TRITON_TYPES)})"
        )
    dims = ", ".join(str(int(d)) for d in spec.shape[1:])
    return (
        "  {\n"
        f'    name: "{spec.name}"\n'
        f"    data_type: {_TRITON_TYPES[spec.dtype]}\n"
        f"    dims: [ {dims} ]\n"
        "  }"
    )


def triton_config(model_name: str, manifest: Manifest, *, max_batch_size: int = 256) -> str:
    """The ``config.pbtxt`` text of an ONNX Runtime model with dynamic batching."""
    inputs = ",\n".join(_triton_tensor(spec) for spec in manifest.inputs)
    outputs = ",\n".join(_triton_tensor(spec) for spec in manifest.outputs)
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching { }\n"
    )


def next_triton_version(repo: Path, model_name: str, server_round: int) -> int:
    """The version a new export publishes: the checkpoint's round, or, when the repository
    already holds that version or a later one (an earlier run), one past the newest, so a
    retrained model is always newer than what is served and never overwrites it."""
    model_dir = Path(repo) / model_name
    newest = 0
    if model_dir.is_dir():
        taken = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        newest = max(taken, default=0)
    return server_round if server_round > newest else newest + 1


def write_triton_entry(
    repo: Path,
    model_name: str,
    version: int,
    onnx_file: Path,
    manifest: Manifest,
    *,
    max_batch_size: int = 256,
    torch_weights: Mapping[str, Any] | None = None,
    torch_spec: Mapping[str, Any] | None = None,
) -> Path:
    """Add ``repo/<model_name>/config.pbtxt`` and ``repo/<model_name>/<version>/model.onnx``.

    The layout Triton (and pollinate's serving tier) reads; the batch dimension is left out
    of ``dims`` because ``max_batch_size`` > 0. Beside ``model.onnx`` go the bundle's
    ``manifest.json`` (the serving tier's drift reference) and, given ``torch_weights``
    (a state dict of tensors) and ``torch_spec`` (``architecture``, ``input_shape``,
    ``num_classes``), ``model.safetensors`` + ``torch.json`` for the torch backend; Triton
    ignores them. Each file is written atomically, ``model.onnx`` last, so a watcher that
    sees the model file sees the rest. Returns the model's directory.
    """
    if not model_name or "/" in model_name or "\\" in model_name or model_name in (".", ".."):
        raise ValueError(f"model_name must be a plain directory name, got {model_name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer (Triton's rule), got {version!r}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    for spec in (*manifest.inputs, *manifest.outputs):
        if not spec.shape or int(spec.shape[0]) != -1:
            raise ValueError(
                f"tensor {spec.name!r} has shape {spec.shape}; batching needs a dynamic "
                "first dimension (-1)"
            )
    config = triton_config(model_name, manifest, max_batch_size=max_batch_size)
    model_dir = Path(repo) / model_name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(version_dir / "manifest.json", manifest.to_json())
    if torch_weights is not None and torch_spec is not None:
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in torch_weights.items()}
        atomic_write_bytes(version_dir / "model.safetensors", save(tensors))
        atomic_write_text(version_dir / "torch.json", json.dumps(dict(torch_spec), indent=2) + "\n")
    atomic_write_text(model_dir / "config.pbtxt", config)
    with atomic_file(version_dir / "model.onnx") as staged:
        shutil.copyfile(onnx_file, staged)
    return model_dir
