"""Fleet size on one machine: real SuperNodes with warm executors, SuperLink cost per node.

For each fleet size in ``--sizes``, a fresh federation (``pollinate certs``, ``pollinate
server start`` with TLS and node authentication, that many ``pollinate edge run`` daemons
with warm executors, each on its own slice of the built-in data) is started and measured
once every SuperNode is online. By default the executors are forked from one zygote
(``pollinate edge zygote``: devices sharing a host share its imports); ``--no-zygote`` gives
each device a warm executor of its own.

* memory: the SuperLink's process (RSS), the whole server tree (SuperLink, SuperExec,
  wrapper), and each device's tree (daemon, SuperNode, warm executor) as PSS, so shared
  library pages are divided between the processes that map them (with a zygote, its tree
  (every executor and task fork) is divided between the devices);
* the SuperLink's CPU over 30 s with every node online and no run (heartbeats, polling);
* a run of ``--rounds`` synchronous rounds in which every device trains (DP-SGD, the
  defaults): median seconds a round, the SuperLink's CPU seconds a round.

A size runs only if the devices' memory measured at the previous size, scaled, fits in
``--memory-gb`` (16) with the server's; ``max_nodes`` is the largest size that ran, and
``superlink_rss_mb_per_node`` the slope of the SuperLink's RSS over the sizes (least
squares). ``extrapolation_10k`` applies the slopes to 10,000 nodes (see the README for what
that deployment needs).

    python benchmarks/scale.py                       # 10, 25, 50 devices, ~15 min
    python benchmarks/scale.py --sizes 5,10 --rounds 1

JSON on stdout and in ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._measure import RESULTS, write_json
from benchmarks.federation import machine, read_metrics, say
from tests.support.federation import Federation, FederationError
from tests.support.processes import POLLINATE, Proc, stop_group, wait_until

MB = 2**20
IDLE_S = 30.0  # seconds the SuperLink's CPU is watched with every node online and no run


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _pss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total / MB


def _superlink(fed: Federation) -> psutil.Process | None:
    assert fed.server is not None
    for proc in _tree(fed.server.popen.pid):
        try:
            if "superlink" in " ".join(proc.cmdline()):
                return proc
        except psutil.Error:
            continue
    return None


def _cpu_s(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


@contextlib.contextmanager
def _zygote(root: Path, on: bool) -> Iterator[tuple[list[str], Proc | None]]:
    """A zygote for the fleet (``pollinate edge zygote``) and the daemons' flag for it."""
    if not on:
        yield [], None
        return
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "zygote.sock"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    zygote = Proc.spawn("zygote", [*POLLINATE, "edge", "zygote", str(sock)], root / "z.log", env)
    try:
        wait_until("the zygote", sock.is_socket, 300)
        yield ["--zygote", str(sock)], zygote
    finally:
        stop_group(zygote.popen)


def measure(size: int, rounds: int, root: Path, zygote: bool = True) -> dict[str, Any]:
    """One fleet of ``size`` devices: memory once online, then a run."""
    say(f"fleet of {size}: starting" + (" (one zygote)" if zygote else ""))
    with _zygote(root / f"zygote-{size}", zygote) as (flag, host):
        fed = Federation(root / f"fleet-{size}", size, daemon_nice=10, say=say,
                         device_args=lambda _: list(flag))  # fmt: skip
        return _measure_fleet(fed, size, rounds, root, host)


def _measure_fleet(
    fed: Federation, size: int, rounds: int, root: Path, host: Proc | None
) -> dict[str, Any]:
    with fed:
        started = fed.start(timeout=1200)
        time.sleep(10)  # the executors' imports settle
        link = _superlink(fed)
        assert fed.server is not None
        server_pss = _pss_mb(_tree(fed.server.popen.pid))
        own = [_pss_mb(_tree(d.popen.pid)) for d in fed.daemons]
        shared = _pss_mb(_tree(host.popen.pid)) if host is not None else 0.0
        devices = [mb + shared / size for mb in own]  # the zygote's share, executors included
        link_rss = link.memory_info().rss / MB if link is not None else None
        say(f"  online after {started['start_s']:.0f} s; SuperLink RSS {link_rss:.0f} MB, "
            f"devices {statistics.fmean(devices):.0f} MB PSS each")  # fmt: skip
        idle0 = _cpu_s(link)
        time.sleep(IDLE_S)  # connected, no run: heartbeats and polling only
        idle_cpu = (_cpu_s(link) - idle0) / IDLE_S
        run_dir = root / f"run-{size}"
        cpu0, wall0 = _cpu_s(link), time.monotonic()
        fed.start_run(run_dir, [
            "--rounds", str(rounds), "--round-timeout", "600", "--min-train-nodes", str(size),
            "--set", "fraction-train=1.0", "--set", "fraction-evaluate=0.0",
            "--set", f"min-available-nodes={size}",
        ])  # fmt: skip
        status = fed.wait_finished(f"the run on {size} devices", 900 + 400 * rounds)
        wall = time.monotonic() - wall0
        cpu = _cpu_s(link) - cpu0
        metrics = [m for m in read_metrics(run_dir) if m["server_round"] >= 1]
    seconds = [float(m["seconds"]) for m in metrics]
    result = {
        "nodes": size,
        "status": status.get("status"),
        "start_s": round(started["start_s"], 1),
        "superlink_rss_mb": None if link_rss is None else round(link_rss, 1),
        "server_tree_pss_mb": round(server_pss, 1),
        "zygote": host is not None,
        "zygote_tree_pss_mb": round(shared, 1) if host is not None else None,
        "device_pss_mb_mean": round(statistics.fmean(devices), 1),
        "devices_pss_mb_total": round(sum(devices), 1),
        "round_s_median": round(statistics.median(seconds), 2) if seconds else None,
        "replied_per_round": [m["replied"] for m in metrics],
        "superlink_cpu_s_per_round": round(cpu / max(1, len(metrics)), 2),
        "superlink_idle_cpu_fraction": round(idle_cpu, 4),
        "run_wall_s": round(wall, 1),
    }
    say(f"  {result}")
    return result


def attempt(size: int, rounds: int, root: Path, zygote: bool) -> dict[str, Any]:
    """:func:`measure`, or what went wrong (the other sizes are still reported)."""
    try:
        return measure(size, rounds, root, zygote)
    except FederationError as err:
        say(f"fleet of {size} failed: {err}")
        return {"nodes": size, "status": f"failed: {str(err)[:300]}"}


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``max_nodes``, the SuperLink's slopes per node and the 10,000-node extrapolation of
    the fleets measured (:func:`measure`)."""
    ok = [r for r in runs if r["status"] == "finished:completed"]
    per_node = _slope([r["nodes"] for r in ok], [r["superlink_rss_mb"] or 0.0 for r in ok])
    cpu_per_node = _slope([r["nodes"] for r in ok], [r["superlink_cpu_s_per_round"] for r in ok])
    idle_per_node = _slope([r["nodes"] for r in ok], [r["superlink_idle_cpu_fraction"] for r in ok])
    base = ok[0] if ok else None
    extrapolation = None
    if base is not None and per_node is not None and cpu_per_node is not None:
        extrapolation = {
            "nodes": 10_000,
            "superlink_rss_mb": round(
                base["superlink_rss_mb"] + per_node * (10_000 - base["nodes"])
            ),
            "superlink_cpu_s_per_round": round(
                base["superlink_cpu_s_per_round"] + cpu_per_node * (10_000 - base["nodes"]), 1
            ),
            "superlink_idle_cpu_fraction": None
            if idle_per_node is None
            else round(
                base["superlink_idle_cpu_fraction"] + idle_per_node * (10_000 - base["nodes"]), 2
            ),
            "how": "least-squares slope over the sizes run, from the smallest",
        }
    return {
        "max_nodes": max((r["nodes"] for r in ok), default=0),
        "superlink_rss_mb_per_node": None if per_node is None else round(per_node, 3),
        "superlink_cpu_s_per_round_per_node": None
        if cpu_per_node is None
        else round(cpu_per_node, 4),
        "superlink_idle_cpu_per_node": None if idle_per_node is None else round(idle_per_node, 6),
        "device_pss_mb": ok[-1]["device_pss_mb_mean"] if ok else None,
        "extrapolation_10k": extrapolation,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,25,50")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, default=16.0)
    parser.add_argument(
        "--zygote", action=argparse.BooleanOptionalAction, default=True,
        help="fork every device's warm executor from one zygote (--no-zygote: one each)",
    )  # fmt: skip
    options = parser.parse_args()
    sizes = [int(s) for s in options.sizes.split(",")]
    budget_mb = options.memory_gb * 1024
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pollinate-scale-") as tmp:
        for size in sizes:
            done = [r for r in runs if "device_pss_mb_mean" in r]
            if done:
                last = done[-1]
                need = last["server_tree_pss_mb"] + size * last["device_pss_mb_mean"]
                if need > budget_mb:
                    say(f"fleet of {size}: about {need:.0f} MB, over {budget_mb:.0f}; not run")
                    skipped.append({"nodes": size, "estimated_mb": round(need)})
                    room = budget_mb - last["server_tree_pss_mb"]
                    fits = int(room // (last["device_pss_mb_mean"] * 1.02))  # PSS grows a bit
                    if fits > last["nodes"]:  # the largest fleet that fits, instead
                        runs.append(attempt(fits, options.rounds, Path(tmp), options.zygote))
                    break
            runs.append(attempt(size, options.rounds, Path(tmp), options.zygote))
    result = {
        "benchmark": "scale",
        "memory_budget_gb": options.memory_gb,
        **summary(runs),
        "not_run": skipped,
        "zygote": options.zygote,
        "goal": {"max_nodes": 50},
        "machine": machine(),
    }
    write_json(RESULTS / "scale.json", result)


if __name__ == "__main__":
    main()
