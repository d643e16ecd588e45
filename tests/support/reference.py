"""The reference: a plain Flower app with Opacus (``benchmarks/reference_flower_app``).

It is written the way Flower's official Opacus example is (a new model, PrivacyEngine and
loader on every train call, FedAvg, central evaluation) and runs in Flower's simulation
engine with the Ray backend, as `flwr run` with a local simulation federation does. Its
ServerApp appends one JSON line per central evaluation (round 0 = the initial model) to
$REFAPP_TIMINGS; per-round times are the differences between those lines.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from tests.support import REPO
from tests.support.commands import run_command

APP_DIR = REPO / "benchmarks" / "reference_flower_app"
RUNNER = APP_DIR / "run.py"


def reference_flower(
    num_supernodes: int,
    rounds: int,
    workdir: Path,
    *,
    model: str = "opacus-mnist",
    client_cpus: float = 2.0,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run the reference app once and measure it.

    Returns ``warm_s_per_round`` (median time between consecutive evaluations, rounds >= 2),
    ``time_to_first_round_s`` (command start to round 1's evaluation), ``peak_rss_mb`` (summed
    over the whole process tree: driver, Ray's daemons, the workers), ``final_accuracy``,
    ``wall_s`` and ``rounds`` (the timing lines, ``t`` made relative to the start).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    timings = workdir / "refapp-timings.jsonl"
    timings.unlink(missing_ok=True)
    run = run_command(
        [sys.executable, str(RUNNER), "--num-supernodes", str(num_supernodes),
         "--rounds", str(rounds), "--timings", str(timings), "--model", model,
         "--client-cpus", str(client_cpus)],
        env_extra={
            "OMP_NUM_THREADS": "1",
            "FLWR_HOME": str(workdir / ".flwr"),
            "RAY_DEDUP_LOGS": "0",
        },
        timeout=timeout,
        cwd=REPO,
    )  # fmt: skip
    lines = (
        [json.loads(line) for line in timings.read_text().splitlines() if line.strip()]
        if timings.exists()
        else []
    )
    if run.returncode != 0 or len(lines) != rounds + 1:
        raise RuntimeError(
            f"reference app failed (exit {run.returncode}, {len(lines)} of {rounds + 1} "
            f"evaluations):\n{run.stderr_tail}"
        )
    by_round = {int(line["round"]): float(line["t"]) for line in lines}
    deltas = [by_round[r] - by_round[r - 1] for r in range(2, rounds + 1)]
    return {
        "num_supernodes": num_supernodes,
        "model": model,
        "client_cpus": client_cpus,
        "warm_s_per_round": round(statistics.median(deltas), 3) if deltas else math.nan,
        "time_to_first_round_s": round(by_round[1] - run.started_at, 2),
        "wall_s": round(run.wall_s, 2),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "final_accuracy": float(lines[-1]["accuracy"]),
        "rounds": [
            {
                "round": int(line["round"]),
                "t_s": round(float(line["t"]) - run.started_at, 3),
                "accuracy": float(line["accuracy"]),
            }
            for line in lines
        ],
    }


if __name__ == "__main__":  # python -m tests.support.reference [num_supernodes] [rounds]
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    r = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory(prefix="refapp-") as tmp:
        print(json.dumps(reference_flower(n, r, Path(tmp)), indent=2))
