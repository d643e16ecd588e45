"""Per-round records of a run and the metrics history that holds them.

The server keeps one :class:`RoundRecord` per round (round ``0`` is the evaluation of the
initial model before any training). The history is stored as a JSON list of
:meth:`RoundRecord.to_dict` rows, both in ``RUN_DIR/metrics.json`` (rewritten atomically after
every round, see :func:`write_history`) and in each checkpoint's ``state.json``; readers
(``pollinate report``, the federation metrics exporter, resume) turn rows back into records
with :meth:`RoundRecord.from_dict` / :func:`history_from_rows`, which reject malformed rows with
a :class:`~pollinate.errors.CheckpointError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pollinate.errors import CheckpointError

__all__ = [
    "METRICS_FILE",
    "RoundRecord",
    "history_from_rows",
    "history_rows",
    "read_history",
    "write_history",
]

#: The run directory's per-round history.
METRICS_FILE = "metrics.json"

_INT_FIELDS = (
    "server_round", "sampled", "replied", "declined", "rejected", "failed", "refused", "stale",
)  # fmt: skip


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one server round.

    Attributes:
        server_round: The round number; ``0`` is the evaluation of the initial model.
        accuracy: Central test accuracy after the round, ``None`` without central evaluation.
        loss: Central test loss after the round, ``None`` without central evaluation.
        sampled: Clients sampled for training.
        replied: Clients that answered (declined and rejected ones included).
        declined: Clients that declined (for example, their privacy budget was spent).
        refused: Of those, clients whose own policy refused the task (it asked for weaker
            privacy than the device allows, or for code by an import path it did not allow).
        rejected: Malformed updates rejected before aggregation.
        failed: Error replies and timeouts.
        train_loss: Mean training loss the clients reported, if any.
        train_accuracy: Mean training accuracy the clients reported, if any.
        max_epsilon: Sample-level epsilon, maximum over all clients so far (``None``: DP off).
        median_epsilon: Sample-level epsilon, median over the clients that trained so far.
        client_level_epsilon: Client-level epsilon after the round (``None``: not enabled).
        seconds: Wall-clock duration of the round.
        federated_accuracy: Mean accuracy of federated evaluation on clients' data, if run.
        metrics: Every metric of central evaluation by name (the task's own: accuracy and
            macro F1, accuracy and AUC, or MAE, RMSE and MAPE; and the user's), if run.
        stale: ``fedbuff``: updates dropped for coming from a model more than
            ``max-staleness`` versions old (their clients' epsilons are still recorded).
        elapsed_s: Seconds since the run began, at the end of this round: simulated time
            when the fast engine runs a latency model, wall-clock time otherwise.
    """

    server_round: int
    accuracy: float | None
    loss: float | None
    sampled: int = 0
    replied: int = 0
    declined: int = 0
    rejected: int = 0
    failed: int = 0
    train_loss: float | None = None
    train_accuracy: float | None = None
    max_epsilon: float | None = None
    median_epsilon: float | None = None
    client_level_epsilon: float | None = None
    seconds: float | None = None
    federated_accuracy: float | None = None
    refused: int = 0
    metrics: dict[str, float] | None = None
    stale: int = 0
    elapsed_s: float | None = None

    def __post_init__(self) -> None:
        """Reject negative round numbers and counts.

        Raises:
            ValueError: If ``server_round`` or one of the client counts is negative.
        """
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"RoundRecord.{name} must be >= 0, got {value}")

    def to_dict(self) -> dict[str, object]:
        """Return the record as a plain dict (JSON-serialisable; epsilon may be ``inf``)."""
        return dict(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> RoundRecord:
        """Build a record from :meth:`to_dict` output, ignoring unknown keys.

        Missing optional keys take their defaults; missing ``accuracy``/``loss`` read as ``None``.

        Args:
            d: The mapping, typically read back from a run directory's history file.

        Returns:
            The record.

        Raises:
            CheckpointError: If ``server_round`` is missing or a value has the wrong type or range.
        """
        if "server_round" not in d:
            raise CheckpointError("round record has no 'server_round'")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {"accuracy": None, "loss": None}
        for key, value in d.items():
            if key not in known:
                continue
            if key in _INT_FIELDS:
                kwargs[key] = _as_int(key, value)
            elif key == "metrics":
                kwargs[key] = _as_metrics(value)
            else:
                kwargs[key] = _as_optional_float(key, value)
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise CheckpointError(f"invalid round record: {exc}") from exc


def _as_int(key: str, value: object) -> int:
    """Read an integer field of a stored round record."""
    if isinstance(value, bool):
        raise CheckpointError(f"round record field {key!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise CheckpointError(f"round record field {key!r} must be an integer, got {value!r}")


def _as_metrics(value: object) -> dict[str, float] | None:
    """Read the metrics mapping of a stored round record."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CheckpointError(f"round record field 'metrics' must be a mapping, got {value!r}")
    out: dict[str, float] = {}
    for name, number in value.items():
        parsed = _as_optional_float(f"metrics.{name}", number)
        out[str(name)] = float("nan") if parsed is None else parsed
    return out


def _as_optional_float(key: str, value: object) -> float | None:
    """Read an optional float field of a stored round record."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise CheckpointError(f"round record field {key!r} must be a number or null, got {value!r}")


def history_rows(history: Iterable[RoundRecord]) -> list[dict[str, object]]:
    """The stored form of a history: one :meth:`RoundRecord.to_dict` row per record."""
    return [record.to_dict() for record in history]


def history_from_rows(rows: object) -> list[RoundRecord]:
    """Records from a stored history (the inverse of :func:`history_rows`).

    Raises:
        CheckpointError: If ``rows`` is not a list of mappings, or a row is not a valid record.
    """
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise CheckpointError("a metrics history must be a list of round records")
    return [RoundRecord.from_dict(r) for r in rows]


def write_history(run_dir: Path, history: Iterable[RoundRecord]) -> Path:
    """Atomically (re)write ``RUN_DIR/metrics.json`` with ``history``; returns its path."""
    # imported here: readers of records (events, the metrics exporter) need no numpy/safetensors
    from pollinate.rundir.checkpoint import atomic_write_json

    path = Path(run_dir) / METRICS_FILE
    atomic_write_json(path, history_rows(history))
    return path


def read_history(run_dir: Path) -> list[RoundRecord]:
    """The records of ``RUN_DIR/metrics.json``, in file order.

    Raises:
        OSError: If the file cannot be read.
        CheckpointError: If it is not JSON or not a list of valid round records.
    """
    path = Path(run_dir) / METRICS_FILE
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{path} is not JSON: {err}") from err
    return history_from_rows(rows)
