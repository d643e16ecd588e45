"""Run the reference app in Flower's simulation engine (Ray backend), as `flwr run` would.

Usage (from the repository root):
    python benchmarks/reference_flower_app/run.py --num-supernodes 1000 --rounds 5 \
        --timings /tmp/refapp-timings.jsonl

`flwr.simulation.run_simulation` gives the apps an empty run config, so the apps fall back
to the pyproject defaults (refapp.task.DEFAULT_CONFIG); the number of rounds is set here by
wrapping the ServerApp's main function.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
REPO = APP_DIR.parent.parent
for _path in (str(APP_DIR), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
# The simulation's Ray workers start from this process' environment: let them import
# refapp and pollinate too.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(APP_DIR), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
)

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from refapp import server_app  # noqa: E402
from refapp.client_app import app as client_app  # noqa: E402


def build_server_app(rounds: int) -> ServerApp:
    """refapp's ServerApp with ``num-server-rounds`` set in its run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config["num-server-rounds"] = rounds
        server_app.main(grid, context)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-supernodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--model",
        default="opacus-mnist",
        help="opacus-mnist (default) or a pollinate built-in: cnn, resnet, ...",
    )
    parser.add_argument(
        "--client-cpus",
        type=float,
        default=2.0,
        help="CPUs per ClientApp: 2 is Flower's default (what the example gets); 1 runs one "
        "ClientApp per core",
    )
    parser.add_argument(
        "--timings", type=Path, default=None, help="append one JSON line per evaluation here"
    )
    args = parser.parse_args()
    os.environ["REFAPP_MODEL"] = args.model
    if args.timings is not None:
        os.environ[server_app.TIMINGS_ENV] = str(args.timings.resolve())

    run_simulation(
        server_app=build_server_app(args.rounds),
        client_app=client_app,
        num_supernodes=args.num_supernodes,
        backend_config={
            "client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )


if __name__ == "__main__":
    main()
