"""``pollinate serve``: the KServe v2 serving tier, from flags and/or a TOML config file;
``pollinate serve ab status``: the A/B experiments' statistics, from their saved state."""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from pollinate.cli._common import CommandGroup, reports_errors

__all__ = ["ab_status_command", "serve_app", "serve_command"]


class LogFormat(StrEnum):
    json = "json"
    text = "text"


def serve_command(
    ctx: typer.Context,
    repository: Annotated[Path | None, typer.Option(help="Triton-layout model repository.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with the same settings.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    http_port: Annotated[int | None, typer.Option(help="REST port; 0 = any free [8000].")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port; 0 = any free [8001].")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port [8002].")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda \\[auto].")] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto | onnxruntime | torch \\[auto].")
    ] = None,
    instances: Annotated[int | None, typer.Option(help="Model instances per version [1].")] = None,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads per instance [1].")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Server processes sharing the ports (SO_REUSEPORT) [1].")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Rows per model call [64].")] = None,
    max_queue_delay_us: Annotated[
        int | None,
        typer.Option(help="Longest wait to fill a batch, microseconds; 0: none [0]."),
    ] = None,
    max_queue_size: Annotated[
        int | None,
        typer.Option(
            help="Samples queued per version before 503; 0: no queue [512].",
        ),
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds a request may wait [5].")
    ] = None,
    canary_percent: Annotated[
        float | None, typer.Option(help="Traffic share of a new version [10].")
    ] = None,
    canary_min_requests: Annotated[
        int | None, typer.Option(help="Canary requests before judging it [200].")
    ] = None,
    poll_interval: Annotated[
        float | None, typer.Option(help="Seconds between repository scans [2].")
    ] = None,
    drift_threshold: Annotated[
        float | None, typer.Option(help="PSI that triggers retraining [0.2].")
    ] = None,
    trigger_dir: Annotated[
        Path | None, typer.Option(help="Directory for retraining event files.")
    ] = None,
    webhook: Annotated[str | None, typer.Option(help="URL to POST retraining events to.")] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="File holding the bearer token clients must send.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate (REST + gRPC).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key.")] = None,
    max_request_bytes: Annotated[
        int | None, typer.Option(help="Largest request body [16 MiB].")
    ] = None,
    port_file: Annotated[
        Path | None, typer.Option(help="Write {http, grpc, metrics} ports here when ready.")
    ] = None,
    trace_endpoint: Annotated[
        str | None,
        typer.Option(help="OTLP/HTTP collector URL; turns tracing on ('env': OTEL_* vars)."),
    ] = None,
    trace_sample_rate: Annotated[
        float | None, typer.Option(help="Share of requests traced, with --trace-endpoint [0.01].")
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            help="Follow this MLflow registered model: its production version serves, a newer "
            "staging one is the canary (written into --repository; needs --tracking-uri)."
        ),
    ] = None,
    tracking_uri: Annotated[
        str,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI for --registry."),
    ] = "",
    registry_interval: Annotated[
        float, typer.Option(help="Seconds between looks at the registry's aliases.", min=0.5)
    ] = 10.0,
    access_log: Annotated[bool, typer.Option(help="Log every request (JSON).")] = False,
    log_format: Annotated[LogFormat, typer.Option(help="json | text.")] = LogFormat.json,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Serve a model repository over KServe v2 REST and gRPC, with dynamic batching.

    A newer version directory in the repository is loaded, warmed, validated, served to
    --canary-percent of the traffic, then promoted or rolled back automatically. With
    --registry, a move of the registry's production alias (`pollinate registry rollback`)
    swaps the served version to it, validated first, without a restart. Input drift
    over --drift-threshold (PSI) writes a retraining event to --trigger-dir and/or POSTs it
    to --webhook. Metrics: http://HOST:METRICS_PORT/metrics. See docs/serving.md.

    Examples:

      pollinate export runs/demo --triton-repo models

      pollinate serve --repository models

      pollinate serve --repository models --device cuda --instances 2 --max-batch-size 128

      pollinate serve --config serve.toml --http-port 9000

      pollinate serve --repository models --device cuda --workers 4   # 4 processes, 1 port

      pollinate serve --repository models --registry cnn --tracking-uri http://mlflow:5000

      curl -s localhost:8000/v2/models/cnn

      pollinate serve --repository models --trace-endpoint http://localhost:4318

      pollinate serve ab status --config serve.toml   # A/B experiments (\\[ab] in the file)
    """
    if ctx.invoked_subcommand is not None:
        return
    from pollinate.errors import ConfigError
    from pollinate.log import log_to_stderr
    from pollinate.serving.config import _read_token, load_serve_settings

    log_to_stderr(
        json_lines=log_format is LogFormat.json, level=logging.DEBUG if verbose else logging.INFO
    )
    flags: dict[str, Any] = {
        "repository": repository, "host": host, "http_port": http_port,
        "grpc_port": grpc_port, "metrics_port": metrics_port, "device": device,
        "backend": backend, "instances": instances, "threads": threads, "workers": workers,
        "batching.max_batch_size": max_batch_size,
        "batching.max_queue_delay_us": max_queue_delay_us,
        "batching.max_queue_size": max_queue_size,
        "batching.request_timeout_s": request_timeout,
        "rollout.canary_percent": canary_percent,
        "rollout.min_requests": canary_min_requests,
        "rollout.poll_interval_s": poll_interval,
        "drift.threshold": drift_threshold, "drift.trigger_dir": trigger_dir,
        "drift.webhook": webhook, "tls_cert": tls_cert, "tls_key": tls_key,
        "max_request_bytes": max_request_bytes, "port_file": port_file,
        "tracing.endpoint": trace_endpoint, "tracing.sample_rate": trace_sample_rate,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    if access_log:
        overrides["access_log"] = True
    try:
        if token_file is not None:
            overrides["token"] = _read_token(token_file)
        if registry is not None and repository is not None:
            repository.mkdir(parents=True, exist_ok=True)  # the registry fills it
        settings = load_serve_settings(config, overrides)
        if registry is not None:
            _follow_registry(registry, tracking_uri, settings.repository, registry_interval)
        from pollinate.serving.launch import run_server

        run_server(
            settings,
            json_logs=log_format is LogFormat.json,
            log_level=logging.DEBUG if verbose else logging.INFO,
        )
    except OSError as err:
        raise ConfigError(f"cannot start the server: {err}") from None


def _follow_registry(model: str, uri: str, repository: Path, interval: float) -> None:
    """Bring ``repository`` up to the registry's aliases now (an unreachable registry stops
    the start), then keep it so from a thread every ``interval`` s; the server's own roll-out
    loads, validates, canaries and promotes or rolls back what appears there, and swaps to
    the version ``production`` moves to (``registry.json``)."""
    import threading
    import time

    from pollinate.errors import ConfigError
    from pollinate.ops.registry_sync import sync_once, watch

    if not uri:
        raise ConfigError(
            "--registry needs an MLflow tracking URI: pass --tracking-uri URI or set "
            "MLFLOW_TRACKING_URI"
        )
    sync_once(uri, model, repository, production_only=True)  # current; staging: a canary

    def follow() -> None:
        time.sleep(interval)  # the server has loaded production as its current version
        watch(uri, model, repository, interval=interval)

    threading.Thread(target=follow, daemon=True, name="registry-sync").start()


def ab_status_command(
    config: Annotated[
        Path | None, typer.Option(help="The server's TOML file (its \\[ab] state-dir).")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="The \\[ab] state-dir itself \\[./ab-state].")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show each A/B experiment's variants: n, metric, interval, p-value and decision.

    Reads the state the server saves (at most \\[ab] save-interval-s behind, in full when it
    stops), so it works whether or not the server runs. The interval is the always-valid
    interval of the difference to the control; the p-value is always valid, Holm-adjusted.

    Examples:

      pollinate serve ab status --config serve.toml

      pollinate serve ab status --state-dir ab-state --json
    """
    import json
    import tomllib
    from dataclasses import asdict

    from rich.table import Table

    from pollinate.cli.console import make_console
    from pollinate.errors import ConfigError
    from pollinate.serving.ab_config import parse_ab_table
    from pollinate.serving.ab_store import read_status

    if state_dir is None and config is not None:
        try:
            raw = tomllib.loads(config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"cannot read config file {config}: {err}") from None
        state_dir = parse_ab_table(raw.get("ab", {}), config.resolve().parent).state_dir
    experiments = read_status(state_dir or Path("ab-state"))
    if as_json:
        typer.echo(json.dumps([asdict(e) for e in experiments], indent=2))
        return
    console = make_console(min_width=100)
    for e in experiments:
        table = Table(
            title=f"A/B experiment {e.name} on {e.model}: {e.metric}, alpha {e.alpha:g}, "
            f"margin +-{e.margin:g} (saved {e.saved})"
        )
        for col in ("variant", "target", "weight", "n", e.metric, "difference CI", "p-value",
                    "decision"):  # fmt: skip
            table.add_column(col, justify="left" if col in ("variant", "target") else "right")
        for r in e.reports:
            ci = "-" if r.ci is None else f"[{r.ci[0]:+.4f}, {r.ci[1]:+.4f}]"
            table.add_row(
                r.name, e.targets[r.name], f"{e.weights[r.name]:g}", str(r.n),
                "-" if r.metric is None else f"{r.metric:.4f}", ci,
                "-" if r.p_value is None else f"{r.p_value:.4g}", r.decision,
            )  # fmt: skip
        console.print(table)


serve_app = CommandGroup(
    name="serve",
    invoke_without_command=True,
    no_args_is_help=False,
)
serve_app.callback()(reports_errors(serve_command))
ab_app = CommandGroup(name="ab", help="A/B/n experiments of the serving tier (\\[ab] config).")
ab_app.command("status")(ab_status_command)
serve_app.add_typer(ab_app, name="ab")
