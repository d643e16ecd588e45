"""Formatting shared by the run report's plots, summary.md and terminal table.

Number formats (accuracy, loss, epsilon, delta, seconds), Markdown table cells, reading
sections of the privacy ledger's summary, and ordering a history by round. Nothing here
writes files or imports matplotlib or rich.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from pollinate.rundir.records import RoundRecord

__all__ = [
    "MISSING",
    "enabled",
    "fmt_acc",
    "fmt_delta",
    "fmt_eps",
    "fmt_loss",
    "fmt_seconds",
    "fmt_value",
    "last_with",
    "md_table",
    "rounds_completed",
    "section",
    "sorted_by_round",
]

#: Written for a value that is not known (no central evaluation, DP off, ...).
MISSING = "—"


def section(mapping: Mapping[str, object], key: str) -> Mapping[str, object]:
    """Return ``mapping[key]`` if it is a mapping, else an empty one."""
    value = mapping.get(key)
    if isinstance(value, Mapping):
        return value
    return {}


def enabled(part: Mapping[str, object]) -> bool:
    """Whether a privacy section is on: its ``enabled`` flag, or non-empty without one."""
    if "enabled" in part:
        return part["enabled"] is True
    return bool(part)


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


def fmt_acc(value: object) -> str:
    """An accuracy, four decimals."""
    return _fmt(value, ".4f")


def fmt_loss(value: object) -> str:
    """A loss, four decimals."""
    return _fmt(value, ".4f")


def fmt_eps(value: object) -> str:
    """An epsilon, two decimals."""
    return _fmt(value, ".2f")


def fmt_delta(value: object) -> str:
    """A delta, in general format (``1e-05``)."""
    return _fmt(value, "g")


def fmt_seconds(value: object) -> str:
    """A duration in seconds, one decimal."""
    return _fmt(value, ".1f")


def fmt_value(value: object) -> str:
    """Format a setting or mechanism parameter for a Markdown cell."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return _fmt(value, "g")
    if isinstance(value, list | tuple):
        return ", ".join(fmt_value(v) for v in value) if value else MISSING
    return str(value)


def _md_cell(text: str) -> str:
    """Escape text for one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table (cells escaped)."""
    lines = [_md_row(header), "|" + "|".join("---" for _ in header) + "|"]
    lines.extend(_md_row(r) for r in rows)
    return lines


def sorted_by_round(history: Sequence[RoundRecord]) -> list[RoundRecord]:
    """The records ordered by round number."""
    return sorted(history, key=lambda r: r.server_round)


def last_with(
    history: Sequence[RoundRecord], get: Callable[[RoundRecord], float | None]
) -> RoundRecord | None:
    """The last record (by round) for which ``get`` is not ``None``."""
    for record in reversed(sorted_by_round(history)):
        if get(record) is not None:
            return record
    return None


def rounds_completed(history: Sequence[RoundRecord]) -> int:
    """The highest round number in the history (0 when none completed)."""
    return max((r.server_round for r in history), default=0)
