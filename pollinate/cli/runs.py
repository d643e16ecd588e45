"""``pollinate server run|status|logs|stop|resume|pull``: training runs on a federation.

The runs are Flower runs of the pollinate App on the SuperLink that ``pollinate server start``
supervises; :mod:`pollinate.ops.runs` drives them through ``flwr run/ls/log/stop``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pollinate.cli._common import parse_sets
from pollinate.cli.console import make_console
from pollinate.errors import ExitCode

__all__ = ["register"]


def register(group: typer.Typer) -> None:
    """Add the run commands to the ``server`` group."""
    group.command("run")(run_command)
    group.command("status")(status_command)
    group.command("stop")(stop_command)
    group.command("logs")(logs_command)
    group.command("resume")(resume_command)
    group.command("pull")(pull_command)


def run_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", help="Server rounds.")] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="fedavg, fedavgm, fedprox, fedadam, fedyogi or fedbuff (async)."),
    ] = None,
    epsilon_budget: Annotated[
        float | None, typer.Option(help="Per-client sample-level epsilon budget.")
    ] = None,
    round_timeout: Annotated[
        float | None, typer.Option(help="Seconds a round waits for replies.")
    ] = None,
    min_train_nodes: Annotated[
        int | None, typer.Option(help="Fewest replies a round needs.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory on the server [STATE/runs/TIME].")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any run-config key=value (see `pollinate simulate --help`)."),
    ] = None,
    app: Annotated[Path | None, typer.Option(help="pollinate's project folder (the App).")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI",
            show_default=False,
            help="Log the run to MLflow (as the ServerApp sees it), or 'off' "
            "[$MLFLOW_TRACKING_URI; else ./mlflow.db of the ServerApp when mlflow is installed].",
        ),
    ] = None,
    trigger_dir: Annotated[
        Path | None,
        typer.Option(help="Start only for the retrain events `pollinate serve` wrote here."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="With --trigger-dir: block until an event comes.")
    ] = False,
    poll_interval: Annotated[
        float, typer.Option(help="With --wait: seconds between looks.", min=0.1)
    ] = 5.0,
) -> None:
    """Start a training run on the federation; prints its run id.

    The same settings as `pollinate simulate` (rounds, strategy, DP, budget, timeouts); the
    ServerApp runs on the server and writes its run directory there. Follow it with
    `pollinate server status`, stop it with `pollinate server stop RUN_ID`.

    With --trigger-dir, the run answers the serving tier's drift events: every pending
    `retrain-*.json` is moved to TRIGGER_DIR/consumed/ and stamped with the run id; with none
    pending (or while the previous run still runs) nothing starts, and --wait waits for one.
    With --set export-triton-repo=MODELS the retrained model is published there as a new
    version, which `pollinate serve` takes as a canary. See docs/serving.md.

    Examples:

      pollinate server run --state-dir state --rounds 10 --round-timeout 120 --min-train-nodes 3

      pollinate server run --state-dir state --set client-dp=server-fixed \\
        --set client-dp-target-epsilon=4

      pollinate server run --state-dir state --trigger-dir triggers --wait \\
        --rounds 10 --set export-triton-repo=models
    """
    from pollinate.errors import ConfigError
    from pollinate.ops.runs import default_app_dir, start_run

    flags = {"num-server-rounds": rounds, "strategy": strategy, "epsilon-budget": epsilon_budget,
             "round-timeout": round_timeout, "min-train-nodes": min_train_nodes,
             "run-dir": str(run_dir.resolve()) if run_dir else None,
             "tracking-uri": tracking_uri}  # fmt: skip
    err_console = make_console(stderr=True, soft_wrap=True)
    try:
        if wait and trigger_dir is None:
            raise ConfigError("--wait waits for a retrain event: pass --trigger-dir DIR too")
        config = {k: _toml_value(v) for k, v in parse_sets(set_ or []).items()}
        config.update({k: v for k, v in flags.items() if v is not None})
        app_dir = app or default_app_dir()
        if trigger_dir is None:
            run_id, where = start_run(state_dir, app_dir, config)
        else:
            started = _run_for_triggers(
                state_dir, app_dir, config, trigger_dir, wait, poll_interval, err_console
            )
            if started is None:
                return
            run_id, where = started
    except KeyboardInterrupt:
        err_console.print("stopped waiting; no run started")
        raise typer.Exit(code=int(ExitCode.INTERRUPTED)) from None
    err_console.print(f"run {run_id} started; run directory {where}")
    print(run_id)


def _run_for_triggers(
    state_dir: Path,
    app_dir: Path,
    config: dict[str, Any],
    trigger_dir: Path,
    wait: bool,
    poll_interval: float,
    console: Console,
) -> tuple[str, Path] | None:
    """Claim the pending retrain events and start one run for them (None: nothing started)."""
    import time

    from pollinate.config import RunSettings
    from pollinate.ops.runs import active_run, start_run
    from pollinate.ops.triggers import claim_triggers, describe, record, release

    RunSettings.from_run_config(config)  # a bad --set fails now, not when an event comes
    announced = False
    while True:
        busy = active_run(state_dir)
        claims = [] if busy else claim_triggers(trigger_dir)
        if claims:
            break
        if not wait:
            console.print(
                f"run {busy} is still running; retrain events stay pending in {trigger_dir}"
                if busy
                else f"no retrain event pending in {trigger_dir}{_missing(trigger_dir)}; "
                "no run started"
            )
            return None
        if not announced:
            console.print(
                f"waiting for a retrain event in {trigger_dir}{_missing(trigger_dir)} "
                "(Ctrl-C to stop)"
            )
            announced = True
        time.sleep(poll_interval)
    console.print(f"retraining for {len(claims)} event(s): {describe(claims)}")
    try:
        run_id, where = start_run(
            state_dir, app_dir, config, triggers=[c.path.name for c in claims]
        )
    except BaseException:
        release(claims)
        raise
    record(claims, run_id)
    return run_id, where


def _missing(trigger_dir: Path) -> str:
    if trigger_dir.is_dir():
        return ""
    return " (it does not exist yet; `pollinate serve --trigger-dir` makes it with the first event)"


def _toml_value(text: str) -> Any:
    """``3`` -> 3, ``0.5`` -> 0.5, ``true`` -> True, ``"x"`` or ``x`` -> "x"."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def status_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    run_id: Annotated[str | None, typer.Option(help="A run id \\[the newest run].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a run: Flower's status, the last round, clients sampled / replied / declined /
    failed, accuracy and the largest epsilon so far."""
    from pollinate.ops.runs import run_status

    report = run_status(state_dir, run_id)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = make_console(soft_wrap=True)
    for key, value in report.items():
        console.print(f"{key:<22} {value}")


def stop_command(
    run_id: Annotated[str, typer.Argument(help="The run to stop.")],
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
) -> None:
    """Stop a run (its last completed round stays checkpointed; resume with --set resume=true)."""
    from pollinate.ops.runs import stop_run

    stop_run(state_dir, run_id)
    make_console().print(f"run {run_id} stopped")


def logs_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    run_id: Annotated[str | None, typer.Option(help="A run id \\[the newest run].")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")
    ] = False,
) -> None:
    """Print a run's logs (the ServerApp's rounds, as the SuperLink keeps them; `flwr log`).

    Examples:

      pollinate server logs --state-dir state

      pollinate server logs --state-dir state --run-id 8421 --follow
    """
    from pollinate.ops.runs import run_logs

    code = run_logs(state_dir, run_id, follow=follow)
    raise typer.Exit(code=code)


def resume_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    run_id: Annotated[
        str | None, typer.Argument(help="The run to continue \\[the newest run].")
    ] = None,
    rounds: Annotated[
        int | None, typer.Option("--rounds", "-r", help="Change the total number of rounds.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Change a run-config key=value a resume allows."),
    ] = None,
    app: Annotated[Path | None, typer.Option(help="pollinate's project folder (the App).")] = None,
) -> None:
    """Continue a stopped or crashed run from its last checkpoint, as a new Flower run.

    Same run directory, same settings (from its run.json); the model, strategy state, history
    and privacy ledger come back from the newest checkpoint and the devices keep their own
    accountants, so epsilon is never reset. A run Flower still shows as running is stopped
    first. Prints the new run id.

    Examples:

      pollinate server resume --state-dir state

      pollinate server resume 8421 --state-dir state --rounds 20
    """
    from pollinate.ops.runs import default_app_dir, resume_run

    overrides = {k: _toml_value(v) for k, v in parse_sets(set_ or []).items()}
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    new_id, where, done = resume_run(state_dir, app or default_app_dir(), run_id, overrides)
    make_console(stderr=True, soft_wrap=True).print(
        f"run {new_id} continues {where} after round {done}"
    )
    print(new_id)


def pull_command(
    dest: Annotated[Path, typer.Argument(help="Folder to copy the run's results into.")],
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    run_id: Annotated[str | None, typer.Option(help="A run id \\[the newest run].")] = None,
) -> None:
    """Copy a run's results into DEST/run-ID: metrics, privacy ledger, summary, the newest
    checkpoint and the exported bundles.

    Examples:

      pollinate server pull results --state-dir state

      pollinate export results/run-8421 --out bundles
    """
    from pollinate.ops.runs import pull_run

    target = pull_run(state_dir, dest, run_id)
    make_console(soft_wrap=True).print(f"pulled into {target}")
