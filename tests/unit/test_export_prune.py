"""Structured pruning + INT8 of the default CNN on real MNIST: size and accuracy targets.

The unpruned model is trained on the first 3000 samples of the train split; the pruned model
is fine-tuned on the remaining 1000 train samples, which stand for the data a server holds in
a real federation. Nothing here trains on the test split, which only measures accuracy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pollinate.data import DatasetSplit, load_dataset
from pollinate.errors import ConfigError
from pollinate.export._onnx import OnnxInfo, export_onnx, onnx_session
from pollinate.export._onnx_quant import quantize_onnx_int8
from pollinate.export._parity import check_tolerances, measure_parity, torch_logits
from pollinate.export._prune import PrunedCNN, PruneResult, prune_structured
from pollinate.models import SmallCNN, build_model
from tests.support.models import train_default_cnn

pytestmark = pytest.mark.unit

#: Train samples the unpruned model learns from; the rest of the train split is server-side.
BASE_SAMPLES = 3000
CALIBRATION_SAMPLES = 300
AMOUNT = 0.75
#: Targets of the issue: INT8 pruned file <= 10% of the unpruned FP32 ONNX file, <= 1 point.
MAX_SIZE_RATIO = 0.10
MAX_ACCURACY_DROP = 0.01


@pytest.fixture(scope="module")
def split() -> DatasetSplit:
    return load_dataset("mnist", seed=42)


@pytest.fixture(scope="module")
def server_data(split: DatasetSplit) -> tuple[np.ndarray, np.ndarray]:
    """Held-out train samples (never the test split): the server's fine-tune set."""
    return np.array(split.train.x[BASE_SAMPLES:]), np.array(split.train.y[BASE_SAMPLES:])


@pytest.fixture(scope="module")
def trained(split: DatasetSplit) -> SmallCNN:
    """The default CNN after two epochs of SGD on 3000 train samples (~96% test accuracy)."""
    model = train_default_cnn(split.train.x[:BASE_SAMPLES], split.train.y[:BASE_SAMPLES])
    assert isinstance(model, SmallCNN)
    return model


@pytest.fixture(scope="module")
def reference(trained: SmallCNN, split: DatasetSplit) -> np.ndarray:
    logits = torch_logits(trained, split.test.x)
    accuracy = float(np.mean(logits.argmax(axis=1) == split.test.y))
    assert accuracy >= 0.93, f"the trained model is too weak: {accuracy:.2%}"
    return logits


@pytest.fixture(scope="module")
def fp32(
    trained: SmallCNN, split: DatasetSplit, tmp_path_factory: pytest.TempPathFactory
) -> OnnxInfo:
    folder = tmp_path_factory.mktemp("unpruned")
    return export_onnx(trained, folder / "model.onnx", input_shape=split.input_shape)


@pytest.fixture(scope="module")
def pruned(trained: SmallCNN, server_data: tuple[np.ndarray, np.ndarray]) -> PruneResult:
    x, y = server_data
    return prune_structured(trained, amount=AMOUNT, finetune_x=x, finetune_y=y)


@pytest.fixture(scope="module")
def pruned_fp32(
    pruned: PruneResult, split: DatasetSplit, tmp_path_factory: pytest.TempPathFactory
) -> OnnxInfo:
    folder = tmp_path_factory.mktemp("pruned")
    return export_onnx(pruned.model, folder / "pruned.onnx", input_shape=split.input_shape)


def test_result_describes_the_pruned_model(trained: SmallCNN, pruned: PruneResult) -> None:
    assert pruned.kept_channels == (4, 8)
    assert isinstance(pruned.model, PrunedCNN)
    assert not pruned.model.training
    assert pruned.params_before == sum(p.numel() for p in trained.parameters()) == 18_474
    assert pruned.params_after == sum(p.numel() for p in pruned.model.parameters()) == 2_226
    assert pruned.recipe == (
        "structured L1 channel pruning 16->4 / 32->8, fine-tuned 10 epochs on 1000 "
        "server-side samples with distillation"
    )


def test_pruning_leaves_the_original_model_alone(
    trained: SmallCNN, reference: np.ndarray, split: DatasetSplit, pruned: PruneResult
) -> None:
    assert not trained.training
    np.testing.assert_array_equal(torch_logits(trained, split.test.x), reference)


def test_amount_zero_without_finetune_is_the_same_model(
    trained: SmallCNN, split: DatasetSplit
) -> None:
    result = prune_structured(trained, amount=0.0, finetune_x=None, finetune_y=None)
    assert result.kept_channels == (16, 32)
    assert result.params_after == result.params_before
    assert result.recipe.endswith(", not fine-tuned")
    x = split.test.x[:64]
    np.testing.assert_allclose(
        torch_logits(result.model, x), torch_logits(trained, x), rtol=0, atol=1e-5
    )


def test_keeps_the_filters_with_the_largest_l1_norm(trained: SmallCNN) -> None:
    result = prune_structured(trained, amount=AMOUNT, finetune_x=None, finetune_y=None, epochs=0)
    assert isinstance(result.model, PrunedCNN)
    conv1, conv2 = trained.features[0], trained.features[4]
    p_conv1, p_conv2 = result.model.features[0], result.model.features[4]
    assert isinstance(conv1, torch.nn.Conv2d) and isinstance(conv2, torch.nn.Conv2d)
    assert isinstance(p_conv1, torch.nn.Conv2d) and isinstance(p_conv2, torch.nn.Conv2d)
    keep1 = torch.sort(torch.topk(conv1.weight.abs().flatten(1).sum(1), 4).indices).values
    keep2 = torch.sort(torch.topk(conv2.weight.abs().flatten(1).sum(1), 8).indices).values
    torch.testing.assert_close(p_conv1.weight, conv1.weight[keep1])
    torch.testing.assert_close(p_conv2.weight, conv2.weight[keep2][:, keep1])
    head, p_head = trained.head[1], result.model.head[1]
    assert isinstance(head, torch.nn.Linear) and isinstance(p_head, torch.nn.Linear)
    torch.testing.assert_close(p_head.weight, head.weight.view(10, 32, 16)[:, keep2].flatten(1))


def test_pruned_fp32_onnx_reproduces_the_pruned_model(
    pruned: PruneResult, pruned_fp32: OnnxInfo, split: DatasetSplit
) -> None:
    logits = torch_logits(pruned.model, split.test.x)
    parity = measure_parity(onnx_session(pruned_fp32.path), split.test.x, split.test.y, logits)
    check_tolerances("pruned.onnx", parity, precision="fp32", max_abs_error_fp32=1e-4)
    assert parity.max_abs_error <= 1e-4


@pytest.fixture(scope="module")
def pruned_int8(
    pruned_fp32: OnnxInfo, split: DatasetSplit, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    int8 = tmp_path_factory.mktemp("pruned-int8") / "pruned-int8.onnx"
    quantize_onnx_int8(pruned_fp32.path, int8, np.array(split.train.x[:CALIBRATION_SAMPLES]))
    return int8


def test_pruned_int8_meets_size_and_accuracy_targets(
    pruned_int8: Path,
    fp32: OnnxInfo,
    reference: np.ndarray,
    split: DatasetSplit,
) -> None:
    ratio = pruned_int8.stat().st_size / fp32.size_bytes
    parity = measure_parity(onnx_session(pruned_int8), split.test.x, split.test.y, reference)
    # Measured: 5992 / 76956 bytes = 0.078, accuracy drop -0.15 +- 0.2 points over 8 seeds
    # (range -0.5 to 0.0) on an AVX2 CPU without VNNI, equal to the unfused QDQ graph's.
    assert ratio <= MAX_SIZE_RATIO, f"size ratio {ratio:.3f}"
    assert parity.accuracy_drop <= MAX_ACCURACY_DROP, (
        f"accuracy {parity.reference_accuracy:.2%} -> {parity.accuracy:.2%}"
    )
    check_tolerances("pruned-int8.onnx", parity, precision="int8", max_accuracy_drop=0.01)


def test_pruned_int8_kernels_do_not_saturate(pruned_int8: Path, split: DatasetSplit) -> None:
    """7-bit weights: ONNX Runtime's fused kernels give what the QDQ graph means, on any CPU.

    x86 CPUs without VNNI add ``uint8 x int8`` products pairwise in saturating int16; with
    full 8-bit weights the first convolution clipped on every digit and cost up to 1.3 points
    there, while the same graph in exact arithmetic (as VNNI kernels compute it) lost none.
    The weight range is what prevents it everywhere; the comparison with the unfused graph
    (float arithmetic on dequantized values) shows it on CPUs that have the saturating kernels.
    """
    import onnxruntime as ort  # type: ignore[import-untyped]

    proto = onnx.load(str(pruned_int8))
    int8 = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    }
    weights = [
        int8[node.input[0]]
        for node in proto.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in int8
    ]
    assert len(weights) == 3  # conv1, conv2, linear
    assert all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in weights)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(pruned_int8), options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(split.test.x, dtype=np.float32)
    exact = unfused.run(None, {unfused.get_inputs()[0].name: x})[0]
    fused = onnx_session(pruned_int8)(x)
    assert np.mean(fused.argmax(axis=1) == exact.argmax(axis=1)) >= 0.998


@pytest.mark.parametrize("amount", [-0.1, 0.96, 1.0, math.nan, True, "0.5"])
def test_amount_out_of_range_is_a_config_error(trained: SmallCNN, amount: object) -> None:
    with pytest.raises(ConfigError, match="amount"):
        prune_structured(
            trained,
            amount=amount,  # type: ignore[arg-type]
            finetune_x=None,
            finetune_y=None,
        )


def test_other_models_are_a_config_error(split: DatasetSplit) -> None:
    mlp = build_model("mlp", input_shape=split.input_shape)
    with pytest.raises(ConfigError, match=r"SmallCNN") as info:
        prune_structured(mlp, amount=0.5, finetune_x=None, finetune_y=None)  # type: ignore[arg-type]
    assert "'cnn'" in str(info.value) and "MLP" in str(info.value)


def test_inconsistent_finetune_data_is_a_config_error(
    trained: SmallCNN, server_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = server_data
    with pytest.raises(ConfigError, match="together"):
        prune_structured(trained, amount=0.5, finetune_x=x, finetune_y=None)
    with pytest.raises(ConfigError, match="one label per sample"):
        prune_structured(trained, amount=0.5, finetune_x=x, finetune_y=y[:-1])
    with pytest.raises(ConfigError, match="epochs"):
        prune_structured(trained, amount=0.5, finetune_x=x, finetune_y=y, epochs=-1)
