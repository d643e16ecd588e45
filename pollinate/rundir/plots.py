"""The run report's figures: per-round line plots rendered with matplotlib (Agg backend).

:func:`write_plots` writes into the run directory:

* ``accuracy.png`` -- central test accuracy per round, plus the mean client-reported training
  accuracy when clients reported one;
* ``loss.png`` -- central test loss per round, plus the mean client training loss;
* ``epsilon.png`` -- per round, the maximum and median sample-level epsilon over clients and the
  client-level epsilon, drawn as separate lines: they are separate guarantees and never summed.

All three are rendered before any is written, and each is written atomically. matplotlib is
imported inside the functions that need it, so importing this module is cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pollinate._atomic import atomic_write_bytes
from pollinate.rundir.formatting import MISSING, enabled, fmt_delta, section
from pollinate.rundir.records import RoundRecord

__all__ = ["METRICS_PLOT", "PLOT_FILES", "write_plots"]

#: The figures :func:`write_plots` writes, in order.
PLOT_FILES = ("accuracy.png", "loss.png", "epsilon.png")
#: Written too when rounds carry the task's metrics (macro F1, AUC, MAE, RMSE, MAPE, ...).
METRICS_PLOT = "metrics.png"

#: One line of a plot: its legend label, the value of a record, the matplotlib format string.
_Line = tuple[str, Callable[[RoundRecord], float | None], str]


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
    lines: Sequence[_Line],
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


def _epsilon_png(records: Sequence[RoundRecord], privacy: Mapping[str, object]) -> bytes:
    """The privacy-spent plot: both kinds of epsilon, as separate lines."""
    sample_on = enabled(section(privacy, "sample_level"))
    client_on = enabled(section(privacy, "client_level"))
    if not records:
        eps_empty = "no round completed"
    elif sample_on or client_on:
        eps_empty = "no ε recorded"
    else:
        eps_empty = "DP disabled"
    delta = fmt_delta(privacy.get("delta"))
    eps_ylabel = "ε" if delta == MISSING else f"ε at δ = {delta}"
    return _render_png(
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
    )


def write_plots(
    run_dir: Path, records: Sequence[RoundRecord], privacy: Mapping[str, object]
) -> list[Path]:
    """Render the three figures of ``records`` (sorted by round) and write them to ``run_dir``.

    Args:
        run_dir: The run directory (it must exist).
        records: One record per round, sorted by round.
        privacy: The privacy ledger's summary (see :func:`pollinate.rundir.report.write_report`).

    Returns:
        The written files, in the order of :data:`PLOT_FILES`.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)

    empty = "no round completed" if not records else "no central evaluation"
    names = metric_names(records)
    if records and not any(r.accuracy is not None for r in records) and names:
        empty = f"no accuracy for this task: see {METRICS_PLOT}"
    accuracy = _render_png(
        "Accuracy",
        "accuracy",
        records,
        [
            ("central test accuracy", lambda r: r.accuracy, "o-"),
            ("mean client train accuracy", lambda r: r.train_accuracy, "s--"),
        ],
        empty_text=empty,
    )
    loss = _render_png(
        "Loss",
        "loss",
        records,
        [
            ("central test loss", lambda r: r.loss, "o-"),
            ("mean client train loss", lambda r: r.train_loss, "s--"),
        ],
        empty_text=empty,
    )
    pngs = zip(PLOT_FILES, (accuracy, loss, _epsilon_png(records, privacy)), strict=True)
    files = list(pngs)
    if names:
        files.append((METRICS_PLOT, _metrics_png(records, names)))
    written: list[Path] = []
    for name, data in files:
        path = Path(run_dir) / name
        atomic_write_bytes(path, data)
        written.append(path)
    return written


def metric_names(records: Sequence[RoundRecord]) -> list[str]:
    """The central-evaluation metrics the records carry, in first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        names.update(dict.fromkeys(r.metrics or {}))
    return list(names)


def _metrics_png(records: Sequence[RoundRecord], names: Sequence[str]) -> bytes:
    """One panel per metric of central evaluation, per round."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(3.2 * len(names) + 0.6, 3.6), dpi=100, layout="constrained")
    fig.suptitle("Central evaluation metrics")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        xs, ys, _ = _series(records, lambda r, n=name: (r.metrics or {}).get(n))  # type: ignore[misc]
        ax.plot(xs, ys, "o-")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
