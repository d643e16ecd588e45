"""Stragglers on a real fleet: FedBuff against synchronous FedAvg, wall time to a target.

A fresh federation (``pollinate server start`` with TLS and node authentication, ``--devices``
``pollinate edge run`` daemons on loopback) whose devices emulate one latency model
(``--emulate-latency``: log-normal reply times around ``--median`` s, sigma 0.5, a fifth of
the devices 10x slower, the same ones in every run, drawn from seed 42 as the simulation
draws them). Every device trains in every round (``fraction-train`` 1.0):

* sync: FedAvg, ``--sync-rounds`` rounds; a round ends when its slowest device answers;
* fedbuff: ``strategy = fedbuff``, a release every ``--buffer`` replies, as many releases
  as make the same client work (sync rounds x devices / buffer).

Both train with DP-SGD (the defaults), after an unmeasured one-round warm-up run on the same
fleet (every device installs the App and starts its executor once). The measure is seconds
from the first round's start until the central test accuracy first reaches ``--target``
(``elapsed_s`` in the run's metrics.json: wall time on a real fleet). The same two runs on
the fast engine with the same latency model (simulated seconds) come with them.

    python benchmarks/stragglers.py                 # 10 devices, ~8 min
    python benchmarks/stragglers.py --devices 6 --sync-rounds 4

JSON on stdout and in ``benchmarks/results/stragglers.json`` (``benchmarks/federation.py``
runs the same with its own devices and puts it into federation.json):
``fedbuff_time_to_target_s``, ``sync_time_to_target_s`` and ``fedbuff_over_sync`` (issue
goal <= 0.5), each run's rounds and accuracy, and the simulated pair.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import RESULTS, maybe_ratio, run_pollinate, write_json
from benchmarks.federation import follow, read_metrics, say
from pollinate.config.latency import LatencyModel
from tests.support.federation import Federation, FederationError

SEED = 42  # pollinate's default run seed: the simulation draws its latencies from it too


@dataclass(frozen=True)
class Scenario:
    """The fleet, its latency model and the two schedules."""

    devices: int = 10
    median_s: float = 1.0
    slow_fraction: float = 0.2
    slow_factor: float = 10.0
    sync_rounds: int = 6
    buffer: int = 3
    target: float = 0.6
    round_timeout: float = 120.0

    @property
    def latency(self) -> LatencyModel:
        """The latency model the devices emulate and the simulation uses."""
        return LatencyModel(median_s=self.median_s, sigma=0.5, slow_fraction=self.slow_fraction,
                            slow_factor=self.slow_factor, seed=SEED)  # fmt: skip

    @property
    def releases(self) -> int:
        """FedBuff releases that make the same client work as the synchronous rounds."""
        return self.sync_rounds * self.devices // self.buffer

    def schedules(self) -> dict[str, list[str]]:
        """Each run's options (``server run`` and ``simulate`` alike)."""
        common = ["--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0", "--set",
                  f"round-timeout={self.round_timeout}", "--set", f"seed={SEED}"]  # fmt: skip
        return {
            "sync": ["--rounds", str(self.sync_rounds), *common],
            "fedbuff": ["--rounds", str(self.releases), "--strategy", "fedbuff",
                        "--set", f"buffer-size={self.buffer}", *common],
        }  # fmt: skip


def time_to_target(run_dir: Path, target: float) -> dict[str, Any]:
    """Rounds, accuracy and the seconds (``elapsed_s``) until accuracy first reached
    ``target`` (None: never) of one finished run."""
    rounds = [m for m in read_metrics(run_dir) if m["server_round"] >= 1]
    reached = next((m for m in rounds if (m.get("accuracy") or 0) >= target), None)
    return {
        "rounds": len(rounds),
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "best_accuracy": max((m["accuracy"] or 0 for m in rounds), default=None),
        "elapsed_s": round(rounds[-1]["elapsed_s"], 1) if rounds else None,
        "time_to_target_s": None if reached is None else round(reached["elapsed_s"], 1),
        "round_to_target": None if reached is None else reached["server_round"],
        "failed": sum(m["failed"] for m in rounds),
        "stale": sum(m.get("stale", 0) for m in rounds),
    }


def simulated(scenario: Scenario, root: Path) -> dict[str, Any]:
    """Both schedules on the fast engine with the same latency model (simulated seconds)."""
    model = scenario.latency
    sets = ["--set", f"latency-median-s={model.median_s}", "--set", f"latency-sigma={model.sigma}",
            "--set", f"slow-fraction={model.slow_fraction}",
            "--set", f"slow-factor={model.slow_factor}"]  # fmt: skip
    out: dict[str, Any] = {}
    for name, options in scenario.schedules().items():
        run_dir = root / f"sim-{name}"
        args = ["simulate", "-n", str(scenario.devices), "--run-dir", str(run_dir), *options,
                *sets]  # fmt: skip
        done = run_pollinate(args, run_dir, timeout=1800)
        if done.returncode != 0:
            raise FederationError(f"simulated {name} failed:\n{done.stderr_tail}")
        out[name] = time_to_target(run_dir, scenario.target)
        say(f"  simulated {name}: {out[name]}")
    return out


def real(scenario: Scenario, root: Path, *, daemon_nice: int = 10) -> dict[str, Any]:
    """Both schedules on one real federation whose devices emulate the latency model."""
    spec = scenario.latency.spec()
    slow = [d for d in range(scenario.devices) if scenario.latency.is_slow(d)]
    say(f"stragglers: {scenario.devices} devices emulating {spec}; slow devices {slow}")
    fed = Federation(root / "stragglers", scenario.devices, daemon_nice=daemon_nice,
                     device_args=lambda _: ["--emulate-latency", spec], say=say)  # fmt: skip
    out: dict[str, Any] = {"slow_devices": slow}
    with fed:
        fed.start()
        schedules = scenario.schedules()
        warmup = ["--rounds", "1", *schedules["sync"][2:]]  # every device starts once first
        runs = {"warmup": warmup, **schedules}
        for name, options in runs.items():
            run_dir = root / f"real-{name}"
            run_id = fed.start_run(run_dir, options)
            rounds = int(options[options.index("--rounds") + 1])
            status = follow(fed, run_id, run_dir, rounds, timeout=3600)
            result = {"status": status.get("status"), **time_to_target(run_dir, scenario.target)}
            say(f"  real {name}: {result}")
            if name != "warmup":
                out[name] = result
        fed.stop()
    return out


def measure(scenario: Scenario, root: Path, *, daemon_nice: int = 10) -> dict[str, Any]:
    """The real pair and the simulated pair; the headline keys from the real one."""
    sim = simulated(scenario, root)
    fleet = real(scenario, root, daemon_nice=daemon_nice)
    fedbuff, sync = fleet["fedbuff"]["time_to_target_s"], fleet["sync"]["time_to_target_s"]
    return {
        "fedbuff_time_to_target_s": fedbuff,
        "sync_time_to_target_s": sync,
        "fedbuff_over_sync": maybe_ratio(fedbuff, sync, 3),
        "sim_fedbuff_over_sync": maybe_ratio(
            sim["fedbuff"]["time_to_target_s"], sim["sync"]["time_to_target_s"], 3
        ),
        "scenario": {
            "devices": scenario.devices,
            "latency": scenario.latency.spec(),
            "sync_rounds": scenario.sync_rounds,
            "fedbuff_releases": scenario.releases,
            "buffer_size": scenario.buffer,
            "target_accuracy": scenario.target,
            "time": "wall seconds from the first round's start (real), simulated seconds (sim)",
        },
        "real": fleet,
        "sim": sim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Scenario()
    parser.add_argument("--devices", type=int, default=defaults.devices)
    parser.add_argument("--median", type=float, default=defaults.median_s, help="reply time, s")
    parser.add_argument("--sync-rounds", type=int, default=defaults.sync_rounds)
    parser.add_argument("--buffer", type=int, default=defaults.buffer)
    parser.add_argument("--target", type=float, default=defaults.target)
    options = parser.parse_args()
    scenario = Scenario(devices=options.devices, median_s=options.median,
                        sync_rounds=options.sync_rounds, buffer=options.buffer,
                        target=options.target)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="pollinate-stragglers-") as tmp:
        result = {"benchmark": "stragglers", **measure(scenario, Path(tmp))}
    write_json(RESULTS / "stragglers.json", result)


if __name__ == "__main__":
    main()
