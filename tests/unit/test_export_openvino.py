"""OpenVINO export: FP32 / FP16 IR and NNCF INT8, checked against the real trained default model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from pollinate.data import DatasetSplit, load_dataset
from pollinate.errors import ConfigError, ExportError
from pollinate.export._openvino import export_openvino, openvino_runner
from pollinate.export._openvino_ir import INPUT_NAME, OUTPUT_NAME, OpenVinoInfo
from pollinate.export._openvino_quant import quantize_openvino_int8
from pollinate.models import build_model

pytestmark = pytest.mark.unit

SHAPE = (1, 28, 28)


@dataclass(frozen=True)
class Trained:
    """The default CNN trained briefly on MNIST, with its torch logits on the test split."""

    model: nn.Module
    split: DatasetSplit
    logits: np.ndarray
    accuracy: float


def _train(split: DatasetSplit, epochs: int = 2, batch_size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=split.input_shape, num_classes=split.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.from_numpy(np.array(split.train.x))
    y = torch.from_numpy(np.array(split.train.y))
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
    return model.eval()


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def trained() -> Trained:
    torch.set_num_threads(1)
    split = load_dataset("mnist", seed=42)
    model = _train(split)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.array(split.test.x))).numpy()
    accuracy = _accuracy(logits, split.test.y)
    print(f"\ntorch test accuracy: {accuracy:.4f} on {len(split.test)} samples")
    assert accuracy >= 0.85
    return Trained(model=model, split=split, logits=logits, accuracy=accuracy)


@pytest.fixture(scope="module")
def fp32_ir(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> OpenVinoInfo:
    out = tmp_path_factory.mktemp("ov_fp32")
    return export_openvino(trained.model, out, input_shape=SHAPE, precision="fp32")


@pytest.fixture(scope="module")
def fp16_ir(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> OpenVinoInfo:
    out = tmp_path_factory.mktemp("ov_fp16")
    return export_openvino(trained.model, out, input_shape=SHAPE)


@pytest.fixture(scope="module")
def int8_ir(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> OpenVinoInfo:
    out = tmp_path_factory.mktemp("ov_int8")
    train_x = trained.split.train.x
    pick = np.random.default_rng(0).permutation(len(train_x))[:300]
    return quantize_openvino_int8(trained.model, out, train_x[pick], input_shape=SHAPE)


# ---------------------------------------------------------------------------- FP32 / FP16


def test_fp32_ir_matches_torch(trained: Trained, fp32_ir: OpenVinoInfo) -> None:
    logits = openvino_runner(fp32_ir.xml)(trained.split.test.x)
    err = float(np.abs(logits - trained.logits).max())
    print(f"\nFP32 IR: max abs error {err:.2e}, agreement {_agreement(logits, trained.logits)}")
    assert logits.dtype == np.float32
    assert logits.shape == trained.logits.shape
    assert err < 1e-3
    assert _agreement(logits, trained.logits) >= 0.999


def test_fp16_ir_matches_torch(trained: Trained, fp16_ir: OpenVinoInfo) -> None:
    assert fp16_ir.xml.is_file()
    assert fp16_ir.bin.is_file()
    assert fp16_ir.xml == fp16_ir.xml.parent / "model.xml"
    assert fp16_ir.bin == fp16_ir.xml.with_suffix(".bin")
    assert fp16_ir.precision == "fp16"
    assert fp16_ir.recipe is None
    assert fp16_ir.size_bytes == fp16_ir.xml.stat().st_size + fp16_ir.bin.stat().st_size
    logits = openvino_runner(fp16_ir.xml)(trained.split.test.x)
    err = float(np.abs(logits - trained.logits).max())
    agreement = _agreement(logits, trained.logits)
    accuracy = _accuracy(logits, trained.split.test.y)
    print(
        f"\nFP16 IR: max abs error {err:.2e} (logit range {np.abs(trained.logits).max():.1f}), "
        f"agreement {agreement:.4f}, accuracy {accuracy:.4f} vs torch {trained.accuracy:.4f}"
    )
    assert err < 0.05
    assert agreement >= 0.99


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_runner_takes_any_batch_size(trained: Trained, fp16_ir: OpenVinoInfo, batch: int) -> None:
    run = openvino_runner(fp16_ir.xml, threads=1)
    x = trained.split.test.x[:batch]
    logits = run(x)
    assert logits.shape == (batch, trained.split.num_classes)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, trained.logits[:batch], atol=0.05)


def test_runner_handles_empty_and_float64_batches(trained: Trained, fp32_ir: OpenVinoInfo) -> None:
    run = openvino_runner(fp32_ir.xml, threads=2)
    assert run(np.zeros((0, *SHAPE), dtype=np.float32)).shape == (0, 10)
    x64 = trained.split.test.x[:5].astype(np.float64)
    np.testing.assert_allclose(run(x64), trained.logits[:5], atol=1e-3)


def test_fp16_ir_is_about_half_the_fp32_ir(fp32_ir: OpenVinoInfo, fp16_ir: OpenVinoInfo) -> None:
    ratio = fp16_ir.size_bytes / fp32_ir.size_bytes
    bin_ratio = fp16_ir.bin.stat().st_size / fp32_ir.bin.stat().st_size
    print(
        f"\nFP32 IR {fp32_ir.size_bytes} B (bin {fp32_ir.bin.stat().st_size} B), "
        f"FP16 IR {fp16_ir.size_bytes} B (bin {fp16_ir.bin.stat().st_size} B): "
        f"ratio {ratio:.3f}, weights ratio {bin_ratio:.3f}"
    )
    assert 0.45 <= bin_ratio <= 0.55
    assert ratio <= 0.7  # the .xml (~14 KB here, compacted) does not shrink


def test_ir_names_its_tensors_and_has_a_dynamic_batch(fp16_ir: OpenVinoInfo) -> None:
    import openvino as ov

    ir = ov.Core().read_model(str(fp16_ir.xml))
    assert INPUT_NAME in ir.inputs[0].get_names()
    assert OUTPUT_NAME in ir.outputs[0].get_names()
    shape = ir.inputs[0].get_partial_shape()
    assert shape[0].is_dynamic
    assert [shape[i].get_length() for i in range(1, 4)] == list(SHAPE)


def test_ir_xml_is_compact_and_keeps_the_fp16_decompression_marks(
    fp16_ir: OpenVinoInfo, int8_ir: OpenVinoInfo
) -> None:
    import openvino as ov

    for info in (fp16_ir, int8_ir):
        text = info.xml.read_text()
        assert "\t" not in text and "aten::" not in text and "self.features" not in text
        ir = ov.Core().read_model(str(info.xml))
        named = {tuple(out.get_names()) for op in ir.get_ops() for out in op.outputs()}
        assert named - {()} == {(INPUT_NAME,), (OUTPUT_NAME,)}
    assert fp16_ir.xml.read_text().count('name="decompression"') >= 3  # conv, conv, linear


def test_export_leaves_the_model_mode_and_folder_clean(trained: Trained, tmp_path: Path) -> None:
    trained.model.train()
    try:
        info = export_openvino(
            trained.model, tmp_path / "new" / "dir", input_shape=SHAPE, stem="cnn"
        )
        assert trained.model.training
    finally:
        trained.model.eval()
    assert [p.name for p in _files(tmp_path / "new" / "dir")] == ["cnn.bin", "cnn.xml"]
    assert info.xml.name == "cnn.xml"


# ---------------------------------------------------------------------------- INT8


def test_int8_ir_keeps_accuracy(
    trained: Trained, fp32_ir: OpenVinoInfo, int8_ir: OpenVinoInfo
) -> None:
    assert int8_ir.precision == "int8"
    assert int8_ir.recipe is not None
    assert "300 calibration samples" in int8_ir.recipe
    assert int8_ir.size_bytes == int8_ir.xml.stat().st_size + int8_ir.bin.stat().st_size
    logits = openvino_runner(int8_ir.xml)(trained.split.test.x)
    accuracy = _accuracy(logits, trained.split.test.y)
    agreement = _agreement(logits, trained.logits)
    err = float(np.abs(logits - trained.logits).max())
    ratio = int8_ir.size_bytes / fp32_ir.size_bytes
    bin_ratio = int8_ir.bin.stat().st_size / fp32_ir.bin.stat().st_size
    print(
        f"\nINT8 IR ({int8_ir.recipe}): accuracy {accuracy:.4f} vs torch {trained.accuracy:.4f} "
        f"(drop {100 * (trained.accuracy - accuracy):.2f} points), agreement {agreement:.4f}, "
        f"max abs error {err:.3f}; size {int8_ir.size_bytes} B = {ratio:.3f} x FP32 IR "
        f"(weights {bin_ratio:.3f} x)"
    )
    assert trained.accuracy - accuracy <= 0.01
    assert agreement >= 0.98
    assert bin_ratio < 0.4


def test_int8_runner_takes_any_batch_size(trained: Trained, int8_ir: OpenVinoInfo) -> None:
    run = openvino_runner(int8_ir.xml)
    full = run(trained.split.test.x[:256])
    for batch in (1, 7, 256):
        logits = run(trained.split.test.x[:batch])
        assert logits.shape == (batch, 10)
        np.testing.assert_allclose(logits, full[:batch], atol=1e-4)


def test_quantize_uses_at_most_the_samples_given_and_prints_nothing(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calibration = trained.split.train.x[:20]
    info = quantize_openvino_int8(trained.model, tmp_path, calibration, input_shape=SHAPE)
    assert info.recipe is not None
    assert info.recipe.endswith(", 20 calibration samples")
    assert capsys.readouterr().out == ""  # NNCF's progress bars stay off stdout
    logits = openvino_runner(info.xml)(trained.split.test.x[:100])
    assert _agreement(logits, trained.logits[:100]) >= 0.95


# ---------------------------------------------------------------------------- failures


def test_wrong_input_shape_is_a_clear_error_and_writes_nothing(
    trained: Trained, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"does not accept input of shape \(batch, 3, 28, 28\)"):
        export_openvino(trained.model, out, input_shape=(3, 28, 28))
    assert _files(out) == []
    calibration = np.zeros((4, 3, 28, 28), dtype=np.float32)
    with pytest.raises(ConfigError, match="does not accept input"):
        quantize_openvino_int8(trained.model, out, calibration, input_shape=(3, 28, 28))
    assert _files(out) == []


def test_converter_failure_raises_export_error_and_writes_nothing(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino as ov

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("unsupported operation aten::frobnicate")

    monkeypatch.setattr(ov, "convert_model", broken)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"could not convert.*frobnicate") as info:
        export_openvino(trained.model, out, input_shape=SHAPE)
    assert info.value.exit_code == 6
    assert _files(out) == []


def test_save_failure_removes_half_written_files(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino as ov

    def half_write(model: Any, path: str, **kwargs: Any) -> None:
        Path(path).write_text("<net>")  # the .xml is written, then the disk fills up
        raise OSError(28, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("unrelated")
    monkeypatch.setattr(ov, "save_model", half_write)
    with pytest.raises(ExportError, match="could not save"):
        export_openvino(trained.model, out, input_shape=SHAPE)
    assert [p.name for p in _files(out)] == ["keep.txt"]


def test_failed_export_keeps_the_previous_ir(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openvino as ov

    first = export_openvino(trained.model, tmp_path, input_shape=SHAPE)
    before = first.bin.read_bytes()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ov, "save_model", broken)
    with pytest.raises(ExportError):
        export_openvino(trained.model, tmp_path, input_shape=SHAPE)
    assert first.bin.read_bytes() == before
    assert [p.name for p in _files(tmp_path)] == ["model.bin", "model.xml"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": ()}, "input_shape"),
        ({"input_shape": (1, 0, 28)}, "input_shape"),
        ({"input_shape": SHAPE, "precision": "int4"}, "precision"),
        ({"input_shape": SHAPE, "stem": "../escape"}, "stem"),
        ({"input_shape": SHAPE, "stem": ""}, "stem"),
    ],
)
def test_export_rejects_bad_arguments(
    trained: Trained, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        export_openvino(trained.model, tmp_path, **kwargs)
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("calibration", "subset_size", "message"),
    [
        (np.zeros((0, *SHAPE), dtype=np.float32), 300, "calibration must have shape"),
        (np.zeros((4, 28, 28), dtype=np.float32), 300, "calibration must have shape"),
        (np.full((4, *SHAPE), np.nan, dtype=np.float32), 300, "NaN"),
        (np.zeros((4, *SHAPE), dtype=np.float32), 0, "subset_size"),
        (np.array([["a"]]), 300, "calibration must have shape"),
    ],
)
def test_quantize_rejects_bad_calibration(
    trained: Trained, tmp_path: Path, calibration: np.ndarray, subset_size: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        quantize_openvino_int8(
            trained.model, tmp_path, calibration, input_shape=SHAPE, subset_size=subset_size
        )
    assert _files(tmp_path) == []


def test_runner_rejects_missing_files_and_bad_input(fp16_ir: OpenVinoInfo, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        openvino_runner(tmp_path / "absent.xml")
    with pytest.raises(ConfigError, match="threads"):
        openvino_runner(fp16_ir.xml, threads=0)
    run = openvino_runner(fp16_ir.xml)
    with pytest.raises(ConfigError, match=r"shape \(batch, 1, 28, 28\)"):
        run(np.zeros((2, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ConfigError, match="shape"):
        run(np.zeros((1, 28, 28), dtype=np.float32))
    with pytest.raises(ConfigError, match="real numbers"):
        run(np.zeros((1, *SHAPE), dtype=np.complex64))
