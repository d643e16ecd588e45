"""TFLite export through the separate LiteRT environment, on the real default model and data.

Needs the environment made by ``scripts/setup-litert`` (``.venv-litert`` or
``$POLLINATE_LITERT_PYTHON``); the whole module is skipped without it. Running the exported
files needs ``ai-edge-litert`` in this environment.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pollinate.data import DatasetSplit
from pollinate.errors import ConfigError, ExportError
from pollinate.export._parity import check_tolerances, measure_parity
from pollinate.export._tflite import (
    LITERT_PYTHON_ENV,
    TfliteInfo,
    export_tflite,
    litert_python,
    tflite_runner,
)

try:
    LITERT = litert_python()
except ConfigError as err:
    pytest.skip(
        f"no LiteRT converter environment ({err}); run scripts/setup-litert",
        allow_module_level=True,
    )


pytestmark = pytest.mark.unit

CALIBRATION_SAMPLES = 300


@pytest.fixture(scope="module")
def calibration(split: DatasetSplit) -> np.ndarray:
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(split.train), size=CALIBRATION_SAMPLES, replace=False))
    return np.ascontiguousarray(split.train.x[idx], dtype=np.float32)


@pytest.fixture(scope="module")
def exported(
    trained: torch.nn.Module,
    split: DatasetSplit,
    calibration: np.ndarray,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, TfliteInfo]:
    out = tmp_path_factory.mktemp("tflite")
    started = time.perf_counter()
    infos = export_tflite(trained, out, input_shape=split.input_shape, calibration=calibration)
    print(f"\nTFLite conversion (fp32 + int8): {time.perf_counter() - started:.1f} s")
    return {info.precision: info for info in infos}


def test_files_are_written_with_sizes(exported: dict[str, TfliteInfo]) -> None:
    assert set(exported) == {"fp32", "int8"}
    for precision, info in exported.items():
        assert info.path.name == f"model.{precision}.tflite"
        assert info.path.is_file()
        assert info.size_bytes == info.path.stat().st_size > 0
        assert info.input_shape == (1, 1, 28, 28)  # a fixed batch of 1
        assert not list(info.path.parent.glob(".*.tmp"))  # nothing half-written left behind
    assert exported["fp32"].recipe is None
    assert exported["int8"].recipe is not None and "int8" in exported["int8"].recipe
    assert exported["int8"].input_dtype == "int8"
    ratio = exported["int8"].size_bytes / exported["fp32"].size_bytes
    print(
        f"\nsizes: fp32 {exported['fp32'].size_bytes} B, int8 {exported['int8'].size_bytes} B, "
        f"ratio {ratio:.2f}"
    )
    assert ratio < 0.6


def test_tensors_have_short_names_but_the_io_keeps_its_own(
    exported: dict[str, TfliteInfo],
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    for info in exported.values():
        interpreter = Interpreter(model_path=str(info.path))
        io = {
            d["index"]: d["name"]
            for d in (*interpreter.get_input_details(), *interpreter.get_output_details())
        }
        assert all(name.startswith("serving_default") for name in io.values()), io
        names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}
        inner = [name for index, name in names.items() if index not in io]
        assert inner and all(
            name == f"t{index}" for index, name in names.items() if index not in io
        )
        assert "torch.nn.modules" not in info.path.read_bytes().decode("latin-1")


def test_fp32_reproduces_torch(
    exported: dict[str, TfliteInfo], split: DatasetSplit, reference: np.ndarray
) -> None:
    run = tflite_runner(exported["fp32"].path)
    parity = measure_parity(run, split.test.x, split.test.y, reference)
    print(f"\nfp32: max abs error {parity.max_abs_error:.2e}, agreement {parity.agreement:.4f}")
    check_tolerances(exported["fp32"].path.name, parity, precision="fp32")
    assert parity.max_abs_error <= 1e-4
    assert parity.agreement == 1.0


def test_int8_keeps_accuracy(
    exported: dict[str, TfliteInfo], split: DatasetSplit, reference: np.ndarray
) -> None:
    run = tflite_runner(exported["int8"].path)
    parity = measure_parity(run, split.test.x, split.test.y, reference)
    print(
        f"\nint8: accuracy {parity.accuracy:.4f} (torch {parity.reference_accuracy:.4f}), "
        f"agreement {parity.agreement:.4f}, max abs error {parity.max_abs_error:.3f}"
    )
    check_tolerances(exported["int8"].path.name, parity, precision="int8")
    assert parity.accuracy_drop <= 0.01
    assert parity.agreement >= 0.98


def test_edge_runtime_backend_runs_any_batch(
    exported: dict[str, TfliteInfo], split: DatasetSplit
) -> None:
    """The edge runtime's LiteRT backend runs the fixed-batch models on any batch size."""
    from pollinate.edge_runtime._backends import open_backend

    x = np.ascontiguousarray(split.test.x[:7], dtype=np.float32)
    for info in exported.values():
        backend = open_backend("litert", info.path, threads=1)
        assert backend.input_dtype == np.float32  # int8 input is quantized by the backend
        whole = backend.run(x)
        one_by_one = np.concatenate([backend.run(x[i : i + 1]) for i in range(len(x))])
        assert whole.shape == (7, 10) and whole.dtype == np.float32
        np.testing.assert_array_equal(whole, one_by_one)


def test_only_the_precisions_asked_are_written(
    trained: torch.nn.Module, split: DatasetSplit, calibration: np.ndarray, tmp_path: Path
) -> None:
    infos = export_tflite(
        trained,
        tmp_path,
        input_shape=split.input_shape,
        calibration=calibration[:4],
        precisions=("fp32",),
    )
    assert [i.precision for i in infos] == ["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.fp32.tflite"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": ()}, "input_shape"),
        ({"precisions": ("fp16",)}, "precisions"),
        ({"precisions": ()}, "precisions"),
        ({"calibration": np.zeros((0, 1, 28, 28), np.float32)}, "calibration"),
        ({"calibration": np.zeros((4, 1, 8, 8), np.float32)}, "calibration"),
        ({"calibration": np.full((4, 1, 28, 28), np.nan, np.float32)}, "NaN"),
    ],
)
def test_invalid_arguments_are_config_errors(
    trained: torch.nn.Module, tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "input_shape": (1, 28, 28),
        "calibration": np.zeros((4, 1, 28, 28), np.float32),
        **kwargs,
    }
    with pytest.raises(ConfigError, match=message):
        export_tflite(trained, tmp_path, **args)  # type: ignore[arg-type]


def test_missing_environment_says_how_to_make_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="scripts/setup-litert"):
        litert_python(tmp_path / "nowhere")
    monkeypatch.setenv(LITERT_PYTHON_ENV, str(tmp_path / "python"))
    with pytest.raises(ConfigError, match=LITERT_PYTHON_ENV):
        litert_python()


def test_converter_failure_is_an_export_error_with_its_output(
    trained: torch.nn.Module, tmp_path: Path
) -> None:
    """A converter that crashes surfaces as ExportError carrying its last stderr lines."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text("#!/bin/sh\necho 'converter exploded: no such op' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(ExportError, match=r"exit code 3[\s\S]*converter exploded"):
        export_tflite(
            trained,
            tmp_path / "out",
            input_shape=(1, 28, 28),
            calibration=np.zeros((2, 1, 28, 28), np.float32),
            venv=venv,
        )
    assert not (tmp_path / "out" / "model.fp32.tflite").exists()


def test_missing_file_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such TFLite file"):
        tflite_runner(tmp_path / "absent.tflite")


def test_bundle_with_tflite_artifacts_loads_and_predicts(
    exported: dict[str, TfliteInfo], split: DatasetSplit, reference: np.ndarray, tmp_path: Path
) -> None:
    """A bundle of the two files, as the pipeline writes it (batch -1), runs in the edge runtime."""
    from pollinate.edge_runtime import load_bundle
    from pollinate.edge_runtime.manifest import (
        Artifact,
        Manifest,
        ModelInfo,
        Preprocessing,
        TensorSpec,
    )
    from pollinate.export._bundle import write_bundle

    artifacts = [
        Artifact(
            file=info.path.name,
            runtime="litert",
            min_runtime_version="2.3",
            precision=info.precision,
            quantization=info.recipe,
            opset=None,
            size_bytes=0,
            sha256="",
        )
        for info in exported.values()
    ]
    manifest = Manifest(
        model=ModelInfo(
            name="cnn", version="1", source_run="tests", source_round=1, created="2026-01-01"
        ),
        inputs=[TensorSpec("input", "float32", [-1, *split.input_shape])],
        outputs=[TensorSpec("logits", "float32", [-1, split.num_classes])],
        preprocessing=Preprocessing(),
        labels=list(split.labels),
        artifacts=artifacts,
    )
    files = {info.path.name: info.path for info in exported.values()}
    out = write_bundle(tmp_path / "bundle", manifest, files, make_tar=False)
    x = np.ascontiguousarray(split.test.x[:50], dtype=np.float32)
    with load_bundle(out, backend="litert", precision="fp32") as model:
        np.testing.assert_allclose(model.predict(x), reference[:50], atol=1e-4)
    with load_bundle(out, backend="litert", precision="int8") as model:
        agree = float(np.mean(model.predict(x).argmax(axis=1) == reference[:50].argmax(axis=1)))
        assert agree >= 0.96
