"""Structured pruning (torch-pruning) + INT8 on real MNIST: size and accuracy targets.

The unpruned default CNN is trained on the first 3000 samples of the train split; the pruned
model is fine-tuned on the remaining 1000 train samples, which stand for the data a server
holds in a real federation. Nothing here trains on the test split, which only measures
accuracy. The other built-in models and a user's model are pruned without training: their
structure, output shape and ONNX parity are checked.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pollinate.data import DatasetSplit, load_dataset
from pollinate.errors import ConfigError
from pollinate.export._onnx import OnnxInfo, export_onnx, onnx_session
from pollinate.export._onnx_quant import quantize_onnx_int8
from pollinate.export._parity import check_tolerances, measure_parity, torch_logits
from pollinate.export._prune import PruneResult, cross_entropy_loss, prune_structured
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
INPUT_SHAPE = (1, 28, 28)


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
    return prune_structured(
        trained, input_shape=INPUT_SHAPE, amount=AMOUNT, finetune_x=x, finetune_y=y
    )


@pytest.fixture(scope="module")
def pruned_fp32(
    pruned: PruneResult, split: DatasetSplit, tmp_path_factory: pytest.TempPathFactory
) -> OnnxInfo:
    folder = tmp_path_factory.mktemp("pruned")
    return export_onnx(pruned.model, folder / "pruned.onnx", input_shape=split.input_shape)


def test_result_describes_the_pruned_model(trained: SmallCNN, pruned: PruneResult) -> None:
    assert pruned.kept_channels == {
        "features.0": (16, 4),
        "features.4": (32, 8),
        "head.1": (10, 10),
    }
    assert pruned.model is not trained and not pruned.model.training
    assert pruned.params_before == sum(p.numel() for p in trained.parameters()) == 18_474
    assert pruned.params_after == sum(p.numel() for p in pruned.model.parameters()) == 2_226
    norms = [m for m in pruned.model.modules() if isinstance(m, nn.GroupNorm)]
    assert [(m.num_groups, m.num_channels) for m in norms] == [(4, 4), (4, 8)]
    assert pruned.recipe == (
        "structured L1 channel pruning (torch-pruning) of 75%: 2 layers, 48->12 channels, "
        "18474->2226 parameters, fine-tuned 10 epochs on 1000 server-side samples with "
        "distillation"
    )


def test_pruning_leaves_the_original_model_alone(
    trained: SmallCNN, reference: np.ndarray, split: DatasetSplit, pruned: PruneResult
) -> None:
    assert not trained.training
    np.testing.assert_array_equal(torch_logits(trained, split.test.x), reference)


def test_amount_zero_without_finetune_is_the_same_model(
    trained: SmallCNN, split: DatasetSplit
) -> None:
    result = prune_structured(
        trained, input_shape=INPUT_SHAPE, amount=0.0, finetune_x=None, finetune_y=None
    )
    assert result.kept_channels == {
        "features.0": (16, 16),
        "features.4": (32, 32),
        "head.1": (10, 10),
    }
    assert result.params_after == result.params_before
    assert result.recipe.endswith(", not fine-tuned")
    x = split.test.x[:64]
    np.testing.assert_allclose(
        torch_logits(result.model, x), torch_logits(trained, x), rtol=0, atol=1e-5
    )


def _top_per_group(scores: torch.Tensor, groups: int, keep: int) -> torch.Tensor:
    """The ``keep`` best channels of each of ``groups`` equal contiguous groups, ascending."""
    size = len(scores) // groups
    best = [torch.topk(scores[g * size : (g + 1) * size], keep).indices + g * size
            for g in range(groups)]  # fmt: skip
    return torch.sort(torch.cat(best)).values


def test_keeps_the_channels_with_the_largest_group_l1_norm(trained: SmallCNN) -> None:
    """Reference: a channel's score is its filter's L1 norm plus the L1 norm of the weights
    that read it in the next layer; each GroupNorm group keeps its best quarter."""
    result = prune_structured(
        trained, input_shape=INPUT_SHAPE, amount=AMOUNT, finetune_x=None, finetune_y=None,
        epochs=0,
    )  # fmt: skip
    conv1, gn1, conv2 = trained.features[0], trained.features[1], trained.features[4]
    head = trained.head[1]
    assert isinstance(result.model, SmallCNN)  # the same class, with fewer channels
    p_conv1, p_gn1, p_conv2 = (
        result.model.features[0],
        result.model.features[1],
        result.model.features[4],
    )
    p_head = result.model.head[1]
    assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
    assert isinstance(p_conv1, nn.Conv2d) and isinstance(p_conv2, nn.Conv2d)
    assert isinstance(gn1, nn.GroupNorm) and isinstance(p_gn1, nn.GroupNorm)
    assert isinstance(head, nn.Linear) and isinstance(p_head, nn.Linear)
    with torch.no_grad():
        score1 = conv1.weight.abs().flatten(1).sum(1) + conv2.weight.abs().sum((0, 2, 3))
        score2 = conv2.weight.abs().flatten(1).sum(1) + head.weight.abs().view(10, 32, 16).sum(
            (0, 2)
        )
    keep1, keep2 = _top_per_group(score1, 4, 1), _top_per_group(score2, 4, 2)
    torch.testing.assert_close(p_conv1.weight, conv1.weight[keep1])
    torch.testing.assert_close(p_gn1.weight, gn1.weight[keep1])
    torch.testing.assert_close(p_conv2.weight, conv2.weight[keep2][:, keep1])
    torch.testing.assert_close(p_head.weight, head.weight.view(10, 32, 16)[:, keep2].flatten(1))
    torch.testing.assert_close(p_head.bias, head.bias)


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
    # Measured: 5992 / 76956 bytes = 0.078, accuracy drop 0.30 +- 0.10 points over 8
    # fine-tune seeds (range 0.2 to 0.5) on an AMD EPYC CPU with AVX-512 VNNI.
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
            input_shape=INPUT_SHAPE,
            amount=amount,  # type: ignore[arg-type]
            finetune_x=None,
            finetune_y=None,
        )


def test_inconsistent_finetune_data_is_a_config_error(
    trained: SmallCNN, server_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = server_data
    shape = INPUT_SHAPE
    with pytest.raises(ConfigError, match="together"):
        prune_structured(trained, input_shape=shape, amount=0.5, finetune_x=x, finetune_y=None)
    with pytest.raises(ConfigError, match="one label per sample"):
        prune_structured(trained, input_shape=shape, amount=0.5, finetune_x=x, finetune_y=y[:-1])
    with pytest.raises(ConfigError, match="epochs"):
        prune_structured(
            trained, input_shape=shape, amount=0.5, finetune_x=x, finetune_y=y, epochs=-1
        )


# --- any model: the built-ins and a user's own ---------------------------------------------


def _conv_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (m.in_channels, m.out_channels)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet", input_shape=INPUT_SHAPE, num_classes=10).eval()


@pytest.fixture(scope="module")
def pruned_resnet(resnet: nn.Module) -> PruneResult:
    return prune_structured(
        resnet, input_shape=INPUT_SHAPE, amount=AMOUNT, finetune_x=None, finetune_y=None
    )


def test_resnet_loses_three_quarters_of_every_channel_group(
    resnet: nn.Module, pruned_resnet: PruneResult, split: DatasetSplit
) -> None:
    before, after = _conv_widths(resnet), _conv_widths(pruned_resnet.model)
    assert len(before) == 18 and before.keys() == after.keys()
    for name, (_, out) in before.items():
        assert after[name][1] == out // 4, name
        assert pruned_resnet.kept_channels[name] == (out, out // 4)
    assert after["stem.0"][0] == 1  # the input keeps its channel
    assert pruned_resnet.kept_channels["head.2"] == (10, 10)  # the output keeps its width
    for m in pruned_resnet.model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == 8 and m.num_channels % 8 == 0
    assert pruned_resnet.params_before == 1_275_370
    assert pruned_resnet.params_after == sum(p.numel() for p in pruned_resnet.model.parameters())
    assert pruned_resnet.params_after < pruned_resnet.params_before / 10
    x = torch.from_numpy(np.array(split.test.x[:8]))
    with torch.no_grad():
        assert pruned_resnet.model(x).shape == (8, 10)


@pytest.mark.parametrize("name", ["resnet", "mlp"])
def test_pruned_model_exports_to_onnx_with_parity(
    name: str,
    pruned_resnet: PruneResult,
    split: DatasetSplit,
    tmp_path: Path,
) -> None:
    if name == "resnet":
        result = pruned_resnet
    else:
        torch.manual_seed(0)
        mlp = build_model(name, input_shape=INPUT_SHAPE, num_classes=10)
        result = prune_structured(
            mlp, input_shape=INPUT_SHAPE, amount=AMOUNT, finetune_x=None, finetune_y=None
        )
        assert result.kept_channels == {
            "net.1": (128, 32), "net.3": (128, 32), "net.5": (10, 10),
        }  # fmt: skip
    info = export_onnx(result.model, tmp_path / f"{name}.onnx", input_shape=INPUT_SHAPE)
    x = np.ascontiguousarray(split.test.x[:256], dtype=np.float32)
    expected = torch_logits(result.model, x)
    got = onnx_session(info.path)(x)
    assert got.shape == expected.shape == (256, 10)
    assert float(np.max(np.abs(got - expected))) <= 1e-4


class _TwoBranchNet(nn.Module):
    """A user's model: two convolutions summed, GroupNorm, and a 1x1 convolution as output."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(1, 12, 3, padding=1)
        self.point = nn.Conv2d(1, 12, 1)
        self.mix = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wide(x) + self.point(x))
        h = torch.relu(self.norm(self.mix(h)))
        return self.out(h).mean(dim=(2, 3))  # type: ignore[no-any-return]


def _rows_kept(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows (output channels) of ``original`` the pruned weight kept, in order."""
    return [
        next(i for i in range(len(original)) if torch.equal(original[i], row)) for row in pruned
    ]


def test_a_users_model_prunes_and_fine_tunes_with_its_loss() -> None:
    torch.manual_seed(0)
    model = _TwoBranchNet().eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, size=64)
    calls: list[int] = []

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(len(targets))
        return cross_entropy_loss(outputs, targets)

    result = prune_structured(
        model, input_shape=(1, 8, 8), amount=0.5, finetune_x=x, finetune_y=y, epochs=1,
        distill=False, loss=loss,
    )  # fmt: skip
    # through the caller's loss, once per learning rate tried: one epoch on four fifths of the
    # 64 samples (batches of 32 and 20), then the held-out fifth (12) that picks the rate
    assert calls == [32, 20, 12, 32, 20, 12]
    assert result.kept_channels == {
        "wide": (12, 6), "point": (12, 6), "mix": (16, 8), "out": (3, 3),
    }  # fmt: skip
    pruned = result.model
    assert isinstance(pruned, _TwoBranchNet) and pruned.norm.num_groups == 4
    with torch.no_grad():
        assert pruned(torch.from_numpy(x[:5])).shape == (5, 3)
    # Summed branches are cut together: both keep the same channels.
    check = prune_structured(
        model, input_shape=(1, 8, 8), amount=0.5, finetune_x=None, finetune_y=None
    ).model
    assert isinstance(check, _TwoBranchNet)
    kept = _rows_kept(model.wide.weight, check.wide.weight)
    assert kept == _rows_kept(model.point.weight, check.point.weight)
    assert len(kept) == 6 and kept == sorted(kept)


def test_an_lstm_is_a_config_error_naming_the_model() -> None:
    lstm = build_model("lstm", input_shape=INPUT_SHAPE, num_classes=10)
    with pytest.raises(ConfigError, match=r"cannot prune model 'lstm' \(RowLSTM\)") as info:
        prune_structured(
            lstm, input_shape=INPUT_SHAPE, amount=0.5, finetune_x=None, finetune_y=None,
            name="lstm",
        )  # fmt: skip
    assert "recurrent layer rnn (DPLSTM)" in str(info.value)
    assert "export without --prune" in str(info.value)


class _GatedNet(nn.Module):
    """A gated (GLU-style) convolution: torch-pruning cannot map channels through the chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.conv(x).chunk(2, dim=1)
        return self.fc((value * torch.sigmoid(gate)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def test_a_model_torch_pruning_cannot_cut_is_a_config_error() -> None:
    model = _GatedNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"cannot prune model _GatedNet: torch-pruning cannot"):
        prune_structured(
            model, input_shape=INPUT_SHAPE, amount=0.5, finetune_x=None, finetune_y=None
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_model_without_prunable_channels_is_a_config_error() -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match=r"Sequential: it has no channels that can be removed"):
        prune_structured(
            linear, input_shape=INPUT_SHAPE, amount=0.5, finetune_x=None, finetune_y=None
        )
