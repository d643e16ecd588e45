"""Fuzzed REST and gRPC bodies against a real `pollinate serve`: 4xx, never 5xx, never a crash."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollinate.serving.proto import kserve_v2_pb2 as pb
from tests.support.serving import MODEL, Server, default_repository, serve

pytestmark = pytest.mark.integration

DATATYPES = ["FP32", "FP64", "INT64", "UINT8", "BOOL", "BYTES", "FP16", "fp32", "", "INT4"]
names = st.sampled_from(["input", "logits", "", "x", "input\x00", "ü"])
shapes = st.lists(st.integers(min_value=-3, max_value=2**33), max_size=5) | st.sampled_from(
    [[1, 1, 28, 28], [2, 1, 28, 28], [0, 1, 28, 28], [1, 784], [65, 1, 28, 28]]
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    with serve(default_repository(root), root, "--max-request-bytes", "100000") as running:
        yield running
    assert running.process.returncode == 0


@st.composite
def rest_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    kind = draw(st.sampled_from(["tensor", "json", "bytes"]))
    headers = {"Content-Type": "application/json"}
    if kind == "bytes":
        return draw(st.binary(max_size=300)), headers
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), headers
    tensor: dict[str, object] = {
        "name": draw(names),
        "shape": draw(shapes),
        "datatype": draw(st.sampled_from(DATATYPES)),
    }
    blob = b""
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(json_scalars, max_size=8) | st.just([0.5] * 784))
    else:
        blob = draw(st.binary(max_size=64) | st.just(b"\0" * 3136))
        tensor["parameters"] = {
            "binary_data_size": draw(st.sampled_from([len(blob), len(blob) + 1, -1, "7"]))
        }
    request: dict[str, object] = {
        "inputs": draw(st.sampled_from([[tensor], [tensor, tensor], tensor]))
    }
    if draw(st.booleans()):
        request["outputs"] = [
            {"name": draw(names), "parameters": {"binary_data": draw(json_scalars)}}
        ]
    header = json.dumps(request).encode()
    if blob:
        length = draw(st.sampled_from([str(len(header)), "-1", "abc", str(len(header) + 10**6)]))
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": length,
        }
    return header + blob, headers


PATHS = [
    f"/v2/models/{MODEL}/infer",
    f"/v2/models/{MODEL}/versions/3/infer",
    f"/v2/models/{MODEL}/versions/0/infer",
    "/v2/models/none/infer",
]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=rest_bodies(), path=st.sampled_from(PATHS))
def test_fuzzed_rest_bodies_get_4xx_never_5xx(
    server: Server, body: tuple[bytes, dict[str, str]], path: str
) -> None:
    data, headers = body
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=30)
    try:
        conn.request("POST", path, body=data, headers=headers)
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    assert response.status < 500, (response.status, payload[:300])
    if response.status != 200:
        assert json.loads(payload)["error"], "an error answer must say what is wrong"


@st.composite
def grpc_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))  # not even protobuf
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, "", "none"])),
        model_version=draw(st.sampled_from(["", "3", "0", "x", "99"])),
    )
    for _ in range(draw(st.integers(0, 2))):
        tensor = request.inputs.add(name=draw(names), datatype=draw(st.sampled_from(DATATYPES)))
        tensor.shape.extend(
            draw(st.lists(st.integers(-3, 2**40), max_size=5) | st.just([1, 1, 28, 28]))
        )
        which = draw(st.sampled_from(["fp32", "int64", "bool", "none"]))
        if which == "fp32":
            tensor.contents.fp32_contents.extend(
                draw(st.lists(st.floats(width=32), max_size=8) | st.just([0.0] * 784))
            )
        elif which == "int64":
            tensor.contents.int64_contents.extend(
                draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4))
            )
        elif which == "bool":
            tensor.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=4)))
    for _ in range(draw(st.integers(0, 2))):
        request.raw_input_contents.append(draw(st.binary(max_size=64) | st.just(b"\0" * 3136)))
    for _ in range(draw(st.integers(0, 1))):
        request.outputs.add(name=draw(names))
    return request.SerializeToString()


CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=grpc_requests())
def test_fuzzed_grpc_requests_get_client_errors_never_internal(server: Server, raw: bytes) -> None:
    with grpc.insecure_channel(server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        reply, error = None, None
        try:
            reply = call(raw, timeout=30)
        except grpc.RpcError as err:
            error = err
    if error is not None:
        assert error.code() in CLIENT_ERRORS, (error.code(), error.details())
        assert error.details()
    else:
        assert reply is not None and pb.ModelInferResponse.FromString(reply).outputs


def test_server_is_still_healthy_after_fuzzing(server: Server, tmp_path: Path) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.http, timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert server.process.poll() is None
    assert server.metric("pollinate_serving_request_failures_total", reason="model_error") == 0
