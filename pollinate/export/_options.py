"""What an export is asked for and what it reports: formats, precisions, options, results.

The types callers of :func:`pollinate.export.pipeline.export_run` build and read (the CLI,
the federation's end-of-run export, the benchmarks); they are re-exported by
:mod:`pollinate.export.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

__all__ = ["ExportOptions", "ExportResult", "ExportRow", "Format", "Precision"]


class Format(StrEnum):
    """Target runtimes."""

    ONNX = "onnx"
    OPENVINO = "openvino"
    TFLITE = "tflite"


class Precision(StrEnum):
    """Numeric precision of an artifact (OpenVINO's float IR is FP16)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True)
class ExportOptions:
    """What to export and where."""

    out: Path
    formats: tuple[Format, ...] = (Format.ONNX, Format.OPENVINO)
    precisions: tuple[Precision, ...] = (Precision.FP32, Precision.INT8)
    calibration_samples: int = 300
    prune: float = 0.0
    finetune_samples: int = 1000
    sign_key: Path | None = None
    triton_repo: Path | None = None
    name: str | None = None
    max_accuracy_drop: float = 0.01
    max_abs_error_fp32: float = 1e-4
    #: What a reduced-precision (FP16/INT8) artifact outside ``max_accuracy_drop`` does:
    #: ``"fail"`` stops the export (what a person who asked for that precision wants);
    #: ``"skip"`` leaves that artifact out with a warning and keeps the format's FP32 one
    #: (the federation's end-of-run export: a near-chance model must still be delivered).
    #: FP32 artifacts that do not reproduce the model always fail.
    on_reduced_miss: Literal["fail", "skip"] = "fail"


@dataclass(frozen=True)
class ExportRow:
    """One line of the summary table."""

    file: str
    runtime: str
    precision: str
    size_bytes: int
    accuracy: float
    agreement: float
    max_abs_error: float
    p50_ms: float


@dataclass
class ExportResult:
    """The written bundle and what was measured."""

    bundle: Path
    archive: Path | None
    torch_accuracy: float
    rows: list[ExportRow] = field(default_factory=list)
    triton_version: int | None = None  # the version published to ``triton_repo``
    task: str = "classification"  # regression: every "accuracy" is R²
    #: Reduced-precision artifacts left out under ``on_reduced_miss="skip"``, each with why.
    skipped: list[str] = field(default_factory=list)
