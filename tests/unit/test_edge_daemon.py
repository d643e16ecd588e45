"""The edge daemon's settings, training window and status report (no processes started)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.device.daemon import DaemonSettings, _in_window, parse_window
from pollinate.errors import ConfigError
from pollinate.privacy import ClientAccountant, MechanismStep


def _files(tmp_path: Path) -> dict[str, Path]:
    ca, key = tmp_path / "ca.crt", tmp_path / "node-0"
    ca.write_text("ca")
    key.write_text("key")
    return {"root_certificates": ca, "key": key}


def test_training_window_wraps_past_midnight() -> None:
    night = parse_window("22:00-06:00")
    day = parse_window("09:30-17:00")
    at = lambda h, m=0: dt.datetime(2026, 11, 26, h, m)  # noqa: E731
    assert _in_window(night, at(23)) and _in_window(night, at(2)) and not _in_window(night, at(12))
    assert _in_window(day, at(9, 30)) and not _in_window(day, at(17)) and not _in_window(day, at(8))
    assert _in_window(None, at(3))
    for bad in ("22:00", "10:00-10:00", "25:00-01:00", "late-early"):
        with pytest.raises(ConfigError, match="--window"):
            parse_window(bad)


def test_settings_say_what_is_missing(tmp_path: Path) -> None:
    files = _files(tmp_path)
    ok = DaemonSettings(superlink="h:9093", state_dir=tmp_path / "s", partition_id=1,
                        num_partitions=5, epsilon_budget=3.0, **files)  # fmt: skip
    config = ok.node_config()
    assert "partition-id=1" in config and "num-partitions=5" in config
    assert f'state-dir="{(tmp_path / "s").resolve()}"' in config and "epsilon-budget=3.0" in config
    with_data = DaemonSettings(superlink="h:9093", state_dir=tmp_path, data=tmp_path, **files)
    assert f'data-path="{tmp_path.resolve()}"' in with_data.node_config()
    pub = tmp_path / "sign.pub"
    pub.write_text("key")
    signed = DaemonSettings(superlink="h:9093", state_dir=tmp_path, data=tmp_path,
                            bundle_public_key=pub, **files)  # fmt: skip
    assert f'bundle-public-key="{pub.resolve()}"' in signed.node_config()
    cases = [
        ({"superlink": "nohost"}, "HOST:PORT"),
        ({"key": tmp_path / "missing"}, "--key"),
        ({"data": tmp_path / "missing"}, "--data"),
        ({"partition_id": 1, "num_partitions": None}, "go together"),
        ({"partition_id": None, "num_partitions": None}, "which data"),
        ({"threads": 0}, "--threads"),
        ({"epsilon_budget": -1.0}, "--epsilon-budget"),
        ({"bundle_public_key": tmp_path / "missing.pub"}, "--bundle-public-key"),
        ({"serve_port": 0}, "--serve-port"),
        ({"serve_port": 70000}, "--serve-port"),
    ]
    for change, message in cases:
        args = {"superlink": "h:9093", "state_dir": tmp_path, "partition_id": 0,
                "num_partitions": 2, **files, **change}  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            DaemonSettings(**args)  # type: ignore[arg-type]


def test_edge_status_reports_epsilon_of_the_whole_history(tmp_path: Path) -> None:
    acc = ClientAccountant()
    for _ in range(3):
        acc.record(MechanismStep(noise_multiplier=1.0, sample_rate=0.1, steps=20))
    acc.save(tmp_path / "p000001.accountant.json")
    (tmp_path / "daemon.json").write_text(json.dumps({
        "state": "running", "restarts": 2, "settings": {"epsilon_budget": "8.0"},
    }))  # fmt: skip
    status = [sys.executable, "-m", "pollinate", "edge", "status", "--state-dir"]
    out = subprocess.run(
        [*status, str(tmp_path), "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["state"] == "running" and report["restarts"] == 2
    [client] = report["clients"]
    expected = acc.epsilon(1e-5)
    assert client["client"] == "p000001" and client["steps"] == 60
    assert client["epsilon"] == pytest.approx(expected)
    assert client["budget_left"] == pytest.approx(8.0 - expected)
    empty = subprocess.run(
        [*status, str(tmp_path / "no")], capture_output=True, text=True, timeout=120
    )
    assert empty.returncode != 0
    # the whole message on one line, however long the temporary path is (stderr is a pipe)
    message = f"error: {tmp_path / 'no'} holds no daemon state; is it the --state-dir?"
    assert empty.stderr.splitlines() == [message], empty.stderr
