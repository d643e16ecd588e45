"""Binary and regression tasks through `pollinate simulate`: detected from the labels, trained
with DP-SGD, client-level DP and robust aggregation, on both engines, and reported.

The data are a user's loaders in ``tasks_data.py`` in the folder the command runs from.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pollinate.data import load_dataset
from pollinate.models import build_model
from tests.support.processes import POLLINATE
from tests.support.serving import serve
from tests.support.simulation import simulate, simulate_env

pytestmark = pytest.mark.slow

DATA = """
import numpy as np
import torch
from sklearn.datasets import make_classification, make_friedman1


def friedman():
    x, y = make_friedman1(n_samples=1200, noise=0.0, random_state=0)
    return x.astype("float32"), y  # float targets: a regression task


def two_classes():
    x, y = make_classification(n_samples=1200, n_features=10, n_informative=5, random_state=0)
    return x.astype("float32"), y  # labels 0 / 1: a binary task


def huber(outputs, targets):
    return torch.nn.functional.huber_loss(outputs.squeeze(-1), targets, reduction="none")
"""


def _run(tmp_path: Path, name: str, *args: str) -> tuple[list[dict], dict, str]:
    run_dir = tmp_path / name
    proc = simulate(
        tmp_path, "-n", "20", "--rounds", "3", "--model", "mlp", "--set", "fraction-train=0.5",
        "--run-dir", str(run_dir), *args, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())["summary"]
    return metrics, privacy, proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tasks")
    (path / "tasks_data.py").write_text(DATA)
    return path


def test_regression_is_detected_and_trained_with_dp_sgd_and_a_user_loss(folder: Path) -> None:
    metrics, privacy, out = _run(
        folder, "regression", "--data", "tasks_data:friedman", "--loss", "tasks_data:huber",
        "--set", "learning-rate=0.2", "--set", "batch-size=16", "--set", "local-epochs=2",
    )  # fmt: skip
    assert "task: regression, loss tasks_data:huber (detected from the labels)" in out
    first, last = metrics[0], metrics[-1]
    assert first["accuracy"] is None and last["accuracy"] is None
    assert set(last["metrics"]) == {"mse", "mae", "rmse", "mape"}
    assert last["metrics"]["rmse"] < 0.8 * first["metrics"]["rmse"]  # it learns
    assert privacy["sample_level"]["max_epsilon"] > 0
    summary = (folder / "regression" / "summary.md").read_text()
    assert "## Metrics" in summary and "Final metrics: mse" in summary
    assert (folder / "regression" / "metrics.png").stat().st_size > 1000
    assert "final rmse" in out
    expected = _export_and_predict(folder, "regression", "values")
    _served_by_kserve(folder, "regression", expected)


@pytest.mark.parametrize(
    ("engine", "privacy_args"),
    [
        ("fast", ("--dp", "none", "--client-dp", "server-fixed", "--set", "client-dp-noise=0.3")),
        ("ray", ("--robust", "trimmed-mean", "--set", "noise-multiplier=0.5")),
    ],
    ids=["fast-client-dp", "ray-dp-sgd-robust"],
)
def test_binary_with_client_level_dp_or_dp_sgd_and_robust_aggregation(
    folder: Path, engine: str, privacy_args: tuple[str, ...]
) -> None:
    metrics, privacy, out = _run(
        folder, f"binary-{engine}", "--data", "tasks_data:two_classes", "--engine", engine,
        *privacy_args, "--set", "learning-rate=0.1", "--set", "local-epochs=3",
    )  # fmt: skip
    assert "task: binary (detected from the labels)" in out
    last = metrics[-1]
    assert set(last["metrics"]) == {"accuracy", "auc"}
    assert last["accuracy"] == last["metrics"]["accuracy"]
    assert last["metrics"]["auc"] > 0.75, last
    assert [m["replied"] for m in metrics[1:]] == [10, 10, 10]
    if engine == "fast":
        assert privacy["client_level"]["epsilon"] > 0
        _export_and_predict(folder, f"binary-{engine}", "labels")
    else:
        assert privacy["sample_level"]["max_epsilon"] > 0


def _export_and_predict(folder: Path, name: str, answer: str) -> np.ndarray:
    """The run's model as an ONNX bundle: its manifest says the task and one output, and
    `pollinate edge predict` gives torch's outputs (values, or labels by logit > 0)."""
    bundle, run_dir = folder / f"{name}-bundle", folder / name
    env = simulate_env(folder)
    exported = subprocess.run(
        [*POLLINATE, "export", str(run_dir), "--out", str(bundle), "--format", "onnx",
         "--precision", "fp32"],
        capture_output=True, text=True, timeout=300, cwd=folder, env=env,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    manifest = json.loads((bundle / "manifest.json").read_text())
    task = name.split("-")[0]
    assert manifest["task"] == task and manifest["outputs"][0]["shape"] == [-1, 1]
    assert manifest["reference"]["output"]["width"] == 1
    x = np.asarray(getattr(_data_module(folder), DATASETS[task])()[0][:5], dtype=np.float32)
    np.save(folder / f"{name}-x.npy", x)
    predicted = subprocess.run(
        [*POLLINATE, "edge", "predict", str(bundle), str(folder / f"{name}-x.npy")],
        capture_output=True, text=True, timeout=120, cwd=folder, env=env,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    got = json.loads(predicted.stdout)
    model = build_model("mlp", input_shape=(x.shape[1],), num_classes=1)
    weights = load_file(str(run_dir / "checkpoints" / "round-0003" / "model.safetensors"))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        expected = model(torch.from_numpy(x))[:, 0].numpy()
    if answer == "values":
        assert np.allclose(got["values"], expected, atol=1e-4)
    else:
        assert got["labels"] == [str(int(v > 0)) for v in expected]
    return expected


def _served_by_kserve(folder: Path, name: str, expected: np.ndarray) -> None:
    """Published to a serving repository, the regression model answers tritonclient with its
    one FP32 output per sample, as the KServe metadata says."""
    import tritonclient.http as thttp

    repo = folder / f"{name}-repo"
    exported = subprocess.run(
        [*POLLINATE, "export", str(folder / name), "--out", str(folder / f"{name}-published"),
         "--format", "onnx", "--precision", "fp32", "--triton-repo", str(repo)],
        capture_output=True, text=True, timeout=300, cwd=folder, env=simulate_env(folder),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-2000:]
    x = np.load(folder / f"{name}-x.npy")
    with serve(repo, folder) as server:
        client = thttp.InferenceServerClient(server.http_url)
        meta = client.get_model_metadata("mlp")
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1]}]
        tensor = thttp.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        answer = client.infer("mlp", [tensor]).as_numpy("logits")
    assert answer.dtype == np.float32 and answer.shape == (len(x), 1)
    assert np.allclose(answer[:, 0], expected, atol=1e-4)


DATASETS = {"regression": "friedman", "binary": "two_classes"}


def _data_module(folder: Path) -> Any:
    spec = importlib.util.spec_from_file_location("tasks_data_copy", folder / "tasks_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_regression_target_given_to_a_classifier_is_one_clear_line(folder: Path) -> None:
    proc = simulate(
        folder, "-n", "4", "--rounds", "1", "--model", "mlp", "--data", "tasks_data:friedman",
        "--task", "classification", "--run-dir", str(folder / "refused"), cwd=folder,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "a regression target given to a classification task" in proc.stderr
    assert "Traceback" not in proc.stderr and not (folder / "refused").exists()


def test_large_regression_targets_get_a_note_and_rejected_updates_a_hint(folder: Path) -> None:
    """Diabetes' targets (25..346) as they are: SGD's huge squared errors make every update
    exceed the automatic bound; the run says why and what to do instead of failing quietly."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    np.savez(folder / "diabetes.npz", x=bunch.data, y=bunch.target)
    proc = simulate(
        folder, "-n", "4", "--rounds", "1", "--model", "mlp", "--dp", "none",
        "--data", str(folder / "diabetes.npz"), "--run-dir", str(folder / "diabetes"),
        cwd=folder,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stderr + proc.stdout
    assert "task: regression (detected from the labels)" in out
    train = load_dataset(folder / "diabetes.npz", seed=42).train  # the run's split
    rms = float(np.sqrt(np.mean(np.square(train.y, dtype=np.float64))))
    assert 150 < rms < 200
    assert f"the targets' RMS is {rms:.3g}" in out and "divide them by a constant" in out
    assert "updates were rejected" in out and "--set max-update-norm" in out
