"""``pollinate certs`` and ``pollinate server start|trust|nodes``: a real federation's server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["certs_command", "server_app"]

server_app = typer.Typer(
    help="Run the federation's server: a Flower SuperLink with TLS and SuperNode authentication.",
    no_args_is_help=True,
)


def certs_command(
    out: Annotated[Path, typer.Argument(help="Folder for the CA, server and node keys.")],
    nodes: Annotated[int, typer.Option(help="SuperNode key pairs to make.")] = 2,
    host: Annotated[
        list[str] | None,
        typer.Option(help="Name or IP of the SuperLink (repeat); default localhost, 127.0.0.1."),
    ] = None,
    days: Annotated[int, typer.Option(help="Certificate validity in days.")] = 365,
) -> None:
    """Make a development CA, the SuperLink's TLS certificate and SuperNode key pairs.

    For tests and first steps; production brings its own CA. Private keys are written 0600
    and nothing that exists is overwritten.

    Examples:

      pollinate certs certs --nodes 5

      pollinate certs certs --host superlink.example.org --host 10.0.0.5
    """
    from pollinate.cli import _fail
    from pollinate.errors import PollinateError
    from pollinate.server.certs import make_certificates

    try:
        made = make_certificates(out, nodes=nodes, hosts=host, days=days)
    except PollinateError as err:
        raise _fail(err) from None
    console = Console(soft_wrap=True)
    console.print(f"CA certificate   {made.ca_cert}   (SuperNodes and flwr trust it)")
    console.print(f"SuperLink TLS    {made.server_cert}, {made.server_key}")
    for private, public in zip(made.node_keys, made.node_public_keys, strict=True):
        console.print(f"SuperNode key    {private} (device), {public} (server: --trust)")


@server_app.command("start")
def start_command(
    certs: Annotated[Path, typer.Option(help="Folder with ca.crt, server.pem, server.key.")],
    state_dir: Annotated[
        Path, typer.Option(help="SuperLink database, log and flwr connection live here.")
    ],
    trust: Annotated[
        list[Path] | None,
        typer.Option(help="A SuperNode public key (OpenSSH) to register (repeat)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of Flower's Fleet/Control/Runtime API.")] = 9093,
    address: Annotated[
        str | None, typer.Option(help="How SuperNodes and flwr reach it [HOST:PORT].")
    ] = None,
) -> None:
    """Start a Flower SuperLink with TLS, SuperNode authentication and state on disk.

    Only SuperNodes whose public keys are registered (--trust, or `pollinate server trust`
    later) may connect, over TLS only. The state database in --state-dir keeps runs and
    registered nodes across restarts. Runs until SIGTERM / Ctrl-C.

    Examples:

      pollinate certs certs --nodes 2

      pollinate server start --certs certs --state-dir state --trust certs/nodes/node-0.pub

    When ready it prints the flower-supernode command line a device runs.
    """
    from pollinate.cli import _fail
    from pollinate.errors import PollinateError
    from pollinate.server.superlink import SuperLinkSettings, run_superlink

    console = Console(stderr=True, soft_wrap=True)

    def ready(settings: SuperLinkSettings) -> None:
        console.print(
            f"SuperLink ready at {settings.reach} (TLS, SuperNode authentication); "
            f"state in {settings.state_dir}. SuperNodes connect with:\n"
            f"  flower-supernode --superlink {settings.reach} --root-certificates {settings.ca} "
            "--auth-supernode-private-key KEY"
        )

    try:
        settings = SuperLinkSettings(
            certs=certs, state_dir=state_dir, host=host, port=port, address=address
        )
        code = run_superlink(settings, list(trust or []), on_ready=ready)
    except PollinateError as err:
        raise _fail(err) from None
    raise typer.Exit(code=0 if code in (0, -15) else code)


@server_app.command("trust")
def trust_command(
    public_key: Annotated[Path, typer.Argument(help="SuperNode public key (OpenSSH format).")],
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
) -> None:
    """Register one more SuperNode public key with the running SuperLink."""
    from pollinate.cli import _fail
    from pollinate.errors import PollinateError
    from pollinate.server.superlink import trust_node

    try:
        node_id = trust_node(state_dir, public_key)
    except PollinateError as err:
        raise _fail(err) from None
    Console().print(f"trusted {public_key}: node {node_id}")


@server_app.command("nodes")
def nodes_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the registered SuperNodes and whether they are online."""
    from pollinate.cli import _fail
    from pollinate.errors import PollinateError
    from pollinate.server.superlink import list_nodes

    try:
        nodes = list_nodes(state_dir)
    except PollinateError as err:
        raise _fail(err) from None
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    console = Console(soft_wrap=True)
    for node in nodes:
        console.print(f"{node['node-id']}  {node['status']:<10}  online since {node['online-at']}")
