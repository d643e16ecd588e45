"""The bundle writer: hashes, signature, atomicity, archive, Triton repository entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from safetensors.torch import load_file

from pollinate.edge_runtime import Manifest, verify_bundle
from pollinate.errors import PollinateError
from pollinate.export._archive import archive_path
from pollinate.export._bundle import write_bundle
from pollinate.export._errors import SigningKeyError, SourceMissingError
from pollinate.export._signing import generate_signing_key
from pollinate.export._triton import next_triton_version, write_triton_entry
from tests.support.bundles import artifact, make_manifest, make_sources


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, dict[str, Path]]:
    """The tiny model as ONNX and as an OpenVINO IR (two artifacts, three files)."""
    return make_sources(tmp_path_factory.mktemp("writer-src"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_bundle_has_files_hashes_sizes_and_archive(
    sources: tuple[Manifest, dict[str, Path]], tmp_path: Path
) -> None:
    manifest, files = sources
    out = write_bundle(tmp_path / "tiny-1", manifest, files)
    assert out == tmp_path / "tiny-1"
    assert _leftovers(tmp_path) == ["tiny-1", "tiny-1.tar.gz"]  # no temp dir or file left
    written = Manifest.from_json((out / "manifest.json").read_text())
    assert (out / "manifest.json").read_text() == written.to_json()  # canonical bytes
    assert not (out / "manifest.sig").exists()
    assert [a.file for a in written.artifacts] == ["model.fp32.onnx", "openvino/model.fp16.xml"]
    for art in written.artifacts:
        assert art.sha256 == _sha(files[art.file]) == _sha(out / art.file)
        assert art.size_bytes == files[art.file].stat().st_size
    ir = written.artifacts[1]
    bin_name = "openvino/model.fp16.bin"
    assert ir.extra_files == {bin_name: _sha(files[bin_name])}
    assert written.files == {}
    with tarfile.open(archive_path(out)) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert names == sorted(f"tiny-1/{n}" for n in ["manifest.json", *files]), names
        member = tar.extractfile("tiny-1/model.fp32.onnx")
        assert member is not None and member.read() == (out / "model.fp32.onnx").read_bytes()
    assert verify_bundle(archive_path(out)) == verify_bundle(out) == written


def test_archive_is_reproducible_and_unowned_files_are_listed(
    sources: tuple[Manifest, dict[str, Path]], tmp_path: Path
) -> None:
    manifest, files = sources
    notes = tmp_path / "notes.txt"
    notes.write_text("calibration: 256 images\n")
    first = write_bundle(tmp_path / "a" / "m-1.2", manifest, {**files, "docs/notes.txt": notes})
    second = write_bundle(tmp_path / "b" / "m-1.2", manifest, {**files, "docs/notes.txt": notes})
    assert archive_path(first).name == "m-1.2.tar.gz"  # the suffix is appended, not swapped
    assert archive_path(first).read_bytes() == archive_path(second).read_bytes()
    written = json.loads((first / "manifest.json").read_text())
    assert written["files"] == {"docs/notes.txt": _sha(notes)}
    assert verify_bundle(archive_path(first)).files == {"docs/notes.txt": _sha(notes)}


def test_signed_bundle_verifies_with_the_public_key(
    sources: tuple[Manifest, dict[str, Path]], tmp_path: Path
) -> None:
    manifest, files = sources
    key, pub = tmp_path / "keys" / "export.key", tmp_path / "keys" / "export.pub"
    generate_signing_key(key, pub)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_signing_key(key, tmp_path / "keys" / "other.pub")
    out = write_bundle(tmp_path / "signed", manifest, files, private_key=key)
    signature = (out / "manifest.sig").read_bytes()
    assert len(signature) == 64
    public = load_pem_public_key(pub.read_bytes())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(signature, (out / "manifest.json").read_bytes())  # raises if invalid
    assert verify_bundle(archive_path(out), public_key=pub).model.name == "tiny"


def test_non_empty_destination_is_refused_and_left_untouched(
    sources: tuple[Manifest, dict[str, Path]], tmp_path: Path
) -> None:
    manifest, files = sources
    out = tmp_path / "tiny-1"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(
        FileExistsError, match="already exists and is not an empty directory"
    ) as err:
        write_bundle(out, manifest, files)
    assert isinstance(err.value, PollinateError)  # the CLI prints it as one line
    assert _leftovers(out) == ["old.txt"] and (out / "old.txt").read_text() == "keep me"
    assert _leftovers(tmp_path) == ["tiny-1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_bundle(empty, manifest, files, make_tar=False) == empty  # empty is fine
    assert (empty / "manifest.json").is_file() and not archive_path(empty).exists()


def test_failures_leave_nothing_behind(
    sources: tuple[Manifest, dict[str, Path]], tmp_path: Path
) -> None:
    manifest, files = sources
    parent = tmp_path / "out"
    parent.mkdir()
    missing = {**files, "model.fp32.onnx": tmp_path / "gone.onnx"}
    with pytest.raises(SourceMissingError, match=r"model\.fp32\.onnx not found"):
        write_bundle(parent / "b", manifest, missing)
    assert _leftovers(parent) == []
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        write_bundle(parent / "b", manifest, files, private_key=bad_key)  # fails after copying
    assert _leftovers(parent) == []
    unnamed = make_manifest([artifact("absent.onnx", "onnxruntime", "fp32")])
    with pytest.raises(ValueError, match=r"names absent\.onnx, which is not among the files"):
        write_bundle(parent / "b", unnamed, files)
    assert _leftovers(parent) == []
    with pytest.raises(ValueError, match="plain relative path"):
        write_bundle(parent / "b", manifest, {**files, "../escape.bin": files["model.fp32.onnx"]})
    with pytest.raises(ValueError, match="written by write_bundle itself"):
        write_bundle(parent / "b", manifest, {**files, "manifest.json": files["model.fp32.onnx"]})
    assert _leftovers(parent) == []


def test_triton_entry(sources: tuple[Manifest, dict[str, Path]], tmp_path: Path) -> None:
    manifest, files = sources
    model_dir = write_triton_entry(
        tmp_path / "repo", "tiny", 3, files["model.fp32.onnx"], manifest, max_batch_size=64
    )
    assert model_dir == tmp_path / "repo" / "tiny"
    assert (model_dir / "3" / "model.onnx").read_bytes() == files["model.fp32.onnx"].read_bytes()
    assert (model_dir / "config.pbtxt").read_text() == (
        'name: "tiny"\n'
        'platform: "onnxruntime_onnx"\n'
        "max_batch_size: 64\n"
        "input [\n"
        "  {\n"
        '    name: "input"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 1, 8, 8 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        '    name: "logits"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 10 ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )
    assert sorted(os.listdir(model_dir)) == ["3", "config.pbtxt"]  # no temp files
    assert sorted(os.listdir(model_dir / "3")) == ["manifest.json", "model.onnx"]
    assert Manifest.from_json((model_dir / "3" / "manifest.json").read_text()) == manifest
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    spec = {"architecture": "mlp", "input_shape": [1, 8, 8], "num_classes": 10}
    write_triton_entry(tmp_path / "repo", "tiny", 5, files["model.fp32.onnx"], manifest,
                       torch_weights=weights, torch_spec=spec)  # fmt: skip
    assert sorted(os.listdir(model_dir / "5")) == [
        "manifest.json", "model.onnx", "model.safetensors", "torch.json"
    ]  # fmt: skip
    assert torch.equal(load_file(str(model_dir / "5" / "model.safetensors"))["w"], weights["w"])
    assert json.loads((model_dir / "5" / "torch.json").read_text()) == spec
    shutil.rmtree(model_dir / "5")
    write_triton_entry(tmp_path / "repo", "tiny", 4, files["model.fp32.onnx"], manifest)
    assert sorted(os.listdir(model_dir)) == ["3", "4", "config.pbtxt"]
    assert "max_batch_size: 256\n" in (model_dir / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="positive integer"):
        write_triton_entry(tmp_path / "repo", "tiny", 0, files["model.fp32.onnx"], manifest)
    with pytest.raises(ValueError, match="plain directory name"):
        write_triton_entry(tmp_path / "repo", "a/b", 1, files["model.fp32.onnx"], manifest)


def test_next_triton_version_is_the_round_or_past_the_newest(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert next_triton_version(repo, "cnn", 3) == 3  # no repository yet: the round
    for name in ("3", "7", ".staging-9", "latest"):  # only numbered folders are versions
        (repo / "cnn" / name).mkdir(parents=True)
    (repo / "cnn" / "config.pbtxt").write_text("")
    assert next_triton_version(repo, "cnn", 10) == 10  # newer than anything published
    assert next_triton_version(repo, "cnn", 7) == 8  # a retrained run's round 7: never 7 again
    assert next_triton_version(repo, "cnn", 2) == 8
    assert next_triton_version(repo, "other", 2) == 2
