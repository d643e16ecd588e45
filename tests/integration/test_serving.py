"""`pollinate serve` as a real process on loopback, driven by independent clients.

tritonclient (http and grpc) and curl talk to the server unchanged; answers are checked
against onnxruntime and torch running the same model files in this process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from safetensors.torch import load_file
from tritonclient.utils import InferenceServerException

from pollinate.models import build_model
from tests.support.serving import (
    MODEL,
    copy_version,
    default_repository,
    mnist_images,
    nan_model,
    serve,
    slow_model,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return default_repository(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return mnist_images(256)


@pytest.fixture(scope="module")
def reference(repo: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime on the repository's model file, in this process."""
    session = ort.InferenceSession(
        str(repo / MODEL / "3" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return np.asarray(session.run(None, {"input": images})[0])


def _http_infer(
    client: thttp.InferenceServerClient, x: np.ndarray, *, binary: bool = True
) -> thttp.InferResult:
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = thttp.InferRequestedOutput("logits", binary_data=binary)
    return client.infer(MODEL, [inp], outputs=[out])


def _grpc_infer(
    client: tgrpc.InferenceServerClient, x: np.ndarray, version: str = ""
) -> tgrpc.InferResult:
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(MODEL, [inp], model_version=version)


def test_tritonclient_http_grpc_and_curl_get_the_models_answers(
    repo: Path, tmp_path: Path, images: np.ndarray, reference: np.ndarray
) -> None:
    # torch, rebuilt from the repository's safetensors: the model the federation trained
    spec = json.loads((repo / MODEL / "3" / "torch.json").read_text())
    model = build_model(
        spec["architecture"],
        input_shape=tuple(spec["input_shape"]),
        num_classes=spec["num_classes"],
    )
    model.load_state_dict(load_file(str(repo / MODEL / "3" / "model.safetensors")))
    with torch.no_grad():
        torch_logits = model.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(reference, torch_logits, atol=1e-4)

    with serve(repo, tmp_path) as server:
        http = thttp.InferenceServerClient(server.http_url)
        assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
        meta = http.get_model_metadata(MODEL)
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert meta["versions"] == ["3"]
        assert http.get_server_metadata()["extensions"] == ["binary_tensor_data"]
        for binary in (True, False):
            got = _http_infer(http, images[:16], binary=binary)
            np.testing.assert_allclose(got.as_numpy("logits"), reference[:16], rtol=1e-5, atol=1e-5)
            assert got.get_response()["model_version"] == "3"

        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)
        assert not grpc.is_model_ready(MODEL, "7")
        gmeta = grpc.get_model_metadata(MODEL)
        assert gmeta.platform == "onnxruntime_onnx" and list(gmeta.inputs[0].shape) == [
            -1,
            1,
            28,
            28,
        ]
        assert grpc.get_server_metadata().name == "pollinate"
        got = _grpc_infer(grpc, images[16:48])
        np.testing.assert_allclose(got.as_numpy("logits"), reference[16:48], rtol=1e-5, atol=1e-5)
        assert np.array_equal(got.as_numpy("logits").argmax(1), torch_logits[16:48].argmax(1))

        # typed contents (no raw_input_contents), as a non-Triton KServe client sends them
        import grpc as grpc_lib

        from pollinate.serving.proto import kserve_v2_pb2 as pb
        from pollinate.serving.proto import kserve_v2_pb2_grpc as pb_grpc

        with grpc_lib.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name=MODEL, id="typed-1")
            tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 1, 28, 28])
            tensor.contents.fp32_contents.extend(images[:2].reshape(-1).tolist())
            reply = stub.ModelInfer(request)
        assert reply.id == "typed-1" and list(reply.outputs[0].shape) == [2, 10]
        typed = np.frombuffer(reply.raw_output_contents[0], dtype="<f4").reshape(2, 10)
        np.testing.assert_allclose(typed, reference[:2], rtol=1e-5, atol=1e-5)

        # plain curl: JSON in, JSON out
        tensor = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32"}
        body = json.dumps(
            {"id": "curl-1", "inputs": [{**tensor, "data": images[0].ravel().tolist()}]}
        )
        out = subprocess.run(
            ["curl", "-s", "-X", "POST", "-H", "Content-Type: application/json",
             "--data-binary", body, f"http://{server.http_url}/v2/models/{MODEL}/infer"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        answer = json.loads(out.stdout)
        assert answer["id"] == "curl-1" and answer["outputs"][0]["shape"] == [1, 10]
        np.testing.assert_allclose(answer["outputs"][0]["data"], reference[0], rtol=1e-5, atol=1e-5)
        health = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{server.http_url}/v2/health/ready"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        assert health.stdout == "200"
    assert server.process.returncode == 0, "SIGTERM must end the server cleanly"


def test_bad_input_gets_400_or_invalid_argument_saying_what_was_expected(
    repo: Path, tmp_path: Path
) -> None:
    with serve(repo, tmp_path, "--max-request-bytes", "300000") as server:
        http = thttp.InferenceServerClient(server.http_url)
        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        wrong_shape = np.zeros((2, 28, 28), dtype=np.float32)
        inp = thttp.InferInput("input", [2, 28, 28], "FP32")
        inp.set_data_from_numpy(wrong_shape)
        with pytest.raises(
            InferenceServerException, match=r"expected FP32 with shape \[-1, 1, 28, 28\]"
        ):
            http.infer(MODEL, [inp])
        fp64 = tgrpc.InferInput("input", [1, 1, 28, 28], "FP64")
        fp64.set_data_from_numpy(np.zeros((1, 1, 28, 28)))
        with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*got datatype FP64"):
            grpc.infer(MODEL, [fp64])
        good = tgrpc.InferInput("input", [1, 1, 28, 28], "FP32")
        good.set_data_from_numpy(np.zeros((1, 1, 28, 28), dtype=np.float32))
        with pytest.raises(InferenceServerException, match=r"NOT_FOUND.*not served"):
            grpc.infer("nope", [good])
        too_big = np.zeros((96, 1, 28, 28), dtype=np.float32)  # 301 kB > the limit
        with pytest.raises(InferenceServerException, match="limit"):
            _http_infer(http, too_big)
        with pytest.raises(InferenceServerException, match="batch of 65"):
            _grpc_infer(grpc, np.zeros((65, 1, 28, 28), dtype=np.float32))
        # the server is still healthy and counted them as invalid, not as failures of the model
        assert http.is_server_ready()
        assert server.metric("pollinate_serving_request_failures_total", reason="model_error") == 0
        assert server.metric("pollinate_serving_request_failures_total", reason="invalid") >= 3


def test_concurrent_requests_are_batched(
    repo: Path, tmp_path: Path, images: np.ndarray, reference: np.ndarray
) -> None:
    with serve(repo, tmp_path, "--max-queue-delay-us", "2000") as server:

        def client(worker: int) -> int:
            grpc = tgrpc.InferenceServerClient(server.grpc_url)
            bad = 0
            for i in range(25):
                row = (worker * 25 + i) % len(images)
                got = _grpc_infer(grpc, images[row : row + 1]).as_numpy("logits")
                bad += int(not np.allclose(got, reference[row : row + 1], rtol=1e-5, atol=1e-5))
            return bad

        with ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(client, range(16))) == 0, (
                "a batched answer went to the wrong request"
            )
        batches = server.metric("pollinate_serving_batch_size_count", model=MODEL)
        rows = server.metric("pollinate_serving_batch_size_sum", model=MODEL)
        assert rows >= 16 * 25  # + the warm-up calls
        assert rows / batches > 1.5, (
            f"{rows} rows in {batches} model calls: requests were not batched"
        )
        assert server.metric("pollinate_serving_requests_total", protocol="grpc") == 16 * 25


def test_overload_is_refused_at_once_and_admitted_requests_still_succeed(
    repo: Path, tmp_path: Path
) -> None:
    x = np.zeros((32, 1, 28, 28), dtype=np.float32)
    with serve(repo, tmp_path, "--max-queue-size", "64", "--max-batch-size", "32") as server:
        results: list[tuple[str, float]] = []
        lock = threading.Lock()

        def client(_: int) -> None:
            http = thttp.InferenceServerClient(server.http_url)
            for _ in range(15):
                started = time.perf_counter()
                try:
                    _http_infer(http, x)
                    outcome = "ok"
                except InferenceServerException as err:
                    outcome = str(err.status())
                with lock:
                    results.append((outcome, time.perf_counter() - started))

        with ThreadPoolExecutor(24) as pool:
            list(pool.map(client, range(24)))
        alive = thttp.InferenceServerClient(server.http_url).is_server_live()
        overloaded = server.metric("pollinate_serving_request_failures_total", reason="overloaded")
    outcomes = {o for o, _ in results}
    assert outcomes <= {"ok", "503"}, outcomes
    refused = [t for o, t in results if o == "503"]
    admitted = [t for o, t in results if o == "ok"]
    assert refused and admitted and alive
    # a refusal never waits for the model: it comes back faster than the admitted requests
    assert np.median(refused) < np.median(admitted)
    assert overloaded == len(refused)


def test_new_version_is_canaried_and_promoted_under_load_without_failures(
    repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    work = tmp_path / "repo"
    shutil.copytree(repo, work)
    args = ("--poll-interval", "0.2", "--canary-percent", "30", "--canary-min-requests", "60")
    with serve(work, tmp_path, *args) as server:
        stop = threading.Event()
        errors: list[str] = []
        versions: list[str] = []

        def client(worker: int) -> None:
            http = thttp.InferenceServerClient(server.http_url)
            while not stop.is_set():
                try:
                    versions.append(
                        _http_infer(http, images[worker : worker + 2]).get_response()[
                            "model_version"
                        ]
                    )
                except InferenceServerException as err:
                    errors.append(str(err))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        copy_version(work, 3, 4)
        deadline = time.monotonic() + 60
        while server.metric("pollinate_serving_rollouts_total", outcome="promoted") < 1:
            assert time.monotonic() < deadline, "version 4 was never promoted"
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert errors == []
        assert versions[0] == "3" and versions[-1] == "4"
        assert server.metric("pollinate_serving_version_role", version="4", role="current") == 1
        assert server.metric("pollinate_serving_version_role", version="3", role="current") == 0
        assert tgrpc.InferenceServerClient(server.grpc_url).get_model_metadata(MODEL).versions == [
            "4"
        ]


def test_broken_version_never_takes_traffic_and_slow_one_is_rolled_back(
    repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    work = tmp_path / "repo"
    shutil.copytree(repo, work)
    args = ("--poll-interval", "0.2", "--canary-percent", "50", "--canary-min-requests", "40")
    with serve(work, tmp_path, *args) as server:
        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        copy_version(work, 3, 4, onnx_model=nan_model())
        deadline = time.monotonic() + 30
        while server.metric("pollinate_serving_rollouts_total", outcome="failed_validation") < 1:
            assert time.monotonic() < deadline
            _grpc_infer(grpc, images[:1])
        assert {_grpc_infer(grpc, images[:1]).get_response().model_version for _ in range(20)} == {
            "3"
        }

        copy_version(work, 3, 5, onnx_model=slow_model())
        served: set[str] = set()
        deadline = time.monotonic() + 60
        while server.metric("pollinate_serving_rollouts_total", outcome="rolled_back") < 1:
            assert time.monotonic() < deadline, "the slow version was not rolled back"
            served.add(_grpc_infer(grpc, images[:1]).get_response().model_version)
        assert "5" in served, "the slow version was never a canary"
        assert {_grpc_infer(grpc, images[:1]).get_response().model_version for _ in range(20)} == {
            "3"
        }
        time.sleep(0.6)  # a few more scans: a rolled-back version is not tried again
        assert server.metric("pollinate_serving_rollouts_total", outcome="rolled_back") == 1
        messages = [str(line["message"]) for line in server.log_lines()]
        assert any("version 4 of cnn refused before taking traffic" in m for m in messages)
        assert any("cnn version 5 rolled back" in m for m in messages)


def test_drifted_inputs_fire_the_retraining_trigger(
    repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    triggers = tmp_path / "triggers"
    with serve(repo, tmp_path, "--trigger-dir", str(triggers)) as server:
        grpc = tgrpc.InferenceServerClient(server.grpc_url)
        for start in range(0, 256, 32):  # in distribution: no trigger
            _grpc_infer(grpc, images[start : start + 32])
        assert 0 < server.metric("pollinate_serving_drift_psi", kind="input") < 0.2
        assert not triggers.exists() or not list(triggers.iterdir())
        for start in range(0, 256, 32):  # inverted images: drift
            _grpc_infer(grpc, 1.0 - images[start : start + 32])
        assert server.metric("pollinate_serving_drift_psi", kind="input") > 0.2
        assert server.metric("pollinate_serving_retrain_triggers_total", model=MODEL) == 1
    events = [json.loads(p.read_text()) for p in triggers.glob("retrain-*.json")]
    assert len(events) == 1
    assert events[0]["event"] == "pollinate.retrain" and events[0]["model"] == MODEL
    assert events[0]["psi"]["input"] > 0.2 and events[0]["version"] == 3


def test_a_move_of_the_registry_production_alias_swaps_the_served_version(
    repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    """`registry.json` (written by `registry sync`) names production: moving it back swaps
    the served version with no canary and no restart; one that fails validation is refused."""
    work = tmp_path / "repo"
    shutil.copytree(repo, work)
    copy_version(work, 3, 4)
    aliases = work / MODEL / "registry.json"
    aliases.write_text('{"production": 4, "staging": null}\n')
    args = ("--poll-interval", "0.2", "--canary-percent", "50", "--canary-min-requests", "10")
    with serve(work, tmp_path, *args) as server:
        grpc = tgrpc.InferenceServerClient(server.grpc_url)

        def answered() -> set[str]:
            return {_grpc_infer(grpc, images[:1]).get_response().model_version for _ in range(20)}

        assert answered() == {"4"}
        aliases.write_text('{"production": 3, "staging": null}\n')  # `registry rollback`
        deadline = time.monotonic() + 30
        while server.metric("pollinate_serving_rollouts_total", outcome="registry") < 1:
            assert time.monotonic() < deadline, "the server did not follow the rollback"
            time.sleep(0.1)
        assert answered() == {"3"}
        time.sleep(1.0)  # five scans: version 4, newer but rolled back, is no canary
        assert answered() == {"3"}
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{MODEL}") as reply:
            assert json.loads(reply.read())["versions"] == ["3"]

        copy_version(work, 3, 2, onnx_model=nan_model())
        aliases.write_text('{"production": 2, "staging": null}\n')
        deadline = time.monotonic() + 30
        while server.metric("pollinate_serving_rollouts_total", outcome="failed_validation") < 1:
            assert time.monotonic() < deadline, "the broken production version was not refused"
            time.sleep(0.1)
        assert answered() == {"3"}
        assert server.metric("pollinate_serving_rollouts_total", outcome="registry") == 1
        messages = [str(line["message"]) for line in server.log_lines()]
        refused = [m for m in messages if "(registry production) refused" in m]
        assert len(refused) == 1 and "version 3 still serving" in refused[0], messages
