"""The pollinate ServerApp: what ``flwr run .`` and ``pollinate simulate`` start."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pollinate.config import RunSettings
from pollinate.serverapp.federation import run_federation

__all__ = ["app", "make_server_app"]


def make_server_app(settings: RunSettings | None = None) -> ServerApp:
    """A ServerApp that runs ``settings``, or the run config Flower passes in when ``None``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        chosen = settings or RunSettings.from_run_config(context.run_config)
        if not chosen.run_dir:
            chosen = chosen.replace(run_dir=f"runs/run-{context.run_id}")
        run_federation(grid, chosen)

    return server_app


app = make_server_app()
