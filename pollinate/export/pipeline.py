"""From a run directory to a validated bundle: every artifact is run against torch first.

Steps: load the newest checkpoint of a run -> torch reference logits on the test split ->
for each requested (format, precision): convert, run on the test split, check tolerances
(FP32 max abs logit error <= 1e-4; INT8/FP16 accuracy drop <= 1 point), time one sample ->
reference distribution of inputs and outputs -> manifest -> bundle (dir + tar.gz, optional
ed25519 signature) -> optional Triton model repository entry. A failed tolerance stops the
export with a clear message and leaves no bundle behind, except that a reduced-precision
artifact is left out (with a warning) when ``ExportOptions.on_reduced_miss`` is ``"skip"``.

This module is the orchestration and the public face of :mod:`pollinate.export`: the option
and result types (:mod:`pollinate.export._options`) and :func:`load_run`
(:mod:`pollinate.export._source`) are re-exported here; what each format builds is
:mod:`pollinate.export._steps`.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pollinate.edge_runtime.manifest import (
    Artifact,
    Manifest,
    ModelInfo,
    Preprocessing,
    TensorSpec,
    reference_distribution,
)
from pollinate.errors import ConfigError, ExportError
from pollinate.export._archive import archive_path
from pollinate.export._bundle import write_bundle
from pollinate.export._calibration import calibration_samples
from pollinate.export._options import ExportOptions, ExportResult, ExportRow, Format, Precision
from pollinate.export._parity import (
    Parity,
    check_tolerances,
    latency_ms,
    measure_parity,
    task_score,
    torch_logits,
)
from pollinate.export._source import LoadedRun, load_run
from pollinate.export._steps import Made, plan
from pollinate.export._triton import next_triton_version, write_triton_entry
from pollinate.log import logger
from pollinate.models import model_label

__all__ = [
    "ExportOptions",
    "ExportResult",
    "ExportRow",
    "Format",
    "Precision",
    "export_run",
    "load_run",
]


def _artifact(made: Made, precision: Precision, parity: Parity, p50: float, p95: float) -> Artifact:
    """The manifest entry of one validated artifact (sizes and hashes are filled when written)."""
    return Artifact(
        file=made.file,
        runtime=made.runtime,
        min_runtime_version=made.min_version,
        precision=precision.value,
        quantization=made.recipe,
        opset=made.opset,
        size_bytes=0,
        sha256="",
        extra_files={rel: "" for rel in made.files if rel != made.file},
        accuracy=parity.accuracy,
        agreement=parity.agreement,
        max_abs_error=parity.max_abs_error,
        p50_ms=p50,
        p95_ms=p95,
    )


def _manifest(
    run_dir: Path,
    run: LoadedRun,
    options: ExportOptions,
    artifacts: list[Artifact],
    x_test: np.ndarray,
    reference: np.ndarray,
    torch_accuracy: float,
) -> Manifest:
    """The bundle's manifest: the model, its tensors and labels, the artifacts, the reference."""
    return Manifest(
        model=ModelInfo(
            name=options.name or run.settings.model,
            version=f"{run_dir.name}-r{run.server_round}",
            source_run=str(run_dir.resolve()),
            source_round=run.server_round,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        ),
        inputs=[TensorSpec("input", "float32", [-1, *run.data.input_shape])],
        outputs=[TensorSpec("logits", "float32", [-1, run.data.num_outputs])],
        preprocessing=Preprocessing(),
        labels=list(run.data.labels),
        artifacts=artifacts,
        reference=reference_distribution(x_test, reference, task=run.task.kind.value),
        torch_accuracy=torch_accuracy,
        task=run.task.kind.value,
    )


def export_run(
    run_dir: Path,
    options: ExportOptions,
    *,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the newest checkpoint of ``run_dir`` as described by ``options``."""
    step = on_step or (lambda _msg: None)
    if Format.TFLITE in options.formats:
        from pollinate.export._tflite import litert_python

        litert_python()  # fail before any work when the converter's environment is missing
    if options.out.exists() and any(options.out.iterdir()):
        raise ConfigError(f"--out {options.out} exists and is not empty; choose a new folder")
    torch.set_num_threads(1)
    step("loading the run")
    run = load_run(run_dir)
    x_test = np.ascontiguousarray(run.data.test.x, dtype=np.float32)
    y_test = np.asarray(run.data.test.y)
    reference = torch_logits(run.model, x_test)
    task = run.task.kind.value
    torch_accuracy = task_score(reference, y_test, task)
    calibration = calibration_samples(run.data, options.calibration_samples, run.settings.seed)
    sample = x_test[:1]
    artifacts: list[Artifact] = []
    files: dict[str, Path] = {}
    rows: list[ExportRow] = []
    skipped: list[str] = []
    kept: set[Format] = set()
    missed: set[Format] = set()
    with tempfile.TemporaryDirectory(prefix="pollinate-export-") as tmp_name:
        tmp = Path(tmp_name)
        for fmt, precision, build in plan(options, run, tmp, calibration):
            step(f"{fmt.value} {precision.value}: converting")
            made = build()
            step(f"{fmt.value} {precision.value}: validating on {len(y_test)} test samples")
            parity = measure_parity(made.run, x_test, y_test, reference, task=task)
            try:
                check_tolerances(
                    made.file,
                    parity,
                    precision=precision.value,
                    max_abs_error_fp32=options.max_abs_error_fp32,
                    max_accuracy_drop=options.max_accuracy_drop,
                )
            except ExportError as err:
                if precision is Precision.FP32 or options.on_reduced_miss == "fail":
                    raise
                logger.warning("leaving %s out of the bundle: %s", made.file, err)
                skipped.append(str(err))
                missed.add(fmt)
                continue
            kept.add(fmt)
            p50, p95 = latency_ms(made.run, sample)
            for rel, src in made.files.items():
                files[rel] = src
            artifacts.append(_artifact(made, precision, parity, p50, p95))
            rows.append(
                ExportRow(
                    file=made.file,
                    runtime=made.runtime,
                    precision=precision.value,
                    size_bytes=sum(p.stat().st_size for p in made.files.values()),
                    accuracy=parity.accuracy,
                    agreement=parity.agreement,
                    max_abs_error=parity.max_abs_error,
                    p50_ms=p50,
                )
            )
        bare = [fmt.value for fmt in options.formats if fmt in missed - kept]
        if bare:  # "skip" keeps a format's best artifact, never none at all
            raise ExportError(
                f"no artifact of {', '.join(bare)} is within its tolerance: " + "; ".join(skipped)
            )
        manifest = _manifest(run_dir, run, options, artifacts, x_test, reference, torch_accuracy)
        step("writing the bundle")
        bundle = write_bundle(options.out, manifest, files, private_key=options.sign_key)
        triton_version = None
        if options.triton_repo is not None and Format.ONNX in options.formats:
            onnx_fp32 = options.out / "model.fp32.onnx"
            if onnx_fp32.exists():
                triton_name = options.name or model_label(run.settings.model)
                triton_version = next_triton_version(
                    options.triton_repo, triton_name, run.server_round
                )
                write_triton_entry(
                    options.triton_repo, triton_name, triton_version, onnx_fp32, manifest,
                    torch_weights=run.model.state_dict(),
                    torch_spec={"architecture": run.settings.model,
                                "fix_model": run.settings.fix_model,
                                "input_shape": list(run.data.input_shape),
                                "num_classes": run.data.num_outputs,
                                "task": run.task.kind.value},
                )  # fmt: skip
    archive = archive_path(options.out)
    logger.info("bundle written to %s", bundle)
    return ExportResult(
        bundle=bundle,
        archive=archive if archive.exists() else None,
        torch_accuracy=torch_accuracy,
        rows=rows,
        triton_version=triton_version,
        task=task,
        skipped=skipped,
    )
