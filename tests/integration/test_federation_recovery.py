"""A server crash in the middle of a real federation, and `pollinate server resume`.

SuperLink (TLS + SuperNode authentication) and three `pollinate edge run` daemons on
loopback. After round 2 the SuperLink's whole process group (the SuperLink and the ServerApp
it runs) and `pollinate server start` are killed with SIGKILL. The server is started again on
the same state directory, the daemons' SuperNodes reconnect, and `pollinate server resume`
continues the run: no completed round is lost, every round appears once, and no client's
epsilon goes backwards. `server logs` and `server pull` work on the finished run.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pollinate.server.superlink import flwr_env, list_nodes
from tests.processes import free_port, spawn, stop_group, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEVICES = 3
ROUNDS = 4
POLLINATE = [sys.executable, "-m", "pollinate"]


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    out = subprocess.run([*POLLINATE, *args], capture_output=True, text=True, timeout=timeout,
                         env=env)  # fmt: skip
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def _online(state: Path) -> bool:
    try:
        return sum(n["status"] == "online" for n in list_nodes(state)) == DEVICES
    except Exception:  # the SuperLink is still starting
        return False


def _epsilons(privacy: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in privacy["ledger"]["clients"]:
        series.setdefault(entry["client"], []).append((entry["server_round"], entry["epsilon"]))
    return series


def test_a_crashed_server_resumes_without_losing_rounds_or_epsilon(tmp_path: Path) -> None:
    state, certs, port, metrics_port = (
        tmp_path / "state",
        tmp_path / "certs",
        free_port(),
        free_port(),
    )
    env = {**flwr_env(state), "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # fmt: skip
    _cli(env, "certs", str(certs), "--nodes", str(DEVICES), timeout=60)
    trust: list[str] = []
    for i in range(DEVICES):
        trust += ["--trust", str(certs / "nodes" / f"node-{i}.pub")]
    server_cmd = [*POLLINATE, "server", "start", "--certs", str(certs), "--state-dir", str(state),
                  "--port", str(port), "--metrics-port", str(metrics_port), *trust]  # fmt: skip
    server_log = tmp_path / "server.log"
    server = spawn(server_cmd, server_log, env)
    daemons: list[subprocess.Popen[str]] = []
    try:
        wait_until("the SuperLink", lambda: "SuperLink ready" in server_log.read_text(), 90)
        for i in range(DEVICES):
            cmd = [
                *POLLINATE, "edge", "run", "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"),
                "--key", str(certs / "nodes" / f"node-{i}"),
                "--state-dir", str(tmp_path / f"device-{i}"),
                "--partition-id", str(i), "--num-partitions", str(DEVICES),
            ]  # fmt: skip
            daemons.append(spawn(cmd, tmp_path / f"daemon-{i}.log", env))
        wait_until("the SuperNodes online", lambda: _online(state), 120)

        run_dir = tmp_path / "run"
        first = _cli(env, "server", "run", "--state-dir", str(state), "--rounds", str(ROUNDS),
                     "--round-timeout", "120", "--min-train-nodes", str(DEVICES),
                     "--run-dir", str(run_dir), "--set", "fraction-train=1.0",
                     "--set", "fraction-evaluate=0.0").strip().splitlines()[-1]  # fmt: skip

        def rounds_done() -> int:
            path = run_dir / "metrics.json"
            return len(json.loads(path.read_text())) - 1 if path.exists() else 0

        wait_until("round 2", lambda: rounds_done() >= 2, 300)
        # crash: the SuperLink's process group (with the ServerApp) and its wrapper, SIGKILL
        link = json.loads((state / "superlink.json").read_text())
        os.killpg(link["pid"], signal.SIGKILL)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        time.sleep(1.0)
        crashed_metrics = json.loads((run_dir / "metrics.json").read_text())
        crashed_privacy = json.loads((run_dir / "privacy.json").read_text())
        done = len(crashed_metrics) - 1
        assert 2 <= done < ROUNDS, crashed_metrics

        server = spawn(server_cmd, server_log, env)
        restarted = lambda: server_log.read_text().count("SuperLink ready") == 2  # noqa: E731
        wait_until("the restarted SuperLink", restarted, 90)
        wait_until("the SuperNodes back online", lambda: _online(state), 240)
        resumed = _cli(env, "server", "resume", "--state-dir", str(state))
        second = resumed.strip().splitlines()[-1]
        assert second != first

        def status() -> dict[str, Any]:
            report: dict[str, Any] = json.loads(
                _cli(env, "server", "status", "--state-dir", str(state), "--json", timeout=120)
            )
            return report

        wait_until("the resumed run to finish", lambda: str(status()["status"]).startswith(
            "finished"), 400)  # fmt: skip
        final = status()
        assert final["run_id"] == second and final["resumed_from"] == first
        assert final["status"] == "finished:completed" and final["round"] == ROUNDS, final

        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [m["server_round"] for m in metrics] == list(range(ROUNDS + 1))
        # the rounds completed before the crash are kept exactly as they were
        assert metrics[: done + 1] == crashed_metrics
        assert all(m["sampled"] == m["replied"] + m["failed"] for m in metrics[1:]), metrics
        assert all(m["replied"] >= 1 for m in metrics[1:]), metrics

        privacy = json.loads((run_dir / "privacy.json").read_text())
        before, after = _epsilons(crashed_privacy), _epsilons(privacy)
        assert set(before) <= set(after) and len(after) <= DEVICES
        for client, series in after.items():
            rounds = [r for r, _ in series]
            assert all(b > a for a, b in itertools.pairwise(rounds)) and rounds[-1] <= ROUNDS
            kept = [(r, e) for r, e in series if r <= done]
            assert kept == before.get(client, []), "completed rounds' epsilons are kept"
            epsilons = [e for _, e in series]
            assert all(b > a for a, b in itertools.pairwise(epsilons)), series
        assert any(r > done for series in after.values() for r, _ in series)
        # each device's own accountant covers every round it trained, the lost one included
        for i in range(DEVICES):
            device = json.loads(
                _cli(env, "edge", "status", "--state-dir", str(tmp_path / f"device-{i}"), "--json")
            )
            (client,) = device["clients"]
            if client["client"] in after:
                assert client["epsilon"] >= after[client["client"]][-1][1] - 1e-9

        # the federation's Prometheus endpoint (read from the run directory) agrees
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
            scraped = {
                (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(r.read().decode())
                for sample in family.samples
            }
        run_label = (("run_id", second),)
        assert scraped[("pollinate_federation_round", run_label)] == ROUNDS
        assert scraped[("pollinate_federation_max_epsilon", run_label)] == pytest.approx(
            privacy["summary"]["sample_level"]["max_epsilon"]
        )
        replied = (("outcome", "replied"), ("run_id", second))
        assert scraped[("pollinate_federation_clients_total", replied)] == DEVICES * ROUNDS

        logs = subprocess.run(
            [*POLLINATE, "server", "logs", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        assert logs.returncode == 0, logs.stderr
        pulled = tmp_path / "pulled" / f"run-{second}"
        _cli(env, "server", "pull", str(tmp_path / "pulled"), "--state-dir", str(state))
        assert json.loads((pulled / "metrics.json").read_text()) == metrics
        assert (pulled / "LATEST").read_text().strip() == f"checkpoints/round-{ROUNDS:04d}"
        assert (pulled / "checkpoints" / f"round-{ROUNDS:04d}" / "model.safetensors").is_file()
    finally:
        codes = [stop_group(d) for d in daemons]
        stop_group(server)
    assert codes == [0] * DEVICES
