"""OpenTelemetry tracing: a real `pollinate serve` in this process traces a request under the
caller's traceparent (REST and gRPC), samples as told, and is silent, never importing
opentelemetry, when off; a federation traces each round and its phases; the settings."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pollinate._tracing import TracingSettings, otlp_traces_url
from pollinate.config import RunSettings
from pollinate.errors import ConfigError
from pollinate.serverapp.federation import run_federation
from pollinate.serving.config import ServeSettings, load_serve_settings
from pollinate.serving.proto import kserve_v2_pb2 as pb
from pollinate.serving.server import serve
from pollinate.serving.tracing import ServingTracer, serving_tracer
from pollinate.simulation.local_grid import LocalGrid
from tests.support.otlp import MODEL, OtlpReceiver, infer_body, tiny_repository

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
REQUEST_SPANS = {"infer", "decode", "queue", "batch", "inference", "encode"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repository(tmp_path_factory.mktemp("tracing"))


def _serve(
    repo: Path, tmp: Path, tracer: ServingTracer | None, calls: Callable[[dict[str, int]], Any]
) -> Any:
    """Run the real server in this process until ``calls(ports)`` (in a thread) returns."""
    port_file = tmp / "ports.json"
    settings = ServeSettings(
        repository=repo, http_port=0, grpc_port=0, metrics_port=0, device="cpu",
        port_file=port_file,
    )  # fmt: skip

    async def main() -> Any:
        stop = asyncio.Event()
        server = asyncio.create_task(serve(settings, stop=stop, tracer=tracer))
        while not port_file.exists():
            assert not server.done(), server.exception()
            await asyncio.sleep(0.02)
        try:
            return await asyncio.to_thread(calls, json.loads(port_file.read_text()))
        finally:
            stop.set()
            await server

    return asyncio.run(main())


def _post(ports: dict[str, int], headers: dict[str, str]) -> tuple[int, Any, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{ports['http']}/v2/models/{MODEL}/infer",
        data=json.dumps(infer_body()).encode(), method="POST",
        headers={"content-type": "application/json", **headers},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.status, answer.headers, json.loads(answer.read())


def _grpc_infer(ports: dict[str, int], metadata: tuple[tuple[str, str], ...]) -> Any:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
        [0.0, 1.0, 2.0, 3.0]
    )
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        reply, outcome = call.with_call(request, metadata=metadata, timeout=10)
    return reply, dict(outcome.trailing_metadata())


def _tracer(rate: float = 1.0) -> tuple[ServingTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = serving_tracer(TracingSettings(sample_rate=rate), exporter=exporter)
    assert tracer is not None
    return tracer, exporter


def _finished(tracer: ServingTracer, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    tracer.provider.force_flush()
    spans = list(exporter.get_finished_spans())
    tracer.shutdown()
    return spans


def _check_request_tree(spans: list[ReadableSpan], protocol: str) -> None:
    """Every span under the caller's trace, each phase the child of the right span."""
    by_name = {s.name: s for s in spans}
    assert set(by_name) == REQUEST_SPANS, sorted(by_name)
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}
    infer = by_name["infer"]
    assert infer.parent is not None and infer.parent.is_remote
    assert f"{infer.parent.span_id:016x}" == PARENT_ID
    assert infer.attributes is not None and infer.attributes["pollinate.protocol"] == protocol
    for name in ("decode", "queue", "batch", "encode"):
        parent = by_name[name].parent
        assert parent is not None and parent.span_id == infer.context.span_id, name
    batch, inference = by_name["batch"], by_name["inference"]
    assert inference.parent is not None and inference.parent.span_id == batch.context.span_id
    assert [link.context.span_id for link in batch.links] == [infer.context.span_id]
    # the phases follow one another inside the request
    order = [by_name[n] for n in ("decode", "queue", "inference", "encode")]
    for earlier, later in itertools.pairwise(order):
        assert earlier.end_time is not None and later.start_time is not None
        assert earlier.end_time <= later.start_time, (earlier.name, later.name)
    assert infer.start_time is not None and infer.end_time is not None
    assert infer.start_time <= order[0].start_time and order[-1].end_time <= infer.end_time


def test_a_rest_request_is_traced_under_the_callers_traceparent(repo: Path, tmp_path: Path) -> None:
    tracer, exporter = _tracer()
    parent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    status, headers, reply = _serve(
        repo, tmp_path, tracer, lambda ports: _post(ports, {"traceparent": parent})
    )
    assert status == 200 and reply["outputs"][0]["data"] == [42.0, 48.0, 54.0]
    spans = _finished(tracer, exporter)
    _check_request_tree(spans, "http")
    infer = next(s for s in spans if s.name == "infer")
    assert headers["traceparent"] == f"00-{TRACE_ID}-{infer.context.span_id:016x}-01"


def test_a_grpc_request_is_traced_under_the_traceparent_metadata(
    repo: Path, tmp_path: Path
) -> None:
    tracer, exporter = _tracer()
    metadata = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    reply, trailing = _serve(repo, tmp_path, tracer, lambda ports: _grpc_infer(ports, metadata))
    assert reply.model_name == MODEL
    spans = _finished(tracer, exporter)
    _check_request_tree(spans, "grpc")
    infer = next(s for s in spans if s.name == "infer")
    assert trailing["traceparent"] == f"00-{TRACE_ID}-{infer.context.span_id:016x}-01"


def test_a_failed_request_is_traced_with_its_status(repo: Path, tmp_path: Path) -> None:
    tracer, exporter = _tracer()
    parent = f"00-{TRACE_ID}-{PARENT_ID}-01"

    def calls(ports: dict[str, int]) -> tuple[str, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['http']}/v2/models/nope/infer",
            data=json.dumps(infer_body()).encode(), method="POST",
            headers={"traceparent": parent},
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=10)
        assert http_error.value.code == 404
        rest_header = http_error.value.headers["traceparent"]
        http_error.value.close()
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as grpc_error:
                call(pb.ModelInferRequest(model_name="nope"), metadata=(("traceparent", parent),))
        rpc = grpc_error.value
        assert rpc.code() == grpc.StatusCode.INVALID_ARGUMENT  # no inputs: refused first
        return rest_header, dict(rpc.trailing_metadata())["traceparent"]

    rest_header, grpc_header = _serve(repo, tmp_path, tracer, calls)
    spans = [s for s in _finished(tracer, exporter) if s.name == "infer"]
    statuses = {s.attributes["pollinate.protocol"]: s.attributes["pollinate.status"] for s in spans}
    assert statuses == {"http": "404", "grpc": "INVALID_ARGUMENT"}
    ids = {f"{s.context.span_id:016x}" for s in spans}
    assert {rest_header.split("-")[2], grpc_header.split("-")[2]} == ids


def test_the_sample_rate_decides_roots_and_the_callers_decision_is_followed(
    repo: Path, tmp_path: Path
) -> None:
    tracer, exporter = _tracer(rate=0.0)

    def calls(ports: dict[str, int]) -> list[str | None]:
        headers = [_post(ports, {})[1]["traceparent"] for _ in range(5)]  # roots: never kept
        headers.append(
            _post(ports, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})[1]["traceparent"]
        )  # the caller did not sample its trace
        sampled = _post(ports, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        return [*headers, sampled[1]["traceparent"]]

    headers = _serve(repo, tmp_path, tracer, calls)
    spans = _finished(tracer, exporter)
    assert headers[:6] == [None] * 6 and headers[6] is not None
    assert {s.name for s in spans} == REQUEST_SPANS
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}


def test_roots_are_sampled_at_the_rate_by_the_sdks_own_rule() -> None:
    """The tracer's early decision keeps the roots the provider's sampler keeps: every root
    it starts is recorded, and about ``rate`` of them are started."""
    tracer, exporter = _tracer(rate=0.25)
    traces = [tracer.start(0.0, None, None, model=MODEL, protocol="http") for _ in range(4000)]
    kept = [t for t in traces if t is not None]
    assert all(t.span.is_recording() for t in kept)
    assert 0.22 < len(kept) / len(traces) < 0.28
    for t in kept:
        t.finish(1.0, "200")
    assert len(_finished(tracer, exporter)) == len(kept)


def test_off_there_are_no_spans_no_header_and_no_opentelemetry(repo: Path) -> None:
    """In a fresh interpreter: the serving app imported, started and asked, and the round
    loop imported, without tracing."""
    script = f"""
import asyncio, json, sys, tempfile, urllib.request
from pathlib import Path
from pollinate.serving.config import ServeSettings
from pollinate.serving.server import serve
import pollinate.cli.main, pollinate.cli.serve, pollinate.serving.launch
import pollinate.serverapp.federation, pollinate.simulation.runner  # the fast engine's start-up

async def main():
    port_file = Path(tempfile.mkdtemp()) / "ports.json"
    settings = ServeSettings(repository=Path({str(repo)!r}), http_port=0, grpc_port=0,
                             metrics_port=0, device="cpu", port_file=port_file)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(settings, stop=stop))
    while not port_file.exists():
        await asyncio.sleep(0.02)
    port = json.loads(port_file.read_text())["http"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{{port}}/v2/models/{MODEL}/infer", method="POST",
        data=json.dumps({infer_body()!r}).encode(),
        headers={{"traceparent": "00-{TRACE_ID}-{PARENT_ID}-01"}})
    answer = await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
    stop.set()
    await server
    print(json.dumps({{"status": answer.status, "traceparent": answer.headers["traceparent"],
                      "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}}))

asyncio.run(main())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "traceparent": None, "loaded": []}


def test_a_federation_traces_each_round_and_its_phases(tmp_path: Path) -> None:
    settings = RunSettings.from_run_config(
        {
            "run-dir": str(tmp_path / "run"), "dataset": "digits", "dp": "none",
            "num-server-rounds": 2, "min-available-nodes": 10, "fraction-train": 0.3,
        }
    )  # fmt: skip
    with OtlpReceiver() as otlp:
        run_federation(LocalGrid(10), settings.replace(trace_endpoint=otlp.endpoint))
        spans = otlp.wait_for({"round"}, timeout=5)
    assert set(otlp.posts) == {"/v1/traces"}
    assert {s.service for s in spans} == {"pollinate-server"}
    rounds = sorted(
        (s for s in spans if s.name == "round"), key=lambda s: s.attributes["server_round"]
    )
    assert [r.attributes["server_round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r.parent_id == "" and r.attributes["sampled"] == 3 and r.attributes["replied"] == 3
        children = [s for s in spans if s.parent_id == r.span_id]
        assert [c.name for c in children] == ["sampling", "training", "aggregation", "evaluation"]
        assert {c.trace_id for c in children} == {r.trace_id}
    assert rounds[0].trace_id != rounds[1].trace_id


def test_tracing_settings_from_the_file_flags_and_run_config(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        f'[server]\nrepository = "{tmp_path}"\n[tracing]\nendpoint = "http://otel:4318"\n'
    )
    settings = load_serve_settings(config, {})
    assert settings.tracing == TracingSettings("http://otel:4318", 0.01)
    flags = load_serve_settings(config, {"tracing.sample_rate": 0.5})
    assert flags.tracing.sample_rate == 0.5 and flags.tracing.enabled
    assert not load_serve_settings(None, {"repository": tmp_path}).tracing.enabled
    assert serving_tracer(TracingSettings()) is None
    assert otlp_traces_url("http://otel:4318") == "http://otel:4318/v1/traces"
    assert otlp_traces_url("https://otel/custom/path") == "https://otel/custom/path"
    with pytest.raises(ConfigError, match="sample rate must be in"):
        load_serve_settings(config, {"tracing.sample_rate": 1.5})
    with pytest.raises(ConfigError, match="not an http"):
        RunSettings.from_run_config({"trace-endpoint": "otel:4318"})
    assert RunSettings.from_run_config({"trace-endpoint": "env"}).trace_endpoint == "env"
