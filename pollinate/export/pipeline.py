"""From a run directory to a validated bundle: every artifact is run against torch first.

Steps: load the newest checkpoint of a run -> torch reference logits on the test split ->
for each requested (format, precision): convert, run on the test split, check tolerances
(FP32 max abs logit error <= 1e-4; INT8/FP16 accuracy drop <= 1 point), time one sample ->
reference distribution of inputs and outputs -> manifest -> bundle (dir + tar.gz, optional
ed25519 signature) -> optional Triton model repository entry. A failed tolerance stops the
export with a clear message and leaves no bundle behind.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from pollinate.config import RunSettings
from pollinate.data import DatasetSplit, load_dataset
from pollinate.edge_runtime.manifest import (
    Artifact,
    Manifest,
    ModelInfo,
    Preprocessing,
    TensorSpec,
    reference_distribution,
)
from pollinate.errors import CheckpointError, ConfigError
from pollinate.log import logger
from pollinate.models import SmallCNN, build_model
from pollinate.rundir.checkpoint import latest_checkpoint

__all__ = ["ExportOptions", "ExportResult", "Format", "Precision", "export_run"]


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


@dataclass(frozen=True)
class _LoadedRun:
    settings: RunSettings
    server_round: int
    model: torch.nn.Module
    data: DatasetSplit


def load_run(run_dir: Path) -> _LoadedRun:
    """The trained global model of a run directory, with its data."""
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise CheckpointError(
            f"{run_dir} is not a pollinate run directory (no run.json); pass a folder written by "
            "`pollinate simulate`"
        )
    try:
        saved = json.loads(run_json.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{run_json} is corrupt ({err})") from err
    settings = RunSettings.from_run_config(saved)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no completed round yet; nothing to export")
    data = load_dataset(settings.dataset, test_fraction=settings.test_fraction, seed=settings.seed)
    model = build_model(settings.model, input_shape=data.input_shape, num_classes=data.num_classes)
    state = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.model.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint of {run_dir} does not fit model {settings.model!r}"
        ) from err
    model.eval()
    return _LoadedRun(settings=settings, server_round=ckpt.server_round, model=model, data=data)


def _calibration(data: DatasetSplit, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(data.train), size=min(n, len(data.train)), replace=False)
    return np.ascontiguousarray(data.train.x[np.sort(idx)], dtype=np.float32)


def export_run(
    run_dir: Path,
    options: ExportOptions,
    *,
    on_step: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the newest checkpoint of ``run_dir`` as described by ``options``."""
    from pollinate.export._bundle import (
        archive_path,
        next_triton_version,
        write_bundle,
        write_triton_entry,
    )
    from pollinate.export._parity import check_tolerances, latency_ms, measure_parity, torch_logits

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
    torch_accuracy = float((reference.argmax(1) == y_test).mean())
    calibration = _calibration(run.data, options.calibration_samples, run.settings.seed)
    sample = x_test[:1]
    artifacts: list[Artifact] = []
    files: dict[str, Path] = {}
    rows: list[ExportRow] = []
    with tempfile.TemporaryDirectory(prefix="pollinate-export-") as tmp_name:
        tmp = Path(tmp_name)
        for fmt, precision, build in _plan(options, run, tmp, calibration):
            step(f"{fmt.value} {precision.value}: converting")
            made = build()
            step(f"{fmt.value} {precision.value}: validating on {len(y_test)} test samples")
            parity = measure_parity(made.run, x_test, y_test, reference)
            check_tolerances(
                made.file,
                parity,
                precision=precision.value,
                max_abs_error_fp32=options.max_abs_error_fp32,
                max_accuracy_drop=options.max_accuracy_drop,
            )
            p50, p95 = latency_ms(made.run, sample)
            for rel, src in made.files.items():
                files[rel] = src
            artifacts.append(
                Artifact(
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
            )
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
        manifest = Manifest(
            model=ModelInfo(
                name=options.name or run.settings.model,
                version=f"{run_dir.name}-r{run.server_round}",
                source_run=str(run_dir.resolve()),
                source_round=run.server_round,
                created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            ),
            inputs=[TensorSpec("input", "float32", [-1, *run.data.input_shape])],
            outputs=[TensorSpec("logits", "float32", [-1, run.data.num_classes])],
            preprocessing=Preprocessing(),
            labels=list(run.data.labels),
            artifacts=artifacts,
            reference=reference_distribution(x_test, reference),
            torch_accuracy=torch_accuracy,
        )
        step("writing the bundle")
        bundle = write_bundle(options.out, manifest, files, private_key=options.sign_key)
        triton_version = None
        if options.triton_repo is not None and Format.ONNX in options.formats:
            onnx_fp32 = options.out / "model.fp32.onnx"
            if onnx_fp32.exists():
                triton_name = options.name or run.settings.model
                triton_version = next_triton_version(
                    options.triton_repo, triton_name, run.server_round
                )
                write_triton_entry(
                    options.triton_repo, triton_name, triton_version, onnx_fp32, manifest,
                    torch_weights=run.model.state_dict(),
                    torch_spec={"architecture": run.settings.model,
                                "input_shape": list(run.data.input_shape),
                                "num_classes": run.data.num_classes},
                )  # fmt: skip
    archive = archive_path(options.out)
    logger.info("bundle written to %s", bundle)
    return ExportResult(
        bundle=bundle,
        archive=archive if archive.exists() else None,
        torch_accuracy=torch_accuracy,
        rows=rows,
        triton_version=triton_version,
    )


@dataclass(frozen=True)
class _Made:
    file: str
    files: dict[str, Path]
    runtime: str
    min_version: str
    recipe: str | None
    opset: int | None
    run: Callable[[np.ndarray], np.ndarray]


def _plan(
    options: ExportOptions, run: _LoadedRun, tmp: Path, calibration: np.ndarray
) -> Sequence[tuple[Format, Precision, Callable[[], _Made]]]:
    shape = tuple(run.data.input_shape)
    plan: list[tuple[Format, Precision, Callable[[], _Made]]] = []
    if Format.ONNX in options.formats:
        from pollinate.export._onnx import export_onnx, onnx_session, quantize_onnx_int8

        fp32 = tmp / "model.fp32.onnx"

        def onnx_made(path: Path, recipe: str | None, opset: int) -> _Made:
            return _Made(
                file=path.name,
                files={path.name: path},
                runtime="onnxruntime",
                min_version="1.17",
                recipe=recipe,
                opset=opset,
                run=onnx_session(path),
            )

        def onnx_fp32() -> _Made:
            info = export_onnx(run.model, fp32, input_shape=shape)
            return onnx_made(fp32, None, info.opset)

        def onnx_int8() -> _Made:
            opset = (
                export_onnx(run.model, fp32, input_shape=shape).opset if not fp32.exists() else 18
            )
            out = tmp / "model.int8.onnx"
            return onnx_made(out, quantize_onnx_int8(fp32, out, calibration), opset)

        if Precision.FP32 in options.precisions or Precision.INT8 in options.precisions:
            plan.append((Format.ONNX, Precision.FP32, onnx_fp32))
        if Precision.INT8 in options.precisions:
            plan.append((Format.ONNX, Precision.INT8, onnx_int8))
    if Format.OPENVINO in options.formats:
        from pollinate.export._openvino import (
            export_openvino,
            openvino_runner,
            quantize_openvino_int8,
        )

        def ov_made(xml: Path, bin_: Path, recipe: str | None) -> _Made:
            rel = f"openvino/{xml.name}"
            return _Made(
                file=rel,
                files={rel: xml, f"openvino/{bin_.name}": bin_},
                runtime="openvino",
                min_version="2024.0",
                recipe=recipe,
                opset=None,
                run=openvino_runner(xml),
            )

        def ov_fp16() -> _Made:
            info = export_openvino(
                run.model, tmp / "openvino", input_shape=shape, stem="model.fp16"
            )
            return ov_made(info.xml, info.bin, None)

        def ov_int8() -> _Made:
            info = quantize_openvino_int8(
                run.model, tmp / "openvino", calibration, input_shape=shape, stem="model.int8"
            )
            return ov_made(info.xml, info.bin, info.recipe)

        if Precision.FP32 in options.precisions or Precision.FP16 in options.precisions:
            plan.append((Format.OPENVINO, Precision.FP16, ov_fp16))
        if Precision.INT8 in options.precisions:
            plan.append((Format.OPENVINO, Precision.INT8, ov_int8))
    if Format.TFLITE in options.formats:
        plan.extend(_tflite_plan(options, run, tmp, calibration))
    if options.prune > 0:
        plan.append((Format.ONNX, Precision.INT8, _pruned_builder(options, run, tmp, calibration)))
    if not plan:
        raise ConfigError(
            "nothing to export: choose --format onnx/openvino/tflite and a --precision"
        )
    return plan


def _tflite_plan(
    options: ExportOptions, run: _LoadedRun, tmp: Path, calibration: np.ndarray
) -> list[tuple[Format, Precision, Callable[[], _Made]]]:
    """TFLite FP32/INT8 through litert-torch in its own environment (one worker run)."""
    from pollinate.export._tflite import TfliteInfo, export_tflite, tflite_runner

    wanted = tuple(p.value for p in (Precision.FP32, Precision.INT8) if p in options.precisions)
    done: dict[str, TfliteInfo] = {}

    def build_for(precision: str) -> Callable[[], _Made]:
        def build() -> _Made:
            if not done:
                infos = export_tflite(
                    run.model,
                    tmp / "tflite",
                    input_shape=tuple(run.data.input_shape),
                    calibration=calibration,
                    precisions=wanted,
                )
                done.update({info.precision: info for info in infos})
            info = done[precision]
            return _Made(
                file=info.path.name,
                files={info.path.name: info.path},
                runtime="litert",
                min_version="2.3",
                recipe=info.recipe,
                opset=None,
                run=tflite_runner(info.path),
            )

        return build

    return [(Format.TFLITE, Precision(p), build_for(p)) for p in wanted]


def _pruned_builder(
    options: ExportOptions, run: _LoadedRun, tmp: Path, calibration: np.ndarray
) -> Callable[[], _Made]:
    """Structured pruning + fine-tune + INT8 ONNX: the compressed artifact.

    The fine-tune data is the last ``finetune_samples`` of the training split, standing in
    for data the server holds; it never touches the test split the artifact is judged on.
    """
    from pollinate.export._onnx import export_onnx, onnx_session, quantize_onnx_int8
    from pollinate.export._parity import check_tolerances, measure_parity, torch_logits
    from pollinate.export._prune import prune_structured

    def build() -> _Made:
        n = min(options.finetune_samples, len(run.data.train))
        x_ft = np.array(run.data.train.x[-n:], dtype=np.float32)
        y_ft = np.array(run.data.train.y[-n:])
        if not isinstance(run.model, SmallCNN):
            raise ConfigError(
                f"--prune supports the default model 'cnn' only, this run used "
                f"{run.settings.model!r}; export without --prune"
            )
        pruned = prune_structured(
            run.model, amount=options.prune, finetune_x=x_ft, finetune_y=y_ft,
            seed=run.settings.seed,
        )  # fmt: skip
        fp32 = tmp / "model.pruned.fp32.onnx"
        export_onnx(pruned.model, fp32, input_shape=tuple(run.data.input_shape))
        x_test = np.array(run.data.test.x, dtype=np.float32)
        own = measure_parity(
            onnx_session(fp32), x_test, np.asarray(run.data.test.y),
            torch_logits(pruned.model, x_test),
        )  # fmt: skip
        check_tolerances("model.pruned.fp32.onnx", own, precision="fp32")
        out = tmp / "model.pruned.int8.onnx"
        recipe = quantize_onnx_int8(fp32, out, calibration)
        return _Made(
            file=out.name,
            files={out.name: out},
            runtime="onnxruntime",
            min_version="1.17",
            recipe=f"{pruned.recipe}; {recipe}",
            opset=18,
            run=onnx_session(out),
        )

    return build
