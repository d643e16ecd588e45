"""Federation benchmark: real edge daemons on loopback against the simulation, and faults.

A real federation, started the way ``tests/integration/test_edge_federation.py`` starts one:
``pollinate certs``, ``pollinate server start`` (Flower's SuperLink, TLS, SuperNode
authentication) and ``--devices`` ``pollinate edge run`` daemons on 127.0.0.1, each training
its own slice of the built-in data (``--partition-id i --num-partitions N --threads 1``).
Measured in one invocation:

1. **Real vs simulation.** The same workload (default model, data, DP-SGD and seed; every
   device trains every round: ``fraction-train=1.0``, ``fraction-evaluate=0.0``) run with
   ``pollinate simulate -n N`` on the fast engine (and ``--engine ray``), then on the real
   federation with ``pollinate server run``. Seconds per round come from each run
   directory's ``metrics.json`` (rounds 1..N): mean, median and the median of the warm rounds
   (2..N); the ratios real / simulation. Also the time to start the federation (SuperLink
   ready, every SuperNode online).
2. **Faults.** A second run on the same federation; once round 1 is in ``metrics.json`` and
   ``--kill-delay`` seconds have passed (round 2 is under way), the SuperNodes of
   ``--kill-fraction`` of the devices are SIGKILLed (their daemons start them again with
   back-off; the SuperLink lets them back in once it has marked them offline). Target: every
   round completes and the final accuracy is within 1 point of the fault-free real run.
   Client sampling and DP noise are seeded per client and round, so the two runs differ only
   by the missing clients (the devices' accountants carry over from the first run, which
   changes the epsilons reported, not the training). ``--round-timeout`` (150 s) is above
   any complete fault-free round seen here (57-65 s with 10 daemons on 2 busy cores). The
   round with dead nodes ends when Flower answers for them with "node unavailable" errors
   (once the SuperLink has marked them offline: two missed 30 s heartbeats) or, when the
   restarted SuperNodes are already back online by then (their old instructions are never
   answered), at the timeout.

3. **Cold executors.** The same real run on a fresh federation whose daemons run
   ``--executor cold`` (Flower's fresh ``flwr-clientapp`` per message).
4. **Stragglers** (``benchmarks/stragglers.py``): a fresh federation whose devices emulate
   one latency model (``--emulate-latency``: a fifth of them 10x slower); wall time to
   ``--target`` accuracy for FedBuff against synchronous FedAvg, and the same pair on the
   fast engine with the same model.
5. **Scale** (``benchmarks/scale.py``): fleets of ``--scale-sizes`` devices on one zygote,
   one round each: ``max_nodes`` and the SuperLink's RSS per node (slope over the sizes).

The issue's keys head the JSON: ``real_warm_s_per_round``, ``sim_warm_s_per_round`` (fast
engine, rounds 2..N) and ``real_over_sim`` (goal <= 3), ``real_cold_s_per_round`` and
``cold_real_over_sim``, ``max_nodes`` and ``superlink_rss_mb_per_node``,
``fedbuff_time_to_target_s``, ``sync_time_to_target_s`` and ``fedbuff_over_sync`` (goal <= 0.5).

Sim runs go first, with the federation not yet started. On the federation, an unmeasured
one-round warm-up run comes first (``--warmup-rounds``: every device installs the App and
starts its first ClientApp), so the two measured real runs start alike. The daemons run at
``nice 10`` (``--daemon-nice``): on a real deployment the devices do not share the server's
CPU. On 2 busy cores, ten ClientApps starting at once can starve the SuperLink: its sqlite
state reports "database is locked", replies are lost ("object-push session expired",
``failed`` in metrics.json), and Flower 1.42's flower-superexec can die on the HTTP 500,
after which no new run starts (this benchmark then stops with an error after 120 s of
"pending"). ``every_sampled_client_replied`` and ``fault_free_run_clean`` in the JSON say
whether a run lost clients without a fault being injected.

Progress goes to stderr; the JSON is written to ``benchmarks/results/federation.json``
(``--out``) and printed (on a failure, what was measured so far is printed and the file is
left alone). Every process is stopped at the end, on errors and on Ctrl-C or SIGTERM
(SIGTERM to its session, SIGKILL after 30 s).

Usage::

    python benchmarks/federation.py                                   # every part, ~40 min
    python benchmarks/federation.py --skip-faults --scale-sizes ''     # ~15 min
    python benchmarks/federation.py --devices 3 --rounds 2 --skip-ray # a quick check
    python benchmarks/federation.py --skip-sim --skip-faults --work /tmp/fed  # keep the logs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._measure import (
    Stopwatch,
    Timings,
    json_out,
    maybe_ratio,
    print_json,
    run_pollinate,
    write_json,
)
from tests.support.federation import Federation, FederationError

RESULTS = Path(__file__).resolve().parent / "results" / "federation.json"
# the federation is measured, not MLflow: runs here are not tracked (on by default)
os.environ.setdefault("POLLINATE_TRACKING", "off")

CLOCK = Stopwatch()  # since the benchmark started
PENDING_LIMIT_S = 120.0
TARGET = (
    "with 30% of daemons killed mid-round, all rounds complete and the final accuracy is "
    "within 1 point of the run without faults"
)


def say(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{CLOCK.seconds():7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- run directories
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.json`` (round 0 first); [] before it exists."""
    try:
        rounds: list[dict[str, Any]] = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return rounds


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summarize(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds per round (rounds 1..N) and the per-round outcomes of one run.

    ``no_reply``: sampled clients with neither a reply nor an error reply when the round's
    timeout passed (metrics.json counts only error replies as ``failed``).
    """
    rounds = [m for m in metrics if m["server_round"] >= 1]
    seconds = [float(m["seconds"]) for m in rounds if m.get("seconds") is not None]
    warm = seconds[1:]
    lost = sum(m["sampled"] - m["replied"] for m in rounds)
    return {
        "rounds_completed": len(rounds),
        "every_sampled_client_replied": lost == 0,
        "round_seconds": [round(s, 3) for s in seconds],
        "mean_s_per_round": Timings(tuple(seconds)).mean_s(3) if seconds else None,
        "median_s_per_round": Timings(tuple(seconds)).median_s(3) if seconds else None,
        "warm_median_s_per_round": Timings(tuple(warm)).median_s(3) if warm else None,
        "final_accuracy": metrics[-1].get("accuracy") if rounds else None,
        "per_round": [
            {k: m.get(k) for k in ("server_round", "sampled", "replied", "failed", "declined",
                                   "rejected", "accuracy", "max_epsilon")}
            | {"no_reply": max(0, m["sampled"] - m["replied"] - m["failed"]),
               "seconds": _r(m.get("seconds"))}
            for m in rounds
        ],
    }  # fmt: skip


def ratios(real: dict[str, Any], sim: dict[str, Any]) -> dict[str, float | None]:
    """Real seconds per round over simulated ones (mean, median, warm median)."""
    out: dict[str, float | None] = {}
    for key in ("mean_s_per_round", "median_s_per_round", "warm_median_s_per_round"):
        out[key.removesuffix("_s_per_round")] = maybe_ratio(real.get(key), sim.get(key), 2)
    return out


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Workload:
    """What every run (simulated and real) trains; only the engine differs."""

    devices: int
    rounds: int
    round_timeout: float
    min_train_nodes: int

    @property
    def config(self) -> dict[str, Any]:
        """The run config every run gets (the rest are pollinate's defaults)."""
        return {
            "num-server-rounds": self.rounds, "fraction-train": 1.0, "fraction-evaluate": 0.0,
            "round-timeout": self.round_timeout, "min-train-nodes": self.min_train_nodes,
            "min-available-nodes": self.devices,
        }  # fmt: skip

    def sets(self, skip: tuple[str, ...] = ()) -> list[str]:
        """``--set KEY=VALUE`` for every run-config key not in ``skip``."""
        out: list[str] = []
        for key, value in self.config.items():
            if key not in skip:
                out += ["--set", f"{key}={value}"]
        return out


# ---------------------------------------------------------------------- simulation
def simulate(engine: str, work: Workload, root: Path, timeout: float) -> dict[str, Any]:
    """``pollinate simulate -n DEVICES --engine ENGINE`` with the workload's run config."""
    run_dir = root / f"sim-{engine}"
    say(f"simulation, {engine} engine: {work.devices} clients, {work.rounds} rounds")
    # simulate sets min-available-nodes to the number of clients itself
    args = ["simulate", "-n", str(work.devices), "--engine", engine, "--run-dir", str(run_dir),
            *work.sets(skip=("min-available-nodes",))]  # fmt: skip
    run = run_pollinate(args, run_dir, timeout=timeout)
    if run.returncode != 0:
        raise FederationError(f"pollinate simulate --engine {engine} failed:\n{run.stderr_tail}")
    result = {
        "engine": engine,
        **summarize(read_metrics(run_dir)),
        "wall_s": round(run.wall_s, 2),
        "time_to_first_round_s": _r(run.first_round_s, 2),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    say(
        f"  {engine}: {result['mean_s_per_round']} s/round (median "
        f"{result['median_s_per_round']}), accuracy {result['final_accuracy']}, "
        f"wall {run.wall_s:.1f} s"
    )
    return result


# ---------------------------------------------------------------------- real runs
PollHook = Callable[[int], None]


def follow(
    fed: Federation,
    run_id: str,
    run_dir: Path,
    rounds: int,
    timeout: float,
    on_poll: PollHook | None = None,
) -> dict[str, Any]:
    """Wait until the run is finished; its final ``pollinate server status``.

    ``metrics.json`` is read every 0.5 s (each new round is reported, ``on_poll(rounds
    done)`` called); Flower's status is asked every 30 s, every 2 s once all rounds are in.
    """
    start = time.monotonic()
    last_status = start
    seen = 0
    pending_since: float | None = None
    while True:
        fed.check_alive()
        metrics = read_metrics(run_dir)
        done = max(0, len(metrics) - 1)
        for m in metrics[seen + 1 :]:
            say(
                f"  round {m['server_round']}/{rounds}: {m.get('seconds') or 0:.1f} s, "
                f"sampled {m.get('sampled')} replied {m.get('replied')} failed "
                f"{m.get('failed')}, accuracy {m.get('accuracy')}"
            )
        seen = max(seen, done)
        if on_poll is not None:
            on_poll(done)
        now = time.monotonic()
        if now - last_status >= (2.0 if done >= rounds else 30.0):
            status = fed.status(run_id)
            last_status = time.monotonic()
            flower_status = str(status.get("status", ""))
            if flower_status.startswith("finished"):
                return status
            if flower_status != "pending":
                pending_since = None
            elif pending_since is None:
                pending_since = last_status
            elif last_status - pending_since > PENDING_LIMIT_S:
                raise FederationError(
                    f"run {run_id} is still pending after {PENDING_LIMIT_S:.0f} s: the "
                    "SuperLink did not launch its ServerApp (see state/superlink.log: a "
                    f"crashed flower-superexec?); {fed.superlink_errors()}"
                )
        if now - start > timeout:
            raise FederationError(f"run {run_id} did not finish within {timeout:.0f} s")
        time.sleep(0.5)


def real_run(
    fed: Federation,
    name: str,
    work: Workload,
    root: Path,
    timeout: float,
    on_poll: PollHook | None = None,
) -> dict[str, Any]:
    """``pollinate server run`` with the workload's run config; followed to its end."""
    run_dir = root / name
    say(f"real run '{name}': {work.devices} devices, {work.rounds} rounds")
    clock = Stopwatch()
    flags = ("num-server-rounds", "round-timeout", "min-train-nodes")  # as the CLI's own flags
    options = [
        "--rounds", str(work.rounds), "--round-timeout", str(work.round_timeout),
        "--min-train-nodes", str(work.min_train_nodes), *work.sets(skip=flags),
    ]  # fmt: skip
    run_id = fed.start_run(run_dir, options)
    submitted_s = clock.seconds()
    status = follow(fed, run_id, run_dir, work.rounds, timeout, on_poll)
    wall_s = clock.seconds()
    result = {
        "run_id": run_id,
        "status": status.get("status"),
        **summarize(read_metrics(run_dir)),
        "max_epsilon": status.get("max_epsilon"),
        "submit_s": round(submitted_s, 2),
        "wall_s": round(wall_s, 2),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "superlink_log_so_far": fed.superlink_errors(),
    }
    # submit, ServerApp start, initial evaluation, identifying the nodes; the final report
    result["outside_rounds_s"] = round(wall_s - sum(result["round_seconds"]), 2)
    result["all_rounds_completed"] = (
        result["status"] == "finished:completed" and result["rounds_completed"] == work.rounds
    )
    say(
        f"  {name}: {result['status']}, {result['mean_s_per_round']} s/round (median "
        f"{result['median_s_per_round']}), accuracy {result['final_accuracy']}, "
        f"wall {wall_s:.1f} s"
    )
    return result


class FaultInjector:
    """Kills the SuperNodes of ``victims`` once round 1 is done and ``delay_s`` has passed,
    then watches how many SuperNodes the SuperLink lists as online (every ``poll_s``)."""

    def __init__(self, fed: Federation, victims: list[int], delay_s: float, poll_s: float = 5.0):
        self.fed = fed
        self.victims = victims
        self.delay_s = delay_s
        self.poll_s = poll_s
        self.round1_at: float | None = None
        self.killed_at: float | None = None
        self.killed_during_round: int | None = None
        self.killed_pids: list[int] = []
        self.online: list[tuple[float, int]] = []  # (seconds since the kill, online count)
        self._last_poll = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if self.killed_at is None:
            if done >= 1 and self.round1_at is None:
                self.round1_at = now
            if self.round1_at is not None and now - self.round1_at >= self.delay_s:
                self.killed_during_round = done + 1
                for i in self.victims:
                    self.killed_pids.append(self.fed.kill_supernode(i))
                self.killed_at = time.monotonic()
                say(f"  SIGKILLed the SuperNodes of devices {self.victims} in round {done + 1}")
            return
        if now - self._last_poll >= self.poll_s:
            self.watch()

    def watch(self) -> int:
        """Ask the SuperLink how many SuperNodes are online and record it."""
        assert self.killed_at is not None
        count = self.fed.online()
        self._last_poll = time.monotonic()
        self.online.append((round(self._last_poll - self.killed_at, 1), count))
        return count

    def wait_rejoin(self, timeout: float) -> None:
        """Keep watching until every SuperNode is online again (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.watch() < self.fed.devices and time.monotonic() < deadline:
            self.fed.check_alive()
            time.sleep(self.poll_s)

    def report(self, run_wall_s: float, run_started: float) -> dict[str, Any]:
        """Which SuperNodes were killed when, when the SuperLink saw them go and come back."""
        n = self.fed.devices
        offline = next((t for t, c in self.online if c < n), None)
        back = next((t for t, c in self.online if offline is not None and t > offline and c == n),
                    None)  # fmt: skip
        killed_at_s = None if self.killed_at is None else self.killed_at - run_started
        run_end_after_kill = None if killed_at_s is None else run_wall_s - killed_at_s
        daemons = {}
        for i in self.victims:
            status = self.fed.daemon_status(i)
            daemons[str(i)] = {
                k: status.get(k) for k in ("state", "restarts", "last_exit", "supernode_pid")
            }
        return {
            "killed_devices": self.victims,
            "killed_pids": self.killed_pids,
            "killed_after_run_start_s": _r(killed_at_s, 1),
            "killed_during_round": self.killed_during_round,
            "min_online_after_kill": min((c for _, c in self.online), default=None),
            "first_seen_offline_after_kill_s": offline,
            "all_back_online_after_kill_s": back,
            "back_online_before_run_end": back is not None
            and run_end_after_kill is not None
            and back <= run_end_after_kill,
            "online_polls": self.online,
            "daemons_after": daemons,
        }


# ---------------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import flwr
    import torch

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[Path]:
    """``--work DIR`` (kept), or a temporary folder removed at the end."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="pollinate-federation-bench-") as name:
        yield Path(name)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10, help="edge daemons (and sim clients)")
    parser.add_argument("--rounds", type=int, default=4, help="server rounds of every run")
    parser.add_argument(
        "--kill-fraction",
        type=float,
        default=0.3,
        help="share of the devices whose SuperNode is killed in round 2",
    )
    parser.add_argument(
        "--kill-delay",
        type=float,
        default=1.5,
        help="seconds after round 1 is recorded before the kill",
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=150.0,
        help="seconds a round waits for replies (every run); above any complete round, so "
        "only lost replies and dead nodes make a round wait this long",
    )
    parser.add_argument(
        "--min-train-nodes",
        type=int,
        default=None,
        help="fewest replies a round needs [devices // 2]",
    )
    parser.add_argument("--threads", type=int, default=1, help="training threads per daemon")
    parser.add_argument(
        "--daemon-nice",
        type=int,
        default=10,
        help="niceness of the daemons (their SuperNodes and ClientApps inherit it), so that "
        "ten emulated devices do not starve the SuperLink on the same cores; 0 = none",
    )
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="an unmeasured run first (every device installs the App, starts torch once)",
    )
    parser.add_argument(
        "--rejoin-timeout",
        type=float,
        default=180.0,
        help="after the faulty run, seconds to wait for the killed nodes",
    )
    parser.add_argument("--skip-sim", action="store_true", help="no simulation runs")
    parser.add_argument("--skip-ray", action="store_true", help="no --engine ray simulation")
    parser.add_argument("--skip-faults", action="store_true", help="no run with killed nodes")
    parser.add_argument("--skip-cold", action="store_true", help="no --executor cold fleet")
    parser.add_argument(
        "--skip-stragglers", action="store_true", help="no FedBuff-vs-sync straggler fleet"
    )
    parser.add_argument("--straggler-median", type=float, default=1.0, help="reply time, s")
    parser.add_argument("--straggler-sync-rounds", type=int, default=6)
    parser.add_argument("--straggler-buffer", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.6, help="straggler target accuracy")
    parser.add_argument(
        "--scale-sizes",
        default="10,50",
        help="fleet sizes of the scale part (benchmarks/scale.py, one round each): "
        "max_nodes and the SuperLink's MB per node; '' = none",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep certificates, state, logs and run directories here",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    args.out = json_out(args.out, RESULTS)
    if args.devices < 2:
        parser.error(f"--devices must be at least 2, got {args.devices}")
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the fault comes in round 2), got {args.rounds}")
    if not 0.0 < args.kill_fraction < 1.0:
        parser.error(f"--kill-fraction must be in (0, 1), e.g. 0.3; got {args.kill_fraction}")
    if args.min_train_nodes is None:
        args.min_train_nodes = max(1, args.devices // 2)
    return args


def measure(args: argparse.Namespace, work: Workload, report: dict[str, Any]) -> None:
    """Run every part of the benchmark, filling ``report`` as results come in."""
    n_kill = max(1, round(args.kill_fraction * args.devices))
    victims = list(range(args.devices - n_kill, args.devices))
    run_timeout = 180 + args.rounds * (args.round_timeout + 120)
    with workdir(args.work) as root:
        say(f"work folder {root}")
        sims: dict[str, dict[str, Any]] = {}
        if not args.skip_sim:
            for engine in ("fast",) if args.skip_ray else ("fast", "ray"):
                sims[engine] = simulate(engine, work, root, timeout=run_timeout)
                report["sim"] = sims
        fed = Federation(root / "federation", args.devices, threads=args.threads,
                         daemon_nice=args.daemon_nice, say=say)  # fmt: skip
        with fed:
            start = fed.start()
            report["federation_start"] = {k: round(v, 2) for k, v in start.items()}
            if args.warmup_rounds:
                warm = dataclasses.replace(work, rounds=args.warmup_rounds)
                report["warmup"] = real_run(fed, "warmup", warm, root, run_timeout)
            real = real_run(fed, "real", work, root, run_timeout)
            report["real_vs_sim"] = {
                "real": real,
                "sim": sims,
                "ratio_real_over_sim": {engine: ratios(real, sim) for engine, sim in sims.items()},
            }
            report.pop("sim", None)
            if not args.skip_faults:
                injector = FaultInjector(fed, victims, args.kill_delay)
                t_run = time.monotonic()
                faulty = real_run(fed, "real-faults", work, root, run_timeout, injector)
                if injector.killed_at is None:
                    raise FederationError("the run finished before the SuperNodes were killed")
                if injector.watch() < args.devices:
                    say(f"waiting up to {args.rejoin_timeout:.0f} s for the killed nodes")
                    injector.wait_rejoin(args.rejoin_timeout)
                report["faults"] = fault_verdict(
                    real, faulty, injector.report(faulty["wall_s"], t_run)
                )
            say("stopping the federation")
            report["shutdown_exit_codes"] = fed.stop()
        if not args.skip_cold:
            cold_fed = Federation(root / "cold", args.devices, threads=args.threads,
                                  daemon_nice=args.daemon_nice, say=say,
                                  device_args=lambda _: ["--executor", "cold"])  # fmt: skip
            with cold_fed:
                cold_fed.start()
                report["cold"] = real_run(cold_fed, "real-cold", work, root, run_timeout)
                cold_fed.stop()
        if not args.skip_stragglers:
            from benchmarks.stragglers import Scenario
            from benchmarks.stragglers import measure as stragglers

            scenario = Scenario(devices=args.devices, median_s=args.straggler_median,
                                sync_rounds=args.straggler_sync_rounds,
                                buffer=args.straggler_buffer, target=args.target)  # fmt: skip
            report["stragglers"] = stragglers(scenario, root, daemon_nice=args.daemon_nice)
        if args.scale_sizes:
            from benchmarks.scale import attempt, summary

            sizes = [int(n) for n in args.scale_sizes.split(",")]
            report["scale"] = summary([attempt(n, 1, root / "scale", True) for n in sizes])
    headline(report)


def headline(report: dict[str, Any]) -> None:
    """The issue's keys at the top of the report, from the parts that ran."""
    real = report.get("real_vs_sim", {}).get("real", {})
    sim = report.get("real_vs_sim", {}).get("sim", {}).get("fast", {})
    cold = report.get("cold", {})
    key = "warm_median_s_per_round"
    top: dict[str, Any] = {
        "real_warm_s_per_round": real.get(key),
        "sim_warm_s_per_round": sim.get(key),
        "real_over_sim": maybe_ratio(real.get(key), sim.get(key), 2),
        "real_cold_s_per_round": cold.get(key),
        "cold_real_over_sim": maybe_ratio(cold.get(key), sim.get(key), 2),
    }
    scale = report.get("scale", {})
    top.update({k: scale.get(k) for k in ("max_nodes", "superlink_rss_mb_per_node")})
    stragglers = report.get("stragglers", {})
    for k in ("fedbuff_time_to_target_s", "sync_time_to_target_s", "fedbuff_over_sync"):
        top[k] = stragglers.get(k)
    top["goal"] = {"real_over_sim": 3.0, "max_nodes": 50, "fedbuff_over_sync": 0.5}
    report.update(top)


def fault_verdict(
    real: dict[str, Any], faulty: dict[str, Any], nodes: dict[str, Any]
) -> dict[str, Any]:
    """The faulty run against the fault-free one, and whether the target is met."""
    a, b = faulty["final_accuracy"], real["final_accuracy"]
    diff = None if a is None or b is None else round((a - b) * 100, 2)
    completed = bool(faulty["all_rounds_completed"])
    met = completed and diff is not None and abs(diff) <= 1.0 + 1e-9
    say(f"faults: all rounds completed {completed}, accuracy {a} vs {b} ({diff} points), "
        f"target met {met}")  # fmt: skip
    return {
        "target": TARGET,
        "target_met": met,
        "all_rounds_completed": completed,
        "faulty_final_accuracy": a,
        "fault_free_final_accuracy": b,
        "accuracy_diff_points": diff,
        "fault_free_run_clean": real["every_sampled_client_replied"],
        "run": faulty,
        "nodes": nodes,
    }


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on SIGTERM as on Ctrl-C
    work = Workload(args.devices, args.rounds, args.round_timeout, args.min_train_nodes)
    report: dict[str, Any] = {
        "benchmark": "federation",
        "machine": machine(),
        "settings": {
            "devices": args.devices,
            "rounds": args.rounds,
            "threads_per_daemon": args.threads,
            "daemon_nice": args.daemon_nice,
            "warmup_rounds": args.warmup_rounds,
            "run_config": work.config,
            "other_defaults": "pollinate's (model cnn, data mnist, DP-SGD noise 1.0 clip 1.0, "
            "seed 42, FedAvg)",
            "kill_fraction": args.kill_fraction,
            "kill_delay_s": args.kill_delay,
            "real": "pollinate server start (TLS, SuperNode auth) + pollinate edge run daemons "
            "on 127.0.0.1, OMP_NUM_THREADS=1",
            "sim": "pollinate simulate -n DEVICES (fast engine: one process, all CPUs; ray "
            "engine: 1 CPU per ClientApp)",
        },
    }
    try:
        measure(args, work, report)
    except (FederationError, KeyboardInterrupt) as err:
        say(f"failed: {type(err).__name__}: {err}")
        if isinstance(err, FederationError):  # what was measured before, for the record
            report["error"] = str(err)
            report["benchmark_wall_s"] = CLOCK.seconds(1)
            print_json(report)
            say(f"partial results printed above; {args.out} left as it was")
        return 1
    report["benchmark_wall_s"] = CLOCK.seconds(1)
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
