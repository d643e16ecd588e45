"""ONNX export, INT8 quantization and parity checks on the real default model and data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pollinate.data import DatasetSplit
from pollinate.errors import ConfigError
from pollinate.export._onnx import OnnxInfo, export_onnx, onnx_session
from pollinate.export._onnx_quant import quantize_onnx_int8
from pollinate.export._parity import (
    ExportError,
    Parity,
    check_tolerances,
    latency_ms,
    measure_parity,
    torch_logits,
)

pytestmark = pytest.mark.unit

CALIBRATION_SAMPLES = 300


@pytest.fixture(scope="module")
def fp32(
    trained: torch.nn.Module, split: DatasetSplit, tmp_path_factory: pytest.TempPathFactory
) -> OnnxInfo:
    folder = tmp_path_factory.mktemp("fp32")
    return export_onnx(trained, folder / "model.onnx", input_shape=split.input_shape)


@pytest.fixture(scope="module")
def int8(
    fp32: OnnxInfo, split: DatasetSplit, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    calibration = split.train.x[:CALIBRATION_SAMPLES]
    recipe = quantize_onnx_int8(fp32.path, out, calibration)
    return out, recipe


def test_fp32_export_is_one_checked_self_contained_file(fp32: OnnxInfo) -> None:
    assert fp32.input_name == "input"
    assert fp32.output_name == "logits"
    assert fp32.opset == 18
    assert fp32.size_bytes == fp32.path.stat().st_size
    assert [p.name for p in fp32.path.parent.iterdir()] == ["model.onnx"]  # no sidecar, no temp
    onnx.checker.check_model(str(fp32.path), full_check=True)
    proto = onnx.load(str(fp32.path), load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # symbolic batch dimension


def test_fp32_matches_torch_on_the_whole_test_split(
    fp32: OnnxInfo, split: DatasetSplit, reference: np.ndarray
) -> None:
    parity = measure_parity(onnx_session(fp32.path), split.test.x, split.test.y, reference)
    print(f"\nfp32 parity: {parity}")
    assert parity.n == len(split.test)
    assert parity.max_abs_error <= 1e-4
    assert parity.agreement >= 0.999
    assert parity.accuracy == pytest.approx(parity.reference_accuracy, abs=0.001)
    check_tolerances(fp32.path.name, parity, precision="fp32")


@pytest.mark.parametrize("batch", [1, 7, 256])
def test_fp32_batch_dimension_is_dynamic(
    fp32: OnnxInfo, split: DatasetSplit, reference: np.ndarray, batch: int
) -> None:
    out = onnx_session(fp32.path)(split.test.x[:batch])
    assert out.shape == (batch, split.num_classes)
    np.testing.assert_allclose(out, reference[:batch], atol=1e-4, rtol=0)


def test_int8_keeps_accuracy_and_is_small(
    int8: tuple[Path, str], fp32: OnnxInfo, split: DatasetSplit, reference: np.ndarray
) -> None:
    path, recipe = int8
    assert "QDQ" in recipe and f"{CALIBRATION_SAMPLES} samples" in recipe
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "no int8 weights in the quantized model"
    parity = measure_parity(onnx_session(path), split.test.x, split.test.y, reference)
    ratio = path.stat().st_size / fp32.size_bytes
    print(
        f"\nint8 parity: {parity}\nrecipe: {recipe}\nsizes: fp32 {fp32.size_bytes} B, "
        f"int8 {path.stat().st_size} B, ratio {ratio:.3f}"
    )
    assert parity.accuracy_drop <= 0.01
    assert parity.agreement >= 0.98
    assert ratio <= 0.35
    check_tolerances(path.name, parity, precision="int8")


def test_int8_biases_have_no_zero_points_and_still_fuse(
    int8: tuple[Path, str], tmp_path: Path
) -> None:
    import onnxruntime as ort  # type: ignore[import-untyped]

    path, _ = int8
    proto = onnx.load(str(path))
    types = {init.name: init.data_type for init in proto.graph.initializer}
    bias_nodes = [
        node
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear" and types.get(node.input[0]) == onnx.TensorProto.INT32
    ]
    assert len(bias_nodes) == 3  # conv1, conv2, linear
    assert all(len(node.input) == 2 for node in bias_nodes)  # scale only: zero point is 0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 2 and fused.count("QGemm") == 1


def test_int8_rejects_bad_calibration(fp32: OnnxInfo, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        quantize_onnx_int8(fp32.path, tmp_path / "q.onnx", np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ExportError, match="no such ONNX file"):
        quantize_onnx_int8(tmp_path / "missing.onnx", tmp_path / "q.onnx", np.zeros((4, 1)))
    assert not (tmp_path / "q.onnx").exists()


def test_export_rejects_bad_options(trained: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(trained, tmp_path / "m.onnx", input_shape=(1, 28, 28), opset=11)
    with pytest.raises(ConfigError, match="input_shape"):
        export_onnx(trained, tmp_path / "m.onnx", input_shape=())
    with pytest.raises(ExportError, match=r"cannot export.*\(3, 28, 28\).*RuntimeError"):
        export_onnx(trained, tmp_path / "m.onnx", input_shape=(3, 28, 28))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        quantize_onnx_int8(tmp_path / "junk.onnx", tmp_path / "q.onnx", np.zeros((4, 1)))
    (tmp_path / "junk.onnx").unlink()
    with pytest.raises(ConfigError, match="threads"):
        onnx_session(tmp_path / "m.onnx", threads=0)
    assert list(tmp_path.iterdir()) == []


GOOD = Parity(n=1000, accuracy=0.95, agreement=0.995, max_abs_error=2e-6, reference_accuracy=0.952)


def test_check_tolerances_passes_good_artifacts() -> None:
    check_tolerances("model.onnx", GOOD, precision="fp32")
    check_tolerances("model.int8.onnx", GOOD, precision="int8")
    check_tolerances("model.fp16.xml", GOOD, precision="fp16")


def test_check_tolerances_names_artifact_value_and_limit() -> None:
    off = Parity(n=1000, accuracy=0.93, agreement=0.97, max_abs_error=3e-3, reference_accuracy=0.95)
    with pytest.raises(ExportError, match=r"'model\.onnx'.*0\.003.*tolerance 0\.0001") as info:
        check_tolerances("model.onnx", off, precision="fp32")
    assert info.value.exit_code == 6
    with pytest.raises(ExportError, match=r"'model\.int8\.onnx'.*2\.00 points.*1\.00 points"):
        check_tolerances("model.int8.onnx", off, precision="int8")
    nan = Parity(
        n=10, accuracy=1.0, agreement=1.0, max_abs_error=float("nan"), reference_accuracy=1.0
    )
    with pytest.raises(ExportError, match="nan"):
        check_tolerances("model.onnx", nan, precision="fp32")
    with pytest.raises(ConfigError, match="precision"):
        check_tolerances("model.onnx", GOOD, precision="int4")


def test_measure_parity_counts_agreement_and_error() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    y = np.array([0, 1, 1, 1])
    shifted = reference + np.array([[0, 0], [0, 0], [0, 2.0], [0, 0]], np.float32)
    parity = measure_parity(lambda _: shifted, np.zeros((4, 3)), y, reference, batch_size=4)
    assert parity == Parity(
        n=4, accuracy=1.0, agreement=0.75, max_abs_error=2.0, reference_accuracy=0.75
    )
    with pytest.raises(ExportError, match="shape"):
        measure_parity(lambda x: x, np.zeros((4, 3)), y, reference)
    with pytest.raises(ConfigError, match="same samples"):
        measure_parity(lambda _: reference, np.zeros((3, 3)), y, reference)


def test_latency_ms_returns_ordered_positive_percentiles(
    fp32: OnnxInfo, int8: tuple[Path, str], split: DatasetSplit
) -> None:
    for name, path in (("fp32", fp32.path), ("int8", int8[0])):
        p50, p95 = latency_ms(onnx_session(path), split.test.x[:1], repeats=200, warmup=20)
        print(f"\n{name} single-sample latency: p50 {p50:.3f} ms, p95 {p95:.3f} ms")
        assert 0 < p50 <= p95
    with pytest.raises(ConfigError, match="repeats"):
        latency_ms(lambda x: x, split.test.x[:1], repeats=0)


def test_a_model_the_int8_quantizer_cannot_handle_gets_the_way_out(tmp_path: Path) -> None:
    """The built-in lstm (Opacus' DPLSTM): its FP32 export matches torch; onnxruntime's QDQ
    quantizer writes an invalid graph for it, which is refused with what to do instead."""
    from pollinate.models import build_model

    torch.manual_seed(0)
    model = build_model("lstm", input_shape=(1, 8, 8)).eval()
    info = export_onnx(model, tmp_path / "lstm.onnx", input_shape=(1, 8, 8))
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(onnx_session(info.path)(x), expected, atol=1e-5)
    with pytest.raises(ExportError, match=r"cannot handle this model's graph: .*--precision fp32"):
        quantize_onnx_int8(info.path, tmp_path / "lstm.int8.onnx", x)
    assert not (tmp_path / "lstm.int8.onnx").exists()


def test_scatnet_exports_with_its_fixed_filters_and_quantizes(
    split: DatasetSplit, tmp_path: Path
) -> None:
    """The scattering front end (reflected borders, grouped strided low-pass) exports as
    plain ONNX: FP32 within the pipeline's tolerance of torch, and INT8 runs and agrees."""
    from pollinate.models import build_model

    torch.manual_seed(0)
    model = build_model("scatnet", input_shape=(1, 28, 28), num_classes=10).eval()
    info = export_onnx(model, tmp_path / "scatnet.onnx", input_shape=(1, 28, 28))
    x = np.ascontiguousarray(split.test.x[:200], dtype=np.float32)
    expected = torch_logits(model, x)
    got = onnx_session(info.path)(x)
    assert float(np.max(np.abs(got - expected))) <= 1e-4
    out = tmp_path / "scatnet.int8.onnx"
    quantize_onnx_int8(info.path, out, np.ascontiguousarray(split.train.x[:100], np.float32))
    agreement = np.mean(onnx_session(out)(x).argmax(1) == expected.argmax(1))
    assert agreement > 0.9
