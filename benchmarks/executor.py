"""Warm against cold ClientApp executors on a real federation, and both against the fast
simulation of the same work, in one run.

A SuperLink (``pollinate server start``, TLS, node authentication) and ``--devices`` real
``pollinate edge run`` daemons on loopback, once with ``--executor warm`` (each message runs in
a fork of one process that imported torch and the app once) and once with ``--executor cold``
(Flower's fresh ``flwr-clientapp`` per message); the same workload as a fast simulation. The
rounds' seconds come from each run's ``metrics.json``.

    python benchmarks/executor.py                       # 4 devices, 4 rounds, ~6 min
    python benchmarks/executor.py --devices 10 --rounds 4

JSON on stdout and in ``benchmarks/results/executor.json``: ``real_warm_s_per_round``,
``real_cold_s_per_round`` and ``sim_warm_s_per_round`` (median of rounds 2..N),
``real_over_sim`` (warm; issue goal <= 3), ``cold_real_over_sim`` and ``cold_over_warm``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._measure import RESULTS, maybe_ratio, write_json
from benchmarks.federation import Workload, machine, real_run, say, simulate
from tests.support.federation import Federation


def real(executor: str, work: Workload, root: Path, timeout: float) -> dict[str, Any]:
    """A fresh federation whose daemons run ``--executor EXECUTOR``; one run on it."""
    fed = Federation(root / executor, work.devices, device_args=lambda _: ["--executor", executor],
                     say=say)  # fmt: skip
    with fed:
        started = fed.start()
        result = real_run(fed, f"real-{executor}", work, root / executor, timeout)
    return {"executor": executor, **started, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round-timeout", type=float, default=150.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run")
    options = parser.parse_args()
    work = Workload(options.devices, options.rounds, options.round_timeout, options.devices)
    with tempfile.TemporaryDirectory(prefix="pollinate-executor-") as tmp:
        root = Path(tmp)
        sim = simulate("fast", work, root, options.timeout)
        warm = real("warm", work, root, options.timeout)
        cold = real("cold", work, root, options.timeout)
    key = "warm_median_s_per_round"
    result = {
        "benchmark": "executor",
        "workload": work.config,
        "machine": machine(),
        "real_warm_s_per_round": warm[key],
        "real_cold_s_per_round": cold[key],
        "sim_warm_s_per_round": sim[key],
        "real_over_sim": maybe_ratio(warm[key], sim[key], 2),
        "cold_real_over_sim": maybe_ratio(cold[key], sim[key], 2),
        "cold_over_warm": maybe_ratio(cold[key], warm[key], 2),
        "goal": {"real_over_sim": 3.0},
        "runs": {"sim": sim, "warm": warm, "cold": cold},
    }
    write_json(RESULTS / "executor.json", result, sort_keys=True)


if __name__ == "__main__":
    main()
