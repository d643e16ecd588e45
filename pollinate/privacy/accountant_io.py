"""A client's privacy history in transit and at rest: Flower record, JSON document, file.

Functions here convert a history (a sequence of :class:`MechanismStep`, oldest first) to and
from the parallel lists of a Flower ``ConfigRecord`` (how it travels between rounds in
``Context.state``) and the versioned JSON document mirrored on disk. The
:class:`~pollinate.privacy.accountant.ClientAccountant` methods of the same names call them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError
from pollinate.privacy.mechanism import MechanismStep

__all__ = [
    "history_from_json",
    "history_from_record",
    "history_to_json",
    "history_to_record",
    "load_history",
    "save_history",
]

_JSON_VERSION = 1
_RECORD_KEYS = ("noise", "rate", "steps")
_ENTRY_KEYS = {"noise_multiplier", "sample_rate", "steps"}


# ---------------------------------------------------------------- Flower record


def history_to_record(history: Sequence[MechanismStep]) -> dict[str, list[float] | list[int]]:
    """``history`` as parallel lists, suitable for a Flower ``ConfigRecord``."""
    return {
        "noise": [entry.noise_multiplier for entry in history],
        "rate": [entry.sample_rate for entry in history],
        "steps": [entry.steps for entry in history],
    }


def history_from_record(record: Mapping[str, object]) -> list[MechanismStep]:
    """The history held by :func:`history_to_record` output (e.g. a ``ConfigRecord``).

    Raises:
        ConfigError: If keys are missing, the lists differ in length or hold invalid values.
    """
    if not isinstance(record, Mapping):
        raise ConfigError(f"accountant record must be a mapping, got {type(record).__name__}")
    columns: list[list[object]] = []
    for key in _RECORD_KEYS:
        if key not in record:
            raise ConfigError(f"accountant record is missing the key {key!r}")
        value = record[key]
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"accountant record key {key!r} must be a list, got {type(value).__name__}"
            )
        columns.append(list(value))
    if len({len(column) for column in columns}) != 1:
        raise ConfigError(
            "accountant record lists differ in length: "
            + ", ".join(
                f"{key}={len(column)}" for key, column in zip(_RECORD_KEYS, columns, strict=True)
            )
        )
    return [
        MechanismStep(noise_multiplier=noise, sample_rate=rate, steps=steps)
        for noise, rate, steps in zip(*columns, strict=True)
    ]


# ---------------------------------------------------------------- JSON document


def history_to_json(history: Sequence[MechanismStep]) -> str:
    """``history`` as readable JSON (indent 2, sorted keys)."""
    document = {
        "version": _JSON_VERSION,
        "accountant": "rdp",
        "history": [
            {
                "noise_multiplier": entry.noise_multiplier,
                "sample_rate": entry.sample_rate,
                "steps": entry.steps,
            }
            for entry in history
        ],
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def history_from_json(text: str) -> list[MechanismStep]:
    """The history held by :func:`history_to_json` output.

    Raises:
        ConfigError: If the text is not valid JSON or not a valid accountant document.
    """
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"accountant JSON is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError("accountant JSON must be an object")
    if document.get("version") != _JSON_VERSION:
        raise ConfigError(f"accountant JSON has unsupported version {document.get('version')!r}")
    if document.get("accountant") != "rdp":
        raise ConfigError(
            f"accountant JSON has unsupported accountant {document.get('accountant')!r}"
        )
    entries = document.get("history")
    if not isinstance(entries, list):
        raise ConfigError("accountant JSON must hold a 'history' list")
    history: list[MechanismStep] = []
    for entry in entries:
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise ConfigError(f"malformed accountant history entry: {entry!r}")
        history.append(
            MechanismStep(
                noise_multiplier=entry["noise_multiplier"],
                sample_rate=entry["sample_rate"],
                steps=entry["steps"],
            )
        )
    return history


# ---------------------------------------------------------------- files


def save_history(path: Path, history: Sequence[MechanismStep]) -> None:
    """Write ``history`` to ``path`` as JSON, atomically (:mod:`pollinate._atomic`)."""
    atomic_write_text(Path(path), history_to_json(history))


def load_history(path: Path) -> list[MechanismStep]:
    """Read a history written by :func:`save_history`; a missing file gives an empty history.

    Raises:
        ConfigError: If the file cannot be read or is corrupt; the message names the path.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read privacy accountant file {path}: {exc}") from exc
    try:
        return history_from_json(text)
    except ConfigError as exc:
        raise ConfigError(f"corrupt privacy accountant file {path}: {exc}") from exc
