"""An A/B/n experiment in a real `pollinate serve` on loopback: the sticky split (REST and
gRPC), feedback, unknown ids refused, a pinned version kept through a roll-out, the state kept
across a restart, and `pollinate serve ab status`.

The variants are constant classifiers (each always answers one class), so every outcome is
known: labelled 0, the control (class 0) is always right and the challengers always wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.support.processes import POLLINATE
from tests.support.serving import Server, serve

pytestmark = pytest.mark.integration

CONFIG = """
[rollout]                 # a new version is promoted on its first few requests
poll-interval-s = 0.2
canary-percent = 50.0
min-requests = 5
max-latency-ratio = 1000.0  # sub-millisecond models: latency noise must not roll one back

[ab]
state-dir = "state"
save-interval-s = 0.2

[ab.first-try]
model = "clf"
variants = [
  { name = "control", version = 1, weight = 0.4 },
  { name = "v2", version = 2, weight = 0.2 },
  { name = "alt", model = "clf-alt", version = 1, weight = 0.2 },
  { name = "latest", weight = 0.2 },
]
min-samples = 10
"""


def _constant_classifier(cls: int) -> onnx.ModelProto:
    """x (N, 4) -> logits (N, 3) that always pick class ``cls``."""
    inits = [
        numpy_helper.from_array(np.zeros((4, 3), np.float32), "w"),
        numpy_helper.from_array(np.eye(3, dtype=np.float32)[cls] * 5, "b"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _repository(root: Path) -> Path:
    """clf versions 1, 2, 3 answer classes 0, 1, 2 (3 is current); clf-alt 1 answers 1."""
    repo = root / "repo"
    for name, versions in {"clf": {1: 0, 2: 1, 3: 2}, "clf-alt": {1: 1}}.items():
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
            'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
        )
        for version, cls in versions.items():
            (repo / name / str(version)).mkdir()
            onnx.save(_constant_classifier(cls), repo / name / str(version) / "model.onnx")
    return repo


def _publish(repo: Path, model: str, version: int, cls: int) -> None:
    """A new version the way the exporter publishes one: model.onnx appears last."""
    staging = repo / model / f".staging-{version}"
    staging.mkdir()
    onnx.save(_constant_classifier(cls), staging / "model.tmp")
    os.replace(staging, repo / model / str(version))
    os.replace(
        repo / model / str(version) / "model.tmp", repo / model / str(version) / "model.onnx"
    )


def _post(server: Server, path: str, body: dict[str, Any], **headers: str) -> Any:
    request = urllib.request.Request(
        f"http://{server.http_url}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", **headers},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def _infer(server: Server, request_id: str, user: str | None, path: str = "/v2/models/clf") -> Any:
    body = {"id": request_id, "inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}
    ]}  # fmt: skip
    user_header = {"x-user-id": user} if user else {}
    status, headers, reply = _post(server, f"{path}/infer", body, **user_header)
    assert status == 200, reply
    return headers, reply


def _status(config: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [*POLLINATE, "serve", "ab", "status", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return list(json.loads(proc.stdout))


def test_an_experiment_splits_traffic_takes_feedback_and_keeps_its_counts(tmp_path: Path) -> None:
    repo = _repository(tmp_path)
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\nrepository = "{repo}"\n{CONFIG}')
    targets = {
        "control": ("clf", "1"), "v2": ("clf", "2"), "alt": ("clf-alt", "1"), "latest": ("clf", "3")
    }  # fmt: skip
    served: dict[str, str] = {}
    with serve(repo, tmp_path, "--config", str(config)) as server:
        for i in range(60):
            headers, reply = _infer(server, f"req-{i}", f"user-{i % 30}")
            variant = headers["x-ab-variant"]
            assert headers["x-ab-experiment"] == "first-try" and reply["id"] == f"req-{i}"
            assert (reply["model_name"], reply["model_version"]) == targets[variant]
            assert served.setdefault(f"user-{i % 30}", variant) == variant, "not sticky"
            status, _, answer = _post(
                server, "/v2/models/clf/feedback", {"id": f"req-{i}", "label": 0}
            )
            assert status == 200 and answer["variant"] == variant, answer
        assert set(served.values()) == set(targets)
        anonymous = {_infer(server, f"anon-{i}", None)[0]["x-ab-variant"] for i in range(30)}
        assert len(anonymous) >= 2  # a random draw per request
        named, _ = _infer(server, "named", "user-1", path="/v2/models/clf/versions/3")
        assert "x-ab-variant" not in named  # a request naming its version is no part of it
        status, _, answer = _post(server, "/v2/models/clf/feedback", {"id": "nope", "label": 0})
        assert status == 404 and "remembers no answer with id 'nope'" in answer["error"]
        status, _, _ = _post(server, "/v2/models/clf/feedback", {"id": "req-0", "label": 0})
        assert status == 409  # one outcome per answer
        rejected = "pollinate_serving_ab_feedback_rejected_total"
        assert server.metric(rejected, model="clf", reason="unknown_id") == 1
        assert server.metric("pollinate_serving_ab_requests_total") == 90

        # clf-alt 2 is canaried and promoted on clf-alt's own traffic; the pinned 1 stays
        _publish(repo, "clf-alt", 2, cls=2)
        deadline = time.monotonic() + 20
        while server.metric("pollinate_serving_version_role", model="clf-alt", version="2",
                            role="current") != 1:  # fmt: skip
            assert time.monotonic() < deadline, "clf-alt version 2 was never promoted"
            _infer(server, "plain", None, path="/v2/models/clf-alt")
        assert _infer(server, "plain", None, path="/v2/models/clf-alt")[1]["model_version"] == "2"
        alt_user = next(user for user, variant in served.items() if variant == "alt")
        headers, reply = _infer(server, "alt-after-rollout", alt_user)
        assert headers["x-ab-variant"] == "alt" and reply["model_version"] == "1"
    per_variant = {v: sum(1 for i in range(60) if served[f"user-{i % 30}"] == v) for v in targets}
    (shown,) = _status(config)
    reports = {r["name"]: r for r in shown["reports"]}
    assert {name: r["n"] for name, r in reports.items()} == per_variant  # fed back ones
    assert reports["control"]["metric"] == 1.0 and reports["v2"]["metric"] == 0.0
    # always right against always wrong: decided as soon as each arm has min-samples
    for name in ("v2", "alt", "latest"):
        enough = min(per_variant[name], per_variant["control"]) >= 10
        assert reports[name]["decision"] == ("loser" if enough else "running"), reports

    with serve(repo, tmp_path, "--config", str(config)) as server:  # a restart keeps the counts
        headers, _ = _infer(server, "after-restart", "user-1")
        assert headers["x-ab-variant"] == served["user-1"]
        status, _, answer = _post(
            server, "/v2/models/clf/feedback", {"id": "after-restart", "label": 0}
        )
        assert status == 200 and answer["n"] == per_variant[served["user-1"]] + 1
        # over gRPC the same user gets the same variant, and REST takes its feedback
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = grpcclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        result = client.infer("clf", [x], request_id="over-grpc", headers={"x-user-id": "user-1"})
        response = result.get_response()
        assert (response.model_name, response.model_version) == targets[served["user-1"]]
        status, _, answer = _post(
            server, "/v2/models/clf/feedback", {"id": "over-grpc", "label": 0}
        )
        assert status == 200 and answer["variant"] == served["user-1"], answer
        assert answer["n"] == per_variant[served["user-1"]] + 2
        client.close()
    text = subprocess.run(
        [*POLLINATE, "serve", "ab", "status", "--config", str(config)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "A/B experiment first-try on clf" in text and "clf-alt" in text, text


def test_two_workers_share_one_experiment(tmp_path: Path) -> None:
    """`--workers 2`: answers and feedback land on both workers (each on a new connection),
    feedback finds an answer the other worker gave, an answer takes one outcome whichever
    worker hears it, and `serve ab status` counts every outcome while the server runs."""
    repo = _repository(tmp_path)
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\nrepository = "{repo}"\n{CONFIG}')
    served: dict[str, str] = {}
    args = ("--config", str(config), "--workers", "2", "--access-log")
    with serve(repo, tmp_path, *args) as server:
        for i in range(80):
            headers, _ = _infer(server, f"req-{i}", f"user-{i % 20}")
            variant = headers["x-ab-variant"]
            assert served.setdefault(f"user-{i % 20}", variant) == variant, "not sticky"
            status, _, answer = _post(
                server, "/v2/models/clf/feedback", {"id": f"req-{i}", "label": 0}
            )
            assert status == 200 and answer["variant"] == variant, answer
        for i in range(0, 80, 8):  # a second outcome, on any worker: refused
            status, _, _ = _post(server, "/v2/models/clf/feedback", {"id": f"req-{i}", "label": 0})
            assert status == 409
        status, _, answer = _post(server, "/v2/models/clf/feedback", {"id": "nope", "label": 0})
        assert status == 404 and "remembers no answer with id 'nope'" in answer["error"]
        lines = server.log_lines()
        answered = {ln["request_id"]: ln["worker"] for ln in lines if ln["message"] == "infer"}
        told = {
            ln["request_id"]: ln["worker"]
            for ln in lines
            if ln["message"] == "feedback" and ln["status"] == 200
        }
        assert set(answered.values()) == set(told.values()) == {0, 1}, "one worker took all"
        assert any(answered[i] != told[i] for i in told), "no feedback crossed workers"
        (running,) = _status(config)  # read while both workers run, before any stop
        assert sum(r["n"] for r in running["reports"]) == 80
        rejected = "pollinate_serving_ab_feedback_rejected_total"
        assert server.metric(rejected, model="clf", reason="unknown_id") == 1
        assert server.metric(rejected, model="clf", reason="duplicate") == 10
        assert server.metric("pollinate_serving_ab_feedback_total") == 80
    per_variant = {v: sum(1 for i in range(80) if served[f"user-{i % 20}"] == v)
                   for v in set(served.values())}  # fmt: skip
    (stopped,) = _status(config)
    assert {r["name"]: r["n"] for r in stopped["reports"] if r["n"]} == per_variant
