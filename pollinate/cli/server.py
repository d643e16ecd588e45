"""``pollinate certs`` and ``pollinate server start|trust|nodes``: a real federation's server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pollinate.cli._common import CommandGroup
from pollinate.cli.console import make_console

__all__ = ["certs_command", "server_app"]

server_app = CommandGroup(
    help="Run the federation's server: a Flower SuperLink with TLS and SuperNode "
    "authentication, and training runs on it.",
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
    from pollinate.ops.certs import make_certificates

    made = make_certificates(out, nodes=nodes, hosts=host, days=days)
    console = make_console(soft_wrap=True)
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
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Port for the runs' Prometheus metrics (/metrics); off if unset."),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics endpoint listens on.")
    ] = "127.0.0.1",
) -> None:
    """Start a Flower SuperLink with TLS, SuperNode authentication and state on disk.

    Only SuperNodes whose public keys are registered (--trust, or `pollinate server trust`
    later) may connect, over TLS only. The state database in --state-dir keeps runs and
    registered nodes across restarts. ServerApps run under a flower-superexec that this
    command supervises (started again if it dies). Runs until SIGTERM / Ctrl-C.

    Examples:

      pollinate certs certs --nodes 2

      pollinate server start --certs certs --state-dir state --trust certs/nodes/node-0.pub

      pollinate server start --certs certs --state-dir state --metrics-port 9464

    When ready it prints the flower-supernode command line a device runs. With --metrics-port
    it also serves every run's round, clients sampled / replied / declined / rejected /
    failed, round duration, accuracy, loss and epsilon for Prometheus on /metrics.
    """
    from pollinate.errors import ConfigError
    from pollinate.ops.superlink import SuperLinkSettings, run_superlink

    console = make_console(stderr=True, soft_wrap=True)
    metrics_note = ""

    def ready(settings: SuperLinkSettings) -> None:
        console.print(
            f"SuperLink ready at {settings.reach} (TLS, SuperNode authentication); "
            f"state in {settings.state_dir}.{metrics_note} SuperNodes connect with:\n"
            f"  flower-supernode --superlink {settings.reach} --root-certificates {settings.ca} "
            "--auth-supernode-private-key KEY"
        )

    exporter = None
    try:
        settings = SuperLinkSettings(
            certs=certs, state_dir=state_dir, host=host, port=port, address=address
        )
        if metrics_port is not None:
            try:
                from pollinate.ops.fed_metrics import serve_federation_metrics
            except ImportError as err:
                raise ConfigError(
                    f"--metrics-port needs prometheus_client ({err}); "
                    'pip install "pollinate[serve]"'
                ) from err
            exporter = serve_federation_metrics(state_dir, metrics_host, metrics_port)
            shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
            metrics_note = f" Metrics at http://{shown}:{exporter[0].server_port}/metrics."
        code = run_superlink(settings, list(trust or []), on_ready=ready)
    finally:
        if exporter is not None:
            exporter[0].shutdown()
            exporter[0].server_close()
            exporter[1].join(timeout=5)
    raise typer.Exit(code=0 if code in (0, -15) else code)


@server_app.command("trust")
def trust_command(
    public_key: Annotated[Path, typer.Argument(help="SuperNode public key (OpenSSH format).")],
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
) -> None:
    """Register one more SuperNode public key with the running SuperLink."""
    from pollinate.ops.superlink import SuperLinkError, trust_node

    node_id = trust_node(state_dir, public_key)
    if node_id is None:
        raise SuperLinkError(f"{public_key} is already registered")
    make_console().print(f"trusted {public_key}: node {node_id}")


@server_app.command("nodes")
def nodes_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the registered SuperNodes and whether they are online."""
    from pollinate.ops.superlink import list_nodes

    nodes = list_nodes(state_dir)
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    console = make_console(soft_wrap=True)
    for node in nodes:
        console.print(f"{node['node-id']}  {node['status']:<10}  online since {node['online-at']}")
