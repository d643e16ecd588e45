"""Tasks: detection from the labels, losses and metrics against slow obvious references, and
binary / regression training equal on the fast engine and Opacus."""

from __future__ import annotations

import copy
import itertools
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pollinate.clientapp.training import TrainSettings, evaluate, train
from pollinate.data import load_dataset
from pollinate.errors import ConfigError, DataError, ExportError
from pollinate.models import checked_model
from pollinate.privacy.noise import NoiseSource
from pollinate.simulation.cohort import CohortMember, train_cohort
from pollinate.tasks import Task, TaskKind, detect_task, task_targets

BINARY = Task(kind=TaskKind.BINARY, num_classes=2)
REGRESSION = Task(kind=TaskKind.REGRESSION, num_classes=0)


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    ("y", "kind"),
    [
        (np.array([0, 1, 1, 0]), TaskKind.BINARY),
        (np.array([0.0, 1.0, 1.0]), TaskKind.BINARY),
        (np.array([True, False]), TaskKind.BINARY),
        (np.array([0, 1, 2, 2, 1]), TaskKind.CLASSIFICATION),
        (np.array([2.0, 0.0, 1.0]), TaskKind.CLASSIFICATION),
        (np.array([0.5, 1.25, 3.0]), TaskKind.REGRESSION),
        (np.array([25.0, 151.0, 75.0]), TaskKind.REGRESSION),  # diabetes: whole floats
        (np.array([-3.0, 0.0, 2.0]), TaskKind.REGRESSION),
        (np.array([1, 2, 3]), TaskKind.CLASSIFICATION),  # integers: refused later, with the fix
    ],
)
def test_auto_detects_the_task_from_the_labels(y: np.ndarray, kind: TaskKind) -> None:
    assert detect_task("auto", y, "test") == kind
    assert detect_task("regression", y, "test") == TaskKind.REGRESSION  # as set wins


@pytest.mark.parametrize(
    ("kind", "y", "needle"),
    [
        (TaskKind.CLASSIFICATION, np.array([0.0, 0.5]), "regression target given to a"),
        (TaskKind.BINARY, np.array([0, 1, 2]), "binary task needs labels 0 and 1"),
        (TaskKind.BINARY, np.array([0, -1]), "negative"),
        (TaskKind.REGRESSION, np.array([1.0, np.nan]), "target 1 is nan"),
        (TaskKind.REGRESSION, np.array(["a", "b"]), "must be numbers"),
    ],
)
def test_targets_that_do_not_fit_the_task_are_refused(
    kind: TaskKind, y: np.ndarray, needle: str
) -> None:
    with pytest.raises(DataError, match=needle):
        task_targets(kind, y, "test")


def test_regression_targets_are_float32_and_binary_targets_0_or_1() -> None:
    assert task_targets(TaskKind.REGRESSION, np.array([1, 2]), "t").dtype == np.float32
    binary = task_targets(TaskKind.BINARY, np.array([1, 0, 1]), "t")
    assert binary.dtype == np.float32 and binary.tolist() == [1.0, 0.0, 1.0]


def test_a_binary_dataset_is_detected_and_split_stratified(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] > 0.8).astype(np.int64)  # about 20% positives
    np.savez(tmp_path / "b.npz", x=x, y=y)
    split = load_dataset(tmp_path / "b.npz", seed=1)
    assert split.task.kind == TaskKind.BINARY and split.num_outputs == 1
    assert split.num_classes == 2 and split.train.y.dtype == np.float32
    # stratified: the test part keeps the positive share within one sample
    assert abs(split.test.y.sum() - y.mean() * len(split.test)) <= 1.0


# ------------------------------------------------------------------------------ metrics


def _slow_macro_f1(pred: list[int], y: list[int], k: int) -> float:
    scores = []
    for c in range(k):
        tp = sum(p == c and t == c for p, t in zip(pred, y, strict=True))
        fp = sum(p == c and t != c for p, t in zip(pred, y, strict=True))
        fn = sum(p != c and t == c for p, t in zip(pred, y, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / k


def _slow_auc(scores: list[float], y: list[float]) -> float:
    """The probability that a random positive outscores a random negative (ties: half)."""
    pos = [s for s, t in zip(scores, y, strict=True) if t == 1]
    neg = [s for s, t in zip(scores, y, strict=True) if t == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_classification_metrics_match_a_slow_reference() -> None:
    rng = np.random.default_rng(3)
    out = rng.normal(size=(300, 4))
    y = rng.integers(0, 4, size=300)
    got = Task(num_classes=4).evaluate(out, y)
    pred = out.argmax(1).tolist()
    assert got["accuracy"] == pytest.approx(np.mean(out.argmax(1) == y))
    assert got["macro_f1"] == pytest.approx(_slow_macro_f1(pred, y.tolist(), 4))


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_is_scikit_learns_with_absent_and_unpredicted_classes(seed: int) -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    k = 6
    y = rng.integers(0, k - 1, size=40)  # class 5 never present
    out = rng.normal(size=(40, k))
    out[:, 2] -= 10.0  # class 2 never predicted
    pred = out.argmax(1)
    expected = f1_score(y, pred, average="macro", labels=np.arange(k), zero_division=0.0)
    assert Task(num_classes=k).evaluate(out, y)["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_binary_metrics_match_a_slow_reference() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=150).astype(np.float32)
    scores = np.round(y + rng.normal(scale=1.2, size=150), 1)  # rounded: some ties
    got = BINARY.evaluate(scores[:, None], y)
    assert got["auc"] == pytest.approx(_slow_auc(scores.tolist(), y.tolist()))
    assert got["accuracy"] == pytest.approx(np.mean((scores > 0) == (y == 1)))
    assert 0.6 < got["auc"] < 1.0


def test_regression_metrics_match_a_slow_reference() -> None:
    y = np.array([10.0, -4.0, 0.0, 2.5, 7.0], dtype=np.float32)
    pred = np.array([11.0, -5.0, 0.5, 2.0, 7.0])
    got = REGRESSION.evaluate(pred[:, None], y)
    errors = [p - t for p, t in zip(pred.tolist(), y.tolist(), strict=True)]
    assert got["mse"] == pytest.approx(sum(e * e for e in errors) / 5)
    assert got["mae"] == pytest.approx(sum(abs(e) for e in errors) / 5)
    assert got["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 5))
    # MAPE over the non-zero targets, in percent
    pct = [abs(e) / abs(t) for e, t in zip(errors, y.tolist(), strict=True) if t != 0]
    assert got["mape"] == pytest.approx(100 * sum(pct) / len(pct))


def test_losses_match_their_textbook_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 1)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    p = torch.sigmoid(logits[:, 0])
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
    assert torch.allclose(BINARY.sample_losses(logits, y), bce, atol=1e-6)
    assert torch.allclose(REGRESSION.sample_losses(logits, y), (logits[:, 0] - y) ** 2)
    k = torch.randn(6, 3)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    ce = -torch.log_softmax(k, 1)[torch.arange(6), labels]
    assert torch.allclose(Task(num_classes=3).sample_losses(k, labels), ce, atol=1e-6)


# ------------------------------------------------------------------------------ training


class _Tabular(nn.Module):
    def __init__(self, features: int = 6, outputs: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def _data(task: Task, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    signal = x @ np.arange(1, 7, dtype=np.float32) / 5
    if task.kind == TaskKind.BINARY:
        return x, (signal > 0).astype(np.float32)
    return x, (3 * signal + 2).astype(np.float32)


@pytest.mark.parametrize("task", [BINARY, REGRESSION], ids=["binary", "regression"])
@pytest.mark.parametrize("dp", [True, False])
def test_fast_engine_equals_the_clientapps_training(task: Task, dp: bool) -> None:
    """With every sample in one batch and no noise, nothing is random: the vectorised cohort
    must give the ClientApp's Opacus (or plain SGD) update for the task's loss."""
    torch.manual_seed(0)
    model = _Tabular()
    settings = TrainSettings(
        epochs=2, batch_size=32, learning_rate=0.05, dp=dp, noise_multiplier=0.0,
        max_grad_norm=1.0, task=task,
    )  # fmt: skip
    members = [
        CohortMember(*_data(task, 20, s), seed=s, noise=NoiseSource.for_tests(s)) for s in (1, 2)
    ]
    for member, (result, state) in zip(
        members, train_cohort(model, members, settings), strict=True
    ):
        reference = copy.deepcopy(model)
        expected = train(reference, member.x, member.y, seed=1, **settings.kwargs())
        diff = max(
            float(np.abs(state[k] - v.detach().numpy()).max())
            for k, v in reference.state_dict().items()
        )
        assert diff < 1e-5
        assert result.loss == pytest.approx(expected.loss, rel=1e-5)
        if task.kind == TaskKind.REGRESSION:
            assert math.isnan(result.accuracy) and math.isnan(expected.accuracy)
        else:
            assert result.accuracy == expected.accuracy


@pytest.mark.parametrize("task", [BINARY, REGRESSION], ids=["binary", "regression"])
def test_dp_sgd_learns_each_task(task: Task) -> None:
    """DP-SGD (noise 0.5, clip 1) on 400 samples beats predicting a constant."""
    torch.manual_seed(0)
    model = _Tabular()
    x, y = _data(task, 400, 5)
    x_test, y_test = _data(task, 200, 6)
    before = evaluate(model, x_test, y_test, task=task, metrics=True)
    train(model, x, y, epochs=10, batch_size=32, learning_rate=0.3 if task == BINARY else 0.1,
          dp=True, noise_multiplier=0.5, max_grad_norm=1.0, task=task)  # fmt: skip
    after = evaluate(model, x_test, y_test, task=task, metrics=True)
    if task.kind == TaskKind.BINARY:
        assert after.metrics["auc"] > 0.9 and after.accuracy > 0.8
    else:
        constant = float(np.sqrt(np.mean((y_test - y.mean()) ** 2)))
        assert after.metrics["rmse"] < 0.5 * constant < before.metrics["rmse"]
        assert math.isnan(after.accuracy)


# ------------------------------------------------------------------------------ user hooks


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "userhooks.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import torch


            def huber(outputs, targets):
                return torch.nn.functional.huber_loss(
                    outputs.squeeze(-1), targets, reduction="none", delta=1.0
                )


            def mean_loss(outputs, targets):
                return ((outputs.squeeze(-1) - targets) ** 2).mean()


            def within_one(outputs, targets):
                return {"within_one": float(np.mean(np.abs(outputs[:, 0] - targets) <= 1.0))}


            def not_a_mapping(outputs, targets):
                return 0.5
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("userhooks",):
        sys.modules.pop(name, None)


def test_a_user_loss_trains_on_both_engines_alike(hooks: Path) -> None:
    task = Task(kind=TaskKind.REGRESSION, num_classes=0, loss="userhooks:huber")
    torch.manual_seed(0)
    model = _Tabular()
    settings = TrainSettings(epochs=1, batch_size=32, learning_rate=0.1, dp=True,
                             noise_multiplier=0.0, task=task)  # fmt: skip
    member = CohortMember(*_data(task, 20, 1), seed=1, noise=NoiseSource.for_tests(1))
    [(result, state)] = train_cohort(model, [member], settings)
    reference = copy.deepcopy(model)
    expected = train(reference, member.x, member.y, seed=1, **settings.kwargs())
    assert result.loss == pytest.approx(expected.loss, rel=1e-5)
    with torch.no_grad():
        out, y = model(torch.from_numpy(member.x)), torch.from_numpy(member.y)
    huber = torch.nn.functional.huber_loss(out.squeeze(-1), y)
    squared = REGRESSION.sample_losses(out, y)
    assert result.loss == pytest.approx(float(huber), rel=1e-4)  # the hook's loss, not MSE
    assert result.loss != pytest.approx(float(squared.mean()), rel=1e-2)
    for k, v in reference.state_dict().items():
        assert np.abs(state[k] - v.detach().numpy()).max() < 1e-5


def test_a_loss_that_does_not_return_one_value_per_sample_is_refused(hooks: Path) -> None:
    (hooks / "usernet.py").write_text(
        "from torch import nn\n\ndef Net():\n    return nn.Linear(6, 1)\n"
    )
    task = Task(kind=TaskKind.REGRESSION, num_classes=0, loss="userhooks:mean_loss")
    with pytest.raises(ConfigError, match=r"returned \(\) for a batch of 2.*one loss per sample"):
        checked_model("usernet:Net", (6,), 1, fix=False, dp=True, task=task)
    sys.modules.pop("usernet", None)


def test_user_metrics_join_the_tasks_own(hooks: Path) -> None:
    task = Task(kind=TaskKind.REGRESSION, num_classes=0, metrics="userhooks:within_one")
    got = task.evaluate(np.array([[1.0], [5.0]]), np.array([1.5, 2.0]))
    assert got["within_one"] == 0.5 and got["mae"] == pytest.approx(1.75)
    bad = Task(kind=TaskKind.REGRESSION, num_classes=0, metrics="userhooks:not_a_mapping")
    with pytest.raises(ConfigError, match="returned a float; return a mapping"):
        bad.evaluate(np.array([[1.0]]), np.array([1.0]))


def test_a_model_whose_outputs_do_not_fit_the_task_is_refused(hooks: Path) -> None:
    (hooks / "usernet2.py").write_text(
        "from torch import nn\n\ndef Two():\n    return nn.Linear(6, 2)\n"
    )
    with pytest.raises(ConfigError, match=r"needs \(2, 1\), one output per sample, the logit"):
        checked_model("usernet2:Two", (6,), 1, fix=False, dp=False, task=BINARY)
    sys.modules.pop("usernet2", None)


# ------------------------------------------------------------------------------ export, serving


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_drift_of_a_one_output_model_is_read_on_its_decisions_or_values(task: str) -> None:
    """The reference keeps the binary decisions' share, or the quantile bins of the predicted
    value; live outputs that moved give a high output PSI, the same outputs a low one."""
    from pollinate.edge_runtime.manifest import reference_distribution
    from pollinate.serving.drift import DriftMonitor, DriftSettings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    out = rng.normal(loc=0.0 if task == "binary" else 20.0, size=(1000, 1)).astype(np.float32)
    reference = reference_distribution(x, out, task=task)
    assert reference["output"]["width"] == 1
    assert len(reference["output"]["predicted_class_share"]) == (2 if task == "binary" else 10)
    settings = DriftSettings(min_samples=500, every=500, window=500)
    same = DriftMonitor("m", 1, reference, settings, task=task)
    moved = DriftMonitor("m", 1, reference, settings, task=task)
    assert same.enabled and moved.enabled
    steady = same.observe(x[:500], out[:500])
    shifted = moved.observe(x[:500], out[:500] + 3.0)
    assert steady is not None and shifted is not None
    assert steady.output_psi < 0.1 < 1.0 < shifted.output_psi


def test_parity_of_a_regression_artifact_is_its_r2() -> None:
    from pollinate.export._parity import check_tolerances, measure_parity

    rng = np.random.default_rng(1)
    y = rng.normal(size=400)
    reference = (y + rng.normal(scale=0.3, size=400))[:, None].astype(np.float32)
    noisy = reference + rng.normal(scale=0.5, size=(400, 1)).astype(np.float32)
    good = measure_parity(lambda b: b, reference, y, reference, task="regression")
    r2 = 1 - np.mean((reference[:, 0] - y) ** 2) / np.var(y)
    assert good.accuracy == pytest.approx(r2) and good.agreement == pytest.approx(1.0)
    bad = measure_parity(lambda b: b, noisy, y, reference, task="regression")
    assert bad.accuracy_drop > 0.1
    with pytest.raises(ExportError, match=r"loses too much R².*--precision fp32"):
        check_tolerances("model.int8.onnx", bad, precision="int8")
