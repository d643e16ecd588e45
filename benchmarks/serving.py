"""Serving benchmark: `pollinate serve` against a naive per-request server, on loopback.

Both servers serve the same exported default model (the CNN, trained on the default data)
over the same wire format (KServe v2 REST, binary tensors); the load generator
(`_loadgen.py`, its own process) checks every answer against onnxruntime. Measured:

1. small requests (one image each) at rising concurrency: throughput and p50/p95/p99 for
   both servers (and `pollinate serve --workers 2`), and the highest throughput each reaches
   with p95 <= 10 ms (the ratio);
2. batched requests (32 images each): predictions per second;
3. overload: open-loop arrivals at 4x the measured capacity for batched requests; refusals,
   how fast they come back, admitted requests' p95 against the unloaded p95, and the server's
   memory over the run.

Writes JSON to ``benchmarks/results/serving.json`` (``--out``) and prints it.

Usage::

    python benchmarks/serving.py                 # CPU (this machine), about 3 minutes
    python benchmarks/serving.py --device cuda   # GPU: torch backend on both servers
    python benchmarks/serving.py --quick         # shorter windows, fewer levels
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._loadgen import LoadConfig, load_images, run_load
from benchmarks._measure import RESULTS, json_out, maybe_ratio, ratio, write_json
from benchmarks._serving_procs import (
    NAIVE_SERVER,
    RssSampler,
    ServerProcess,
    pollinate_serve_cmd,
    start_server,
)

OUT = RESULTS / "serving.json"
NAIVE = {
    "cpu": "uvicorn + Starlette, one onnxruntime call per request in the thread pool "
    "(onnxruntime's default threads)",
    "cuda": "uvicorn + Starlette, one torch CUDA forward per request in the thread pool",
}
P95_BOUND_MS = 10.0
WORKERS = "pollinate_workers"


def build_repository(root: Path) -> Path:
    """The default bundle's Triton repository: the CNN trained 2 epochs, exported."""
    import torch

    from pollinate.clientapp.training import train
    from pollinate.config import RunSettings
    from pollinate.data import load_dataset
    from pollinate.export.pipeline import ExportOptions, Format, Precision, export_run
    from pollinate.models import build_model
    from pollinate.rundir.checkpoint import Checkpoint, atomic_write_json, save_checkpoint

    run = root / "run"
    settings = RunSettings.from_run_config({"dp": "none", "run-dir": str(run)})
    data = load_dataset("mnist", seed=settings.seed)
    torch.manual_seed(0)
    model = build_model("cnn")
    train(model, data.train.x, data.train.y, epochs=2, batch_size=32, learning_rate=0.05,
          momentum=0.9, dp=False, seed=0)  # fmt: skip
    run.mkdir(parents=True)
    atomic_write_json(run / "run.json", {"settings": settings.to_run_config(), "population": 1})
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    save_checkpoint(run, Checkpoint(server_round=1, model=state))
    repo = root / "repo"
    options = ExportOptions(out=root / "bundle", formats=(Format.ONNX,),
                            precisions=(Precision.FP32,), triton_repo=repo)  # fmt: skip
    export_run(run, options)
    return repo


def _level(url: str, images: np.ndarray, model_file: Path, args: argparse.Namespace,
           **load: Any) -> dict[str, Any]:  # fmt: skip
    processes = min(args.processes, load.get("concurrency", 1))
    cfg = LoadConfig(url=url, duration_s=args.duration, warmup_s=args.warmup,
                     processes=processes, reference_model=str(model_file), **load)  # fmt: skip
    result = run_load(cfg, images).to_dict()
    keep = ("sent", "ok", "refused", "timed_out", "errors", "bad_outputs", "mismatched_outputs",
            "throughput_rps", "predictions_per_s", "latency_ms", "refusal_latency_ms",
            "offered_rps", "client_cpu_us_per_request")  # fmt: skip
    out = {k: result[k] for k in keep}
    out.update({k: load[k] for k in ("concurrency", "batch", "rate") if k in load})
    lat = out["latency_ms"]
    line = (
        f"    c={load.get('concurrency')} b={load.get('batch', 1)} rate={load.get('rate')}: "
        f"{out['throughput_rps']:.0f} req/s, {out['predictions_per_s']:.0f} pred/s, "
        f"p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} ms, refused {out['refused']}, "
        f"bad {out['bad_outputs'] + out['mismatched_outputs']}"
    )
    print(line, file=sys.stderr, flush=True)
    return out


def _best(levels: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [lv for lv in levels if lv["latency_ms"]["p95"] is not None
          and lv["latency_ms"]["p95"] <= P95_BOUND_MS and lv["errors"] == 0]  # fmt: skip
    return max(ok, key=lambda lv: lv["throughput_rps"]) if ok else None


def _rps(best: dict[str, Any] | None) -> float | None:
    """The throughput of a best level (None when no level met the bound)."""
    return None if best is None else float(best["throughput_rps"])


def _start(
    kind: str, repo: Path, tmp: Path, args: argparse.Namespace, extra: tuple[str, ...] = ()
) -> ServerProcess:
    port_file = tmp / f"{kind}-{time.monotonic_ns()}.json"
    model_file = repo / "cnn" / "1" / "model.onnx"
    if kind == "pollinate":
        flags = ("--backend", "torch") if args.device == "cuda" else ()
        cmd = pollinate_serve_cmd(repo, port_file, device=args.device, extra=(*flags, *extra))
        return start_server(cmd, port_file, required_ports=("http", "grpc", "metrics"))
    cmd = [sys.executable, str(NAIVE_SERVER), "--model-file", str(model_file), "--name", "cnn",
           "--port", "0", "--port-file", str(port_file)]  # fmt: skip
    if args.device == "cuda":
        cmd += ["--torch-device", "cuda"]
    return start_server(cmd, port_file)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="short windows, fewer levels")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--workers", type=int, default=2, help="`--workers` of the third series")
    parser.add_argument("--images", type=Path, default=None, help=".npy of test images")
    parser.add_argument(
        "--repository", type=Path, default=None,
        help="an existing repository with cnn/1 (default: train and export one now)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out = json_out(args.out, OUT)
    if args.quick:
        args.duration, args.warmup = 1.5, 0.3
    concurrencies = [1, 4, 16, 32] if args.quick else [1, 2, 4, 8, 16, 24, 32, 48, 64]

    with tempfile.TemporaryDirectory(prefix="pollinate-serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print("building the default bundle's repository", file=sys.stderr, flush=True)
        repo = args.repository or build_repository(tmp)
        model_file = repo / "cnn" / "1" / "model.onnx"
        images = (np.load(args.images) if args.images else load_images(512)).astype(np.float32)

        small: dict[str, list[dict[str, Any]]] = {}
        batched: dict[str, list[dict[str, Any]]] = {}
        for kind in ("pollinate", "naive"):
            print(f"{kind}: small requests", file=sys.stderr, flush=True)
            with _start(kind, repo, tmp, args) as server:
                small[kind] = [
                    _level(server.url(), images, model_file, args, concurrency=c, batch=1)
                    for c in concurrencies
                ]
            if kind == "pollinate":
                print(f"pollinate --workers {args.workers}: small requests", file=sys.stderr,
                      flush=True)  # fmt: skip
                workers = ("--workers", str(args.workers))
                with _start(kind, repo, tmp, args, workers) as server:
                    small[WORKERS] = [
                        _level(server.url(), images, model_file, args, concurrency=c, batch=1)
                        for c in concurrencies
                    ]
            print(f"{kind}: batched requests (32 images)", file=sys.stderr, flush=True)
            extra = ("--instances", "2") if kind == "pollinate" and args.device == "cpu" else ()
            with _start(kind, repo, tmp, args, extra) as server:
                batched[kind] = [
                    _level(server.url(), images, model_file, args, concurrency=c, batch=32)
                    for c in (1, 2, 4, 8)
                ]

        print("pollinate: overload at 4x capacity (batched requests)", file=sys.stderr, flush=True)
        # A latency-first set-up: no queue, so a request is admitted only while the model
        # instance is free and never waits behind another.
        overload_flags = ("--max-batch-size", "16", "--max-queue-size", "0")
        if args.device == "cuda":
            overload_flags = ("--max-batch-size", "64", "--max-queue-size", "64")
        with _start("pollinate", repo, tmp, args, overload_flags) as server:
            unloaded = _level(server.url(), images, model_file, args, concurrency=1, batch=16)
            capacity = _level(server.url(), images, model_file, args, concurrency=16, batch=16)
            rate = 4 * capacity["throughput_rps"]
            rss_before = server.rss_mb()
            with RssSampler(server.pid, interval_s=0.2) as rss:
                long_args = argparse.Namespace(
                    **{**vars(args), "duration": max(3 * args.duration, 6.0)}
                )
                overloaded = _level(server.url(), images, model_file, long_args, concurrency=32,
                                    batch=16, rate=rate)  # fmt: skip
            samples = [mb for _, mb in rss.samples]
            quarter = max(1, len(samples) // 4)
            alive = server.alive()

    def best(kind: str) -> dict[str, Any] | None:
        b = _best(small[kind])
        if b is None:
            return None
        rps, p95 = b["throughput_rps"], b["latency_ms"]["p95"]
        return {"concurrency": b["concurrency"], "throughput_rps": rps, "p95_ms": p95}

    bp, bn, bw = best("pollinate"), best("naive"), best(WORKERS)
    top_pred = {k: max(lv["predictions_per_s"] for lv in batched[k]) for k in batched}
    report = {
        "benchmark": "serving",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "device": args.device,
            "python": platform.python_version(),
        },
        "model": "default CNN (pollinate.models 'cnn'), FP32 ONNX, input 1x28x28",
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "processes": args.processes,
            "pollinate": "defaults (1 instance, 1 thread, max batch 64, no queue delay); "
            "batched requests: --instances 2 on CPU",
            "naive": NAIVE[args.device],
        },
        "small_requests": {
            "levels": small,
            "best_with_p95_under_10ms": {"pollinate": bp, "naive": bn, WORKERS: bw},
            "throughput_ratio_at_p95_10ms": maybe_ratio(_rps(bp), _rps(bn)),
            "workers": args.workers,
            "workers_throughput_ratio_at_p95_10ms": maybe_ratio(_rps(bw), _rps(bn)),
        },
        "batched_requests_32": {
            "levels": batched,
            "max_predictions_per_s": top_pred,
            "ratio": ratio(top_pred["pollinate"], top_pred["naive"]),
        },
        "overload_4x": {
            "flags": list(overload_flags),
            "capacity_rps": capacity["throughput_rps"],
            "offered_rps": overloaded["offered_rps"],
            "unloaded": unloaded,
            "at_capacity": capacity,
            "overloaded": overloaded,
            "admitted_p95_over_unloaded_p95": ratio(
                overloaded["latency_ms"]["p95"] or 0, unloaded["latency_ms"]["p95"] or 1
            ),
            "refusal_p95_ms": overloaded["refusal_latency_ms"]["p95"],
            "server_alive_after": alive,
            "rss_mb": {
                "before": rss_before,
                "first_quarter_mean": float(np.mean(samples[:quarter])),
                "last_quarter_mean": float(np.mean(samples[-quarter:])),
                "peak": max(samples),
            },
        },
    }
    write_json(args.out, report)


if __name__ == "__main__":
    main()
