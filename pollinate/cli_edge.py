"""``pollinate edge run`` (the device daemon) and ``pollinate edge status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["run_command", "status_command"]


def run_command(
    superlink: Annotated[str, typer.Option(help="HOST:PORT of the federation's SuperLink.")],
    root_certificates: Annotated[Path, typer.Option(help="The federation's CA certificate.")],
    key: Annotated[Path, typer.Option(help="This device's private key (OpenSSH, from certs).")],
    state_dir: Annotated[
        Path, typer.Option(help="Where the device keeps its accountant, logs and status.")
    ],
    data: Annotated[
        Path | None, typer.Option(help="This device's data: .npz, .csv or an image folder.")
    ] = None,
    partition_id: Annotated[
        int | None, typer.Option(help="Demo: train on this slice of the built-in data.")
    ] = None,
    num_partitions: Annotated[int | None, typer.Option(help="Demo: slices in all.")] = None,
    epsilon_budget: Annotated[
        float | None, typer.Option(help="This device's own epsilon budget (the stricter wins).")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads training may use.")] = 1,
    window: Annotated[
        str | None, typer.Option(help="Train only between HH:MM-HH:MM (local time).")
    ] = None,
) -> None:
    """Run this device's federated-learning daemon: a supervised Flower SuperNode.

    It connects to the SuperLink over TLS with this device's key, trains the pollinate
    ClientApp on this device's data when the server asks, keeps its privacy accountant in
    --state-dir (a restart never resets epsilon), restarts the SuperNode with back-off when
    it exits, and stops cleanly on SIGTERM. Logs are JSON lines on stderr.

    Examples:

      pollinate edge run --superlink 10.0.0.5:9093 --root-certificates ca.crt \\
        --key node-0 --state-dir state --data my-data.npz

      pollinate edge run --superlink 127.0.0.1:9093 --root-certificates certs/ca.crt \\
        --key certs/nodes/node-1 --state-dir dev1 --partition-id 1 --num-partitions 5 \\
        --window 22:00-06:00
    """
    from pollinate.cli import _fail
    from pollinate.client.daemon import DaemonSettings, EdgeDaemon, parse_window
    from pollinate.errors import PollinateError
    from pollinate.log import log_to_stderr

    log_to_stderr()
    try:
        settings = DaemonSettings(
            superlink=superlink, root_certificates=root_certificates, key=key,
            state_dir=state_dir, data=data, partition_id=partition_id,
            num_partitions=num_partitions, epsilon_budget=epsilon_budget, threads=threads,
            window=parse_window(window) if window else None,
        )  # fmt: skip
        code = EdgeDaemon(settings).run()
    except PollinateError as err:
        raise _fail(err) from None
    raise typer.Exit(code=code)


def status_command(
    state_dir: Annotated[Path, typer.Option(help="The daemon's --state-dir.")],
    delta: Annotated[float, typer.Option(help="Delta for the epsilon shown.")] = 1e-5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the daemon's state, epsilon spent and budget left, from its state directory."""
    from pollinate.cli import _fail
    from pollinate.client.daemon import read_status
    from pollinate.errors import PollinateError
    from pollinate.privacy import ClientAccountant

    status: dict[str, Any] = read_status(state_dir)
    if not status and not list(Path(state_dir).glob("*.accountant.json")):
        raise _fail(PollinateError(f"{state_dir} holds no daemon state; is it the --state-dir?"))
    budget_text = status.get("settings", {}).get("epsilon_budget")
    budget = float(budget_text) if budget_text else None
    clients = []
    try:
        for path in sorted(Path(state_dir).glob("*.accountant.json")):
            acc = ClientAccountant.load(path)
            spent = acc.epsilon(delta) if acc.total_steps else 0.0
            clients.append({
                "client": path.name.removesuffix(".accountant.json"),
                "epsilon": spent,
                "budget": budget,
                "budget_left": None if budget is None else max(0.0, budget - spent),
                "steps": acc.total_steps,
                "last_trained": path.stat().st_mtime,
            })  # fmt: skip
    except PollinateError as err:
        raise _fail(err) from None
    report = {
        "state": status.get("state", "unknown"),
        "restarts": status.get("restarts", 0),
        "last_exit": status.get("last_exit"),
        "updated": status.get("updated"),
        "delta": delta,
        "clients": clients,
        "bundle": None,  # bundle delivery to devices is not built yet
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console(soft_wrap=True)
    console.print(
        f"daemon: {report['state']} (restarts {report['restarts']}, updated {report['updated']})"
    )
    if not clients:
        console.print("no training yet: epsilon spent 0")
    for c in clients:
        left = (
            "no budget set"
            if c["budget"] is None
            else f"{c['budget_left']:.3f} of {c['budget']:.3f} left"
        )
        console.print(
            f"client {c['client']}: epsilon {c['epsilon']:.3f} at delta {delta:g} ({left})"
        )
