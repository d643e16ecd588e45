"""`pollinate serve --workers 2`: two server processes behind the same ports, one set of
metrics, one roll-out decision, and a killed worker started again; driven by tritonclient."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.support.processes import wait_until
from tests.support.serving import MODEL, copy_version, default_repository, mnist_images, serve

pytestmark = pytest.mark.integration


def _infer(url: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    """One request on a new connection (the kernel spreads connections across workers)."""
    client = thttp.InferenceServerClient(url)
    try:
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer(MODEL, [inp])
        return np.asarray(result.as_numpy("logits")), str(result.get_response()["model_version"])
    finally:
        client.close()


def _says(line: dict[str, object], text: str) -> bool:
    return text in str(line.get("message"))


def test_two_workers_share_ports_metrics_and_rollout(tmp_path: Path) -> None:
    repo = default_repository(tmp_path / "built")
    images = mnist_images(64)
    session = ort.InferenceSession(str(repo / MODEL / "3" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    reference = np.asarray(session.run(None, {"input": images})[0])
    args = ("--workers", "2", "--access-log", "--poll-interval", "0.2",
            "--canary-percent", "50", "--canary-min-requests", "40")  # fmt: skip
    with serve(repo, tmp_path, *args) as server:
        supervisor = psutil.Process(server.process.pid)
        workers = sorted(p.pid for p in supervisor.children())
        assert len(workers) == 2

        # answers are the model's, from both workers, and the metrics add both up
        for i in range(40):
            logits, version = _infer(server.http_url, images[i : i + 1])
            np.testing.assert_allclose(logits, reference[i : i + 1], atol=1e-4)
            assert version == "3"
        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        inp = tgrpc.InferInput("input", [2, 1, 28, 28], "FP32")
        inp.set_data_from_numpy(images[:2])
        np.testing.assert_allclose(
            grpc.infer(MODEL, [inp]).as_numpy("logits"), reference[:2], atol=1e-4
        )
        served_by = {line.get("worker") for line in server.log_lines() if _says(line, "infer")}
        assert served_by == {0, 1}, "connections should land on both workers"
        assert server.metric("pollinate_serving_requests_total", protocol="http") == 40
        assert server.metric("pollinate_serving_predictions_total") == 42

        # a new version: worker 0 judges the canary, worker 1 follows; no request fails
        stop, errors, versions = threading.Event(), [], []

        def client(k: int) -> None:
            while not stop.is_set():
                try:
                    versions.append(_infer(server.http_url, images[k : k + 2])[1])
                except InferenceServerException as err:
                    errors.append(str(err))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        copy_version(repo, 3, 4)
        promoted = lambda: server.metric("pollinate_serving_rollouts_total", outcome="promoted")  # noqa: E731
        wait_until("both workers to promote version 4", lambda: promoted() == 2, 90, interval=0.1)
        stop.set()
        for t in threads:
            t.join()
        assert errors == [] and "4" in versions
        assert [_infer(server.http_url, images[:1])[1] for _ in range(10)] == ["4"] * 10
        assert server.metric("pollinate_serving_version_role", version="4", role="current") == 1
        assert server.metric("pollinate_serving_version_role", version="3", role="current") == 0

        # a killed worker is started again and serves; the other one never stopped
        os.kill(workers[1], signal.SIGKILL)
        wait_until("the worker to start again", lambda: any(
            _says(line, "started again") for line in server.log_lines()
        ), 30, interval=0.1)  # fmt: skip
        wait_until("two workers", lambda: len(supervisor.children()) == 2, 30, interval=0.1)
        restarted = {p.pid for p in supervisor.children()} - set(workers)
        assert len(restarted) == 1 and psutil.pid_exists(workers[0])
        ready = lambda: sum(  # noqa: E731
            _says(line, "serving") and _says(line, "worker 1") for line in server.log_lines()
        ) == 2  # fmt: skip
        wait_until("the new worker to serve", ready, 60, interval=0.1)
        for i in range(10):  # it starts with the promoted version, not the one it had first
            assert _infer(server.http_url, images[i : i + 1])[1] == "4"
    assert server.process.returncode == 0
    assert not any(psutil.pid_exists(pid) for pid in (*workers, *restarted))
    shutil.rmtree(tmp_path / "built", ignore_errors=True)


def test_both_workers_follow_the_registry_production_alias(tmp_path: Path) -> None:
    """`registry.json` moved back from 4 to 3: every worker swaps, so requests on fresh
    connections (spread over both by the kernel) are all answered by version 3."""
    repo = default_repository(tmp_path / "built")
    copy_version(repo, 3, 4)
    aliases = repo / MODEL / "registry.json"
    aliases.write_text('{"production": 4, "staging": null}\n')
    images = mnist_images(1)
    args = ("--workers", "2", "--access-log", "--poll-interval", "0.2")
    with serve(repo, tmp_path, *args) as server:
        assert {_infer(server.http_url, images)[1] for _ in range(20)} == {"4"}
        aliases.write_text('{"production": 3, "staging": null}\n')
        wait_until(
            "both workers on version 3",
            lambda: server.metric("pollinate_serving_rollouts_total", outcome="registry") == 2,
            30,
        )
        assert {_infer(server.http_url, images)[1] for _ in range(40)} == {"3"}
        served_by = {line.get("worker") for line in server.log_lines() if _says(line, "infer")}
        assert served_by == {0, 1}, "connections should land on both workers"
