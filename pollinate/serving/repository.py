"""The model repository: Triton's layout, read by the serving tier.

```
repo/<model>/config.pbtxt                 name, platform, max_batch_size, inputs, outputs
repo/<model>/<version>/model.onnx         the ONNX Runtime model (what Triton serves too)
repo/<model>/<version>/model.safetensors  optional: weights for the torch backend
repo/<model>/<version>/torch.json         optional: {"architecture", "input_shape", "num_classes"}
repo/<model>/<version>/manifest.json      optional: the bundle manifest (drift reference)
repo/<model>/registry.json                optional: the registry's aliases ({"production": 3})
```

``pollinate export --triton-repo DIR`` writes all of these; Triton ignores the extra files.
``config.pbtxt`` is parsed with protobuf's text format against the fields pollinate reads
(unknown Triton fields are skipped). Versions are positive integer directory names.
``registry.json`` is written by ``pollinate registry sync`` (and ``serve --registry``): the
version the registry's ``production`` alias names, which the roll-out follows back
(:func:`read_production`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pollinate.errors import RepositoryError

__all__ = [
    "KSERVE_DTYPES",
    "REGISTRY_FILE",
    "ModelSpec",
    "TensorMeta",
    "VersionFiles",
    "kserve_datatype",
    "model_dirs",
    "read_model_config",
    "read_production",
    "scan_model",
    "scan_repository",
]

# Triton config data types -> KServe v2 datatype names -> numpy dtypes.
_TRITON_TO_KSERVE = {
    "TYPE_BOOL": "BOOL",
    "TYPE_UINT8": "UINT8",
    "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32",
    "TYPE_UINT64": "UINT64",
    "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16",
    "TYPE_INT32": "INT32",
    "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16",
    "TYPE_FP32": "FP32",
    "TYPE_FP64": "FP64",
}
KSERVE_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}


#: in a model directory: the registry's aliases, ``{"production": N, "staging": M | null}``
REGISTRY_FILE = "registry.json"

_KSERVE_NAMES = {dtype: name for name, dtype in KSERVE_DTYPES.items()}


def kserve_datatype(dtype: np.dtype[Any]) -> str:
    """The KServe name of a numpy dtype (``float32`` -> ``FP32``); ``str(dtype)`` if it has none."""
    name = _KSERVE_NAMES.get(np.dtype(dtype))
    return name if name is not None else str(dtype)


@dataclass(frozen=True)
class TensorMeta:
    """One input or output: its name, KServe datatype and full shape (``-1`` = any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return KSERVE_DTYPES[self.datatype]

    @property
    def sample_size(self) -> int:
        """Elements in one sample (the product of the dims after the batch dimension)."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True)
class ModelSpec:
    """What ``config.pbtxt`` says about a model."""

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    max_queue_delay_us: int | None = None
    instances: int | None = None


@dataclass(frozen=True)
class VersionFiles:
    """One version directory and the files found in it."""

    model: str
    version: int
    path: Path
    onnx: Path
    safetensors: Path | None
    torch_spec: dict[str, Any] | None
    reference: dict[str, Any] = field(default_factory=dict)
    fingerprint: tuple[tuple[str, int, int], ...] = ()


def read_model_config(path: Path) -> ModelSpec:
    """Parse ``config.pbtxt``; any problem is one :class:`RepositoryError` naming the file."""
    from google.protobuf import text_format

    from pollinate.serving.proto import kserve_v2_pb2 as pb

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RepositoryError(f"cannot read {path}: {err.strerror or err}") from err
    config = pb.ModelConfig()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as err:
        raise RepositoryError(
            f"{path} is not valid protobuf text format ({err}); see Triton's model "
            "configuration docs, or re-export with `pollinate export --triton-repo DIR`"
        ) from err
    if config.platform and config.platform != "onnxruntime_onnx":
        raise RepositoryError(
            f"{path}: platform {config.platform!r} is not served by pollinate "
            "(expected 'onnxruntime_onnx')"
        )
    if config.max_batch_size < 1:
        raise RepositoryError(
            f"{path}: max_batch_size is {config.max_batch_size}; pollinate batches requests "
            "and needs max_batch_size >= 1 (for example `max_batch_size: 256`)"
        )
    if not config.input or not config.output:
        raise RepositoryError(f"{path}: needs at least one `input [...]` and one `output [...]`")

    def tensor(t: Any, kind: str) -> TensorMeta:
        type_name = pb.DataType.Name(t.data_type)
        if type_name not in _TRITON_TO_KSERVE:
            raise RepositoryError(
                f"{path}: {kind} {t.name!r} has data_type {type_name}; supported: "
                + ", ".join(_TRITON_TO_KSERVE)
            )
        if not t.name:
            raise RepositoryError(f"{path}: an {kind} has no name")
        dims = tuple(int(d) for d in t.dims)
        if any(d < 1 for d in dims):
            raise RepositoryError(
                f"{path}: {kind} {t.name!r} has dims {list(dims)}; pollinate needs fixed "
                "positive dims after the batch dimension"
            )
        return TensorMeta(t.name, _TRITON_TO_KSERVE[type_name], (-1, *dims))

    inputs = tuple(tensor(t, "input") for t in config.input)
    outputs = tuple(tensor(t, "output") for t in config.output)
    name = config.name or path.parent.name
    if name != path.parent.name:
        raise RepositoryError(
            f"{path}: name {name!r} differs from its directory {path.parent.name!r} "
            "(Triton requires them to match)"
        )
    delay = config.dynamic_batching.max_queue_delay_microseconds
    instances = sum(g.count for g in config.instance_group) or None
    return ModelSpec(
        name=name,
        platform=config.platform or "onnxruntime_onnx",
        max_batch_size=int(config.max_batch_size),
        inputs=inputs,
        outputs=outputs,
        max_queue_delay_us=int(delay) if config.HasField("dynamic_batching") and delay else None,
        instances=int(instances) if instances else None,
    )


def _fingerprint(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for f in sorted(files):
        st = f.stat()
        out.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RepositoryError(f"{path} is not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise RepositoryError(f"{path}: expected a JSON object")
    return data


def scan_model(model_dir: Path) -> tuple[ModelSpec, dict[int, VersionFiles]]:
    """The model's config and its complete version directories (ones with a model file).

    Hidden entries and non-integer names are skipped, as Triton does; so are version
    directories that hold no ``model.onnx`` yet (the exporter writes it last).
    """
    spec = read_model_config(model_dir / "config.pbtxt")
    versions: dict[int, VersionFiles] = {}
    for entry in model_dir.iterdir():
        if not entry.is_dir() or not entry.name.isdigit() or int(entry.name) < 1:
            continue
        onnx = entry / "model.onnx"
        weights = entry / "model.safetensors"
        if not onnx.is_file():  # published last: without it the version is still being written
            continue
        manifest = _read_json(entry / "manifest.json") or {}
        torch_spec = _read_json(entry / "torch.json")
        present = [p for p in (onnx, weights, entry / "torch.json") if p.is_file()]
        versions[int(entry.name)] = VersionFiles(
            model=spec.name,
            version=int(entry.name),
            path=entry,
            onnx=onnx,
            safetensors=weights if weights.is_file() else None,
            torch_spec=torch_spec,
            reference=dict(manifest.get("reference", {})),
            fingerprint=_fingerprint(present),
        )
    return spec, versions


def model_dirs(repo: Path) -> list[Path]:
    """The model directories (ones holding ``config.pbtxt``) of ``repo``, sorted."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(
            f"model repository {repo} does not exist or is not a directory; create one with "
            "`pollinate export RUN_DIR --triton-repo DIR`"
        )
    return [
        d for d in sorted(repo.iterdir())
        if not d.name.startswith(".") and (d / "config.pbtxt").is_file()
    ]  # fmt: skip


def scan_repository(repo: Path) -> dict[str, tuple[ModelSpec, dict[int, VersionFiles]]]:
    """Every model of ``repo``: its config and complete versions (any bad one raises)."""
    found = {}
    for model_dir in model_dirs(repo):
        spec, versions = scan_model(model_dir)
        found[spec.name] = (spec, versions)
    return found


def read_production(model_dir: Path) -> int | None:
    """The version ``registry.json`` names as ``production`` (None: no such file or version)."""
    data = _read_json(model_dir / REGISTRY_FILE)
    production = (data or {}).get("production")
    if production is None:
        return None
    if not isinstance(production, int) or isinstance(production, bool) or production < 1:
        raise RepositoryError(
            f"{model_dir / REGISTRY_FILE}: production is {production!r}; expected a version "
            'number like {"production": 3}'
        )
    return production
