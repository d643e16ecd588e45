"""A real federation on loopback: `pollinate server start` (TLS + SuperNode authentication),
five `pollinate edge run` daemons, and `pollinate server run` / `status` (the flwr CLI
underneath) for three rounds, ending with a signed bundle delivered to the devices and served
by their local inference servers.

Two SuperNodes are killed after round 1: round 2 completes with the others when its timeout
passes, the daemons start the killed SuperNodes again, and they train in round 3. Each device
keeps its accountant in its own state directory; SIGTERM stops every daemon cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pollinate.data import load_dataset
from pollinate.edge_runtime import load_bundle
from pollinate.server.superlink import flwr_env, list_nodes
from tests.processes import free_port, spawn, stop_group, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEVICES = 5
ROUNDS = 3


def test_five_daemons_train_three_rounds_and_survive_killed_supernodes(tmp_path: Path) -> None:
    pollinate = [sys.executable, "-m", "pollinate"]
    env = {**flwr_env(tmp_path / "state"), "OMP_NUM_THREADS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}  # fmt: skip
    made = subprocess.run(
        [*pollinate, "certs", str(tmp_path / "certs"), "--nodes", str(DEVICES)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert made.returncode == 0, made.stderr
    sign, public = tmp_path / "sign.pem", tmp_path / "sign.pub"
    keys = subprocess.run([*pollinate, "keygen", str(sign), str(public)], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    assert keys.returncode == 0, keys.stderr
    serve_ports = {0: free_port(), 1: free_port()}
    certs, port, state = tmp_path / "certs", free_port(), tmp_path / "state"
    trust: list[str] = []
    for i in range(DEVICES):
        trust += ["--trust", str(certs / "nodes" / f"node-{i}.pub")]
    server_cmd = [*pollinate, "server", "start", "--certs", str(certs), "--state-dir", str(state),
                  "--port", str(port), *trust]  # fmt: skip
    server = spawn(server_cmd, tmp_path / "server.log", env)
    daemons: list[subprocess.Popen[str]] = []
    try:
        server_log = tmp_path / "server.log"
        wait_until("the SuperLink", lambda: "SuperLink ready" in server_log.read_text(), 90)
        for i in range(DEVICES):
            cmd = [
                *pollinate, "edge", "run", "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(certs / "ca.crt"),
                "--key", str(certs / "nodes" / f"node-{i}"),
                "--state-dir", str(tmp_path / f"device-{i}"),
                "--partition-id", str(i), "--num-partitions", str(DEVICES),
                "--bundle-public-key", str(public),
            ]  # fmt: skip
            if i in serve_ports:
                cmd += ["--serve-port", str(serve_ports[i])]
            daemons.append(spawn(cmd, tmp_path / f"daemon-{i}.log", env))
        online = lambda: sum(n["status"] == "online" for n in list_nodes(state)) == DEVICES  # noqa: E731
        wait_until("five SuperNodes online", online, 120)

        run_dir = tmp_path / "run"
        started = subprocess.run(
            [*pollinate, "server", "run", "--state-dir", str(state), "--rounds", str(ROUNDS),
             "--round-timeout", "45", "--min-train-nodes", "3", "--run-dir", str(run_dir),
             "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0",
             "--set", f"export-dir={tmp_path / 'bundles'}", "--set", "export-formats=onnx",
             "--set", f"export-sign-key={sign}"],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip().splitlines()[-1]

        def status() -> dict[str, object]:
            out = subprocess.run(
                [*pollinate, "server", "status", "--state-dir", str(state), "--json"],
                capture_output=True, text=True, timeout=120, env=env,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            report: dict[str, object] = json.loads(out.stdout)
            return report

        def rounds_done() -> int:
            path = run_dir / "metrics.json"
            return len(json.loads(path.read_text())) - 1 if path.exists() else 0

        wait_until("round 1", lambda: rounds_done() >= 1, 300)
        killed = []
        for i in (3, 4):  # kill the SuperNodes (not the daemons) of two devices mid-run
            pid = json.loads((tmp_path / f"device-{i}" / "daemon.json").read_text())[
                "supernode_pid"
            ]
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
        wait_until("the run to finish", lambda: str(status()["status"]).startswith("finished"), 400)
        final = status()
        assert final["run_id"] == run_id and final["status"] == "finished:completed", final
        assert final["round"] == ROUNDS and final["max_epsilon"] > 0  # type: ignore[operator]

        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [m["server_round"] for m in metrics] == list(range(ROUNDS + 1))
        assert all(m["replied"] >= 3 for m in metrics[1:]), metrics
        # every sampled client either replied or counts as failed (error reply or none in time)
        assert all(m["sampled"] == m["replied"] + m["failed"] for m in metrics[1:]), metrics
        assert metrics[2]["failed"] >= 2, metrics
        assert metrics[1]["replied"] == DEVICES
        assert metrics[-1]["accuracy"] is not None

        # the exported bundle went to every device that was connected; the devices that
        # serve answer from it, exactly as the edge runtime does on the exported archive
        delivery = json.loads((run_dir / "delivery.json").read_text())
        assert delivery["refused"] == {}, delivery
        assert {"p000000", "p000001", "p000002"} <= set(delivery["installed"]), delivery
        archive = tmp_path / "bundles.tar.gz"  # the exporter writes it beside the bundle
        assert delivery["bundle"] == archive.name
        images = np.round(load_dataset("mnist", seed=42).test.x[:8, 0] * 255).astype(np.uint8)
        with load_bundle(archive, public_key=public) as model:
            expected = model.predict(images)
        for i, serve_port in serve_ports.items():
            request = urllib.request.Request(
                f"http://127.0.0.1:{serve_port}/v1/predict", method="POST",
                data=json.dumps({"inputs": images.tolist(), "dtype": "uint8"}).encode(),
            )  # fmt: skip
            with urllib.request.urlopen(request, timeout=60) as answer:
                served = json.loads(answer.read())
            assert served["bundle"] == delivery["installed"][f"p{i:06d}"]
            np.testing.assert_allclose(np.asarray(served["outputs"]), expected, atol=1e-5)
        # The daemons start the killed SuperNodes again; the SuperLink lets them back in once
        # it has marked them offline (Flower: two missed 30 s heartbeats), so this can take a
        # minute or two of back-off retries.
        wait_until("all SuperNodes back online", online, 240)
        for i in (3, 4):
            status = json.loads((tmp_path / f"device-{i}" / "daemon.json").read_text())
            assert status["restarts"] >= 1 and status["state"] == "running"
            assert status["supernode_pid"] not in killed
            lines = (tmp_path / f"daemon-{i}.log").read_text().splitlines()
            events = [json.loads(line) for line in lines if line.startswith("{")]
            assert any(e.get("exit_code") == -9 for e in events), events
        report = subprocess.run(
            [*pollinate, "edge", "status", "--state-dir", str(tmp_path / "device-0"), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert report.returncode == 0, report.stderr
        device = json.loads(report.stdout)
        assert device["bundle"]["name"] == delivery["installed"]["p000000"]
        assert device["serving"] == f"http://127.0.0.1:{serve_ports[0]}"
        assert device["last_round"]["server_round"] == ROUNDS
        assert str(device["last_round"]["run_id"]) == run_id
        clients = device["clients"]
        assert len(clients) == 1 and clients[0]["epsilon"] > 0 and clients[0]["steps"] > 0
    finally:
        codes = [stop_group(d) for d in daemons]
        stop_group(server)
    assert codes == [0] * DEVICES, "SIGTERM must stop every daemon cleanly"
    for i in range(DEVICES):
        assert (
            json.loads((tmp_path / f"device-{i}" / "daemon.json").read_text())["state"] == "stopped"
        )
