"""A real federation on loopback: `pollinate server start` (TLS + SuperNode authentication),
five `pollinate edge run` daemons, and `pollinate server run` / `status` (the flwr CLI
underneath) for three rounds, ending with a signed bundle delivered to the devices and served
by their local inference servers. The run is started the way the serving tier's drift trigger
starts one (`server run --trigger-dir`), and it publishes the retrained model to a serving
repository as a new version.

Two SuperNodes are killed after round 1: round 2 completes with the others (when its timeout
passes or the SuperLink marks the killed ones offline), the daemons start the killed
SuperNodes again, and they train in round 3. Each device keeps its accountant in its own
state directory; SIGTERM stops every daemon cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pollinate.data import load_dataset
from pollinate.edge_runtime import load_bundle
from pollinate.serving.drift import DriftReading, TriggerSink
from tests.support.federation import Federation, rounds_done
from tests.support.processes import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DEVICES = 5
ROUNDS = 3


def test_five_daemons_train_three_rounds_and_survive_killed_supernodes(tmp_path: Path) -> None:
    sign, public = tmp_path / "sign.pem", tmp_path / "sign.pub"
    serve_ports = {0: free_port(), 1: free_port()}

    def device_args(i: int) -> list[str]:
        serve = ["--serve-port", str(serve_ports[i])] if i in serve_ports else []
        return ["--bundle-public-key", str(public), *serve]

    fed = Federation(tmp_path, DEVICES, device_args=device_args)
    fed.cli("keygen", str(sign), str(public), timeout=60)
    triggers, models = tmp_path / "triggers", tmp_path / "models"
    drifted = DriftReading(model="cnn", version=1, samples=1000, input_psi=0.9, output_psi=0.4,
                           threshold=0.2, drifted=True)  # fmt: skip
    event = TriggerSink(triggers, None).emit(drifted)  # what `pollinate serve` writes on drift
    assert event is not None
    with fed:
        fed.start()
        run_dir = tmp_path / "run"
        run_id = fed.start_run(run_dir, [
            "--rounds", str(ROUNDS), "--round-timeout", "60", "--min-train-nodes", "3",
            "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0",
            # a round takes ~40 s on two cores (five SuperNodes, two of them restarting) however
            # small the data: 96 samples a device, and a 60 s timeout
            "--set", "partitioner=resample", "--set", "samples-per-client=96",
            "--set", f"export-dir={tmp_path / 'bundles'}", "--set", "export-formats=onnx",
            "--set", f"export-sign-key={sign}", "--set", f"export-triton-repo={models}",
            "--trigger-dir", str(triggers),
        ])  # fmt: skip
        consumed = json.loads((triggers / "consumed" / event.name).read_text())
        assert consumed["run_id"] == run_id and not event.exists()
        assert json.loads((fed.state / "runs.json").read_text())[run_id]["triggers"] == [event.name]
        wait_until("round 1", lambda: rounds_done(run_dir) >= 1, 300)
        # no process of the federation sends Flower's telemetry (pollinate's default)
        telemetry = fed.environments("FLWR_TELEMETRY_ENABLED")
        assert any("flwr-serverapp" in p for p in telemetry), telemetry  # seen mid-run
        assert len(telemetry) >= 2 + 2 * DEVICES, telemetry
        assert {p: v for p, v in telemetry.items() if v != "0"} == {}
        killed = []
        for i in (3, 4):  # kill the SuperNodes (not the daemons) of two devices mid-run
            pid = json.loads((tmp_path / f"device-{i}" / "daemon.json").read_text())[
                "supernode_pid"
            ]
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
        final = fed.wait_finished("the run to finish", 400)
        assert final["run_id"] == run_id and final["status"] == "finished:completed", final
        assert final["round"] == ROUNDS and final["max_epsilon"] > 0  # type: ignore[operator]

        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [m["server_round"] for m in metrics] == list(range(ROUNDS + 1))
        assert all(m["replied"] >= 3 for m in metrics[1:]), metrics
        # every sampled client either replied or counts as failed (error reply or none in time)
        assert all(m["sampled"] == m["replied"] + m["failed"] for m in metrics[1:]), metrics
        # Round 2 went on without the killed SuperNodes: it ends when its 60 s timeout passes
        # or when the SuperLink, having marked them offline (about 50 s after the kill),
        # answers their messages with errors. A restarted one may still pull round 2's
        # message (within its TTL), train and reply in time (seen: one of the two, ~10 s to
        # train), so at least one fails; how long the round took depends on which came first.
        assert metrics[2]["failed"] >= 1 and metrics[2]["replied"] >= 3, metrics
        assert metrics[1]["replied"] == DEVICES
        assert metrics[-1]["accuracy"] is not None

        # the exported bundle went to every device that was connected; the devices that
        # serve answer from it, exactly as the edge runtime does on the exported archive
        delivery = json.loads((run_dir / "delivery.json").read_text())
        assert delivery["refused"] == {}, delivery

        def key(i: int) -> str:  # a device is known by its own id (its state dir), not its node
            return "d-" + (tmp_path / f"device-{i}" / "device-id").read_text().strip()

        assert {key(0), key(1), key(2)} <= set(delivery["installed"]), delivery
        archive = tmp_path / "bundles.tar.gz"  # the exporter writes it beside the bundle
        published = models / "cnn" / str(ROUNDS) / "model.onnx"  # the serving tier's next version
        assert published.read_bytes() == (tmp_path / "bundles" / "model.fp32.onnx").read_bytes()
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
            assert served["bundle"] == delivery["installed"][key(i)]
            np.testing.assert_allclose(np.asarray(served["outputs"]), expected, atol=1e-5)
        # The daemons start the killed SuperNodes again; the SuperLink lets them back in once
        # it has marked them offline (Flower: two missed 30 s heartbeats), so this can take a
        # minute or two of back-off retries.
        fed.wait_online("all SuperNodes back online", 240)
        for i in (3, 4):
            status = json.loads((tmp_path / f"device-{i}" / "daemon.json").read_text())
            assert status["restarts"] >= 1 and status["state"] == "running"
            assert status["supernode_pid"] not in killed
            lines = (tmp_path / f"daemon-{i}.log").read_text().splitlines()
            events = [json.loads(line) for line in lines if line.startswith("{")]
            assert any(e.get("exit_code") == -9 for e in events), events
        device = json.loads(
            fed.cli("edge", "status", "--state-dir", str(fed.device_dir(0)), "--json")
        )
        assert device["bundle"]["name"] == delivery["installed"][key(0)]
        assert device["serving"] == f"http://127.0.0.1:{serve_ports[0]}"
        assert device["last_round"]["server_round"] == ROUNDS
        assert str(device["last_round"]["run_id"]) == run_id
        clients = device["clients"]
        assert len(clients) == 1 and clients[0]["epsilon"] > 0 and clients[0]["steps"] > 0

        # A ServerApp that asks the real devices to train without DP: every device refuses
        # (its policy requires DP-SGD), nothing trains, and both sides count the refusals.
        evil = tmp_path / "no-dp"
        evil_id = fed.start_run(evil, [
            "--rounds", "1", "--round-timeout", "90", "--min-train-nodes", "3",
            "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0", "--set", "dp=none",
        ])  # fmt: skip
        fed.wait_finished("the dp=none run", 300, evil_id)
        asked = json.loads((evil / "metrics.json").read_text())[1]
        assert asked["replied"] >= 3 and asked["refused"] == asked["replied"], asked
        assert asked["accuracy"] == json.loads((evil / "metrics.json").read_text())[0]["accuracy"]
        after = json.loads(
            fed.cli("edge", "status", "--state-dir", str(fed.device_dir(0)), "--json")
        )
        assert after["refusals"]["total"] >= 1 and "no DP" in after["refusals"]["last"]["reason"]
        assert after["clients"][0]["steps"] == clients[0]["steps"]  # it trained nothing
    assert fed.codes == [0] * DEVICES, "SIGTERM must stop every daemon cleanly"
    for i in range(DEVICES):
        assert (
            json.loads((tmp_path / f"device-{i}" / "daemon.json").read_text())["state"] == "stopped"
        )
