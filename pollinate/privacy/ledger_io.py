"""The privacy ledger on disk: the ``privacy.json`` document and its file I/O.

The document holds a version, the run's settings, the per-round history (one list per entry
kind, each entry a plain dict of its fields) and a summary. Writing goes through
:func:`pollinate._atomic.atomic_write_text`; reading turns every failure into a
:class:`ConfigError` naming the file. Replaying the history into a ledger (which checks that
it is consistent) is :meth:`~pollinate.privacy.ledger.PrivacyLedger.from_dict`'s part.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pollinate._atomic import atomic_write_text
from pollinate.errors import ConfigError
from pollinate.privacy.ledger_entries import ClientLevelEntry, ClientRoundEntry, DeclineEntry

__all__ = [
    "check_document",
    "document_entries",
    "read_document",
    "to_document",
    "to_json",
    "write_json",
]

_JSON_VERSION = 1

# The document's history lists and the entry kind each holds.
_ENTRY_KINDS: dict[str, type[ClientRoundEntry] | type[DeclineEntry] | type[ClientLevelEntry]] = {
    "clients": ClientRoundEntry,
    "declines": DeclineEntry,
    "client_level_releases": ClientLevelEntry,
}


def to_document(
    *,
    delta: float,
    sample_level: bool,
    client_level: bool,
    reproducible_noise: bool,
    clients: Sequence[ClientRoundEntry],
    declines: Sequence[DeclineEntry],
    releases: Sequence[ClientLevelEntry],
    summary: dict[str, object],
) -> dict[str, object]:
    """The full ledger, including the per-round history, as JSON-ready data."""
    return {
        "version": _JSON_VERSION,
        "delta": delta,
        "sample_level": sample_level,
        "client_level": client_level,
        "reproducible_noise": reproducible_noise,
        # flat dataclasses of plain values: a dict copy each (asdict() recurses, slowly)
        "clients": [dict(vars(entry)) for entry in clients],
        "declines": [dict(vars(entry)) for entry in declines],
        "client_level_releases": [dict(vars(entry)) for entry in releases],
        "summary": summary,
    }


def check_document(d: object) -> None:
    """Raise :class:`ConfigError` unless ``d`` is a mapping of the supported version."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"privacy ledger must be a mapping, got {type(d).__name__}")
    if d.get("version") != _JSON_VERSION:
        raise ConfigError(f"privacy ledger has unsupported version {d.get('version')!r}")


def document_entries(d: Mapping[str, object], key: str) -> Iterator[dict[str, Any]]:
    """The entries of the history list ``key``, each checked to hold exactly its kind's fields.

    A generator: each entry is checked only when the caller reaches it, so a replay reports
    the first problem in document order. ``release`` may be missing from a client entry (it
    defaults to ``"train"``).

    Raises:
        KeyError: If ``d`` has no ``key``.
        ConfigError: If the list or an entry is malformed.
    """
    items = d[key]
    if not isinstance(items, list):
        raise ConfigError(f"privacy ledger key {key!r} must be a list")
    expected = set(_ENTRY_KINDS[key].__dataclass_fields__)
    for item in items:
        if not isinstance(item, dict) or set(item) | {"release"} != expected | {"release"}:
            raise ConfigError(f"malformed privacy ledger {key} entry: {item!r}")
        yield item


def to_json(document: Mapping[str, object]) -> str:
    """``document`` as readable JSON (indent 2, sorted keys)."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, document: Mapping[str, object]) -> None:
    """Write ``document`` to ``path`` as JSON, atomically (:mod:`pollinate._atomic`)."""
    atomic_write_text(Path(path), to_json(document))


def read_document(path: Path) -> object:
    """The JSON value held by ``path``.

    Raises:
        ConfigError: If the file is missing, unreadable or not JSON; the message names it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read privacy ledger file {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"corrupt privacy ledger file {path}: {exc}") from exc
