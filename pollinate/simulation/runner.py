"""Run a simulation in this process, on one of two engines.

- ``fast`` (default): the in-process :class:`~pollinate.simulation.local_grid.LocalGrid`,
  which trains each round's cohort at once. One process, no Ray.
- ``ray``: Flower's simulation engine (Ray backend), one ClientApp call per client; the
  engine to use on a Ray cluster.

Both run the same ServerApp logic (:func:`~pollinate.serverapp.federation.run_federation`) and
the ClientApp's own per-client steps; only the settings come from the caller instead of the
run config.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import RunSettings
from pollinate.errors import ConfigError, PollinateError
from pollinate.serverapp.federation import RunResult, run_federation

__all__ = ["Engine", "SimulationOptions", "simulate"]


class Engine(StrEnum):
    """Which simulation engine runs the clients; values are the CLI strings."""

    FAST = "fast"
    RAY = "ray"


@dataclass(frozen=True)
class SimulationOptions:
    """How the simulation engine runs the clients."""

    num_clients: int = 1000
    engine: Engine = Engine.FAST
    cpus_per_client: float = 1.0
    num_cpus: int | None = None
    verbose: bool = False
    object_store_mb: int = 256
    extra_env: dict[str, str] = field(default_factory=dict)


def _journal_to_files(folder: Path) -> None:
    """Before the Ray engine resumes a run the fast engine began: one accountant file each.

    The ClientApp under Ray restores a client's accountant from its own file; the fast
    engine journals them all in one file. Every client whose journal history is longer than
    its file gets the journal's, so no epsilon goes backwards across an engine switch.
    """
    from pollinate.privacy import ClientAccountant
    from pollinate.simulation.local_grid import JOURNAL_NAME, read_journal

    journal = read_journal(folder / JOURNAL_NAME)
    for key, record in journal.items():
        accountant = ClientAccountant.from_record(record)
        own = folder / f"{key}.accountant.json"
        if own.exists() and ClientAccountant.load(own).total_steps >= accountant.total_steps:
            continue
        accountant.save(own)


def _quiet_flower() -> None:
    """Flower logs every sampling step at INFO on its own handler; keep errors only."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    for handler in flwr_logger.handlers:
        handler.setLevel(logging.ERROR)


def simulate(settings: RunSettings, options: SimulationOptions) -> RunResult:
    """Run ``settings`` on ``options.num_clients`` virtual SuperNodes; return the result."""
    if options.num_clients < 1:
        raise PollinateError(f"--num-clients must be at least 1, got {options.num_clients}")
    # Sample only once every simulated node is registered.
    settings = settings.replace(
        min_available_nodes=max(settings.min_available_nodes, options.num_clients)
    )
    if not options.verbose:
        _quiet_flower()
    if options.engine == Engine.FAST:
        return _simulate_fast(settings, options)
    return _simulate_ray(settings, options)


def _simulate_fast(settings: RunSettings, options: SimulationOptions) -> RunResult:
    from pollinate._flower import quick_record_items
    from pollinate.simulation._runtime import keep_freed_memory
    from pollinate.simulation.latency import LatencyModel
    from pollinate.simulation.local_grid import LocalGrid

    keep_freed_memory()
    quick_record_items()  # a round builds and reads thousands of Flower records
    threads = options.num_cpus or os.cpu_count() or 1
    latency = LatencyModel.from_settings(settings)
    grid = LocalGrid(options.num_clients, threads=threads, freeze_gc=True, latency=latency)
    # What start-up made (torch, Flower, the data: hundreds of thousands of objects) is never
    # cyclic garbage; frozen, the cyclic collector stops walking it in every full collection
    # (up to 160 ms each, every few rounds, measured). The grid freezes again after its first
    # round (what torch.func may have imported); unfrozen when the run ends.
    gc.freeze()
    try:
        return run_federation(grid, settings, threads=threads)
    finally:
        gc.unfreeze()


def _simulate_ray(settings: RunSettings, options: SimulationOptions) -> RunResult:
    from flwr.simulation import run_simulation

    from pollinate.clientapp.app import app as client_app
    from pollinate.simulation.latency import LatencyModel

    if LatencyModel.from_settings(settings).enabled:
        raise ConfigError(
            "the latency model (latency-median-s, dropout) runs on the fast engine only; "
            "drop --engine ray or set latency-median-s = 0 and dropout = 0"
        )
    if settings.resume and settings.run_dir:
        _journal_to_files(Path(settings.run_dir) / "clients")

    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = run_federation(grid, settings)
        except BaseException as err:
            outcome["error"] = err
            raise

    # Each client process uses one intra-op thread: on few cores, more threads only fight.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    num_cpus = options.num_cpus or os.cpu_count() or 1
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=options.num_clients,
        backend_config={
            "client_resources": {"num_cpus": options.cpus_per_client, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": num_cpus,
                "include_dashboard": False,
                "object_store_memory": options.object_store_mb * 1024 * 1024,
            },
        },
        verbose_logging=options.verbose,
    )
    if "error" in outcome:
        err = outcome["error"]
        assert isinstance(err, BaseException)
        raise err
    result = outcome.get("result")
    if not isinstance(result, RunResult):
        raise PollinateError("the simulation ended before the ServerApp finished; see the log")
    return result
