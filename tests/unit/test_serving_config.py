"""Serving settings (flags + TOML), the Triton config reader and input checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pollinate.errors import ConfigError, RepositoryError
from pollinate.serving.config import load_serve_settings, settings_from_json, settings_to_json
from pollinate.serving.inputs import InvalidInputError, check_inputs
from pollinate.serving.repository import read_model_config, scan_repository

TRITON_CONFIG = """
name: "cnn"
platform: "onnxruntime_onnx"
max_batch_size: 128
version_policy: { latest: { num_versions: 2 } }
input [ { name: "input" data_type: TYPE_FP32 dims: [ 1, 28, 28 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 250 }
optimization { execution_accelerators { cpu_execution_accelerator : [ { name : "openvino" } ] } }
"""


def _model_dir(tmp_path: Path, text: str = TRITON_CONFIG, name: str = "cnn") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    (d / "config.pbtxt").write_text(text)
    return d


def test_a_full_triton_config_is_read(tmp_path: Path) -> None:
    spec = read_model_config(_model_dir(tmp_path) / "config.pbtxt")
    assert spec.name == "cnn" and spec.max_batch_size == 128
    assert spec.inputs[0].shape == (-1, 1, 28, 28) and spec.inputs[0].datatype == "FP32"
    assert spec.outputs[0].shape == (-1, 10)
    assert spec.instances == 2 and spec.max_queue_delay_us == 250


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [", "not valid protobuf text format"),
        ('name: "cnn" platform: "tensorflow_savedmodel" max_batch_size: 4',
         "not served by pollinate"),
        ('name: "cnn" max_batch_size: 0 input [{name: "x" data_type: TYPE_FP32 dims: [1]}]',
         "max_batch_size"),
        ('name: "cnn" max_batch_size: 4', "at least one `input"),
        ('name: "other" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [1]}] '
         'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]', "differs from its directory"),
        ('name: "cnn" max_batch_size: 4 input [{name: "x" data_type: TYPE_STRING dims: [1]}] '
         'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]', "TYPE_STRING"),
        ('name: "cnn" max_batch_size: 4 input [{name: "x" data_type: TYPE_FP32 dims: [-1]}] '
         'output [{name: "y" data_type: TYPE_FP32 dims: [1]}]', "fixed"),
    ],
)  # fmt: skip
def test_bad_configs_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RepositoryError, match=message) as info:
        read_model_config(_model_dir(tmp_path, text) / "config.pbtxt")
    assert "config.pbtxt" in str(info.value)


def test_versions_without_model_onnx_are_not_complete(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    (d / "1").mkdir()
    (d / "1" / "model.onnx").write_bytes(b"x")
    (d / "2").mkdir()
    (d / "2" / "model.safetensors").write_bytes(b"x")  # still being published
    (d / "abc").mkdir()
    (d / ".3").mkdir()
    found = scan_repository(tmp_path)
    assert list(found) == ["cnn"]
    assert sorted(found["cnn"][1]) == [1]
    with pytest.raises(RepositoryError, match="does not exist"):
        scan_repository(tmp_path / "missing")


def test_check_inputs_explains_the_expected_tensor(tmp_path: Path) -> None:
    spec = read_model_config(_model_dir(tmp_path) / "config.pbtxt")
    good = np.zeros((3, 1, 28, 28), np.float32)
    out, rows = check_inputs(spec, {"input": good}, max_batch=64)
    assert rows == 3 and out["input"].shape == good.shape
    cases = [
        (
            {"input": good.astype(np.float64)},
            "expected FP32 with shape \\[-1, 1, 28, 28\\].*got datatype FP64",
        ),
        ({"input": good[:, 0]}, "got shape \\[3, 28, 28\\]"),
        ({"input": np.zeros((65, 1, 28, 28), np.float32)}, "batch 1..64.*batch of 65"),
        ({"input": np.zeros((0, 1, 28, 28), np.float32)}, "batch of 0"),
        ({"other": good}, "unexpected input 'other'"),
        ({}, "missing input 'input'"),
    ]
    for tensors, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            check_inputs(spec, tensors, max_batch=64)


def test_settings_from_file_with_flags_on_top(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a-long-enough-token-123\n")
    config = tmp_path / "serve.toml"
    config.write_text(
        '[server]\nrepository = "models"\nhttp-port = 9000\ndevice = "cpu"\ninstances = 2\n'
        "[batching]\nmax-batch-size = 32\nmax-queue-delay-us = 100\n"
        "[rollout]\ncanary-percent = 25\n"
        '[drift]\nthreshold = 0.3\ntrigger-dir = "triggers"\n'
        '[security]\ntoken-file = "token"\n'
    )
    s = load_serve_settings(config, {"http_port": 9100, "batching.max_batch_size": 16})
    assert s.repository == (tmp_path / "models").resolve()
    assert s.http_port == 9100 and s.device == "cpu" and s.instances == 2
    assert s.batching.max_batch_size == 16 and s.batching.max_queue_delay_us == 100
    assert s.rollout.canary_percent == 25 and s.drift.threshold == 0.3
    assert s.drift.trigger_dir == (tmp_path / "triggers").resolve()
    assert s.token == "a-long-enough-token-123"


@pytest.mark.parametrize(
    ("toml", "overrides", "message"),
    [
        ("", {}, "no model repository"),
        ("[server]\nrepository = 'm'\nport = 1\n", {}, "unknown key 'port'.*http-port"),
        ("[servr]\n", {"repository": "m"}, "unknown table \\[servr\\]"),
        ("[server\n", {}, "not valid TOML"),
        ("", {"repository": "m", "device": "gpu"}, "auto, cpu, cuda"),
        ("", {"repository": "m", "batching.max_batch_size": 0}, "max-batch-size must be positive"),
        ("", {"repository": "m", "batching.max_queue_size": 8}, "at least max-batch-size"),
        ("", {"repository": "m", "rollout.canary_percent": 0.0}, "canary-percent"),
        ("", {"repository": "m", "http_port": 70000}, "0..65535"),
        ("", {"repository": "m", "tls_cert": Path("/nonexistent.pem")}, "needs both"),
        ("", {"repository": "m", "token": "short"}, "at least 16"),
        ("", {"repository": "m", "workers": 0}, "workers must be positive"),
        ("", {"repository": "m", "batching.max_queue_size": -1}, "max-queue-size must be >= 0"),
    ],
)
def test_bad_settings_are_one_clear_error(
    tmp_path: Path, toml: str, overrides: dict[str, object], message: str
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_serve_settings(config, overrides)


def test_the_listening_socket_says_tcp_so_responses_are_not_delayed() -> None:
    """asyncio turns TCP_NODELAY on for accepted connections only when the listening socket's
    proto is IPPROTO_TCP; with proto 0 every response waited ~40 ms for a delayed ACK."""
    import socket

    from pollinate.serving.ports import bind_listener as _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def test_settings_travel_to_the_workers_as_json_unchanged(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('[server]\nrepository = "models"\nworkers = 3\n[drift]\ntrigger-dir = "t"\n')
    settings = load_serve_settings(config, {"batching.max_batch_size": 16, "token": "x" * 20})
    again = settings_from_json(settings_to_json(settings))
    assert again == settings and again.workers == 3
    assert isinstance(again.repository, Path) and isinstance(again.drift.trigger_dir, Path)


def test_workers_need_free_ports_and_share_the_ones_they_hold() -> None:
    """The supervisor holds each port with SO_REUSEPORT so workers can bind it too; a port
    some other program listens on is refused, never shared."""
    import socket

    from pollinate.serving.ports import bind_listener as _bind
    from pollinate.serving.ports import hold_port as _hold_port

    hold = _hold_port("127.0.0.1", 0, "REST")
    port = hold.getsockname()[1]
    worker = _bind("127.0.0.1", port, reuse_port=True)  # a worker listens on the held port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port} \\(REST\\)"):
            _hold_port("127.0.0.1", port, "REST")
    finally:
        worker.close()
        hold.close()
