"""The bundle manifest (``manifest.json``), schema version 1: written by ``pollinate.export``,
read by the edge runtime and the serving tier. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pollinate.edge_runtime.errors import BundleError

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "Artifact",
    "Manifest",
    "ModelInfo",
    "Preprocessing",
    "TensorSpec",
    "predicted_bins",
    "reference_distribution",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RUNTIMES = ("onnxruntime", "openvino", "litert")
PRECISIONS = ("fp32", "fp16", "int8")
#: what the model's output means: one logit per class, the logit of class 1, or the value
TASKS = ("classification", "binary", "regression")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype, shape (-1 for a dynamic dimension)."""

    name: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class Preprocessing:
    """How raw input becomes model input: ``(x * scale - mean) / std`` per channel, layout."""

    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    raw_dtype: str = "uint8"
    description: str = "uint8 pixels 0..255 are scaled to [0, 1]; float input is used as is"


@dataclass(frozen=True)
class Artifact:
    """One runnable file of the bundle and what was measured on it."""

    file: str
    runtime: str
    min_runtime_version: str
    precision: str
    quantization: str | None
    opset: int | None
    size_bytes: int
    sha256: str
    extra_files: dict[str, str] = field(default_factory=dict)  # file -> sha256 (e.g. IR .bin)
    accuracy: float | None = None
    agreement: float | None = None
    max_abs_error: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """Where the model comes from."""

    name: str
    version: str
    source_run: str
    source_round: int
    created: str


@dataclass(frozen=True)
class Manifest:
    """The whole ``manifest.json``."""

    model: ModelInfo
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: Preprocessing
    labels: list[str]
    artifacts: list[Artifact]
    reference: dict[str, Any] = field(default_factory=dict)
    torch_accuracy: float | None = None
    schema_version: int = SCHEMA_VERSION
    files: dict[str, str] = field(default_factory=dict)  # other bundle files -> sha256
    task: str = "classification"  # see TASKS; manifests from before tasks are classifiers

    def listed_files(self) -> dict[str, str | None]:
        """Every bundle file the manifest covers -> its sha256 (``None`` until the writer fills it).

        ``manifest.json`` and ``manifest.sig`` are not listed: the signature covers the first,
        and the second covers itself.
        """
        listed: dict[str, str | None] = {}
        for art in self.artifacts:
            listed[art.file] = art.sha256 or None
            for name, digest in art.extra_files.items():
                listed[name] = digest or None
        for name, digest in self.files.items():
            listed[name] = digest or None
        return listed

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, 2-space indent): the bytes a signature covers."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "manifest.json") -> Manifest:
        """Parse and check a manifest; any problem is a :class:`BundleError` naming ``where``."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("the top level is not an object")
            version = raw.get("schema_version")
            if version != SCHEMA_VERSION:
                raise BundleError(
                    f"{where}: schema version {version!r} is not supported (this runtime reads "
                    f"version {SCHEMA_VERSION}); re-export the bundle or upgrade pollinate"
                )
            manifest = cls(
                model=ModelInfo(**raw["model"]),
                inputs=[TensorSpec(**t) for t in raw["inputs"]],
                outputs=[TensorSpec(**t) for t in raw["outputs"]],
                preprocessing=Preprocessing(**raw["preprocessing"]),
                labels=[str(v) for v in raw["labels"]],
                artifacts=[Artifact(**a) for a in raw["artifacts"]],
                reference=dict(raw.get("reference", {})),
                torch_accuracy=raw.get("torch_accuracy"),
                schema_version=version,
                files={str(k): str(v) for k, v in dict(raw.get("files", {})).items()},
                task=str(raw.get("task", "classification")),
            )
        except BundleError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise BundleError(f"{where} is malformed ({type(err).__name__}: {err})") from err
        if manifest.task not in TASKS:
            raise BundleError(
                f"{where}: unknown task {manifest.task!r}; this runtime knows {', '.join(TASKS)}"
            )
        for art in manifest.artifacts:
            if art.runtime not in RUNTIMES or art.precision not in PRECISIONS:
                raise BundleError(
                    f"{where}: artifact {art.file} has unknown runtime {art.runtime!r} or "
                    f"precision {art.precision!r}"
                )
        for name in manifest.listed_files():
            parts = PurePosixPath(name.replace("\\", "/"))
            if not name or parts.is_absolute() or ".." in parts.parts or ":" in name:
                raise BundleError(f"{where}: bundle path {name!r} leaves the bundle")
            if name in (MANIFEST_NAME, SIGNATURE_NAME):
                raise BundleError(f"{where}: {name} cannot be listed as a bundle file")
        return manifest


def predicted_bins(outputs: np.ndarray, task: str, edges: np.ndarray | None) -> np.ndarray:
    """Each output row as a class for drift statistics: the arg-max class, the binary
    decision (logit > 0), or for regression the bin of the value on ``edges``."""
    if task == "regression":
        if edges is None:
            raise ValueError("a regression output needs its reference bin edges")
        return np.searchsorted(edges[1:-1], outputs[:, 0], side="right")
    if task == "binary":
        return (outputs[:, 0] > 0).astype(np.int64)
    return np.asarray(outputs.argmax(axis=1))


def reference_distribution(
    x: np.ndarray, logits: np.ndarray, bins: int = 10, *, task: str = "classification"
) -> dict[str, Any]:
    """The manifest's ``reference``: inputs and outputs summarised for drift checks.

    ``input``: a histogram of each sample's mean input value on ``bins`` quantile bins (the
    bin edges are kept: PSI needs them), plus mean and std; ``output``: the share of each
    predicted class (binary: logit <= 0 / > 0; regression: of each of ``bins`` quantile bins
    of the predicted value, whose edges are kept too) and the per-output mean and std. The
    serving tier's drift monitor (``pollinate.serving.drift``) compares live traffic with it.
    """
    flat = x.reshape(len(x), -1).mean(axis=1)
    edges = np.quantile(flat, np.linspace(0, 1, bins + 1)).tolist()
    counts, _ = np.histogram(flat, bins=np.unique(edges))
    out_edges = None
    if task == "regression":
        out_edges = np.unique(np.quantile(logits[:, 0], np.linspace(0, 1, bins + 1)))
        if out_edges.size < 2:
            out_edges = np.array([out_edges[0] - 1.0, out_edges[0] + 1.0])
    preds = predicted_bins(logits, task, out_edges)
    if out_edges is not None:
        classes = out_edges.size - 1
    else:
        classes = 2 if task == "binary" else int(logits.shape[1])
    output: dict[str, Any] = {
        "predicted_class_share": [float((preds == c).mean()) for c in range(classes)],
        "logit_mean": [float(v) for v in logits.mean(axis=0)],
        "logit_std": [float(v) for v in logits.std(axis=0)],
        "width": int(logits.shape[1]),
    }
    if out_edges is not None:
        output["bin_edges"] = [float(e) for e in out_edges]
    return {
        "samples": len(x),
        "input": {
            "statistic": "per-sample mean of model input",
            "bin_edges": [float(e) for e in np.unique(edges)],
            "counts": [int(c) for c in counts],
            "mean": float(x.mean()),
            "std": float(x.std()),
        },
        "output": output,
    }
