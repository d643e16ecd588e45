"""``pollinate edge run`` (the device daemon) and ``pollinate edge status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pollinate.cli.console import make_console

__all__ = ["rollback_command", "run_command", "status_command"]


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
    bundle_public_key: Annotated[
        Path | None,
        typer.Option(help="The exporter's ed25519 public key: delivered bundles must be signed."),
    ] = None,
    serve_port: Annotated[
        int | None, typer.Option(help="Answer local inference requests on this port.")
    ] = None,
    serve_host: Annotated[str, typer.Option(help="Address for --serve-port.")] = "127.0.0.1",
    dp: Annotated[
        str,
        typer.Option(
            help="This device's DP policy: sample (train only with DP-SGD) or none (allow "
            "training without DP)."
        ),
    ] = "sample",
    min_noise_multiplier: Annotated[
        float,
        typer.Option(help="Refuse tasks with a DP noise multiplier below this (0 = any > 0)."),
    ] = 0.0,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="Refuse tasks with a larger DP-SGD clipping norm.")
    ] = None,
    max_local_epochs: Annotated[
        int | None, typer.Option(help="Refuse tasks with more local epochs per round.")
    ] = None,
    start_new_ledger: Annotated[
        bool,
        typer.Option(
            "--start-new-ledger",
            help="Only when this device's privacy ledger is missing or corrupt: start a new, "
            "empty one (the lost epsilon history is forgotten; the old file is kept aside).",
        ),
    ] = False,
) -> None:
    """Run this device's federated-learning daemon: a supervised Flower SuperNode.

    It connects to the SuperLink over TLS with this device's key, trains the pollinate
    ClientApp on this device's data when the server asks, keeps its privacy accountant in
    --state-dir (a restart never resets epsilon), restarts the SuperNode with back-off when
    it exits, and stops cleanly on SIGTERM. Its privacy policy (--dp, --min-noise-multiplier,
    --max-grad-norm, --max-local-epochs, --epsilon-budget) is its own: a task asking for weaker
    privacy is refused and counted. A missing or corrupt ledger stops it (exit 11) until
    --start-new-ledger; a spent budget stops it (exit 4). Logs are JSON lines on stderr.
    Model bundles the server delivers are verified and installed into --state-dir/bundles (the
    previous one kept for `pollinate edge rollback`); --serve-port answers POST /v1/predict
    from the installed one.

    Examples:

      pollinate edge run --superlink 10.0.0.5:9093 --root-certificates ca.crt \\
        --key node-0 --state-dir state --data my-data.npz \\
        --epsilon-budget 8 --min-noise-multiplier 0.8 --max-local-epochs 2

      pollinate edge run --superlink 127.0.0.1:9093 --root-certificates certs/ca.crt \\
        --key certs/nodes/node-1 --state-dir dev1 --partition-id 1 --num-partitions 5 \\
        --window 22:00-06:00 --bundle-public-key export.pub --serve-port 8765

      curl -d '{"inputs": [[0.0, ...]]}' http://127.0.0.1:8765/v1/predict
    """
    from pollinate.cli.main import _fail
    from pollinate.device.daemon import DaemonSettings, EdgeDaemon, parse_window
    from pollinate.errors import PollinateError
    from pollinate.log import log_to_stderr

    log_to_stderr()
    try:
        settings = DaemonSettings(
            superlink=superlink, root_certificates=root_certificates, key=key,
            state_dir=state_dir, data=data, partition_id=partition_id,
            num_partitions=num_partitions, epsilon_budget=epsilon_budget, threads=threads,
            window=parse_window(window) if window else None,
            bundle_public_key=bundle_public_key, serve_port=serve_port, serve_host=serve_host,
            dp=dp, min_noise_multiplier=min_noise_multiplier, max_grad_norm=max_grad_norm,
            max_local_epochs=max_local_epochs, start_new_ledger=start_new_ledger,
        )  # fmt: skip
        code = EdgeDaemon(settings).run()
    except PollinateError as err:
        raise _fail(err) from None
    raise typer.Exit(code=code)


def status_command(
    state_dir: Annotated[Path, typer.Option(help="The daemon's --state-dir.")],
    delta: Annotated[float, typer.Option(help="Delta for the epsilon shown.")] = 1e-5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Health check: exit 0 when the daemon is alive and running (or waiting for its "
            "training window), else print why on stderr and exit 1.",
        ),
    ] = False,
) -> None:
    """Show the daemon's state, epsilon spent and budget left, from its state directory.

    With --check it is a health check (a container HEALTHCHECK, a probe): one line, fast.

    Examples:

      pollinate edge status --state-dir state

      pollinate edge status --state-dir /state --check
    """
    import os

    from pollinate.cli.main import _fail
    from pollinate.device.daemon import STATUS_FILE, read_status
    from pollinate.errors import PollinateError

    status: dict[str, Any] = read_status(state_dir)
    if check:
        state, pid = status.get("state"), status.get("pid")
        problem = None
        if not status:
            problem = (
                f"{Path(state_dir) / STATUS_FILE} is missing or unreadable; "
                f"is {state_dir} the daemon's --state-dir?"
            )
        elif state not in ("running", "waiting for the training window"):
            problem = f"the daemon is {state!r}, not running or waiting for its training window"
        elif not isinstance(pid, int) or pid <= 0:
            problem = f"{Path(state_dir) / STATUS_FILE} records no daemon pid"
        else:
            try:
                os.kill(pid, 0)
            except (ProcessLookupError, OverflowError):
                problem = f"the daemon (pid {pid}) is not alive, although it last said {state!r}"
            except PermissionError:
                pass  # alive, but another user's process
        if problem is not None:
            typer.echo(f"unhealthy: {problem}", err=True)
            raise typer.Exit(code=1)
        typer.echo(f"healthy: daemon {state} (pid {pid})")
        return

    from pollinate.clientapp.policy import DeviceLedger
    from pollinate.privacy import ClientAccountant

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
    from pollinate.device.bundles import BundleStore
    from pollinate.edge_runtime import BundleError

    try:
        bundle = BundleStore(state_dir).describe()
    except BundleError as err:
        raise _fail(PollinateError(str(err))) from None
    report = {
        "state": status.get("state", "unknown"),
        "restarts": status.get("restarts", 0),
        "last_exit": status.get("last_exit"),
        "updated": status.get("updated"),
        "delta": delta,
        "clients": clients,
        "bundle": bundle,
        "serving": status.get("serving"),
        "last_round": _last_round(state_dir),
        "refusals": DeviceLedger(Path(state_dir)).refusals(),
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = make_console(soft_wrap=True)
    console.print(
        f"daemon: {report['state']} (restarts {report['restarts']}, updated {report['updated']})"
    )
    if bundle is None:
        console.print("bundle: none installed yet")
    else:
        console.print(
            f"bundle: {bundle['name']} (model {bundle['model']} {bundle['version']}, installed "
            f"{bundle['installed']}; previous {bundle['previous']})"
        )
    last = report["last_round"]
    if last:
        what = "declined" if last.get("declined") else "trained"
        console.print(
            f"last round: {what} round {last.get('server_round')} of run {last.get('run_id')} "
            f"at {last.get('at')}"
        )
    refusals = report["refusals"]
    if refusals:
        last_refusal = refusals.get("last") or {}
        console.print(
            f"refused {refusals.get('total', 0)} task(s) asking for weaker privacy than this "
            f"device allows; last: {last_refusal.get('reason')}"
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


def _last_round(state_dir: Path) -> dict[str, Any] | None:
    """The ClientApp's note of the last round asked of this device (last-round.json)."""
    try:
        note = json.loads((Path(state_dir) / "last-round.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def rollback_command(
    state_dir: Annotated[Path, typer.Option(help="The daemon's --state-dir.")],
) -> None:
    """Put the previously installed bundle back in service (local inference follows at once).

    Example:

      pollinate edge rollback --state-dir state
    """
    from pollinate.cli.main import _fail
    from pollinate.device.bundles import BundleStore
    from pollinate.edge_runtime import BundleError
    from pollinate.errors import PollinateError

    try:
        name = BundleStore(state_dir).rollback()
    except BundleError as err:
        raise _fail(PollinateError(str(err))) from None
    make_console().print(f"bundle {name} is in service again")
