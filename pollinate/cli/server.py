"""``pollinate certs`` and ``pollinate server start|trust|nodes``: a real federation's server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pollinate.cli.console import make_console

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
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.certs import make_certificates

    try:
        made = make_certificates(out, nodes=nodes, hosts=host, days=days)
    except PollinateError as err:
        raise _fail(err) from None
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
    from pollinate.cli.main import _fail
    from pollinate.errors import ConfigError, PollinateError
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
    except PollinateError as err:
        raise _fail(err) from None
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
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.superlink import SuperLinkError, trust_node

    try:
        node_id = trust_node(state_dir, public_key)
        if node_id is None:
            raise SuperLinkError(f"{public_key} is already registered")
    except PollinateError as err:
        raise _fail(err) from None
    make_console().print(f"trusted {public_key}: node {node_id}")


@server_app.command("nodes")
def nodes_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the registered SuperNodes and whether they are online."""
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.superlink import list_nodes

    try:
        nodes = list_nodes(state_dir)
    except PollinateError as err:
        raise _fail(err) from None
    if as_json:
        print(json.dumps(nodes, indent=2))
        return
    console = make_console(soft_wrap=True)
    for node in nodes:
        console.print(f"{node['node-id']}  {node['status']:<10}  online since {node['online-at']}")


@server_app.command("run")
def run_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", help="Server rounds.")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="fedavg, fedprox, fedadam or fedyogi.")
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
    from pollinate.cli.main import _fail, _parse_sets
    from pollinate.errors import ConfigError, PollinateError
    from pollinate.ops.runs import default_app_dir, start_run

    flags = {"num-server-rounds": rounds, "strategy": strategy, "epsilon-budget": epsilon_budget,
             "round-timeout": round_timeout, "min-train-nodes": min_train_nodes,
             "run-dir": str(run_dir.resolve()) if run_dir else None}  # fmt: skip
    err_console = make_console(stderr=True, soft_wrap=True)
    try:
        if wait and trigger_dir is None:
            raise ConfigError("--wait waits for a retrain event: pass --trigger-dir DIR too")
        config = {k: _toml_value(v) for k, v in _parse_sets(set_ or []).items()}
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
    except PollinateError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        err_console.print("stopped waiting; no run started")
        raise typer.Exit(130) from None
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


@server_app.command("status")
def status_command(
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
    run_id: Annotated[str | None, typer.Option(help="A run id \\[the newest run].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a run: Flower's status, the last round, clients sampled / replied / declined /
    failed, accuracy and the largest epsilon so far."""
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.runs import run_status

    try:
        report = run_status(state_dir, run_id)
    except PollinateError as err:
        raise _fail(err) from None
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = make_console(soft_wrap=True)
    for key, value in report.items():
        console.print(f"{key:<22} {value}")


@server_app.command("stop")
def stop_command(
    run_id: Annotated[str, typer.Argument(help="The run to stop.")],
    state_dir: Annotated[Path, typer.Option(help="The --state-dir of `pollinate server start`.")],
) -> None:
    """Stop a run (its last completed round stays checkpointed; resume with --set resume=true)."""
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.runs import stop_run

    try:
        stop_run(state_dir, run_id)
    except PollinateError as err:
        raise _fail(err) from None
    make_console().print(f"run {run_id} stopped")


@server_app.command("logs")
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
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.runs import run_logs

    try:
        code = run_logs(state_dir, run_id, follow=follow)
    except PollinateError as err:
        raise _fail(err) from None
    raise typer.Exit(code=code)


@server_app.command("resume")
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
    from pollinate.cli.main import _fail, _parse_sets
    from pollinate.errors import PollinateError
    from pollinate.ops.runs import default_app_dir, resume_run

    try:
        overrides = {k: _toml_value(v) for k, v in _parse_sets(set_ or []).items()}
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        new_id, where, done = resume_run(state_dir, app or default_app_dir(), run_id, overrides)
    except PollinateError as err:
        raise _fail(err) from None
    make_console(stderr=True, soft_wrap=True).print(
        f"run {new_id} continues {where} after round {done}"
    )
    print(new_id)


@server_app.command("pull")
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
    from pollinate.cli.main import _fail
    from pollinate.errors import PollinateError
    from pollinate.ops.runs import pull_run

    try:
        target = pull_run(state_dir, dest, run_id)
    except PollinateError as err:
        raise _fail(err) from None
    make_console(soft_wrap=True).print(f"pulled into {target}")
