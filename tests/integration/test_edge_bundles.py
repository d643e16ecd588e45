"""Bundles on the device: delivered through the ClientApp, verified, installed atomically,
served on loopback by the daemon's local inference server, rolled back.

Bundles are exported by the real pipeline (ONNX FP32) from two checkpoints; answers are
checked against onnxruntime run directly on each bundle's model file. A corrupted, tampered
or wrongly signed bundle is refused and the installed one keeps serving.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from pollinate.clientapp.app import app
from pollinate.config import RunSettings
from pollinate.data import DatasetSplit, load_dataset
from pollinate.device.bundles import BundleStore
from pollinate.device.local_serving import LocalInference
from pollinate.edge_runtime import BundleError
from pollinate.errors import ExportError
from pollinate.export._bundle import generate_signing_key
from pollinate.export.pipeline import ExportOptions, Format, Precision, export_run
from pollinate.rundir.checkpoint import Checkpoint, atomic_write_json, save_checkpoint
from pollinate.serverapp.delivery import BUNDLE_MESSAGE
from tests.support.messages import set_identity
from tests.support.models import train_default_cnn

pytestmark = pytest.mark.integration
NODE = 5


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two signed bundle archives (rounds 3 and 4 of a run), the key pair and test images."""
    root = tmp_path_factory.mktemp("bundles")
    run = root / "run"
    _, data, model = _trained_run(run, samples=1500)
    private, public = _keypair(root / "export")
    archives = []
    for rnd, scale in ((3, 1.0), (4, 0.5)):
        state = {k: v.detach().numpy().copy() * np.float32(scale if "weight" in k else 1.0)
                 for k, v in model.state_dict().items()}  # fmt: skip
        save_checkpoint(run, Checkpoint(server_round=rnd, model=state))
        options = ExportOptions(
            out=root / f"out-{rnd}", formats=(Format.ONNX,), precisions=(Precision.FP32,),
            sign_key=private, calibration_samples=50,
        )  # fmt: skip
        result = export_run(run, options)
        assert result.archive is not None
        archives.append(result.archive)
    # raw 28 x 28 uint8 images, as a device's camera would give them
    images = np.round(data.test.x[:16, 0] * 255).astype(np.uint8)
    return {"archives": archives, "public": public, "images": images, "root": root}


def _trained_run(run: Path, *, samples: int) -> tuple[RunSettings, DatasetSplit, nn.Module]:
    """A run directory (``run.json``, no checkpoint yet), its data, and the default CNN
    trained one epoch on the first ``samples`` training images."""
    run.mkdir()
    settings = RunSettings.from_run_config({"dp": "none", "run-dir": str(run)})
    data = load_dataset("mnist", seed=settings.seed)
    model = train_default_cnn(data.train.x[:samples], data.train.y[:samples], epochs=1)
    atomic_write_json(run / "run.json", {"settings": settings.to_run_config(), "population": 1})
    return settings, data, model


def _keypair(stem: Path) -> tuple[Path, Path]:
    private, public = stem.with_suffix(".pem"), stem.with_suffix(".pub")
    generate_signing_key(private, public)
    return private, public


def _reference(folder: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime on the installed bundle's model file, preprocessed as the manifest says."""
    from pollinate.edge_runtime import load_bundle

    with load_bundle(folder, backend="onnxruntime") as model:
        batch, _ = model._adapter.prepare(x)
    session = ort.InferenceSession(str(folder / "model.fp32.onnx"))
    name = session.get_inputs()[0].name
    out: np.ndarray = session.run(None, {name: batch})[0]
    return out


def _delivery(archive: bytes, digest: str | None = None) -> Message:
    set_identity()
    record = ConfigRecord({"archive": archive, "sha256": digest or hashlib.sha256(archive)
                           .hexdigest(), "name": "b.tar.gz"})  # fmt: skip
    msg = Message(RecordDict({"bundle": record}), dst_node_id=NODE, message_type=BUNDLE_MESSAGE)
    set_identity(NODE)
    return msg


def _deliver(state: Path, archive: bytes, public: Path, digest: str | None = None) -> ConfigRecord:
    ctx = Context(run_id=1, node_id=NODE, state=RecordDict(), run_config={},
                  node_config={"state-dir": str(state), "bundle-public-key": str(public),
                               "partition-id": 0})  # fmt: skip
    reply = app(_delivery(archive, digest), ctx)
    assert not reply.has_error()
    info: ConfigRecord = reply.content.config_records["info"]
    return info


def _post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _tampered(archive: bytes) -> bytes:
    """The same archive with one byte of the model file changed (manifest untouched)."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name.endswith(".onnx"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def test_delivered_bundles_install_serve_refuse_and_roll_back(
    bundles: dict[str, Any], tmp_path: Path
) -> None:
    first, second = (Path(a).read_bytes() for a in bundles["archives"])
    public, images = bundles["public"], bundles["images"]
    state = tmp_path / "device"
    serving = LocalInference(state, public_key=public)
    serving.start()
    url = "http://{}:{}".format(*serving.address)
    try:
        status, answer = _post(url + "/v1/predict", {"inputs": images.tolist(), "dtype": "uint8"})
        assert status == 503 and "no bundle" in answer["error"]

        info = _deliver(state, first, public)
        assert info["status"] == "installed", info
        store = BundleStore(state)
        one = store.current()
        assert one is not None and one.name == info["bundle"]
        status, answer = _post(url + "/v1/predict", {"inputs": images.tolist(), "dtype": "uint8"})
        assert status == 200 and answer["bundle"] == one.name
        expected = _reference(one, images)
        np.testing.assert_allclose(np.asarray(answer["outputs"]), expected, atol=1e-5)
        assert answer["labels"] == [str(i) for i in expected.argmax(1)]

        info = _deliver(state, second, public)
        two = store.current()
        assert info["status"] == "installed" and two is not None and two != one
        assert store.pointer()["previous"] == one.name
        status, answer = _post(url + "/v1/predict", {"inputs": images.tolist(), "dtype": "uint8"})
        assert answer["bundle"] == two.name
        np.testing.assert_allclose(np.asarray(answer["outputs"]), _reference(two, images),
                                   atol=1e-5)  # fmt: skip

        # refused: bytes changed on the way, a tampered member, a truncated archive, a
        # bundle signed by someone else. Each changes nothing: the second bundle serves on.
        _, stranger = _keypair(tmp_path / "stranger")
        flipped = bytearray(second)
        flipped[len(flipped) // 2] ^= 0xFF
        cases = {
            "sha256 the server sent": (bytes(flipped), hashlib.sha256(second).hexdigest(), public),
            "does not match its sha256": (_tampered(second), None, public),
            "corrupt, truncated": (second[: len(second) // 2], None, public),
            "manifest.sig does not verify": (first, None, stranger),
        }
        for expected_reason, (archive, digest, key) in cases.items():
            info = _deliver(state, archive, key, digest)
            assert info["status"] == "refused", (expected_reason, info)
            assert expected_reason in str(info["reason"]), info["reason"]
            assert store.current() == two
            status, answer = _post(url + "/v1/predict", {"inputs": images[:2].tolist(),
                                                         "dtype": "uint8"})  # fmt: skip
            assert status == 200 and answer["bundle"] == two.name
        assert not [p for p in (state / "bundles").iterdir() if p.name.startswith(".")]
        assert sorted(p.name for p in (state / "bundles").iterdir()) == sorted(
            ["current.json", one.name, two.name]
        )

        # bad requests: one clear 4xx each
        status, answer = _post(url + "/v1/predict", {"inputs": [[1, 2], [3]]})
        assert status == 400 and "inputs" in answer["error"]
        status, answer = _post(url + "/v1/predict", {"inputs": np.zeros((2, 5, 5)).tolist()})
        assert status == 400, answer
        status, answer = _post(url + "/v1/nothing", {})
        assert status == 404

        assert store.rollback() == one.name
        status, answer = _post(url + "/v1/predict", {"inputs": images.tolist(), "dtype": "uint8"})
        assert answer["bundle"] == one.name
        np.testing.assert_allclose(np.asarray(answer["outputs"]), expected, atol=1e-5)
        with urllib.request.urlopen(url + "/v1/bundle", timeout=30) as reply:
            described = json.loads(reply.read())
        assert described["name"] == one.name and described["previous"] == two.name
    finally:
        serving.close()


def test_a_node_without_a_state_dir_refuses_bundles(bundles: dict[str, Any]) -> None:
    archive = Path(bundles["archives"][0]).read_bytes()
    ctx = Context(run_id=1, node_id=NODE, state=RecordDict(), run_config={},
                  node_config={"partition-id": 0})  # fmt: skip
    info = app(_delivery(archive), ctx).content.config_records["info"]
    assert info["status"] == "refused" and "state-dir" in str(info["reason"])


def test_store_refuses_a_bad_sha_before_writing_anything(tmp_path: Path) -> None:
    payload = gzip.compress(b"not a tar")
    with pytest.raises(BundleError, match="corrupt"):
        BundleStore(tmp_path).install(payload, sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(BundleError, match="sha256 the server sent"):
        BundleStore(tmp_path).install(payload, sha256="0" * 64)
    assert [p.name for p in (tmp_path / "bundles").iterdir()] == []


def test_end_of_run_export_leaves_out_an_int8_copy_that_misses_and_keeps_fp32(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A near-chance global model whose INT8 copy loses 10 points: the federation's export
    still delivers (FP32 ONNX, both OpenVINO IRs), says why INT8 ONNX is missing, and a
    person's `pollinate export` with the same options still refuses."""
    from pollinate.serverapp.finish import _export_at_end

    run = tmp_path / "run"
    settings, _, model = _trained_run(run, samples=300)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    # Two classes tied far above the rest, told apart by logits a thousand times smaller
    # than INT8's output step: torch picks 0 or 1 as trained, INT8 always the first.
    last = [k for k in state if k.endswith("weight")][-1]
    state[last] *= np.float32(1e-3)
    bias = state[last.removesuffix("weight") + "bias"]
    bias[:] = -10.0
    bias[:2] = 10.0
    save_checkpoint(run, Checkpoint(server_round=1, model=state))

    with caplog.at_level("WARNING", logger="pollinate"):
        archive = _export_at_end(run, tmp_path / "bundle", settings)
    assert archive is not None and archive.exists()
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    files = {a["file"]: a["precision"] for a in manifest["artifacts"]}
    assert "model.fp32.onnx" in files and "model.int8.onnx" not in files, files
    assert not (tmp_path / "bundle" / "model.int8.onnx").exists()
    assert any(f.startswith("openvino/") for f in files), files
    assert "leaving model.int8.onnx out" in caplog.text and "loses too much" in caplog.text

    options = ExportOptions(out=tmp_path / "strict", formats=(Format.ONNX,))
    with pytest.raises(ExportError, match=r"model\.int8\.onnx' loses too much accuracy"):
        export_run(run, options)
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())
