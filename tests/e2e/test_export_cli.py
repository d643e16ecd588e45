"""`pollinate export` on a real run directory, then `pollinate edge predict/bench` on the bundle.

The run directory is written the way the ServerApp writes it (run.json + an atomic checkpoint
of a trained global model), without running a federation, to keep the test short.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pollinate.clientapp.training import train
from pollinate.config import RunSettings
from pollinate.data import load_dataset
from pollinate.export._signing import generate_signing_key
from pollinate.models import build_model
from pollinate.rundir.checkpoint import Checkpoint, atomic_write_json, save_checkpoint


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pollinate", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a trained global model (about 95% test accuracy)."""
    root = tmp_path_factory.mktemp("run")
    settings = RunSettings.from_run_config({"dp": "none", "run-dir": str(root)})
    data = load_dataset("mnist", seed=settings.seed)
    torch.manual_seed(0)
    model = build_model("cnn")
    train(model, data.train.x, data.train.y, epochs=2, batch_size=32, learning_rate=0.05,
          momentum=0.9, dp=False, seed=0)  # fmt: skip
    atomic_write_json(root / "run.json", {"settings": settings.to_run_config(), "population": 1})
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_checkpoint(root, Checkpoint(server_round=3, model=state))
    return root


@pytest.fixture(scope="module")
def torch_predictions(run_dir: Path) -> np.ndarray:
    data = load_dataset("mnist", seed=42)
    model = build_model("cnn")
    from pollinate.rundir.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt.model.items()})
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.array(data.test.x[:16]))).argmax(1).numpy()


def test_export_then_predict_offline(
    run_dir: Path, torch_predictions: np.ndarray, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    out = tmp_path / "bundle"
    proc = _cli(e2e_env, "export", str(run_dir), "--out", str(out),
                "--triton-repo", str(tmp_path / "triton"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    arts = {(a["runtime"], a["precision"]): a for a in manifest["artifacts"]}
    assert set(arts) == {
        ("onnxruntime", "fp32"),
        ("onnxruntime", "int8"),
        ("openvino", "fp16"),
        ("openvino", "int8"),
    }
    torch_acc = manifest["torch_accuracy"]
    assert torch_acc > 0.9
    assert arts[("onnxruntime", "fp32")]["max_abs_error"] <= 1e-4
    for art in arts.values():
        assert art["accuracy"] >= torch_acc - 0.01
        assert len(art["sha256"]) == 64
        assert art["p50_ms"] > 0
    assert (
        arts[("onnxruntime", "int8")]["size_bytes"]
        < 0.35 * arts[("onnxruntime", "fp32")]["size_bytes"]
    )
    assert manifest["model"]["source_round"] == 3
    assert manifest["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert manifest["reference"]["input"]["counts"]
    with tarfile.open(tmp_path / "bundle.tar.gz") as tar:
        assert any(m.name.endswith("manifest.json") for m in tar.getmembers())
    assert (tmp_path / "triton" / "cnn" / "config.pbtxt").exists()
    assert (tmp_path / "triton" / "cnn" / "3" / "model.onnx").exists()

    data = load_dataset("mnist", seed=42)
    batch = tmp_path / "batch.npy"
    np.save(batch, np.array(data.test.x[:16]))
    for bundle, backend in ((out, "onnxruntime"), (tmp_path / "bundle.tar.gz", "openvino")):
        proc = _cli(e2e_env, "edge", "predict", str(bundle), str(batch), "--backend", backend)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout)
        assert got["backend"] == backend
        agree = np.mean(np.array(got["labels"], dtype=int) == torch_predictions)
        assert agree >= 15 / 16
    image = tmp_path / "digit.png"
    Image.fromarray((np.array(data.test.x[0, 0]) * 255).round().astype(np.uint8)).save(image)
    proc = _cli(e2e_env, "edge", "predict", str(out), str(image), "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["labels"] == [str(torch_predictions[0])]

    proc = _cli(e2e_env, "edge", "bench", str(out), "--repeats", "50")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads(proc.stdout)
    assert 0 < bench["p50_ms"] <= bench["p95_ms"]
    assert bench["cold_start_s"] > 0 and bench["throughput_per_s"] > 0

    # A tampered artifact is refused with the documented exit code, and says which file.
    target = out / "model.int8.onnx"
    target.write_bytes(target.read_bytes()[:-10])
    proc = _cli(e2e_env, "edge", "predict", str(out), str(batch))
    assert proc.returncode == 7
    assert "model.int8.onnx" in proc.stderr and "Traceback" not in proc.stderr


def test_default_out_is_the_run_dirs_bundle_and_publishes_to_the_repository(
    run_dir: Path, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    """The README's serving quick start: no --out, one FP32 ONNX, published as a version."""
    repo = tmp_path / "models"
    proc = _cli(e2e_env, "export", str(run_dir), "--format", "onnx", "--precision", "fp32",
                "--triton-repo", str(repo))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bundle = run_dir / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [a["file"] for a in manifest["artifacts"]] == ["model.fp32.onnx"]
    assert (run_dir / "bundle.tar.gz").is_file()
    version = repo / "cnn" / "3"  # the checkpoint's round
    assert (version / "model.onnx").read_bytes() == (bundle / "model.fp32.onnx").read_bytes()
    assert "published version 3" in " ".join(proc.stdout.split() + proc.stderr.split())
    again = _cli(e2e_env, "export", str(run_dir), "--format", "onnx", "--precision", "fp32")
    assert again.returncode == 2
    assert "bundle exists and is not empty" in " ".join(again.stderr.split())
    assert "Traceback" not in again.stderr


def test_signed_bundle_and_bad_exports(
    run_dir: Path, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    key, pub = tmp_path / "sign.pem", tmp_path / "sign.pub"
    made = _cli(e2e_env, "keygen", str(key), str(pub))
    assert made.returncode == 0, made.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    again_key = _cli(e2e_env, "keygen", str(key), str(pub))
    assert again_key.returncode == 2
    assert "Traceback" not in again_key.stderr
    out = tmp_path / "signed"
    proc = _cli(e2e_env, "export", str(run_dir), "--out", str(out), "--format", "onnx",
                "--precision", "fp32", "--sign-key", str(key))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "manifest.sig").exists()
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((1, 28, 28), np.float32))
    ok = _cli(e2e_env, "edge", "predict", str(out), str(image), "--public-key", str(pub))
    assert ok.returncode == 0, ok.stderr[-3000:]
    other, other_pub = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_signing_key(other, other_pub)
    bad = _cli(e2e_env, "edge", "predict", str(out), str(image), "--public-key", str(other_pub))
    assert bad.returncode == 7
    assert "manifest.sig does not verify" in bad.stderr

    again = _cli(e2e_env, "export", str(run_dir), "--out", str(out))
    assert again.returncode == 2
    assert "not empty" in again.stderr
    empty = tmp_path / "empty-run"
    empty.mkdir()
    proc = _cli(e2e_env, "export", str(empty), "--out", str(tmp_path / "b2"))
    assert proc.returncode == 5
    assert "run.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(
        e2e_env, "export", str(run_dir), "--out", str(tmp_path / "b3"), "--format", "coreml"
    )
    assert proc.returncode == 2
    assert "coreml" in proc.stderr and "tflite" in proc.stderr
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()


@pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / ".venv-litert" / "bin" / "python").exists(),
    reason="the litert-torch environment is missing: run scripts/setup-litert (make test does)",
)
def test_tflite_bundle_runs_on_litert(
    run_dir: Path, torch_predictions: np.ndarray, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    out = tmp_path / "tfl"
    proc = _cli(e2e_env, "export", str(run_dir), "--out", str(out), "--format", "tflite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    arts = {(a["runtime"], a["precision"]): a for a in manifest["artifacts"]}
    assert set(arts) == {("litert", "fp32"), ("litert", "int8")}
    assert arts[("litert", "fp32")]["max_abs_error"] <= 1e-4
    assert arts[("litert", "int8")]["accuracy"] >= manifest["torch_accuracy"] - 0.01
    batch = tmp_path / "batch.npy"
    np.save(batch, np.array(load_dataset("mnist", seed=42).test.x[:16]))
    proc = _cli(e2e_env, "edge", "predict", str(out), str(batch), "--backend", "litert")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array(json.loads(proc.stdout)["labels"], dtype=int)
    assert np.mean(got == torch_predictions) >= 15 / 16


def test_pruned_int8_is_a_tenth_of_fp32_within_a_point(
    run_dir: Path, tmp_path: Path, e2e_env: dict[str, str]
) -> None:
    out = tmp_path / "small"
    proc = _cli(e2e_env, "export", str(run_dir), "--out", str(out), "--format", "onnx",
                "--prune", "0.75")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    arts = {a["file"]: a for a in manifest["artifacts"]}
    pruned, fp32 = arts["model.pruned.int8.onnx"], arts["model.fp32.onnx"]
    assert pruned["size_bytes"] <= 0.10 * fp32["size_bytes"]
    assert pruned["accuracy"] >= manifest["torch_accuracy"] - 0.01
    assert "pruning" in pruned["quantization"]
    # Two INT8 ONNX files: the runtime opens the one named, and refuses a name not listed.
    from pollinate.edge_runtime import BundleError, load_bundle

    with load_bundle(out, artifact="model.pruned.int8.onnx") as model:
        assert model.artifact.size_bytes == pruned["size_bytes"]
        assert model.predict(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)
    with pytest.raises(BundleError, match=r"no artifact 'model\.tflite'"):
        load_bundle(out, artifact="model.tflite")
    bad = _cli(e2e_env, "export", str(run_dir), "--out", str(tmp_path / "x"), "--prune", "2")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()
