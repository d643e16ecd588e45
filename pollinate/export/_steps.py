"""The per-format steps of an export: what to build for each (format, precision) asked for.

:func:`plan` turns :class:`~pollinate.export._options.ExportOptions` into an ordered list of
``(format, precision, build)``; each ``build()`` converts the run's model into files in a
scratch folder and returns a :class:`Made`: the files, what the manifest says about them,
and an inference function the pipeline validates against torch. The converters are imported
when a step is planned, so importing the pipeline loads no ONNX, OpenVINO or LiteRT code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pollinate.errors import ConfigError
from pollinate.export._options import ExportOptions, Format, Precision
from pollinate.export._source import LoadedRun
from pollinate.tasks import TaskKind

__all__ = ["Made", "Step", "plan"]


@dataclass(frozen=True)
class Made:
    """One built artifact: its main file, every file it ships, and how to run it."""

    file: str
    files: dict[str, Path]
    runtime: str
    min_version: str
    recipe: str | None
    opset: int | None
    run: Callable[[np.ndarray], np.ndarray]


#: One step of a plan: what is built, at which precision, and the function that builds it.
Step = tuple[Format, Precision, Callable[[], Made]]


def plan(
    options: ExportOptions, run: LoadedRun, tmp: Path, calibration: np.ndarray
) -> Sequence[Step]:
    """The steps ``options`` ask for, in order: ONNX, OpenVINO, TFLite, then the pruned model.

    Raises:
        ConfigError: The options select nothing to export.
    """
    steps: list[Step] = []
    if Format.ONNX in options.formats:
        steps.extend(_onnx_plan(options, run, tmp, calibration))
    if Format.OPENVINO in options.formats:
        steps.extend(_openvino_plan(options, run, tmp, calibration))
    if Format.TFLITE in options.formats:
        steps.extend(_tflite_plan(options, run, tmp, calibration))
    if options.prune > 0:
        steps.append((Format.ONNX, Precision.INT8, _pruned_builder(options, run, tmp, calibration)))
    if not steps:
        raise ConfigError(
            "nothing to export: choose --format onnx/openvino/tflite and a --precision"
        )
    return steps


def _onnx_made(path: Path, recipe: str | None, opset: int) -> Made:
    from pollinate.export._onnx import onnx_session

    return Made(
        file=path.name,
        files={path.name: path},
        runtime="onnxruntime",
        min_version="1.17",
        recipe=recipe,
        opset=opset,
        run=onnx_session(path),
    )


def _onnx_plan(
    options: ExportOptions, run: LoadedRun, tmp: Path, calibration: np.ndarray
) -> list[Step]:
    """ONNX FP32 (also the source of INT8, so it is built whenever INT8 is asked for) and INT8."""
    from pollinate.export._onnx import export_onnx
    from pollinate.export._onnx_quant import quantize_onnx_int8

    shape = tuple(run.data.input_shape)
    fp32 = tmp / "model.fp32.onnx"

    def onnx_fp32() -> Made:
        info = export_onnx(run.model, fp32, input_shape=shape)
        return _onnx_made(fp32, None, info.opset)

    def onnx_int8() -> Made:
        opset = export_onnx(run.model, fp32, input_shape=shape).opset if not fp32.exists() else 18
        out = tmp / "model.int8.onnx"
        return _onnx_made(out, quantize_onnx_int8(fp32, out, calibration), opset)

    steps: list[Step] = []
    if Precision.FP32 in options.precisions or Precision.INT8 in options.precisions:
        steps.append((Format.ONNX, Precision.FP32, onnx_fp32))
    if Precision.INT8 in options.precisions:
        steps.append((Format.ONNX, Precision.INT8, onnx_int8))
    return steps


def _openvino_plan(
    options: ExportOptions, run: LoadedRun, tmp: Path, calibration: np.ndarray
) -> list[Step]:
    """OpenVINO FP16 (asked for as FP32 or FP16) and NNCF INT8."""
    from pollinate.export._openvino import export_openvino, openvino_runner
    from pollinate.export._openvino_quant import quantize_openvino_int8

    shape = tuple(run.data.input_shape)

    def ov_made(xml: Path, bin_: Path, recipe: str | None) -> Made:
        rel = f"openvino/{xml.name}"
        return Made(
            file=rel,
            files={rel: xml, f"openvino/{bin_.name}": bin_},
            runtime="openvino",
            min_version="2024.0",
            recipe=recipe,
            opset=None,
            run=openvino_runner(xml),
        )

    def ov_fp16() -> Made:
        info = export_openvino(run.model, tmp / "openvino", input_shape=shape, stem="model.fp16")
        return ov_made(info.xml, info.bin, None)

    def ov_int8() -> Made:
        info = quantize_openvino_int8(
            run.model, tmp / "openvino", calibration, input_shape=shape, stem="model.int8"
        )
        return ov_made(info.xml, info.bin, info.recipe)

    steps: list[Step] = []
    if Precision.FP32 in options.precisions or Precision.FP16 in options.precisions:
        steps.append((Format.OPENVINO, Precision.FP16, ov_fp16))
    if Precision.INT8 in options.precisions:
        steps.append((Format.OPENVINO, Precision.INT8, ov_int8))
    return steps


def _tflite_plan(
    options: ExportOptions, run: LoadedRun, tmp: Path, calibration: np.ndarray
) -> list[Step]:
    """TFLite FP32/INT8 through litert-torch in its own environment (one worker run)."""
    from pollinate.export._tflite import TfliteInfo, export_tflite, tflite_runner

    wanted = tuple(p.value for p in (Precision.FP32, Precision.INT8) if p in options.precisions)
    done: dict[str, TfliteInfo] = {}

    def build_for(precision: str) -> Callable[[], Made]:
        def build() -> Made:
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
            return Made(
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
    options: ExportOptions, run: LoadedRun, tmp: Path, calibration: np.ndarray
) -> Callable[[], Made]:
    """Structured pruning + fine-tune + INT8 ONNX: the compressed artifact.

    The fine-tune data is the last ``finetune_samples`` of the training split, standing in
    for data the server holds; it never touches the test split the artifact is judged on.
    """
    from pollinate.export._onnx import export_onnx, onnx_session
    from pollinate.export._onnx_quant import quantize_onnx_int8
    from pollinate.export._parity import check_tolerances, measure_parity, torch_logits
    from pollinate.export._prune import prune_structured

    def build() -> Made:
        n = min(options.finetune_samples, len(run.data.train))
        x_ft = np.array(run.data.train.x[-n:], dtype=np.float32)
        y_ft = np.array(run.data.train.y[-n:])
        shape = tuple(run.data.input_shape)
        task = run.task
        pruned = prune_structured(
            run.model, input_shape=shape, amount=options.prune, finetune_x=x_ft,
            finetune_y=y_ft, seed=run.settings.seed, name=run.settings.model,
            loss=task.sample_losses,
            distill=task.kind == TaskKind.CLASSIFICATION,  # a softmax teacher: classes only
        )  # fmt: skip
        fp32 = tmp / "model.pruned.fp32.onnx"
        export_onnx(pruned.model, fp32, input_shape=shape)
        x_test = np.array(run.data.test.x, dtype=np.float32)
        own = measure_parity(
            onnx_session(fp32), x_test, np.asarray(run.data.test.y),
            torch_logits(pruned.model, x_test), task=task.kind.value,
        )  # fmt: skip
        check_tolerances("model.pruned.fp32.onnx", own, precision="fp32")
        out = tmp / "model.pruned.int8.onnx"
        recipe = quantize_onnx_int8(fp32, out, calibration)
        return Made(
            file=out.name,
            files={out.name: out},
            runtime="onnxruntime",
            min_version="1.17",
            recipe=f"{pruned.recipe}; {recipe}",
            opset=18,
            run=onnx_session(out),
        )

    return build
