"""`pollinate server run/status` before anything reaches a SuperLink: run config and errors."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from pollinate.ops.runs import toml_run_config


def test_run_config_is_valid_toml_with_the_right_types() -> None:
    values = {"num-server-rounds": 3, "fraction-train": 0.5, "resume": True,
              "run-dir": '/tmp/a "b"', "strategy": "fedavg"}  # fmt: skip
    text = toml_run_config(values)
    parsed = tomllib.loads("\n".join(f"{k} = {v}" for k, v in (p.split("=", 1) for p in
                                                                  _split(text))))  # fmt: skip
    assert parsed == values


def _split(text: str) -> list[str]:
    """Split on spaces outside quotes (what flwr does with --run-config)."""
    parts, current, quoted = [], "", False
    for ch in text:
        if ch == '"' and not current.endswith("\\\\"):
            quoted = not quoted
        if ch == " " and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pollinate", "server", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})  # fmt: skip


def test_bad_settings_fail_before_anything_is_sent(tmp_path: Path) -> None:
    bad = _cli("run", "--state-dir", str(tmp_path), "--rounds", "0")
    assert bad.returncode == 2 and "num-server-rounds" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = _cli("run", "--state-dir", str(tmp_path), "--set", "no-such-key=1")
    assert unknown.returncode == 2 and "no-such-key" in unknown.stderr, unknown.stderr
    none = _cli("status", "--state-dir", str(tmp_path))
    assert none.returncode == 2 and "no runs were started" in none.stderr


def _fake_run(state: Path, run_id: str, *, export_dir: Path | None = None) -> Path:
    """A run directory as the ServerApp leaves it after two rounds, recorded in runs.json."""
    import json

    run_dir = state / "runs" / "r1"
    (run_dir / "checkpoints" / "round-0001").mkdir(parents=True)
    (run_dir / "checkpoints" / "round-0002").mkdir(parents=True)
    (run_dir / "checkpoints" / "round-0002" / "model.safetensors").write_bytes(b"m2")
    (run_dir / "checkpoints" / "round-0001" / "model.safetensors").write_bytes(b"m1")
    (run_dir / "LATEST").write_text("checkpoints/round-0002\n")
    settings = {"num-server-rounds": 2, "export-dir": str(export_dir) if export_dir else ""}
    (run_dir / "run.json").write_text(json.dumps({"settings": settings}))
    (run_dir / "metrics.json").write_text(json.dumps([{"server_round": 0}, {"server_round": 1}]))
    (run_dir / "privacy.json").write_text("{}")
    (run_dir / "clients").mkdir()
    (run_dir / "clients" / "accountants.jsonl").write_text("{}\n")
    runs = {run_id: {"run_dir": str(run_dir), "started": "2026-11-26T00:00:00+00:00"}}
    (state / "runs.json").write_text(json.dumps(runs))
    return run_dir


def test_pull_copies_results_newest_checkpoint_and_bundles(tmp_path: Path) -> None:
    state, export = tmp_path / "state", tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    (tmp_path / "export.tar.gz").write_bytes(b"archive")
    state.mkdir()
    run_dir = _fake_run(state, "42", export_dir=export)
    pulled = _cli("pull", str(tmp_path / "out"), "--state-dir", str(state))
    assert pulled.returncode == 0, pulled.stderr
    target = tmp_path / "out" / "run-42"
    names = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert names == [
        "LATEST", "bundle.tar.gz", "bundle/manifest.json",
        "checkpoints/round-0002/model.safetensors", "metrics.json", "privacy.json", "run.json",
    ]  # fmt: skip
    assert (target / "metrics.json").read_bytes() == (run_dir / "metrics.json").read_bytes()
    # pulling again replaces the copy, and no partial folder is left behind
    (run_dir / "metrics.json").write_text("[]")
    assert _cli("pull", str(tmp_path / "out"), "--state-dir", str(state)).returncode == 0
    assert (target / "metrics.json").read_text() == "[]"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run-42"]


def test_pull_and_resume_errors_say_what_is_wrong(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    run_dir = _fake_run(state, "42")
    unknown = _cli("pull", str(tmp_path / "out"), "--state-dir", str(state), "--run-id", "7")
    assert unknown.returncode == 2 and "run 7 was not started" in unknown.stderr
    assert "known: 42" in unknown.stderr
    (run_dir / "run.json").unlink()
    resumed = _cli("resume", "42", "--state-dir", str(state))
    assert resumed.returncode == 2 and "never started training" in resumed.stderr, resumed.stderr
    assert "Traceback" not in resumed.stderr
