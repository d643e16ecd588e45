"""Run reports: plots and a Markdown summary of a finished (or partial) training run.

The server keeps one :class:`RoundRecord` per round (round ``0`` is the evaluation of the
initial model before any training) and, at the end of a run or after a crash, hands the history
and the privacy ledger's summary to :func:`write_report`, which writes into the run directory:

* ``accuracy.png`` -- central test accuracy per round, plus the mean client-reported training
  accuracy when clients reported one;
* ``loss.png`` -- central test loss per round, plus the mean client training loss;
* ``epsilon.png`` -- per round, the maximum and median sample-level epsilon over clients and the
  client-level epsilon, drawn as separate lines: they are separate guarantees and never summed;
* ``summary.md`` -- run settings, final metrics, a per-round table and the privacy section.

Every file is written atomically (a temporary file in the same directory, then
:func:`os.replace`), so a crash never leaves a half-written report behind. matplotlib and rich are
imported lazily, inside the functions that need them, so importing this module is cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pollinate._atomic import atomic_write_bytes
from pollinate.errors import CheckpointError
from pollinate.log import logger

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["RoundRecord", "render_summary_table", "write_report"]

#: Written for a value that is not known (no central evaluation, DP off, ...).
MISSING = "—"

#: The sentence every report carries wherever both kinds of epsilon could appear.
SEPARATE_GUARANTEES = (
    "Sample-level and client-level epsilon are separate guarantees (one protects individual "
    "training examples within a client, the other a client's whole contribution); "
    "they are not added."
)

_INT_FIELDS = (
    "server_round", "sampled", "replied", "declined", "rejected", "failed", "refused",
)  # fmt: skip
_FLOAT_FIELDS = (
    "accuracy",
    "loss",
    "train_loss",
    "train_accuracy",
    "max_epsilon",
    "median_epsilon",
    "client_level_epsilon",
    "seconds",
)


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
        refused: Of those, clients whose own privacy policy refused the task (it asked for
            weaker privacy than the device allows).
        rejected: Malformed updates rejected before aggregation.
        failed: Error replies and timeouts.
        train_loss: Mean training loss the clients reported, if any.
        train_accuracy: Mean training accuracy the clients reported, if any.
        max_epsilon: Sample-level epsilon, maximum over all clients so far (``None``: DP off).
        median_epsilon: Sample-level epsilon, median over the clients that trained so far.
        client_level_epsilon: Client-level epsilon after the round (``None``: not enabled).
        seconds: Wall-clock duration of the round.
        federated_accuracy: Mean accuracy of federated evaluation on clients' data, if run.
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


def _as_optional_float(key: str, value: object) -> float | None:
    """Read an optional float field of a stored round record."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise CheckpointError(f"round record field {key!r} must be a number or null, got {value!r}")


# ---------------------------------------------------------------------------- helpers


def _section(mapping: Mapping[str, object], key: str) -> Mapping[str, object]:
    """Return ``mapping[key]`` if it is a mapping, else an empty one."""
    value = mapping.get(key)
    if isinstance(value, Mapping):
        return value
    return {}


def _enabled(section: Mapping[str, object]) -> bool:
    """Whether a privacy section is on: its ``enabled`` flag, or non-empty without one."""
    if "enabled" in section:
        return section["enabled"] is True
    return bool(section)


def _number(value: object) -> float | None:
    """Return ``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _fmt(value: object, spec: str) -> str:
    """Format a number with ``spec``; ``None`` and non-numbers read as :data:`MISSING`."""
    number = _number(value)
    if number is None:
        return MISSING
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return format(number, spec)


def _fmt_acc(value: object) -> str:
    return _fmt(value, ".4f")


def _fmt_loss(value: object) -> str:
    return _fmt(value, ".4f")


def _fmt_eps(value: object) -> str:
    return _fmt(value, ".2f")


def _fmt_delta(value: object) -> str:
    return _fmt(value, "g")


def _fmt_seconds(value: object) -> str:
    return _fmt(value, ".1f")


def _fmt_value(value: object) -> str:
    """Format a setting or mechanism parameter for a Markdown cell."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return _fmt(value, "g")
    if isinstance(value, list | tuple):
        return ", ".join(_fmt_value(v) for v in value) if value else MISSING
    return str(value)


def _md_cell(text: str) -> str:
    """Escape text for one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [_md_row(header), "|" + "|".join("---" for _ in header) + "|"]
    lines.extend(_md_row(r) for r in rows)
    return lines


def _sorted(history: Sequence[RoundRecord]) -> list[RoundRecord]:
    return sorted(history, key=lambda r: r.server_round)


def _last(
    history: Sequence[RoundRecord], get: Callable[[RoundRecord], float | None]
) -> RoundRecord | None:
    """The last record (by round) for which ``get`` is not ``None``."""
    for record in reversed(_sorted(history)):
        if get(record) is not None:
            return record
    return None


def _rounds_completed(history: Sequence[RoundRecord]) -> int:
    return max((r.server_round for r in history), default=0)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, then rename)."""
    atomic_write_bytes(path, data)


# ---------------------------------------------------------------------------- summary.md


def _privacy_lines(privacy: Mapping[str, object]) -> list[str]:
    """The privacy section of summary.md."""
    delta = privacy.get("delta")
    sample = _section(privacy, "sample_level")
    client = _section(privacy, "client_level")
    sample_on, client_on = _enabled(sample), _enabled(client)
    lines = ["## Privacy", ""]
    if privacy.get("private") is False:
        lines += [f"**{privacy.get('noise')}**: the epsilons below are void.", ""]
    if not sample_on and not client_on:
        lines += [
            "Differential privacy was disabled for this run: no privacy guarantee is claimed."
        ]
    else:
        lines += [SEPARATE_GUARANTEES, ""]
    lines += ["### Sample-level (DP-SGD on each client)", ""]
    if sample_on:
        mechanism = _section(sample, "mechanism")
        rows = [
            [
                "max epsilon over clients",
                f"{_fmt_eps(sample.get('max_epsilon'))} at delta = {_fmt_delta(delta)}",
            ],
            [
                "median epsilon over clients",
                f"{_fmt_eps(sample.get('median_epsilon'))} at delta = {_fmt_delta(delta)}",
            ],
            ["mean epsilon over clients", _fmt_eps(sample.get("mean_epsilon"))],
            ["clients accounted", _fmt_value(sample.get("clients"))],
            ["budget declines", _fmt_value(sample.get("declines"))],
            ["noise multiplier", _fmt_value(mechanism.get("noise_multiplier"))],
            ["max grad norm", _fmt_value(mechanism.get("max_grad_norm"))],
            ["sample rates", _fmt_value(mechanism.get("sample_rates"))],
        ]
        lines += _md_table(["Quantity", "Value"], rows)
    else:
        lines += ["Disabled."]
    lines += ["", "### Client-level (DP-FedAvg on the server)", ""]
    if client_on:
        client_delta = client.get("delta", delta)
        rows = [
            ["epsilon", f"{_fmt_eps(client.get('epsilon'))} at delta = {_fmt_delta(client_delta)}"],
            ["noise multiplier", _fmt_value(client.get("noise_multiplier"))],
            ["clipping norm", _fmt_value(client.get("clipping_norm"))],
            ["clients sampled per round", _fmt_value(client.get("num_sampled"))],
            ["population", _fmt_value(client.get("population"))],
            ["releases", _fmt_value(client.get("releases"))],
            ["accounting", _fmt_value(client.get("accounting"))],
        ]
        lines += _md_table(["Quantity", "Value"], rows)
    else:
        lines += ["Disabled."]
    note = privacy.get("note")
    if isinstance(note, str) and note.strip():
        lines += ["", f"Note: {note.strip()}"]
    return lines


def _summary_markdown(
    history: Sequence[RoundRecord],
    privacy: Mapping[str, object],
    settings: Mapping[str, object],
) -> str:
    """Build the text of summary.md."""
    records = _sorted(history)
    lines = ["# Run summary", "", "## Settings", ""]
    if settings:
        lines += _md_table(
            ["Setting", "Value"], [[str(k), _fmt_value(v)] for k, v in settings.items()]
        )
    else:
        lines += ["No settings recorded."]

    lines += ["", "## Results", ""]
    completed = _rounds_completed(records)
    if completed == 0:
        lines += ["No round completed."]
    else:
        lines += [f"Rounds completed: {completed}"]
    if records:
        acc_rec = _last(records, lambda r: r.accuracy)
        loss_rec = _last(records, lambda r: r.loss)
        if acc_rec is not None:
            lines += [
                "",
                f"Final accuracy: {_fmt_acc(acc_rec.accuracy)} (round {acc_rec.server_round})",
            ]
        else:
            lines += ["", "Final accuracy: no central evaluation."]
        if loss_rec is not None:
            lines += ["", f"Final loss: {_fmt_loss(loss_rec.loss)} (round {loss_rec.server_round})"]
        else:
            lines += ["", "Final loss: no central evaluation."]
        total = [r.seconds for r in records if r.seconds is not None]
        if total:
            lines += ["", f"Training time: {_fmt_seconds(sum(total))} s"]

        lines += ["", "## Rounds", ""]
        header = [
            "Round",
            "Accuracy",
            "Loss",
            "Sampled",
            "Replied",
            "Declined",
            "Rejected",
            "Failed",
            "Max ε (sample)",
            "Median ε (sample)",
            "ε (client-level)",
            "Seconds",
        ]
        rows = [
            [
                str(r.server_round),
                _fmt_acc(r.accuracy),
                _fmt_loss(r.loss),
                str(r.sampled),
                str(r.replied),
                str(r.declined),
                str(r.rejected),
                str(r.failed),
                _fmt_eps(r.max_epsilon),
                _fmt_eps(r.median_epsilon),
                _fmt_eps(r.client_level_epsilon),
                _fmt_seconds(r.seconds),
            ]
            for r in records
        ]
        lines += _md_table(header, rows)
        lines += [
            "",
            "Round 0 is the evaluation of the initial model. ε columns are at the delta below; "
            "sample-level and client-level ε are separate guarantees and are never added.",
        ]

    lines += ["", *_privacy_lines(privacy)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots


def _series(
    records: Sequence[RoundRecord], get: Callable[[RoundRecord], float | None]
) -> tuple[list[int], list[float], list[int]]:
    """Finite points of one series, and the rounds where it is infinite (or NaN)."""
    xs: list[int] = []
    ys: list[float] = []
    nonfinite: list[int] = []
    for r in records:
        value = get(r)
        if value is None:
            continue
        if math.isfinite(value):
            xs.append(r.server_round)
            ys.append(value)
        else:
            nonfinite.append(r.server_round)
    return xs, ys, nonfinite


def _render_png(
    title: str,
    ylabel: str,
    records: Sequence[RoundRecord],
    lines: Sequence[tuple[str, Callable[[RoundRecord], float | None], str]],
    *,
    empty_text: str,
    legend_title: str | None = None,
) -> bytes:
    """Draw one per-round line plot and return it as PNG bytes (Agg backend, no pyplot state)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    notes: list[str] = []
    drawn = 0
    for label, get, style in lines:
        xs, ys, nonfinite = _series(records, get)
        if xs:
            ax.plot(xs, ys, style, label=label)
            drawn += 1
        if nonfinite:
            notes.append(f"{label}: ∞ in round(s) {', '.join(str(x) for x in nonfinite)}")
    if drawn:
        ax.grid(True, alpha=0.3)
        ax.legend(title=legend_title, loc="best", fontsize="small", title_fontsize="small")
    else:
        text = empty_text if not notes else "no finite values"
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=14)
        ax.set_xticks([])
        ax.set_yticks([])
    if notes:
        ax.text(
            0.01,
            0.01,
            "\n".join(notes),
            ha="left",
            va="bottom",
            transform=ax.transAxes,
            fontsize="small",
            color="tab:red",
        )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_report(
    run_dir: Path,
    history: Sequence[RoundRecord],
    *,
    privacy: Mapping[str, object],
    settings: Mapping[str, object],
) -> list[Path]:
    """Write the plots and the Markdown summary of a run into ``run_dir``.

    Works for finished and partial runs alike: rounds without central evaluation, DP turned off,
    infinite epsilon and an empty history are all reported rather than crashing.

    Args:
        run_dir: The run directory (created if missing).
        history: One record per round, in any order; round 0 is the initial evaluation.
        privacy: The privacy ledger's summary (``delta``, ``sample_level``, ``client_level``,
            ``note``); any part may be missing or ``enabled: False``.
        settings: Run settings for the summary's settings table.

    Returns:
        The written files: ``accuracy.png``, ``loss.png``, ``epsilon.png`` and ``summary.md``.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = _sorted(history)
    empty = "no round completed" if not records else "no central evaluation"

    sample_on = _enabled(_section(privacy, "sample_level"))
    client_on = _enabled(_section(privacy, "client_level"))
    if not records:
        eps_empty = "no round completed"
    elif sample_on or client_on:
        eps_empty = "no ε recorded"
    else:
        eps_empty = "DP disabled"
    delta = _fmt_delta(privacy.get("delta"))
    eps_ylabel = "ε" if delta == MISSING else f"ε at δ = {delta}"

    pngs: list[tuple[str, bytes]] = [
        (
            "accuracy.png",
            _render_png(
                "Accuracy",
                "accuracy",
                records,
                [
                    ("central test accuracy", lambda r: r.accuracy, "o-"),
                    ("mean client train accuracy", lambda r: r.train_accuracy, "s--"),
                ],
                empty_text=empty,
            ),
        ),
        (
            "loss.png",
            _render_png(
                "Loss",
                "loss",
                records,
                [
                    ("central test loss", lambda r: r.loss, "o-"),
                    ("mean client train loss", lambda r: r.train_loss, "s--"),
                ],
                empty_text=empty,
            ),
        ),
        (
            "epsilon.png",
            _render_png(
                "Privacy spent",
                eps_ylabel,
                records,
                [
                    ("sample-level ε, max over clients", lambda r: r.max_epsilon, "o-"),
                    ("sample-level ε, median over clients", lambda r: r.median_epsilon, "s--"),
                    ("client-level ε", lambda r: r.client_level_epsilon, "^-"),
                ],
                empty_text=eps_empty,
                legend_title="separate guarantees, never summed",
            ),
        ),
    ]

    written: list[Path] = []
    for name, data in pngs:
        path = run_dir / name
        _atomic_write_bytes(path, data)
        written.append(path)
    summary = run_dir / "summary.md"
    _atomic_write_bytes(summary, _summary_markdown(records, privacy, settings).encode("utf-8"))
    written.append(summary)
    logger.info("wrote run report (%d rounds) to %s", _rounds_completed(records), run_dir)
    return written


# ---------------------------------------------------------------------------- terminal


def render_summary_table(history: Sequence[RoundRecord], privacy: Mapping[str, object]) -> Table:
    """Build a rich table of the run for the terminal.

    Args:
        history: One record per round, in any order.
        privacy: The privacy ledger's summary (see :func:`write_report`).

    Returns:
        A :class:`rich.table.Table` with round, accuracy, loss, the client counts, the maximum
        sample-level epsilon and the client-level epsilon.
    """
    from rich.table import Table

    sample_on = _enabled(_section(privacy, "sample_level"))
    client_on = _enabled(_section(privacy, "client_level"))
    if sample_on or client_on:
        caption = (
            f"eps at delta = {_fmt_delta(privacy.get('delta'))}; sample-level and client-level "
            "eps are separate guarantees, not added"
        )
    else:
        caption = "DP disabled"
    if privacy.get("private") is False:
        caption = "NOT PRIVATE (reproducible test noise): " + caption
    records = _sorted(history)
    if not records:
        caption = "No round completed. " + caption
    table = Table(title="Run summary", caption=caption)
    for header in ("round", "acc", "loss", "sampled", "replied", "declined", "rejected", "failed"):
        table.add_column(header, justify="right")
    table.add_column("max eps (sample)", justify="right")
    table.add_column("eps (client)", justify="right")
    for r in records:
        table.add_row(
            str(r.server_round),
            _fmt_acc(r.accuracy),
            _fmt_loss(r.loss),
            str(r.sampled),
            str(r.replied),
            f"{r.declined} ({r.refused} refused)" if r.refused else str(r.declined),
            str(r.rejected),
            str(r.failed),
            _fmt_eps(r.max_epsilon),
            _fmt_eps(r.client_level_epsilon),
        )
    return table
