"""``pollinate simulate`` and ``pollinate report``: a federated simulation and its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from pollinate.cli._common import parse_sets, setup_logging, user_code_on_path
from pollinate.cli.console import make_console
from pollinate.cli.new import find_app, read_app
from pollinate.cli.summary import print_summary
from pollinate.errors import CheckpointError, ConfigError

__all__ = ["report_command", "simulate_command"]


class _Progress:
    """Rich progress bar fed by the ServerApp's round events."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("rounds", total=total)

    def on_start(self, first_round: int, num_rounds: int) -> None:
        self.progress.update(self.task, completed=first_round - 1, total=num_rounds)

    def on_round(self, record: Any) -> None:
        eps = "" if record.max_epsilon is None else f" ε_max {record.max_epsilon:.2f}"
        acc = "" if record.accuracy is None else f" acc {record.accuracy:.3f}"
        if record.accuracy is None and record.metrics and "rmse" in record.metrics:
            acc = f" rmse {record.metrics['rmse']:.4g}"
        self.progress.update(
            self.task,
            completed=record.server_round,
            description=f"round {record.server_round}{acc}{eps}",
        )


def simulate_command(
    preset: Annotated[
        str, typer.Option(help="Starting point: default, demo, quick, non-iid, client-dp.")
    ] = "default",
    num_clients: Annotated[
        int | None, typer.Option("--num-clients", "-n", help="Simulated clients (SuperNodes).")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="fast: one process, each round's clients trained together (default); "
            "ray: Flower's simulation engine, one ClientApp call per client (Ray clusters)."
        ),
    ] = "fast",
    rounds: Annotated[int | None, typer.Option("--rounds", "-r", help="Server rounds.")] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Fraction of clients sampled per round.")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="fedavg, fedavgm, fedprox, fedadam, fedyogi or fedbuff (async)."),
    ] = None,
    robust: Annotated[str | None, typer.Option(help="none, krum or trimmed-mean.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="cnn, mlp, opacus-mnist, lstm, resnet, scatnet, or your own as an import "
            "path: package.module:Net "
            "(an nn.Module class or factory; the working directory is on the path)."
        ),
    ] = None,
    fix_model: Annotated[
        bool | None,
        typer.Option(
            "--fix-model",
            help="Replace layers DP-SGD cannot train (BatchNorm -> GroupNorm, LSTM -> DPLSTM; "
            "Opacus' ModuleValidator.fix) instead of refusing the model.",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="mnist, digits, a path (.npz, .csv, image folder), or your own loader as an "
            "import path: package.module:load (no arguments; returns (x, y))."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="classification, binary or regression [auto: detected from the labels, and "
            "printed].",
            show_default=False,
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            help="Your loss as an import path, package.module:fn; fn(outputs, targets) returns "
            "one loss per sample (torch).",
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Your metrics as an import path, package.module:fn; fn(outputs, targets) on "
            "numpy arrays returns {name: number} (central evaluation).",
        ),
    ] = None,
    partitioner: Annotated[
        str | None, typer.Option(help="iid, dirichlet, shards or resample.")
    ] = None,
    dp: Annotated[
        str | None, typer.Option(help="Sample-level DP: sample (DP-SGD) or none.")
    ] = None,
    noise: Annotated[float | None, typer.Option(help="DP-SGD noise multiplier.")] = None,
    clip: Annotated[float | None, typer.Option(help="DP-SGD per-sample clipping norm.")] = None,
    target_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Calibrate the noise so no client exceeds this epsilon over the whole run: "
            "DP-SGD's, or the client-level mechanism's when --dp none."
        ),
    ] = None,
    epsilon_budget: Annotated[
        float | None, typer.Option(help="Per-client budget: clients decline past it (0 = none).")
    ] = None,
    client_dp: Annotated[
        str | None,
        typer.Option(
            help="Client-level DP: none, server-fixed, client-fixed, server-adaptive, "
            "ftrl-tree or ftrl-banded (DP-FTRL, correlated noise)."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed for data split, partitions, client sampling and init. DP noise never "
            "comes from it (a secure source does)."
        ),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Where checkpoints, metrics and the report go.")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this directory from its last round.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any run-config key, e.g. --set learning-rate=0.05."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            envvar="MLFLOW_TRACKING_URI",
            show_default=False,
            help="Log the run to MLflow: a server (http://HOST:5000), a local store "
            "(sqlite:///mlflow.db), or 'off' [$MLFLOW_TRACKING_URI; else ./mlflow.db when "
            "mlflow is installed, unless POLLINATE_TRACKING=off].",
        ),
    ] = None,
    app: Annotated[
        Path | None,
        typer.Option(
            help="A Flower App's folder (`pollinate new`): its [tool.flwr.app.config] and "
            "code are used [the working directory, when it is one].",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's and pollinate's logs.")
    ] = False,
) -> None:
    """Run a federated simulation of the pollinate ServerApp and ClientApp.

    The default is 1000 clients, 10% per round, DP-SGD, on the fast in-process engine
    (--engine ray runs the same apps on Flower's Ray simulation engine). Every run writes a
    run directory: checkpoints, metrics.json, privacy.json and a report (summary.md, plots).

    Examples:

      pollinate simulate

      pollinate simulate --preset demo --run-dir runs/demo

      pollinate simulate --target-epsilon 4 --rounds 10

      pollinate simulate --dp none --client-dp ftrl-banded --target-epsilon 2 --strategy fedavgm

      pollinate simulate --strategy fedadam --partitioner dirichlet --set dirichlet-alpha=0.3

      pollinate simulate --strategy fedbuff --set buffer-size=10 --set latency-median-s=10

      pollinate simulate --resume runs/demo

      pollinate simulate --engine ray --num-clients 100

      pollinate simulate --model mymodels:Net --fix-model   # mymodels.py in this folder

      pollinate simulate --data prices.npz --task regression --model mlp --dp none

      pollinate simulate --app my-app                       # an app `pollinate new` made
    """
    from pollinate.config import RunSettings
    from pollinate.simulation.presets import get_preset

    setup_logging(verbose)
    app_dir = find_app(app)
    defaults = read_app(app_dir) if app_dir is not None else None
    user_code_on_path(app_dir)
    flags: dict[str, Any] = {
        "num-server-rounds": rounds, "fraction-train": fraction, "strategy": strategy,
        "robust": robust, "model": model, "fix-model": fix_model, "dataset": data,
        "task": task, "loss": loss, "metrics": metrics,
        "partitioner": partitioner, "dp": dp, "noise-multiplier": noise, "max-grad-norm": clip,
        "target-epsilon": target_epsilon, "epsilon-budget": epsilon_budget,
        "client-dp": client_dp, "seed": seed, "tracking-uri": tracking_uri,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_sets(set_ or []))
    if resume is not None:
        config, clients = _resume_config(resume, overrides)
        if num_clients is not None and num_clients != clients:
            raise ConfigError(
                f"--num-clients {num_clients} differs from the run's {clients} clients; "
                "a resumed run keeps its clients"
            )
    else:
        chosen = get_preset(preset)
        config = {**chosen.settings, **(defaults.config if defaults else {}), **overrides}
        if num_clients is not None:
            clients = num_clients
        elif defaults is not None and defaults.num_clients is not None:
            clients = defaults.num_clients
        else:
            clients = chosen.num_clients
        target = run_dir or Path("runs") / _default_run_name()
        _check_run_dir_target(target)
        if target.exists() and (target / "LATEST").exists():
            raise CheckpointError(
                f"{target} already holds a run; pass --resume {target} to continue it "
                "or choose another --run-dir"
            )
        config["run-dir"] = str(target.resolve())
    if clients < 1:
        raise ConfigError(f"--num-clients must be at least 1, got {clients}")
    chosen_engine = _engine(engine)
    settings = RunSettings.from_run_config(config)
    result = _run_with_progress(settings, clients, verbose, chosen_engine)
    print_summary(result)


def _default_run_name() -> str:
    import time

    return time.strftime("run-%Y%m%d-%H%M%S")


def _check_run_dir_target(target: Path) -> None:
    """Fail before any process starts when --run-dir (or a folder above it) is a file."""
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CheckpointError(
            f"--run-dir {target}: {existing} is a file, not a folder; choose another --run-dir"
        )


def _resume_config(run_dir: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], int]:
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise CheckpointError(
            f"{run_dir} is not a pollinate run directory (no run.json); pass the folder a "
            "previous `pollinate simulate` wrote"
        )
    try:
        saved = json.loads(run_json.read_text())
        config = dict(saved["settings"])
        population = int(saved["population"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{run_json} is corrupt ({err})") from err
    config.update(overrides)
    config["resume"] = True
    config["run-dir"] = str(run_dir.resolve())
    return config, population


def _engine(value: str) -> Any:
    from pollinate.simulation.runner import Engine

    try:
        return Engine(value.strip().lower())
    except ValueError:
        choices = ", ".join(e.value for e in Engine)
        raise ConfigError(
            f"--engine {value!r} is not an engine; choose one of: {choices}"
        ) from None


def _run_with_progress(settings: Any, clients: int, verbose: bool, engine: Any) -> Any:
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pollinate.config import SampleDP
    from pollinate.data import load_dataset, partition_sizes
    from pollinate.models import checked_model
    from pollinate.serverapp import events
    from pollinate.simulation.runner import SimulationOptions, simulate

    # Load and partition the data here first, so a bad path or partitioning fails before
    # the engine starts, with one clear message.
    data = load_dataset(
        settings.dataset, test_fraction=settings.test_fraction, seed=settings.seed,
        task=settings.task, num_partitions=clients,
    )  # fmt: skip
    learning_task = settings.learning_task(data)
    if data.partitions is None:  # a per-partition loader made its own shares
        partition_sizes(
            data.train.y, clients, settings.partitioner, seed=settings.seed,
            alpha=settings.dirichlet_alpha, shards_per_partition=settings.shards_per_client,
            samples_per_partition=settings.samples_per_client,
        )  # fmt: skip
    # ... and so does a model that cannot be imported, trained with DP-SGD or fit the data.
    checked_model(
        settings.model, data.input_shape, data.num_outputs, fix=settings.fix_model,
        dp=settings.dp == SampleDP.DPSGD, task=learning_task,
    )  # fmt: skip
    console = make_console(stderr=True)
    how = "detected from the labels" if settings.task.value == "auto" else "as set"
    console.print(f"task: {escape(learning_task.describe())} ({how})")
    if learning_task.kind.value == "regression":
        scale = float(np.sqrt(np.mean(np.square(data.train.y, dtype=np.float64))))
        if scale > 10:
            console.print(
                f"[yellow]note:[/] the targets' RMS is {scale:.3g}; SGD trains best on targets "
                "of order 1 (large squared errors kill ReLU units and make updates exceed "
                "max-update-norm): divide them by a constant in your loader (MAPE is unchanged)"
            )
    console.print(
        f"[bold]pollinate[/] {clients} clients, {settings.num_server_rounds} rounds, "
        f"strategy {settings.strategy.value}, dp {settings.dp.value}, "
        f"client-dp {settings.client_dp.value}, {engine.value} engine -> {settings.run_dir}"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=verbose,
    ) as progress:  # fmt: skip
        listener = _Progress(progress, settings.num_server_rounds)
        events.add_listener(listener)
        try:
            options = SimulationOptions(num_clients=clients, engine=engine, verbose=verbose)
            return simulate(settings, options)
        finally:
            events.remove_listener(listener)


def report_command(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory written by `pollinate simulate`.")
    ],
) -> None:
    """Re-draw the report (plots and summary.md) of a run directory.

    Example:

      pollinate report runs/run-20261126-150000
    """
    from pollinate.rundir.records import RoundRecord
    from pollinate.rundir.report import write_report

    try:
        metrics = run_dir / "metrics.json"
        if not metrics.exists():
            raise CheckpointError(
                f"{run_dir} has no metrics.json; is it a pollinate run directory?"
            )
        history = [RoundRecord.from_dict(r) for r in json.loads(metrics.read_text())]
        privacy_file = run_dir / "privacy.json"
        privacy = json.loads(privacy_file.read_text())["summary"] if privacy_file.exists() else {}
        settings = json.loads((run_dir / "run.json").read_text()).get("settings", {})
        files = write_report(run_dir, history, privacy=privacy, settings=settings)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {run_dir}: {err}") from None
    except (TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(
            f"{run_dir} holds malformed run files ({type(err).__name__}: {err})"
        ) from None
    for f in files:
        make_console().print(str(f))
