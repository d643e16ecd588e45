"""``pollinate registry list | promote | rollback``: exported models in MLflow's registry.

Every ``pollinate export`` (and every run's end-of-run export) with a tracking URI registers
its bundle as a new version of a registered model named after the model, with the alias
``candidate``; these commands move ``staging`` and ``production`` along.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pollinate.cli._common import CommandGroup
from pollinate.cli.console import make_console
from pollinate.errors import ConfigError

__all__ = ["registry_app"]

registry_app = CommandGroup(
    help="Exported models in the MLflow model registry: list, promote, roll back."
)

TrackingUri = Annotated[
    str,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="The MLflow tracking server or store (e.g. http://127.0.0.1:5000, "
        "sqlite:///mlflow.db) [$MLFLOW_TRACKING_URI].",
        show_default=False,
    ),
]


def _uri(value: str) -> str:
    if not value:
        raise ConfigError(
            "no tracking URI: pass --tracking-uri http://HOST:5000 (or sqlite:///mlflow.db) "
            "or set MLFLOW_TRACKING_URI"
        )
    return value


@registry_app.command("list")
def list_command(
    model: Annotated[str, typer.Argument(help="The registered model (the exported model's name).")],
    tracking_uri: TrackingUri = "",
) -> None:
    """List the versions of a registered model with their aliases and lineage.

    Example:

      pollinate registry list cnn --tracking-uri http://127.0.0.1:5000
    """
    from pollinate.rundir.model_registry import list_versions

    rows = list_versions(_uri(tracking_uri), model)
    table = Table(title=f"{model} ({tracking_uri})")
    for col in ("version", "aliases", "run", "round", "accuracy", "epsilon", "validation"):
        table.add_column(col)
    for row in rows:
        tag = row.tags.get
        table.add_row(
            row.version, ",".join(row.aliases), tag("pollinate.run", ""),
            tag("pollinate.round", ""), tag("pollinate.accuracy", ""),
            tag("pollinate.epsilon", ""), tag("pollinate.validation", ""),
        )  # fmt: skip
    make_console(min_width=120).print(table)


@registry_app.command("promote")
def promote_command(
    model: Annotated[str, typer.Argument(help="The registered model.")],
    version: Annotated[
        str | None,
        typer.Argument(help="The version [the one of the alias below: candidate, staging]."),
    ] = None,
    to: Annotated[str, typer.Option(help="The alias to move: staging or production.")] = "staging",
    tracking_uri: TrackingUri = "",
) -> None:
    """Point ``staging`` or ``production`` at a version; one that failed its export validation
    is refused.

    Examples:

      pollinate registry promote cnn                      # candidate -> staging

      pollinate registry promote cnn --to production      # staging -> production

      pollinate registry promote cnn 7 --to production
    """
    from pollinate.rundir.model_registry import promote

    chosen = promote(_uri(tracking_uri), model, version, to)
    make_console().print(f"{model}: {to} -> version {chosen}")


@registry_app.command("rollback")
def rollback_command(
    model: Annotated[str, typer.Argument(help="The registered model.")],
    tracking_uri: TrackingUri = "",
) -> None:
    """Point ``production`` back at the version it held before the last promotion.

    Example:

      pollinate registry rollback cnn
    """
    from pollinate.rundir.model_registry import rollback

    chosen = rollback(_uri(tracking_uri), model)
    make_console().print(f"{model}: production -> version {chosen}")


@registry_app.command("sync")
def sync_command(
    model: Annotated[str, typer.Argument(help="The registered model.")],
    repository: Annotated[
        Path, typer.Option(help="The Triton-layout repository `pollinate serve` watches.")
    ],
    name: Annotated[
        str | None, typer.Option(help="The model's name in the repository [MODEL].")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep following the aliases.")] = False,
    interval: Annotated[
        float, typer.Option(help="With --watch: seconds between looks.", min=0.5)
    ] = 10.0,
    tracking_uri: TrackingUri = "",
) -> None:
    """Write the ``production`` and ``staging`` versions into a serving repository.

    ``production`` becomes the served version; a newer ``staging`` version is the canary
    `pollinate serve` rolls out (and rolls back by itself if it does worse).

    Examples:

      pollinate registry sync cnn --repository models

      pollinate registry sync cnn --repository models --watch &  pollinate serve --repository models
    """
    from pollinate.ops.registry_sync import sync_once
    from pollinate.ops.registry_sync import watch as follow

    uri = _uri(tracking_uri)
    console = make_console()

    def report(versions: list[int]) -> None:
        for version in versions:
            console.print(f"{model}: version {version} -> {repository / (name or model)}")

    if watch:
        follow(uri, model, repository, name=name, interval=interval, on_written=report)
    else:
        report(sync_once(uri, model, repository, name))
