"""Stragglers: buffered asynchronous FedBuff against synchronous FedAvg, same fleet, same
latency model, in simulated time, in one run.

The fast engine's latency model (``pollinate.simulation.latency``) gives every device a
log-normal reply time (median ``--median`` s, sigma 0.5), makes 10 % of the devices 10x
slower and drops 5 % of the tasks. Both runs keep ``--concurrency`` clients training at once:
synchronous FedAvg as its cohort per round (a round ends when all replied or after the round
timeout), FedBuff as the clients in flight, releasing a model every ``--buffer`` replies.
Both train with DP-SGD on the same data and model. The measure is simulated seconds until the
central test accuracy first reaches ``--target`` (``elapsed_s`` of the run's metrics.json).

    python benchmarks/fedbuff.py                   # ~2 min
    python benchmarks/fedbuff.py --target 0.7 --clients 500

JSON on stdout and in ``benchmarks/results/fedbuff.json``: ``fedbuff_time_to_target_s``,
``sync_time_to_target_s``, their ratio ``fedbuff_over_sync`` (issue goal <= 0.5), and each
run's rounds, accuracy and wall time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._measure import RESULTS, maybe_ratio, run_pollinate, write_json
from benchmarks.federation import machine, read_metrics, say


def run(name: str, extra: list[str], options: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One simulation; its time to the target accuracy in simulated seconds."""
    run_dir = root / name
    fraction = options.concurrency / options.clients
    args = [
        "simulate", "-n", str(options.clients), "--fraction", str(fraction),
        "--run-dir", str(run_dir), "--model", "cnn",
        "--set", f"latency-median-s={options.median}", "--set", "latency-sigma=0.5",
        "--set", "slow-fraction=0.1", "--set", "slow-factor=10", "--set", "dropout=0.05",
        "--set", f"round-timeout={options.timeout}", *extra,
    ]  # fmt: skip
    say(f"{name}: pollinate {' '.join(args)}")
    done = run_pollinate(args, run_dir, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr_tail}")
    rounds = [m for m in read_metrics(run_dir) if m["server_round"] >= 1]
    reached = next((m for m in rounds if (m.get("accuracy") or 0) >= options.target), None)
    result = {
        "rounds": len(rounds),
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(m["accuracy"] for m in rounds),
        "simulated_s": round(rounds[-1]["elapsed_s"], 1),
        "time_to_target_s": None if reached is None else round(reached["elapsed_s"], 1),
        "round_to_target": None if reached is None else reached["server_round"],
        "failed": sum(m["failed"] for m in rounds),
        "stale": sum(m.get("stale", 0) for m in rounds),
        "wall_s": round(done.wall_s, 1),
    }
    say(f"  {name}: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=40)
    parser.add_argument("--buffer", type=int, default=10)
    parser.add_argument("--median", type=float, default=10.0, help="median reply time, s")
    parser.add_argument("--timeout", type=float, default=60.0, help="round timeout, s")
    parser.add_argument("--sync-rounds", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.6)
    options = parser.parse_args()
    releases = options.sync_rounds * options.concurrency // options.buffer  # same client work
    with tempfile.TemporaryDirectory(prefix="pollinate-fedbuff-") as tmp:
        root = Path(tmp)
        sync = run("sync", ["--rounds", str(options.sync_rounds)], options, root)
        buffered = ["--rounds", str(releases), "--strategy", "fedbuff",
                    "--set", f"buffer-size={options.buffer}"]  # fmt: skip
        fedbuff = run("fedbuff", buffered, options, root)
    workload = {
        "clients": options.clients, "concurrency": options.concurrency,
        "buffer_size": options.buffer, "latency_median_s": options.median,
        "latency_sigma": 0.5, "slow_fraction": 0.1, "slow_factor": 10, "dropout": 0.05,
        "round_timeout_s": options.timeout, "target_accuracy": options.target,
        "model": "cnn", "dp": "sample (DP-SGD)", "time": "simulated seconds",
    }  # fmt: skip
    result = {
        "benchmark": "fedbuff",
        "workload": workload,
        "fedbuff_time_to_target_s": fedbuff["time_to_target_s"],
        "sync_time_to_target_s": sync["time_to_target_s"],
        "fedbuff_over_sync": maybe_ratio(fedbuff["time_to_target_s"], sync["time_to_target_s"], 3),
        "goal": {"fedbuff_over_sync": 0.5},
        "runs": {"sync": sync, "fedbuff": fedbuff},
        "machine": machine(),
    }
    write_json(RESULTS / "fedbuff.json", result)


if __name__ == "__main__":
    main()
