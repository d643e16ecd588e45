"""``pollinate edge status``: the daemon's state, epsilon spent and budget left, from its
state directory; with ``--check``, a one-line health check for probes and HEALTHCHECKs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pollinate.cli.console import make_console

__all__ = ["register"]


def register(group: typer.Typer) -> None:
    """Add ``status`` to the ``edge`` group."""
    group.command("status")(status_command)


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

    from pollinate.device.daemon import STATUS_FILE, read_status
    from pollinate.errors import ConfigError

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

    from pollinate.device.ledger import DeviceLedger
    from pollinate.privacy import ClientAccountant

    if not status and not list(Path(state_dir).glob("*.accountant.json")):
        raise ConfigError(f"{state_dir} holds no daemon state; is it the --state-dir?")
    budget_text = status.get("settings", {}).get("epsilon_budget")
    budget = float(budget_text) if budget_text else None
    clients = []
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
    from pollinate.device.bundles import BundleStore

    bundle = BundleStore(state_dir).describe()
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
            f"refused {refusals.get('total', 0)} task(s) asking for more than this device "
            f"allows; last: {last_refusal.get('reason')}"
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
