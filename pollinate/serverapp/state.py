"""The state a run carries from round to round, and what is saved of it after each round.

:class:`RunState` holds what the run's setup (:mod:`pollinate.serverapp.setup`) settles once
-- settings, grid, run directory, data, the server's evaluation model, node directory,
strategy chain, the task config sent to clients, sample size, update bound -- and what the
rounds (:mod:`pollinate.serverapp.rounds`) change: the global model's arrays, the history and
the privacy ledger. :func:`save_round` persists it after each round: the round's ledger rows
appended to ``ledger.sqlite`` (first: a checkpoint never points past the ledger), the
checkpoint folder, ``metrics.json`` and ``privacy.json`` (the summary);
:func:`write_privacy` writes ``privacy.json``, with the whole history at the end of a run.
Also here: the conversions between the global model's arrays and Flower's ``ArrayRecord``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError

from pollinate.config import RunSettings
from pollinate.data import DatasetSplit
from pollinate.errors import CheckpointError
from pollinate.privacy import PrivacyLedger
from pollinate.privacy.ledger_store import LEDGER_FILE, LedgerStore
from pollinate.rundir.checkpoint import Checkpoint, atomic_write_json, save_checkpoint
from pollinate.rundir.records import RoundRecord, history_rows, write_history
from pollinate.serverapp.client_dp import ClientLevelDP
from pollinate.serverapp.nodes import NodeDirectory
from pollinate.serverapp.strategy import dp_wrapper as find_dp_wrapper
from pollinate.serverapp.strategy import strategy_state
from pollinate.tasks import Task

__all__ = [
    "PRIVACY_FILE",
    "RunState",
    "from_array_record",
    "ledger_store",
    "save_round",
    "to_array_record",
    "write_privacy",
]

#: The run directory's privacy ledger (its summary and the full ledger).
PRIVACY_FILE = "privacy.json"


@dataclass
class RunState:
    """One run of the federation, from its setup to its end.

    Attributes:
        settings: The run's settings.
        grid: The Flower grid the run talks to the clients through.
        run_dir: The run directory (absolute).
        data: The server's copy of the data set (its test split is the central evaluation's).
        model: The server's model, used only to evaluate the global model's arrays.
        directory: Connected nodes and their stable client keys.
        population: Clients connected at the start (partitions, client-level DP population).
        strategy: The strategy chain (client-level DP wrapper outermost, if any).
        noise: The DP-SGD noise multiplier sent to clients.
        cfg: The task config sent with every train and evaluate message.
        sample_size: Clients sampled for training per round.
        bound: L2 norm above which an update is rejected as malformed.
        secagg_weight: The largest client weight secure aggregation scales by.
        arrays: The global model, by parameter name (in the model's own order).
        ledger: The privacy ledger.
        history: One record per completed round (round 0: the initial model).
        first_round: The first round this process runs (after a resume: the next one).
    """

    settings: RunSettings
    grid: Grid
    run_dir: Path
    data: DatasetSplit
    model: torch.nn.Module
    directory: NodeDirectory
    population: int
    strategy: Strategy
    noise: float
    cfg: ConfigRecord
    sample_size: int
    bound: float
    secagg_weight: float
    arrays: dict[str, np.ndarray]
    ledger: PrivacyLedger
    history: list[RoundRecord] = field(default_factory=list)
    first_round: int = 1

    @property
    def task(self) -> Task:
        """What the model learns (the data's task with the run's loss and metrics hooks)."""
        return self.settings.learning_task(self.data)

    @property
    def dp_wrapper(self) -> ClientLevelDP | None:
        """Flower's client-level DP wrapper of the strategy chain, or ``None``."""
        return find_dp_wrapper(self.strategy)

    @property
    def client_noise(self) -> float | None:
        """The client-level noise multiplier the DP wrapper adds (``None``: not enabled)."""
        wrapper = self.dp_wrapper
        return None if wrapper is None else float(wrapper.noise_multiplier)


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """The global model as Flower's ``ArrayRecord`` (order kept)."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ``ArrayRecord``."""
    return {k: np.asarray(a.numpy()) for k, a in record.items()}


def ledger_store(run_dir: Path) -> LedgerStore:
    """The run directory's ledger database."""
    return LedgerStore(run_dir / LEDGER_FILE)


def write_privacy(run: RunState, *, full: bool = True) -> dict[str, Any]:
    """Write ``privacy.json`` and return the ledger's summary.

    ``full``: the whole history too, indented (the end of a run). Otherwise (after every
    round) only the summary and where the history is, so the write does not grow with it.
    """
    summary = run.ledger.summary()
    document: dict[str, Any] = {"summary": summary, "ledger_file": LEDGER_FILE}
    if full:
        document["ledger"] = run.ledger.to_dict()
    atomic_write_json(run.run_dir / PRIVACY_FILE, document, indent=2 if full else None)
    return summary


def save_round(run: RunState, rnd: int) -> None:
    """Persist the run after round ``rnd``: ledger rows, checkpoint, ``metrics.json``,
    ``privacy.json``.

    Raises:
        CheckpointError: If the run directory cannot take them (a full disk, permissions):
            nothing is half-written, and the run resumes from the round before.
    """
    try:
        _save_round(run, rnd)
    except (OSError, SafetensorError) as err:
        raise CheckpointError(
            f"cannot save round {rnd} in {run.run_dir} ({err}); free space there or fix its "
            f"permissions, then resume with --resume {run.run_dir} (it goes on after the last "
            "round saved)"
        ) from err


def _save_round(run: RunState, rnd: int) -> None:
    run.ledger.flush(ledger_store(run.run_dir))
    state = {
        "history": history_rows(run.history),
        "ledger_file": LEDGER_FILE,
        "settings": run.settings.to_run_config(),
    }
    save_checkpoint(
        run.run_dir,
        Checkpoint(
            server_round=rnd,
            model=run.arrays,
            strategy=strategy_state(run.strategy),
            state=state,
        ),
        keep=run.settings.keep_checkpoints,
    )
    write_history(run.run_dir, run.history)
    write_privacy(run, full=False)
