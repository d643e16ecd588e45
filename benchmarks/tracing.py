"""Tracing overhead: `pollinate serve` with tracing off against tracing on, in the same run.

Three servers serve the same exported default model (the CNN) side by side: tracing off,
tracing on at the default 1 % sampling, and tracing on at 100 % (every request's six spans
made and exported: the cost of a traced request). The on-servers export over OTLP/HTTP to
a collector on loopback (``tests/support/otlp.py``'s receiver, in this process), so their
spans really leave. The load generator (``_loadgen.py``, its own process, answers checked
against onnxruntime) sends small requests (one image, no ``traceparent``) in closed loop
to one server at a time, the servers interleaved round by round (off, 1 %, 100 %, off, ...),
so drift of the machine hits all three alike.

``overhead_ratio``: the median over rounds of (throughput off / throughput on at 1 %);
1.0 is no overhead, the goal is <= 1.05 (``overhead_ratio_of_medians``: the same from the
three servers' median throughputs; ``cpu_overhead_ratio``: the servers' median CPU time per
answered request, on / off, which what else runs on the machine disturbs less). The 100 %
server exports its spans every 200 ms, and each window waits until they have left, so its
export never runs in another's window.
Before the servers start, the tracing code's own cost is timed in this process (an untraced
request's sampling decision; a traced request's six spans, made and OTLP-encoded), and
``predicted_cpu_overhead_ratio`` is what it predicts for 1 % sampling.
Writes ``benchmarks/results/tracing.json`` (``--out``) and prints it.

Usage::

    python benchmarks/tracing.py               # about 2 minutes on 2 cores
    python benchmarks/tracing.py --quick       # shorter windows, fewer rounds
    python benchmarks/tracing.py --repository models   # an existing repository with cnn/1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._loadgen import LoadConfig, load_images, run_load
from benchmarks._measure import RESULTS, json_out, write_json
from benchmarks._serving_procs import ServerProcess, pollinate_serve_cmd, start_server
from benchmarks.serving import build_repository
from tests.support.otlp import OtlpReceiver

OUT = RESULTS / "tracing.json"
GOAL = 1.05


def _start(
    repo: Path, tmp: Path, name: str, flags: tuple[str, ...], env: dict[str, str] | None = None
) -> ServerProcess:
    port_file = tmp / f"{name}.json"
    cmd = pollinate_serve_cmd(repo, port_file, extra=flags)
    return start_server(cmd, port_file, required_ports=("http", "grpc", "metrics"), env_extra=env)


def _settle(otlp: OtlpReceiver, quiet_s: float = 1.0, most_s: float = 8.0) -> None:
    """Wait until no spans arrived for ``quiet_s``: the 100 % server's export is over before
    the next window."""
    deadline = time.monotonic() + most_s
    seen, since = len(otlp.spans), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        if len(otlp.spans) != seen:
            seen, since = len(otlp.spans), time.monotonic()


def _answered(server: ServerProcess) -> float:
    """Inference requests the server has answered (its own counter)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server.url('metrics')}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "pollinate_serving_requests_total"
    )


def _level(
    server: ServerProcess, images: np.ndarray, model_file: Path, args: argparse.Namespace, c: int
) -> dict[str, Any]:
    cfg = LoadConfig(
        url=server.url(), duration_s=args.duration, warmup_s=args.warmup, concurrency=c,
        reference_model=str(model_file),
    )  # fmt: skip
    cpu, answered = server.cpu_s, _answered(server)
    result = run_load(cfg, images).to_dict()
    cpu, answered = server.cpu_s - cpu, _answered(server) - answered
    bad = result["errors"] + result["bad_outputs"] + result["mismatched_outputs"]
    return {
        "throughput_rps": result["throughput_rps"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        # the server's CPU per answered request (warm-up included): less sensitive than
        # throughput to what else runs on the machine
        "server_cpu_us_per_request": round(1e6 * cpu / max(answered, 1), 1),
        "bad": bad,
    }


def _in_process_costs() -> dict[str, float]:
    """The tracing code's own CPU cost, timed in this process (best of 7): an untraced
    request's sampling decision, and a traced request's six spans made and OTLP-encoded."""
    import timeit

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pollinate._tracing import TracingSettings
    from pollinate.serving.tracing import serving_tracer

    never = serving_tracer(TracingSettings(sample_rate=0.0), exporter=InMemorySpanExporter())
    exporter = InMemorySpanExporter()
    always = serving_tracer(TracingSettings(sample_rate=1.0), exporter=exporter)
    assert never is not None and always is not None

    def untraced() -> None:
        never.start(0.0, None, None, model="cnn", protocol="http")

    def traced() -> None:
        trace = always.start(0.0, None, None, model="cnn", protocol="http")
        assert trace is not None
        trace.phase("decode", 0.0, 1e-5)
        trace.batch_ran([(trace, 1e-5)], 2e-5, (3e-5, 4e-5), 5e-5, 1)
        trace.phase("encode", 5e-5, 6e-5)
        trace.finish(7e-5, "200", request_id="r")

    def best_us(call: Any, n: int) -> float:
        return 1e6 * min(timeit.repeat(call, number=n, repeat=7)) / n

    untraced_us = best_us(untraced, 20000)
    traced_us = best_us(traced, 300)
    always.provider.force_flush()
    spans = exporter.get_finished_spans()[:600]
    encode_us = best_us(lambda: encode_spans(spans).SerializeToString(), 5) / 100
    never.shutdown()
    always.shutdown()
    return {
        "untraced_request_us": round(untraced_us, 2),
        "traced_request_spans_us": round(traced_us, 1),
        "traced_request_otlp_encode_us": round(encode_us, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short windows, fewer rounds")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per window")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop connections")
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out = json_out(args.out, OUT)
    if args.quick:
        args.rounds, args.duration, args.warmup = 2, 1.5, 0.3
    started = time.monotonic()
    costs = _in_process_costs()
    with tempfile.TemporaryDirectory(prefix="pollinate-tracing-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print("building the default bundle's repository", file=sys.stderr, flush=True)
        repo = args.repository or build_repository(tmp)
        model_file = repo / "cnn" / "1" / "model.onnx"
        images = load_images(512).astype(np.float32)
        with ExitStack() as stack:
            otlp = stack.enter_context(OtlpReceiver())
            on = ("--trace-endpoint", otlp.endpoint, "--trace-sample-rate")
            servers = {
                "off": stack.enter_context(_start(repo, tmp, "off", ())),
                "on_1pct": stack.enter_context(_start(repo, tmp, "on1", (*on, "0.01"))),
                # its leftover spans leave 200 ms after its window, not up to 5 s later
                "on_100pct": stack.enter_context(
                    _start(repo, tmp, "on100", (*on, "1.0"), {"OTEL_BSP_SCHEDULE_DELAY": "200"})
                ),
            }
            rounds: list[dict[str, dict[str, Any]]] = []
            for i in range(args.rounds):
                order = list(servers) if i % 2 == 0 else list(reversed(servers))
                row = {}
                for name in order:
                    row[name] = _level(servers[name], images, model_file, args, args.concurrency)
                    print(f"  round {i + 1} {name}: {row[name]}", file=sys.stderr, flush=True)
                    if name == "on_100pct":
                        _settle(otlp)
                rounds.append(row)
            time.sleep(6)  # the 1 % server's last batch of spans (sent every 5 s)
            exported = len(otlp.spans)

    def median(name: str, key: str) -> float:
        return float(statistics.median(r[name][key] for r in rounds))

    paired = [r["off"]["throughput_rps"] / r["on_1pct"]["throughput_rps"] for r in rounds]
    paired_full = [r["off"]["throughput_rps"] / r["on_100pct"]["throughput_rps"] for r in rounds]
    overhead = round(statistics.median(paired), 4)
    medians = {n: median(n, "throughput_rps") for n in servers}
    cpu = {n: median(n, "server_cpu_us_per_request") for n in servers}
    # what the in-process costs predict: (untraced + 1 % of traced) / a request's CPU off
    traced_us = costs["traced_request_spans_us"] + costs["traced_request_otlp_encode_us"]
    predicted = round(1 + (costs["untraced_request_us"] + 0.01 * traced_us) / cpu["off"], 4)
    report = {
        "benchmark": "tracing",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "model": "default CNN (pollinate.models 'cnn'), FP32 ONNX, input 1x28x28, CPU",
        "load": {
            "requests": "one image each, KServe v2 REST binary, no traceparent",
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "order": "interleaved: off, 1 %, 100 %, then reversed, alternating",
        },
        "throughput_rps_median": medians,
        "p50_ms_median": {n: median(n, "p50_ms") for n in servers},
        "p99_ms_median": {n: median(n, "p99_ms") for n in servers},
        "overhead_ratio": overhead,
        "overhead_ratio_per_round": [round(x, 4) for x in paired],
        "overhead_ratio_of_medians": round(medians["off"] / medians["on_1pct"], 4),
        "overhead_ratio_100pct": round(statistics.median(paired_full), 4),
        "server_cpu_us_per_request_median": cpu,
        "cpu_overhead_ratio": round(cpu["on_1pct"] / cpu["off"], 4),
        "cpu_overhead_ratio_100pct": round(cpu["on_100pct"] / cpu["off"], 4),
        "goal": f"overhead_ratio (throughput off / on at 1 % sampling) <= {GOAL}",
        "meets_goal": overhead <= GOAL,
        "spans_exported": exported,
        "in_process_costs": costs,
        "predicted_cpu_overhead_ratio": predicted,
        "bad_answers": sum(r[n]["bad"] for r in rounds for n in servers),
        "rounds": rounds,
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
