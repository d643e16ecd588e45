"""Run reports: plots and a Markdown summary of a finished (or partial) training run.

At the end of a run or after a crash, the server hands the history (one
:class:`~pollinate.rundir.records.RoundRecord` per round, round ``0`` being the evaluation of
the initial model) and the privacy ledger's summary to :func:`write_report`, which writes into
the run directory the figures of :mod:`pollinate.rundir.plots` (``accuracy.png``, ``loss.png``,
``epsilon.png``) and ``summary.md``: run settings, final metrics, a per-round table and the
privacy section. :func:`render_summary_table` builds the same overview as a rich table for
the terminal.

Every file is written atomically (:mod:`pollinate._atomic`), so a crash never leaves a
half-written report behind. matplotlib and rich are imported lazily, inside the functions that
need them, so importing this module is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pollinate._atomic import atomic_write_bytes
from pollinate.log import logger
from pollinate.rundir.formatting import (
    MISSING,
    enabled,
    fmt_acc,
    fmt_delta,
    fmt_eps,
    fmt_loss,
    fmt_seconds,
    fmt_value,
    last_with,
    md_table,
    rounds_completed,
    section,
    sorted_by_round,
)
from pollinate.rundir.plots import metric_names, write_plots
from pollinate.rundir.records import RoundRecord

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["SEPARATE_GUARANTEES", "SUMMARY_FILE", "render_summary_table", "write_report"]

#: The Markdown summary :func:`write_report` writes beside the plots.
SUMMARY_FILE = "summary.md"

#: The sentence every report carries wherever both kinds of epsilon could appear.
SEPARATE_GUARANTEES = (
    "Sample-level and client-level epsilon are separate guarantees (one protects individual "
    "training examples within a client, the other a client's whole contribution); "
    "they are not added."
)

_ROUND_HEADER = (
    "Round", "Accuracy", "Loss", "Sampled", "Replied", "Declined", "Rejected", "Failed",
    "Max ε (sample)", "Median ε (sample)", "ε (client-level)", "Seconds",
)  # fmt: skip


# ---------------------------------------------------------------------------- summary.md


def _sample_level_lines(sample: Mapping[str, object], delta: object) -> list[str]:
    """The sample-level table of the privacy section."""
    mechanism = section(sample, "mechanism")
    rows = [
        [
            "max epsilon over clients",
            f"{fmt_eps(sample.get('max_epsilon'))} at delta = {fmt_delta(delta)}",
        ],
        [
            "median epsilon over clients",
            f"{fmt_eps(sample.get('median_epsilon'))} at delta = {fmt_delta(delta)}",
        ],
        ["mean epsilon over clients", fmt_eps(sample.get("mean_epsilon"))],
        ["clients accounted", fmt_value(sample.get("clients"))],
        ["budget declines", fmt_value(sample.get("declines"))],
        ["noise multiplier", fmt_value(mechanism.get("noise_multiplier"))],
        ["max grad norm", fmt_value(mechanism.get("max_grad_norm"))],
        ["sample rates", fmt_value(mechanism.get("sample_rates"))],
    ]
    return md_table(["Quantity", "Value"], rows)


def _client_level_lines(client: Mapping[str, object], delta: object) -> list[str]:
    """The client-level table of the privacy section."""
    client_delta = client.get("delta", delta)
    rows = [
        ["mechanism", fmt_value(client.get("mechanism"))],
        [
            "epsilon (worst client)",
            f"{fmt_eps(client.get('epsilon'))} at delta = {fmt_delta(client_delta)}",
        ],
        [
            "epsilon by RDP / by PLD",
            f"{fmt_eps(client.get('epsilon_rdp'))} / {fmt_eps(client.get('epsilon_pld'))}",
        ],
        ["noise multiplier", fmt_value(client.get("noise_multiplier"))],
        ["clipping norm (last)", fmt_value(client.get("clipping_norm"))],
        ["clients sampled per round", fmt_value(client.get("num_sampled"))],
        ["population", fmt_value(client.get("population"))],
        ["releases", fmt_value(client.get("releases"))],
        ["accounting", fmt_value(client.get("accounting"))],
    ]
    return md_table(["Quantity", "Value"], rows)


def _privacy_lines(privacy: Mapping[str, object]) -> list[str]:
    """The privacy section of summary.md."""
    delta = privacy.get("delta")
    sample = section(privacy, "sample_level")
    client = section(privacy, "client_level")
    sample_on, client_on = enabled(sample), enabled(client)
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
    lines += _sample_level_lines(sample, delta) if sample_on else ["Disabled."]
    lines += ["", "### Client-level (DP-FedAvg on the server)", ""]
    lines += _client_level_lines(client, delta) if client_on else ["Disabled."]
    note = privacy.get("note")
    if isinstance(note, str) and note.strip():
        lines += ["", f"Note: {note.strip()}"]
    return lines


def _settings_lines(settings: Mapping[str, object]) -> list[str]:
    """The settings section of summary.md."""
    lines = ["## Settings", ""]
    if settings:
        lines += md_table(
            ["Setting", "Value"], [[str(k), fmt_value(v)] for k, v in settings.items()]
        )
    else:
        lines += ["No settings recorded."]
    return lines


def _final_lines(records: Sequence[RoundRecord]) -> list[str]:
    """Final accuracy and loss (the last round that has them) and the total training time."""
    acc_rec = last_with(records, lambda r: r.accuracy)
    loss_rec = last_with(records, lambda r: r.loss)
    lines: list[str] = []
    if acc_rec is not None:
        lines += ["", f"Final accuracy: {fmt_acc(acc_rec.accuracy)} (round {acc_rec.server_round})"]
    elif not any(r.metrics for r in records):
        lines += ["", "Final accuracy: no central evaluation."]
    metrics_rec = last_with(records, lambda r: 0.0 if r.metrics else None)
    if metrics_rec is not None and metrics_rec.metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics_rec.metrics.items())
        lines += ["", f"Final metrics: {shown} (round {metrics_rec.server_round})"]
    if loss_rec is not None:
        lines += ["", f"Final loss: {fmt_loss(loss_rec.loss)} (round {loss_rec.server_round})"]
    else:
        lines += ["", "Final loss: no central evaluation."]
    total = [r.seconds for r in records if r.seconds is not None]
    if total:
        lines += ["", f"Training time: {fmt_seconds(sum(total))} s"]
    return lines


def _rounds_lines(records: Sequence[RoundRecord]) -> list[str]:
    """The per-round table of summary.md."""
    rows = [
        [
            str(r.server_round),
            fmt_acc(r.accuracy),
            fmt_loss(r.loss),
            str(r.sampled),
            str(r.replied),
            str(r.declined),
            str(r.rejected),
            str(r.failed),
            fmt_eps(r.max_epsilon),
            fmt_eps(r.median_epsilon),
            fmt_eps(r.client_level_epsilon),
            fmt_seconds(r.seconds),
        ]
        for r in records
    ]
    return [
        "## Rounds",
        "",
        *md_table(_ROUND_HEADER, rows),
        "",
        "Round 0 is the evaluation of the initial model. ε columns are at the delta below; "
        "sample-level and client-level ε are separate guarantees and are never added.",
        *_metrics_lines(records),
    ]


def _metrics_lines(records: Sequence[RoundRecord]) -> list[str]:
    """Central evaluation's metrics per round (the task's and the user's), if any."""
    names = metric_names(records)
    if not names:
        return []
    rows = [
        [str(r.server_round), *(_fmt_metric((r.metrics or {}).get(n)) for n in names)]
        for r in records
    ]
    return ["", "## Metrics", "", *md_table(["Round", *names], rows)]


def _fmt_metric(value: float | None) -> str:
    return MISSING if value is None or math.isnan(value) else f"{value:.4g}"


def _summary_markdown(
    history: Sequence[RoundRecord],
    privacy: Mapping[str, object],
    settings: Mapping[str, object],
) -> str:
    """Build the text of summary.md."""
    records = sorted_by_round(history)
    lines = ["# Run summary", "", *_settings_lines(settings), "", "## Results", ""]
    completed = rounds_completed(records)
    lines += ["No round completed."] if completed == 0 else [f"Rounds completed: {completed}"]
    if records:
        lines += _final_lines(records)
        lines += ["", *_rounds_lines(records)]
    lines += ["", *_privacy_lines(privacy)]
    return "\n".join(lines) + "\n"


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
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    records = sorted_by_round(history)
    written = write_plots(run_dir, records, privacy)
    summary = run_dir / SUMMARY_FILE
    atomic_write_bytes(summary, _summary_markdown(records, privacy, settings).encode("utf-8"))
    written.append(summary)
    logger.info("wrote run report (%d rounds) to %s", rounds_completed(records), run_dir)
    return written


# ---------------------------------------------------------------------------- terminal


def _table_caption(records: Sequence[RoundRecord], privacy: Mapping[str, object]) -> str:
    """The terminal table's caption: delta and the separate-guarantees note, or DP disabled."""
    sample_on = enabled(section(privacy, "sample_level"))
    client_on = enabled(section(privacy, "client_level"))
    if sample_on or client_on:
        caption = (
            f"eps at delta = {fmt_delta(privacy.get('delta'))}; sample-level and client-level "
            "eps are separate guarantees, not added"
        )
    else:
        caption = "DP disabled"
    if privacy.get("private") is False:
        caption = "NOT PRIVATE (reproducible test noise): " + caption
    if not records:
        caption = "No round completed. " + caption
    return caption


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

    records = sorted_by_round(history)
    table = Table(title="Run summary", caption=_table_caption(records, privacy))
    # a regression task has no accuracy: its headline error takes the column
    error = not any(r.accuracy is not None for r in records) and "rmse" in metric_names(records)
    first = "rmse" if error else "acc"
    for header in ("round", first, "loss", "sampled", "replied", "declined", "rejected"):
        table.add_column(header, justify="right")
    table.add_column("failed", justify="right")
    table.add_column("max eps (sample)", justify="right")
    table.add_column("eps (client)", justify="right")
    for r in records:
        table.add_row(
            str(r.server_round),
            _fmt_metric((r.metrics or {}).get("rmse")) if error else fmt_acc(r.accuracy),
            fmt_loss(r.loss),
            str(r.sampled),
            str(r.replied),
            f"{r.declined} ({r.refused} refused)" if r.refused else str(r.declined),
            str(r.rejected),
            str(r.failed),
            fmt_eps(r.max_epsilon),
            fmt_eps(r.client_level_epsilon),
        )
    return table
