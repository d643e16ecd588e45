"""Setting a run up: everything that happens once, before its first round.

:func:`start_run` loads the server's copy of the data and builds its evaluation model, waits
for the clients, assembles the strategy chain and the privacy ledger, derives the noise, task
config and update bound (:mod:`pollinate.serverapp.calibration`), and then either resumes
from the run directory's latest checkpoint (refusing settings that would make it a different
run) or starts afresh: ``run.json`` and the evaluation of the initial model (round 0).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.serverapp import Grid

from pollinate.config import ClientDP, RunSettings, SampleDP
from pollinate.data import DatasetSplit, load_dataset
from pollinate.errors import ConfigError
from pollinate.log import logger
from pollinate.models import checked_model
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.noise import NOT_PRIVATE
from pollinate.rundir.checkpoint import (
    Checkpoint,
    atomic_write_json,
    latest_checkpoint,
)
from pollinate.rundir.records import RoundRecord, history_from_rows
from pollinate.serverapp.calibration import (
    client_config,
    resolve_noise,
    secagg_max_weight,
    update_bound,
)
from pollinate.serverapp.evaluation import accuracy_of, central_eval, describe_eval
from pollinate.serverapp.nodes import NodeDirectory
from pollinate.serverapp.state import RunState, ledger_store
from pollinate.serverapp.strategy import build_strategy, load_strategy_state

__all__ = ["FIXED_ON_RESUME", "RUN_FILE", "start_run"]

#: The run's settings and derived parameters, written once when it starts.
RUN_FILE = "run.json"

#: Settings that must not change when a run is resumed (the result would not be the same run).
FIXED_ON_RESUME = (
    "seed", "model", "fix-model", "task", "loss", "dataset", "partitioner", "strategy", "dp",
    "client-dp",
    "noise-multiplier", "max-grad-norm", "target-delta", "fraction-train", "batch-size",
    "local-epochs", "dirichlet-alpha", "shards-per-client", "samples-per-client",
    "test-fraction", "reproducible-noise", "local-eval-fraction", "eval-noise-multiplier",
)  # fmt: skip
#: Also fixed under client-level DP: the noise, which every client's whole history is
#: accounted with. The rounds too where the noise was calibrated for them or DP-FTRL's strategy
#: matrix covers them (see :func:`_client_level_fixed`).
FIXED_ON_RESUME_CLIENT_LEVEL = (
    "client-dp-noise", "client-dp-clip", "client-dp-target-epsilon", "client-dp-bands",
    "client-dp-count-noise",
)  # fmt: skip


def _client_level_fixed(saved: dict[str, object]) -> tuple[str, ...]:
    """What else a run with client-level DP may not change on resume."""
    if saved.get("client-dp", "none") == "none":
        return ()
    calibrated = float(saved.get("client-dp-target-epsilon", 0) or 0) > 0 or (  # type: ignore[arg-type]
        saved.get("dp") == "none" and float(saved.get("target-epsilon", 0) or 0) > 0  # type: ignore[arg-type]
    )
    planned = calibrated or str(saved.get("client-dp", "")).startswith("ftrl")
    rounds = ("num-server-rounds", "participation-bound", "target-epsilon") if planned else ()
    return FIXED_ON_RESUME_CLIENT_LEVEL + rounds


def start_run(grid: Grid, settings: RunSettings, *, threads: int = 1) -> RunState:
    """Set up (or resume) the run described by ``settings`` on ``grid``.

    ``threads``: torch threads for the server's own work (central evaluation).

    Raises:
        ConfigError: If the settings cannot run on this grid, or a resume changes settings
            listed in :data:`FIXED_ON_RESUME`.
    """
    torch.set_num_threads(max(1, threads))
    run_dir = Path(settings.run_dir or f"runs/run-{int(time.time())}").resolve()
    directory = _connect(grid, settings)
    population = len(directory)
    data = load_dataset(
        settings.dataset, test_fraction=settings.test_fraction, seed=settings.seed,
        task=settings.task, num_partitions=population,
    )  # fmt: skip
    logger.info("task: %s", settings.learning_task(data).describe())
    model, arrays = _initial_model(settings, data)
    strategy = build_strategy(settings, population=population)
    noise = resolve_noise(settings, data, population)
    run = RunState(
        settings=settings, grid=grid, run_dir=run_dir, data=data, model=model,
        directory=directory, population=population, strategy=strategy, noise=noise,
        cfg=client_config(settings, data, population=population, noise=noise, run_dir=run_dir),
        sample_size=settings.sample_size(population),
        bound=update_bound(
            settings, arrays, mean_samples=len(data.train) / population, noise=noise
        ),
        secagg_weight=secagg_max_weight(settings, data, population),
        arrays=arrays, ledger=_new_ledger(settings),
    )  # fmt: skip
    ckpt = latest_checkpoint(run_dir) if settings.resume and run_dir.exists() else None
    if ckpt is not None:
        _resume(run, ckpt)
    else:
        _begin(run)
    logger.info("updates moving the model by more than %.4g (L2) are rejected", run.bound)
    return run


def _initial_model(
    settings: RunSettings, data: DatasetSplit
) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    """The server's evaluation model and the initial global model's arrays (seeded)."""
    torch.manual_seed(settings.seed)
    model = checked_model(
        settings.model, data.input_shape, data.num_outputs, fix=settings.fix_model,
        dp=settings.dp == SampleDP.DPSGD, task=settings.learning_task(data),
    )  # fmt: skip
    arrays = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    # the server's copy only evaluates: channels-last is 1.1-3x faster for the CNNs here
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, arrays


def _connect(grid: Grid, settings: RunSettings) -> NodeDirectory:
    """Wait for enough nodes, let the population settle, and learn every node's client key."""
    if settings.secure_aggregation and getattr(grid, "static_population", False):
        raise ConfigError(
            "secure-aggregation needs the ClientApp on every node, which the fast engine "
            "bypasses; run it on a federation (`pollinate server run`) or with "
            "`pollinate simulate --engine ray`"
        )
    directory = NodeDirectory(grid, timeout=settings.round_timeout)
    directory.wait_for(max(settings.min_train_nodes, settings.min_available_nodes))
    directory.settle()
    directory.refresh()
    return directory


def _new_ledger(settings: RunSettings) -> PrivacyLedger:
    """An empty privacy ledger for the guarantees ``settings`` enable."""
    ledger = PrivacyLedger(
        delta=settings.target_delta,
        sample_level=settings.dp == SampleDP.DPSGD,
        client_level=settings.client_dp != ClientDP.NONE,
        reproducible_noise=settings.reproducible_noise,
    )
    if settings.reproducible_noise:
        logger.warning("reproducible-noise is on: %s", NOT_PRIVATE)
    return ledger


def _begin(run: RunState) -> None:
    """Start afresh: write ``run.json`` and evaluate the initial model as round 0."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    ledger_store(run.run_dir).create(run.ledger.settings())
    atomic_write_json(
        run.run_dir / RUN_FILE,
        {
            "settings": run.settings.to_run_config(),
            "population": run.population,
            "noise": run.noise,
            "client_noise": run.client_noise,
        },
    )
    result = central_eval(run.model, run.arrays, run.data, run.task)
    run.history.append(
        RoundRecord(
            server_round=0, accuracy=accuracy_of(result), loss=result.loss,
            metrics=result.metrics,
        )
    )  # fmt: skip
    logger.info("initial model: %s", describe_eval(result, run.task))


def _resume(run: RunState, ckpt: Checkpoint) -> None:
    """Continue after ``ckpt``: its model, strategy state, history, ledger and accountant."""
    _check_resume(run.run_dir, run.settings)
    run.first_round = ckpt.server_round + 1
    # a checkpoint stores arrays by name (sorted); keep the model's own order, which the
    # clients' replies have and client-level DP's clipping zips against
    run.arrays = {**{k: ckpt.model[k] for k in run.arrays if k in ckpt.model}, **ckpt.model}
    load_strategy_state(run.strategy, ckpt.strategy)
    run.history = history_from_rows(ckpt.state.get("history", []))
    run.ledger = _resumed_ledger(run.run_dir, ckpt)
    logger.info("resuming %s after round %d", run.run_dir, ckpt.server_round)


def _resumed_ledger(run_dir: Path, ckpt: Checkpoint) -> PrivacyLedger:
    """The ledger up to ``ckpt``'s round: from ``ledger.sqlite``, its later rows deleted (a
    crash after the rows of a round and before its checkpoint). A run directory from before
    the database keeps its ledger in the checkpoint: it moves into a new database."""
    store = ledger_store(run_dir)
    if "ledger" in ckpt.state:
        ledger = PrivacyLedger.from_dict(ckpt.state["ledger"])
        ledger.truncate_after(ckpt.server_round)
        store.create(ledger.settings())
        ledger.flush(store)
        logger.info("moved the privacy ledger of %s into %s", run_dir, store.path.name)
        return ledger
    store.truncate_after(ckpt.server_round)
    return PrivacyLedger.from_store(store)


def _check_resume(run_dir: Path, settings: RunSettings) -> None:
    """Refuse to resume with settings in :data:`FIXED_ON_RESUME` changed since ``run.json``."""
    try:
        saved = json.loads((run_dir / RUN_FILE).read_text())["settings"]
    except (OSError, ValueError, KeyError):
        return
    now = settings.to_run_config()
    fixed = FIXED_ON_RESUME + _client_level_fixed(saved)
    changed = [k for k in fixed if k in saved and saved[k] != now.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {run_dir} with different settings ({detail}); "
            "resume with the original settings or start a new run directory"
        )
