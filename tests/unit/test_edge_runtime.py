"""The edge runtime: verified loading, artifact choice, predictions against a numpy reference.

The artifacts are real: a tiny ONNX classifier built with ``onnx.helper`` (Flatten -> MatMul
-> Add, opset 18) and its OpenVINO IR, so the expected logits are known exactly (the builders
are in ``tests/support/bundles.py``).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pollinate.edge_runtime import (
    BundleError,
    EdgeModel,
    InputError,
    RuntimeMissingError,
    load_bundle,
    verify_bundle,
)
from pollinate.export._bundle import generate_signing_key, write_bundle
from tests.support.bundles import (
    LABELS,
    RNG,
    artifact,
    make_manifest,
    make_onnx,
    make_sources,
    raw_to_model,
    reference,
)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One signed bundle (dir + tar.gz) and its key pair, built once for the module."""
    base = tmp_path_factory.mktemp("edge")
    manifest, files = make_sources(base / "src")
    generate_signing_key(base / "keys" / "export.key", base / "keys" / "export.pub")
    out = write_bundle(
        base / "bundles" / "tiny-1", manifest, files, private_key=base / "keys" / "export.key"
    )
    return {
        "dir": out,
        "tar": out.parent / "tiny-1.tar.gz",
        "pub": base / "keys" / "export.pub",
        "key": base / "keys" / "export.key",
        "src": base / "src",
    }


@pytest.fixture
def bundle_copy(built: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the bundle directory to tamper with."""
    return Path(shutil.copytree(built["dir"], tmp_path / "tiny-1"))


def _batch(n: int) -> np.ndarray:
    return RNG.normal(0, 1, size=(n, 1, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------------- predictions
@pytest.mark.parametrize("form", ["dir", "tar"])
def test_loads_dir_and_archive_and_matches_the_numpy_reference(
    built: dict[str, Path], form: str
) -> None:
    with load_bundle(built[form]) as model:
        assert isinstance(model, EdgeModel)
        assert model.backend == "onnxruntime" and model.artifact.file == "model.fp32.onnx"
        batch = _batch(5)
        np.testing.assert_allclose(model.predict(batch), reference(batch), atol=1e-5)
        single = model.predict(batch[2])
        assert single.shape == (10,)
        np.testing.assert_allclose(single, reference(batch[2:3])[0], atol=1e-5)
        raw = RNG.integers(0, 256, size=(8, 8), dtype=np.uint8)
        np.testing.assert_allclose(
            model.predict(raw), reference(raw_to_model(raw)[None, None])[0], atol=1e-5
        )
        raws = RNG.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
        np.testing.assert_allclose(
            model.predict(raws), reference(raw_to_model(raws)[:, None]), atol=1e-5
        )


def test_archive_copy_is_removed_on_close(built: dict[str, Path]) -> None:
    model = load_bundle(built["tar"])
    assert model.path.is_dir() and model.path != built["dir"]
    model.close()
    assert not model.path.exists()


def test_raw_image_layouts_and_labels(built: dict[str, Path]) -> None:
    model = load_bundle(built["dir"])
    raw = RNG.integers(0, 256, size=(8, 8), dtype=np.uint8)
    expected = model.predict(raw)
    np.testing.assert_allclose(model.predict(raw[:, :, None]), expected, atol=1e-6)  # HWC
    np.testing.assert_allclose(model.predict(raw[None]), expected, atol=1e-6)  # CHW
    np.testing.assert_allclose(model.predict(raw[None, None])[0], expected, atol=1e-6)
    want = LABELS[int(np.argmax(reference(raw_to_model(raw)[None, None])[0]))]
    assert model.predict_labels(raw) == [want]
    batch = _batch(3)
    assert model.predict_labels(batch) == [LABELS[i] for i in reference(batch).argmax(axis=1)]
    float64 = batch.astype(np.float64)
    np.testing.assert_allclose(model.predict(float64), reference(batch), atol=1e-5)


def test_openvino_backend_matches_the_reference(built: dict[str, Path]) -> None:
    model = load_bundle(built["tar"], backend="openvino", threads=1)
    assert model.backend == "openvino" and model.artifact.precision == "fp16"
    batch = _batch(6)
    np.testing.assert_allclose(model.predict(batch), reference(batch, fp16_weights=True), atol=1e-5)
    raw = RNG.integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    np.testing.assert_allclose(
        model.predict(raw), reference(raw_to_model(raw)[:, None], fp16_weights=True), atol=1e-5
    )
    model.close()


def test_openvino_single_samples_are_fresh_arrays_and_mix_with_batches(
    built: dict[str, Path],
) -> None:
    # One sample runs through the batch-of-one model and its request's own buffers; a result
    # must not change when the next sample runs, and batches of other sizes still work.
    model = load_bundle(built["dir"], backend="openvino", threads=1)
    batch = _batch(4)
    expected = reference(batch, fp16_weights=True)
    first = model.predict(batch[0])
    second = model.predict(batch[1:2])
    np.testing.assert_allclose(first, expected[0], atol=1e-5)
    np.testing.assert_allclose(second, expected[1:2], atol=1e-5)
    np.testing.assert_allclose(model.predict(batch), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict(batch[2].astype(np.float64)), expected[2], atol=1e-5)
    np.testing.assert_allclose(first, expected[0], atol=1e-5)  # untouched by later calls
    assert not np.shares_memory(first, second)
    model.close()


def test_precision_choice(built: dict[str, Path], tmp_path: Path) -> None:
    onnx_path = make_onnx(tmp_path / "src" / "m.onnx")
    manifest = make_manifest(
        [
            artifact("model.fp32.onnx", "onnxruntime", "fp32"),
            artifact("model.int8.onnx", "onnxruntime", "int8"),
        ]
    )
    out = write_bundle(
        tmp_path / "b",
        manifest,
        {"model.fp32.onnx": onnx_path, "model.int8.onnx": onnx_path},
        make_tar=False,
    )
    assert load_bundle(out).artifact.file == "model.int8.onnx"  # auto prefers int8
    assert load_bundle(out, precision="fp32").artifact.file == "model.fp32.onnx"
    with pytest.raises(BundleError, match="no onnxruntime fp16 artifact"):
        load_bundle(out, backend="onnxruntime", precision="fp16")
    with pytest.raises(BundleError, match="no openvino artifact"):
        load_bundle(out, backend="openvino")
    with pytest.raises(ValueError, match="backend must be"):
        load_bundle(out, backend="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        load_bundle(out, threads=0)


def test_static_batch_model_runs_any_batch_in_chunks(tmp_path: Path) -> None:
    onnx_path = make_onnx(tmp_path / "src" / "m.onnx", batch=2)
    manifest = make_manifest([artifact("m.onnx", "onnxruntime", "fp32")], batch=2)
    out = write_bundle(tmp_path / "b", manifest, {"m.onnx": onnx_path}, make_tar=False)
    model = load_bundle(out)
    batch = _batch(5)
    np.testing.assert_allclose(model.predict(batch), reference(batch), atol=1e-5)
    np.testing.assert_allclose(model.predict(batch[0]), reference(batch[:1])[0], atol=1e-5)


# ---------------------------------------------------------------------- refused bundles
def test_verify_bundle_returns_the_manifest(built: dict[str, Path]) -> None:
    manifest = verify_bundle(built["tar"], public_key=built["pub"])
    assert manifest.model.name == "tiny" and len(manifest.artifacts) == 2


def test_flipped_byte_is_refused(bundle_copy: Path) -> None:
    target = bundle_copy / "openvino" / "model.fp16.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.fp16\.bin.*tampered with or truncated"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy: Path) -> None:
    target = bundle_copy / "model.fp32.onnx"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx is \d+ bytes.*truncated"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "openvino" / "model.fp16.xml").unlink()
    with pytest.raises(BundleError, match=r"openvino/model\.fp16\.xml .*is missing"):
        load_bundle(bundle_copy)


def test_unlisted_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "extra.onnx").write_bytes(b"not covered")
    with pytest.raises(BundleError, match=r"extra\.onnx is not listed"):
        load_bundle(bundle_copy)


def test_modified_manifest_is_refused(bundle_copy: Path, built: dict[str, Path]) -> None:
    path = bundle_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["labels"][0] = "cat"  # hashes still match: only the signature catches this
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    assert load_bundle(bundle_copy).manifest.labels[0] == "cat"
    with pytest.raises(BundleError, match="manifest was modified after signing"):
        load_bundle(bundle_copy, public_key=built["pub"])
    raw["artifacts"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"model\.fp32\.onnx does not match its sha256"):
        load_bundle(bundle_copy)
    path.write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json is malformed"):
        load_bundle(bundle_copy)


def test_signature_checks(bundle_copy: Path, built: dict[str, Path], tmp_path: Path) -> None:
    assert load_bundle(bundle_copy, public_key=built["pub"]).backend == "onnxruntime"
    assert load_bundle(bundle_copy, public_key=built["pub"].read_text()).backend  # PEM text
    generate_signing_key(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(BundleError, match="signed with another key"):
        load_bundle(bundle_copy, public_key=tmp_path / "other.pub")
    with pytest.raises(BundleError, match="not a PEM public key"):
        load_bundle(bundle_copy, public_key=built["key"])  # the private half
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(bundle_copy, public_key=tmp_path / "missing.pub")
    sig = bundle_copy / "manifest.sig"
    data = bytearray(sig.read_bytes())
    data[0] ^= 0xFF
    sig.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(bundle_copy, public_key=built["pub"])
    sig.write_bytes(bytes(data[:10]))
    with pytest.raises(BundleError, match="10 bytes"):
        load_bundle(bundle_copy, public_key=built["pub"])
    sig.unlink()
    with pytest.raises(BundleError, match=r"no manifest\.sig"):
        load_bundle(bundle_copy, public_key=built["pub"])
    assert load_bundle(bundle_copy).backend == "onnxruntime"  # unsigned is fine without a key


def _tar_with(path: Path, bundle: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(bundle, arcname="tiny-1")
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("tiny-1/../../evil.txt", tarfile.REGTYPE, "contains '..'"),
        ("/tmp/evil.txt", tarfile.REGTYPE, "absolute path"),
        ("tiny-1/link", tarfile.SYMTYPE, "is a link"),
        ("tiny-1/hard", tarfile.LNKTYPE, "is a link"),
        ("tiny-1/dev", tarfile.CHRTYPE, "device"),
        ("tiny-1/fifo", tarfile.FIFOTYPE, "device, FIFO"),
    ],
)
def test_unsafe_archive_members_are_refused(
    built: dict[str, Path], tmp_path: Path, name: str, kind: bytes, message: str
) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    data = b"x" if kind == tarfile.REGTYPE else b""
    member.size = len(data)
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        member.linkname = "/etc/passwd"
    archive = _tar_with(tmp_path / "evil.tar.gz", built["dir"], member, data)
    with pytest.raises(BundleError, match=message):
        load_bundle(archive)
    assert not (tmp_path / "evil.txt").exists()


def test_truncated_or_foreign_archive_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    data = built["tar"].read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt, truncated"):
        load_bundle(tmp_path / "cut.tar.gz")
    with pytest.raises(BundleError, match="no bundle at"):
        load_bundle(tmp_path / "nothing-here")
    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        load_bundle(tmp_path / "empty.tar.gz")


# ---------------------------------------------------------------------- runtimes
def test_missing_runtime_names_the_pip_extra(
    built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make LiteRT unimportable whether or not it is installed here (None in sys.modules
    # makes `import ai_edge_litert` raise ImportError).
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    with pytest.raises(RuntimeMissingError, match=r'pip install "pollinate\[tflite\]"'):
        load_bundle(built["dir"], backend="litert")
    fake = tmp_path / "model.tflite"
    fake.write_bytes(b"TFL3" + bytes(64))
    out = write_bundle(
        tmp_path / "lite",
        make_manifest([artifact("model.tflite", "litert", "int8")]),
        {"model.tflite": fake},
        make_tar=False,
    )
    with pytest.raises(RuntimeMissingError, match=r"pollinate\[tflite\]"):
        load_bundle(out)  # auto: the only artifact needs a runtime that is not installed


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((7, 7), np.uint8), r"shape does not fit.*got uint8 \[7, 7\]"),
        (np.zeros((2, 1, 8, 9), np.float32), r"shape does not fit.*got float32 \[2, 1, 8, 9\]"),
        (np.zeros((1, 8, 8), np.complex64), "unsupported input dtype complex64"),
        (np.array(["a", "b"]), "unsupported input dtype <U1"),
        (np.zeros((8, 8), np.int64), r"int64 \(pixels\? convert with x.astype\(np.uint8\)\)"),
        (np.full((1, 8, 8), np.nan, np.float32), "NaN or infinity"),
    ],
)
def test_bad_inputs_say_what_was_expected(
    built: dict[str, Path], bad: np.ndarray, message: str
) -> None:
    model = load_bundle(built["dir"])
    with pytest.raises(InputError, match=message) as info:
        model.predict(bad)
    assert "'input' float32 [-1, 1, 8, 8]" in str(info.value)
    assert "raw uint8 [1, 8, 8] / [N, 1, 8, 8] or [8, 8] / [N, 8, 8]" in str(info.value)
