"""Run a simulation through Flower's simulation engine (Ray backend), in this process.

The same ServerApp and ClientApp as ``flwr run .``: only the settings come from the caller
instead of the run config.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import RunSettings
from pollinate.errors import PollinateError
from pollinate.server.federation import RunResult, run_federation

__all__ = ["SimulationOptions", "simulate"]


@dataclass(frozen=True)
class SimulationOptions:
    """How the simulation engine runs the clients."""

    num_clients: int = 1000
    cpus_per_client: float = 1.0
    num_cpus: int | None = None
    verbose: bool = False
    object_store_mb: int = 256
    extra_env: dict[str, str] = field(default_factory=dict)


def _quiet_flower() -> None:
    """Flower logs every sampling step at INFO on its own handler; keep errors only."""
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False
    for handler in flwr_logger.handlers:
        handler.setLevel(logging.ERROR)


def simulate(settings: RunSettings, options: SimulationOptions) -> RunResult:
    """Run ``settings`` on ``options.num_clients`` virtual SuperNodes; return the result."""
    from flwr.simulation import run_simulation

    from pollinate.client.app import app as client_app

    if options.num_clients < 1:
        raise PollinateError(f"--num-clients must be at least 1, got {options.num_clients}")
    # Sample only once every simulated node is registered.
    settings = settings.replace(
        min_available_nodes=max(settings.min_available_nodes, options.num_clients)
    )
    outcome: dict[str, object] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["result"] = run_federation(grid, settings)
        except BaseException as err:
            outcome["error"] = err
            raise

    if not options.verbose:
        _quiet_flower()
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
