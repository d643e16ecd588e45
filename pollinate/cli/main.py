"""The ``pollinate`` command: one Typer app, one module per command group.

Every error a user can cause ends in one line and a documented exit code, never a traceback:
the commands raise, :mod:`pollinate.cli._common` maps the exception tree to the codes of
:data:`pollinate.errors.EXIT_MEANINGS` once, and ``pollinate exit-codes`` prints them.
"""

from __future__ import annotations

import sys

from pollinate.cli import edge, edge_status, export, new, registry, runs, serve, server, simulate
from pollinate.cli._common import CommandGroup
from pollinate.cli.console import is_plain, make_console, print_click_error, print_error
from pollinate.errors import EXIT_MEANINGS

__all__ = ["app", "main"]

app = CommandGroup(
    name="pollinate",
    help="Federated learning with differential privacy on edge devices, built on Flower.",
)

app.command("new")(new.new_command)
app.command("simulate")(simulate.simulate_command)
app.command("report")(simulate.report_command)
app.command("export")(export.export_command)
app.command("keygen")(export.keygen_command)
app.add_typer(serve.serve_app, name="serve")
app.add_typer(registry.registry_app, name="registry")
app.command("certs")(server.certs_command)
app.add_typer(server.server_app, name="server")
runs.register(server.server_app)
app.add_typer(edge.edge_app, name="edge")
edge_status.register(edge.edge_app)


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes of the pollinate command (the same for every command)."""
    for code, meaning in EXIT_MEANINGS.items():
        make_console().print(f"{int(code)}  {meaning}")


@app.command()
def version() -> None:
    """Print the pollinate version."""
    from pollinate import __version__

    make_console().print(__version__)


def main() -> None:
    """Entry point of the ``pollinate`` console script."""
    if not is_plain(sys.stderr):
        app()
        return
    # Off a terminal, click's usage errors (bad option, missing argument) are one line as well:
    # Typer's rich panel would wrap them at 80 columns. The same exit codes as Typer's.
    import click

    try:
        code = app(standalone_mode=False)
    except click.ClickException as err:
        if type(err).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            print_click_error(err)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        print_error("aborted")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
